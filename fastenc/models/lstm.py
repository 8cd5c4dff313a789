"""LSTMEncoder: token embeddings -> fastenc.nn.LSTM over the packed (padding-free) sequences -> pooling."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastenc import nn
from fastenc.models._common import Encoder, check_choice, check_input_ids, check_positive, classification_head, pool


class LSTMEncoder(Encoder):
    """pooling: "last" (the forward direction's state after the last token; with `bidirectional`, joined with the
    backward direction's state after the first token) or "mean" over non-pad tokens of the outputs.
    hidden_size is `hidden` times the number of directions. Sequences are packed, so padding never enters
    the recurrence in either direction."""

    def __init__(self, vocab_size: int, embed_dim: int = 64, hidden: int = 64, num_layers: int = 1,
                 bidirectional: bool = True, dropout: float = 0.1, pooling: str = "last",
                 num_classes: int | None = None, pad_id: int = 0) -> None:
        super().__init__()
        check_positive(vocab_size=vocab_size, embed_dim=embed_dim, hidden=hidden, num_layers=num_layers)
        check_choice("pooling", pooling, ("last", "mean"))
        self.config = dict(vocab_size=vocab_size, embed_dim=embed_dim, hidden=hidden, num_layers=num_layers,
                           bidirectional=bidirectional, dropout=dropout, pooling=pooling, num_classes=num_classes,
                           pad_id=pad_id)
        self.pad_id = pad_id
        self.pooling = pooling
        self.hidden_size = hidden * (2 if bidirectional else 1)
        self.embedding = torch.nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.dropout = torch.nn.Dropout(dropout)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers, batch_first=True, bidirectional=bidirectional,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.head = classification_head(self.hidden_size, num_classes, dropout)

    def _run(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        check_input_ids(input_ids)
        lengths = (input_ids != self.pad_id).sum(1)
        if bool((lengths == 0).any()):
            raise ValueError("input_ids has a sequence made only of pad tokens; every sequence needs a token")
        packed = pack_padded_sequence(self.dropout(self.embedding(input_ids)), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        out, (h_n, _) = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=input_ids.shape[1])
        return out, h_n

    def hidden_states(self, input_ids: Tensor) -> Tensor:
        """(N, S, hidden_size): the outputs of the last layer (both directions), zeros at pad tokens."""
        return self._run(input_ids)[0]

    def encode(self, input_ids: Tensor) -> Tensor:
        out, h_n = self._run(input_ids)
        if self.pooling == "mean":
            return pool(out, input_ids == self.pad_id, "mean")
        # h_n holds (layers * directions, N, hidden), the last layer's directions last; for packed input each
        # direction's final state is at the sequence's own end (its last token forward, its first backward).
        directions = 2 if self.lstm.bidirectional else 1
        return torch.cat(list(h_n[-directions:]), dim=-1)

    def blocks(self) -> list[torch.nn.Module]:
        return [self.embedding, self.lstm]
