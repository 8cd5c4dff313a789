"""Residual-add + LayerNorm in Triton: forward and backward (contract: fastenc/ops/layer_norm.py).

One program normalises one row. A row that fits is held in registers (BLOCK_N = next power of two >= N), so x is
read once and written once; a wider one (up to 65536) is split into chunks and read twice, its statistics merged
chunk by chunk. Statistics are kept in float32 (float64 for float64 input). The backward gives each program a
contiguous group of rows: dx row by row, and the row-sums of dweight / dbias accumulated in registers and written
once per program (per chunk for split rows), then reduced over programs by torch (deterministic: no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastenc.ops import accumulation_dtype


@triton.jit
def _summed_chunk(X, R, row, stride_x, stride_r, cols, mask, acc_t: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """x (+ residual, rounded to the input dtype as torch's `x + residual` is) at cols of the row, in acc_t."""
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(acc_t)
    if HAS_RESIDUAL:
        x += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(acc_t)
        x = x.to(X.dtype.element_ty).to(acc_t)
    return x


@triton.jit
def _affine(y, W, B, cols, mask, acc_t: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    if HAS_WEIGHT:
        y *= tl.load(W + cols, mask=mask, other=0.0).to(acc_t)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(acc_t)
    return y


@triton.jit
def _layer_norm_forward_kernel(
    X, R, W, B, Y, S, Mean, Rstd,
    stride_x, stride_r, N, eps,
    BLOCK_N: tl.constexpr, SPLIT_ROW: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, STORE_SUM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    acc_t = Mean.dtype.element_ty
    if not SPLIT_ROW:  # the whole row in registers: read once
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        x = _summed_chunk(X, R, row, stride_x, stride_r, cols, mask, acc_t, HAS_RESIDUAL)
        if STORE_SUM:
            tl.store(S + row * N + cols, x.to(S.dtype.element_ty), mask=mask)
        mean = tl.sum(x, axis=0) / N
        centred = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / N + eps)
        y = _affine(centred * rstd, W, B, cols, mask, acc_t, HAS_WEIGHT, HAS_BIAS)
        tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # The row in BLOCK_N chunks, read twice. First the mean and M2 (sum of squared deviations) of each chunk,
        # merged into the row's by Chan's formula: as exact as a two-pass variance, without a third read.
        mean = tl.zeros((1,), dtype=acc_t)
        m2 = tl.zeros((1,), dtype=acc_t)
        seen = tl.zeros((1,), dtype=acc_t)  # columns merged so far
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = _summed_chunk(X, R, row, stride_x, stride_r, cols, mask, acc_t, HAS_RESIDUAL)
            if STORE_SUM:
                tl.store(S + row * N + cols, x.to(S.dtype.element_ty), mask=mask)
            count = tl.minimum(N - start, BLOCK_N).to(acc_t)
            chunk_mean = tl.sum(x, axis=0) / count
            deviation = tl.where(mask, x - chunk_mean, 0.0)
            delta = chunk_mean - mean
            total = seen + count
            mean += delta * (count / total)
            m2 += tl.sum(deviation * deviation, axis=0) + delta * delta * (seen * count / total)
            seen = total
        rstd = 1.0 / tl.sqrt(m2 / N + eps)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = _summed_chunk(X, R, row, stride_x, stride_r, cols, mask, acc_t, HAS_RESIDUAL)
            y = _affine((x - mean) * rstd, W, B, cols, mask, acc_t, HAS_WEIGHT, HAS_BIAS)
            tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)
        mean = tl.sum(mean, axis=0)
        rstd = tl.sum(rstd, axis=0)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _gradient_chunk(DY, XS, W, row, in_row, cols, mask, mean, rstd, stride_dy, stride_xs, acc_t: tl.constexpr,
                    HAS_WEIGHT: tl.constexpr):
    """(xhat, dy, g = dy * weight) at cols of the row, 0 outside it."""
    xs = tl.load(XS + row * stride_xs + cols, mask=in_row, other=0.0).to(acc_t)
    dy = tl.load(DY + row * stride_dy + cols, mask=in_row, other=0.0).to(acc_t)
    xhat = tl.where(in_row, (xs - mean) * rstd, 0.0)
    g = dy
    if HAS_WEIGHT:
        g = dy * tl.load(W + cols, mask=mask, other=0.0).to(acc_t)
    return xhat, dy, g


@triton.jit
def _store_dx(DX, DS, row, in_row, cols, g, xhat, mean_g, mean_gx, rstd, stride_ds, N, acc_t: tl.constexpr,
              HAS_DSUM: tl.constexpr):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) at cols of the row (+ the sum's own gradient)."""
    dx = (g - mean_g - xhat * mean_gx) * rstd
    if HAS_DSUM:
        dx += tl.load(DS + row * stride_ds + cols, mask=in_row, other=0.0).to(acc_t)
    tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=in_row)


