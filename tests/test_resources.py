"""The sm_90 bar, checked without a GPU: no Triton kernel config that an autotuner may choose (or a launcher picks)
spills registers or asks for more shared memory than an H100 block may have, and every kernel has a config that
fits.

It covers the part the targets name (`python -m bench.resources --scope check`): attention forward, backward dK/dV
and dQ in bf16 and fp16 at head dims 64 and 128, causal with a bias, a key padding mask and dropout; LayerNorm
forward and backward in bf16, fp16 and fp32 from N 768 to 65536; bias + activation in bf16 and fp16; the LSTM
kernels in bf16 at the bench's sizes, both forms, with and without a projection. The full report (fp32 attention,
the plain flags, the CUDA kernels, and the occupancy of each) is `python -m bench --resources`
(bench/results/sm90-resources.md). The compiles run in a subprocess without TRITON_INTERPRET, as a GPU's would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import resources

# FASTENC_AUTOTUNE=0 would shrink what the autotuners may choose to one config each.
_ENV = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTENC_AUTOTUNE")}


def _python(code_or_args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *code_or_args], env={**_ENV, **env}, capture_output=True, text=True,
                          timeout=900)


def test_every_config_fits_sm90():
    pytest.importorskip("triton.backends.nvidia", reason="this triton has no NVIDIA backend to compile with")
    run = _python(["-m", "bench.resources", "--scope", "check", "--check", "--no-write", "--quiet"])
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-4000:]


def test_fastenc_autotune_0_keeps_one_config_per_kernel():
    pytest.importorskip("triton.backends.nvidia", reason="this triton has no NVIDIA backend to compile with")
    count = ("import collections, json; from bench import resources as r; "
             "compiles = r.compiles_of(r.attention_case('bf16', 64, True).call); "
             "print(json.dumps(collections.Counter(c.name for c in compiles)))")
    tuned, single = (_python(["-c", count], **env) for env in ({}, {"FASTENC_AUTOTUNE": "0"}))
    assert tuned.returncode == 0 and single.returncode == 0, tuned.stderr[-4000:] + single.stderr[-4000:]
    tuned, single = json.loads(tuned.stdout), json.loads(single.stdout)
    assert set(single) == set(tuned) and len(tuned) == 3, (tuned, single)
    assert all(n == 1 for n in single.values()) and all(n > 1 for n in tuned.values()), (tuned, single)


@pytest.mark.parametrize("registers,shared,warps,blocks", [
    (255, 0, 4, 2),           # registers: 65536 // (4 warps * 8192)
    (32, 0, 4, 16),           # threads: 2048 // 128
    (16, 0, 1, 32),           # the block limit
    (64, 100 * 1024, 4, 2),   # shared: 228 KB // (100 KB + 1 KB)
    (64, 228 * 1024, 4, 0),   # over the 227 KB a block may have
])
def test_occupancy_rule(registers, shared, warps, blocks):
    assert resources.blocks_per_sm(registers, shared, warps) == blocks
