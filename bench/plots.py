"""Achieved rate against size, a line per provider, a panel per (dtype, mode): one PNG per op, or all ops in one."""

from __future__ import annotations

from pathlib import Path

from bench import cases as cases_mod


def _draw_panel(ax, rows: list[dict], op: str, dtype: str, mode: str, limits: dict) -> None:
    spec = cases_mod.REGISTRY.get(op)
    label, x_of = spec.x_axis if spec else ("bytes moved per call", None)
    compute = rows[0]["bound"] == "compute"
    for provider in sorted({r["provider"] for r in rows}):
        pts = []
        for r in rows:
            if r["provider"] != provider:
                continue
            x = x_of(r["params"]) if x_of else r["bytes"]
            y = r["tflops"] if compute else r["gbps"]
            if x is not None and y is not None:
                pts.append((x, y))
        pts.sort()
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
    limit = limits["gemm_tflops"] if compute else limits["copy_gbps"]
    ax.axhline(limit, color="grey", linestyle="--", linewidth=1,
               label=f"measured {'GEMM' if compute else 'copy'} limit")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(label)
    ax.set_ylabel("TFLOP/s" if compute else "GB/s")
    ax.set_title(f"{op} {dtype} {mode}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _figure(plt, results: dict, ops: list[str]):
    """One row of panels per op in `ops`."""
    rows = results["rows"]
    panels = {op: sorted({(r["dtype"], r["mode"]) for r in rows if r["op"] == op}) for op in ops}
    width = max(len(p) for p in panels.values())
    fig, axes = plt.subplots(len(ops), width, figsize=(5.5 * width, 4.2 * len(ops)), squeeze=False)
    for row_axes, op in zip(axes, ops):
        for ax, (dtype, mode) in zip(row_axes, panels[op]):
            panel = [r for r in rows if (r["op"], r["dtype"], r["mode"]) == (op, dtype, mode)]
            _draw_panel(ax, panel, op, dtype, mode, results["limits"])
        for ax in row_axes[len(panels[op]):]:
            ax.set_visible(False)
    env = results["env"]
    fig.suptitle(f"{env['device']} · torch {env['torch']} · commit {env['commit']} · {env['date'][:10]}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_results(results: dict, json_path: Path, combined: bool = False) -> list[Path]:
    """Write `<json stem>-<op>.png` beside `json_path` for every op in the results (or, `combined`, one
    `<json stem>.png` holding them all); return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = sorted({r["op"] for r in results["rows"]})
    if not ops:
        return []
    figures = [(ops, json_path.with_suffix(".png"))] if combined else [
        ([op], json_path.with_name(f"{json_path.stem}-{op}.png")) for op in ops]
    for fig_ops, path in figures:
        fig = _figure(plt, results, fig_ops)
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return [path for _, path in figures]
