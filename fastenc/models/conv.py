"""ConvEncoder: token embeddings -> a stack of 1-D convolutions over the sequence -> pooling -> a head."""

from __future__ import annotations

import torch
from torch import Tensor

from fastenc import functional as F
from fastenc.models._common import Encoder, check_choice, check_input_ids, check_positive, classification_head, pool


class ConvLayer(torch.nn.Module):
    """Conv1d (no bias) over (N, S, C) channels-last input, then the fused bias + ReLU + dropout."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bias = torch.nn.Parameter(torch.zeros(out_channels))
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x.transpose(1, 2)).transpose(1, 2).contiguous()  # channels last for the epilogue's rows
        return F.bias_activation(x, self.bias, "relu", self.dropout if self.training else 0.0)


class ConvEncoder(Encoder):
    """`num_layers` Conv1d layers of `channels` filters of width `kernel_size` ("same" length), each followed by
    the fused bias + ReLU + dropout; pad tokens are zeroed before every convolution so that they add nothing.
    pooling: "max" or "mean" over non-pad tokens."""

    def __init__(self, vocab_size: int, embed_dim: int = 64, channels: int = 64, num_layers: int = 2,
                 kernel_size: int = 3, dropout: float = 0.1, pooling: str = "max", num_classes: int | None = None,
                 pad_id: int = 0) -> None:
        super().__init__()
        check_positive(vocab_size=vocab_size, embed_dim=embed_dim, channels=channels, num_layers=num_layers,
                       kernel_size=kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (so the output keeps the input's length), got {kernel_size}")
        check_choice("pooling", pooling, ("max", "mean"))
        self.config = dict(vocab_size=vocab_size, embed_dim=embed_dim, channels=channels, num_layers=num_layers,
                           kernel_size=kernel_size, dropout=dropout, pooling=pooling, num_classes=num_classes,
                           pad_id=pad_id)
        self.pad_id = pad_id
        self.pooling = pooling
        self.hidden_size = channels
        self.embedding = torch.nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.layers = torch.nn.ModuleList(
            ConvLayer(embed_dim if i == 0 else channels, channels, kernel_size, dropout) for i in range(num_layers))
        self.head = classification_head(channels, num_classes, dropout)

    def hidden_states(self, input_ids: Tensor) -> Tensor:
        check_input_ids(input_ids)
        keep = (input_ids != self.pad_id).unsqueeze(-1)
        x = self.embedding(input_ids)
        for layer in self.layers:
            x = layer(x * keep)
        return x * keep

    def encode(self, input_ids: Tensor) -> Tensor:
        return pool(self.hidden_states(input_ids), input_ids == self.pad_id, self.pooling)

    def blocks(self) -> list[torch.nn.Module]:
        return [self.embedding, *self.layers]
