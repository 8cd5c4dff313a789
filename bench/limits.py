"""The device's own limits, measured in the run that reports against them.

Memory: a large copy (dst.copy_(src)); the rate counts bytes read plus bytes written.
Compute: a square matrix product through torch, 2·n³ FLOPs over its time: bf16 8192³ on CUDA, float32 on CPU
at a size that takes a fraction of a second on a small machine.
"""

from __future__ import annotations

import dataclasses

import torch

from bench.timing import TimingBudget, time_callable

MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class LimitPlan:
    copy_bytes: int  # size of the copied buffer (the rate counts twice this: read + write)
    gemm_n: int
    gemm_dtype: torch.dtype


def plan_for(device_type: str, quick: bool) -> LimitPlan:
    if device_type == "cuda":
        # The copy stays ≥ 1 GiB even in quick mode: it is what the % column is measured against.
        return LimitPlan(copy_bytes=1024 * MIB, gemm_n=8192, gemm_dtype=torch.bfloat16)
    if quick:
        return LimitPlan(copy_bytes=32 * MIB, gemm_n=512, gemm_dtype=torch.float32)
    return LimitPlan(copy_bytes=256 * MIB, gemm_n=2048, gemm_dtype=torch.float32)


def measure_copy_gbps(device: torch.device, nbytes: int, threads: int, budget: TimingBudget) -> float:
    src = torch.randint(-128, 127, (nbytes,), dtype=torch.int8, device=device)
    dst = torch.empty_like(src)
    timing = time_callable(lambda: dst.copy_(src), device.type, threads, budget)
    return 2 * nbytes / (timing.median_ms * 1e-3) / 1e9


def measure_gemm_tflops(device: torch.device, n: int, dtype: torch.dtype, threads: int, budget: TimingBudget) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing = time_callable(lambda: torch.mm(a, b), device.type, threads, budget)
    return 2 * n**3 / (timing.median_ms * 1e-3) / 1e12


def measure_limits(device: torch.device, quick: bool, threads: int, budget: TimingBudget) -> dict:
    """{copy_gbps, copy_bytes, gemm_tflops, gemm_n, gemm_dtype}: the 100 % marks of this run."""
    plan = plan_for(device.type, quick)
    copy = measure_copy_gbps(device, plan.copy_bytes, threads, budget)
    gemm = measure_gemm_tflops(device, plan.gemm_n, plan.gemm_dtype, threads, budget)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "copy_gbps": copy,
        "copy_bytes": plan.copy_bytes,
        "gemm_tflops": gemm,
        "gemm_n": plan.gemm_n,
        "gemm_dtype": str(plan.gemm_dtype).removeprefix("torch."),
    }
