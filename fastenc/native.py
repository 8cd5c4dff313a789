"""The "native" backend: fastenc._C's kernels, which torch's dispatcher knows as torch.ops.fastenc_native.<name>
(schemas and per-device implementations in csrc/fastenc.cpp; importing fastenc._C registers them). Each op's
`<op>_forward` / `<op>_backward` here is the dispatcher op of that name: the same contract as the other backends'
(fastenc/ops/<op>.py)."""

from __future__ import annotations

import torch

import fastenc._C  # noqa: F401  (registers the fastenc_native ops)

_ops = torch.ops.fastenc_native

attention_forward = _ops.attention_forward.default
attention_backward = _ops.attention_backward.default
bias_activation_forward = _ops.bias_activation_forward.default
bias_activation_backward = _ops.bias_activation_backward.default
layer_norm_forward = _ops.layer_norm_forward.default
layer_norm_backward = _ops.layer_norm_backward.default
lstm_layer_forward = _ops.lstm_layer_forward.default
lstm_layer_backward = _ops.lstm_layer_backward.default
