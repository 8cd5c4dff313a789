"""Residual-add + LayerNorm in plain PyTorch: the oracle every backend is tested against, and the fallback.

Arguments and shapes follow the op contract (fastenc/ops/layer_norm.py): x and residual are (M, N), weight and
bias (N,).
Statistics are computed in the op-math dtype (float64 for float64 inputs, float32 otherwise).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastenc.ops import accumulation_dtype


def normalize(xs: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable LayerNorm of the rows of `xs`: (y in xs.dtype, mean, rstd)."""
    xf = xs.to(accumulation_dtype(xs.dtype))
    mean = xf.mean(dim=-1)
    centred = xf - mean.unsqueeze(-1)
    rstd = torch.rsqrt(centred.square().mean(dim=-1) + eps)
    y = centred * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return y.to(xs.dtype), mean, rstd


def layer_norm_forward(a) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # The sum is rounded to x.dtype first, as `x + residual` in torch would be, and normalised from that.
    xs = a.x if a.residual is None else a.x + a.residual
    y, mean, rstd = normalize(xs, a.weight, a.bias, a.eps)
    summed = xs.contiguous() if a.store_sum and a.residual is not None else a.x.new_empty(0)
    return y.contiguous(), summed, mean, rstd


def layer_norm_backward(b) -> tuple[Tensor, Tensor, Tensor]:
    dy, dsum, xs, weight, mean, rstd, has_bias = b
    acc = mean.dtype
    rstd_col = rstd.unsqueeze(-1)
    xhat = (xs.to(acc) - mean.unsqueeze(-1)) * rstd_col
    dyf = dy.to(acc)
    g = dyf if weight is None else dyf * weight.to(acc)
    dx = rstd_col * (g - g.mean(dim=-1, keepdim=True) - xhat * (g * xhat).mean(dim=-1, keepdim=True))
    if dsum is not None:
        dx = dx + dsum.to(acc)
    dweight = (dyf * xhat).sum(dim=0) if weight is not None else mean.new_empty(0)
    dbias = dyf.sum(dim=0) if has_bias else mean.new_empty(0)
    return dx.to(xs.dtype).contiguous(), dweight, dbias
