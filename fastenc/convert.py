"""fastenc.convert: put fastenc's modules into a model that already exists, keeping its weights."""

from __future__ import annotations

import torch

from fastenc.nn._swap import swap_classes


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """Replace, in place, every torch.nn LayerNorm, MultiheadAttention, TransformerEncoderLayer and
    TransformerEncoder in `model` (exact types, not user subclasses) with its fastenc counterpart.

    The fastenc modules are subclasses of torch's with the same state, so parameters, buffers, device, dtype,
    training mode and hooks are kept as they are, and `state_dict` is unchanged. Returns `model`.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return swap_classes(model)
