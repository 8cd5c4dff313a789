"""fastenc::bias_activation: dropout(act(x + bias)) over the rows of x, as a torch.library custom op.

Contract every implementation follows (reference, kernels/bias_activation.py), over one argument record
`BiasActivationArgs` (below):
  bias_activation_forward(a) -> y: (M, N) contiguous in x's dtype.
  bias_activation_backward(dy, a) -> (dx, dbias)
      dx in x's dtype; dbias: (N,) in float32 (float64 for float64 x), empty without a bias.
The ops take the backend's name (from backends.select, in functional); the backward runs the forward's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastenc import backends
from fastenc.ops import accumulation_dtype, autograd_gradients, records_grad, save_args, saved_args, spec_op


class BiasActivationArgs(NamedTuple):
    """x: (M, N); bias: (N,) or None (x's dtype, or float32); activation: "relu", "gelu" (exact) or "gelu_tanh";
    dropout_seed: an int64 scalar tensor when dropout_p > 0."""
    x: Tensor
    bias: Tensor | None
    activation: str
    dropout_p: float
    dropout_seed: Tensor | None


def _native_supports(a: BiasActivationArgs) -> str | None:
    return "fastenc._C's bias_activation runs CPU tensors" if a.x.device.type != "cpu" else None


def _native_slower(a: BiasActivationArgs) -> str | None:
    """The native exact GELU keeps its relative accuracy down the left tail (Phi from the upper tail, e^(-z^2/2)
    from an exact square), which costs it more than torch's erf: its forward alone trails torch's on CPUs (AVX2
    and AVX-512 alike, bench/results), while forward + backward, with the bias gradient fused, ties or leads."""
    if (a.activation == "gelu" and a.x.dtype == torch.float32 and a.dropout_p == 0
            and not records_grad(a.x, a.bias)):
        return "torch's exact GELU is faster for a float32 forward without backward"
    return None


backends.register(
    "bias_activation",
    {"reference": "fastenc.reference.bias_activation", "torch": "fastenc.torch_ops.bias_activation",
     "triton": "fastenc.kernels.bias_activation", "native": "fastenc.native"},
    supports={"native": _native_supports}, slower={"native": _native_slower},
)


@spec_op("fastenc::bias_activation", BiasActivationArgs, returns="Tensor")
def bias_activation(a: BiasActivationArgs, backend: str) -> Tensor:
    return backends.implementation("bias_activation", backend).bias_activation_forward(a)


bias_activation.fake(lambda a: a.x.new_empty(a.x.shape))


class BiasActivationBackwardArgs(NamedTuple):
    dy: Tensor


@spec_op("fastenc::bias_activation_backward", BiasActivationBackwardArgs, BiasActivationArgs,
         returns="(Tensor, Tensor)")
def bias_activation_backward(g: BiasActivationBackwardArgs, a: BiasActivationArgs,
                             backend: str) -> tuple[Tensor, Tensor]:
    return backends.implementation("bias_activation", backend).bias_activation_backward(*g, a)


@bias_activation_backward.fake
def _(g, a):
    acc = accumulation_dtype(a.x.dtype)
    return a.x.new_empty(a.x.shape), a.x.new_empty(a.x.shape[1] if a.bias is not None else 0, dtype=acc)


def _setup_context(ctx, inputs, output):
    a, ctx.backend = bias_activation.unflatten(inputs)
    save_args(ctx, a)


def _backward(ctx, dy):
    _, a = saved_args(ctx)
    unused = [None] * (len(a) - 2 + 1)  # activation, dropout and the backend's name take no gradient
    if torch.is_grad_enabled():  # create_graph=True: the gradients are differentiated again
        from fastenc.reference import bias_activation as reference

        y = reference.bias_activation_forward(a)
        return *autograd_gradients((y,), (dy,), a[:2], ctx.needs_input_grad), *unused
    dx, dbias = bias_activation_backward(dy, *a, ctx.backend)
    return dx, (dbias.to(a.bias.dtype) if a.bias is not None else None), *unused


bias_activation.register_autograd(_backward, setup_context=_setup_context)
