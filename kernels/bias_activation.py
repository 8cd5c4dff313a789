"""Bias + activation + dropout in Triton: the epilogue of a feed-forward block's first linear layer.

Contract: fastenc/ops/bias_activation.py. Each program takes a BLOCK_M x BLOCK_N tile, so the backward can sum
its tile's bias gradient over rows in registers and write one partial row per program, reduced by torch after
(deterministic, no atomics). Arithmetic is float32; the dropout mask comes from a counter-based generator keyed by
the element's flat index, so the backward regenerates it instead of storing it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_tanh": 2}
BLOCK_M, BLOCK_N = 16, 128  # 2048 elements a program: plenty of parallelism for encoder-sized (tokens x 4d)


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr):
    """(act(z), act'(z)) in float32."""
    if ACTIVATION == 0:
        return tl.maximum(z, 0.0), tl.where(z > 0.0, 1.0, 0.0)
    if ACTIVATION == 1:  # exact GELU: z * Phi(z)
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return z * cdf, cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    # tanh GELU: 0.5 z (1 + tanh(u)), u = sqrt(2 / pi) (z + 0.044715 z^3)
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    t = 2.0 * tl.sigmoid(2.0 * u) - 1.0  # tanh(u), from sigmoid for portability across triton versions
    du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
    return 0.5 * z * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du


@triton.jit
def _tile(X, B, stride_x, M, N, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """This program's rows, columns, mask, pre-activation z = x + b and dropout scale (0 where dropped)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    z = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    scale = tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32)
    if HAS_DROPOUT:
        keep = tl.rand(seed, rows[:, None] * N + cols[None, :]) >= dropout_p
        scale = tl.where(keep, 1.0 / (1.0 - dropout_p), 0.0)
    return rows, cols, mask, z, scale


@triton.jit
def _bias_activation_forward_kernel(X, B, Y, stride_x, M, N, dropout_p, seed,
                                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACTIVATION: tl.constexpr,
                                    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    rows, cols, mask, z, scale = _tile(X, B, stride_x, M, N, dropout_p, seed, BLOCK_M, BLOCK_N, HAS_BIAS,
                                       HAS_DROPOUT)
    y, _ = _activate(z, ACTIVATION)
    tl.store(Y + rows[:, None].to(tl.int64) * N + cols[None, :], (y * scale).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_activation_backward_kernel(DY, X, B, DX, DB_PARTIAL, stride_dy, stride_x, M, N, dropout_p, seed,
                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACTIVATION: tl.constexpr,
                                     HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    rows, cols, mask, z, scale = _tile(X, B, stride_x, M, N, dropout_p, seed, BLOCK_M, BLOCK_N, HAS_BIAS,
                                       HAS_DROPOUT)
    _, slope = _activate(z, ACTIVATION)
    dy = tl.load(DY + rows[:, None].to(tl.int64) * stride_dy + cols[None, :], mask=mask, other=0.0)
    dz = tl.where(mask, dy.to(tl.float32) * scale * slope, 0.0)
    tl.store(DX + rows[:, None].to(tl.int64) * N + cols[None, :], dz.to(DX.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + tl.program_id(0) * N + cols, tl.sum(dz, axis=0), mask=cols < N)


def _rows(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(kernel, a, *tensors):
    m, n = a.x.shape
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    seed = int(a.dropout_seed) if a.dropout_p > 0 else 0
    kernel[grid](*tensors, m, n, a.dropout_p, seed, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                 ACTIVATION=ACTIVATIONS[a.activation], HAS_BIAS=a.bias is not None, HAS_DROPOUT=a.dropout_p > 0)


def bias_activation_forward(a):
    x = _rows(a.x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        _launch(_bias_activation_forward_kernel, a, x, x if a.bias is None else a.bias, y, x.stride(0))
    return y


def bias_activation_backward(dy, a):
    dy, x = _rows(dy), _rows(a.x)
    m, n = x.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    partial = torch.zeros((triton.cdiv(m, BLOCK_M) if a.bias is not None else 0, n), dtype=torch.float32,
                          device=x.device)
    if x.numel():
        _launch(_bias_activation_backward_kernel, a, dy, x, x if a.bias is None else a.bias, dx, partial,
                dy.stride(0), x.stride(0))
    return dx, partial.sum(dim=0) if a.bias is not None else partial.new_empty(0)
