"""Bias + activation + dropout: every backend with an implementation against a float64 oracle and torch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF

import fastenc
from fastenc import backends
from fastenc import functional as F
from fastenc.ops.bias_activation import BiasActivationArgs
from fastenc.reference import bias_activation as reference
from tests.conftest import compare_with_oracle, gradient_penalty_grads, outputs_and_grads, skip_unless_takes

TORCH_ACTIVATIONS = {
    "relu": TF.relu,
    "gelu": TF.gelu,
    "gelu_tanh": lambda z: TF.gelu(z, approximate="tanh"),
}


@pytest.fixture
def op_backend(backend_device):
    name, device = backend_device
    if name not in backends.implemented("bias_activation"):
        pytest.skip(f"{name} has no bias_activation of its own (it runs the reference)")
    skip_unless_takes("bias_activation", name,
                      BiasActivationArgs(torch.empty(1, 1, device=device), None, "relu", 0.0, None))
    return name, device


def _inputs(shape, dtype, device, bias_dtype=None):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2).to(dtype).to(device)
    b = torch.randn(shape[-1], generator=g).to(bias_dtype or dtype).to(device)
    return x, b


@pytest.mark.parametrize("activation", list(TORCH_ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (3, 5, 130), (40, 257)], ids=str)
def test_against_oracle(op_backend, activation, dtype, shape):
    _, device = op_backend
    x, b = _inputs(shape, dtype, device)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(x)

    def ours(x, b):
        return F.bias_activation(x, b, activation)

    def eager(x, b):
        return TORCH_ACTIVATIONS[activation](x + b)

    got = outputs_and_grads(ours, (x, b), [dy])
    assert backends.last_used()["bias_activation"] == fastenc.get_backend()
    # The oracle is torch's own op in float64, not fastenc's reference (which is tested here like any backend).
    compare_with_oracle(["y", "dx", "dbias"], got, outputs_and_grads(eager, (x, b), [dy]),
                        outputs_and_grads(eager, (x, b), [dy], cast=torch.float64))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])  # ReLU's second derivative is 0
def test_double_backward_against_torch(op_backend, activation):
    """Gradients of a gradient penalty through the op, as torch's activations give them."""
    _, device = op_backend
    x, b = _inputs((7, 33), torch.float32, device)

    def eager(x, b):
        return TORCH_ACTIVATIONS[activation](x + b)

    got = gradient_penalty_grads(lambda x, b: F.bias_activation(x, b, activation), (x, b))
    compare_with_oracle(["d x", "d bias"], got, gradient_penalty_grads(eager, (x, b)),
                        gradient_penalty_grads(eager, (x, b), cast=torch.float64))


def test_without_bias_and_with_float32_bias(op_backend):
    _, device = op_backend
    x, b = _inputs((6, 50), torch.bfloat16, device, bias_dtype=torch.float32)
    torch.testing.assert_close(F.bias_activation(x, None, "gelu"), TF.gelu(x))
    y = F.bias_activation(x, b, "relu")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, TF.relu(x.float() + b).bfloat16())


def test_dropout(op_backend):
    name, device = op_backend
    p, shape = 0.3, (64, 96)
    skip_unless_takes("bias_activation", name,
                      BiasActivationArgs(torch.empty(shape, device=device), None, "relu", p, None))

    def run(x, seed):
        torch.manual_seed(seed)
        return F.bias_activation(x, None, "relu", dropout_p=p)

    keep = run(torch.ones(shape, device=device), 5) > 0  # relu(1) = 1: the output is the mask, scaled
    sd = math.sqrt(p * (1 - p) / keep.numel())
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sd
    assert torch.equal(keep, run(torch.ones(shape, device=device), 5) > 0)
    assert not torch.equal(keep, run(torch.ones(shape, device=device), 6) > 0)
    x, b = _inputs(shape, torch.float32, device)
    x.requires_grad_()
    b.requires_grad_()
    torch.manual_seed(5)
    y = F.bias_activation(x, b, "gelu", dropout_p=p)
    expected = TF.gelu(x + b) * keep / (1 - p)
    torch.testing.assert_close(y, expected)
    dy = torch.randn_like(y)
    for a, e in zip(torch.autograd.grad(y, (x, b), dy), torch.autograd.grad(expected, (x, b), dy)):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("activation", list(TORCH_ACTIVATIONS))
