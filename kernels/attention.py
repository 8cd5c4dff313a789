"""Flash-style attention in Triton: forward and backward, masks, dropout, padded and variable-length layouts.

Contract: fastenc/ops/attention.py. One program owns a tile of BLOCK_M queries (forward, dq) or BLOCK_N keys
(dk/dv) of one (sequence, head) and streams the other side through on-chip memory; no S_q x S_k tensor is
stored. Scores are kept in log2 units (the softmax scale times log2(e) folded into one multiply) so the
exponentials are exp2; the running max and sum are float32. The backward recomputes P from the saved
log-sum-exp, with delta = rowsum(dO * O); dq and dk/dv come from two kernels, so no atomics are needed.

Layouts: padded q (B, H, S_q, D) or packed tokens (T, H, D) with cu_seqlens (then the batch stride is 0 and
each program offsets by its sequence's start). Head dims are padded to a power of two >= 16 with masked loads.

Tuning: each kernel's autotuner times the configs its prune keeps for the head dim and dtype (a compile each, per
key). FASTENC_AUTOTUNE=0 keeps only the first of them, for a correctness run on a GPU with little time.
`python -m bench --resources` compiles every config for sm_90 and reports its registers, spills and shared memory.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)
_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The tiles each kernel is tuned over: (BLOCK_M, BLOCK_N, num_warps[, num_stages]) by kernel, inputs (16-bit or
# float32), flags ("masked": any of a bias, a key padding mask, dropout or causal; "plain": none) and head dim
# (BLOCK_D up to 64, 128, 256). Each compiles for sm_90 without spilling registers, in triton 3.6 and 3.8, at its
# worst argument specialization (a sequence length that is no multiple of 16: narrower loads), and with at most
# 251 of the 255 registers a thread may have: at the cap, unrelated edits to this file (its line numbers) moved
# ptxas from no spill to spilling. See `python -m bench --resources` (bench/results/sm90-resources.md; head dim
# 256 measured in bf16 only). Both num_stages (2, 3) unless one is given.
# What the measurements rule out: with masks, 4 warps cannot hold a 128-row tile's scores, accumulator and mask
# terms, and at head dim 128 the forward and dQ kernels' score tiles (BLOCK_M x BLOCK_N) hold 4096 values at most
# (and the forward's no fewer than 64 queries: 32-query tiles spilled in the packed layout, triton 3.6);
# the dK/dV kernel keeps two (BLOCK_N x head dim) float32 accumulators besides its streamed tiles, so with masks it
# gets 8 warps only. Storing the bias gradient too ("dbias": a learned bias) costs registers: the 16-bit 32 x 32
# tile at head dim 128 spilled (triton 3.6), and so did float32's 32 x 16 tile at head dim 64 and its 8-warp 16 x 16
# at 128 (3.6 and 3.8); the "dbias" lists keep what fits (elsewhere the kernel's other lists apply).
# Float32 dots ("ieee") hold their operands in registers, so float32 gets small tiles, the same with or without
# masks; its dK/dV at head dim 128 fits only the smallest, and that one at the register cap.
# The first tile of a list is the one FASTENC_AUTOTUNE=0 runs.
_TILES = {
    ("forward", "16-bit", "plain", 64): [(128, 64, 4), (128, 64, 8), (128, 32, 4), (128, 32, 8), (64, 64, 4),
                                         (64, 64, 8), (64, 32, 4), (64, 32, 8)],
    ("forward", "16-bit", "plain", 128): [(128, 64, 8), (128, 32, 8), (64, 64, 4), (64, 64, 8), (64, 32, 4),
                                          (64, 32, 8)],
    ("forward", "16-bit", "masked", 64): [(128, 64, 8), (128, 32, 8), (64, 64, 4), (64, 64, 8), (64, 32, 4),
                                          (64, 32, 8)],
    ("forward", "16-bit", "masked", 128): [(64, 32, 8), (128, 16, 8), (64, 16, 8)],
    ("forward", "16-bit", "plain", 256): [(64, 32, 8), (32, 64, 8, 2), (32, 32, 4), (64, 16, 8)],
    ("forward", "16-bit", "masked", 256): [(32, 32, 8), (64, 16, 8)],
    ("forward", "float32", "any", 64): [(64, 32, 8), (32, 32, 8), (16, 64, 4)],
    ("forward", "float32", "any", 128): [(32, 64, 8), (16, 64, 4)],
    ("dq", "16-bit", "plain", 64): [(128, 64, 8), (128, 32, 4), (128, 32, 8), (64, 64, 4), (64, 64, 8), (64, 32, 4),
                                    (64, 32, 8)],
    ("dq", "16-bit", "plain", 128): [(128, 64, 8), (128, 32, 8), (64, 64, 4), (64, 64, 8), (64, 32, 4),
                                     (64, 32, 8)],
    ("dq", "16-bit", "masked", 64): [(128, 64, 8), (128, 32, 8), (64, 64, 4), (64, 64, 8), (64, 32, 4),
                                     (64, 32, 8)],
    ("dq", "16-bit", "masked", 128): [(128, 32, 8), (64, 32, 8)],
    ("dq", "16-bit", "plain", 256): [(64, 32, 8), (32, 64, 8), (32, 32, 4), (64, 16, 8)],
    ("dq", "16-bit", "masked", 256): [(32, 64, 8), (32, 32, 8), (64, 16, 8)],
    ("dq", "float32", "any", 64): [(64, 32, 8), (32, 32, 4), (32, 32, 8), (16, 32, 4)],
    ("dq", "float32", "any", 128): [(32, 64, 8), (32, 32, 8), (16, 32, 4)],
    ("dkdv", "16-bit", "plain", 64): [(64, 64, 4), (64, 64, 8), (32, 128, 8), (32, 64, 4), (32, 64, 8)],
    ("dkdv", "16-bit", "plain", 128): [(32, 64, 8)],
    ("dkdv", "16-bit", "masked", 64): [(32, 64, 8), (16, 128, 8), (64, 32, 8), (16, 64, 8), (32, 32, 8)],
    ("dkdv", "16-bit", "masked", 128): [(16, 64, 8), (32, 32, 8)],
    ("dkdv", "16-bit", "dbias", 128): [(16, 64, 8)],
    ("dkdv", "16-bit", "plain", 256): [(16, 32, 8), (32, 16, 8), (16, 16, 8)],
    ("dkdv", "16-bit", "masked", 256): [(16, 32, 8), (16, 16, 8)],
    ("dkdv", "float32", "any", 64): [(32, 16, 8, 2), (16, 16, 8, 2)],
    ("dkdv", "float32", "any", 128): [(16, 16, 8)],
    ("dkdv", "float32", "dbias", 64): [(16, 16, 8, 2)],
    ("dkdv", "float32", "dbias", 128): [(16, 16, 4, 1)],
}


def _configs(kernel: str) -> list:
    """The autotuner's search space: every tile of the kernel's lists, each with its num_stages; the interpreter
    cannot time configs, so it gets one small tile."""
    if _INTERPRETER:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    configs = {}
    for (name, *_), tiles in _TILES.items():
        if name != kernel:
            continue
        for m, n, warps, *stages in tiles:
            for s in stages or (2, 3):
                config = triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=s)
                configs.setdefault((m, n, warps, s), config)
    return list(configs.values())


def _autotuning() -> bool:
    """FASTENC_AUTOTUNE=0: each autotuner runs the first config its prune keeps instead of timing them all."""
    return os.environ.get("FASTENC_AUTOTUNE", "1").strip() != "0"


def _fitting(kernel: str, configs, named_args, **kwargs) -> list:
    """The autotuner's prune: the configs of the kernel's tiles for this call's inputs, flags and head dim, in the
    list's order (the first is FASTENC_AUTOTUNE=0's). Not measured, so not known to fit: heads wider than 256 (they
    take the 256 list) and float32 heads wider than 128 (the 128 list)."""
    inputs = "float32" if named_args["Q"].dtype == torch.float32 else "16-bit"
    masked = any(kwargs.get(flag) for flag in ("HAS_BIAS", "HAS_KPM", "HAS_DROPOUT", "IS_CAUSAL"))
    flags = "any" if inputs == "float32" else "masked" if masked else "plain"
    head = next((d for d in (64, 128) if kwargs["BLOCK_D"] <= d), 256)
    if kwargs.get("HAS_DBIAS") and (kernel, inputs, "dbias", head) in _TILES:
        flags = "dbias"
    order = {}
    for m, n, warps, *stages in _TILES.get((kernel, inputs, flags, head)) or _TILES[(kernel, inputs, flags, 128)]:
        for s in stages or (2, 3):
            order[(m, n, warps, s)] = len(order)
    tile = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)  # noqa: E731
    kept = sorted((c for c in configs if tile(c) in order), key=lambda c: order[tile(c)])
    return kept if _autotuning() else kept[:1]


def _tuning(kernel: str) -> dict:
    # Every flag is in the key: a config tuned without a mask must not be reused with one (it may not fit).
    key = ["BLOCK_D", "IS_CAUSAL", "HAS_BIAS", "HAS_KPM", "HAS_DROPOUT", "IS_VARLEN"]
    key += ["HAS_DBIAS"] if kernel == "dkdv" else []
    return dict(configs=_configs(kernel), key=key,
                prune_configs_by={"early_config_prune": functools.partial(_fitting, kernel)})


@triton.jit
def _sequence(Cu, b, seqlen, IS_VARLEN: tl.constexpr):
    """(first token, length) of sequence b; the start is int64 so token offsets cannot overflow."""
    # Both returns sit in branches of the constexpr if: the GPU code generator rejects a function whose returns
    # differ in type (int64 start here, int32 0 below) when one follows the other.
    if IS_VARLEN:
        start = tl.load(Cu + b).to(tl.int64)
        return start, (tl.load(Cu + b + 1) - start).to(tl.int32)
    else:
        return 0, seqlen


@triton.jit
def _scores(q, k, rows, cols, b, h, seqlen_q, seqlen_k, qk_scale, Bias, KPM,
            stride_bb, stride_bh, stride_bm, stride_bn, stride_kpm,
            HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Masked scores of a (rows x cols) tile in log2 units: -inf wherever a key may not be seen."""
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
    valid = (rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k)
    if HAS_BIAS:
        bias = tl.load(Bias + b.to(tl.int64) * stride_bb + h * stride_bh + rows[:, None].to(tl.int64) * stride_bm
                       + cols[None, :] * stride_bn, mask=valid, other=0.0)
        s += bias.to(tl.float32) * 1.4426950408889634  # log2(e): the bias is in natural-log units
    if HAS_KPM:
        padded = tl.load(KPM + b.to(tl.int64) * stride_kpm + cols, mask=cols < seqlen_k, other=1)
        valid &= (padded == 0)[None, :]
    if IS_CAUSAL:
        valid &= cols[None, :] <= rows[:, None]
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _dropout_keep(seed, bh, rows, cols, pitch, dropout_p):
    """The same counter-based mask in forward and backward: one Philox stream per (sequence, head), keyed by a
    seed drawn from the call's seed at counter bh, so that no two (seed, head) pairs share a stream (seed + bh
    would give head h + 1 under seed s the mask of head h under seed s + 1)."""
    return tl.rand(tl.randint(seed, bh), rows[:, None] * pitch + cols[None, :]) >= dropout_p


