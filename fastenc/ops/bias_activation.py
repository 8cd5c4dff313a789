"""fastenc::bias_activation: dropout(act(x + bias)) over the rows of x, as a torch.library custom op.

Contract every implementation follows (reference, kernels/bias_activation.py):
  bias_activation_forward(x, bias, activation, dropout_p, dropout_seed) -> y
      x: (M, N); bias: (N,) or None (x's dtype, or float32); activation: "relu", "gelu" (exact) or "gelu_tanh";
      dropout_seed: an int64 scalar tensor when dropout_p > 0. y: (M, N) contiguous in x's dtype.
  bias_activation_backward(dy, x, bias, activation, dropout_p, dropout_seed) -> (dx, dbias)
      dx in x's dtype; dbias: (N,) in float32 (float64 for float64 x), empty without a bias.
The ops take the backend's name (from backends.select, in functional); the backward runs the forward's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastenc import backends
from fastenc.ops import autograd_gradients, forward_op, records_grad


def _native_supports(x, *_) -> str | None:
    return "fastenc._C's bias_activation runs CPU tensors" if x.device.type != "cpu" else None


def _native_slower(x, bias, activation, dropout_p, _seed) -> str | None:
    """The native exact GELU keeps its relative accuracy down the left tail (Phi from the upper tail, e^(-z^2/2)
    from an exact square), which costs it more than torch's erf: its forward alone trails torch's on CPUs (AVX2
    and AVX-512 alike, bench/results), while forward + backward, with the bias gradient fused, ties or leads."""
    if activation == "gelu" and x.dtype == torch.float32 and dropout_p == 0 and not records_grad(x, bias):
        return "torch's exact GELU is faster for a float32 forward without backward"
    return None


backends.register(
    "bias_activation",
    {"reference": "fastenc.reference.bias_activation", "torch": "fastenc.torch_ops.bias_activation",
     "triton": "fastenc.kernels.bias_activation", "native": "fastenc.native"},
    supports={"native": _native_supports}, slower={"native": _native_slower},
)


@forward_op("fastenc::bias_activation")
def bias_activation(x: Tensor, bias: Tensor | None, activation: str, dropout_p: float, dropout_seed: Tensor | None,
                    backend: str) -> Tensor:
    impl = backends.implementation("bias_activation", backend)
    return impl.bias_activation_forward(x, bias, activation, dropout_p, dropout_seed)


@bias_activation.register_fake
def _(x, bias, activation, dropout_p, dropout_seed, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastenc::bias_activation_backward", mutates_args=())
def bias_activation_backward(dy: Tensor, x: Tensor, bias: Tensor | None, activation: str, dropout_p: float,
                             dropout_seed: Tensor | None, backend: str) -> tuple[Tensor, Tensor]:
    impl = backends.implementation("bias_activation", backend)
    return impl.bias_activation_backward(dy, x, bias, activation, dropout_p, dropout_seed)


@bias_activation_backward.register_fake
def _(dy, x, bias, activation, dropout_p, dropout_seed, backend):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape), x.new_empty(x.shape[1] if bias is not None else 0, dtype=acc)


def _setup_context(ctx, inputs, output):
    x, bias, ctx.activation, ctx.dropout_p, dropout_seed, ctx.backend = inputs
    ctx.save_for_backward(x, bias, dropout_seed)


def _backward(ctx, dy):
    x, bias, seed = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the gradients are differentiated again
        from fastenc.reference import bias_activation as reference

        y = reference.bias_activation_forward(x, bias, ctx.activation, ctx.dropout_p, seed)
        return *autograd_gradients((y,), (dy,), (x, bias), ctx.needs_input_grad), None, None, None, None
    dx, dbias = bias_activation_backward(dy, x, bias, ctx.activation, ctx.dropout_p, seed, ctx.backend)
    return dx, (dbias.to(bias.dtype) if bias is not None else None), None, None, None, None


bias_activation.register_autograd(_backward, setup_context=_setup_context)
