"""The "native" backend: fastenc._C's kernels, which torch's dispatcher knows as torch.ops.fastenc_native.<name>
(schemas and per-device implementations in csrc/fastenc.cpp; importing fastenc._C registers them). Each op's
`<op>_forward` / `<op>_backward` here is the dispatcher op of that name, or (for an op with an argument record)
calls it with the record's fields: the same contract as the other backends' (fastenc/ops/<op>.py)."""

from __future__ import annotations

import torch

import fastenc._C  # noqa: F401  (registers the fastenc_native ops)

_ops = torch.ops.fastenc_native


def attention_forward(a):
    return _ops.attention_forward.default(*a)


def attention_backward(dout, out, lse, bias_grad, a):
    return _ops.attention_backward.default(dout, out, lse, bias_grad, *a)


def bias_activation_forward(a):
    return _ops.bias_activation_forward.default(*a)


def bias_activation_backward(dy, a):
    return _ops.bias_activation_backward.default(dy, *a)


def layer_norm_forward(a):
    return _ops.layer_norm_forward.default(*a)


def layer_norm_backward(b):
    return _ops.layer_norm_backward.default(*b)


def lstm_layer_forward(a):
    return _ops.lstm_layer_forward.default(*a)


def lstm_layer_backward(g, a):
    x, h0, c0, w_ih, w_hh, _, w_hr, batch_sizes, reverse, _ = a
    return _ops.lstm_layer_backward.default(g.d_out, g.d_hn, g.d_cn, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes,
                                            reverse, g.out, g.gates, g.cs, g.rs, g.output_mask)
