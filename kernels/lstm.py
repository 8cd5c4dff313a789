"""One LSTM layer in one direction in Triton: a fused cell per time step, forward and backward, in two forms.

Contract: fastenc/ops/lstm.py. The input projection for all steps is one GEMM done first, in torch (gates_x); what
is left is inherently sequential. Per step, over (batch tile x hidden tile) tiles:
  forward   gates = gates_x[t] + h_{t-1} @ W_hh^T; i, f, g, o; c_t = f c_{t-1} + i g; h_t = o tanh(c_t)
            A tile holds the four gate slices of its hidden units, so the recurrent product, the nonlinearities
            and the cell update never leave the chip. With a projection the cell writes r_t = o tanh(c_t) and a
            second pass forms h_t = r_t @ W_hr^T (every h_t column needs every r_t column, which a hidden tile does
            not have).
  backward  dh_t = dout_t + da_{t+1} @ W_hh (or dh_n for a row whose last step this is), then the gate
            gradients da_t and the cell chain dc_{t-1} = dc_t f_t in the same tile. The weight gradients and dx are
            one GEMM each over all steps afterwards (torch), from x, the saved h_{t-1} rows and da.
Nothing is carried from step to step in registers: a step reads h_{t-1} from the previous step's output rows (or
h0 for rows that were not active then) and c_{t-1} from the saved cell states. Math in float32; h is stored in the
input dtype (the next step's dot reads it so), gates and c in float32 for the backward.
The two forms run the same tile functions:
  per step    the launcher walks the steps and launches one kernel per step (two with a projection), a program
              per tile: all the parallelism of a step, a launch per step.
  persistent  one launch; a program owns a batch tile for the whole sequence and loops over steps and tiles
              itself (see the persistent kernels). The default for small batches and a W_hh that fits on chip.
Block sizes and the choice between the forms are untuned guesses: no GPU has measured these kernels yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastenc.ops.lstm_plan import row_maps, schedule


@triton.jit
def _tanh(x):
    # tl has no portable tanh across triton 3.6-3.9 and the interpreter; 2 sigmoid(2x) - 1 is exact to ~1 ulp of 1.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _rows_times(A, a_row0, stride_a, n_a, M, stride_mk, stride_mn, col0, rows, cols, n_cols, K,
                BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """A[a_row0 + rows, :K] @ M[:K, col0 + cols] as a float32 (BLOCK_B, BLOCK_N) tile; rows >= n_a count as 0.
    M's strides are free, so W and W^T are both read in place."""
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    a_rows = (a_row0 + rows).to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(A + a_rows[:, None] * stride_a + ks[None, :], mask=(rows[:, None] < n_a) & (ks[None, :] < K),
                    other=0.0)
        m = tl.load(M + ks[:, None] * stride_mk + (col0 + cols[None, :]) * stride_mn,
                    mask=(ks[:, None] < K) & (cols[None, :] < n_cols), other=0.0)
        acc += tl.dot(a, m.to(a.dtype), input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _preactivation(gate, GX, HP, H0W, W, off, off_prev, n_prev, rows, cols, mask, H, P, stride_wk, stride_wn,
                   BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """gates_x[t] + h_{t-1} @ W_hh^T for one gate's slice of the hidden tile. Rows that start from h0 take the
    precomputed h0 @ W_hh^T instead of a dot."""
    acc = _rows_times(HP, off_prev, P, n_prev, W, stride_wk, stride_wn, gate * H, rows, cols, H, P,
                      BLOCK_B, BLOCK_H, BLOCK_K, DOT_PRECISION)
    from_prev = rows[:, None] < n_prev
    g_cols = gate * H + cols[None, :]
    initial = tl.load(H0W + rows[:, None] * 4 * H + g_cols, mask=mask & ~from_prev, other=0.0)
    gx = tl.load(GX + (off + rows[:, None]).to(tl.int64) * 4 * H + g_cols, mask=mask, other=0.0)
    return tl.where(from_prev, acc, initial) + gx.to(tl.float32)


@triton.jit
def _forward_cell_tile(GX, HP, H0W, W, C0, GATES, CS, Y, off, n, off_prev, n_prev, H, P, stride_wk, stride_wn,
                       rows, cols, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """One step of the forward for the (rows x hidden cols) tile: the four gates' products, the cell, the stores."""
    mask = (rows[:, None] < n) & (cols[None, :] < H)
    i = tl.sigmoid(_preactivation(0, GX, HP, H0W, W, off, off_prev, n_prev, rows, cols, mask, H, P, stride_wk,
                                  stride_wn, BLOCK_B, BLOCK_H, BLOCK_K, DOT_PRECISION))
    f = tl.sigmoid(_preactivation(1, GX, HP, H0W, W, off, off_prev, n_prev, rows, cols, mask, H, P, stride_wk,
                                  stride_wn, BLOCK_B, BLOCK_H, BLOCK_K, DOT_PRECISION))
    g = _tanh(_preactivation(2, GX, HP, H0W, W, off, off_prev, n_prev, rows, cols, mask, H, P, stride_wk,
                             stride_wn, BLOCK_B, BLOCK_H, BLOCK_K, DOT_PRECISION))
    o = tl.sigmoid(_preactivation(3, GX, HP, H0W, W, off, off_prev, n_prev, rows, cols, mask, H, P, stride_wk,
                                  stride_wn, BLOCK_B, BLOCK_H, BLOCK_K, DOT_PRECISION))
    from_prev = rows[:, None] < n_prev
    c_prev = tl.where(
        from_prev,
        tl.load(CS + (off_prev + rows[:, None]).to(tl.int64) * H + cols[None, :], mask=mask & from_prev, other=0.0),
        tl.load(C0 + rows[:, None] * H + cols[None, :], mask=mask & ~from_prev, other=0.0).to(tl.float32),
    )
    c = f * c_prev + i * g
    here = (off + rows[:, None]).to(tl.int64)
    tl.store(GATES + here * 4 * H + cols[None, :], i, mask=mask)
    tl.store(GATES + here * 4 * H + H + cols[None, :], f, mask=mask)
    tl.store(GATES + here * 4 * H + 2 * H + cols[None, :], g, mask=mask)
    tl.store(GATES + here * 4 * H + 3 * H + cols[None, :], o, mask=mask)
    tl.store(CS + here * H + cols[None, :], c, mask=mask)
    tl.store(Y + here * H + cols[None, :], (o * _tanh(c)).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _lstm_forward_cell_kernel(
    GX, HP, H0W, W, C0, GATES, CS, Y,
    off, n, off_prev, n_prev, H, P, stride_wk, stride_wn,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    _forward_cell_tile(GX, HP, H0W, W, C0, GATES, CS, Y, off, n, off_prev, n_prev, H, P, stride_wk, stride_wn,
                       rows, cols, BLOCK_B, BLOCK_H, BLOCK_K, DOT_PRECISION)


@triton.jit
def _rows_times_tile(A, M, ALT, ADD, OUT, a_off, n_a, off, n, K, N_COLS, stride_a, stride_mk, stride_mn, rows, cols,
                     HAS_ALT: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """OUT[off + rows] = ADD[off + rows] + (A[a_off + rows] @ M where rows < n_a, else ALT[rows]), rows < n: the
    projection h_t = r_t @ W_hr^T, and with a projection the backward's dh_t = dout_t + da_{t+1} @ W_hh."""
    mask = (rows[:, None] < n) & (cols[None, :] < N_COLS)
    acc = _rows_times(A, a_off, stride_a, n_a, M, stride_mk, stride_mn, 0, rows, cols, N_COLS, K,
                      BLOCK_B, BLOCK_N, BLOCK_K, DOT_PRECISION)
    if HAS_ALT:
        alt = tl.load(ALT + rows[:, None] * N_COLS + cols[None, :], mask=mask & (rows[:, None] >= n_a), other=0.0)
        acc = tl.where(rows[:, None] < n_a, acc, alt.to(tl.float32))
    here = (off + rows[:, None]).to(tl.int64) * N_COLS + cols[None, :]
    if HAS_ADD:
        acc += tl.load(ADD + here, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + here, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rows_times_kernel(
    A, M, ALT, ADD, OUT,
    a_off, n_a, off, n, K, N_COLS, stride_a, stride_mk, stride_mn,
    HAS_ALT: tl.constexpr, HAS_ADD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    _rows_times_tile(A, M, ALT, ADD, OUT, a_off, n_a, off, n, K, N_COLS, stride_a, stride_mk, stride_mn, rows, cols,
                     HAS_ALT, HAS_ADD, BLOCK_B, BLOCK_N, BLOCK_K, DOT_PRECISION)


@triton.jit
def _backward_cell_tile(A, M, ALT, DOUT, GATES, CS, C0, DC, DGX, off, n, off_prev, n_prev, a_off, n_a, K, H,
                        stride_a, stride_mk, stride_mn, rows, cols, HAS_ALT: tl.constexpr, HAS_DOUT: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """One step of BPTT for a (batch tile x hidden tile). dr, the gradient of o tanh(c), is
    dout_t + (da_{t+1} @ W_hh or dh_n) without a projection, and dh_t @ W_hr with one (dh_t from _rows_times_tile);
    either way it is `A @ M` with the rows >= n_a taken from ALT, plus DOUT."""
    mask = (rows[:, None] < n) & (cols[None, :] < H)
    dr = _rows_times(A, a_off, stride_a, n_a, M, stride_mk, stride_mn, 0, rows, cols, H, K,
                     BLOCK_B, BLOCK_H, BLOCK_K, DOT_PRECISION)
    if HAS_ALT:
        alt = tl.load(ALT + rows[:, None] * H + cols[None, :], mask=mask & (rows[:, None] >= n_a), other=0.0)
        dr = tl.where(rows[:, None] < n_a, dr, alt.to(tl.float32))
    here = (off + rows[:, None]).to(tl.int64)
    if HAS_DOUT:
        dr += tl.load(DOUT + here * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    i = tl.load(GATES + here * 4 * H + cols[None, :], mask=mask, other=0.0)
    f = tl.load(GATES + here * 4 * H + H + cols[None, :], mask=mask, other=0.0)
    g = tl.load(GATES + here * 4 * H + 2 * H + cols[None, :], mask=mask, other=0.0)
    o = tl.load(GATES + here * 4 * H + 3 * H + cols[None, :], mask=mask, other=0.0)
    tc = _tanh(tl.load(CS + here * H + cols[None, :], mask=mask, other=0.0))
    from_prev = rows[:, None] < n_prev
    c_prev = tl.where(
        from_prev,
        tl.load(CS + (off_prev + rows[:, None]).to(tl.int64) * H + cols[None, :], mask=mask & from_prev, other=0.0),
        tl.load(C0 + rows[:, None] * H + cols[None, :], mask=mask & ~from_prev, other=0.0).to(tl.float32),
    )
    # DC holds each row's running dL/dc: dh_n's partner dc_n at first, then dc_{t} f_{t} from the step after.
    state = rows[:, None] * H + cols[None, :]
    dc = tl.load(DC + state, mask=mask, other=0.0) + dr * o * (1.0 - tc * tc)
    out_t = DGX.dtype.element_ty
    tl.store(DGX + here * 4 * H + cols[None, :], (dc * g * i * (1.0 - i)).to(out_t), mask=mask)
    tl.store(DGX + here * 4 * H + H + cols[None, :], (dc * c_prev * f * (1.0 - f)).to(out_t), mask=mask)
    tl.store(DGX + here * 4 * H + 2 * H + cols[None, :], (dc * i * (1.0 - g * g)).to(out_t), mask=mask)
    tl.store(DGX + here * 4 * H + 3 * H + cols[None, :], (dr * tc * o * (1.0 - o)).to(out_t), mask=mask)
    tl.store(DC + state, dc * f, mask=mask)


@triton.jit
def _lstm_backward_cell_kernel(
    A, M, ALT, DOUT, GATES, CS, C0, DC, DGX,
    off, n, off_prev, n_prev, a_off, n_a, K, H, stride_a, stride_mk, stride_mn,
    HAS_ALT: tl.constexpr, HAS_DOUT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    _backward_cell_tile(A, M, ALT, DOUT, GATES, CS, C0, DC, DGX, off, n, off_prev, n_prev, a_off, n_a, K, H,
                        stride_a, stride_mk, stride_mn, rows, cols, HAS_ALT, HAS_DOUT, BLOCK_B, BLOCK_H, BLOCK_K,
                        DOT_PRECISION)


# ---- persistent kernels: the whole time loop in one launch ------------------------------------------------------
# A program owns one batch tile for the whole sequence and computes every column of every step itself, so a step
# reads only rows that this program wrote at the step before: programs never wait on each other, and a barrier of
# the program's own threads between steps (the next step reads what other threads of it stored) is the only
# synchronisation. What it buys is no launch per step (two with a projection); what it costs is parallelism (one
# program per batch tile) and W_hh read again every step (from the SM's L1 where it fits there).

@triton.jit
def _step(PLAN, s):
    """Row s of the plan: offset, rows; previous step's offset, rows; next step's offset, rows."""
    row = PLAN + s * 6
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4), tl.load(row + 5)


@triton.jit
def _lstm_forward_persistent_kernel(
    PLAN, steps, GX, OUT, H0W, W, C0, GATES, CS, Y, W_HR, H, P, stride_wk, stride_wn,
    HAS_PROJ: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_KR: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    for s in range(steps):
        off, n, off_prev, n_prev, off_next, n_next = _step(PLAN, s)
        for col0 in range(0, H, BLOCK_H):
            _forward_cell_tile(GX, OUT, H0W, W, C0, GATES, CS, Y, off, n, off_prev, n_prev, H, P, stride_wk,
                               stride_wn, rows, col0 + tl.arange(0, BLOCK_H), BLOCK_B, BLOCK_H, BLOCK_K, DOT_PRECISION)
        if HAS_PROJ:
            tl.debug_barrier()  # h_t = r_t @ W_hr^T reads every column of r_t
            for col0 in range(0, P, BLOCK_P):
                _rows_times_tile(Y, W_HR, OUT, OUT, OUT, off, n, off, n, H, P, H, 1, H, rows,
                                 col0 + tl.arange(0, BLOCK_P), False, False, BLOCK_B, BLOCK_P, BLOCK_KR, DOT_PRECISION)
        tl.debug_barrier()  # the next step reads this one's h and c rows


@triton.jit
def _lstm_backward_persistent_kernel(
    PLAN, steps, D_GX, W_HH, D_HN, D_OUT, GATES, CS, C0, DC, D_H, W_HR, H, P,
    HAS_PROJ: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_K4: tl.constexpr, BLOCK_KP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The steps of lstm_layer_backward's loop, last processed first, with the same tiles and arguments."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    for i in range(steps):
        off, n, off_prev, n_prev, off_next, n_next = _step(PLAN, steps - 1 - i)
        if HAS_PROJ:
            for col0 in range(0, P, BLOCK_P):
                _rows_times_tile(D_GX, W_HH, D_HN, D_OUT, D_H, off_next, n_next, off, n, 4 * H, P, 4 * H, P, 1, rows,
                                 col0 + tl.arange(0, BLOCK_P), True, True, BLOCK_B, BLOCK_P, BLOCK_K4, DOT_PRECISION)
            tl.debug_barrier()  # dr_t = dh_t @ W_hr reads every column of dh_t
            for col0 in range(0, H, BLOCK_H):
                _backward_cell_tile(D_H, W_HR, D_H, D_H, GATES, CS, C0, DC, D_GX, off, n, off_prev, n_prev, off, n,
                                    P, H, P, H, 1, rows, col0 + tl.arange(0, BLOCK_H), False, False, BLOCK_B, BLOCK_H,
                                    BLOCK_KP, "ieee")
        else:
            for col0 in range(0, H, BLOCK_H):
                _backward_cell_tile(D_GX, W_HH, D_HN, D_OUT, GATES, CS, C0, DC, D_GX, off, n, off_prev, n_prev,
                                    off_next, n_next, 4 * H, H, 4 * H, H, 1, rows, col0 + tl.arange(0, BLOCK_H), True,
                                    True, BLOCK_B, BLOCK_H, BLOCK_K4, DOT_PRECISION)
        tl.debug_barrier()  # the step before reads this one's d_gates rows


# ---- launchers -------------------------------------------------------------------------------------------------

def _plan(batch_sizes, steps: int, batch: int, reverse: bool) -> list[tuple[int, ...]]:
    """The op's schedule (offset, rows, previous offset, previous rows per step, in processing order) with
    the next processed step's offset and rows appended (0, 0 for the last)."""
    plan = schedule(batch_sizes, steps, batch, reverse)
    return [(*step, *(plan[k + 1][:2] if k + 1 < len(plan) else (0, 0))) for k, step in enumerate(plan)]


# The persistent kernels trade the per-step launches for parallelism and for W_hh read again every step, which is
# a good trade where a launch is most of a step: one batch tile (batch <= 16, the minimum tile) and a W_hh that
# fits on chip (128 KiB: an H100 SM has 256 KiB of L1 / shared memory; hidden 128 in 16-bit). Both bounds are
# estimates: no GPU has timed the two forms against each other yet (bench: lstm, triton on CUDA).
PERSISTENT_MAX_BATCH = 16
PERSISTENT_MAX_WEIGHT_BYTES = 128 * 1024


def _persistent_by_default(batch: int, w_hh: torch.Tensor) -> bool:
    return batch <= PERSISTENT_MAX_BATCH and w_hh.numel() * w_hh.element_size() <= PERSISTENT_MAX_WEIGHT_BYTES


def _blocks(batch: int, width: int, depth: int, precision: str) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_N, BLOCK_K): at least 16 each (tl.dot's minimum), powers of two, capped for registers. A
    float32 ("ieee") dot keeps its operand tiles in registers as float32, so its K tile is the minimum: deeper ones
    spill on sm_90 with a 64-row batch tile (bench/results/sm90-resources.md)."""
    fit = lambda v, cap: min(cap, max(16, triton.next_power_of_2(v)))  # noqa: E731
    return fit(batch, 64), fit(width, 32), fit(depth, 16 if precision == "ieee" else 64)


def _launch_options(block_b: int) -> dict:
    """num_warps and num_stages of every LSTM kernel for a batch tile: 8 warps for the 64-row tile, whose four
    gate accumulators and operands spill on 4; 2 stages, since the K loops are a few steps deep and a third
    buffer pushed the persistent forward into spilling (both on sm_90, bench/results/sm90-resources.md)."""
    return dict(num_warps=8 if block_b >= 64 else 4, num_stages=2)


def _precision(dtype: torch.dtype) -> str:
    # float32 gets full-precision dots, as torch's default matmul and LSTM; half types use tensor cores anyway.
    return "ieee" if dtype == torch.float32 else "tf32"


def lstm_layer_forward(a, persistent=None):
    """The contract's forward; persistent: the one-launch kernel (True), a launch per step (False), or the
    default for the shape (None)."""
    x, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse, _ = a
    # save=False still stores every step (the op drops the saved tensors).
    gates_x = torch.nn.functional.linear(x, w_ih, bias)  # every step's input projection, one GEMM
    hidden, proj, batch = c0.shape[1], h0.shape[1], h0.shape[0]
    lead = gates_x.shape[:-1]
    gx = gates_x.reshape(-1, 4 * hidden).contiguous()
    total = gx.shape[0]
    h0, c0, w_hh = h0.contiguous(), c0.contiguous(), w_hh.contiguous()
    out = torch.empty(total, proj, dtype=gates_x.dtype, device=gx.device)
    gates = torch.empty(total, 4 * hidden, dtype=torch.float32, device=gx.device)
    cs = torch.empty(total, hidden, dtype=torch.float32, device=gx.device)
    rs = torch.empty(0, dtype=torch.float32, device=gx.device)  # r_t, with a projection, is filled in below
    y = out  # where the cell writes o tanh(c_t): h_t itself, or r_t for the projection to read
    if w_hr is not None:
        w_hr = w_hr.contiguous()
        y = torch.empty(total, hidden, dtype=gates_x.dtype, device=gx.device)
    plan = _plan(batch_sizes, lead[0], batch, reverse)
    _, last, _ = row_maps(batch_sizes, len(plan), batch, reverse, gx.device)
    # The rows that start from h0 (all at the first step; new rows of a packed reverse pass) take this product.
    h0w = (h0.float() @ w_hh.float().t()).contiguous()
    precision = _precision(gates_x.dtype)
    block_b, block_h, block_k = _blocks(batch, hidden, proj, precision)
    _, block_p, block_kr = _blocks(batch, proj, hidden, precision)
    launch = _launch_options(block_b)
    # W_hh^T as M: M[k, j] = W_hh[j, k] (strides 1, P); W_hr^T likewise (strides 1, H).
    if _persistent_by_default(batch, w_hh) if persistent is None else persistent:
        _lstm_forward_persistent_kernel[(triton.cdiv(batch, block_b),)](
            torch.tensor(plan, dtype=torch.int32, device=gx.device), len(plan), gx, out, h0w, w_hh, c0, gates, cs, y,
            out if w_hr is None else w_hr, hidden, proj, 1, proj, HAS_PROJ=w_hr is not None,
            BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, BLOCK_P=block_p, BLOCK_KR=block_kr,
            DOT_PRECISION=precision, **launch,
        )
    else:
        for off, n, off_prev, n_prev, _, _ in plan:
            _lstm_forward_cell_kernel[(triton.cdiv(n, block_b), triton.cdiv(hidden, block_h))](
                gx, out, h0w, w_hh, c0, gates, cs, y, off, n, off_prev, n_prev, hidden, proj, 1, proj,
                BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, DOT_PRECISION=precision, **launch,
            )
            if w_hr is not None:
                _rows_times_kernel[(triton.cdiv(n, block_b), triton.cdiv(proj, block_p))](
                    y, w_hr, out, out, out, off, n, off, n, hidden, proj, hidden, 1, hidden,
                    HAS_ALT=False, HAS_ADD=False,
                    BLOCK_B=block_b, BLOCK_N=block_p, BLOCK_K=block_kr, DOT_PRECISION=precision, **launch,
                )
    if w_hr is not None:
        rs = (gates[:, 3 * hidden:] * torch.tanh(cs))  # r_t in float32 for dW_hr (y is rounded)
    h_n, c_n = out[last].to(h0.dtype), cs[last].to(c0.dtype)
    return (out.reshape(*lead, proj), h_n, c_n, gates.reshape(*lead, 4 * hidden), cs.reshape(*lead, hidden),
            rs.reshape(*lead, hidden) if w_hr is not None else rs)


def lstm_layer_backward(g, a, persistent=None):
    """The contract's backward; persistent as in lstm_layer_forward."""
    d_out, d_hn, d_cn, out, gates, cs, rs, output_mask = g
    x, h0, c0, w_ih, w_hh, _, w_hr, batch_sizes, reverse, _ = a
    hidden, proj, batch = c0.shape[1], h0.shape[1], h0.shape[0]
    lead = gates.shape[:-1]
    gates, cs = gates.reshape(-1, 4 * hidden).contiguous(), cs.reshape(-1, hidden).contiguous()
    out = out.reshape(-1, proj)
    total = gates.shape[0]
    d_out = d_out.reshape(-1, proj).contiguous()
    d_hn, c0, w_hh = d_hn.contiguous(), c0.contiguous(), w_hh.contiguous()
    dc = d_cn.float().contiguous().clone()
    d_gx = torch.empty(total, 4 * hidden, dtype=out.dtype, device=out.device)
    d_h = d_gx  # with a projection: each step's dh_t, in float32
    plan = _plan(batch_sizes, lead[0], batch, reverse)
    precision = _precision(out.dtype)
    block_b, block_h, block_k4 = _blocks(batch, hidden, 4 * hidden, precision)
    _, block_p, _ = _blocks(batch, proj, 4 * hidden, precision)
    _, _, block_kp = _blocks(batch, hidden, proj, "ieee")  # dr_t's dot runs in float32 (see below)
    launch = _launch_options(block_b)
    if w_hr is not None:
        w_hr = w_hr.contiguous()
        d_h = torch.empty(total, proj, dtype=torch.float32, device=out.device)
    if _persistent_by_default(batch, w_hh) if persistent is None else persistent:
        _lstm_backward_persistent_kernel[(triton.cdiv(batch, block_b),)](
            torch.tensor(plan, dtype=torch.int32, device=out.device), len(plan), d_gx, w_hh, d_hn, d_out, gates, cs,
            c0, dc, d_h, w_hh if w_hr is None else w_hr, hidden, proj, HAS_PROJ=w_hr is not None,
            BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_P=block_p, BLOCK_K4=block_k4, BLOCK_KP=block_kp,
            DOT_PRECISION=precision, **launch,
        )
    else:
        for off, n, off_prev, n_prev, off_next, n_next in reversed(plan):
            grid = (triton.cdiv(n, block_b), triton.cdiv(hidden, block_h))
            meta = dict(BLOCK_B=block_b, BLOCK_H=block_h, **launch)
            if w_hr is None:
                # dh_t = dout_t + da_{t+1} @ W_hh (rows active at t + 1), dh_n for the others; M = W_hh (4H, H).
                _lstm_backward_cell_kernel[grid](
                    d_gx, w_hh, d_hn, d_out, gates, cs, c0, dc, d_gx,
                    off, n, off_prev, n_prev, off_next, n_next, 4 * hidden, hidden, 4 * hidden, hidden, 1,
                    HAS_ALT=True, HAS_DOUT=True, BLOCK_K=block_k4, DOT_PRECISION=precision, **meta,
                )
            else:
                _rows_times_kernel[(triton.cdiv(n, block_b), triton.cdiv(proj, block_p))](
                    d_gx, w_hh, d_hn, d_out, d_h, off_next, n_next, off, n, 4 * hidden, proj, 4 * hidden, proj, 1,
                    HAS_ALT=True, HAS_ADD=True,
                    BLOCK_B=block_b, BLOCK_N=block_p, BLOCK_K=block_k4, DOT_PRECISION=precision, **launch,
                )
                # dr_t = dh_t @ W_hr; M = W_hr (P, H). dh_t is float32, so the dot runs in float32 (W_hr is cast).
                _lstm_backward_cell_kernel[grid](
                    d_h, w_hr, d_h, d_h, gates, cs, c0, dc, d_gx,
                    off, n, off_prev, n_prev, off, n, proj, hidden, proj, hidden, 1,
                    HAS_ALT=False, HAS_DOUT=False, BLOCK_K=block_kp, DOT_PRECISION="ieee", **meta,
                )
    first, _, previous = row_maps(batch_sizes, len(plan), batch, reverse, out.device)
    want_dx, want_dh0, want_dc0, want_dw_ih, want_dw_hh, want_d_bias, want_dw_hr = output_mask
    d_gates = d_gx.float()
    # The projection's gradients and the weights': one GEMM each over all steps.
    return (
        (d_gx @ w_ih).reshape(x.shape) if want_dx else x.new_empty(0),
        (d_gates[first] @ w_hh.float()).to(h0.dtype) if want_dh0 else h0.new_empty(0),
        dc.to(c0.dtype) if want_dc0 else c0.new_empty(0),
        d_gates.t() @ x.reshape(-1, x.shape[-1]).float() if want_dw_ih else d_gates.new_empty(0),
        d_gates.t() @ torch.cat([out, h0]).float()[previous] if want_dw_hh else d_gates.new_empty(0),
        d_gates.sum(0) if want_d_bias else d_gates.new_empty(0),
        d_h.t() @ rs.reshape(-1, hidden) if want_dw_hr and w_hr is not None else d_gates.new_empty(0),
    )
