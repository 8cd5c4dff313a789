"""bfloat16 in Triton's interpreter as on a GPU: a test-side patch, installed by conftest under TRITON_INTERPRET=1.

The interpreter keeps bf16 tensors as their raw uint16 bits (numpy has no bfloat16), and three of its operations
then go wrong: `tl.dot` multiplies the raw integers (triton issue #11584), a float32 -> bf16 cast truncates instead
of rounding to nearest even, and a float64 -> bf16 cast reinterprets the wrong bits. A GPU's dot multiplies bf16
operands exactly and accumulates in float32 (tensor cores), and its casts round to nearest even; `install()` makes
the interpreter do the same for these three, and nothing else. tests/test_triton_bf16.py shows the patch is
needed and what it computes.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import triton.language as tl
from triton.runtime import interpreter

_builder = interpreter.InterpreterBuilder
_ORIGINAL = {name: getattr(_builder, name) for name in ("create_dot", "cast_impl", "create_fp_to_fp")}


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round to nearest, ties to even (NaN stays a quiet NaN)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def _as_float32(handle) -> np.ndarray:
    if handle.dtype.scalar == tl.bfloat16:
        return bf16_bits_to_float32(handle.data)
    return handle.data.astype(np.float32)


def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
        return _ORIGINAL["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)
    product = np.matmul(_as_float32(a), _as_float32(b), dtype=np.float32)
    return interpreter.TensorHandle(product.astype(d.data.dtype) + d.data, d.dtype.scalar)


def _cast(original):
    def cast(self, src, dst_type, *rest):
        to, of = dst_type.scalar, src.dtype.scalar
        if to == tl.bfloat16 and of.is_floating() and of != tl.bfloat16:
            return interpreter.TensorHandle(float32_to_bf16_bits(src.data.astype(np.float32)), tl.bfloat16)
        if of == tl.bfloat16 and to.is_floating() and to != tl.bfloat16:
            return interpreter.TensorHandle(bf16_bits_to_float32(src.data).astype(interpreter._get_np_dtype(to)), to)
        return original(self, src, dst_type, *rest)
    return cast


_PATCHED = {"create_dot": _create_dot, "cast_impl": _cast(_ORIGINAL["cast_impl"]),
            "create_fp_to_fp": _cast(_ORIGINAL["create_fp_to_fp"])}


def install() -> None:
    for name, fn in _PATCHED.items():
        setattr(_builder, name, fn)


@contextlib.contextmanager
def uninstalled() -> Iterator[None]:
    """The interpreter as triton ships it, inside the block (to show what the patch fixes)."""
    for name, fn in _ORIGINAL.items():
        setattr(_builder, name, fn)
    try:
        yield
    finally:
        install()