@triton.jit
def _store_partials(DW_PARTIAL, DB_PARTIAL, program, N, cols, mask, dw, db, HAS_WEIGHT: tl.constexpr,
                    HAS_BIAS: tl.constexpr):
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + program * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + program * N + cols, db, mask=mask)


@triton.jit
def _layer_norm_backward_kernel(
    DY, DS, XS, W, Mean, Rstd, DX, DW_PARTIAL, DB_PARTIAL, ROW_SUMS,
    stride_dy, stride_ds, stride_xs, M, N, rows_per_program,
    BLOCK_N: tl.constexpr, SPLIT_ROW: tl.constexpr, HAS_DSUM: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    # g = dy * weight; dx needs mean(g) and mean(g * xhat) along the row (_store_dx).
    program = tl.program_id(0)
    acc_t = Mean.dtype.element_ty
    first = program.to(tl.int64) * rows_per_program
    if not SPLIT_ROW:  # the whole row in registers: dweight / dbias of the program's rows summed there too
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        dw = tl.zeros((BLOCK_N,), dtype=acc_t)
        db = tl.zeros((BLOCK_N,), dtype=acc_t)
        for i in range(0, rows_per_program):
            row = first + i
            in_row = mask & (row < M)  # the last program's group may run past M
            mean = tl.load(Mean + row, mask=row < M, other=0.0)
            rstd = tl.load(Rstd + row, mask=row < M, other=0.0)
            xhat, dy, g = _gradient_chunk(DY, XS, W, row, in_row, cols, mask, mean, rstd, stride_dy, stride_xs,
                                          acc_t, HAS_WEIGHT)
            _store_dx(DX, DS, row, in_row, cols, g, xhat, tl.sum(g, axis=0) / N, tl.sum(g * xhat, axis=0) / N,
                      rstd, stride_ds, N, acc_t, HAS_DSUM)
            dw += dy * xhat
            db += dy
        _store_partials(DW_PARTIAL, DB_PARTIAL, program, N, cols, mask, dw, db, HAS_WEIGHT, HAS_BIAS)
    else:
        # The rows in BLOCK_N chunks, in two sweeps over the program's rows: each row's sum(g) and sum(g * xhat)
        # into ROW_SUMS, then chunk by chunk dx of every row and the chunk's dweight / dbias, summed in registers.
        for i in range(0, rows_per_program):
            row = first + i
            mean = tl.load(Mean + row, mask=row < M, other=0.0)
            rstd = tl.load(Rstd + row, mask=row < M, other=0.0)
            sum_g = tl.zeros((BLOCK_N,), dtype=acc_t)
            sum_gx = tl.zeros((BLOCK_N,), dtype=acc_t)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                xhat, dy, g = _gradient_chunk(DY, XS, W, row, mask & (row < M), cols, mask, mean, rstd, stride_dy,
                                              stride_xs, acc_t, HAS_WEIGHT)
                sum_g += g
                sum_gx += g * xhat
            tl.store(ROW_SUMS + 2 * row, tl.sum(sum_g, axis=0), mask=row < M)
            tl.store(ROW_SUMS + 2 * row + 1, tl.sum(sum_gx, axis=0), mask=row < M)
        tl.debug_barrier()  # the second sweep's threads read sums that other threads stored
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            dw = tl.zeros((BLOCK_N,), dtype=acc_t)
            db = tl.zeros((BLOCK_N,), dtype=acc_t)
            for i in range(0, rows_per_program):
                row = first + i
                in_row = mask & (row < M)
                mean = tl.load(Mean + row, mask=row < M, other=0.0)
                rstd = tl.load(Rstd + row, mask=row < M, other=0.0)
                xhat, dy, g = _gradient_chunk(DY, XS, W, row, in_row, cols, mask, mean, rstd, stride_dy, stride_xs,
                                              acc_t, HAS_WEIGHT)
                mean_g = tl.load(ROW_SUMS + 2 * row, mask=row < M, other=0.0) / N
                mean_gx = tl.load(ROW_SUMS + 2 * row + 1, mask=row < M, other=0.0) / N
                _store_dx(DX, DS, row, in_row, cols, g, xhat, mean_g, mean_gx, rstd, stride_ds, N, acc_t, HAS_DSUM)
                dw += dy * xhat
                db += dy
            _store_partials(DW_PARTIAL, DB_PARTIAL, program, N, cols, mask, dw, db, HAS_WEIGHT, HAS_BIAS)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The kernels index rows by a stride and columns contiguously: keep strided rows, copy anything else."""
    return t if t.stride(-1) == 1 else t.contiguous()


# Per direction: the widest row a block keeps in registers, the chunk a wider row is read in, and the most warps a
# block gets. The backward holds about three times the forward's live values a column (x, dy, g, xhat besides the
# weight and the dweight / dbias sums), and 16 warps cap a thread at 128 registers, which its 8192-wide row
# reached: it takes 8 warps (255 registers a thread). The widths are the widest that compile for sm_90 with room
# to spare below those caps, in triton 3.6 and 3.8 (bench/results/sm90-resources.md). Float64 takes two registers
# a value: half as wide.
ROW_IN_REGISTERS = {"forward": 16384, "backward": 8192}
ROW_CHUNK = {"forward": 4096, "backward": 2048}
MAX_WARPS = {"forward": 16, "backward": 8}


def _launch_shape(n: int, backward: bool, dtype: torch.dtype) -> tuple[int, int, bool]:
    """(BLOCK_N, num_warps, SPLIT_ROW): the whole row in one block up to ROW_IN_REGISTERS, else ROW_CHUNK-wide
    chunks (read twice); about 8 elements a thread, more once the warps reach MAX_WARPS. Untuned: no GPU has timed
    these yet."""
    direction = "backward" if backward else "forward"
    values = 2 if dtype == torch.float64 else 1  # registers a value
    block = triton.next_power_of_2(n)
    split = block * values > ROW_IN_REGISTERS[direction]
    if split:
        block = ROW_CHUNK[direction] // values
    return block, min(max(block // 256, 1), MAX_WARPS[direction]), split


def layer_norm_forward(a):
    x, residual, weight, bias, eps, store_sum = a
    rows, n = x.shape
    x = _rows(x)
    stats = accumulation_dtype(x.dtype)
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    store = store_sum and residual is not None
    summed = torch.empty_like(y) if store else x.new_empty(0)
    mean = torch.empty(rows, dtype=stats, device=x.device)
    rstd = torch.empty(rows, dtype=stats, device=x.device)
    if rows == 0:
        return y, summed, mean, rstd
    block, warps, split = _launch_shape(n, False, x.dtype)
    has_residual = residual is not None
    residual = _rows(residual) if has_residual else x  # unused pointers point at x
    _layer_norm_forward_kernel[(rows,)](
        x, residual, x if weight is None else weight, x if bias is None else bias, y, summed if store else y,
        mean, rstd, x.stride(0), residual.stride(0), n, eps,
        BLOCK_N=block, SPLIT_ROW=split, HAS_RESIDUAL=has_residual, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, STORE_SUM=store, num_warps=warps,
    )
    return y, summed, mean, rstd


def _program_count(rows: int, device: torch.device) -> int:
    """Enough programs to fill the GPU a few times over; few on the CPU interpreter, which runs them one by one."""
    if device.type == "cuda":
        return min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(rows, 4)


def layer_norm_backward(b):
    dy, dsum, xs, weight, mean, rstd, has_bias = b
    rows, n = xs.shape
    dy, xs = _rows(dy), _rows(xs)
    dx = torch.empty((rows, n), dtype=xs.dtype, device=xs.device)
    if rows == 0:
        return dx, mean.new_zeros(n if weight is not None else 0), mean.new_zeros(n if has_bias else 0)
    block, warps, split = _launch_shape(n, True, xs.dtype)
    programs = _program_count(rows, xs.device)
    rows_per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_program)
    partial_dw = torch.empty((programs, n if weight is not None else 0), dtype=mean.dtype, device=xs.device)
    partial_db = torch.empty((programs, n if has_bias else 0), dtype=mean.dtype, device=xs.device)
    row_sums = torch.empty((rows, 2) if split else 0, dtype=mean.dtype, device=xs.device)
    has_dsum = dsum is not None
    dsum = _rows(dsum) if has_dsum else dy
    _layer_norm_backward_kernel[(programs,)](
        dy, dsum, xs, xs if weight is None else weight, mean, rstd, dx, partial_dw, partial_db, row_sums,
        dy.stride(0), dsum.stride(0), xs.stride(0), rows, n, rows_per_program,
        BLOCK_N=block, SPLIT_ROW=split, HAS_DSUM=has_dsum, HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias,
        num_warps=warps,
    )
    return dx, partial_dw.sum(dim=0), partial_db.sum(dim=0)