def test_reference_activation_backward_is_autograds(activation):
    z = torch.linspace(-6, 6, 101, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(101, dtype=torch.float64)
    (expected,) = torch.autograd.grad(TORCH_ACTIVATIONS[activation](z), z, dy)
    torch.testing.assert_close(reference._activation_backward(dy, z.detach(), activation), expected)


def test_opcheck(op_backend):
    name, device = op_backend
    x, b = _inputs((5, 40), torch.float32, device)
    for args in [(x, b, "gelu", 0.0, None), (x, None, "relu", 0.0, None), (x, b, "gelu_tanh", 0.2, torch.tensor(3))]:
        torch.library.opcheck(torch.ops.fastenc.bias_activation.default, (*args, name))


# ---- The native CPU kernels (fastenc.native): float64 too, odd sizes, strides, the float32 math they are built on.


@pytest.fixture
def native():
    reason = backends.unavailable_reason("native")
    if reason:
        pytest.skip(reason)
    from fastenc import native

    with fastenc.backend("native"):
        yield native


def _torch64(activation, z):
    return TORCH_ACTIVATIONS[activation](z)


@pytest.mark.parametrize("activation", list(TORCH_ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("n", [1, 5, 17, 1000, 3072])
def test_native_sizes(native, activation, dtype, m, n):
    """Forward and both gradients against torch in float64, within twice torch's own error in dtype (conftest)."""
    x, b = _inputs((m, n), dtype, "cpu")
    dy = torch.randn((m, n), generator=torch.Generator().manual_seed(1)).to(dtype)
    got = outputs_and_grads(lambda x, b: F.bias_activation(x, b, activation), (x, b), [dy])
    assert backends.last_used()["bias_activation"] == "native"
    eager = outputs_and_grads(lambda x, b: _torch64(activation, x + b), (x, b), [dy])
    exact = outputs_and_grads(lambda x, b: _torch64(activation, x + b), (x, b), [dy], cast=torch.float64)
    compare_with_oracle(["y", "dx", "dbias"], got, eager, exact)


@pytest.mark.parametrize("activation", list(TORCH_ACTIVATIONS))
def test_native_strided_and_without_bias(native, activation):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 2 * 257, generator=g) * 2
    dy = torch.randn(257, 257, generator=g)
    for x in (base[:, ::2], base[:, 1:258], base.t()[:257]):  # strided columns, a row stride, a transpose
        assert not x.is_contiguous()
        dy_x = dy[: x.shape[0], : x.shape[1]]
        got = outputs_and_grads(lambda x: F.bias_activation(x, None, activation), (x,), [dy_x])
        exact = outputs_and_grads(lambda x: _torch64(activation, x), (x,), [dy_x], cast=torch.float64)
        eager = outputs_and_grads(lambda x: _torch64(activation, x), (x,), [dy_x])
        compare_with_oracle(["y", "dx"], got, eager, exact)
    dx, dbias = native.bias_activation_backward(dy[:40, :257].contiguous(),
                                                BiasActivationArgs(base[:, :257], None, activation, 0.0, None))
    assert dbias.shape == (0,) and dx.shape == (40, 257)


def test_native_float32_bias_with_bfloat16(native):
    x, b = _inputs((33, 1000), torch.bfloat16, "cpu", bias_dtype=torch.float32)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x)
    got = outputs_and_grads(lambda x, b: F.bias_activation(x, b, "gelu"), (x, b), [dy])
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    eager = outputs_and_grads(lambda x, b: TF.gelu(x.float() + b).bfloat16(), (x, b), [dy])
    exact = outputs_and_grads(lambda x, b: TF.gelu(x + b), (x, b), [dy], cast=torch.float64)
    compare_with_oracle(["y", "dx", "dbias"], got, eager, exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_native_dropout_mask(native, dtype):
    p, shape = 0.3, (129, 311)
    x, b = _inputs(shape, dtype, "cpu")
    seed = torch.tensor(1234)
    # relu(1) = 1: with x = 1 the output is the mask, scaled.
    kept = native.bias_activation_forward(BiasActivationArgs(torch.ones(shape, dtype=dtype), None, "relu", p,
                                                             seed)) != 0
    sd = math.sqrt(p * (1 - p) / kept.numel())
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * sd
    y = native.bias_activation_forward(BiasActivationArgs(x, b, "gelu", p, seed))
    assert torch.equal(y, native.bias_activation_forward(BiasActivationArgs(x, b, "gelu", p, seed)))
    other = native.bias_activation_forward(
        BiasActivationArgs(torch.ones(shape, dtype=dtype), None, "relu", p, torch.tensor(1235)))
    assert not torch.equal(kept, other != 0)
    dense = native.bias_activation_forward(BiasActivationArgs(x, b, "gelu", 0.0, None))
    assert not y[~kept].any()
    torch.testing.assert_close(y[kept], (dense.double() / (1 - p)).to(dtype)[kept], rtol=2 * torch.finfo(dtype).eps,
                               atol=0)
    # The backward regenerates the forward's mask: dx = dy * act'(z) / (1 - p) where kept, 0 elsewhere.
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    dx, dbias = native.bias_activation_backward(dy, BiasActivationArgs(x, b, "gelu", p, seed))
    dx_dense, _ = native.bias_activation_backward(dy, BiasActivationArgs(x, b, "gelu", 0.0, None))
    assert not dx[~kept].any()
    expected = (dx_dense.double() / (1 - p)).to(dtype)
    torch.testing.assert_close(dx[kept], expected[kept], rtol=2 * torch.finfo(dtype).eps, atol=0)
    z = (x.double() + b.double()).requires_grad_()
    (want,) = torch.autograd.grad(TF.gelu(z) * kept / (1 - p), z, dy.double())
    torch.testing.assert_close(dbias.double(), want.sum(0), rtol=1e-5, atol=1e-4)


def test_native_dropout_matches_triton(native):
    """The mask is Philox 4x32-10 of (seed, row * N + col), as tl.rand draws it in kernels/bias_activation.py."""
    if backends.unavailable_reason("triton") or backends.device_reason("triton", "cpu"):
        pytest.skip("the Triton kernel cannot run on CPU tensors here")
    from fastenc.kernels import bias_activation as triton_impl

    x, b = _inputs((37, 300), torch.float32, "cpu")
    seed = torch.tensor(987654321)
    assert torch.equal(native.bias_activation_forward(BiasActivationArgs(x, b, "relu", 0.25, seed)) != 0,
                       triton_impl.bias_activation_forward(BiasActivationArgs(x, b, "relu", 0.25, seed)) != 0)


def _step(mag):
    """The float32 spacing at |mag| (at least the smallest subnormal), in float64."""
    mag = mag.float().abs()
    return torch.maximum(torch.nextafter(mag, torch.tensor(math.inf)) - mag, torch.tensor(2.0**-149)).double()


def _ulps(got, want, scale=None):
    """|got - want| in float32 steps at |scale| (default: at |want|)."""
    return (got.double() - want).abs() / _step(want if scale is None else scale)


SWEEP = torch.linspace(-10, 10, 400001)  # spacing 5e-5, every binade from 2^-15 up
SPECIAL = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0])


