"""fastenc's functional API: drop-ins for torch.nn.functional, checked once here, then one custom op each."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fastenc import backends
from fastenc.ops import attention as _attention_op
from fastenc.ops import bias_activation as _bias_activation_op
from fastenc.ops import layer_norm as _layer_norm_op
from fastenc.ops import lstm as _lstm_op
from fastenc.ops import records_grad, run
from fastenc.ops.attention import AttentionArgs
from fastenc.ops.bias_activation import BiasActivationArgs
from fastenc.ops.layer_norm import AUTOCAST_FLOAT32_DEVICES, LayerNormArgs
from fastenc.ops.lstm import LstmArgs

__all__ = ["attention", "attention_varlen", "bias_activation", "layer_norm", "lstm_layer"]

ACTIVATIONS = ("relu", "gelu", "gelu_tanh")

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_like(name: str, t: Tensor | None, ref: Tensor, shape: Sequence[int], dtypes: Sequence[torch.dtype]) -> None:
    """Raise an error naming `name` unless `t` has `shape`, ref's device and one of `dtypes` (any, if empty)."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but input is on {ref.device}")
    if dtypes and t.dtype not in dtypes:
        allowed = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype} but input has {ref.dtype}; expected {allowed}")


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    residual: Tensor | None = None,
    return_residual: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """`torch.nn.functional.layer_norm`, optionally fused with a residual add.

    With `residual`, normalises `input + residual` in one pass (the sum is rounded to input's dtype first, as
    `input + residual` would be). With `return_residual=True` returns `(output, input + residual)`: the
    un-normalised sum that a pre-norm block carries to its next residual add.
    Under CUDA autocast the op runs in float32, as torch's layer_norm does.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or any(not isinstance(d, int) or d <= 0 for d in shape):
        raise ValueError(f"normalized_shape must be a non-empty sequence of positive ints, got {normalized_shape!r}")
    if tuple(input.shape[input.dim() - len(shape):]) != shape or input.dim() < len(shape):
        raise ValueError(
            f"normalized_shape {shape} does not match the trailing dimensions of input {tuple(input.shape)}"
        )
    device_type = input.device.type
    if device_type in AUTOCAST_FLOAT32_DEVICES and torch.is_autocast_enabled(device_type):
        same, params = (), ()  # the op's autocast rule casts every input to float32
    else:
        # Half / bfloat16 input may come with float32 parameters, as torch's layer_norm allows.
        same = (input.dtype,)
        params = same + ((torch.float32,) if input.dtype in (torch.float16, torch.bfloat16) else ())
    _check_like("weight", weight, input, shape, params)
    _check_like("bias", bias, input, shape, params)
    _check_like("residual", residual, input, input.shape, same)

    width = math.prod(shape)
    rows = input.reshape(-1, width)
    store_sum = residual is not None and (return_residual or records_grad(input, residual, weight, bias))
    args = LayerNormArgs(rows, None if residual is None else residual.reshape(-1, width), _flat(weight), _flat(bias),
                         float(eps), store_sum)
    y, summed, _, _ = run(_layer_norm_op.layer_norm, *args, backends.select("layer_norm", device_type, args))
    y = y.view_as(input)
    if not return_residual:
        return y
    return y, (input if residual is None else summed.view_as(input))


def _flat(param: Tensor | None) -> Tensor | None:
    """A LayerNorm parameter as the (N,) vector the op takes (it is one already unless normalized_shape has
    several dimensions; reshaping it anyway costs a view per call)."""
    return param if param is None or param.dim() == 1 else param.reshape(-1)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, rank: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}; they must match")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape {layout}, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1] or q.shape[-2 if rank == 3 else 1] != k.shape[-2 if rank == 3 else 1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in heads and head dim {layout}")


def _autocast_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Under autocast attention runs in the autocast dtype, as torch's scaled_dot_product_attention does."""
    device = q.device.type
    if not torch.is_autocast_enabled(device):
        return q, k, v
    low = torch.get_autocast_dtype(device)
    return q.to(low), k.to(low), v.to(low)


