"""Residual-add + LayerNorm: every backend against a float64 oracle and against torch, forward and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import fastenc
from fastenc import backends
from fastenc import functional as F
from fastenc.ops.layer_norm import LayerNormArgs, LayerNormBackwardArgs
from fastenc.reference import layer_norm as reference
from tests.conftest import DEVICES, compare_with_oracle, outputs_and_grads, skip_unless_takes

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Odd widths on purpose: 1 (variance 0), primes, one past a power of two, a wide row; leading dims of any rank.
SHAPES = [(3, 1), (5, 17), (2, 3, 65), (7, 1000), (2, 4099)]


def _inputs(shape, dtype, device, residual=True, weight=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]

    def rand(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale + shift).to(dtype).to(device)

    x = rand(*shape, scale=2.0, shift=0.5)
    r = rand(*shape) if residual else None
    w = rand(n, scale=0.5, shift=1.0) if weight else None
    b = rand(n, scale=0.5) if bias else None
    return x, r, w, b


def _check(x, r, w, b, return_residual=False, eps=1e-5):
    shape = (x.shape[-1],)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x)
    grad_outputs = [dy] + ([torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x)]
                           if return_residual else [])

    def ours(x, r, w, b):
        return F.layer_norm(x, shape, w, b, eps, residual=r, return_residual=return_residual)

    def torch_eager(x, r, w, b):
        s = x if r is None else x + r
        y = TF.layer_norm(s, shape, w, b, eps)
        return (y, s) if return_residual else y

    inputs = (x, r, w, b)
    got = outputs_and_grads(ours, inputs, grad_outputs)
    assert backends.last_used()["layer_norm"] == fastenc.get_backend(), "the selected backend did not run"
    want = outputs_and_grads(torch_eager, inputs, grad_outputs)
    # The oracle is torch's own op in float64, not fastenc's reference (which is tested here like any backend).
    exact = outputs_and_grads(torch_eager, inputs, grad_outputs, cast=torch.float64)
    names = ["y", "sum"][: len(grad_outputs)]
    names += [n for n, t in zip(["dx", "dresidual", "dweight", "dbias"], inputs) if t is not None]
    compare_with_oracle(names, got, want, exact)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_residual_layer_norm(backend_device, shape, dtype):
    _, device = backend_device
    _check(*_inputs(shape, dtype, device), return_residual=True)


@pytest.mark.parametrize("residual,weight,bias", [(False, True, True), (True, False, False), (False, False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_optional_arguments(backend_device, residual, weight, bias, dtype):
    _, device = backend_device
    _check(*_inputs((6, 33), dtype, device, residual, weight, bias))


def test_widest_row(backend_device):
    _, device = backend_device
    _check(*_inputs((2, 65536), torch.float32, device), return_residual=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rows_read_in_chunks(backend_device, dtype):
    """Rows wider than a Triton block holds in registers (8192 in the backward, 16384 in the forward) are read in
    chunks; 7 rows over 4 backward programs leave the last program's group one row short."""
    _, device = backend_device
    _check(*_inputs((7, 16411), dtype, device), return_residual=True)


def test_very_wide_row_keeps_its_accuracy(backend_device):
    """A normalized_shape of a million elements, off-centre: the row sums must not drift with the row's length."""
    name, device = backend_device
    x, r, w, b = _inputs((2, 1 << 20), torch.float32, device, seed=3)
    skip_unless_takes("layer_norm", name, LayerNormArgs(x, r, w, b, 1e-5, False))
    _check(x * 1.5 + 20, r, w, b)


def test_strided_and_transposed_inputs(backend_device):
    _, device = backend_device
    x, r, w, b = _inputs((9, 80), torch.float32, device)
    _check(x[:, :51], r[:, 10:61], w[:51], b[:51])  # rows with a stride larger than their width
    _check(x.t(), r.t(), w[:9], b[:9])  # column-major: the last dim is not contiguous


def test_empty_batch(backend_device):
    _, device = backend_device
    x, r, w, b = _inputs((0, 24), torch.float32, device)
    x.requires_grad_()
    w.requires_grad_()
    y, s = F.layer_norm(x, (24,), w, b, residual=r, return_residual=True)
    assert y.shape == s.shape == (0, 24)
    (dx, dw) = torch.autograd.grad(y.sum(), (x, w))
    assert dx.shape == (0, 24) and torch.equal(dw, torch.zeros_like(w))