@pytest.mark.parametrize("seed", range(3))
def test_native_bias_gradient_over_many_rows(native, seed):
    """The bias gradient sums 16384 rows in float32: its error stays within 2x that of torch's own sum (a cascade),
    where a running sum over each thread's rows is several times worse."""
    g = torch.Generator().manual_seed(seed)
    x, dy = (torch.randn(16384, 64, generator=g) for _ in range(2))
    b = torch.randn(64, generator=g) * 0.1

    def dbias(fn, dtype):
        bias = b.to(dtype).requires_grad_()
        return torch.autograd.grad(fn(x.to(dtype), bias), bias, dy.to(dtype))[0].double()

    exact = dbias(lambda x, b: TF.gelu(x + b), torch.float64)
    theirs = (dbias(lambda x, b: TF.gelu(x + b), torch.float32) - exact).abs().max()
    ours = (dbias(lambda x, b: F.bias_activation(x, b, "gelu"), torch.float32) - exact).abs().max()
    assert backends.last_used()["bias_activation"] == "native"
    assert ours <= 2 * theirs, f"native dbias error {ours:.3g}, torch's {theirs:.3g}"


def test_native_erfc_and_sigmoid_accuracy(native):
    """The kernels' float32 building blocks against float64: erfc (Phi(z) = erfc(-z / sqrt 2) / 2 in the GELU,
    both tails relative) within 6 ulp, sigmoid ((1 + tanh(v / 2)) / 2 in gelu_tanh) within 3 ulp."""
    from fastenc._C import _bias_activation_math

    erfc = _bias_activation_math(SWEEP, "erfc")
    assert _ulps(erfc, torch.special.erfc(SWEEP.double())).max() <= 6
    sig = _bias_activation_math(SWEEP * 4, "sigmoid")
    assert _ulps(sig, torch.sigmoid(SWEEP.double() * 4)).max() <= 3
    torch.testing.assert_close(_bias_activation_math(SPECIAL, "erfc"), torch.tensor([0, 2, math.nan, 1, 1]),
                               equal_nan=True)
    torch.testing.assert_close(_bias_activation_math(SPECIAL, "sigmoid"),
                               torch.tensor([1, 0, math.nan, 0.5, 0.5]), equal_nan=True)


