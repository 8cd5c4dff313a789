"""Every Triton kernel group of tests/triton_aot.py compiles to an sm_90 binary on this machine, GPU or not.

The interpreter that runs the kernels on CPU never runs the GPU code generator (and treats barriers as no-ops), so
this is the check that the code a GPU would compile is accepted: compiled in a process without TRITON_INTERPRET.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import pytest

from tests import triton_aot


@pytest.mark.parametrize("group", triton_aot.GROUPS)
def test_kernels_compile_for_hopper(group):
    pytest.importorskip("triton.backends.nvidia", reason="this triton has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tests.triton_aot", group], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    compiled = set(re.findall(rf"^{group}: (\w+) .*: sm_90 cubin", run.stdout, re.MULTILINE))
    module = importlib.import_module(f"fastenc.kernels.{group}")
    kernels = {name for name in vars(module) if name.startswith("_") and name.endswith("_kernel")}
    assert compiled == kernels, f"compiled {sorted(compiled)}, the module has {sorted(kernels)}:\n{run.stdout}"
