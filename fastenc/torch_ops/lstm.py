"""One LSTM layer on torch's own LSTM op (oneDNN's on a CPU, cuDNN's on CUDA), with torch's own autograd.

Unlike the other ops' torch backends this is not an implementation of fastenc's op contract: torch's LSTM keeps
what its backward needs in a workspace of its own, which fits no backend-neutral contract, so functional.lstm_layer
runs `lstm_layer` here in place of fastenc::lstm_layer. The one-direction layer the contract describes is a
one-layer torch LSTM; the reverse direction runs it on each sequence reversed in time (a row permutation of a
packed batch, which keeps its batch_sizes) and reverses the output back.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _reversed_rows(batch_sizes: Tensor, device: torch.device) -> Tensor:
    """The packed-row permutation that reverses every sequence in time (its own inverse)."""
    steps = torch.arange(batch_sizes.numel())[:, None]
    rows = torch.arange(int(batch_sizes[0]))
    active = rows < batch_sizes[:, None]  # (T, B): whether row b has a step t; packed order is t-major
    lengths = active.sum(0)
    offsets = batch_sizes.cumsum(0) - batch_sizes
    source = offsets[(lengths - 1 - steps).clamp(min=0)] + rows
    return source[active].to(device)


def lstm_layer(a) -> tuple[Tensor, Tensor, Tensor]:
    """(out, h_n, c_n) of one layer in one direction, from the arguments of fastenc::lstm_layer (its `save` is
    autograd's business here)."""
    x, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse, _ = a
    params = [w_ih, w_hh] + ([] if bias is None else [bias, torch.zeros_like(bias)]) + ([] if w_hr is None else [w_hr])
    hx = (h0.unsqueeze(0), c0.unsqueeze(0))
    flags = (bias is not None, 1, 0.0, torch.is_grad_enabled(), False)  # biases, layers, dropout, train, bidirectional
    if batch_sizes is None:
        x = x.flip(0) if reverse else x
        out, h_n, c_n = torch._VF.lstm(x, hx, params, *flags, False)  # the last flag: batch_first
        out = out.flip(0) if reverse else out
    else:
        order = _reversed_rows(batch_sizes, x.device) if reverse else None
        x = x[order] if reverse else x
        out, h_n, c_n = torch._VF.lstm(x, batch_sizes, hx, params, *flags)
        out = out[order] if reverse else out
    return out, h_n[0], c_n[0]
