"""Hugging Face transformers' encoders on fastenc's kernels (used by fastenc.convert; transformers is optional).

Importing this module registers the "fastenc" attention implementation with transformers, so a model can also be
loaded on it by name: `from_pretrained(..., attn_implementation="fastenc")` (attention only; `fastenc.convert`
does that and the fusions below).

Two changes, each keeping the model's weights and state_dict:
- attention: every model whose attention goes through transformers' attention interface (BERT, RoBERTa,
  XLM-RoBERTa, CamemBERT, ELECTRA, DistilBERT, ALBERT, ModernBERT, GTE, NomicBERT, EuroBERT, ...) is set to a
  "fastenc" implementation, given the 2-D padding mask (as flash attention is), so padded keys are masked inside
  the fused kernel rather than by a dense bias;
- the BERT block's sub-layers, in every family whose code is BERT's own: SelfOutput / Output (dense -> dropout ->
  residual add + LayerNorm) get the add fused into the LayerNorm, Intermediate (dense -> GELU / ReLU) the bias and
  activation fused after the matrix product; DistilBERT's block the same three fusions; with padding_free, the
  encoder (BERT's or DistilBERT's) runs on packed tokens.
MPNet's own attention code (a relative position bias per head) is fused too, the bias given to fastenc's
attention as an additive mask. A model whose attention is other code of its own (DeBERTa's disentangled
attention) keeps it, with a warning that names it.
"""

from __future__ import annotations

import inspect
import sys
import textwrap
import warnings

import torch
from transformers import activations
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
from transformers.modeling_utils import AttentionInterface, PreTrainedModel
from transformers.models.bert import modeling_bert
from transformers.models.distilbert import modeling_distilbert
from transformers.models.mpnet import modeling_mpnet

from fastenc import functional as F
from fastenc.nn.normalization import residual_layer_norm
from fastenc.nn.transformer import by_row_blocks, linear_bias_activation, pack, unpack

IMPLEMENTATION = "fastenc"


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
              cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """transformers' attention interface: q (B, H, S_q, D), k and v (B, H_kv, S_k, D) with H a multiple of H_kv;
    attention_mask None, (B, S_k) with 1 = token (the flash mask function's), or a 4-D mask a model built itself
    (bool, True = attend, or additive float); sliding_window w: query i sees keys j with |i - j| < w, as the
    flash implementation's window (w - 1, w - 1). With cu_seq_lens_q / _k (flash attention's packed form, which
    the padding-free encoders below pass): B is 1 and the sequences lie end to end."""
    if key.shape[1] != query.shape[1]:  # grouped-query attention: each key / value head serves a group
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    causal = bool(getattr(module, "is_causal", False)) and query.shape[2] > 1
    if cu_seq_lens_q is not None:
        if sliding_window is not None or attention_mask is not None or query.shape[0] != 1:
            raise NotImplementedError("fastenc's packed attention takes one row of packed sequences, without a "
                                      "sliding window or an attention mask")
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
        out = F.attention_varlen(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
                                 dropout_p=dropout, is_causal=causal, scale=scaling)
        return out[None], None
    padding = mask = None
    if attention_mask is not None and attention_mask.dim() == 2:
        padding = ~attention_mask.bool()
    elif attention_mask is not None:
        mask = attention_mask
    s_q, s_k = query.shape[2], key.shape[2]
    if sliding_window is not None and s_k > sliding_window - 1:
        rows = torch.arange(s_k - s_q, s_k, device=query.device)[:, None]  # queries are the last s_q positions
        band = (rows - torch.arange(s_k, device=query.device)).abs() < sliding_window
        if mask is None:
            mask = band
        elif mask.dtype == torch.bool:
            mask = mask & band
        else:
            mask = mask.masked_fill(~band, float("-inf"))
    out = F.attention(query, key, value, attn_mask=mask, key_padding_mask=padding, is_causal=causal,
                      dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2), None


AttentionInterface.register(IMPLEMENTATION, attention)
AttentionMaskInterface.register(IMPLEMENTATION, flash_attention_mask)


class _ResidualNormOutput(torch.nn.Module):
    """forward of BERT's SelfOutput and Output with the residual add fused into the LayerNorm."""

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return residual_layer_norm(self.LayerNorm, self.dropout(self.dense(hidden_states)), input_tensor)


