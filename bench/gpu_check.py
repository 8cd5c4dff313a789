"""`make gpu-check OUT=DIR` (or `python -m bench.gpu_check DIR`): what a short GPU lease must produce, in one call.

Stages, each in a subprocess with a time limit, within one overall budget (default 480 s on a 16-core GPU host):
  build        the extension for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0), every core; imports it
  gpu-tests    the suite's CUDA cases, forward and backward against the float64 oracles, with one autotune config
               per kernel key (FASTENC_AUTOTUNE=0: the full tuning is the bench's)
  sanitize     compute-sanitizer memcheck on one small case per kernel; racecheck on attention forward + backward
  bench        python -m bench --headline: the GPU target shapes, starting no case once its time is spent
  bench-quick  python -m bench --quick
  cpu-tests    the rest of the suite, as time allows
DIR gets gpu-check.log (every stage's output), gpu-check.json (stages, versions, device, commit), bench.json and
bench.png: commit the folder under bench/results/ as it is. A second call into the same DIR skips the stages that
passed (the build is always checked; it is incremental). Without a GPU it says so, runs the stages that need none
(build, cpu-tests) and exits 1; it exits 0 only when every stage passed on a GPU.

FASTENC_COMMIT names the commit when the tree came without its git history.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATE = "gpu-check.json"
LOG = "gpu-check.log"


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    limit_s: int  # its own time limit; the overall budget may cut it shorter
    needs_gpu: bool
    as_time_allows: bool = False  # running out of time is no failure (failing tests are)


STAGES = (Stage("build", 240, False), Stage("gpu-tests", 180, True), Stage("sanitize", 60, True),
          Stage("bench", 150, True), Stage("bench-quick", 40, True), Stage("cpu-tests", 300, False, True))
TEST_ENV = {"FASTENC_REQUIRE_BACKENDS": "reference,torch,triton,native", "FASTENC_AUTOTUNE": "0"}


def _pytest(selection: str, limit_s: int) -> list[str]:
    """The suite's cases matching `selection`, across workers where pytest-xdist is installed (kernels compile in
    parallel), each test stopped at a share of the stage's time where pytest-timeout is."""
    cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-rfE", "-p", "no:cacheprovider", "-k", selection]
    if importlib.util.find_spec("xdist"):
        cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    if importlib.util.find_spec("pytest_timeout"):
        cmd += [f"--timeout={max(30, limit_s // 2)}"]
    return cmd


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = Path(home) / "bin" / "compute-sanitizer"
    return str(candidate) if candidate.exists() else None


