"""Results documents: the schema and its check, the printed table, files on disk, and comparing two runs.

The schema is described in bench/results/README.md; `validate_results` is its executable form.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable

SCHEMA = "fastenc-bench/1"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
ENV_FIELDS: dict[str, tuple] = {
    "device": (str,), "device_type": (str,), "fastenc": (str, type(None)), "torch": (str,),
    "triton": (str, type(None)), "cuda": (str, type(None)), "commit": (str,), "date": (str,), "threads": (int,),
    "quick": (bool,),
}
LIMIT_FIELDS: dict[str, tuple] = {"copy_gbps": _NUM, "gemm_tflops": _NUM, "copy_bytes": (int,), "gemm_n": (int,),
                                  "gemm_dtype": (str,)}
ROW_FIELDS: dict[str, tuple] = {
    "op": (str,), "shape": (str,), "params": (dict,), "dtype": (str,), "mode": (str,), "provider": (str,),
    "median_ms": _NUM, "p20_ms": _NUM, "p80_ms": _NUM, "samples": (int,),
    "bytes": _OPT_NUM, "flops": _OPT_NUM, "gbps": _OPT_NUM, "tflops": _OPT_NUM, "bound": (str,),
    "pct_of_limit": _OPT_NUM, "speedup_vs_reference": _OPT_NUM, "speedup_vs_best_peer": _OPT_NUM,
    "max_abs_err": _OPT_NUM, "err_ratio": _OPT_NUM, "err_ok": (bool,),
    "device": (str,), "torch": (str,), "triton": (str, type(None)), "cuda": (str, type(None)),
    "fastenc": (str, type(None)), "commit": (str,), "date": (str,), "threads": (int,),
}
SKIP_FIELDS: dict[str, tuple] = {"op": (str,), "shape": (str,), "dtype": (str,), "mode": (str,),
                                 "provider": (str,), "reason": (str,)}


def _check_fields(where: str, obj: Any, fields: dict[str, tuple], problems: list[str]) -> None:
    if not isinstance(obj, dict):
        problems.append(f"{where}: expected an object, got {type(obj).__name__}")
        return
    for key, types in fields.items():
        if key not in obj:
            problems.append(f"{where}: missing {key!r}")
        elif not isinstance(obj[key], types) or (bool not in types and isinstance(obj[key], bool)):
            problems.append(f"{where}.{key}: {obj[key]!r} is not {' or '.join(t.__name__ for t in types)}")


def row_key(row: dict) -> tuple[str, str, str, str, str]:
    return row["op"], row["shape"], row["dtype"], row["mode"], row["provider"]


def validate_results(obj: Any) -> None:
    """Raise ValueError listing every way `obj` departs from the results schema; return None when it conforms."""
    problems: list[str] = []
    if not isinstance(obj, dict):
        raise ValueError(f"results: expected an object, got {type(obj).__name__}")
    if obj.get("schema") != SCHEMA:
        problems.append(f"schema: expected {SCHEMA!r}, got {obj.get('schema')!r}")
    _check_fields("env", obj.get("env"), ENV_FIELDS, problems)
    _check_fields("limits", obj.get("limits"), LIMIT_FIELDS, problems)
    for name in ("rows", "skipped"):
        if not isinstance(obj.get(name), list):
            problems.append(f"{name}: expected a list")
    seen = set()
    for i, row in enumerate(obj.get("rows") or []):
        _check_fields(f"rows[{i}]", row, ROW_FIELDS, problems)
        if not isinstance(row, dict) or any(k not in row for k in ("op", "shape", "dtype", "mode", "provider")):
            continue
        key = row_key(row)
        if key in seen:
            problems.append(f"rows[{i}]: duplicate row {key}")
        seen.add(key)
        if all(isinstance(row.get(k), _NUM) for k in ("p20_ms", "median_ms", "p80_ms")):
            if not (0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]):
                problems.append(f"rows[{i}]: expected 0 < p20_ms <= median_ms <= p80_ms")
    for i, skip in enumerate(obj.get("skipped") or []):
        _check_fields(f"skipped[{i}]", skip, SKIP_FIELDS, problems)
    if problems:
        raise ValueError("results do not follow the schema:\n  " + "\n  ".join(problems))


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def default_out_path(results: dict) -> Path:
    env = results["env"]
    return RESULTS_DIR / f"{slug(env['device'])}-{env['date'][:10]}.json"


def write_results(results: dict, path: Path) -> Path:
    validate_results(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(results), indent=1) + "\n")
    return path


def load_results(path: str | Path) -> dict:
    obj = json.loads(Path(path).read_text())
    validate_results(obj)
    return obj


# --- the table -------------------------------------------------------------------------------------------------

def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _rate(row: dict) -> str:
    if row["bound"] == "compute" and row.get("tflops") is not None:
        return f"{row['tflops']:.2f} TFLOP/s"
    if row.get("gbps") is not None:
        return f"{row['gbps']:.1f} GB/s"
    return "-"


TABLE_HEADER = ("op", "shape", "dtype", "mode", "provider", "median ms [p20, p80]", "rate", "% limit",
                "x ref", "x peer", "max err")


def table_lines(rows: Iterable[dict], markdown: bool = False) -> list[str]:
    """The results table, aligned text (or a markdown table); a '!' marks an error beyond the tolerance."""
    cells = []
    for r in rows:
        err = _fmt(r.get("max_abs_err"), ".1e") + ("" if r.get("err_ok") else " !")
        cells.append((
            r["op"], r["shape"], r["dtype"], r["mode"], r["provider"],
            f"{r['median_ms']:.4g} [{r['p20_ms']:.4g}, {r['p80_ms']:.4g}]", _rate(r),
            _fmt(r.get("pct_of_limit"), ".1f", "%"), _fmt(r.get("speedup_vs_reference"), ".2f", "x"),
            _fmt(r.get("speedup_vs_best_peer"), ".2f", "x"), err,
        ))
    if markdown:
        lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
        return lines + ["| " + " | ".join(c) + " |" for c in cells]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(TABLE_HEADER)]
    line = lambda c: "  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip()  # noqa: E731
    return [line(TABLE_HEADER), line(["-" * w for w in widths])] + [line(c) for c in cells]


def summary_lines(results: dict, markdown: bool = False) -> list[str]:
    env, limits = results["env"], results["limits"]
    lines = [
        f"device: {env['device']}" + (f" ({env['cpu_model']})" if env.get("cpu_model") and env["device_type"] == "cpu"
                                      else "") + f", threads {env['threads']}"
        + (f", load average at start {env['load_average']:.2f}" if env.get("load_average") is not None else ""),
        f"fastenc {env['fastenc']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
        f"commit {env['commit']}{' (+ local changes)' if env.get('commit_dirty') else ''}, {env['date']}",
        f"limits: copy {limits['copy_gbps']:.1f} GB/s ({limits['copy_bytes'] // 2**20} MiB buffer), "
        f"GEMM {limits['gemm_tflops']:.3f} TFLOP/s ({limits['gemm_dtype']} {limits['gemm_n']}^3)",
        "",
    ]
    lines += table_lines(results["rows"], markdown)
    if results["skipped"]:
        lines.append("")
        reasons: dict[tuple[str, str], int] = {}
        for s in results["skipped"]:
            reasons[(s["provider"], s["reason"])] = reasons.get((s["provider"], s["reason"]), 0) + 1
        lines.append("not run:")
        lines += [f"  {p} ({n} case{'s' if n > 1 else ''}): {why}" for (p, why), n in reasons.items()]
    bad = [r for r in results["rows"] if not r.get("err_ok")]
    if bad:
        lines.append("")
        lines.append(f"! {len(bad)} row(s) beyond the error tolerance (2x torch eager's error + one rounding step):")
        lines += [f"  {' '.join(row_key(r))}: max err {_fmt(r.get('max_abs_err'), '.3g')}" for r in bad]
    return lines


# --- comparing two runs ----------------------------------------------------------------------------------------

def compare(old: dict, new: dict, threshold: float = 0.10) -> tuple[list[str], list[tuple]]:
    """Lines reporting the change in median time per case present in both, and the regressions among them.

    A regression: the new median is more than `threshold` (a fraction) slower AND the spreads do not overlap
    (new p20 above old p80), so that noise within one run's spread is not called a change.
    """
    old_rows = {row_key(r): r for r in old["rows"]}
    new_rows = {row_key(r): r for r in new["rows"]}
    lines, regressions = [], []
    if old["env"]["device"] != new["env"]["device"]:
        lines.append(f"warning: devices differ ({old['env']['device']!r} vs {new['env']['device']!r}); "
                     "timings are not comparable")
    lines.append(f"old: {old['env']['commit']} {old['env']['date']}   new: {new['env']['commit']} {new['env']['date']}"
                 f"   threshold {threshold:.0%}")
    header = ("op", "shape", "dtype", "mode", "provider", "old ms", "new ms", "change", "")
    cells = []
    for key in [k for k in old_rows if k in new_rows]:
        o, n = old_rows[key], new_rows[key]
        change = n["median_ms"] / o["median_ms"] - 1
        flag = ""
        if change > threshold and n["p20_ms"] > o["p80_ms"]:
            flag = "REGRESSION"
            regressions.append(key)
        elif change < -threshold and n["p80_ms"] < o["p20_ms"]:
            flag = "faster"
        cells.append((*key, f"{o['median_ms']:.4g}", f"{n['median_ms']:.4g}", f"{change:+.1%}", flag))
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip() for c in [header] + cells]
    only_old = [k for k in old_rows if k not in new_rows]
    only_new = [k for k in new_rows if k not in old_rows]
    if only_old:
        lines.append(f"{len(only_old)} case(s) only in the old file, e.g. {' '.join(only_old[0])}")
    if only_new:
        lines.append(f"{len(only_new)} case(s) only in the new file, e.g. {' '.join(only_new[0])}")
    lines.append(f"{len(regressions)} regression(s) beyond {threshold:.0%}")
    return lines, regressions
