"""Drop-in replacements for torch.nn modules."""

from fastenc.nn.activation import MultiheadAttention
from fastenc.nn.normalization import LayerNorm
from fastenc.nn.rnn import LSTM
from fastenc.nn.transformer import TransformerEncoder, TransformerEncoderLayer

__all__ = ["LSTM", "LayerNorm", "MultiheadAttention", "TransformerEncoder", "TransformerEncoderLayer"]
