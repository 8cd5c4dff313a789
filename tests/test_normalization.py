"""fastenc.nn.LayerNorm is torch.nn.LayerNorm: constructor, parameters, state_dict, outputs and gradients."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import fastenc


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(elementwise_affine=False), dict(bias=False), dict(eps=1e-3), dict(dtype=torch.float64)],
    ids=str,
)
def test_matches_torch_layer_norm(backend_device, kwargs):
    _, device = backend_device
    shape = (4, 37)
    torch.manual_seed(0)
    theirs = torch.nn.LayerNorm(shape, device=device, **kwargs)
    ours = fastenc.nn.LayerNorm(shape, device=device, **kwargs)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    with torch.no_grad():  # non-trivial affine parameters, then carried over through the state_dict
        for p in theirs.parameters():
            p.normal_()
    ours.load_state_dict(theirs.state_dict())

    x = torch.randn(3, *shape, device=device, dtype=kwargs.get("dtype", torch.float32), requires_grad=True)
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs)
    dy = torch.randn_like(y_ours)
    g_ours = torch.autograd.grad(y_ours, [x, *ours.parameters()], dy)
    g_theirs = torch.autograd.grad(y_theirs, [x, *theirs.parameters()], dy)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b)


def test_residual_forward_equals_add_then_norm():
    norm = fastenc.nn.LayerNorm(16)
    x, r = torch.randn(5, 16), torch.randn(5, 16)
    torch.testing.assert_close(norm(x, r), torch.nn.functional.layer_norm(x + r, (16,), norm.weight, norm.bias))


def test_copy_and_pickle():
    norm = fastenc.nn.LayerNorm(8)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 8)
    for clone in (copy.deepcopy(norm), pickle.loads(pickle.dumps(norm))):
        assert type(clone) is fastenc.nn.LayerNorm
        torch.testing.assert_close(clone(x), norm(x))
