"""Bias + activation + dropout: every backend with an implementation against a float64 oracle and torch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF

import fastenc
from fastenc import backends
from fastenc import functional as F
from fastenc.reference import bias_activation as reference
from tests.conftest import compare_with_oracle, outputs_and_grads, skip_unless_takes

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

    def oracle(x, b):
        with fastenc.backend("reference"):
            return ours(x, b)

    got = outputs_and_grads(ours, (x, b), [dy])
    assert backends.last_used()["bias_activation"] == fastenc.get_backend()
    compare_with_oracle(["y", "dx", "dbias"], got, outputs_and_grads(eager, (x, b), [dy]),
                        outputs_and_grads(oracle, (x, b), [dy], cast=torch.float64))


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
    skip_unless_takes("bias_activation", name, torch.empty(shape, device=device), None, "relu", p, None)

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
