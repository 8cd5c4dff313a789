"""Never silently wrong: property-based shapes, numerical edge cases, determinism, threads and memory."""

from __future__ import annotations

import os
import threading

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastenc
from fastenc import backends
from fastenc import functional as F
from tests.conftest import compare_with_oracle, outputs_and_grads

# A fixed, bounded profile in CI (the interpreter is slow); FASTENC_HYPOTHESIS_EXAMPLES raises it locally.
EXAMPLES = int(os.environ.get("FASTENC_HYPOTHESIS_EXAMPLES", "12"))
PROFILE = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
DIM = st.one_of(st.sampled_from([1, 2, 3, 5, 7, 13, 31, 64, 127]), st.integers(1, 300))


def _layer_norm_case(x, r, w, b):
    n = x.shape[-1]
    ours = outputs_and_grads(lambda x, r, w, b: F.layer_norm(x, (n,), w, b, residual=r), (x, r, w, b), [x])
    eager = outputs_and_grads(lambda x, r, w, b: TF.layer_norm(x + r, (n,), w, b), (x, r, w, b), [x])
    with fastenc.backend("reference"):
        oracle = outputs_and_grads(lambda x, r, w, b: F.layer_norm(x, (n,), w, b, residual=r), (x, r, w, b), [x],
                                   cast=torch.float64)
    compare_with_oracle(["y", "dx", "dresidual", "dweight", "dbias"], ours, eager, oracle)


@PROFILE
@given(rows=st.integers(1, 40), width=DIM, dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_layer_norm_properties(backend_device, rows, width, dtype, transposed, seed):
    _, device = backend_device
    g = torch.Generator().manual_seed(seed)
    shape = (width, rows) if transposed else (rows, width)
    x, r = (torch.randn(shape, generator=g).to(dtype).to(device) for _ in range(2))
    if transposed:  # a non-contiguous view: the last dim has a stride
        x, r = x.t(), r.t()
    w, b = (torch.randn(x.shape[-1], generator=g).to(dtype).to(device) for _ in range(2))
    _layer_norm_case(x, r, w, b)


@PROFILE
@given(batch=st.integers(1, 3), heads=st.integers(1, 3), s_q=st.integers(1, 70), s_k=st.integers(1, 70),
       head_dim=st.sampled_from([8, 16, 24, 40, 64]), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_attention_properties(backend_device, batch, heads, s_q, s_k, head_dim, causal, seed):
    name, device = backend_device
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, s_q, head_dim, generator=g).to(device)
    k, v = (torch.randn(batch, heads, s_k, head_dim, generator=g).to(device) for _ in range(2))
    padding = (torch.rand(batch, s_k, generator=g) < 0.2).to(device)
    dout = torch.randn(q.shape, generator=g).to(device)

    def ours(q, k, v):
        return F.attention(q, k, v, key_padding_mask=padding, is_causal=causal)

    got = outputs_and_grads(ours, (q, k, v), [dout])
    with fastenc.backend("reference"):
        oracle = outputs_and_grads(ours, (q, k, v), [dout], cast=torch.float64)
        low = outputs_and_grads(ours, (q, k, v), [dout])
    compare_with_oracle(["out", "dq", "dk", "dv"], got, low, oracle)


def test_layer_norm_edge_values(backend_device):
    _, device = backend_device
    x = torch.full((3, 9), 7.0, device=device)  # constant rows: zero variance, output = bias
    b = torch.arange(9.0, device=device)
    torch.testing.assert_close(F.layer_norm(x, (9,), None, b), b.expand(3, 9))
    for scale in (1e4, 1e-4):
        x = torch.randn(4, 33, device=device) * scale
        torch.testing.assert_close(F.layer_norm(x, (33,)), TF.layer_norm(x, (33,)), atol=1e-4, rtol=1e-4)
    x = torch.randn(3, 8, device=device)
    x[0, 2], x[1, 5] = float("nan"), float("inf")
    y = F.layer_norm(x, (8,))
    assert torch.isnan(y[0]).all() and torch.isnan(y[1]).all(), "NaN / inf must propagate, not vanish"
    assert torch.isfinite(y[2]).all()


def test_attention_nan_propagates(backend_device):
    _, device = backend_device
    q, k, v = (torch.randn(1, 1, 5, 16, device=device) for _ in range(3))
    v[0, 0, 3, 0] = float("nan")
    out = F.attention(q, k, v)
    assert torch.isnan(out[..., 0]).all() and torch.isfinite(out[..., 1:]).all()


def _backward_twice(fn, inputs):
    grads = []
    for _ in range(2):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = fn(*leaves)
        grads.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    return grads


def test_backwards_are_deterministic(backend_device):
    _, device = backend_device
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(37, 70, generator=g).to(device) for _ in range(2))
    w = torch.randn(70, generator=g).to(device)
    q, k, v = (torch.randn(2, 2, 33, 16, generator=g).to(device) for _ in range(3))
    cases = [
        (lambda x, r, w: F.layer_norm(x, (70,), w, w, residual=r), (x, r, w)),
        (lambda q, k, v: F.attention(q, k, v, is_causal=True), (q, k, v)),
        (lambda x, w: F.bias_activation(x, w, "gelu"), (x, w)),
    ]
    torch.use_deterministic_algorithms(True)
    try:
        for fn, inputs in cases:
            first, second = _backward_twice(fn, inputs)
            assert all(torch.equal(a, b) for a, b in zip(first, second))
    finally:
        torch.use_deterministic_algorithms(False)


def test_threads_each_with_their_own_backend():
    """Concurrent calls from threads, each selecting a backend for itself, give correct results."""
    x = torch.randn(64, 48)
    expected = TF.layer_norm(x, (48,))
    # Triton's interpreter swaps triton.language's functions while a kernel runs, so two threads cannot interpret
    # at once (a limit of the CPU test vehicle; compiled Triton launches from any thread).
    names = [b for b in fastenc.available_backends() if not (b == "triton" and backends.INTERPRETER)]
    errors = []

    def work(name):
        try:
            with fastenc.backend(name):
                for _ in range(5):
                    torch.testing.assert_close(F.layer_norm(x, (48,)), expected)
                    assert backends.get_backend() == name
        except Exception as e:  # reported in the main thread
            errors.append((name, e))

    threads = [threading.Thread(target=work, args=(names[i % len(names)],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_no_memory_growth_over_many_iterations():
    """Nothing saved for a backward outlives it: RSS is flat over 1000 forward/backward iterations of the ops."""
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(8, 32, generator=g, requires_grad=True) for _ in range(2))
    q, k, v = (torch.randn(1, 2, 8, 16, generator=g, requires_grad=True) for _ in range(3))

    def step():
        h = F.layer_norm(x, (32,), residual=r)
        a = F.attention(q, k, v, is_causal=True)
        (F.bias_activation(h, None, "gelu").sum() + a.sum()).backward()

    for _ in range(100):  # allocator caches and lazy initialisation settle first
        step()
    before = _rss_bytes()
    for _ in range(1000):
        step()
    growth = _rss_bytes() - before
    assert growth < 4 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 1000 forward/backward iterations"
