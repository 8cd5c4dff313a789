"""Turning torch.nn modules into their fastenc counterparts in place.

Every fastenc module is a subclass of its torch.nn counterpart with the same state, so replacing one is only a
change of class: parameters, buffers, hooks, device, dtype and training mode stay as they are.
"""

from __future__ import annotations

import torch


def replacements() -> dict[type, type]:
    """torch.nn class -> fastenc class (imported here, at call time, to keep nn's modules free of cycles)."""
    from fastenc import nn

    return {
        torch.nn.LayerNorm: nn.LayerNorm,
        torch.nn.LSTM: nn.LSTM,
        torch.nn.MultiheadAttention: nn.MultiheadAttention,
        torch.nn.TransformerEncoderLayer: nn.TransformerEncoderLayer,
        torch.nn.TransformerEncoder: nn.TransformerEncoder,
    }


def swap_classes(module: torch.nn.Module) -> torch.nn.Module:
    """Give `module` and every submodule whose type is exactly a replaced torch.nn class its fastenc class."""
    table = replacements()
    for sub in module.modules():
        replacement = table.get(type(sub))
        if replacement is not None:
            sub.__class__ = replacement
    return module
