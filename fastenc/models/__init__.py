"""Encoder models built on fastenc.nn: text encoders with an optional classification head, and an autoencoder.

Every encoder here shares one small interface, which is all that fastenc.finetune relies on:
  forward(x)        logits (N, num_classes) with a head, else the pooled features (N, hidden_size)
  encode(x)         the pooled features (N, hidden_size)
  blocks()          the encoder's parts from input to output, for freezing and layer-wise learning rates
  head              the classification layer, or None
  config            the constructor's arguments, which identify the architecture in a checkpoint
Token-sequence encoders also have hidden_states(input_ids) -> (N, S, hidden_size) (zeros at padding) and pad_id.
"""

from fastenc.models.autoencoder import Autoencoder
from fastenc.models.bert import from_pretrained_bert
from fastenc.models.conv import ConvEncoder
from fastenc.models.lstm import LSTMEncoder
from fastenc.models.mlp import MLPEncoder
from fastenc.models.transformer import TransformerEncoderModel

__all__ = ["Autoencoder", "ConvEncoder", "LSTMEncoder", "MLPEncoder", "TransformerEncoderModel",
           "from_pretrained_bert"]
