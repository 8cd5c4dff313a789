"""pytest-benchmark over the cases of bench/cases.py: `pytest bench/ --benchmark-only`.

Each (case, provider) pair is one test, built by the same runner code as `python -m bench` (same inputs, same
providers, same fwd / fwd+bwd calls); only the timing differs (pytest-benchmark's rounds, with a CUDA synchronize
after each call on GPU). The error check and the device limits are `python -m bench`'s.

Options: --bench-quick (the tiny CI cases), --bench-op NAME, --bench-dtype DTYPE (repeatable or comma lists).
Without --benchmark-only (e.g. a plain `pytest` collecting the whole repository) only the quick cases run, so
collecting bench/ never costs minutes.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("fastenc bench")
    group.addoption("--bench-quick", action="store_true", default=False, help="run the quick (CI) cases only")
    group.addoption("--bench-op", action="append", default=None, help="op(s) to benchmark")
    group.addoption("--bench-dtype", action="append", default=None, help="dtype(s) to benchmark")


def _comma_list(values):
    return [v.strip() for value in values or () for v in value.split(",") if v.strip()] or None


def pytest_generate_tests(metafunc):
    if "bench_pair" not in metafunc.fixturenames:
        return
    from bench import cases, runner

    config = metafunc.config
    quick = config.getoption("--bench-quick", default=False) or not config.getoption("--benchmark-only",
                                                                                     default=False)
    device = runner.pick_device()
    dtypes = [cases.parse_dtype(d) for d in _comma_list(config.getoption("--bench-dtype", default=None)) or []]
    params = []
    for case in cases.cases_for(device.type, quick=quick, ops=_comma_list(config.getoption("--bench-op",
                                                                                            default=None)),
                                dtypes=dtypes or None):
        providers, unavailable = runner.providers_for(device.type, compile=not quick, op=case.op)
        for provider in providers:
            params.append(pytest.param((case, provider), id=f"{case.id}-{provider.name}"))
        for name, reason in unavailable.items():
            params.append(pytest.param((case, None), id=f"{case.id}-{name}",
                                       marks=pytest.mark.skip(reason=f"{name}: {reason}")))
    metafunc.parametrize("bench_pair", params)
