"""fastenc.nn.TransformerEncoderLayer / TransformerEncoder: torch's encoder on fastenc's fused ops.

The modules are torch's (subclasses: same constructor, parameters, state_dict and initialisation) with
fastenc's attention, residual-add + LayerNorm, and bias + activation + dropout after the first feed-forward
linear layer (ReLU and GELU; another activation runs torch's feed-forward block).

Outputs are torch's at every position torch computes, padded ones included. Where padded outputs are not wanted,
`padding_free=True` (a keyword of both constructors) packs the real tokens of a batch with a bool
`src_key_padding_mask` (and no mask other than a causal one) once at the encoder's entry, runs every layer on them
through variable-length attention and unpacks at the exit: no work is spent on padding, and padded positions
are 0. The encoder does the same by itself where torch's own would take its nested-tensor fast path (inference
with `enable_nested_tensor`), which also returns 0 there. Under torch.compile the padded path runs (packing has
a data-dependent shape).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as TF
from torch import Tensor

from fastenc import functional as F
from fastenc.nn._errors import ArgumentValueError, NotScriptable
from fastenc.nn._swap import swap_classes
from fastenc.nn.activation import check_dtype, check_masks
from fastenc.nn.normalization import residual_layer_norm
from fastenc.ops import records_grad


def pack(x: Tensor, padding: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """x (N, S, E) and padding (N, S) bool, True = pad -> (tokens (T, E), their flat index, cu_seqlens, max_seqlen).

    Tokens keep their order, so a causal mask over packed positions equals one over the original positions."""
    n, s, e = x.shape
    lengths = (~padding).sum(dim=1)
    index = (~padding).flatten().nonzero().squeeze(1)
    cu_seqlens = TF.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return x.reshape(n * s, e).index_select(0, index), index, cu_seqlens, int(lengths.max()) if n else 0


def unpack(tokens: Tensor, index: Tensor, batch: int, seq_len: int) -> Tensor:
    """The inverse of pack, with zeros at the padded positions: (N, S, E)."""
    out = tokens.new_zeros(batch * seq_len, tokens.shape[-1])
    return out.index_copy(0, index, tokens).view(batch, seq_len, -1)


def linear_bias_activation(x: Tensor, linear: torch.nn.Linear, activation: str, dropout_p: float = 0.0) -> Tensor:
    """`dropout(act(linear(x)))` with fastenc's fused epilogue. Where a gradient may be wanted the bias is added
    in the epilogue (whose backward gives its gradient in the same pass as the input's); where none can be, in
    the matrix product, which adds it at no cost of its own."""
    weight, bias = linear.weight, linear.bias
    if records_grad(x, weight, bias):
        return F.bias_activation(TF.linear(x, weight), bias, activation, dropout_p)
    return F.bias_activation(TF.linear(x, weight, bias), None, activation, dropout_p)


# Inference on a CPU runs a feed-forward block over blocks of rows whose hidden activations (rows x width of the
# hidden layer) take at most this many bytes. A whole batch's take tens of MB, above glibc malloc's largest mmap
# threshold (32 MB): every call then maps fresh memory, faulted in page by page (and a matrix product with a bias
# first fills its output with the bias, touching every page), a tenth or more of a long-text encoder layer's time.
# A block's come from memory malloc reuses and stay in the last-level cache for the second product; blocks of
# 8 MB keep the products' rows in the hundreds, where MKL's sgemm runs at full rate (bench/results).
FEED_FORWARD_BLOCK_BYTES = 8 << 20


def _hooked(module: torch.nn.Module) -> bool:
    """Whether a forward hook, global or on `module` or a module inside it, sees its calls."""
    hooks = torch.nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def by_row_blocks(block, x: Tensor, hidden_width: int, module: torch.nn.Module) -> Tensor:
    """block(x) for a feed-forward `block` of `module` that maps every row (token) of x on its own, run over
    blocks of rows (see FEED_FORWARD_BLOCK_BYTES) where nothing can tell the difference: a CPU tensor, no
    gradient recorded, not compiling (torch.compile plans its own buffers), no forward hook (global or on the
    module's modules) that would see one call per block."""
    width = x.shape[-1]
    rows = x.numel() // width if width else 0
    block_rows = max(64, FEED_FORWARD_BLOCK_BYTES // (max(hidden_width, 1) * x.element_size()) // 64 * 64)
    if (rows <= block_rows or x.device.type != "cpu" or torch.compiler.is_compiling()
            or records_grad(x, *module.parameters())
            or _hooked(module)):
        return block(x)
    flat = x.reshape(1, rows, width)  # 3-D, as the block may expect (batch, sequence, features)
    out = torch.cat([block(piece) for piece in flat.split(block_rows, dim=1)], dim=1)
    return out.view(*x.shape[:-1], out.shape[-1])


def _fused_activation(fn) -> str | None:
    """The name of the fused epilogue for a layer's activation, or None when it has none."""
    if fn is TF.relu or isinstance(fn, torch.nn.ReLU):
        return "relu"
    if fn is TF.gelu:
        return "gelu"
    if isinstance(fn, torch.nn.GELU):
        return "gelu" if fn.approximate == "none" else "gelu_tanh"
    return None


def _packable(mask: Tensor | None, padding: Tensor | None, is_causal: bool) -> bool:
    # Packing needs the token count, a data-dependent shape: torch.compile takes the padded path instead.
    return (padding is not None and padding.dtype == torch.bool and (mask is None or is_causal)
            and not torch.compiler.is_compiling())


class TransformerEncoderLayer(NotScriptable, torch.nn.TransformerEncoderLayer):
    """Drop-in for `torch.nn.TransformerEncoderLayer` on fused attention and fused residual-add + LayerNorm.

    `padding_free=True`: with a bool src_key_padding_mask, padded positions are skipped and come out 0."""

    padding_free = False  # the class default, also for modules that fastenc.convert re-classes

    def __init__(self, d_model: int, nhead: int, *args, padding_free: bool = False, **kwargs) -> None:
        if nhead <= 0 or d_model % nhead:
            raise ArgumentValueError(f"nhead ({nhead}) must be positive and divide d_model ({d_model})")
        super().__init__(d_model, nhead, *args, **kwargs)
        self.padding_free = padding_free
        swap_classes(self)

    def forward(self, src: Tensor, src_mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool = False, *, cu_seqlens: Tensor | None = None, max_seqlen: int | None = None
                ) -> Tensor:
        if cu_seqlens is not None:  # packed tokens (T, E), as TransformerEncoder passes them: see forward_packed
            return self.forward_packed(src, cu_seqlens, max_seqlen, is_causal)
        batch, seq_len = self._check(src, src_mask, src_key_padding_mask)
        if self.padding_free and batch is not None and _packable(src_mask, src_key_padding_mask, is_causal):
            x = src if self.self_attn.batch_first else src.transpose(0, 1)
            tokens, index, cu_seqlens, max_seqlen = pack(x, src_key_padding_mask)
            out = unpack(self.forward_packed(tokens, cu_seqlens, max_seqlen, is_causal), index, batch, seq_len)
            return out if self.self_attn.batch_first else out.transpose(0, 1)

        def attend(h: Tensor) -> Tensor:
            return self.self_attn(h, h, h, attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
                                  need_weights=False, is_causal=is_causal)[0]

        return self._block(src, attend)

    def _check(self, src: Tensor, mask: Tensor | None, padding: Tensor | None,
               mask_name: str = "src_mask") -> tuple[int | None, int]:
        """(batch size, None when unbatched; sequence length) of src, after checking src and the masks."""
        width = self.self_attn.embed_dim
        if src.dim() not in (2, 3) or src.shape[-1] != width:
            raise ArgumentValueError(f"src must be (S, E), (S, N, E) or (N, S, E) with E = d_model = {width}, "
                             f"got {tuple(src.shape)}")
        check_dtype("src", src, self.linear1.weight)
        seq = 1 if self.self_attn.batch_first and src.dim() == 3 else 0
        batch = src.shape[1 - seq] if src.dim() == 3 else None
        check_masks(mask, padding, batch, self.self_attn.num_heads, src.shape[seq], src.shape[seq], mask_name,
                    "src_key_padding_mask")
        return batch, src.shape[seq]

    def forward_packed(self, tokens: Tensor, cu_seqlens: Tensor, max_seqlen: int, is_causal: bool = False) -> Tensor:
        """The layer on packed tokens (T, E) (see fastenc.nn.transformer.pack)."""
        return self._block(tokens, lambda h: self.self_attn.forward_packed(h, cu_seqlens, max_seqlen, is_causal))

    def _block(self, x: Tensor, attend) -> Tensor:
        """The layer's body around an attention callable; every residual add is fused into a LayerNorm."""
        if self.norm_first:
            h, x = residual_layer_norm(self.norm2, self.dropout1(attend(self.norm1(x))), x, return_residual=True)
            return x + self._ff_block(h)
        x = residual_layer_norm(self.norm1, self.dropout1(attend(x)), x)
        return residual_layer_norm(self.norm2, self._ff_block(x), x)

    def _ff_block(self, x: Tensor) -> Tensor:
        return by_row_blocks(self._ff_rows, x, self.linear1.out_features, self)

    def _ff_rows(self, x: Tensor) -> Tensor:
        activation = _fused_activation(self.activation)
        if activation is None:  # an activation fastenc does not fuse: torch's block
            return super()._ff_block(x)
        h = linear_bias_activation(x, self.linear1, activation, self.dropout.p if self.training else 0.0)
        return self.dropout2(self.linear2(h))


class TransformerEncoder(NotScriptable, torch.nn.TransformerEncoder):
    """Drop-in for `torch.nn.TransformerEncoder`; packs padded batches once for all its layers where padded
    outputs are 0: with `padding_free=True`, and where torch's own encoder would take its nested-tensor path.

    `enable_nested_tensor` and `mask_check` mean what they mean to torch; packing itself needs no left-aligned
    padding.
    """

    padding_free = False  # the class default, also for modules that fastenc.convert re-classes

    def __init__(self, encoder_layer: torch.nn.TransformerEncoderLayer, num_layers: int, *args,
                 padding_free: bool = False, **kwargs) -> None:
        if not isinstance(encoder_layer, TransformerEncoderLayer):
            encoder_layer = swap_classes(copy.deepcopy(encoder_layer))
        super().__init__(encoder_layer, num_layers, *args, **kwargs)
        self.padding_free = padding_free
        swap_classes(self)

    def _torch_zeroes_padding(self, src: Tensor, mask: Tensor | None, padding: Tensor | None) -> bool:
        """Whether torch's TransformerEncoder would run its nested-tensor fast path on these arguments, and so
        return 0 at the padded positions (its conditions, in its order)."""
        first = self.layers[0]
        if not (torch.backends.mha.get_fastpath_enabled() and getattr(self, "use_nested_tensor", False)
                and not first.training and src.dim() == 3 and padding is not None and mask is None
                and not torch.is_autocast_enabled() and not torch.compiler.is_compiling()):
            return False
        if records_grad(src, *first.parameters()):
            return False
        return not getattr(self, "mask_check", True) or bool(
            torch._nested_tensor_from_mask_left_aligned(src, padding.logical_not()))

    def forward(self, src: Tensor, mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool | None = None) -> Tensor:
        first = self.layers[0]
        batch, seq_len = first._check(src, mask, src_key_padding_mask, mask_name="mask")
        is_causal = torch.nn.modules.transformer._detect_is_causal_mask(mask, is_causal, seq_len)
        pack_tokens = self.padding_free or self._torch_zeroes_padding(src, mask, src_key_padding_mask)
        if pack_tokens and batch is not None and _packable(mask, src_key_padding_mask, is_causal):
            x = src if first.self_attn.batch_first else src.transpose(0, 1)
            tokens, index, cu_seqlens, max_seqlen = pack(x, src_key_padding_mask)
            for layer in self.layers:  # through __call__: hooks and wrappers (checkpointing, FSDP) see every layer
                tokens = layer(tokens, is_causal=is_causal, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
            if self.norm is not None:
                tokens = self.norm(tokens)
            out = unpack(tokens, index, batch, seq_len)
            return out if first.self_attn.batch_first else out.transpose(0, 1)
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)
        return x if self.norm is None else self.norm(x)
