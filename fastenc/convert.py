"""fastenc.convert: put fastenc's modules into a model that already exists, keeping its weights."""

from __future__ import annotations

import torch

from fastenc.nn._swap import swap_classes


def convert(model: torch.nn.Module, *, padding_free: bool = False) -> torch.nn.Module:
    """Replace, in place, every torch.nn LayerNorm, MultiheadAttention, TransformerEncoderLayer and
    TransformerEncoder in `model` (exact types, not user subclasses) with its fastenc counterpart; and run the
    layers of Hugging Face encoders (every family whose attention goes through transformers' attention
    interface: BERT, RoBERTa, XLM-RoBERTa, ELECTRA, DistilBERT, ALBERT, ModernBERT, GTE, ...) on fastenc's
    kernels, warning for a model whose attention is its own code (it stays on torch).

    The fastenc modules are subclasses of the originals with the same state, so parameters, buffers, device,
    dtype, training mode and hooks are kept as they are, and `state_dict` is unchanged. Returns `model`.

    Outputs are torch's at every position, padded ones too; `padding_free=True` (for models that discard padded
    outputs, as pooling does) lets the encoders skip padded positions, which then come out 0.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(type(m).__module__.startswith("transformers.") for m in model.modules()):
        from fastenc import huggingface  # transformers is an optional dependency

        huggingface.convert(model, padding_free)
    swap_classes(model)
    if padding_free:
        from fastenc.nn.transformer import TransformerEncoder, TransformerEncoderLayer

        for module in model.modules():
            if isinstance(module, (TransformerEncoder, TransformerEncoderLayer)):
                module.padding_free = True
    return model
