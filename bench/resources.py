"""What each kernel asks of an H100 (sm_90): registers, spills, shared memory and the occupancy they allow.

`python -m bench --resources` (or `python -m bench.resources`, see --help) compiles for sm_90, without a GPU,
every Triton kernel the launchers in kernels/ start for the cases below, with every config its autotuner may
choose there (after its prune), and the CUDA kernels of csrc/cuda with `nvcc -arch=sm_90 -Xptxas -v`. It writes
bench/results/sm90-resources-triton-<version>.json (one per triton version) and bench/results/sm90-resources.md
(the tables of every such JSON there). `--check` lists what breaks the bar and exits 1: a compile that spills or
asks for more shared memory than an sm_90 block may have, or a kernel left with no config that fits.
tests/test_resources.py runs the check on the part the targets name (`--scope check`).

What is compiled is what a GPU launch would compile: the launchers run on meta tensors, and each launch they
make is turned by triton's own argument specialization (integers equal to 1 become constants, pointers and
integers divisible by 16 are marked so, which decides how wide loads are and so the registers) into the
triton.compile call the launch would make, on an sm_90 target. A kernel compiles once per specialization of its
arguments; the table shows each kernel and config at its worst specialization in the case. Run in a process
without TRITON_INTERPRET: triton.jit reads it at import, and the interpreter's single config is not the GPU's.

Where the numbers come from: triton.compile runs triton's bundled ptxas; the cubin's resource usage (cuobjdump
-res-usage) gives the registers and the stack frame, the compiled metadata the shared memory a launch asks for.
A Triton kernel calls no functions and has no local arrays, so its stack frame is spilled registers: triton's
own `n_spills` (read from the driver on a GPU) is that frame in 4-byte words.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import glob
import importlib
import json
import multiprocessing
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Callable, Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
SCHEMA = "fastenc-sm90-resources/1"

# sm_90 (H100) limits, from the CUDA programming guide's compute capability 9.0 column.
SM90_REGISTERS = 65536              # 32-bit registers per SM
SM90_THREADS = 2048                 # resident threads per SM (64 warps)
SM90_BLOCKS = 32                    # resident blocks per SM
SM90_SHARED_PER_SM = 228 * 1024     # shared memory per SM
SM90_SHARED_PER_BLOCK = 227 * 1024  # the most one block may ask for (opt-in above 48 KB)
SM90_SHARED_RESERVED = 1024         # the system's share of each resident block's shared memory
REGISTER_GRANULE = 256              # registers are allocated per warp in units of 256


def blocks_per_sm(registers: int, shared: int, warps: int) -> int:
    """Resident blocks per SM, the occupancy calculator's rule: the least of
         threads    SM90_THREADS // (32 * warps)
         blocks     SM90_BLOCKS
         registers  SM90_REGISTERS // (warps * roundup(32 * registers, REGISTER_GRANULE))
         shared     SM90_SHARED_PER_SM // (shared + SM90_SHARED_RESERVED)
    and 0 when one block asks for more than SM90_SHARED_PER_BLOCK."""
    if shared > SM90_SHARED_PER_BLOCK:
        return 0
    per_warp = -(-32 * registers // REGISTER_GRANULE) * REGISTER_GRANULE
    return min(SM90_THREADS // (32 * warps), SM90_BLOCKS, SM90_REGISTERS // (warps * per_warp),
               SM90_SHARED_PER_SM // (shared + SM90_SHARED_RESERVED))


# --- what a launch compiles -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Compile:
    """The triton.compile call one kernel launch makes: the kernel (module:name), its specialized signature,
    constants and attributes (as triton's launcher derives them from the arguments) and the backend options."""
    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    meta: dict  # the kernel's own constexpr parameters by name: its flags and block sizes

    @property
    def name(self) -> str:
        return self.kernel.split(":")[1]

    def config(self) -> str:
        """The tuned or launcher-chosen part: block sizes (BLOCK_D follows the head dim), warps, stages."""
        blocks = [f"{k} {v}" for k, v in self.meta.items() if k.startswith("BLOCK_") and k != "BLOCK_D"]
        return ", ".join(blocks + [f"warps {self.options['num_warps']}", f"stages {self.options['num_stages']}"])

    def key(self) -> str:
        return repr((self.kernel, self.signature, sorted(self.constexprs.items()), sorted(self.attrs.items()),
                     sorted(self.options.items())))


def _jit_function(kernel: str):
    module, name = kernel.split(":")
    obj = getattr(importlib.import_module(module), name)
    from triton.runtime.autotuner import Autotuner

    return obj.fn if isinstance(obj, Autotuner) else obj


@contextlib.contextmanager
def recording() -> Iterator[list[Compile]]:
    """Within it, a Triton kernel launch (`kernel[grid](...)`) runs nothing and appends the Compile it would make
    on sm_90 to the yielded list; an autotuned launch appends one per config its autotuner may choose for these
    arguments (after its prune, as Autotuner.run does)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    compiles: list[Compile] = []

    def jit_run(fn, *args, grid, warmup, **kwargs):
        # What JITFunction.run does before it compiles, with an sm_90 backend in place of the active driver's.
        from triton import knobs

        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
        meta = {p.name: bound_args[p.name] for p in fn.params if p.is_constexpr}
        compiles.append(Compile(f"{fn.fn.__module__}:{fn.fn.__name__}", signature, constexprs, attrs,
                                dict(options.__dict__), meta))

    def autotuned_run(tuner, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        tuner.nargs = dict(zip(tuner.arg_names, args))
        configs = tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs
        tuner.nargs = None
        for config in configs:
            jit_run(tuner.fn, *args, grid=None, warmup=False, **kwargs, **config.all_kwargs())

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, autotuned_run
    try:
        yield compiles
    finally:
        JITFunction.run, Autotuner.run = saved


def compiles_of(call: Callable[[], object]) -> list[Compile]:
    """Every distinct compile the launches of call() make."""
    with recording() as compiles:
        call()
    unique = {}
    for c in compiles:
        unique.setdefault(c.key(), c)
    return list(unique.values())


# --- the cases: launcher calls on meta tensors ------------------------------------------------------------------

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclasses.dataclass(frozen=True)
class Case:
    """Launcher calls that start one op's kernels for one dtype and size, and what the table calls them."""
    op: str
    dtype: str
    size: str
    flags: str
    call: Callable[[], object]


def _meta(dtype: str):
    import torch

    def empty(*shape, dtype=getattr(torch, DTYPES[dtype])):
        return torch.empty(*shape, dtype=dtype, device="meta")
    return empty


# Sequence length 1000 and batch 1000 rows: not multiples of 16, so no stride or size is marked divisible; the
# autotuner keeps the config it chose at the first shape for later ones of any alignment, so the bar must hold
# for the unaligned compile, which needs the most registers (narrower loads).
SEQUENCE, HEADS, BATCH = 1000, 4, 2
ROWS = 1000
SEED = 12345  # a dropout seed of 1 would compile as a constant


def attention_case(dtype: str, head_dim: int, heavy: bool, varlen: bool = False) -> Case:
    """Forward and backward. heavy: causal with dropout, and on the padded layout a bias (a bool attn_mask as
    functional.attention passes it: an (S_q, S_k) additive mask in q's dtype, expanded; its gradient wanted) and a
    key padding mask; else none of them. varlen: the packed layout (which takes no bias or key padding mask)."""
    import torch

    from fastenc.kernels import attention
    from fastenc.ops.attention import AttentionArgs

    def call():
        empty = _meta(dtype)
        shape = (BATCH * SEQUENCE, HEADS, head_dim) if varlen else (BATCH, HEADS, SEQUENCE, head_dim)
        q, k, v = (empty(*shape) for _ in range(3))
        cu_seqlens = empty(BATCH + 1, dtype=torch.int32) if varlen else None
        bias = empty(SEQUENCE, SEQUENCE).expand(BATCH, HEADS, SEQUENCE, SEQUENCE) if heavy and not varlen else None
        kpm = empty(BATCH, SEQUENCE, dtype=torch.bool) if heavy and not varlen else None
        args = AttentionArgs(q, k, v, bias, kpm, cu_seqlens, cu_seqlens, SEQUENCE, SEQUENCE, heavy, 0.125,
                             0.1 if heavy else 0.0, SEED)
        out, lse = attention.attention_forward(args)
        attention.attention_backward(torch.empty_like(out), out, lse, bias is not None, args)
    flags = ("bias+kpm+causal+dropout" if not varlen else "causal+dropout") if heavy else "plain"
    return Case("attention", dtype, f"head dim {head_dim}", flags + (", varlen" if varlen else ""), call)


def layer_norm_case(dtype: str, n: int) -> Case:
    """Forward and backward with a residual (its sum stored and its gradient added), a weight and a bias."""
    from fastenc.kernels import layer_norm
    from fastenc.ops.layer_norm import LayerNormArgs, LayerNormBackwardArgs

    def call():
        empty = _meta(dtype)
        x, r, dy, ds = (empty(ROWS, n) for _ in range(4))
        w, b = empty(n), empty(n)
        y, s, mean, rstd = layer_norm.layer_norm_forward(LayerNormArgs(x, r, w, b, 1e-5, True))
        layer_norm.layer_norm_backward(LayerNormBackwardArgs(dy, ds, s, w, mean, rstd, True))
    return Case("layer_norm", dtype, f"N {n}", "residual+weight+bias", call)


def bias_activation_case(dtype: str) -> Case:
    """Forward and backward with a bias, exact GELU and dropout."""
    from fastenc.kernels import bias_activation
    from fastenc.ops.bias_activation import BiasActivationArgs

    def call():
        empty = _meta(dtype)
        x, dy, b = empty(ROWS, 3072), empty(ROWS, 3072), empty(3072)
        args = BiasActivationArgs(x, b, "gelu", 0.1, SEED)
        bias_activation.bias_activation_forward(args)
        bias_activation.bias_activation_backward(dy, args)
    return Case("bias_activation", dtype, "any", "bias+gelu+dropout", call)


def lstm_case(dtype: str, batch: int, hiddens: tuple[int, ...], projected: bool, persistent: bool) -> Case:
    """One layer forward and backward at each hidden size, 3 steps of a full batch, in one form (a caller may force
    either); projected: with a projection to half the hidden size."""
    from fastenc.kernels import lstm
    from fastenc.ops.lstm import LstmArgs, LstmBackwardArgs

    def call():
        empty = _meta(dtype)
        for hidden in hiddens:
            proj = hidden // 2 if projected else hidden
            x, h0, c0 = empty(3, batch, hidden), empty(batch, proj), empty(batch, hidden)
            w_ih, w_hh, bias = empty(4 * hidden, hidden), empty(4 * hidden, proj), empty(4 * hidden)
            w_hr = empty(proj, hidden) if projected else None
            args = LstmArgs(x, h0, c0, w_ih, w_hh, bias, w_hr, None, False, True)
            out, h_n, c_n, gates, cs, rs = lstm.lstm_layer_forward(args, persistent=persistent)
            lstm.lstm_layer_backward(LstmBackwardArgs(empty(*out.shape), h_n, c_n, out, gates, cs, rs, [True] * 7),
                                     args, persistent=persistent)
    flags = ("persistent" if persistent else "per step") + (", projection" if projected else "")
    hidden = str(hiddens[0]) if len(hiddens) == 1 else f"{min(hiddens)}-{max(hiddens)}"
    return Case("lstm", dtype, f"batch {batch}, hidden {hidden}", flags, call)


def bench_lstm_sizes() -> dict[int, tuple[int, ...]]:
    """The bench's CUDA LSTM cases: their hidden sizes by batch."""
    from bench.cases import REGISTRY

    sizes: dict[int, set] = {}
    for p in REGISTRY["lstm"].shapes["cuda"]:
        sizes.setdefault(p["B"], set()).add(p["H"])
    return {batch: tuple(sorted(hiddens)) for batch, hiddens in sorted(sizes.items())}


LAYER_NORM_N = (768, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
OPS = ("attention", "layer_norm", "bias_activation", "lstm")


def cases(scope: str, ops=OPS) -> Iterator[Case]:
    """full: the report. check (tests/test_resources.py): the part the targets name that fits CI's time — bf16
    and fp16 attention at head dims 64 and 128 with every flag on (bias, key padding mask, causal, dropout) and, in
    bf16, with none; LayerNorm in bf16, fp16 and fp32 from N 768 to 65536; bias + activation in bf16 and fp16; the
    LSTM in bf16 at the bench's sizes. The full report adds fp32 attention, fp16 without flags, head dim 256 and the
    packed layout (bf16), the fp16 and fp32 LSTM, fp32 bias + activation and the CUDA kernels."""
    full = scope == "full"
    if "attention" in ops:
        for dtype in ("bf16", "fp16", "fp32") if full else ("bf16", "fp16"):
            for head_dim in (64, 128, 256) if full and dtype == "bf16" else (64, 128):
                for heavy in (True, False) if full or dtype == "bf16" else (True,):
                    yield attention_case(dtype, head_dim, heavy)
        if full:
            for head_dim in (64, 128):
                yield attention_case("bf16", head_dim, True, varlen=True)
    if "layer_norm" in ops:
        for dtype in ("bf16", "fp16", "fp32"):
            for n in LAYER_NORM_N:
                yield layer_norm_case(dtype, n)
    if "bias_activation" in ops:
        for dtype in ("bf16", "fp16", "fp32") if full else ("bf16", "fp16"):
            yield bias_activation_case(dtype)
    if "lstm" in ops:
        for dtype in ("bf16", "fp16", "fp32") if full else ("bf16",):
            for batch, hiddens in bench_lstm_sizes().items():
                for projected in (False, True):
                    for persistent in (False, True):
                        yield lstm_case(dtype, batch, hiddens, projected, persistent)


# --- compiling --------------------------------------------------------------------------------------------------

def cubin_usage(cubin: bytes, name: str) -> dict:
    """Registers and stack frame (bytes a thread) of kernel `name` in a cubin (cuobjdump -res-usage)."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    match = re.search(rf"Function {re.escape(name)}:\s*REG:(\d+) STACK:(\d+)", out)
    if match is None:
        raise RuntimeError(f"no resource usage for {name} in cuobjdump's output:\n{out}")
    return dict(registers=int(match[1]), stack=int(match[2]))


def compile_for_sm90(c: Compile) -> dict:
    """Compile c as the launch would and measure it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(_jit_function(c.kernel), c.signature, c.constexprs, c.attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(c.options))
    usage = cubin_usage(compiled.asm["cubin"], compiled.metadata.name)
    # Triton's kernels use dynamic shared memory only: metadata.shared is what the launch asks for.
    shared, warps = compiled.metadata.shared, compiled.metadata.num_warps
    blocks = blocks_per_sm(usage["registers"], shared, warps)
    return dict(registers=usage["registers"], spill_bytes=usage["stack"], shared_bytes=shared, warps=warps,
                blocks_per_sm=blocks, warps_per_sm=blocks * warps)


def _measured_or_error(c: Compile) -> dict:
    try:
        return compile_for_sm90(c)
    except Exception as e:  # noqa: BLE001  (a kernel that does not compile is a row of the report, not its end)
        return dict(registers=0, spill_bytes=0, shared_bytes=0, warps=0, blocks_per_sm=0, warps_per_sm=0,
                    error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")


def compile_all(compiles: list[Compile], jobs: int, done: Callable[[Compile, dict], None]) -> dict[str, dict]:
    """Measurements by Compile.key(); `jobs` processes compile side by side (a compile holds the GIL)."""
    results = {}
    if jobs <= 1:
        for c in compiles:
            results[c.key()] = _measured_or_error(c)
            done(c, results[c.key()])
        return results
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_measured_or_error, c): c for c in compiles}
        for future in concurrent.futures.as_completed(futures):
            c = futures[future]
            results[c.key()] = future.result()
            done(c, results[c.key()])
    return results


def _worst(measurements: list[dict]) -> dict:
    return max(measurements, key=lambda m: ("error" in m, m["spill_bytes"], m["shared_bytes"], m["registers"]))


def table_rows(case_compiles: list[tuple[Case, list[Compile]]], results: dict[str, dict]) -> list[dict]:
    """A row per case, kernel and config: its worst specialization."""
    rows = []
    for case, compiles in case_compiles:
        by_config: dict[tuple, list] = {}
        for c in compiles:
            by_config.setdefault((c.name, c.config()), []).append(results[c.key()])
        for (kernel, config), measured in by_config.items():
            rows.append(dict(op=case.op, kernel=kernel, dtype=case.dtype, size=case.size, flags=case.flags,
                             config=config, specializations=len(measured), **_worst(measured)))
    return rows


def problems(rows: list[dict]) -> list[str]:
    """What breaks the bar: a row that spills or does not fit a block's shared memory, and a kernel (in a case)
    with no row that fits."""
    found, fits = [], {}
    for r in rows:
        where = f"{r['kernel']} {r['dtype']} {r['size']} [{r['flags']}] {r['config']}"
        if "error" in r:
            found.append(f"{where}: does not compile: {r['error']}")
        if r["spill_bytes"]:
            found.append(f"{where}: spills {r['spill_bytes']} bytes a thread")
        if r["shared_bytes"] > SM90_SHARED_PER_BLOCK:
            found.append(f"{where}: {r['shared_bytes']} bytes of shared memory, over {SM90_SHARED_PER_BLOCK}")
        group = f"{r['kernel']} {r['dtype']} {r['size']} [{r['flags']}]"
        fits[group] = fits.get(group, False) or blocks_ok(r)
    return found + [f"{group}: no config fits" for group, ok in fits.items() if not ok]


def blocks_ok(row: dict) -> bool:
    return "error" not in row and row["spill_bytes"] == 0 and row["shared_bytes"] <= SM90_SHARED_PER_BLOCK


# --- the CUDA kernels -------------------------------------------------------------------------------------------

def _nvidia_include_dirs() -> list[str]:
    """Header dirs of the nvidia-* wheels beside torch (cuSPARSE, cuBLAS, ...), which ATen's CUDA headers include
    and a bare toolkit may lack: the dirs setup.py adds for the same reason."""
    roots = sorted({os.path.join(base, "nvidia") for base in
                    (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages())})
    dirs: list[str] = []
    for root in roots:
        for pattern in ("cu13/include", "cu12/include", "*/include"):
            dirs += [d for d in sorted(glob.glob(os.path.join(root, pattern))) if d not in dirs]
    return dirs


def cuda_rows() -> list[dict]:
    """Every kernel instantiation in csrc/cuda/*.cu, from ptxas -v of an sm_90 compile with setup.py's flags."""
    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    includes = [f"-I{d}" for d in (*cpp_extension.include_paths("cuda"), *_nvidia_include_dirs())]
    flags = ["-O3", "-lineinfo", "-DFASTENC_WITH_CUDA", "-std=c++20", *cpp_extension.COMMON_NVCC_FLAGS]
    rows = []
    for source in sorted((REPO_ROOT / "csrc" / "cuda").glob("*.cu")):
        with tempfile.TemporaryDirectory() as tmp:
            run = subprocess.run([nvcc, "-arch=sm_90", "-Xptxas", "-v", "-c", str(source), "-o",
                                  os.path.join(tmp, "k.o"), *includes, *flags], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source.name}:\n{run.stderr[-4000:]}")
        rows += _ptxas_rows(run.stderr, source.name)
    return rows


def _ptxas_rows(log: str, source: str) -> list[dict]:
    names = re.findall(r"Compiling entry function '(\S+)' for 'sm_90'", log)
    demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    rows = []
    for mangled, name in zip(names, demangled):
        block = log.split(f"Function properties for {mangled}\n", 1)[1]
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
        used = re.search(r"Used (\d+) registers[^\n]*?(?:, (\d+) bytes smem)?\n", block)
        registers = int(used[1])
        per_warp = -(-32 * registers // REGISTER_GRANULE) * REGISTER_GRANULE
        rows.append(dict(source=source, kernel=_short_name(name), registers=registers, stack_bytes=int(frame[1]),
                         spill_stores=int(frame[2]), spill_loads=int(frame[3]), shared_bytes=int(used[2] or 0),
                         warps_per_sm_by_registers=min(SM90_THREADS // 32, SM90_REGISTERS // per_warp)))
    return rows


def _short_name(name: str) -> str:
    """`void fastenc::(anonymous namespace)::f<c10::Half, float, 8>(...)` -> `f<c10::Half, float, 8>`."""
    name = name.removeprefix("void ").replace("(anonymous namespace)::", "").replace("fastenc::", "")
    return name.split("(", 1)[0]


def _nvcc_version() -> str:
    nvcc = shutil.which("nvcc")
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout if nvcc else ""
    match = re.search(r"release (\S+),", out)
    return match[1] if match else ""


# --- the report -------------------------------------------------------------------------------------------------

def _environment() -> dict:
    import torch
    import triton

    from bench.runner import _git_commit

    commit, dirty = _git_commit()
    return dict(triton=triton.__version__, torch=torch.__version__, commit=commit, commit_dirty=dirty,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                target="sm_90 (triton GPUTarget('cuda', 90, 32))")


HEADER = """# sm_90 resources of every kernel config

Written by `python -m bench --resources` (bench/resources.py, which says how): every Triton kernel the launchers
start for the cases below, compiled for sm_90 without a GPU as a launch would compile it, with every config its
autotuner may choose (after its prune) or its launcher picks, at its worst argument specialization; and the CUDA
kernels of csrc/cuda from `nvcc -arch=sm_90 -Xptxas -v`. Registers are per thread; spill is the stack frame in
bytes a thread (spilled registers; triton's n_spills is it in 4-byte words); shared is the dynamic shared memory a
block asks for. Blocks/SM is the occupancy these allow on an H100, the least of 2048 threads / (32 x warps), 32
blocks, 65536 registers / (warps x 32 x registers, rounded up to 256 a warp) and 228 KB / (shared + 1 KB the
system reserves a block); warps/SM = blocks/SM x warps (64 at most). The bar (`--check`, tests/test_resources.py):
nothing the autotuner may choose spills or asks for more than 227 KB of shared memory, the most a block may have.
"""


def render_markdown(documents: list[dict]) -> str:
    lines = [HEADER.rstrip()]
    for doc in documents:
        env, rows = doc["env"], doc["rows"]
        dirty = " with local changes" if env.get("commit_dirty") else ""
        lines += ["", f"## triton {env['triton']}", "",
                  f"torch {env['torch']}, commit {env['commit']}{dirty}, {env['date']}, scope {doc['scope']}: "
                  f"{len(rows)} kernel configs, {sum(r['spill_bytes'] > 0 for r in rows)} spill, "
                  f"{sum(r['shared_bytes'] > SM90_SHARED_PER_BLOCK for r in rows)} over the shared memory limit.", ""]
        if doc["problems"]:
            lines += ["What breaks the bar:", ""] + [f"- {p}" for p in doc["problems"]] + [""]
        lines += ["| op | kernel | dtype | size | flags | config | registers | spill B | shared B | warps | blocks/SM "
                  "| warps/SM |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['op']} | {r['kernel']} | {r['dtype']} | {r['size']} | {r['flags']} | {r['config']} | "
                  f"{r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | {r['warps']} | "
                  f"{r['blocks_per_sm']} | {r['warps_per_sm']} |" for r in rows]
    with_cuda = [doc for doc in documents if doc.get("cuda")]
    if with_cuda:  # the same whatever the triton version: the latest report's
        doc = max(with_cuda, key=lambda d: d["env"]["date"])
        lines += ["", "## CUDA kernels", "",
                  f"nvcc {doc['env'].get('nvcc', '')}, commit {doc['env']['commit']}, {doc['env']['date']}. Shared "
                  "is static (the launches ask for no dynamic shared memory); warps/SM is what the registers allow.",
                  "", "| source | kernel | registers | stack B | spill stores B | spill loads B | shared B "
                  "| warps/SM by registers |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['source']} | `{c['kernel']}` | {c['registers']} | {c['stack_bytes']} | "
                  f"{c['spill_stores']} | {c['spill_loads']} | {c['shared_bytes']} | "
                  f"{c['warps_per_sm_by_registers']} |" for c in doc["cuda"]]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.resources", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scope", choices=("full", "check"), default="full",
                   help="full: the report's cases; check: the part the targets name (what the test runs)")
    p.add_argument("--op", action="append", help=f"op(s), a comma list of {', '.join(OPS)}; default: all")
    p.add_argument("--check", action="store_true", help="list what breaks the bar and exit 1 if anything does")
    p.add_argument("--no-write", action="store_true", help="write no files")
    p.add_argument("--no-cuda", action="store_true", help="leave the CUDA kernels out")
    p.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    p.add_argument("--quiet", action="store_true", help="no line per compile")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench.resources: unset TRITON_INTERPRET (the interpreter's kernels have one config, not the GPU's)",
              file=sys.stderr)
        return 2
    import triton

    ops = [o.strip() for value in args.op or [] for o in value.split(",") if o.strip()] or list(OPS)
    case_compiles = [(case, compiles_of(case.call)) for case in cases(args.scope, ops)]
    unique = {c.key(): c for _, compiles in case_compiles for c in compiles}

    def done(c: Compile, m: dict) -> None:
        if not args.quiet:
            print(f"{c.name} {c.config()}: " + (m["error"] if "error" in m else f"{m['registers']} registers, spill "
                  f"{m['spill_bytes']}, shared {m['shared_bytes']}"), flush=True)

    results = compile_all(list(unique.values()), args.jobs, done)
    rows = table_rows(case_compiles, results)
    bad = problems(rows)
    doc = dict(schema=SCHEMA, env=_environment(), scope=args.scope, rows=rows, problems=bad)
    if not args.no_cuda and args.scope == "full" and ops == list(OPS):
        doc["env"]["nvcc"] = _nvcc_version()
        doc["cuda"] = cuda_rows()
    if not args.no_write:
        path = RESULTS_DIR / f"sm90-resources-triton-{triton.__version__}.json"
        path.write_text(json.dumps(doc, indent=1) + "\n")
        documents = [json.loads(p.read_text()) for p in sorted(RESULTS_DIR.glob("sm90-resources-triton-*.json"))]
        (RESULTS_DIR / "sm90-resources.md").write_text(render_markdown(documents))
        print(f"results: {path}, {RESULTS_DIR / 'sm90-resources.md'}")
    print(f"triton {triton.__version__}: {len(unique)} compiles, {len(rows)} kernel configs, {len(bad)} problems"
          + "".join(f"\n  {p}" for p in bad))
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
