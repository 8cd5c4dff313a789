"""Drop-in replacements for torch.nn modules."""

from fastenc.nn.activation import MultiheadAttention
from fastenc.nn.normalization import LayerNorm
from fastenc.nn.transformer import TransformerEncoder, TransformerEncoderLayer

__all__ = ["LayerNorm", "MultiheadAttention", "TransformerEncoder", "TransformerEncoderLayer"]
