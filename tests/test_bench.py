"""The benchmark harness itself (bench/): a quick run writes a schema-valid file, --compare catches a planted
slowdown, and the error column catches a planted wrong kernel. CPU only, a few seconds each."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import cases, report, runner
from bench.__main__ import main as bench_main
from bench.timing import TimingBudget

REPO = Path(__file__).resolve().parent.parent


def test_quick_run_writes_valid_results_and_plot(tmp_path):
    out = tmp_path / "quick.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--op", "layer_norm", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    report.validate_results(results)
    providers = {r["provider"] for r in results["rows"]}
    assert {"fastenc.reference", "torch"} <= providers
    assert {r["mode"] for r in results["rows"]} == {"fwd", "fwd+bwd"}
    assert all(r["err_ok"] for r in results["rows"]), [r for r in results["rows"] if not r["err_ok"]]
    assert results["env"]["threads"] == results["rows"][0]["threads"] >= 1
    assert results["limits"]["copy_gbps"] > 0 and results["limits"]["gemm_tflops"] > 0
    assert (tmp_path / "quick-layer_norm.png").stat().st_size > 0
    assert "median ms" in proc.stdout and "layer_norm" in proc.stdout


def _row(provider: str, median: float, shape: str = "M=4,N=8") -> dict:
    return {
        "op": "layer_norm", "shape": shape, "params": {"M": 4, "N": 8}, "dtype": "float32", "mode": "fwd",
        "provider": provider, "median_ms": median, "p20_ms": median * 0.98, "p80_ms": median * 1.02, "samples": 10,
        "bytes": 1000, "flops": None, "gbps": 1.0, "tflops": None, "bound": "memory", "pct_of_limit": 10.0,
        "speedup_vs_reference": 1.0, "speedup_vs_best_peer": 1.0, "max_abs_err": 0.0, "err_ratio": 0.0,
        "err_ok": True, "device": "cpu (test)", "torch": "2.x", "triton": None, "cuda": None, "fastenc": "0.1.0",
        "commit": "abc1234", "date": "2026-01-01T00:00:00Z", "threads": 2,
    }


def _doc(rows: list[dict]) -> dict:
    return {
        "schema": report.SCHEMA,
        "env": {"device": "cpu (test)", "device_type": "cpu", "fastenc": "0.1.0", "torch": "2.x", "triton": None,
                "cuda": None, "commit": "abc1234", "date": "2026-01-01T00:00:00Z", "threads": 2, "quick": True},
        "limits": {"copy_gbps": 10.0, "copy_bytes": 1 << 20, "gemm_tflops": 0.1, "gemm_n": 512,
                   "gemm_dtype": "float32"},
        "rows": rows,
        "skipped": [],
    }


def test_compare_flags_a_planted_regression(tmp_path, capsys):
    old = _doc([_row("torch", 1.0), _row("fastenc.native", 1.0), _row("fastenc.reference", 1.0)])
    new = copy.deepcopy(old)
    new["rows"][1] = _row("fastenc.native", 1.5)        # 50 % slower, spreads apart: a regression
    new["rows"][2] = _row("fastenc.reference", 1.01)    # 1 % slower: noise, not flagged
    old_path, new_path = tmp_path / "old.json", tmp_path / "new.json"
    old_path.write_text(json.dumps(old))
    new_path.write_text(json.dumps(new))

    assert bench_main(["--compare", str(old_path), str(new_path), "--fail-on-regression"]) == 1
    text = capsys.readouterr().out
    flagged = [line for line in text.splitlines() if "REGRESSION" in line]
    assert len(flagged) == 1 and "fastenc.native" in flagged[0] and "+50.0%" in flagged[0]
    assert "1 regression(s)" in text
    # Without --fail-on-regression it reports and exits 0; an unchanged file reports nothing.
    assert bench_main(["--compare", str(old_path), str(new_path)]) == 0
    assert bench_main(["--compare", str(old_path), str(old_path), "--fail-on-regression"]) == 0
    assert "0 regression(s)" in capsys.readouterr().out


def test_validate_results_names_what_is_wrong():
    report.validate_results(_doc([_row("torch", 1.0)]))
    broken = _doc([_row("torch", 1.0), _row("torch", 2.0)])
    del broken["rows"][0]["median_ms"]
    broken["env"]["threads"] = "two"
    with pytest.raises(ValueError) as info:
        report.validate_results(broken)
    message = str(info.value)
    assert "rows[0]: missing 'median_ms'" in message
    assert "env.threads" in message
    assert "duplicate row" in message


@pytest.mark.parametrize("mode", [cases.FWD, cases.FWD_BWD])
def test_error_column_catches_a_planted_wrong_kernel(mode):
    case = cases.Case(cases.LAYER_NORM, {"M": 64, "N": 128}, torch.float32, mode)
    prepared = runner.PreparedCase(case, torch.device("cpu"))
    off_by = 1e-2
    planted = runner.Provider("planted", "fastenc", lambda c: (lambda t: c.op.torch_fn(t) + off_by))
    peers, _ = runner.providers_for("cpu", compile=False, op=case.op)
    budget = TimingBudget(cpu_min_run_time_s=0.001)
    measurements = [runner.measure_provider(prepared, p, torch.get_num_threads(), budget)
                    for p in [*peers, planted]]
    assert all(m.failure is None for m in measurements), [m.failure for m in measurements]
    env = {"device": "cpu", "torch": torch.__version__, "commit": "test", "date": "now", "threads": 1}
    rows, _ = runner.rows_for_case(case, measurements, env, {"copy_gbps": 1.0, "gemm_tflops": 1.0})
    by_provider = {r["provider"]: r for r in rows}
    bad = by_provider["planted"]
    assert not bad["err_ok"] and bad["err_ratio"] > 10
    assert bad["max_abs_err"] == pytest.approx(off_by, rel=1e-3)
    assert by_provider["torch"]["err_ok"] and by_provider["fastenc.reference"]["err_ok"]
    table = "\n".join(report.table_lines(rows))
    assert any(line.startswith("layer_norm") and "planted" in line and line.endswith("!")
               for line in table.splitlines())
