"""MLPEncoder: feature vectors through Linear (no bias) -> fused bias + activation + dropout layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor

from fastenc import functional as F
from fastenc.functional import ACTIVATIONS
from fastenc.models._common import Encoder, check_choice, check_positive, classification_head


class Dense(torch.nn.Module):
    """A linear layer whose bias is added by the fused bias + activation + dropout epilogue."""

    def __init__(self, in_features: int, out_features: int, activation: str, dropout: float) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(in_features, out_features, bias=False)
        self.bias = torch.nn.Parameter(torch.zeros(out_features))
        self.activation = activation
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        return F.bias_activation(TF.linear(x, self.linear.weight), self.bias, self.activation,
                                 self.dropout if self.training else 0.0)


class MLPEncoder(Encoder):
    """dims = (in_features, hidden, ..., out): one Dense layer per consecutive pair; out is hidden_size.

    With `num_classes`, forward returns logits from a linear head on the last layer's features.
    """

    def __init__(self, dims: Sequence[int] = (128, 64, 32), activation: str = "relu", dropout: float = 0.1,
                 num_classes: int | None = None) -> None:
        super().__init__()
        dims = [int(d) for d in dims]
        if len(dims) < 2:
            raise ValueError(f"dims must list the input size and at least one layer size, got {dims}")
        check_positive(**{f"dims[{i}]": d for i, d in enumerate(dims)})
        check_choice("activation", activation, ACTIVATIONS)
        self.config = dict(dims=dims, activation=activation, dropout=dropout, num_classes=num_classes)
        self.hidden_size = dims[-1]
        self.layers = torch.nn.ModuleList(Dense(a, b, activation, dropout) for a, b in zip(dims, dims[1:]))
        self.head = classification_head(dims[-1], num_classes, dropout)

    def encode(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.shape[-1] != self.config["dims"][0]:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a float tensor (..., {self.config['dims'][0]}), got {shape}")
        for layer in self.layers:
            x = layer(x)
        return x

    def blocks(self) -> list[torch.nn.Module]:
        return list(self.layers)
