"""One PNG per op: achieved rate against size, a line per provider, a panel per (dtype, mode)."""

from __future__ import annotations

from pathlib import Path

from bench import cases as cases_mod


def plot_results(results: dict, json_path: Path) -> list[Path]:
    """Write `<json stem>-<op>.png` beside `json_path` for every op in the results; return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = results["rows"]
    limits, env = results["limits"], results["env"]
    for op in sorted({r["op"] for r in rows}):
        op_rows = [r for r in rows if r["op"] == op]
        spec = cases_mod.REGISTRY.get(op)
        label, x_of = spec.x_axis if spec else ("bytes moved per call", None)
        compute = op_rows[0]["bound"] == "compute"
        panels = sorted({(r["dtype"], r["mode"]) for r in op_rows})
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
        for ax, (dtype, mode) in zip(axes[0], panels):
            panel = [r for r in op_rows if (r["dtype"], r["mode"]) == (dtype, mode)]
            for provider in sorted({r["provider"] for r in panel}):
                pts = []
                for r in panel:
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
        fig.suptitle(f"{env['device']} · torch {env['torch']} · commit {env['commit']} · {env['date'][:10]}",
                     fontsize=9)
        fig.tight_layout()
        path = json_path.with_name(f"{json_path.stem}-{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
