"""Drop-in replacements for torch.nn modules."""

from fastenc.nn.activation import MultiheadAttention
from fastenc.nn.normalization import LayerNorm

__all__ = ["LayerNorm", "MultiheadAttention"]
