"""Residual-add + LayerNorm in Triton: forward and backward (contract: fastenc/ops/layer_norm.py).

One program normalises one whole row held in registers (BLOCK_N = next power of two >= N, up to 65536), so x is
read once and written once; statistics are kept in float32 (float64 for float64 input). The backward gives each
program a contiguous group of rows: dx row by row, and the row-sums of dweight / dbias accumulated in registers
and written once per program, then reduced over programs by torch (deterministic: no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _layer_norm_forward_kernel(
    X, R, W, B, Y, S, Mean, Rstd,
    stride_x, stride_r, N, eps,
    BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE_SUM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    acc_t = Mean.dtype.element_ty
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(acc_t)
    if HAS_RESIDUAL:
        x += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(acc_t)
        # Round the sum to the input dtype, as torch's `x + residual` does, and normalise that value.
        x = x.to(X.dtype.element_ty).to(acc_t)
        if STORE_SUM:
            tl.store(S + row * N + cols, x.to(S.dtype.element_ty), mask=mask)
    mean = tl.sum(x, axis=0) / N
    centred = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / N + eps)
    y = centred * rstd
    if HAS_WEIGHT:
        y *= tl.load(W + cols, mask=mask, other=0.0).to(acc_t)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(acc_t)
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _layer_norm_backward_kernel(
    DY, DS, XS, W, Mean, Rstd, DX, DW_PARTIAL, DB_PARTIAL,
    stride_dy, stride_ds, stride_xs, M, N, rows_per_program,
    BLOCK_N: tl.constexpr, HAS_DSUM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    acc_t = Mean.dtype.element_ty
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(acc_t)
    dw = tl.zeros((BLOCK_N,), dtype=acc_t)
    db = tl.zeros((BLOCK_N,), dtype=acc_t)
    first = program.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program):
        row = first + i
        in_row = mask & (row < M)  # the last program's group may run past M
        mean = tl.load(Mean + row, mask=row < M, other=0.0)
        rstd = tl.load(Rstd + row, mask=row < M, other=0.0)
        xs = tl.load(XS + row * stride_xs + cols, mask=in_row, other=0.0).to(acc_t)
        dy = tl.load(DY + row * stride_dy + cols, mask=in_row, other=0.0).to(acc_t)
        xhat = tl.where(in_row, (xs - mean) * rstd, 0.0)
        g = dy
        if HAS_WEIGHT:
            g = dy * w
        # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), the LayerNorm backward along the row.
        dx = (g - tl.sum(g, axis=0) / N - xhat * (tl.sum(g * xhat, axis=0) / N)) * rstd
        if HAS_DSUM:
            dx += tl.load(DS + row * stride_ds + cols, mask=in_row, other=0.0).to(acc_t)
        tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=in_row)
        dw += dy * xhat
        db += dy
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + program * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + program * N + cols, db, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The kernels index rows by a stride and columns contiguously: keep strided rows, copy anything else."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_shape(n: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps): the whole row in one block, about 8-16 elements per thread, at most 16 warps.
    Untuned: no GPU has measured these yet."""
    block = triton.next_power_of_2(n)
    return block, min(max(block // 256, 1), 16)


def layer_norm_forward(x, residual, weight, bias, eps, store_sum):
    rows, n = x.shape
    x = _rows(x)
    stats = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    store = store_sum and residual is not None
    summed = torch.empty_like(y) if store else x.new_empty(0)
    mean = torch.empty(rows, dtype=stats, device=x.device)
    rstd = torch.empty(rows, dtype=stats, device=x.device)
    if rows == 0:
        return y, summed, mean, rstd
    block, warps = _launch_shape(n)
    has_residual = residual is not None
    residual = _rows(residual) if has_residual else x  # unused pointers point at x
    _layer_norm_forward_kernel[(rows,)](
        x, residual, x if weight is None else weight, x if bias is None else bias, y, summed if store else y,
        mean, rstd, x.stride(0), residual.stride(0), n, eps,
        BLOCK_N=block, HAS_RESIDUAL=has_residual, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        STORE_SUM=store, num_warps=warps,
    )
    return y, summed, mean, rstd


def _program_count(rows: int, device: torch.device) -> int:
    """Enough programs to fill the GPU a few times over; few on the CPU interpreter, which runs them one by one."""
    if device.type == "cuda":
        return min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(rows, 4)


def layer_norm_backward(dy, dsum, xs, weight, mean, rstd, has_bias):
    rows, n = xs.shape
    dy, xs = _rows(dy), _rows(xs)
    dx = torch.empty((rows, n), dtype=xs.dtype, device=xs.device)
    if rows == 0:
        return dx, mean.new_zeros(n if weight is not None else 0), mean.new_zeros(n if has_bias else 0)
    block, warps = _launch_shape(n)
    programs = _program_count(rows, xs.device)
    rows_per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_program)
    partial_dw = torch.empty((programs, n if weight is not None else 0), dtype=mean.dtype, device=xs.device)
    partial_db = torch.empty((programs, n if has_bias else 0), dtype=mean.dtype, device=xs.device)
    has_dsum = dsum is not None
    dsum = _rows(dsum) if has_dsum else dy
    _layer_norm_backward_kernel[(programs,)](
        dy, dsum, xs, xs if weight is None else weight, mean, rstd, dx, partial_dw, partial_db,
        dy.stride(0), dsum.stride(0), xs.stride(0), rows, n, rows_per_program,
        BLOCK_N=block, HAS_DSUM=has_dsum, HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias,
        num_warps=warps,
    )
    return dx, partial_dw.sum(dim=0), partial_db.sum(dim=0)
