"""The interpreter patch of tests/triton_bf16.py: needed (without it a bf16 dot is wrong), and what it computes (a
float32 product of the bf16 operands, as tensor cores compute it; casts to bf16 that round to nearest even)."""

from __future__ import annotations

import pytest
import torch

from fastenc import backends

pytestmark = pytest.mark.skipif(not backends.INTERPRETER or backends.unavailable_reason("triton") is not None,
                                reason="the patch is for Triton's interpreter (TRITON_INTERPRET=1)")


def _dot_and_cast(a, b):
    import triton
    import triton.language as tl

    from tests import triton_bf16  # noqa: F401  (installed by conftest)

    @triton.jit
    def kernel(A, B, C, X, Y, N: tl.constexpr):
        rows, cols = tl.arange(0, N)[:, None], tl.arange(0, N)[None, :]
        c = tl.dot(tl.load(A + rows * N + cols), tl.load(B + rows * N + cols))
        tl.store(C + rows * N + cols, c)
        tl.store(Y + rows * N + cols, tl.load(X + rows * N + cols).to(tl.bfloat16))

    n = a.shape[0]
    c = torch.empty(n, n)
    x = torch.randn(n, n, generator=torch.Generator().manual_seed(3))
    y = torch.empty(n, n, dtype=torch.bfloat16)
    kernel[(1,)](a, b, c, x, y, N=n)
    return c, x, y


def test_bf16_dot_and_cast_as_on_a_gpu():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    c, x, y = _dot_and_cast(a, b)
    torch.testing.assert_close(c, a.float() @ b.float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(y, x.to(torch.bfloat16)), "float32 -> bf16 must round to nearest even, as torch does"


def test_without_the_patch_the_bf16_dot_is_wrong():
    from tests import triton_bf16

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    with triton_bf16.uninstalled():
        c, x, y = _dot_and_cast(a, b)
    assert (c - a.float() @ b.float()).abs().max() > 1.0
    assert not torch.equal(y, x.to(torch.bfloat16))
