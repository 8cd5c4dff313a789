"""Bias + activation + dropout in plain PyTorch (float32 arithmetic); contract: fastenc/ops/bias_activation.py.

The dropout mask is drawn from `dropout_seed` with torch's generator: the same distribution as the kernel's,
not the same elements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF

from fastenc.ops import accumulation_dtype


def _pre_activation(x, bias):
    z = x.to(accumulation_dtype(x.dtype))
    return z if bias is None else z + bias.to(z.dtype)


def _dropout_scale(z, dropout_p, dropout_seed):
    if dropout_p == 0:
        return None
    generator = torch.Generator(device=z.device).manual_seed(int(dropout_seed))
    keep = torch.rand(z.shape, generator=generator, device=z.device) >= dropout_p
    return keep.to(z.dtype) / (1.0 - dropout_p)


def _activate(z, activation):
    if activation == "relu":
        return TF.relu(z)
    return TF.gelu(z, approximate="tanh" if activation == "gelu_tanh" else "none")


def _activation_backward(dy, z, activation):
    """dy * act'(z) in one pass: torch's own derivative kernels, the ones autograd runs for TF.relu / TF.gelu."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(dy, z, 0)
    return torch.ops.aten.gelu_backward(dy, z, approximate="tanh" if activation == "gelu_tanh" else "none")


def bias_activation_forward(a):
    z = _pre_activation(a.x, a.bias)
    y = _activate(z, a.activation)
    scale = _dropout_scale(z, a.dropout_p, a.dropout_seed)
    return (y if scale is None else y * scale).to(a.x.dtype)


def bias_activation_backward(dy, a):
    z = _pre_activation(a.x, a.bias)
    dz = _activation_backward(dy.to(z.dtype), z, a.activation)
    scale = _dropout_scale(z, a.dropout_p, a.dropout_seed)
    if scale is not None:
        dz = dz * scale
    dbias = dz.sum(dim=0) if a.bias is not None else z.new_empty(0)
    return dz.to(a.x.dtype), dbias
