"""The LSTM op's row plan, shared by the Python implementations (the reference and the Triton launcher; the C++
driver, csrc/lstm.cpp, builds the same plan in C++).

Rows: the input x is (T, B, I), or (N, I) packed as PackedSequence.data with `batch_sizes`.
Either way it is handled as N flat rows where step t owns rows off_t .. off_t + n_t (n_t = batch_sizes[t], or B).
The step processed before t (t - 1, or t + 1 in reverse) is its "previous" step; a row that was not active then
starts from h0 / c0 (only the reverse direction of a packed batch has such rows after the first step).
"""

from __future__ import annotations

import torch
from torch import Tensor


def schedule(batch_sizes: Tensor | None, steps: int, batch: int, reverse: bool) -> list[tuple[int, int, int, int]]:
    """(offset, rows, previous offset, previous rows) per step in processing order; the first has no previous."""
    sizes = [batch] * steps if batch_sizes is None else [int(s) for s in batch_sizes.tolist()]
    offsets = [0]
    for s in sizes[:-1]:
        offsets.append(offsets[-1] + s)
    order = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    plan, prev = [], (0, 0)
    for t in order:
        plan.append((offsets[t], sizes[t], *prev))
        prev = (offsets[t], sizes[t])
    return plan


def row_maps(batch_sizes: Tensor | None, steps: int, batch: int, reverse: bool, device) -> tuple[Tensor, ...]:
    """Flat-row indices, computed at once from the sizes: for each batch row, its row at its first and at its last
    processed step; for each flat row, the row of cat([out, h0]) holding the h that step started from."""
    sizes = torch.full((steps,), batch) if batch_sizes is None else batch_sizes.to("cpu", torch.int64)
    offsets = sizes.cumsum(0) - sizes
    total = int(sizes.sum())
    rows = torch.arange(batch)
    at_start = rows  # time step 0 holds every row at offset 0
    at_end = offsets[(sizes[None, :] > rows[:, None]).sum(1) - 1] + rows  # each row's last time step
    step = torch.repeat_interleave(torch.arange(steps), sizes)
    row = torch.arange(total) - offsets[step]
    prev = (step + 1 if reverse else step - 1).clamp(0, steps - 1)
    has_prev = (step != prev) & (row < sizes[prev])
    previous = torch.where(has_prev, offsets[prev] + row, total + row)
    first, last = (at_end, at_start) if reverse else (at_start, at_end)
    return first.to(device), last.to(device), previous.to(device)
