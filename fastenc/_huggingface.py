"""Hugging Face transformers' BERT family on fastenc's kernels (used by fastenc.convert; transformers is optional).

Three changes, each keeping the model's weights and state_dict:
- attention: a "fastenc" attention implementation registered with transformers, given the 2-D padding mask
  (as flash attention is), so padded keys are masked inside the fused kernel rather than by a dense bias;
- BertSelfOutput / BertOutput: dense -> dropout -> residual add + LayerNorm, the add fused into the LayerNorm;
- BertIntermediate: dense -> GELU / ReLU with the bias and activation fused after the matrix product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from transformers import activations
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
from transformers.modeling_utils import AttentionInterface
from transformers.models.bert import modeling_bert

from fastenc import functional as F
from fastenc.nn.normalization import residual_layer_norm

IMPLEMENTATION = "fastenc"


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: q, k, v (B, H, S, D); attention_mask None or (B, S_k), 1 = token."""
    padding = None if attention_mask is None else ~attention_mask.bool()
    causal = bool(getattr(module, "is_causal", False)) and query.shape[2] > 1
    out = F.attention(query, key, value, key_padding_mask=padding, is_causal=causal, dropout_p=dropout,
                      scale=scaling)
    return out.transpose(1, 2), None


AttentionInterface.register(IMPLEMENTATION, attention)
AttentionMaskInterface.register(IMPLEMENTATION, flash_attention_mask)


class _ResidualNormOutput(torch.nn.Module):
    """forward of BertSelfOutput and BertOutput with the residual add fused into the LayerNorm."""

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return residual_layer_norm(self.LayerNorm, self.dropout(self.dense(hidden_states)), input_tensor)


class BertSelfOutput(_ResidualNormOutput, modeling_bert.BertSelfOutput):
    pass


class BertOutput(_ResidualNormOutput, modeling_bert.BertOutput):
    pass


_FUSED_ACTIVATIONS = {
    activations.GELUActivation: "gelu",
    activations.GELUTanh: "gelu_tanh",
    activations.NewGELUActivation: "gelu_tanh",
    torch.nn.ReLU: "relu",
}


class BertIntermediate(modeling_bert.BertIntermediate):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        activation = _FUSED_ACTIVATIONS.get(type(self.intermediate_act_fn))
        if activation is None:
            return super().forward(hidden_states)
        h = TF.linear(hidden_states, self.dense.weight)
        return F.bias_activation(h, self.dense.bias, activation)


REPLACEMENTS = {
    modeling_bert.BertSelfOutput: BertSelfOutput,
    modeling_bert.BertOutput: BertOutput,
    modeling_bert.BertIntermediate: BertIntermediate,
}


def convert_bert(model: torch.nn.Module) -> bool:
    """Convert the BERT modules in `model`; True if there were any."""
    found = False
    for sub in model.modules():
        replacement = REPLACEMENTS.get(type(sub))
        if replacement is not None:
            sub.__class__ = replacement
            found = True
        if isinstance(sub, modeling_bert.BertPreTrainedModel):
            sub.set_attn_implementation(IMPLEMENTATION)
            found = True
    return found
