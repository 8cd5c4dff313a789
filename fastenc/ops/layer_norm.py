"""fastenc::layer_norm: residual-add + LayerNorm as a torch.library custom op, one autograd for all backends.

The ops take the backend's name (from backends.select, in functional); the backward runs the forward's.
Contract every implementation follows (reference, kernels/layer_norm.py, fastenc.native), over the argument
records LayerNormArgs and LayerNormBackwardArgs (below):
  layer_norm_forward(a) -> (y, sum, mean, rstd)
      y: (M, N) contiguous in x.dtype. sum: x + residual (M, N) when store_sum and residual is given, else an
      empty tensor. mean, rstd: (M,) float32 (float64 for float64 input), of the rounded sum.
  layer_norm_backward(b) -> (dx, dweight, dbias)
      dx also the residual's gradient. dweight / dbias: (N,) in the statistics dtype (the op rounds them to the
      parameters' dtypes), empty when not wanted.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastenc import backends
from fastenc.ops import accumulation_dtype, autograd_gradients, spec_op


class LayerNormArgs(NamedTuple):
    """x, residual: (M, N), the same dtype; weight, bias: (N,) or None, in x.dtype or (for half / bfloat16 x)
    float32, as torch allows. store_sum: return x + residual (what a pre-norm block carries on, and what the
    backward normalises again)."""
    x: Tensor
    residual: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    store_sum: bool


class LayerNormBackwardArgs(NamedTuple):
    """xs: what was normalised (the stored sum, or x); dsum, when given, the gradient of the returned sum, added
    into dx; mean, rstd: the forward's; has_bias: whether dbias is wanted."""
    dy: Tensor
    dsum: Tensor | None
    xs: Tensor
    weight: Tensor | None
    mean: Tensor
    rstd: Tensor
    has_bias: bool


# The Triton kernels hold a whole row on chip.
TRITON_MAX_N = 65536


def _triton_supports(a: LayerNormArgs) -> str | None:
    if a.x.shape[1] > TRITON_MAX_N:
        return f"the triton layer_norm holds a row on chip and supports N <= {TRITON_MAX_N}, got N={a.x.shape[1]}"
    return None


backends.register(
    "layer_norm",
    {"reference": "fastenc.reference.layer_norm", "torch": "fastenc.torch_ops.layer_norm",
     "triton": "fastenc.kernels.layer_norm", "native": "fastenc.native"},
    supports={"triton": _triton_supports},
)


@spec_op("fastenc::layer_norm", LayerNormArgs, returns="(Tensor, Tensor, Tensor, Tensor)")
def layer_norm(a: LayerNormArgs, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return backends.implementation("layer_norm", backend).layer_norm_forward(a)


@layer_norm.fake
def _(a):
    rows = a.x.shape[0]
    summed = a.x.new_empty(a.x.shape) if a.store_sum and a.residual is not None else a.x.new_empty(0)
    stats = accumulation_dtype(a.x.dtype)
    return a.x.new_empty(a.x.shape), summed, a.x.new_empty(rows, dtype=stats), a.x.new_empty(rows, dtype=stats)


@spec_op("fastenc::layer_norm_backward", LayerNormBackwardArgs, returns="(Tensor, Tensor, Tensor)")
def layer_norm_backward(b: LayerNormBackwardArgs, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return backends.implementation("layer_norm", backend).layer_norm_backward(b)


@layer_norm_backward.fake
def _(b):
    width = b.xs.shape[1]
    dweight = b.mean.new_empty(width if b.weight is not None else 0)
    dbias = b.mean.new_empty(width if b.has_bias else 0)
    return b.xs.new_empty(b.xs.shape), dweight, dbias


def _setup_context(ctx, inputs, output):
    (x, residual, weight, bias, _, store_sum), ctx.backend = layer_norm.unflatten(inputs)
    _, summed, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    # An unused output's gradient stays None: materialised, the stored sum's would be a full (M, N) tensor of
    # zeros, filled and then read by the backward kernel, on every step that does not return the sum.
    ctx.set_materialize_grads(False)
    # Without the stored sum the backward has nothing to normalise; functional stores it whenever a gradient may
    # be needed, so only a direct call of the op can get here.
    ctx.saves_input = residual is None or store_sum
    ctx.has_residual = residual is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x if residual is None else summed, weight, mean, rstd)


def _backward(ctx, dy, dsum, dmean, drstd):
    if not ctx.saves_input:
        raise RuntimeError("fastenc::layer_norm was called with a residual and store_sum=False: it cannot backward")
    xs, weight, mean, rstd = ctx.saved_tensors
    if dsum is not None and dsum.numel() == 0:
        dsum = None
    if dy is None:  # only the stored sum was used
        dy = torch.zeros_like(xs)
    has_bias = ctx.bias_dtype is not None
    dx, dweight, dbias = layer_norm_backward(dy, dsum, xs, weight, mean, rstd, has_bias, ctx.backend)
    return (
        dx,
        dx if ctx.has_residual else None,
        dweight.to(weight.dtype) if weight is not None else None,
        dbias.to(ctx.bias_dtype) if has_bias else None,
        None,
        None,
        None,
    )


layer_norm.register_autograd(_backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output):
    (dy, dsum, xs, weight, _, rstd, ctx.has_bias), _ = layer_norm_backward.unflatten(inputs)
    ctx.save_for_backward(dy, dsum, xs, weight, rstd)


def _double_backward(ctx, ddx, ddweight, ddbias):
    """The backward's own gradients (gradient penalties, Hessian-vector products): the reference's backward run
    again under autograd, with mean and rstd recomputed from xs so that their dependence on it is differentiated
    (eps is recovered from the saved rstd, which that recomputation then reproduces)."""
    from fastenc.reference import layer_norm as reference

    dy, dsum, xs, weight, rstd = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_() for t in (dy, dsum, xs, weight)]
        xf = leaves[2].to(rstd.dtype)
        var = xf.var(dim=-1, unbiased=False)
        eps = (rstd.double().reciprocal().square() - var.detach().double()).to(rstd.dtype)
        outputs = reference.layer_norm_backward(LayerNormBackwardArgs(*leaves, xf.mean(dim=-1),
                                                                      torch.rsqrt(var + eps), ctx.has_bias))
        # The leaves are detached copies: a graph of these gradients would not reach the real inputs.
        grads = autograd_gradients(outputs, (ddx, ddweight, ddbias), leaves, [t is not None for t in leaves],
                                   create_graph=False)
    return *grads, None, None, None, None


layer_norm_backward.register_autograd(_double_backward, setup_context=_setup_backward_context)

# Under CUDA autocast torch runs layer_norm in float32, and so does fastenc. CPU autocast leaves torch's
# layer_norm alone (half / bfloat16 input with float32 parameters stays mixed), and fastenc's too.
AUTOCAST_FLOAT32_DEVICES = ("cuda",)
for _device_type in AUTOCAST_FLOAT32_DEVICES:
    torch.library.register_autocast("fastenc::layer_norm", _device_type, torch.float32)
