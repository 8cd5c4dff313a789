"""Per-epoch metrics written as CSV and JSON, and the loss / accuracy curves as a PNG."""

from __future__ import annotations

import csv
import json
import os

COLUMNS = ["phase", "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds"]


def write(history: list[dict], output_dir: str) -> None:
    """metrics.csv, metrics.json and curves.png in output_dir (pretraining rows have no accuracy)."""
    with open(os.path.join(output_dir, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(history)
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(history, f, indent=1)
    plot(history, os.path.join(output_dir, "curves.png"))


def plot(history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    rows = [r for r in history if r["phase"] == "finetune"]
    epochs = [r["epoch"] for r in rows]
    figure, (loss, accuracy) = plt.subplots(1, 2, figsize=(9, 3.5))
    for split in ("train", "val"):
        loss.plot(epochs, [r[f"{split}_loss"] for r in rows], marker="o", label=split)
        accuracy.plot(epochs, [r[f"{split}_accuracy"] for r in rows], marker="o", label=split)
    loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    accuracy.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for axes in (loss, accuracy):
        axes.legend()
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
