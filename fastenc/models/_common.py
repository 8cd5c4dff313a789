"""Pieces the encoders share: pooling over non-pad tokens, the classification head, argument checks."""

from __future__ import annotations

import torch
from torch import Tensor

def check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_input_ids(input_ids: Tensor) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be an integer tensor (N, S), got {shape}")


def pool(hidden: Tensor, padding: Tensor, how: str) -> Tensor:
    """hidden (N, S, H), padding (N, S) True = pad -> (N, H): the first token ("cls"), or the mean or max over
    non-pad tokens."""
    if how == "cls":
        return hidden[:, 0]
    valid = (~padding).unsqueeze(-1)
    if how == "mean":
        return (hidden * valid).sum(1) / valid.sum(1).clamp(min=1)
    return hidden.masked_fill(~valid, float("-inf")).amax(1)


def classification_head(hidden_size: int, num_classes: int | None, dropout: float) -> torch.nn.Module | None:
    if num_classes is None:
        return None
    check_positive(num_classes=num_classes)
    return torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(hidden_size, num_classes))


class Encoder(torch.nn.Module):
    """What every encoder model shares: forward is the optional classification head over `encode`."""

    head: torch.nn.Module | None

    def forward(self, inputs: Tensor) -> Tensor:
        pooled = self.encode(inputs)
        return pooled if self.head is None else self.head(pooled)
