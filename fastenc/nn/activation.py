"""fastenc.nn.MultiheadAttention: torch.nn.MultiheadAttention on fastenc's fused attention."""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import Tensor

from fastenc import functional as F
from fastenc.nn._errors import ArgumentTypeError, ArgumentValueError, NotScriptable


def check_dtype(name: str, t: Tensor, weight: Tensor) -> None:
    """Outside autocast, `t` must have the dtype of the module's parameters (else torch's linear fails, unnamed)."""
    if t.dtype != weight.dtype and not torch.is_autocast_enabled(t.device.type):
        raise RuntimeError(f"{name} has dtype {t.dtype} but the module's parameters are {weight.dtype}")


def check_masks(attn_mask: Tensor | None, key_padding_mask: Tensor | None, batch: int | None, heads: int, l_q: int,
                s_k: int, attn_name: str = "attn_mask", padding_name: str = "key_padding_mask") -> None:
    """torch's rules for MultiheadAttention's masks (batch None: unbatched), with errors naming the argument.
    A wrong attn_mask shape raises RuntimeError, as torch does; torch asserts the rest, fastenc raises."""
    for name, mask in ((attn_name, attn_mask), (padding_name, key_padding_mask)):
        if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
            raise ArgumentTypeError(f"{name} must be bool or float, got {mask.dtype}")
    if attn_mask is not None:
        shapes = (l_q, s_k), ((batch or 1) * heads, l_q, s_k)
        if tuple(attn_mask.shape) not in shapes:
            raise RuntimeError(f"{attn_name} must have shape (L, S) = {shapes[0]} or (N * num_heads, L, S) = "
                               f"{shapes[1]}, got {tuple(attn_mask.shape)}")
    if key_padding_mask is not None:
        shape, axes = ((s_k,), "(S,)") if batch is None else ((batch, s_k), "(N, S)")
        if tuple(key_padding_mask.shape) != shape:
            raise ArgumentValueError(f"{padding_name} must have shape {axes} = {shape}, got {tuple(key_padding_mask.shape)}")


class MultiheadAttention(NotScriptable, torch.nn.MultiheadAttention):
    """Drop-in for `torch.nn.MultiheadAttention` (same constructor, parameters, state_dict and forward).

    With `need_weights=False` (what TransformerEncoderLayer asks for) attention runs fused in fastenc and the
    weights are not formed. With `need_weights=True` (torch's default) the weights must be materialised, so
    that call takes torch's own, non-fused path and returns exactly what torch returns. A float mask that requires
    grad (a learned additive bias) gets its gradient from fastenc's attention.
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
        # torch's own rank checks first, so that a call torch rejects gets torch's error, word for word.
        TF._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        if is_causal:
            if attn_mask is None:
                raise RuntimeError("is_causal=True is a hint that attn_mask is the causal mask: pass attn_mask too")
            # As torch: without a padding mask the hint stands for attn_mask, which is then not read (nor its
            # shape checked); with one, attn_mask is merged with it, and the merged mask is no longer causal.
            attn_mask, is_causal = (None, True) if key_padding_mask is None else (attn_mask, False)
        self._check(query, key, value, key_padding_mask, attn_mask)
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

    def _check(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
               attn_mask: Tensor | None) -> None:
        rank = query.dim()  # 2 or 3, the same for key and value (torch's _mha_shape_check ran first)
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != width:
                raise ArgumentValueError(f"{name} must be (L, N, {width}) or (N, L, {width}) with batch_first, or "
                                         f"({'L' if name == 'query' else 'S'}, {width}) unbatched; "
                                         f"got {tuple(t.shape)}")
            check_dtype(name, t, self.out_proj.weight)
        seq = 1 if self.batch_first and rank == 3 else 0
        batch = query.shape[1 - seq] if rank == 3 else None
        shapes = f"got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        if key.shape[:-1] != value.shape[:-1]:
            raise ArgumentValueError(f"key and value must have the same length and batch size: {shapes}")
        if batch is not None and key.shape[1 - seq] != batch:
            raise ValueError(f"key and value must have query's batch size: {shapes}")
        check_masks(attn_mask, key_padding_mask, batch, self.num_heads, query.shape[seq], key.shape[seq])

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
        n, l_q, e = query.shape
        h = self.num_heads
        q, k, v = self._project(query, key, value, same_input)
        bias = None
        if attn_mask is not None:
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
        heads = [t.view(n, t.shape[1], h, e // h).transpose(1, 2) for t in (q, k, v)]
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