@triton.autotune(**_tuning("forward"))
@triton.jit
def _attention_forward_kernel(
    Q, K, V, Bias, KPM, CuQ, CuK, Out, Lse,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_kpm,
    H, seqlen_q, seqlen_k, head_dim, qk_scale, dropout_p, seed,
    BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_start, len_q = _sequence(CuQ, b, seqlen_q, IS_VARLEN)
    k_start, len_k = _sequence(CuK, b, seqlen_k, IS_VARLEN)
    if start_m * BLOCK_M >= len_q:
        return
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    in_d = dims < head_dim
    q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh + q_start * stride_qs
    k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh + k_start * stride_ks
    v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh + k_start * stride_vs
    q = tl.load(q_base + rows[:, None] * stride_qs + dims[None, :], mask=(rows[:, None] < len_q) & in_d[None, :],
                other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    hi = len_k
    if IS_CAUSAL:
        hi = tl.minimum(len_k, (start_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        in_k = cols < len_k
        k = tl.load(k_base + cols[None, :] * stride_ks + dims[:, None], mask=in_k[None, :] & in_d[:, None], other=0.0)
        s = _scores(q, k, rows, cols, b, h, len_q, len_k, qk_scale, Bias, KPM,
                    stride_bb, stride_bh, stride_bm, stride_bn, stride_kpm,
                    HAS_BIAS, HAS_KPM, IS_CAUSAL, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far contributes nothing
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_DROPOUT:
            p = tl.where(_dropout_keep(seed, bh, rows, cols, seqlen_k, dropout_p), p, 0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + dims[None, :], mask=in_k[:, None] & in_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # every key masked: output 0, lse +inf so the backward's recomputed P is 0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_DROPOUT:
        out = out / (1.0 - dropout_p)
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    o_base = Out + b.to(tl.int64) * stride_ob + h * stride_oh + q_start * stride_os
    tl.store(o_base + rows[:, None] * stride_os + dims[None, :], out.to(Out.dtype.element_ty),
             mask=(rows[:, None] < len_q) & in_d[None, :])
    l_base = Lse + b.to(tl.int64) * stride_lb + h * stride_lh + q_start * stride_ls
    tl.store(l_base + rows * stride_ls, lse, mask=rows < len_q)


@triton.jit
def _recompute_p(q, k, rows, cols, b, h, len_q, len_k, qk_scale, lse_log2, Bias, KPM,
                 stride_bb, stride_bh, stride_bm, stride_bn, stride_kpm,
                 HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """P of a tile, from the forward's log-sum-exp (in log2 units); +inf there (a fully masked row) gives 0."""
    s = _scores(q, k, rows, cols, b, h, len_q, len_k, qk_scale, Bias, KPM,
                stride_bb, stride_bh, stride_bm, stride_bn, stride_kpm, HAS_BIAS, HAS_KPM, IS_CAUSAL, DOT_PRECISION)
    return tl.math.exp2(s - lse_log2[:, None])


@triton.jit
def _dropped(x, seed, bh, rows, cols, pitch, dropout_p, HAS_DROPOUT: tl.constexpr):
    """x where the forward's dropout kept an element (scaled by 1 / (1 - p)), 0 where it dropped it."""
    if HAS_DROPOUT:
        x = tl.where(_dropout_keep(seed, bh, rows, cols, pitch, dropout_p), x / (1.0 - dropout_p), 0.0)
    return x


@triton.autotune(**_tuning("dkdv"))
@triton.jit
def _attention_backward_dkdv_kernel(
    Q, K, V, Bias, KPM, CuQ, CuK, DO, Lse, Delta, DK, DV, DBias,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_kpm,
    H, seqlen_q, seqlen_k, head_dim, qk_scale, sm_scale, dropout_p, seed,
    BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # DO, DK, DV share the strides of Q, K, V (the launcher makes them so); Delta shares Lse's. DBias, with
    # HAS_DBIAS: the bias's gradient, a contiguous (B, H, S_q, S_k) float32 tensor of zeros, where the tiles a
    # query sees get their dS (the bias adds to the scores).
    start_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_start, len_q = _sequence(CuQ, b, seqlen_q, IS_VARLEN)
    k_start, len_k = _sequence(CuK, b, seqlen_k, IS_VARLEN)
    if start_n * BLOCK_N >= len_k:
        return
    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    in_d = dims < head_dim
    kv_mask = (cols[:, None] < len_k) & in_d[None, :]
    k_off = b.to(tl.int64) * stride_kb + h * stride_kh + (k_start + cols[:, None].to(tl.int64)) * stride_ks
    v_off = b.to(tl.int64) * stride_vb + h * stride_vh + (k_start + cols[:, None].to(tl.int64)) * stride_vs
    k = tl.load(K + k_off + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + v_off + dims[None, :], mask=kv_mask, other=0.0)
    q_base = b.to(tl.int64) * stride_qb + h * stride_qh + q_start * stride_qs
    o_base = b.to(tl.int64) * stride_ob + h * stride_oh + q_start * stride_os
    l_base = b.to(tl.int64) * stride_lb + h * stride_lh + q_start * stride_ls

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    lo = 0
    if IS_CAUSAL:
        lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M  # queries before the tile's first key see none of it
    for start_m in range(lo, len_q, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        in_q = rows < len_q
        q = tl.load(Q + q_base + rows[:, None] * stride_qs + dims[None, :], mask=in_q[:, None] & in_d[None, :],
                    other=0.0)
        do = tl.load(DO + o_base + rows[:, None] * stride_os + dims[None, :], mask=in_q[:, None] & in_d[None, :],
                     other=0.0)
        lse = tl.load(Lse + l_base + rows * stride_ls, mask=in_q, other=float("inf")) * 1.4426950408889634
        delta = tl.load(Delta + l_base + rows * stride_ls, mask=in_q, other=0.0)
        p = _recompute_p(q, tl.trans(k), rows, cols, b, h, len_q, len_k, qk_scale, lse, Bias, KPM,
                         stride_bb, stride_bh, stride_bm, stride_bn, stride_kpm,
                         HAS_BIAS, HAS_KPM, IS_CAUSAL, DOT_PRECISION)
        p_kept = _dropped(p, seed, bh, rows, cols, seqlen_k, dropout_p, HAS_DROPOUT)
        dv += tl.dot(tl.trans(p_kept.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        dp = _dropped(dp, seed, bh, rows, cols, seqlen_k, dropout_p, HAS_DROPOUT)
        ds = p * (dp - delta[:, None])
        if HAS_DBIAS:
            db_off = (bh.to(tl.int64) * seqlen_q + rows[:, None]) * seqlen_k + cols[None, :]
            tl.store(DBias + db_off, ds, mask=in_q[:, None] & (cols[None, :] < len_k))
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    tl.store(DK + k_off + dims[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + v_off + dims[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(**_tuning("dq"))
@triton.jit
def _attention_backward_dq_kernel(
    Q, K, V, Bias, KPM, CuQ, CuK, DO, Lse, Delta, DQ,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_kpm,
    H, seqlen_q, seqlen_k, head_dim, qk_scale, sm_scale, dropout_p, seed,
    BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_start, len_q = _sequence(CuQ, b, seqlen_q, IS_VARLEN)
    k_start, len_k = _sequence(CuK, b, seqlen_k, IS_VARLEN)
    if start_m * BLOCK_M >= len_q:
        return
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_q = rows < len_q
    dims = tl.arange(0, BLOCK_D)
    in_d = dims < head_dim
    q_mask = in_q[:, None] & in_d[None, :]
    q_off = b.to(tl.int64) * stride_qb + h * stride_qh + (q_start + rows[:, None].to(tl.int64)) * stride_qs
    o_off = b.to(tl.int64) * stride_ob + h * stride_oh + (q_start + rows[:, None].to(tl.int64)) * stride_os
    l_off = b.to(tl.int64) * stride_lb + h * stride_lh + (q_start + rows.to(tl.int64)) * stride_ls
    q = tl.load(Q + q_off + dims[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + o_off + dims[None, :], mask=q_mask, other=0.0)
    lse = tl.load(Lse + l_off, mask=in_q, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + l_off, mask=in_q, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh + k_start * stride_ks
    v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh + k_start * stride_vs

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    hi = len_k
    if IS_CAUSAL:
        hi = tl.minimum(len_k, (start_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (cols[:, None] < len_k) & in_d[None, :]
        k = tl.load(k_base + cols[:, None] * stride_ks + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + dims[None, :], mask=kv_mask, other=0.0)
        p = _recompute_p(q, tl.trans(k), rows, cols, b, h, len_q, len_k, qk_scale, lse, Bias, KPM,
                         stride_bb, stride_bh, stride_bm, stride_bn, stride_kpm,
                         HAS_BIAS, HAS_KPM, IS_CAUSAL, DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        dp = _dropped(dp, seed, bh, rows, cols, seqlen_k, dropout_p, HAS_DROPOUT)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(DQ + q_off + dims[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


def _strides4(t: torch.Tensor | None, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, token) strides; packed varlen tensors (T, H, D) have no batch stride."""
    if varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def _common(a, q, key_padding_mask):
    """Arguments shared by the three kernels (after the tensors), and the grid's batch*heads extent; q and
    key_padding_mask as the launcher passes them."""
    varlen = a.cu_seqlens_q is not None
    if varlen:
        batch, heads, head_dim = a.cu_seqlens_q.numel() - 1, q.shape[1], q.shape[2]
        seqlen_q, seqlen_k = a.max_seqlen_q, a.max_seqlen_k
    else:
        batch, heads, seqlen_q, head_dim = q.shape
        seqlen_k = a.k.shape[2]
    bias_strides = a.bias.stride() if a.bias is not None else (0, 0, 0, 0)
    # The kernels read a row of the mask as contiguous bytes (the launchers pass it contiguous).
    kpm_stride = key_padding_mask.stride(0) if key_padding_mask is not None else 0
    seed = int(a.dropout_seed) if a.dropout_p > 0 else 0
    meta = dict(
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), IS_VARLEN=varlen, HAS_BIAS=a.bias is not None,
        HAS_KPM=key_padding_mask is not None, IS_CAUSAL=a.is_causal, HAS_DROPOUT=a.dropout_p > 0,
        # float32 inputs get full-precision dots (as torch's default matmul), not TF32.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return (*bias_strides, kpm_stride), (heads, seqlen_q, seqlen_k, head_dim), a.scale, seed, meta, batch * heads


def _dummy(t, like):
    return like if t is None else t


def attention_forward(a):
    varlen = a.cu_seqlens_q is not None
    key_padding_mask = None if a.key_padding_mask is None else a.key_padding_mask.contiguous()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in a[:3])
    mask_strides, sizes, scale, seed, meta, bh = _common(a, q, key_padding_mask)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[1], q.shape[0]) if varlen else q.shape[:3], dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(math.inf)
    lse_strides = (0, lse.stride(0), lse.stride(1)) if varlen else lse.stride()
    grid = lambda meta_: (triton.cdiv(sizes[1], meta_["BLOCK_M"]), bh)  # noqa: E731
    _attention_forward_kernel[grid](
        q, k, v, _dummy(a.bias, q), _dummy(key_padding_mask, q), _dummy(a.cu_seqlens_q, q),
        _dummy(a.cu_seqlens_k, q), out, lse, *_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen),
        *_strides4(out, varlen), *lse_strides, *mask_strides, *sizes, scale * LOG2E, a.dropout_p, seed, **meta,
    )
    return out, lse


def attention_backward(dout, out, lse, bias_grad, a):
    varlen = a.cu_seqlens_q is not None
    key_padding_mask = None if a.key_padding_mask is None else a.key_padding_mask.contiguous()
    q, k, v, out = (t.contiguous() for t in (*a[:3], out))
    dout = dout.contiguous()  # shares out's strides, as the kernels assume
    mask_strides, sizes, scale, seed, meta, bh = _common(a, q, key_padding_mask)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbias = q.new_zeros((*q.shape[:3], k.shape[2]) if bias_grad else 0, dtype=torch.float32)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dbias
    delta = (dout.float() * out.float()).sum(dim=-1)
    delta = delta.t().contiguous() if varlen else delta  # lse's layout: (H, T) or (B, H, S_q)
    lse_strides = (0, lse.stride(0), lse.stride(1)) if varlen else lse.stride()
    common = (
        *_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen), *_strides4(out, varlen),
        *lse_strides, *mask_strides, *sizes, scale * LOG2E, scale, a.dropout_p, seed,
    )
    masks = (_dummy(a.bias, q), _dummy(key_padding_mask, q), _dummy(a.cu_seqlens_q, q), _dummy(a.cu_seqlens_k, q))
    _attention_backward_dkdv_kernel[lambda m: (triton.cdiv(sizes[2], m["BLOCK_N"]), bh)](
        q, k, v, *masks, dout, lse, delta, dk, dv, dbias if bias_grad else dk, *common, HAS_DBIAS=bias_grad, **meta
    )
    _attention_backward_dq_kernel[lambda m: (triton.cdiv(sizes[1], m["BLOCK_M"]), bh)](
        q, k, v, *masks, dout, lse, delta, dq, *common, **meta
    )
    return dq, dk, dv, dbias
