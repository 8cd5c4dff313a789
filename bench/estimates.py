"""What the GPU cases should take on an H200, from the bench's own work counts, written down before a GPU runs them.

  floor     max(FLOPs / matrix rate, bytes / copy rate): no implementation is faster.
  expected  floor / the efficiency a good kernel of the op's kind reaches on Hopper; for the LSTM's recurrence,
            at least one dependent step's latency per time step, since step t + 1 needs step t's hidden state.
A first GPU run is judged against `expected` on the spot (`python -m bench.estimates RESULTS.json`): a fastenc time
outside 0.5x-2x of it is a finding to explain (a bug, a missed fast path, or a wrong estimate), not a figure to
report as it is. `python -m bench --estimate [--headline]` prints the table for the CUDA cases.
"""

from __future__ import annotations

import sys

from bench import cases as cases_mod
from bench.cases import FWD, Case

# Ceilings seen on one H200 of the machines lent here: a device-to-device copy (bytes read + written) and a bf16
# 8192^3 matrix product on random data. A GPU run measures its own (results["limits"]) and is judged with those.
H200_LIMITS = {"copy_gbps": 4300.0, "gemm_tflops": 790.0}

# Fraction of the ceiling that a good kernel of each op reaches, (forward, forward + backward). Leads, not
# measurements: flash attention on Hopper without warp-specialised wgmma pipelines runs at about 35-45% of the
# dense matrix rate forward and 25-35% backward (the backward recomputes P and has five products on four
# outputs); an encoder is mostly large GEMMs (cuBLAS near 70-80%) with attention and the epilogues between them;
# the LSTM's products are small and sequential; LayerNorm and bias + activation are streaming passes that reach
# 80-90% of the copy rate.
EFFICIENCY = {"attention": (0.40, 0.30), "attention_varlen": (0.40, 0.30), "encoder": (0.60, 0.50),
              "lstm": (0.50, 0.40), "layer_norm": (0.80, 0.75), "bias_activation": (0.85, 0.80)}
# The shortest time one dependent recurrence step can take: a grid-wide barrier plus reading the previous hidden
# state, a few microseconds on current GPUs (a lead); the backward recurrence runs the same number of steps again.
STEP_LATENCY_S = 4e-6


def estimate(case: Case, limits: dict = H200_LIMITS) -> tuple[float, float]:
    """(floor, expected) seconds of one case on a device with these limits."""
    work = case.work()
    floor = max((work.flops or 0) / (limits["gemm_tflops"] * 1e12), (work.bytes or 0) / (limits["copy_gbps"] * 1e9))
    efficiency = EFFICIENCY[case.op.name][0 if case.mode == FWD else 1]
    expected = floor / efficiency
    if case.op.name == "lstm":
        steps = case.params["T"] * (1 if case.mode == FWD else 2)
        expected = max(expected, steps * STEP_LATENCY_S)
    return floor, expected


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f}"


def _work(case: Case) -> str:
    work = case.work()
    return f"{work.flops / 1e9:,.1f} GFLOP" if work.flops else f"{work.bytes / 1e9:,.3f} GB"


def estimate_lines(selected: list[Case], limits: dict = H200_LIMITS) -> list[str]:
    """A markdown table of every case's work, floor and expected time."""
    lines = [f"Against {limits['gemm_tflops']:g} TFLOP/s (bf16 matrix) and {limits['copy_gbps']:g} GB/s (copy):", "",
             "| case | work | floor (us) | expected (us) |", "|---|---|---|---|"]
    for case in selected:
        floor, expected = estimate(case, limits)
        lines.append(f"| {case.id} | {_work(case)} | {_us(floor)} | {_us(expected)} |")
    return lines


def judge_lines(results: dict, provider: str = "fastenc.auto") -> list[str]:
    """Each of `provider`'s GPU rows against its expected time under the run's own limits; out-of-range ones marked."""
    limits = results["limits"]
    lines = [f"{provider} against the estimate (expected from the run's limits: {limits['copy_gbps']:.0f} GB/s, "
             f"{limits['gemm_tflops']:.0f} TFLOP/s):"]
    for row in results["rows"]:
        if row["provider"] != provider or row["op"] not in cases_mod.REGISTRY:
            continue
        case = Case(cases_mod.REGISTRY[row["op"]], row["params"], cases_mod.parse_dtype(row["dtype"]), row["mode"])
        _, expected = estimate(case, limits)
        ratio = row["median_ms"] * 1e-3 / expected
        flag = "" if 0.5 <= ratio <= 2 else "   <- outside 0.5x-2x: explain it"
        lines.append(f"  {case.id}: {row['median_ms'] * 1e3:,.0f} us, expected {_us(expected)} us "
                     f"({ratio:.2f}x){flag}")
    return lines


if __name__ == "__main__":
    from bench.report import load_results

    for path in sys.argv[1:]:
        print("\n".join(judge_lines(load_results(path))))
