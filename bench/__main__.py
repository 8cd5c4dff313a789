"""`python -m bench`: measure the device's limits, run every op's cases with every provider, print and save.

  python -m bench                           every op, the device's default shapes and dtypes
  python -m bench --op layer_norm --dtype fp16,fp32
  python -m bench --op embed                sentence-transformers' encode on a news corpus (CPU; bench/embed.py)
  python -m bench --quick --out /tmp/q.json a few tiny cases with short timing (CI)
  python -m bench --headline --budget 150   the GPU target shapes, starting no case after 150 s
  python -m bench --estimate --headline     what the GPU cases should take on an H200 (runs nothing)
  python -m bench --compare OLD.json NEW.json [--threshold 0.1] [--fail-on-regression]
  python -m bench --resources               each kernel config's sm_90 registers, spills, shared memory
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _comma_list(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", action="append", help="op(s) to run (repeatable or a comma list); default: all")
    p.add_argument("--dtype", action="append", help="dtype(s), e.g. bf16,fp16,fp32; default: per device")
    p.add_argument("--quick", action="store_true", help="a few tiny cases, short timing, no torch.compile")
    p.add_argument("--headline", action="store_true", help="on CUDA, only the shapes the GPU targets name")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="start no case after this many seconds (the rest are listed as skipped)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="include torch.compile even in quick mode")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="leave torch.compile out")
    p.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's); reported either way")
    p.add_argument("--rounds", type=int, help="interleaved timing rounds per case (default 3; 1 with --quick)")
    p.add_argument("--out", type=Path, help="results file (default: bench/results/<device>-<date>.json)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--one-plot", action="store_true", help="one PNG holding every op (default: one per op)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), type=Path,
                   help="compare two results files instead of running")
    p.add_argument("--threshold", type=float, default=0.10, help="regression threshold for --compare (0.10 = 10%%)")
    p.add_argument("--fail-on-regression", action="store_true", help="--compare exits 1 when a case regressed")
    p.add_argument("--list", action="store_true", help="list the cases that would run, and exit")
    p.add_argument("--estimate", action="store_true",
                   help="print the expected H200 time of each CUDA case (bench/estimates.py), and exit")
    p.add_argument("--resources", action="store_true",
                   help="compile every kernel config for sm_90 (no GPU needed) and write its registers, spills and "
                        "shared memory to bench/results/sm90-resources.md (bench/resources.py), and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.resources:
        from bench import resources

        return resources.main([f"--op={op}" for op in _comma_list(args.op) or []])
    from bench import report

    if args.compare:
        lines, regressions = report.compare(report.load_results(args.compare[0]), report.load_results(args.compare[1]),
                                            threshold=args.threshold)
        print("\n".join(lines))
        return 1 if regressions and args.fail_on_regression else 0

    from bench import cases, runner

    dtypes = [cases.parse_dtype(d) for d in _comma_list(args.dtype) or []] or None
    ops = _comma_list(args.op)
    # "embed" is sentence-transformers' encode over a corpus (bench/embed.py), not a kernel case: run after them.
    embed_too = ops is None or "embed" in ops
    ops = [op for op in ops if op != "embed"] if ops else ops
    if args.estimate:
        from bench import estimates

        selected = cases.cases_for("cuda", headline=args.headline, ops=ops, dtypes=dtypes)
        print("\n".join(estimates.estimate_lines(selected)))
        return 0
    device = runner.pick_device(args.device)
    if args.list:
        for case in cases.cases_for(device.type, quick=args.quick, headline=args.headline, ops=ops, dtypes=dtypes):
            print(case.id)
        return 0
    if ops != []:
        _run_cases(args, ops, dtypes, device)
    if embed_too and device.type == "cpu":
        import torch

        from bench import embed

        threads = args.threads or torch.get_num_threads()
        quick = ["--limit", "8", "--passes", "1"] if args.quick else ["--passes", str(args.rounds or 3)]
        # --out names the cases' file when cases ran: the embed file then goes beside it.
        out = args.out if ops == [] or args.out is None else args.out.with_name(args.out.stem + "-embed.json")
        return embed.main(["--threads", str(threads), *quick, *(["--out", str(out)] if out else [])])
    if embed_too and args.op:
        print("embed: skipped, it runs on a CPU only (the GPU rows are not written yet)")
    return 0


def _run_cases(args: argparse.Namespace, ops: list[str] | None, dtypes, device) -> None:
    from bench import report, runner

    results = runner.run(ops=ops, dtypes=dtypes, quick=args.quick, headline=args.headline, compile=args.compile,
                         device=device, threads=args.threads, rounds=args.rounds, budget_s=args.budget)
    print("\n".join(report.summary_lines(results, markdown=args.markdown)))
    out = args.out or report.default_out_path(results)
    report.write_results(results, out)
    print(f"\nresults: {out}")
    if not args.no_plot and results["rows"]:
        from bench.plots import plot_results

        for path in plot_results(results, out, combined=args.one_plot):
            print(f"plot:    {path}")


if __name__ == "__main__":
    sys.exit(main())
