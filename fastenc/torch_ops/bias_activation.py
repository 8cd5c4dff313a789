"""Bias + activation on torch's own elementwise kernels (as torch eager runs `F.gelu(x + bias)`); contract:
fastenc/ops/bias_activation.py. With dropout the reference runs: the backward regenerates its mask from the seed,
which torch's dropout cannot."""

from __future__ import annotations

import torch
import torch.nn.functional as TF

from fastenc.ops import accumulation_dtype
from fastenc.reference import bias_activation as reference


def _pre_activation(x, bias):
    return x if bias is None else x + bias


def _approximate(activation):
    return "tanh" if activation == "gelu_tanh" else "none"


def bias_activation_forward(a):
    if a.dropout_p > 0:
        return reference.bias_activation_forward(a)
    z = _pre_activation(a.x, a.bias)
    y = TF.relu(z) if a.activation == "relu" else TF.gelu(z, approximate=_approximate(a.activation))
    return y.to(a.x.dtype).contiguous()


def bias_activation_backward(dy, a):
    if a.dropout_p > 0:
        return reference.bias_activation_backward(dy, a)
    z = _pre_activation(a.x, a.bias)
    dy = dy.to(z.dtype)
    if a.activation == "relu":
        dz = torch.ops.aten.threshold_backward(dy, z, 0)
    else:
        dz = torch.ops.aten.gelu_backward(dy, z, approximate=_approximate(a.activation))
    acc = accumulation_dtype(a.x.dtype)
    dbias = dz.sum(dim=0, dtype=acc) if a.bias is not None else z.new_empty(0, dtype=acc)
    return dz.to(a.x.dtype).contiguous(), dbias
