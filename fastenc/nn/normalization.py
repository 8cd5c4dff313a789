"""fastenc.nn.LayerNorm: torch.nn.LayerNorm (constructor, parameters, state_dict, init) on fastenc's kernels."""

from __future__ import annotations

import torch
from torch import Tensor

from fastenc import functional as F
from fastenc.nn._errors import NotScriptable


class LayerNorm(NotScriptable, torch.nn.LayerNorm):
    """Drop-in for `torch.nn.LayerNorm`; an instance of it too, so code that checks the type keeps working.

    `forward(input, residual=None)`: with `residual`, normalises `input + residual` in one fused pass.
    """

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual)


def residual_layer_norm(norm: torch.nn.LayerNorm, x: Tensor, residual: Tensor, return_residual: bool = False):
    """`norm(x + residual)` in one fused pass, for any LayerNorm module (torch's or fastenc's), promoting the two
    dtypes as torch's `x + residual` does: under autocast a sublayer's low-precision output meets a float32
    residual stream, and the sum (hence the norm) is float32."""
    if x.dtype != residual.dtype:
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps, residual=residual,
                        return_residual=return_residual)