def _dropout_seed(dropout_p: float) -> Tensor | None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    # Drawn from torch's generator, so torch.manual_seed makes dropout reproducible.
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if dropout_p > 0 else None


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Fused attention of q (B, H, S_q, D), k and v (B, H, S_k, D), as `scaled_dot_product_attention`.

    attn_mask: bool (True = may attend, as in scaled_dot_product_attention) or an additive float mask,
    broadcastable to (B, H, S_q, S_k); a float mask that requires grad (a learned bias) gets its gradient.
    key_padding_mask: (B, S_k) bool, True = ignore that key (as nn.MultiheadAttention). is_causal: query i sees
    keys j <= i (with attn_mask too, if given). A query that may see no key gets output 0 (and zero gradients),
    not NaN. dropout_p applies whenever > 0.
    """
    _check_qkv(q, k, v, 4, "(B, H, S, D)")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    batch, heads, s_q, head_dim = q.shape
    s_k = k.shape[2]
    q, k, v = _autocast_qkv(q, k, v)
    bias = None
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor) or not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
            raise TypeError("attn_mask must be a bool or floating-point Tensor")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
        try:
            bias = attn_mask.expand(batch, heads, s_q, s_k)
        except RuntimeError:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (B, H, S_q, S_k) = "
                f"{(batch, heads, s_q, s_k)}"
            ) from None
        if bias.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
                ~attn_mask, float("-inf")).expand(batch, heads, s_q, s_k)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool Tensor (True = ignore that key)")
        if tuple(key_padding_mask.shape) != (batch, s_k) or key_padding_mask.device != q.device:
            raise ValueError(
                f"key_padding_mask must have shape (B, S_k) = {(batch, s_k)} on {q.device}, got "
                f"{tuple(key_padding_mask.shape)} on {key_padding_mask.device}"
            )
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    args = AttentionArgs(q, k, v, bias, key_padding_mask, None, None, s_q, s_k, bool(is_causal), scale,
                         float(dropout_p), _dropout_seed(dropout_p))
    out, _ = run(_attention_op.attention, *args, backends.select("attention", q.device.type, args))
    return out


def _check_cu_seqlens(name: str, cu: Tensor, tokens: int, device: torch.device, max_name: str,
                      max_seqlen: int | None) -> tuple[Tensor, int]:
    """cu as int32 and the launch's sequence length: max_seqlen, or the longest sequence when it is None."""
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.numel() < 2 or cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-D int32 tensor of B + 1 cumulative lengths starting at 0")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    lengths = cu.diff()
    if cu.device.type == "cpu":  # on a GPU these checks would cost a synchronisation per call
        if int(cu[0]) != 0 or int(cu[-1]) != tokens or bool((lengths < 0).any()):
            raise ValueError(f"{name} must rise from 0 to the number of tokens ({tokens}), got {cu.tolist()}")
        # A smaller max_seqlen would leave the tokens past it uncomputed.
        if max_seqlen is not None and max_seqlen < int(lengths.max()):
            raise ValueError(f"{max_name} ({max_seqlen}) is less than the longest sequence in {name} "
                             f"({int(lengths.max())})")
    return cu.to(torch.int32), int(lengths.max()) if max_seqlen is None else int(max_seqlen)


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Attention over packed sequences: q (T_q, H, D), k and v (T_k, H, D); sequence i holds the tokens
    cu_seqlens[i]:cu_seqlens[i + 1]. Equals `attention` of the padded batch with a key padding mask, at the
    packed tokens, without computing the padding. max_seqlen_* must be at least the longest sequence (they size
    the launch); None computes them from cu_seqlens (a synchronisation on a GPU).
    """
    _check_qkv(q, k, v, 3, "(T, H, D)")
    cu_q, max_seqlen_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, "max_seqlen_q",
                                           max_seqlen_q)
    cu_k, max_seqlen_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, "max_seqlen_k",
                                           max_seqlen_k)
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe as many sequences, got "
                         f"{cu_q.numel() - 1} and {cu_k.numel() - 1}")
    q, k, v = _autocast_qkv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    args = AttentionArgs(q, k, v, None, None, cu_q, cu_k, max_seqlen_q, max_seqlen_k, bool(is_causal), scale,
                         float(dropout_p), _dropout_seed(dropout_p))
    out, _ = run(_attention_op.attention, *args, backends.select("attention", q.device.type, args))
    return out


def bias_activation(input: Tensor, bias: Tensor | None, activation: str = "relu", dropout_p: float = 0.0) -> Tensor:
    """`dropout(act(input + bias), dropout_p)` in one pass over the last dimension's rows: the epilogue of a
    feed-forward block's first linear layer. activation: "relu", "gelu" (exact, erf) or "gelu_tanh".
    Dropout applies whenever dropout_p > 0 (pass 0 in evaluation), with a mask regenerated in the backward.
    """
    if not isinstance(input, Tensor) or input.dtype not in _FLOAT_DTYPES or input.dim() == 0:
        raise TypeError("input must be a floating-point Tensor with at least one dimension")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    width = input.shape[-1]
    lowp = (torch.float32,) if input.dtype in (torch.float16, torch.bfloat16) else ()
    _check_like("bias", bias, input, (width,), (input.dtype, *lowp))
    args = BiasActivationArgs(input.reshape(-1, width), bias, activation, float(dropout_p), _dropout_seed(dropout_p))
    y = run(_bias_activation_op.bias_activation, *args, backends.select("bias_activation", input.device.type, args))
    return y.view_as(input)


def _check_batch_sizes(batch_sizes: Tensor, rows: int) -> int:
    """The batch size of a packed input (batch_sizes[0]), after checking batch_sizes as PackedSequence makes it."""
    if not isinstance(batch_sizes, Tensor) or batch_sizes.dim() != 1 or batch_sizes.dtype != torch.int64:
        raise ValueError("batch_sizes must be a 1-D int64 tensor (PackedSequence.batch_sizes)")
    if batch_sizes.device.type != "cpu":
        raise ValueError(f"batch_sizes must be on the CPU, as PackedSequence keeps it, got {batch_sizes.device}")
    if batch_sizes.numel() == 0 or int(batch_sizes[-1]) < 1 or bool((batch_sizes[1:] > batch_sizes[:-1]).any()):
        raise ValueError(f"batch_sizes must be positive and non-increasing, got {batch_sizes.tolist()}")
    if int(batch_sizes.sum()) != rows:
        raise ValueError(f"batch_sizes sum to {int(batch_sizes.sum())} but input has {rows} rows")
    return int(batch_sizes[0])


def lstm_layer(
    input: Tensor,
    h0: Tensor | None,
    c0: Tensor | None,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None = None,
    bias_hh: Tensor | None = None,
    weight_hr: Tensor | None = None,
    *,
    batch_sizes: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer in one direction, as one layer of `torch.nn.LSTM`: returns (output, h_n, c_n).

    input: (T, B, input_size), or the (N, input_size) data of a PackedSequence with its `batch_sizes` (sorted by
    length; output is then packed the same way). h0: (B, P), c0: (B, H) or None for zeros, where H is the hidden
    size (weight_ih is (4H, input_size), gates i, f, g, o) and P the projection size (weight_hr (P, H)) or H.
    reverse=True runs the sequence backwards (the second direction of a bidirectional LSTM).
    The layer is the fused op fastenc::lstm_layer: the input projection of all steps as one GEMM (on AVX-512
    CPUs, inside each step's fused kernel), then the recurrence; or, where that is not the faster, torch's own
    LSTM op (the "torch" backend).
    Under autocast the layer runs in the autocast dtype, as torch's LSTM does.
    """
    if not isinstance(input, Tensor) or input.dtype not in _FLOAT_DTYPES:
        raise TypeError("input must be a float16, bfloat16, float32 or float64 Tensor")
    packed = batch_sizes is not None
    if input.dim() != (2 if packed else 3):
        raise ValueError(f"input must be {'(N, input_size) with batch_sizes' if packed else '(T, B, input_size)'}, "
                         f"got shape {tuple(input.shape)}")
    if not isinstance(weight_ih, Tensor) or weight_ih.dim() != 2 or weight_ih.shape[0] % 4:
        raise ValueError("weight_ih must be a (4 * hidden_size, input_size) Tensor")
    if not isinstance(weight_hh, Tensor):
        raise TypeError(f"weight_hh must be a Tensor, got {type(weight_hh).__name__}")
    hidden = weight_ih.shape[0] // 4
    proj = hidden if weight_hr is None else (weight_hr.shape[0] if isinstance(weight_hr, Tensor) else -1)
    batch = _check_batch_sizes(batch_sizes, input.shape[0]) if packed else input.shape[1]
    if torch.is_autocast_enabled(input.device.type):
        low = torch.get_autocast_dtype(input.device.type)
        cast = lambda t: t if t is None else t.to(low)  # noqa: E731
        input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr = map(
            cast, (input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr))
    same = (input.dtype,)
    _check_like("weight_ih", weight_ih, input, (4 * hidden, input.shape[-1]), same)
    _check_like("weight_hr", weight_hr, input, (proj, hidden), same)  # before weight_hh, whose shape uses proj
    _check_like("weight_hh", weight_hh, input, (4 * hidden, proj), same)
    _check_like("bias_ih", bias_ih, input, (4 * hidden,), same)
    _check_like("bias_hh", bias_hh, input, (4 * hidden,), same)
    _check_like("h0", h0, input, (batch, proj), same)
    _check_like("c0", c0, input, (batch, hidden), same)
    h0 = input.new_zeros(batch, proj) if h0 is None else h0
    c0 = input.new_zeros(batch, hidden) if c0 is None else c0
    bias = bias_ih if bias_hh is None else (bias_hh if bias_ih is None else bias_ih + bias_hh)
    # What the backward needs is stored only when a backward can run.
    save = records_grad(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr)
    args = LstmArgs(input, h0, c0, weight_ih, weight_hh, bias, weight_hr, batch_sizes, bool(reverse), save)
    backend = backends.select("lstm", input.device.type, args)
    if backend == "torch":
        return backends.implementation("lstm", backend).lstm_layer(args)
    out, h_n, c_n, *_ = run(_lstm_op.lstm_layer, *args, backend)
    return out, h_n, c_n
