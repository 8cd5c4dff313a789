"""Attention in plain PyTorch: materialised scores, float32 accumulation (float64 for float64 input).

Conventions shared with the kernels (contract and arguments: fastenc/ops/attention.py):
- bias: an additive float mask broadcastable to (B, H, S_q, S_k); key_padding_mask: (B, S_k) bool, True = ignore;
  causal: query i sees keys j <= i (top-left aligned when S_q != S_k, as scaled_dot_product_attention).
- A query row with every key masked gives output 0 and log-sum-exp +inf (so its recomputed probabilities are 0).
- Dropout keeps an element with probability 1 - p and scales kept ones by 1 / (1 - p). This reference draws its
  own mask from `dropout_seed`; the kernels draw theirs from a counter-based generator, so the two agree in
  distribution, not element by element (tests compare them through `attention_math` with the kernel's mask).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastenc.ops import accumulation_dtype


def _probabilities(q, k, bias, key_padding_mask, is_causal, scale) -> tuple[Tensor, Tensor]:
    """Softmax probabilities (B, H, S_q, S_k) in the compute dtype, and the log-sum-exp (B, H, S_q)."""
    acc = accumulation_dtype(q.dtype)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias.to(acc)
    s_q, s_k = scores.shape[-2:]
    masked = torch.zeros((1, 1, s_q, s_k), dtype=torch.bool, device=q.device)
    if is_causal:
        masked = masked | torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).triu(1)
    if key_padding_mask is not None:
        masked = masked | key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(masked, -math.inf)
    if s_k == 0:  # no keys at all: every row is fully masked
        return scores, torch.full(scores.shape[:-1], math.inf, dtype=acc, device=q.device)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max).detach()
    p = torch.exp(scores - row_max)
    total = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(total == 0, torch.ones_like(total), total)
    lse = torch.where(total == 0, math.inf, row_max + torch.log(total)).squeeze(-1)
    return p, lse.detach()


def attention_math(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    keep: Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Differentiable attention of (B, H, S, D) tensors: (output in q.dtype, lse (B, H, S_q) in float32 or 64).

    `keep` (bool, broadcastable to (B, H, S_q, S_k)) is the dropout mask, applied with scale 1 / (1 - dropout_p).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p, lse = _probabilities(q, k, bias, key_padding_mask, is_causal, scale)
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    return torch.matmul(p, v.to(p.dtype)).to(q.dtype), lse


def _attention_grads(dout, q, k, v, bias, key_padding_mask, is_causal, scale, keep, dropout_p):
    """(dq, dk, dv, dS) of attention_math, written out: the oracle for the kernels' backward. dS, the scores'
    gradient, is also the additive bias's."""
    p, _ = _probabilities(q, k, bias, key_padding_mask, is_causal, scale)
    acc = p.dtype
    dout = dout.to(acc)
    p_kept = p if keep is None else p * keep / (1.0 - dropout_p)
    dv = torch.matmul(p_kept.transpose(-2, -1), dout)
    dp = torch.matmul(dout, v.to(acc).transpose(-2, -1))
    if keep is not None:
        dp = dp * keep / (1.0 - dropout_p)
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
    dq = torch.matmul(ds, k.to(acc)) * scale
    dk = torch.matmul(ds.transpose(-2, -1), q.to(acc)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds


def _dropout_keep(shape, dropout_p: float, seed: Tensor | None, device, offset: int = 0) -> Tensor | None:
    if dropout_p == 0.0:
        return None
    generator = torch.Generator(device=device).manual_seed(int(seed) + offset)
    return torch.rand(shape, generator=generator, device=device) >= dropout_p


def _per_sequence(fn, q_side, k_side, cu_seqlens_q, cu_seqlens_k, dropout_p, seed):
    """For each packed sequence, fn(*q_side pieces, *k_side pieces, keep) on (1, H, S, D) views of its tokens;
    returns, per output position of fn, the pieces put back in (T, H, D) order."""
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    heads, device = q_side[0].shape[1], q_side[0].device
    results = []
    for i in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
        pieces = [t[q0:q1] for t in q_side] + [t[k0:k1] for t in k_side]
        keep = _dropout_keep((1, heads, q1 - q0, k1 - k0), dropout_p, seed, device, offset=i)
        results.append(fn(*(t.transpose(0, 1).unsqueeze(0) for t in pieces), keep))
    return [torch.cat([r[j][0].transpose(0, 1) for r in results]) for j in range(len(results[0]))]


def attention_forward(a):
    if a.cu_seqlens_q is None:
        keep = _dropout_keep((*a.q.shape[:3], a.k.shape[2]), a.dropout_p, a.dropout_seed, a.q.device)
        out, lse = attention_math(a.q, a.k, a.v, a.bias, a.key_padding_mask, a.is_causal, a.scale, keep, a.dropout_p)
        return out.contiguous(), lse.contiguous()
    out, lse = _per_sequence(
        lambda q, k, v, keep: [t.unsqueeze(-1) if t.dim() == 3 else t for t in
                               attention_math(q, k, v, None, None, a.is_causal, a.scale, keep, a.dropout_p)],
        (a.q,), (a.k, a.v), a.cu_seqlens_q, a.cu_seqlens_k, a.dropout_p, a.dropout_seed,
    )
    return out.contiguous(), lse.squeeze(-1).t().contiguous()  # lse: (T, H, 1) -> (H, T)


def attention_backward(dout, out, lse, bias_grad, a):
    if a.cu_seqlens_q is None:
        keep = _dropout_keep((*a.q.shape[:3], a.k.shape[2]), a.dropout_p, a.dropout_seed, a.q.device)
        *grads, ds = _attention_grads(dout, a.q, a.k, a.v, a.bias, a.key_padding_mask, a.is_causal, a.scale, keep,
                                      a.dropout_p)
        return *(g.contiguous() for g in grads), ds.contiguous() if bias_grad else ds.new_empty(0)
    grads = _per_sequence(
        lambda dout, q, k, v, keep: _attention_grads(dout, q, k, v, None, None, a.is_causal, a.scale, keep,
                                                     a.dropout_p)[:3],
        (dout, a.q), (a.k, a.v), a.cu_seqlens_q, a.cu_seqlens_k, a.dropout_p, a.dropout_seed,
    )
    return *(g.contiguous() for g in grads), grads[0].new_empty(0, dtype=accumulation_dtype(a.q.dtype))
