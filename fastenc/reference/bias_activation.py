"""Bias + activation + dropout in plain PyTorch (float32 arithmetic); contract: fastenc/ops/bias_activation.py.

The dropout mask is drawn from `dropout_seed` with torch's generator: the same distribution as the kernel's,
not the same elements.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as TF


def _pre_activation(x, bias):
    z = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
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


def _slope(z, activation):
    """d act / dz, written out (the kernels' formulas, checked against autograd in the tests)."""
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
        return cdf + z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    c = math.sqrt(2.0 / math.pi)
    t = torch.tanh(c * (z + 0.044715 * z**3))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * z * z)


def bias_activation_forward(x, bias, activation, dropout_p, dropout_seed):
    z = _pre_activation(x, bias)
    y = _activate(z, activation)
    scale = _dropout_scale(z, dropout_p, dropout_seed)
    return (y if scale is None else y * scale).to(x.dtype)


def bias_activation_backward(dy, x, bias, activation, dropout_p, dropout_seed):
    z = _pre_activation(x, bias)
    dz = dy.to(z.dtype) * _slope(z, activation)
    scale = _dropout_scale(z, dropout_p, dropout_seed)
    if scale is not None:
        dz = dz * scale
    dbias = dz.sum(dim=0) if bias is not None else z.new_empty(0)
    return dz.to(x.dtype), dbias
