"""Autoencoder: an encoder and a decoder, trained by reconstruction; the encoder is then fine-tuned alone."""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import Tensor


class Autoencoder(torch.nn.Module):
    """decoder(encoder.encode(x)) reconstructs x. The encoder is any fastenc.models encoder of vectors (its head,
    if any, is bypassed); the decoder maps its hidden_size back to x's size (e.g. an MLPEncoder whose head has
    x's size as num_classes, so that its output is linear)."""

    def __init__(self, encoder: torch.nn.Module, decoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.config = dict(encoder=encoder.config, decoder=decoder.config)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder.encode(x))

    def reconstruction_loss(self, x: Tensor) -> Tensor:
        """Mean squared error of the reconstruction of x."""
        out = self(x)
        if out.shape != x.shape:
            raise ValueError(f"the decoder's output has shape {tuple(out.shape)} but x has {tuple(x.shape)}; "
                             "the decoder must map back to x's size")
        return TF.mse_loss(out, x)