def test_reference_gradcheck():
    x, r, w, b = (t.requires_grad_() for t in _inputs((3, 7), torch.float64, "cpu"))
    with fastenc.backend("reference"):
        assert torch.autograd.gradcheck(
            lambda x, r, w, b: F.layer_norm(x, (7,), w, b, residual=r, return_residual=True), (x, r, w, b)
        )


def test_gradcheck(backend_device):
    _, device = backend_device
    x, r, w, b = (t.requires_grad_() for t in _inputs((3, 7), torch.float64, device))
    assert torch.autograd.gradcheck(
        lambda x, r, w, b: F.layer_norm(x, (7,), w, b, residual=r, return_residual=True), (x, r, w, b)
    )


@pytest.mark.parametrize("weight", [True, False], ids=["affine", "plain"])
def test_double_backward(backend_device, weight):
    """Gradients of gradients (gradient penalties, Hessian-vector products), as torch's layer_norm has them."""
    _, device = backend_device
    x, r, w, b = (t.requires_grad_() for t in _inputs((3, 7), torch.float64, device))
    w, b = (w, b) if weight else (None, None)
    args = tuple(t for t in (x, r, w, b) if t is not None)

    def fn(x, r, *params):
        return F.layer_norm(x, (7,), *(params or (None, None)), residual=r, return_residual=True)

    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("used", ["y", "sum"])
def test_gradient_through_one_output(backend_device, used):
    """Only one of (y, x + residual) reaches the loss: the other's gradient is None inside the op, not zeros."""
    _, device = backend_device
    x, r, w, b = (t.requires_grad_() for t in _inputs((5, 9), torch.float64, device))
    y, s = F.layer_norm(x, (9,), w, b, residual=r, return_residual=True)
    out = y if used == "y" else s
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, r, w, b), dout, allow_unused=True)
    y_ref = TF.layer_norm(x + r, (9,), w, b)
    want = torch.autograd.grad(y_ref if used == "y" else x + r, (x, r, w, b), dout, allow_unused=True)
    for name, g, e in zip(("dx", "dresidual", "dweight", "dbias"), got, want):
        e = torch.zeros_like(g) if e is None else e  # torch: unused; fastenc: zeros from the fused backward
        torch.testing.assert_close(g, e, msg=lambda m: f"{name}: {m}")


def test_opcheck(backend_device):
    _, device = backend_device
    x, r, w, b = _inputs((4, 19), torch.float32, device)
    name = fastenc.get_backend()
    for args in [(x, r, w, b, 1e-5, True), (x, None, w, None, 1e-6, False), (x, r, None, b, 1e-5, True)]:
        torch.library.opcheck(torch.ops.fastenc.layer_norm.default, (*args, name))
    y, s, mean, rstd = torch.ops.fastenc.layer_norm(x, r, w, b, 1e-5, True, name)
    torch.library.opcheck(torch.ops.fastenc.layer_norm_backward.default,
                          (torch.randn_like(y), None, s, w, mean, rstd, True, name))


def test_torch_compile_fullgraph(backend_device):
    _, device = backend_device
    x, r, w, b = _inputs((5, 48), torch.float32, device)

    def block(x, r, w, b):
        y, s = F.layer_norm(x * 2, (48,), w, b, residual=r, return_residual=True)
        return (y.relu() + s).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    leaves = [t.requires_grad_() for t in (x, r, w, b)]
    want = torch.autograd.grad(block(*leaves), leaves)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_parameters_with_low_precision_input(backend_device, dtype):
    _, device = backend_device
    x, r, w, b = _inputs((6, 45), dtype, device)
    _check(x, r, w.float(), b.float(), return_residual=True)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_follows_torch(device):
    """CUDA autocast runs layer_norm in float32; CPU autocast leaves it alone. fastenc does as torch does."""
    low = torch.bfloat16
    x, r, w, b = _inputs((4, 32), low, device)
    w, b = w.float(), b.float()
    with torch.autocast(device, dtype=low):
        y = F.layer_norm(x, (32,), w, b, residual=r)
        expected = TF.layer_norm(x + r, (32,), w, b)
    assert y.dtype == expected.dtype
    torch.testing.assert_close(y, expected)


def test_reference_backward_is_autograd_of_reference_forward():
    x, _, w, _ = _inputs((5, 13), torch.float64, "cpu")
    x.requires_grad_()
    w.requires_grad_()
    y, mean, rstd = reference.normalize(x, w, None, 1e-5)
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    got = reference.layer_norm_backward(
        LayerNormBackwardArgs(dy, None, x.detach(), w.detach(), mean.detach(), rstd.detach(), False))
    torch.testing.assert_close(got[0], dx)
    torch.testing.assert_close(got[1], dw)
