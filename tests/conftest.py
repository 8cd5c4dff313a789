"""Shared fixtures: the (backend, device) pairs every op test runs over, and the one tolerance rule.

Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors; the variable must be set
before triton is imported, which is why it is set here, first.
FASTENC_REQUIRE_BACKENDS (a comma list, set by `make test`) turns a missing backend into a failure instead of
a skip, so a broken build cannot pass as skipped tests.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastenc  # noqa: E402
from fastenc import backends  # noqa: E402

if backends.INTERPRETER and backends.unavailable_reason("triton") is None:
    from tests import triton_bf16

    triton_bf16.install()  # bf16 dots and casts as a GPU computes them (see tests/triton_bf16.py)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
REQUIRED = [b for b in os.environ.get("FASTENC_REQUIRE_BACKENDS", "").split(",") if b]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped, with the reason, without one)")


def _pairs():
    for name in backends.BACKENDS:
        for device in DEVICES:
            probe = backends.unavailable_reason(name)
            reason = probe or backends.device_reason(name, device)
            # A required backend that cannot run is not skipped: selecting it fails the test, naming why.
            skip = reason and not (probe and name in REQUIRED)
            marks = [pytest.mark.skip(reason=f"{name} on {device}: {reason}")] if skip else []
            yield pytest.param((name, device), id=f"{name}-{device}", marks=marks)


@pytest.fixture(params=list(_pairs()))
def backend_device(request):
    """(backend name, device) for every backend and device of this machine, selected for the test's duration."""
    name, device = request.param
    with fastenc.backend(name):
        yield name, device


def skip_unless_takes(op: str, name: str, *inputs) -> None:
    """Skip, with the backend's own reason, when backend `name` does not take these inputs of `op` (selected by
    name it would raise; "auto" would run another backend)."""
    reason = backends.input_reason(op, name, *inputs) if name in backends.implemented(op) else None
    if reason is not None:
        pytest.skip(f"{name} does not take these inputs of {op}: {reason}")


# The tolerance rule (after flash-attention's tests): measured against a float64 oracle, a fastenc result may
# be at most twice as far off as PyTorch's own computation in the same dtype, plus a floor that absorbs
# results which PyTorch happens to round exactly. The floors are about one rounding step of the dtype at the
# magnitudes these tests produce (values and gradients of order 1-10): half 2^-10, bfloat16 2^-7; scaled by
# the largest oracle magnitude where that exceeds 1 (weight gradients sum over rows).
ATOL_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close_to_oracle(name: str, actual: torch.Tensor, oracle: torch.Tensor, torch_result: torch.Tensor):
    """Fail, with a readable report, if `actual` is further from `oracle` than the rule above allows."""
    assert actual.shape == oracle.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    assert actual.dtype == torch_result.dtype, f"{name}: dtype {actual.dtype} != torch's {torch_result.dtype}"
    oracle = oracle.double().cpu()
    err = (actual.double().cpu() - oracle).abs()
    torch_err = (torch_result.double().cpu() - oracle).abs().max().item() if oracle.numel() else 0.0
    bound = 2 * torch_err + ATOL_FLOOR[actual.dtype] * max(1.0, oracle.abs().max().item() if oracle.numel() else 1)
    worst = err.max().item() if err.numel() else 0.0
    if not worst <= bound:  # also fails on NaN
        where = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape)) if err.numel() else ()
        raise AssertionError(
            f"{name}: max |error| {worst:.3g} at {where} exceeds the bound {bound:.3g} "
            f"(torch in {actual.dtype} is off by {torch_err:.3g}); "
            f"got {actual.flatten()[err.argmax()].item():.6g}, oracle {oracle.flatten()[err.argmax()].item():.6g}"
        )


def outputs_and_grads(fn, inputs, grad_outputs, cast=None):
    """fn(*inputs)'s outputs (a tuple) and the gradients of its floating-point tensor inputs for grad_outputs.

    `cast` (a dtype) converts the floating inputs and grad_outputs first: how the float64 oracle is run.
    """
    def prepare(t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t
        return (t.to(cast) if cast else t).detach().requires_grad_()

    leaves = [prepare(t) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grad_outputs = [g.to(cast) if cast else g for g in grad_outputs]
    wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(outs, wanted, grad_outputs)
    return [o.detach() for o in outs] + list(grads)


def gradient_penalty_grads(fn, inputs, params=(), cast=None, seed=3):
    """A double backward through fn: the gradients, with respect to `inputs` and `params`, of the penalty
    |d <fn(inputs), g> / d inputs|^2 for random g, the first backward taken with create_graph. `cast` as in
    outputs_and_grads (the float64 oracle)."""
    leaves = [(t.to(cast) if cast else t).detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    grads_out = [torch.randn(t.shape, generator=g).to(t) for t in outs]
    first = torch.autograd.grad(outs, leaves, grads_out, create_graph=True)
    penalty = sum((d * d).sum() for d in first)
    return list(torch.autograd.grad(penalty, leaves + list(params)))


def compare_with_oracle(names, ours, torch_results, oracle):
    """assert_close_to_oracle for each named output / gradient."""
    assert len(names) == len(ours) == len(torch_results) == len(oracle), (names, len(ours), len(oracle))
    for name, a, t, o in zip(names, ours, torch_results, oracle):
        assert_close_to_oracle(name, a, o, t)