def test_native_gelu_accuracy(native):
    """float32 GELU over [-10, 10] against float64 (erfc / sigmoid forms, which keep the left tail that torch's
    1 + erf and 1 + tanh round to 0). Exact GELU: y within 6 ulp; y' within 8 ulp of max(|y'|, Phi), since
    y' = Phi + z phi cancels near its root. gelu_tanh: its argument v = 2u takes five float32 roundings (each
    2^-24 relative at most), which e^-v turns into a relative error of up to 5 |v| 2^-24: bounds of 5 |v| ulp
    on top of the few of the function itself."""
    z = SWEEP.reshape(1, -1)
    zd = z.double()
    ones = torch.ones_like(z)
    cdf = 0.5 * torch.special.erfc(-zd / math.sqrt(2))
    density = torch.exp(-zd * zd / 2) / math.sqrt(2 * math.pi)
    y = native.bias_activation_forward(BiasActivationArgs(z, None, "gelu", 0.0, None))
    dx, _ = native.bias_activation_backward(ones, BiasActivationArgs(z, None, "gelu", 0.0, None))
    assert _ulps(y, zd * cdf).max() <= 6
    grad = cdf + zd * density
    assert _ulps(dx, grad, torch.maximum(grad.abs(), cdf)).max() <= 8

    k = math.sqrt(2 / math.pi)
    v = 2 * k * (zd + 0.044715 * zd**3)
    s = torch.sigmoid(v)
    y = native.bias_activation_forward(BiasActivationArgs(z, None, "gelu_tanh", 0.0, None))
    dx, _ = native.bias_activation_backward(ones, BiasActivationArgs(z, None, "gelu_tanh", 0.0, None))
    # ... plus |z| times s's subnormal step, where s = sigmoid(v) < 2^-126 (v < -87.3)
    bound = (6 + 5 * v.abs()) * _step(zd * s) + zd.abs() * 2.0**-149
    assert ((y.double() - zd * s).abs() <= bound).all()
    grad = s + zd * 2 * s * (1 - s) * k * (1 + 3 * 0.044715 * zd * zd)
    assert (_ulps(dx, grad, torch.maximum(grad.abs(), s)) <= 8 + 5 * v.abs()).all()


def test_native_far_tails(native):
    """Past |z| = 12.8 (GELU) and v = 87 (gelu_tanh's sigmoid) the native kernels flush tails below ~1e-35 to 0
    rather than compute in subnormal floats: values and gradients stay within 1e-30 of float64 (and exact where
    the activation is z or 0), with inputs as large as a linear layer's outputs get."""
    z = torch.cat([torch.linspace(-300, -12, 2001), torch.linspace(12, 300, 2001)]).reshape(1, -1)
    ones = torch.ones_like(z)
    for activation in ("gelu", "gelu_tanh"):
        zd = z.double().requires_grad_()
        want = _torch64(activation, zd)
        (grad,) = torch.autograd.grad(want, zd, torch.ones_like(want))
        y = native.bias_activation_forward(BiasActivationArgs(z, None, activation, 0.0, None))
        dx, _ = native.bias_activation_backward(ones, BiasActivationArgs(z, None, activation, 0.0, None))
        torch.testing.assert_close(y.double(), want.detach(), atol=1e-30, rtol=2e-7)
        torch.testing.assert_close(dx.double(), grad, atol=1e-30, rtol=2e-7)


def test_native_special_values(native):
    """inf and NaN come out as torch's: NaN in, NaN out; gelu(-inf) is NaN (-inf * 0), as torch has it."""
    x = SPECIAL.reshape(1, -1)
    for activation in TORCH_ACTIVATIONS:
        z = x.double().requires_grad_()
        want = _torch64(activation, z)
        (grad,) = torch.autograd.grad(want, z, torch.ones_like(want))
        y = native.bias_activation_forward(BiasActivationArgs(x, None, activation, 0.0, None))
        dx, _ = native.bias_activation_backward(torch.ones_like(x),
                                                BiasActivationArgs(x, None, activation, 0.0, None))
        torch.testing.assert_close(y.double(), want.detach(), equal_nan=True)
        torch.testing.assert_close(dx.double(), grad, equal_nan=True)
