"""Residual-add + LayerNorm on torch's native_layer_norm and its backward; contract: fastenc/ops/layer_norm.py."""

from __future__ import annotations

import torch

from fastenc.ops import accumulation_dtype

_REDUCED = (torch.float16, torch.bfloat16)


def _params(x, weight, bias):
    """weight and bias in the dtypes torch's kernel takes together: float32 both, when either is float32 for half /
    bfloat16 x (torch's mixed-dtype path), else x's dtype."""
    mixed = x.dtype in _REDUCED and any(p is not None and p.dtype == torch.float32 for p in (weight, bias))
    dtype = torch.float32 if mixed else x.dtype
    return tuple(None if p is None else p.to(dtype) for p in (weight, bias)), dtype


def layer_norm_forward(a):
    xs = a.x if a.residual is None else a.x + a.residual
    (weight, bias), _ = _params(xs, a.weight, a.bias)
    y, mean, rstd = torch.ops.aten.native_layer_norm(xs, [xs.shape[1]], weight, bias, a.eps)
    summed = xs if a.store_sum and a.residual is not None else a.x.new_empty(0)
    stats = accumulation_dtype(a.x.dtype)
    return y, summed, mean.view(-1).to(stats), rstd.view(-1).to(stats)


def layer_norm_backward(b):
    dy, dsum, xs, weight, mean, rstd, has_bias = b
    (weight, _), dtype = _params(xs, weight, None)
    stats = torch.float32 if dtype == torch.float32 and xs.dtype in _REDUCED else xs.dtype
    # torch's kernel reads the bias only for its shape and dtype.
    bias = torch.empty(xs.shape[1], dtype=dtype, device=xs.device) if has_bias else None
    dx, dweight, dbias = torch.ops.aten.native_layer_norm_backward(
        dy, xs, [xs.shape[1]], mean.view(-1, 1).to(stats), rstd.view(-1, 1).to(stats), weight, bias,
        [True, weight is not None, has_bias],
    )
    if dsum is not None:
        dx = dx + dsum
    acc = mean.dtype
    return (dx.contiguous(), mean.new_empty(0) if dweight is None else dweight.to(acc),
            mean.new_empty(0) if dbias is None else dbias.to(acc))