def commands(stage: Stage, out: Path, limit_s: int) -> list[tuple[list[str], dict[str, str]]] | str:
    """The commands of a stage (with extra environment), or why it cannot run here."""
    py = sys.executable
    if stage.name == "build":
        env = {"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": str(os.cpu_count() or 1)}
        build = [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-q", "-e", "."]
        probe = [py, "-c", "import fastenc, fastenc._C, fastenc.kernels; fastenc.info()"]
        return [(build, env), (probe, {})]
    if stage.name == "gpu-tests":
        return [(_pytest("cuda or gpu", limit_s), TEST_ENV)]
    if stage.name == "cpu-tests":
        return [(_pytest("not cuda and not gpu", limit_s), TEST_ENV)]
    if stage.name == "sanitize":
        tool = _sanitizer()
        if tool is None:
            return "compute-sanitizer is not on PATH nor in CUDA_HOME/bin"
        smoke = [py, "-m", "bench.gpu_check", "--smoke"]
        return [([tool, "--tool", "memcheck", "--error-exitcode", "1", *smoke], {}),
                ([tool, "--tool", "racecheck", "--error-exitcode", "1", *smoke, "--op", "attention"], {})]
    if stage.name == "bench":
        # Cases start until 30 s before the stage's end, leaving time to finish the last one and write the file.
        return [([py, "-m", "bench", "--headline", "--budget", str(max(limit_s - 30, 0)), "--one-plot",
                  "--out", str(out / "bench.json")], {})]
    if stage.name == "bench-quick":
        # Its rows go to the log only: the folder holds one results file.
        scratch = Path(tempfile.gettempdir()) / "fastenc-bench-quick.json"
        return [([py, "-m", "bench", "--quick", "--no-plot", "--out", str(scratch)], {})]
    raise ValueError(f"unknown stage {stage.name!r}")


def run_command(cmd: list[str], env: dict[str, str], limit_s: float, log) -> str:
    """Run one command with its output appended to the log; 'passed', 'failed (exit N)' or 'timed out'."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    # A session of its own, so that a time-out also stops the command's children (pytest's workers).
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(timeout=max(limit_s, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"timed out after {limit_s:.0f} s"
    return "passed" if code == 0 else f"failed (exit {code})"


def environment() -> dict:
    import torch

    def version(module: str) -> str | None:
        try:
            return __import__(module).__version__
        except ImportError:
            return None

    commit = os.environ.get("FASTENC_COMMIT")
    if not commit:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        commit = git.stdout.strip() if git.returncode == 0 else "unknown"
    gpu = torch.cuda.is_available()
    driver = None
    if gpu and shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        driver = smi.stdout.strip() or None
    return {"device": torch.cuda.get_device_name() if gpu else None, "driver": driver, "torch": torch.__version__,
            "triton": version("triton"), "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "cpu_cores": os.cpu_count(), "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def check(out: Path, budget_s: float, only: list[str] | None) -> int:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE
    state = json.loads(state_path.read_text()) if state_path.exists() else {"stages": {}}
    state.setdefault("runs", []).append(environment())
    gpu = torch.cuda.is_available()
    deadline = time.monotonic() + budget_s
    with open(out / LOG, "a") as log:
        for stage in STAGES:
            if only and stage.name not in only:
                continue
            previous = state["stages"].get(stage.name, {})
            if previous.get("status") == "passed" and stage.name != "build":
                print(f"{stage.name:<12} passed before ({previous['seconds']:.0f} s): skipped")
                continue
            left = deadline - time.monotonic()
            limit = min(stage.limit_s, left)
            built = stage.name == "build" or state["stages"].get("build", {}).get("status") == "passed"
            todo = ("needs a CUDA device; this machine has none" if stage.needs_gpu and not gpu
                    else "the build did not pass" if not built
                    else "no time left in the budget" if limit < 10 else commands(stage, out, int(limit)))
            started = time.monotonic()
            if isinstance(todo, str):
                status = f"not run: {todo}"
            else:
                log.write(f"\n===== {stage.name} (limit {limit:.0f} s) =====\n")
                status = "passed"
                for cmd, env in todo:
                    status = run_command(cmd, env, limit - (time.monotonic() - started), log)
                    if status != "passed":
                        break
            seconds = time.monotonic() - started
            state["stages"][stage.name] = {"status": status, "seconds": round(seconds, 1)}
            state_path.write_text(json.dumps(state, indent=1) + "\n")
            print(f"{stage.name:<12} {status} ({seconds:.0f} s)", flush=True)
    if (out / "bench.json").exists():
        from bench import estimates, report

        judged = estimates.judge_lines(report.load_results(out / "bench.json"))
        print("\n".join(judged))
        with open(out / LOG, "a") as log:
            log.write("\n" + "\n".join(judged) + "\n")

    def done(stage: Stage) -> bool:
        status = state["stages"].get(stage.name, {}).get("status", "")
        return status == "passed" or (stage.as_time_allows and status.startswith(("timed out", "not run: no time")))

    ok = gpu and all(done(stage) for stage in STAGES)
    print(f"gpu-check: {'every stage passed' if ok else 'not complete'}; log and results in {out}")
    if not gpu:
        print("gpu-check: no CUDA device here: the GPU stages did not run")
    return 0 if ok else 1


def smoke(ops: list[str] | None) -> int:
    """One small forward + backward of every fastenc kernel on the GPU (the bench's quick cases under the triton
    and native backends), for compute-sanitizer to watch."""
    import torch

    import fastenc
    from bench import cases, runner

    device = torch.device("cuda")
    for case in cases.cases_for("cuda", quick=True, ops=ops):
        if case.mode != cases.FWD_BWD:
            continue
        prepared = runner.PreparedCase(case, device, with_oracle=False)
        for backend in ("triton", "native"):
            if backend not in fastenc.available_backends():
                continue
            with fastenc.backend(backend), prepared.grad_mode():
                prepared.call_for(case.op.fastenc_fn)()
            torch.cuda.synchronize()
            print(f"smoke: {case.id} {backend}: ran")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, nargs="?", help="the folder for the log and the results")
    p.add_argument("--budget", type=float, default=480, help="seconds for all stages together (default 480)")
    p.add_argument("--stage", action="append", choices=[s.name for s in STAGES], help="run only these stages")
    p.add_argument("--smoke", action="store_true", help="(used by the sanitize stage) run the small GPU cases")
    p.add_argument("--op", action="append", help="with --smoke: only these ops")
    args = p.parse_args(argv)
    if args.smoke:
        return smoke(args.op)
    if args.out is None:
        p.error("the output folder is required")
    return check(args.out, args.budget, args.stage)


if __name__ == "__main__":
    sys.exit(main())
