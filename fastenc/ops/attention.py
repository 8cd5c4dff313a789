"""fastenc::attention: scaled dot-product attention as a torch.library custom op, one autograd for all backends.

Contract every implementation follows (reference, kernels/attention.py):
  attention_forward(q, k, v, bias, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    is_causal, scale, dropout_p, dropout_seed) -> (out, lse)
      Padded layout: q (B, H, S_q, D), k / v (B, H, S_k, D); bias None or float broadcast (expanded) to
      (B, H, S_q, S_k); key_padding_mask None or (B, S_k) bool, True = ignore. lse: (B, H, S_q).
      Packed layout (cu_seqlens given, int32 (B + 1,)): q (T_q, H, D), k / v (T_k, H, D), no bias or key
      padding (sequences are their own masks); lse: (H, T_q).
      out is contiguous in q's dtype; lse float32 (float64 for float64 input), +inf for a fully masked row.
      dropout_seed: an int64 scalar tensor when dropout_p > 0 (the same seed gives the same mask).
  attention_backward(dout, q, k, v, out, lse, <the same mask arguments>) -> (dq, dk, dv), contiguous.
The ops take the backend's name (from backends.select, in functional); the backward runs the forward's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastenc import backends
from fastenc.ops import autograd_gradients, forward_op


def _triton_supports(q, *_) -> str | None:
    return "the triton attention supports float16, bfloat16 and float32" if q.dtype == torch.float64 else None


_NATIVE_CPU = backends.native_cpu_feature("attention_cpu_available")  # x86 with AVX2 + FMA, or AVX-512


def _native_supports(q, k, v, bias, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     is_causal, scale, dropout_p, dropout_seed) -> str | None:
    if q.device.type != "cpu":
        return "fastenc._C's attention runs CPU tensors"
    if q.dtype != torch.float32:  # on bf16 / fp16, torch's CPU flash kernel is faster (by far on AMX CPUs)
        return f"the native attention takes float32, got {q.dtype}"
    if dropout_p > 0:
        return "the native attention has no dropout"
    if bias is not None and bias.dtype != torch.float32:
        return f"the native attention takes a float32 attn_mask, got {bias.dtype}"
    return None


def _native_slower(q, k, v, bias, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   is_causal, scale, dropout_p, dropout_seed) -> str | None:
    """The native kernel takes a whole encoder sequence of up to 256 keys in one softmax block, and leads torch's
    CPU flash kernel there (by far on short and packed sequences, where torch runs one call per sequence); past
    one block, without a causal mask, torch's leads its forward (bench/results)."""
    keys = max_seqlen_k if cu_seqlens_k is not None else k.shape[-2]
    if not is_causal and keys > 256:
        return "torch's CPU flash kernel is faster on sequences of more than 256 keys without a causal mask"
    return None


def _torch_supports(q, *_) -> str | None:
    return "torch's attention backend is its CPU flash kernel" if q.device.type != "cpu" else None


_modules = {"reference": "fastenc.reference.attention", "torch": "fastenc.torch_ops.attention",
            "triton": "fastenc.kernels.attention"}
_supports = {"triton": _triton_supports, "torch": _torch_supports}
_slower = {}
# Where this CPU cannot run the native attention, the native backend has no attention (as for an op it lacks):
# selected by name it runs the reference's, and every other op natively, instead of failing every model.
if _NATIVE_CPU:
    _modules["native"], _supports["native"], _slower["native"] = "fastenc.native", _native_supports, _native_slower
backends.register("attention", _modules, supports=_supports, slower=_slower)


@forward_op("fastenc::attention")
def attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, key_padding_mask: Tensor | None,
    cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
    is_causal: bool, scale: float, dropout_p: float, dropout_seed: Tensor | None, backend: str,
) -> tuple[Tensor, Tensor]:
    impl = backends.implementation("attention", backend)
    return impl.attention_forward(q, k, v, bias, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, is_causal, scale, dropout_p, dropout_seed)


@attention.register_fake
def _(q, k, v, bias, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale,
      dropout_p, dropout_seed, backend):
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens_q is not None else q.shape[:3]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=lse_dtype)


@torch.library.custom_op("fastenc::attention_backward", mutates_args=())
def attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bias: Tensor | None,
    key_padding_mask: Tensor | None, cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None, max_seqlen_q: int,
    max_seqlen_k: int, is_causal: bool, scale: float, dropout_p: float, dropout_seed: Tensor | None, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    impl = backends.implementation("attention", backend)
    return impl.attention_backward(dout, q, k, v, out, lse, bias, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                                   max_seqlen_q, max_seqlen_k, is_causal, scale, dropout_p, dropout_seed)


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, *masks):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, *masks = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    bias, key_padding_mask, cu_seqlens_q, cu_seqlens_k, _, _, _, _, _, dropout_seed, _ = masks
    ctx.save_for_backward(q, k, v, out, lse, bias, key_padding_mask, cu_seqlens_q, cu_seqlens_k, dropout_seed)
    ctx.sizes_flags_backend = masks[4:9] + masks[10:]  # max_seqlen_q/k, is_causal, scale, dropout_p, backend


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, bias, key_padding_mask, cu_q, cu_k, seed = ctx.saved_tensors
    max_q, max_k, is_causal, scale, dropout_p, backend = ctx.sizes_flags_backend
    if torch.is_grad_enabled():  # create_graph=True: the gradients are differentiated again
        from fastenc.reference import attention as reference

        out, _ = reference.attention_forward(q, k, v, bias, key_padding_mask, cu_q, cu_k, max_q, max_k, is_causal,
                                             scale, dropout_p, seed)
        return *autograd_gradients((out,), (dout,), (q, k, v), ctx.needs_input_grad), *([None] * 11)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, bias, key_padding_mask, cu_q, cu_k, max_q, max_k,
                                    is_causal, scale, dropout_p, seed, backend)
    return dq, dk, dv, *([None] * 11)


attention.register_autograd(_backward, setup_context=_setup_context)
