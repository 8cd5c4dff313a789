"""A one-line progress bar on stderr (no dependency): `[#####.....] 12/40 1.3s loss 0.531`.

Drawn only on a terminal: redrawn lines would litter a log file."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    def __init__(self, total: int, label: str, enabled: bool = True, width: int = 24, stream=None) -> None:
        self.total, self.label, self.width = total, label, width
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled and self.stream.isatty()
        self.done = 0
        self.start = time.perf_counter()

    def update(self, steps: int = 1, **values: float) -> None:
        self.done += steps
        if not self.enabled:
            return
        filled = self.width * self.done // max(self.total, 1)
        shown = " ".join(f"{k} {v:.3f}" for k, v in values.items())
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                          f"{elapsed:.1f}s {shown}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
