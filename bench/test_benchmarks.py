"""The cases of bench/cases.py as pytest-benchmark tests (parametrised in bench/conftest.py)."""

from __future__ import annotations

import torch

from bench import runner


def test_benchmark(benchmark, bench_pair):
    case, provider = bench_pair
    device = runner.pick_device()
    prepared = runner.PreparedCase(case, device, with_oracle=False)
    with provider.context(), prepared.grad_mode():
        call = prepared.call_for(provider.build(case))
        if device.type == "cuda":
            inner = call

            def call():
                inner()
                torch.cuda.synchronize()
        call()  # compile / warm up outside the measurement
        benchmark(call)
    work = case.work()
    benchmark.extra_info.update({"op": case.op.name, "shape": case.shape, "dtype": str(case.dtype),
                                 "mode": case.mode, "provider": provider.name, "bytes": work.bytes,
                                 "flops": work.flops, "threads": torch.get_num_threads()})
    median = benchmark.stats.stats.median if benchmark.stats else None
    if median and work.bytes:
        benchmark.extra_info["gbps"] = work.bytes / median / 1e9
    if median and work.flops:
        benchmark.extra_info["tflops"] = work.flops / median / 1e12