_FUSED_ACTIVATIONS = {
    activations.GELUActivation: "gelu",
    activations.GELUTanh: "gelu_tanh",
    activations.NewGELUActivation: "gelu_tanh",
    torch.nn.ReLU: "relu",
}


class _BiasActivationIntermediate(torch.nn.Module):
    """forward of BERT's Intermediate with the bias and activation fused after the matrix product."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        activation = _FUSED_ACTIVATIONS.get(type(self.intermediate_act_fn))
        if activation is None:
            return super().forward(hidden_states)
        return linear_bias_activation(hidden_states, self.dense, activation)


class _PositionBiasSelfAttention(torch.nn.Module):
    """forward of MPNet's self-attention (q, k, v and o projections; scores + a relative position bias per head +
    the additive padding mask) with the attention in one fused op, the bias and mask given as an additive float
    mask (the bias is learned: the op gives its gradient)."""

    _fastenc_attention = True

    def forward(self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs):
        if output_attentions:  # the probabilities are an output: only the unfused code has them
            return super().forward(hidden_states, attention_mask, position_bias, output_attentions, **kwargs)
        shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.q, self.k, self.v))
        bias = position_bias
        if attention_mask is not None:
            bias = attention_mask if bias is None else bias + attention_mask
        c = F.attention(q, k, v, attn_mask=bias, dropout_p=self.dropout.p if self.training else 0.0)
        return (self.o(c.transpose(1, 2).flatten(2)),)


class _FusedDistilBertBlock(torch.nn.Module):
    """forward of DistilBERT's block: both residual adds fused into their LayerNorms, the feed-forward's bias and
    activation fused after its first product, the feed-forward over blocks of rows in inference on a CPU (see
    fastenc.nn.transformer.by_row_blocks)."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        attended, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
        attended = residual_layer_norm(self.sa_layer_norm, attended, hidden_states)
        return by_row_blocks(self._feed_forward, attended, self.ffn.lin1.out_features, self)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        ffn = self.ffn
        activation = _FUSED_ACTIVATIONS.get(type(ffn.activation))
        if activation is None or ffn.chunk_size_feed_forward:
            hidden = ffn(x)
        else:
            hidden = ffn.dropout(ffn.lin2(linear_bias_activation(x, ffn.lin1, activation)))
        return residual_layer_norm(self.output_layer_norm, hidden, x)


def _hidden_width(layer: torch.nn.Module, x: torch.Tensor) -> int:
    """The width of a BERT-style layer's hidden feed-forward layer (its intermediate's dense output), or BERT's
    usual 4 x the model's width where the intermediate has no such Linear."""
    dense = getattr(layer.intermediate, "dense", None)
    return dense.out_features if isinstance(dense, torch.nn.Linear) else 4 * x.shape[-1]


class _RowBlockFeedForward(torch.nn.Module):
    """feed_forward_chunk of BERT's layer (the intermediate and output sub-layers) over blocks of rows in
    inference on a CPU: see fastenc.nn.transformer.by_row_blocks."""

    def feed_forward_chunk(self, attention_output: torch.Tensor) -> torch.Tensor:
        return by_row_blocks(super().feed_forward_chunk, attention_output, _hidden_width(self, attention_output),
                             self)


class _RowBlockMPNetLayer(torch.nn.Module):
    """forward of MPNet's layer with its feed-forward sub-layers over blocks of rows, as _RowBlockFeedForward."""

    def forward(self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs):
        attended = self.attention(hidden_states, attention_mask, position_bias=position_bias,
                                  output_attentions=output_attentions)
        out = by_row_blocks(lambda h: self.output(self.intermediate(h), h), attended[0],
                            _hidden_width(self, attended[0]), self)
        return (out, *attended[1:])


class _PackedEncoder(torch.nn.Module):
    """BERT's (and DistilBERT's) encoder on packed tokens, for models converted with padding_free=True: the real
    tokens of a padded batch are packed into one row once, every layer runs on them alone (the attention in its
    packed form), and the result is unpacked with 0 at the padded positions (their values are discarded by pooling
    and token heads)."""

    fastenc_padding_free = False

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        plain = not args and all(kwargs.get(name) is None for name in ("encoder_hidden_states", "cache"))
        if not (self.fastenc_padding_free and plain and attention_mask is not None and attention_mask.dim() == 2):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        tokens, index, cu_seqlens, longest = pack(hidden_states, ~attention_mask.bool())
        out = super().forward(tokens[None], None, cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
                              max_length_q=longest, max_length_k=longest, **kwargs)
        out.last_hidden_state = unpack(out.last_hidden_state[0], index, *hidden_states.shape[:2])
        return out


