"""TransformerEncoderModel: token embeddings + positions + fastenc.nn.TransformerEncoder + pooling + a head."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastenc import nn
from fastenc.models._common import Encoder, check_choice, check_input_ids, check_positive, classification_head, pool

POSITIONS = ("sinusoidal", "learned")


def sinusoidal_positions(max_len: int, d_model: int) -> Tensor:
    """(max_len, d_model): sin at even and cos at odd features, wavelengths from 2*pi to 10000*2*pi."""
    position = torch.arange(max_len, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : d_model // 2]
    return table


class Embeddings(torch.nn.Module):
    """token + position (+ token type 0) embeddings, an optional LayerNorm (BERT has one), dropout."""

    def __init__(self, vocab_size: int, d_model: int, max_len: int, positions: str, pad_id: int,
                 type_vocab_size: int, embedding_norm: bool, layer_norm_eps: float, dropout: float) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        if positions == "learned":
            self.positions = torch.nn.Embedding(max_len, d_model)
        else:  # a buffer, not saved: it is a function of the shape
            self.register_buffer("sinusoid", sinusoidal_positions(max_len, d_model), persistent=False)
        self.token_types = torch.nn.Embedding(type_vocab_size, d_model) if type_vocab_size else None
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps) if embedding_norm else None
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, input_ids: Tensor) -> Tensor:
        seq_len = input_ids.shape[1]
        table = self.positions.weight if hasattr(self, "positions") else self.sinusoid
        if seq_len > table.shape[0]:
            raise ValueError(f"input_ids has {seq_len} positions but the model has max_len = {table.shape[0]}")
        x = self.tokens(input_ids) + table[:seq_len]
        if self.token_types is not None:  # every token is of type 0 (one-segment input)
            x = x + self.token_types.weight[0]
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


class TransformerEncoderModel(Encoder):
    """A text encoder: embeddings, `num_layers` fastenc encoder layers (batch first), pooling, optional head.

    Pad tokens (`pad_id`) become the encoder's padding mask, so the layers run padding-free on packed tokens.
    pooling: "cls" (the first token) or "mean" (over non-pad tokens). With `num_classes`, forward returns logits.
    `embedding_norm`, `type_vocab_size`, `activation="gelu"` and `layer_norm_eps` cover BERT checkpoints
    (see from_pretrained_bert).
    """

    def __init__(self, vocab_size: int, d_model: int = 64, nhead: int = 4, num_layers: int = 2,
                 dim_feedforward: int | None = None, dropout: float = 0.1, max_len: int = 512,
                 positions: str = "sinusoidal", pooling: str = "cls", num_classes: int | None = None,
                 pad_id: int = 0, activation: str = "relu", norm_first: bool = False, layer_norm_eps: float = 1e-5,
                 embedding_norm: bool = False, type_vocab_size: int = 0) -> None:
        super().__init__()
        dim_feedforward = 4 * d_model if dim_feedforward is None else dim_feedforward
        check_positive(vocab_size=vocab_size, d_model=d_model, nhead=nhead, num_layers=num_layers,
                       dim_feedforward=dim_feedforward, max_len=max_len)
        check_choice("positions", positions, POSITIONS)
        check_choice("pooling", pooling, ("cls", "mean"))
        check_choice("activation", activation, ("relu", "gelu"))
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id must be a token id in [0, vocab_size = {vocab_size}), got {pad_id}")
        self.config = dict(vocab_size=vocab_size, d_model=d_model, nhead=nhead, num_layers=num_layers,
                           dim_feedforward=dim_feedforward, dropout=dropout, max_len=max_len, positions=positions,
                           pooling=pooling, num_classes=num_classes, pad_id=pad_id, activation=activation,
                           norm_first=norm_first, layer_norm_eps=layer_norm_eps, embedding_norm=embedding_norm,
                           type_vocab_size=type_vocab_size)
        self.pad_id = pad_id
        self.pooling = pooling
        self.hidden_size = d_model
        self.embeddings = Embeddings(vocab_size, d_model, max_len, positions, pad_id, type_vocab_size,
                                     embedding_norm, layer_norm_eps, dropout)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                           layer_norm_eps=layer_norm_eps, batch_first=True, norm_first=norm_first)
        # A pre-norm stack ends un-normalised: it gets a final LayerNorm, as in most pre-norm models.
        final_norm = nn.LayerNorm(d_model, eps=layer_norm_eps) if norm_first else None
        # Pooling and the head read real tokens only: padded positions are skipped (and come out 0).
        self.encoder = nn.TransformerEncoder(layer, num_layers, norm=final_norm, enable_nested_tensor=False,
                                             padding_free=True)
        self.head = classification_head(d_model, num_classes, dropout)

    def hidden_states(self, input_ids: Tensor) -> Tensor:
        """(N, S, d_model) after the last layer; zeros at pad tokens."""
        check_input_ids(input_ids)
        return self.encoder(self.embeddings(input_ids), src_key_padding_mask=input_ids == self.pad_id)

    def encode(self, input_ids: Tensor) -> Tensor:
        return pool(self.hidden_states(input_ids), input_ids == self.pad_id, self.pooling)

    def blocks(self) -> list[torch.nn.Module]:
        blocks = [self.embeddings, *self.encoder.layers]
        return blocks if self.encoder.norm is None else blocks + [self.encoder.norm]
