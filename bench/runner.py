"""Runs the cases: builds each provider's call, checks it against the float64 oracle once, times it, makes rows.

Providers of a case, all on the same inputs, one after the other in one process:
  fastenc.auto                                          fastenc's functional call as a user runs it (the default
                                                        backend choice: fastenc's kernel, else torch's op)
  fastenc.triton / fastenc.native / fastenc.reference  the same under `fastenc.backend(name)`
                                                        (CUDA: all three; CPU: native and reference)
  torch, torch.compile                                  the op's plain torch version, eager and compiled
  <extra peers of the op>                               e.g. SDPA backends, cuDNN LSTM
"Speedup vs reference" divides by fastenc.reference's median; "vs best peer" by the fastest torch peer's.

The oracle is fastenc's reference backend on float64 copies of the inputs. The error rule (the one tests/ use):
an output may be at most twice as far from the oracle as torch eager's, plus a floor of about one rounding step of
the dtype times max(1, largest oracle magnitude). `err_ratio` is the worst error over that bound (≤ 1 passes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch import Tensor

from bench import cases as cases_mod
from bench.cases import FWD, Case, dtype_name
from bench.limits import measure_limits
from bench.timing import Timing, TimingBudget, time_callable

REFERENCE = "fastenc.reference"
PEERS_BASE = ("torch", "torch.compile")
FASTENC_BACKENDS = {"cuda": ("auto", "triton", "native", "reference"), "cpu": ("auto", "native", "reference")}
ERROR_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
REPO_ROOT = Path(__file__).resolve().parent.parent


# --- providers -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Provider:
    """One way of computing a case: `build(case)` returns the function of the inputs (compiled per case)."""

    name: str
    kind: str  # "fastenc" or "peer"
    build: Callable[[Case], Callable[[dict], Tensor]]
    context: Callable[[], ContextManager] = contextlib.nullcontext


def _fastenc_provider(backend: str) -> Provider:
    import fastenc

    return Provider(f"fastenc.{backend}", "fastenc", lambda case: case.op.fastenc_fn,
                    context=lambda: fastenc.backend(backend))


def _compiled(case: Case) -> Callable[[dict], Tensor]:
    # A fresh compilation per case: dynamo's per-function cache would otherwise fill up across shapes.
    torch._dynamo.reset()
    return torch.compile(case.op.torch_fn, dynamic=False)


def providers_for(device_type: str, *, compile: bool = True, op: cases_mod.OpBench | None = None
                  ) -> tuple[list[Provider], dict[str, str]]:
    """The providers that can run here, and {provider: why not} for the ones that cannot."""
    import fastenc

    available = set(fastenc.available_backends())
    providers, skipped = [], {}
    for name in FASTENC_BACKENDS.get(device_type, ("reference",)):
        if name == "auto" or name in available:
            providers.append(_fastenc_provider(name))
        else:
            reason = None
            with contextlib.suppress(Exception):
                reason = fastenc.backends.unavailable_reason(name)
            skipped[f"fastenc.{name}"] = reason or f"backend {name!r} is not available"
    providers.append(Provider("torch", "peer", lambda case: case.op.torch_fn))
    if not compile:
        skipped["torch.compile"] = "skipped (quick mode or --no-compile)"
    elif op is not None and not op.compiled_peer:
        skipped["torch.compile"] = f"skipped (not a peer of {op.name})"
    else:
        providers.append(Provider("torch.compile", "peer", _compiled))
    for name, fn in (op.extra_peers if op else {}).items():
        providers.append(Provider(name, "peer", lambda case, fn=fn: fn))
    return providers, skipped


# --- one case --------------------------------------------------------------------------------------------------

def _with_grad(inputs: dict, names: tuple[str, ...], dtype: torch.dtype | None = None) -> dict:
    out = {}
    for key, t in inputs.items():
        t = t.detach() if dtype is None else t.detach().to(dtype)
        out[key] = t.requires_grad_(key in names)
    return out


class PreparedCase:
    """A case's inputs (one seeded draw, shared by every provider), its upstream gradient and its oracle."""

    def __init__(self, case: Case, device: torch.device, seed: int = 0, with_oracle: bool = True):
        self.case, self.device = case, device
        gen = torch.Generator().manual_seed(seed)
        raw = case.op.make_inputs(case.params, case.dtype, device, gen)
        training = case.mode != FWD
        self.grad_names = case.op.grad_inputs if training else ()
        self.inputs = _with_grad(raw, self.grad_names)
        self.dy: Tensor | None = None
        if training:
            with torch.no_grad():
                shape_probe = case.op.torch_fn(raw)
            self.dy = torch.randn(shape_probe.shape, generator=gen, dtype=torch.float32).to(device, case.dtype)
            del shape_probe
        self.oracle = self._oracle(raw) if with_oracle else []

    def call_for(self, fn: Callable[[dict], Tensor]) -> Callable[[], Any]:
        """The timed call: the forward (grad disabled by the caller) or the forward and the gradients."""
        inputs = self.inputs
        if self.dy is None:
            return lambda: fn(inputs)
        wrt = [inputs[name] for name in self.grad_names]
        dy = self.dy
        return lambda: (lambda y: (y, *torch.autograd.grad(y, wrt, dy)))(fn(inputs))

    def grad_mode(self) -> ContextManager:
        return torch.no_grad() if self.dy is None else torch.enable_grad()

    def _oracle(self, raw: dict) -> list[Tensor]:
        import fastenc

        oracle_dtype = torch.float64
        inputs = _with_grad(raw, self.grad_names, oracle_dtype)
        with fastenc.backend("reference"), self.grad_mode():
            y = self.case.op.fastenc_fn(inputs)
            if self.dy is None:
                return [y.detach()]
            wrt = [inputs[name] for name in self.grad_names]
            grads = torch.autograd.grad(y, wrt, self.dy.to(oracle_dtype))
            return [y.detach(), *grads]