def _source(function) -> str:
    return textwrap.dedent(inspect.getsource(function))


# A family's module is fused when the method a fusion replaces is, token for token, BERT's (or MPNet's or
# DistilBERT's) one (transformers copies BERT's blocks into most encoder families); anything else (pre-LayerNorm
# variants, adapters) is left as it is.
_FUSIONS = {
    ("forward", _source(modeling_bert.BertSelfOutput.forward)): _ResidualNormOutput,
    ("forward", _source(modeling_bert.BertIntermediate.forward)): _BiasActivationIntermediate,
    ("forward", _source(modeling_mpnet.MPNetSelfAttention.forward)): _PositionBiasSelfAttention,
    ("forward", _source(modeling_mpnet.MPNetLayer.forward)): _RowBlockMPNetLayer,
    ("forward", _source(modeling_bert.BertEncoder.forward)): _PackedEncoder,
    ("forward", _source(modeling_distilbert.TransformerBlock.forward)): _FusedDistilBertBlock,
    ("forward", _source(modeling_distilbert.Transformer.forward)): _PackedEncoder,
    ("feed_forward_chunk", _source(modeling_bert.BertLayer.feed_forward_chunk)): _RowBlockFeedForward,
}
_FUSED_METHODS = tuple(dict.fromkeys(method for method, _ in _FUSIONS))
_fused_classes: dict[type, type] = {}


def _fused_class(cls: type) -> type | None:
    """The fused subclass of a transformers module class, or None if none of its methods is one of _FUSIONS'."""
    if cls in _fused_classes:
        return _fused_classes[cls]
    fused = fusion = None
    if cls.__module__.startswith("transformers.models."):
        for method in _FUSED_METHODS:
            if fusion is None and method in vars(cls):
                try:
                    fusion = _FUSIONS.get((method, _source(vars(cls)[method])))
                except (OSError, TypeError):  # no source to compare (a frozen or compiled module)
                    pass
        if fusion is not None:
            # Named as the original and found in this module, so a pickled model loads (see __getattr__).
            fused = type(cls.__name__, (fusion, cls), {"__module__": __name__, "__qualname__": cls.__name__})
            globals()[cls.__name__] = fused
    _fused_classes[cls] = fused
    return fused


def __getattr__(name: str) -> type:
    """A fused class not made yet in this process, for unpickling: made from the transformers class of that name,
    whose module the pickled model's own class has imported by then."""
    for module_name, module in list(sys.modules.items()):
        # Only modules already imported, read without getattr: transformers' lazy packages import on access.
        is_modeling = module_name.startswith("transformers.models.") and ".modeling_" in module_name
        original = vars(module).get(name) if is_modeling else None
        if isinstance(original, type):
            fused = _fused_class(original)
            if fused is not None:
                return fused
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def convert(model: torch.nn.Module, padding_free: bool = False) -> None:
    """Convert the transformers models and modules in `model`. padding_free: BERT-style and DistilBERT encoders run
    on packed tokens (0 at padded positions). Warns, naming them, for the models whose attention stays on their own
    code."""
    for sub in model.modules():
        fused = _fused_class(type(sub))
        if fused is not None:
            sub.__class__ = fused
        if isinstance(sub, _PackedEncoder):
            sub.fastenc_padding_free = padding_free
        if isinstance(sub, PreTrainedModel) and getattr(sub, "_supports_attention_backend", False):
            sub.set_attn_implementation(IMPLEMENTATION)
    # A model reached by neither route: its attention is code of its own (DeBERTa's disentangled attention, ...).
    left = [type(sub).__name__ for sub in model.modules()
            if isinstance(sub, PreTrainedModel) and not getattr(sub, "_supports_attention_backend", False)
            and not any(getattr(m, "_fastenc_attention", False) for m in sub.modules())]
    if left:
        warnings.warn(f"fastenc.convert: the attention of {', '.join(dict.fromkeys(left))} is the model's own "
                      f"code, not transformers' attention interface, so it stays on torch (the LayerNorms and "
                      f"BERT-style sub-layers are converted)", stacklevel=3)
