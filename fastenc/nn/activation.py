"""fastenc.nn.MultiheadAttention: torch.nn.MultiheadAttention on fastenc's fused attention."""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import Tensor

from fastenc import functional as F


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for `torch.nn.MultiheadAttention` (same constructor, parameters, state_dict and forward).

    With `need_weights=False` (what TransformerEncoderLayer asks for) attention runs fused in fastenc and the
    weights are not formed. With `need_weights=True` (torch's default) the weights must be materialised, so
    that call takes torch's own, non-fused path and returns exactly what torch returns.
    Masks keep torch's meanings: in `attn_mask` and `key_padding_mask`, True (or -inf) means "do not attend".
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if need_weights:
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal=True is a hint that attn_mask is the causal mask: pass attn_mask too")
        same_input = query is key and key is value  # self-attention: one projection GEMM
        unbatched = query.dim() == 2
        if unbatched:  # (L, E) -> (1, L, E)
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out = self._fused(query, key, value, same_input, key_padding_mask, attn_mask, is_causal)
        if unbatched:
            return out.squeeze(0), None
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _check(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.dim() != 3 or t.shape[-1] != width:
                raise ValueError(f"{name} must be (L, N, {width}) or (N, L, {width}) with batch_first, or "
                                 f"({'L' if name == 'query' else 'S'}, {width}) unbatched; got {tuple(t.shape)}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must match query's batch")

    def _project(self, query: Tensor, key: Tensor, value: Tensor, same_input: bool) -> tuple[Tensor, Tensor, Tensor]:
        e = self.embed_dim
        b = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        if self._qkv_same_embed_dim:
            if same_input:
                return TF.linear(query, self.in_proj_weight, b).chunk(3, dim=-1)
            w_q, w_k, w_v = self.in_proj_weight.split(e)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return TF.linear(query, w_q, b_q), TF.linear(key, w_k, b_k), TF.linear(value, w_v, b_v)

    def _fused(self, query, key, value, same_input, key_padding_mask, attn_mask, is_causal) -> Tensor:
        """query (N, L, E), key / value (N, S, kdim / vdim) -> (N, L, E)."""
        self._check(query, key, value)
        n, l_q, e = query.shape
        h = self.num_heads
        q, k, v = self._project(query, key, value, same_input)
        bias = None
        if attn_mask is not None and not is_causal:
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.reshape(n, h, l_q, attn_mask.shape[-1])
            bias = attn_mask if attn_mask.is_floating_point() else torch.zeros(
                attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(attn_mask, float("-inf"))
        if key_padding_mask is not None and key_padding_mask.is_floating_point():
            padding = key_padding_mask[:, None, None, :]
            bias, key_padding_mask = (padding if bias is None else bias + padding), None
        extra = (self.bias_k is not None) + self.add_zero_attn  # keys appended after the sequence
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, e)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n, 1, e)], dim=1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, 1, e)], dim=1)
            v = torch.cat([v, v.new_zeros(n, 1, e)], dim=1)
        if extra:  # the appended keys are never masked
            bias = None if bias is None else TF.pad(bias, (0, extra))
            key_padding_mask = None if key_padding_mask is None else TF.pad(key_padding_mask, (0, extra))
        heads = [t.view(n, -1, h, e // h).transpose(1, 2) for t in (q, k, v)]
        out = F.attention(*heads, attn_mask=bias, key_padding_mask=key_padding_mask, is_causal=is_causal,
                          dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(n, l_q, e))

    def forward_packed(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int, is_causal: bool = False) -> Tensor:
        """Self-attention over packed tokens x (T, E) whose sequence i is x[cu_seqlens[i]:cu_seqlens[i + 1]]:
        what forward gives at the unpadded positions of the padded batch, without computing the padding."""
        if self.bias_k is not None or self.add_zero_attn or not self._qkv_same_embed_dim:
            raise NotImplementedError("forward_packed supports self-attention without add_bias_kv / add_zero_attn")
        t, e = x.shape
        q, k, v = (p.view(t, self.num_heads, e // self.num_heads) for p in self._project(x, x, x, True))
        out = F.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, is_causal=is_causal,
                                 dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.reshape(t, e))