def output_errors(outputs: Any, oracle: list[Tensor]) -> list[tuple[float, float]]:
    """[(max |output - oracle|, max(1, max |oracle|)) per output]; NaN where shapes disagree or values are NaN."""
    outs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    result = []
    for out, ref in zip(outs, oracle):
        if out is None or tuple(out.shape) != tuple(ref.shape):
            result.append((math.nan, 1.0))
            continue
        if ref.numel() == 0:
            result.append((0.0, 1.0))
            continue
        diff = (out.detach().to(torch.float64) - ref).abs().max().item()
        result.append((diff, max(1.0, ref.abs().max().item())))
    if len(outs) != len(oracle):
        result.append((math.nan, 1.0))
    return result


def error_ratio(errors: list[tuple[float, float]], torch_errors: list[tuple[float, float]] | None,
                dtype: torch.dtype) -> float:
    """The worst output's error over its bound (2 × torch eager's error + floor × scale); > 1 or NaN fails."""
    floor = ERROR_FLOOR.get(dtype, 1e-5)
    worst = 0.0
    for i, (err, scale) in enumerate(errors):
        torch_err = torch_errors[i][0] if torch_errors and i < len(torch_errors) else 0.0
        if math.isnan(torch_err):
            torch_err = 0.0
        bound = 2 * torch_err + floor * scale
        ratio = err / bound
        if math.isnan(ratio):
            return math.nan
        worst = max(worst, ratio)
    return worst


@dataclasses.dataclass
class Measurement:
    provider: Provider
    timing: Timing | None
    errors: list[tuple[float, float]]
    failure: str | None = None  # why the provider could not run this case
    call: Callable[[], Any] | None = None


def _failure(e: Exception) -> str:
    first_line = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first_line}"


def check_provider(prepared: PreparedCase, provider: Provider) -> Measurement:
    """Build the provider's call for the case (compiling, if it does) and check its first result (untimed)."""
    try:
        with provider.context(), prepared.grad_mode():
            call = prepared.call_for(provider.build(prepared.case))
            errors = output_errors(call(), prepared.oracle)
    except Exception as e:  # a provider that cannot run a case is reported, not fatal to the run
        return Measurement(provider, None, [], failure=_failure(e))
    return Measurement(provider, None, errors, call=call)


