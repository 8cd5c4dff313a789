"""fastenc.nn.LayerNorm: torch.nn.LayerNorm (constructor, parameters, state_dict, init) on fastenc's kernels."""

from __future__ import annotations

import torch
from torch import Tensor

from fastenc import functional as F


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in for `torch.nn.LayerNorm`; an instance of it too, so code that checks the type keeps working.

    `forward(input, residual=None)`: with `residual`, normalises `input + residual` in one fused pass.
    """

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual)
