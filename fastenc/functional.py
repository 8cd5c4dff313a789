"""fastenc's functional API: drop-ins for torch.nn.functional, checked once here, then one custom op each."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fastenc.ops.layer_norm import AUTOCAST_FLOAT32_DEVICES

__all__ = ["layer_norm"]

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
    if input.device.type in AUTOCAST_FLOAT32_DEVICES and torch.is_autocast_enabled(input.device.type):
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
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, residual, weight, bias)
    )
    store_sum = residual is not None and (return_residual or wants_grad)
    y, summed, _, _ = torch.ops.fastenc.layer_norm(
        rows,
        None if residual is None else residual.reshape(-1, width),
        None if weight is None else weight.reshape(width),
        None if bias is None else bias.reshape(width),
        float(eps),
        store_sum,
    )
    y = y.view(input.shape)
    if not return_residual:
        return y
    return y, (input if residual is None else summed.view(input.shape))