def time_provider(prepared: PreparedCase, m: Measurement, threads: int, budget: TimingBudget) -> None:
    """Time a checked provider once more, pooling with its earlier rounds."""
    if m.failure is not None:
        return
    try:
        with m.provider.context(), prepared.grad_mode():
            timing = time_callable(m.call, prepared.device.type, threads, budget)
    except Exception as e:
        m.failure, m.timing = _failure(e), None
        return
    m.timing = timing if m.timing is None else Timing.pooled([m.timing, timing])


def measure_provider(prepared: PreparedCase, provider: Provider, threads: int, budget: TimingBudget) -> Measurement:
    """Check, then time one provider on the prepared case (one round)."""
    m = check_provider(prepared, provider)
    time_provider(prepared, m, threads, budget)
    return m


# --- rows ------------------------------------------------------------------------------------------------------

def _git_commit() -> tuple[str, bool | None]:
    """(short commit, whether the tree differs from it); FASTENC_COMMIT names the commit where the tree came
    without its git history (a copy sent to a GPU machine)."""
    if os.environ.get("FASTENC_COMMIT"):
        return os.environ["FASTENC_COMMIT"][:7], None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True,
                                    text=True, timeout=10).stdout.strip())
        return commit or "unknown", dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def environment(device: torch.device, threads: int, quick: bool) -> dict:
    import fastenc

    try:
        info = fastenc.info(file=None)
    except TypeError:  # an info() that only prints by default
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            info = fastenc.info()
    commit, dirty = _git_commit()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else info.get("device") or "cpu"
    return {
        "device": name,
        "device_type": device.type,
        "cpu_model": _cpu_model(),
        "fastenc": info.get("fastenc"),
        "torch": info.get("torch", torch.__version__),
        "triton": info.get("triton"),
        "cuda": info.get("cuda"),
        "python": platform.python_version(),
        "commit": commit,
        "commit_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "threads": threads,
        "quick": quick,
        "available_backends": list(fastenc.available_backends()),
        # Other work on the machine at the start (1-minute load average): CPU timings are only as quiet as it.
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


ROW_ENV_KEYS = ("device", "torch", "triton", "cuda", "fastenc", "commit", "date", "threads")


def rows_for_case(case: Case, measurements: list[Measurement], env: dict, limits: dict) -> tuple[list[dict], list[dict]]:
    """Rows (one per provider that ran) and skip records (one per provider that failed) for one case."""
    work = case.work()
    ok = [m for m in measurements if m.failure is None]
    medians = {m.provider.name: m.timing.median_ms for m in ok if m.timing}
    torch_errors = next((m.errors for m in ok if m.provider.name == "torch"), None)
    peer_best = min((medians[m.provider.name] for m in ok if m.provider.kind == "peer"
                     and m.provider.name in medians), default=None)
    rows, skipped = [], []
    for m in measurements:
        base = {"op": case.op.name, "shape": case.shape, "dtype": dtype_name(case.dtype), "mode": case.mode,
                "provider": m.provider.name}
        if m.failure is not None:
            skipped.append({**base, "reason": m.failure})
            continue
        med = m.timing.median_ms
        seconds = med * 1e-3
        gbps = work.bytes / seconds / 1e9 if work.bytes else None
        tflops = work.flops / seconds / 1e12 if work.flops else None
        if case.op.bound == "compute":
            pct = 100 * tflops / limits["gemm_tflops"] if tflops and limits.get("gemm_tflops") else None
        else:
            pct = 100 * gbps / limits["copy_gbps"] if gbps and limits.get("copy_gbps") else None
        ratio = error_ratio(m.errors, torch_errors, case.dtype)
        max_err = max((e for e, _ in m.errors), default=math.nan)
        rows.append({
            **base,
            "params": dict(case.params),
            "median_ms": med,
            "p20_ms": m.timing.p20_ms,
            "p80_ms": m.timing.p80_ms,
            "samples": m.timing.samples,
            "bytes": work.bytes,
            "flops": work.flops,
            "gbps": gbps,
            "tflops": tflops,
            "bound": case.op.bound,
            "pct_of_limit": pct,
            "speedup_vs_reference": medians[REFERENCE] / med if REFERENCE in medians else None,
            "speedup_vs_best_peer": peer_best / med if peer_best is not None else None,
            "max_abs_err": None if math.isnan(max_err) else max_err,
            "err_ratio": None if math.isnan(ratio) else ratio,
            "err_ok": bool(ratio <= 1.0),
            **{key: env.get(key) for key in ROW_ENV_KEYS},
        })
    return rows, skipped


# --- the whole run ---------------------------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, one line per step otherwise)."""

    def __init__(self, total: int, stream=sys.stderr, width: int = 24):
        self.total, self.done, self.stream, self.width = max(total, 1), 0, stream, width
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        line = f"[{bar}] {self.done:>3}/{self.total} {label}"
        if self.tty:
            self.stream.write("\r\033[K" + line[:160])
            if self.done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def pick_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run(*, ops: list[str] | None = None, dtypes: list[torch.dtype] | None = None, quick: bool = False,
        headline: bool = False, compile: bool | None = None, device: torch.device | None = None,
        threads: int | None = None, rounds: int | None = None, budget_s: float | None = None,
        progress: bool = True) -> dict:
    """Measure the device limits, then every case with every provider; return the results document.

    Providers of a case are timed in `rounds` interleaved rounds (each with 1/rounds of the timing budget) and
    their measurements pooled, so that a drift in the machine's load falls on all of them alike. With `budget_s`,
    no case starts after that many seconds: the cases left are listed as skipped, so a short GPU lease still
    ends with a results file.
    """
    started = time.monotonic()
    device = device or pick_device()
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    budget = TimingBudget.quick() if quick else TimingBudget()
    compile = (not quick) if compile is None else compile
    rounds = rounds or (1 if quick else 3)
    selected = cases_mod.cases_for(device.type, quick=quick, headline=headline, ops=ops, dtypes=dtypes)
    plans = []
    for case in selected:
        providers, unavailable = providers_for(device.type, compile=compile, op=case.op)
        plans.append((case, providers, unavailable))
    bar = Progress(2 + sum(len(p) * (1 + rounds) for _, p, _ in plans),
                   stream=sys.stderr if progress else open(os.devnull, "w"))

    env = environment(device, threads, quick)
    env["rounds"] = rounds
    env["budget_s"] = budget_s
    bar.step("device limits: copy + GEMM")
    limits = measure_limits(device, quick, threads, budget)
    bar.step(f"limits: {limits['copy_gbps']:.1f} GB/s copy, {limits['gemm_tflops']:.2f} TFLOP/s GEMM")

    rows, skipped = [], []
    for case, providers, unavailable in plans:
        if budget_s is not None and time.monotonic() - started > budget_s:
            unavailable = {**unavailable, **{p.name: f"not run: the run's time budget ({budget_s:g} s) was spent"
                                             for p in providers}}
            providers = []
        prepared = None
        if providers:
            try:
                prepared = PreparedCase(case, device)
            except Exception as e:  # inputs this machine cannot make (a peer's package missing): reported, not fatal
                unavailable = {**unavailable, **{p.name: f"not run: its inputs failed: {_failure(e)}"
                                                 for p in providers}}
                providers = []
        measurements = []
        for provider in providers:
            measurements.append(check_provider(prepared, provider))
            bar.step(f"{case.id} {provider.name}: build + check")
        for r in range(rounds):
            for m in measurements:
                time_provider(prepared, m, threads, budget.split(rounds))
                bar.step(f"{case.id} {m.provider.name}: round {r + 1}/{rounds}")
        case_rows, case_skipped = rows_for_case(case, measurements, env, limits)
        rows += case_rows
        skipped += case_skipped
        for name, reason in unavailable.items():
            skipped.append({"op": case.op.name, "shape": case.shape, "dtype": dtype_name(case.dtype),
                            "mode": case.mode, "provider": name, "reason": reason})
        del prepared, measurements
        if device.type == "cuda":
            torch.cuda.empty_cache()
    from bench.report import SCHEMA

    return {"schema": SCHEMA, "env": env, "limits": limits, "rows": rows, "skipped": skipped}
