"""fastenc::attention: scaled dot-product attention as a torch.library custom op, one autograd for all backends.

Contract every implementation follows (reference, kernels/attention.py), over one argument record
`AttentionArgs` (below: what each argument is):
  attention_forward(a) -> (out, lse)
      out is contiguous in q's dtype; lse float32 (float64 for float64 input), +inf for a fully masked row:
      (B, H, S_q) padded, (H, T_q) packed.
  attention_backward(dout, out, lse, bias_grad, a) -> (dq, dk, dv, dbias), contiguous; dbias, when bias_grad,
      the gradient of the (expanded) bias: (B, H, S_q, S_k) float32 (float64 for float64 input), else empty.
The ops take the backend's name (from backends.select, in functional); the backward runs the forward's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastenc import backends
from fastenc.ops import accumulation_dtype, autograd_gradients, save_args, saved_args, spec_op


class AttentionArgs(NamedTuple):
    """The attention op's arguments. Padded layout: q (B, H, S_q, D), k / v (B, H, S_k, D); bias None or a float
    additive mask broadcast (expanded) to (B, H, S_q, S_k); key_padding_mask None or (B, S_k) bool, True = ignore.
    Packed layout (cu_seqlens given, int32 (B + 1,)): q (T_q, H, D), k / v (T_k, H, D), no bias or key padding
    (sequences are their own masks), max_seqlen_* at least the longest sequence. dropout_seed: an int64 scalar
    tensor when dropout_p > 0 (the same seed gives the same mask)."""
    q: Tensor
    k: Tensor
    v: Tensor
    bias: Tensor | None
    key_padding_mask: Tensor | None
    cu_seqlens_q: Tensor | None
    cu_seqlens_k: Tensor | None
    max_seqlen_q: int
    max_seqlen_k: int
    is_causal: bool
    scale: float
    dropout_p: float
    dropout_seed: Tensor | None


class AttentionBackwardArgs(NamedTuple):
    """What the backward takes besides the forward's arguments: the output's gradient, the forward's outputs, and
    whether the bias's gradient is wanted (a learned bias: relative positions, ALiBi-like slopes)."""
    dout: Tensor
    out: Tensor
    lse: Tensor
    bias_grad: bool


def _triton_supports(a: AttentionArgs) -> str | None:
    return "the triton attention supports float16, bfloat16 and float32" if a.q.dtype == torch.float64 else None


_NATIVE_CPU = backends.native_cpu_feature("attention_cpu_available")  # x86 with AVX2 + FMA, or AVX-512


def _native_supports(a: AttentionArgs) -> str | None:
    if a.q.device.type != "cpu":
        return "fastenc._C's attention runs CPU tensors"
    if a.q.dtype != torch.float32:  # on bf16 / fp16, torch's CPU flash kernel is faster (by far on AMX CPUs)
        return f"the native attention takes float32, got {a.q.dtype}"
    if a.dropout_p > 0:
        return "the native attention has no dropout"
    if a.bias is not None and a.bias.dtype != torch.float32:
        return f"the native attention takes a float32 attn_mask, got {a.bias.dtype}"
    return None


def _native_slower(a: AttentionArgs) -> str | None:
    """The native kernel takes a whole encoder sequence of up to 256 keys in one softmax block, and leads torch's
    CPU flash kernel there (by far on short and packed sequences, where torch runs one call per sequence); past
    one block, without a causal mask, torch's leads its forward (bench/results)."""
    keys = a.max_seqlen_k if a.cu_seqlens_k is not None else a.k.shape[-2]
    if not a.is_causal and keys > 256:
        return "torch's CPU flash kernel is faster on sequences of more than 256 keys without a causal mask"
    return None


def _torch_supports(a: AttentionArgs) -> str | None:
    return "torch's attention backend is its CPU flash kernel" if a.q.device.type != "cpu" else None


_modules = {"reference": "fastenc.reference.attention", "torch": "fastenc.torch_ops.attention",
            "triton": "fastenc.kernels.attention"}
_supports = {"triton": _triton_supports, "torch": _torch_supports}
_slower = {}
# Where this CPU cannot run the native attention, the native backend has no attention (as for an op it lacks):
# selected by name it runs the reference's, and every other op natively, instead of failing every model.
if _NATIVE_CPU:
    _modules["native"], _supports["native"], _slower["native"] = "fastenc.native", _native_supports, _native_slower
backends.register("attention", _modules, supports=_supports, slower=_slower)


@spec_op("fastenc::attention", AttentionArgs, returns="(Tensor, Tensor)")
def attention(a: AttentionArgs, backend: str) -> tuple[Tensor, Tensor]:
    return backends.implementation("attention", backend).attention_forward(a)


@attention.fake
def _(a):
    lse_shape = (a.q.shape[1], a.q.shape[0]) if a.cu_seqlens_q is not None else a.q.shape[:3]
    return a.q.new_empty(a.q.shape), a.q.new_empty(lse_shape, dtype=accumulation_dtype(a.q.dtype))


@spec_op("fastenc::attention_backward", AttentionBackwardArgs, AttentionArgs,
         returns="(Tensor, Tensor, Tensor, Tensor)")
def attention_backward(g: AttentionBackwardArgs, a: AttentionArgs, backend: str) -> tuple[Tensor, ...]:
    return backends.implementation("attention", backend).attention_backward(*g, a)


@attention_backward.fake
def _(g, a):
    dbias = a.q.new_empty((*a.q.shape[:3], a.k.shape[2]) if g.bias_grad else (0,),
                          dtype=accumulation_dtype(a.q.dtype))
    return a.q.new_empty(a.q.shape), a.k.new_empty(a.k.shape), a.v.new_empty(a.v.shape), dbias


def _setup_context(ctx, inputs, output):
    a, ctx.backend = attention.unflatten(inputs)
    out, lse = output
    ctx.mark_non_differentiable(lse)
    save_args(ctx, a, out, lse)


def _backward(ctx, dout, dlse):
    (out, lse), a = saved_args(ctx)
    unused = [None] * (len(a) - 4 + 1)  # the other arguments and the backend's name take no gradient
    if torch.is_grad_enabled():  # create_graph=True: the gradients are differentiated again
        from fastenc.reference import attention as reference

        out, _ = reference.attention_forward(a)
        return *autograd_gradients((out,), (dout,), a[:4], ctx.needs_input_grad), *unused
    bias_grad = ctx.needs_input_grad[3]
    dq, dk, dv, dbias = attention_backward(dout, out, lse, bias_grad, *a, ctx.backend)
    return dq, dk, dv, dbias.to(a.bias.dtype) if bias_grad else None, *unused


attention.register_autograd(_backward, setup_context=_setup_context)
