"""Attention on torch's CPU flash kernel (what scaled_dot_product_attention runs on a CPU) and its backward;
contract: fastenc/ops/attention.py.

The padded layout is one call; the packed layout one call per sequence, on views of its tokens. A fully masked
query row comes out of torch's kernel as 0 with log-sum-exp 0; the contract's lse is +inf there, which gives the
backward the same zero probabilities. With dropout, or a bias whose gradient is wanted, the reference's math runs
(as SDPA's math path would): the backward regenerates its mask from the seed, and gives dS, which torch's kernel
cannot.
"""

from __future__ import annotations

import math

import torch

from fastenc.ops import accumulation_dtype
from fastenc.reference import attention as reference

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _mask(q, bias, key_padding_mask):
    """One additive mask in q's dtype (the kernel's), broadcastable to (B, H, S_q, S_k), or None."""
    mask = None if bias is None else bias.to(q.dtype)
    if key_padding_mask is not None:
        pad = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
        pad = pad.masked_fill_(key_padding_mask, -math.inf)[:, None, None, :]
        mask = pad if mask is None else mask + pad
    return mask


def _fully_masked(mask, bias, key_padding_mask, is_causal, s_q, s_k):
    """Bool, broadcastable to (B, H, S_q): the query rows that see no key, or None when no mask can hide one."""
    if mask is None:
        return None
    if bias is None:  # padding alone: a row sees no key when every key it may see (all, or 0..i) is padding
        if not is_causal:
            return key_padding_mask.all(-1)[:, None, None]
        padded_through = key_padding_mask.to(torch.uint8).cummin(dim=-1).values.bool()
        last_seen = torch.arange(s_q, device=mask.device).clamp(max=s_k - 1)
        return padded_through[:, None, last_seen]
    hidden = torch.isneginf(mask)
    if is_causal:
        hidden = hidden | torch.ones(s_q, s_k, dtype=torch.bool, device=mask.device).triu(1)
    return hidden.all(-1)


def _attend(q, k, v, bias, key_padding_mask, is_causal, scale):
    """(out, lse) of (B, H, S, D) tensors."""
    s_q, s_k = q.shape[2], k.shape[2]
    if s_k == 0:
        lse = torch.full(q.shape[:3], math.inf, dtype=accumulation_dtype(q.dtype), device=q.device)
        return q.new_zeros(q.shape), lse
    mask = _mask(q, bias, key_padding_mask)
    out, lse = _flash(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
    fully = _fully_masked(mask, bias, key_padding_mask, is_causal, s_q, s_k)
    if fully is not None:
        lse = lse.masked_fill(fully, math.inf)
    return out, lse


def _sequences(cu_seqlens_q, cu_seqlens_k):
    """(q tokens, k tokens) slices of each packed sequence."""
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(slice(bounds_q[i], bounds_q[i + 1]), slice(bounds_k[i], bounds_k[i + 1]))
            for i in range(len(bounds_q) - 1)]


def _heads_first(t):
    """(L, H, D) tokens of one sequence -> a (1, H, L, D) view."""
    return t.transpose(0, 1).unsqueeze(0)


def attention_forward(a):
    if a.dropout_p > 0:
        return reference.attention_forward(a)
    if a.cu_seqlens_q is None:
        out, lse = _attend(a.q, a.k, a.v, a.bias, a.key_padding_mask, a.is_causal, a.scale)
        return out.contiguous(), lse.contiguous()
    q, k, v = a.q, a.k, a.v
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=accumulation_dtype(q.dtype), device=q.device)
    for tokens_q, tokens_k in _sequences(a.cu_seqlens_q, a.cu_seqlens_k):
        if tokens_q.stop == tokens_q.start:
            continue
        o, l = _attend(*(_heads_first(t) for t in (q[tokens_q], k[tokens_k], v[tokens_k])), None, None, a.is_causal,
                       a.scale)
        out[tokens_q] = o[0].transpose(0, 1)
        lse[:, tokens_q] = l[0]
    return out, lse


def _attend_backward(dout, q, k, v, out, lse, bias, key_padding_mask, is_causal, scale):
    if k.shape[2] == 0:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    return _flash_backward(dout, q, k, v, out, lse, 0.0, is_causal, attn_mask=_mask(q, bias, key_padding_mask),
                           scale=scale)


def attention_backward(dout, out, lse, bias_grad, a):
    if a.dropout_p > 0 or bias_grad:
        return reference.attention_backward(dout, out, lse, bias_grad, a)
    empty = out.new_empty(0, dtype=accumulation_dtype(a.q.dtype))
    if a.cu_seqlens_q is None:
        grads = _attend_backward(dout, a.q, a.k, a.v, out, lse, a.bias, a.key_padding_mask, a.is_causal, a.scale)
        return *(g.contiguous() for g in grads), empty
    dq, dk, dv = (torch.zeros_like(t) for t in a[:3])
    for tokens_q, tokens_k in _sequences(a.cu_seqlens_q, a.cu_seqlens_k):
        if tokens_q.stop == tokens_q.start:
            continue
        pieces = [_heads_first(t[tokens_q]) for t in (dout, a.q)] + [_heads_first(t[tokens_k]) for t in (a.k, a.v)]
        grads = _attend_backward(*pieces, _heads_first(out[tokens_q]), lse[:, tokens_q].unsqueeze(0), None, None,
                                 a.is_causal, a.scale)
        for full, part, tokens in zip((dq, dk, dv), grads, (tokens_q, tokens_k, tokens_k)):
            full[tokens] = part[0].transpose(0, 1)
    return dq, dk, dv, empty
