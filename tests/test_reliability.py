"""Never silently wrong: property-based shapes, numerical edge cases, determinism, threads and memory."""

from __future__ import annotations

import os
import threading

import pytest
import torch
import torch.nn.functional as TF
from torch.nn.utils.rnn import pack_padded_sequence
from hypothesis import HealthCheck, assume, given, settings
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


def _device_of_own(backend_device, op: str) -> str:
    """The device, skipping a backend that has no `op` of its own (it would run the reference's again)."""
    name, device = backend_device
    if name not in backends.implemented(op):
        pytest.skip(f"{name} has no {op} of its own: it runs the reference, tested with the reference")
    return device


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
    device = _device_of_own(backend_device, "attention")
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


ACTIVATIONS = {"relu": TF.relu, "gelu": TF.gelu, "gelu_tanh": lambda x: TF.gelu(x, approximate="tanh")}


@PROFILE
@given(rows=st.integers(1, 40), width=DIM, dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       activation=st.sampled_from(F.ACTIVATIONS), with_bias=st.booleans(), transposed=st.booleans(),
       seed=st.integers(0, 2**16))
def test_bias_activation_properties(backend_device, rows, width, dtype, activation, with_bias, transposed, seed):
    device = _device_of_own(backend_device, "bias_activation")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((width, rows) if transposed else (rows, width), generator=g).to(dtype).to(device)
    x = x.t() if transposed else x  # a non-contiguous view
    b = torch.randn(width, generator=g).to(dtype).to(device) if with_bias else None
    dy = torch.randn(x.shape, generator=g).to(dtype).to(device)

    def ours(x, b):
        return F.bias_activation(x, b, activation)

    def eager(x, b):
        return ACTIVATIONS[activation](x if b is None else x + b)

    compare_with_oracle(["y", "dx", "dbias"][:2 + with_bias], outputs_and_grads(ours, (x, b), [dy]),
                        outputs_and_grads(eager, (x, b), [dy]), outputs_and_grads(eager, (x, b), [dy], torch.float64))


@PROFILE
@given(lengths=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=3),
       heads=st.integers(1, 3), head_dim=st.sampled_from([8, 16, 24, 40]), causal=st.booleans(),
       slack=st.integers(0, 20), seed=st.integers(0, 2**16))
def test_attention_varlen_properties(backend_device, lengths, heads, head_dim, causal, slack, seed):
    """attention_varlen equals attention run on each sequence alone; a max_seqlen above the longest changes nothing."""
    device = _device_of_own(backend_device, "attention")
    g = torch.Generator().manual_seed(seed)
    bounds = [TF.pad(torch.tensor(n).cumsum(0), (1, 0)).tolist() for n in zip(*lengths)]
    cu_q, cu_k = (torch.tensor(b, dtype=torch.int32, device=device) for b in bounds)
    q = torch.randn(bounds[0][-1], heads, head_dim, generator=g).to(device)
    k, v = (torch.randn(bounds[1][-1], heads, head_dim, generator=g).to(device) for _ in range(2))
    dout = torch.randn(q.shape, generator=g).to(device)
    longest = [max(n) + slack for n in zip(*lengths)]

    def packed(q, k, v):
        return F.attention_varlen(q, k, v, cu_q, cu_k, *longest, is_causal=causal)

    def one_by_one(q, k, v):
        def heads_first(t, a, b):
            return t[a:b].transpose(0, 1)[None]

        outs = [F.attention(heads_first(q, a, b), heads_first(k, c, d), heads_first(v, c, d), is_causal=causal)
                for a, b, c, d in zip(bounds[0], bounds[0][1:], bounds[1], bounds[1][1:])]
        return torch.cat([o[0].transpose(0, 1) for o in outs])

    got = outputs_and_grads(packed, (q, k, v), [dout])
    with fastenc.backend("reference"):
        oracle = outputs_and_grads(one_by_one, (q, k, v), [dout], cast=torch.float64)
        low = outputs_and_grads(one_by_one, (q, k, v), [dout])
    compare_with_oracle(["out", "dq", "dk", "dv"], got, low, oracle)


def _against_torch_module(ours, theirs, inputs, input_names, output_names, forward, g):
    """ours against theirs (its torch.nn class) under the same random weights: every output, and the gradient of
    every input and parameter, by conftest's rule with torch in float64 as the oracle.
    forward(call, *inputs) runs the module through call(*args, **kwargs) and returns its outputs (a tuple)."""
    names = [name for name, _ in theirs.named_parameters()]
    params = [0.3 * torch.randn(p.shape, generator=g).to(inputs[0]) for p in theirs.parameters()]

    def run(module):
        def fn(*tensors):
            state = dict(zip(names, tensors[len(inputs):]))
            return forward(lambda *a, **kw: torch.func.functional_call(module, state, a, kw), *tensors[:len(inputs)])
        return fn

    leaves = (*inputs, *params)
    with torch.no_grad():
        grad_outputs = [torch.randn(o.shape, generator=g).to(o) for o in run(theirs)(*leaves)]
    compare_with_oracle(
        output_names + [f"d {n}" for n in input_names + names],
        outputs_and_grads(run(ours), leaves, grad_outputs),
        outputs_and_grads(run(theirs), leaves, grad_outputs),
        outputs_and_grads(run(theirs), leaves, grad_outputs, cast=torch.float64),
    )


@PROFILE
@given(input_size=st.integers(1, 9), hidden=st.integers(1, 9), proj=st.integers(0, 8), layers=st.integers(1, 2),
       bidirectional=st.booleans(), batch_first=st.booleans(), bias=st.booleans(),
       lengths=st.lists(st.integers(1, 4), min_size=1, max_size=3), packed=st.booleans(), with_hx=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_lstm_properties(backend_device, input_size, hidden, proj, layers, bidirectional, batch_first, bias, lengths,
                         packed, with_hx, dtype, seed):
    name, device = backend_device
    assume(not (name == "triton" and dtype == torch.float64))  # Triton's LSTM kernel has no float64
    g = torch.Generator().manual_seed(seed)
    proj_size = proj if proj < hidden else 0
    config = dict(num_layers=layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                  proj_size=proj_size, device=device, dtype=dtype)
    ours, theirs = fastenc.nn.LSTM(input_size, hidden, **config), torch.nn.LSTM(input_size, hidden, **config)
    batch, steps = len(lengths), max(lengths)
    shape = (batch, steps, input_size) if batch_first else (steps, batch, input_size)
    x = torch.randn(shape, generator=g).to(device, dtype)
    states = layers * (2 if bidirectional else 1), batch
    hx = [torch.randn(*states, n, generator=g).to(x) for n in (proj_size or hidden, hidden)] if with_hx else []

    def forward(call, x, *hx):
        if packed:
            x = pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False)
        out, (h_n, c_n) = call(x, tuple(hx) or None)
        return (out.data if packed else out), h_n, c_n

    _against_torch_module(ours, theirs, (x, *hx), ["input", "h0", "c0"][:1 + len(hx)], ["output", "h_n", "c_n"],
                          forward, g)


def _mask(kind, shape, g, device):
    """A random bool (True = do not attend, as torch.nn) or additive float mask in which key 0 stays open, so that no
    query is fully masked (torch gives NaN there, fastenc 0)."""
    if kind is None:
        return None
    mask = torch.rand(shape, generator=g) < 0.3
    mask[..., 0] = False
    return (mask if kind == "bool" else torch.randn(shape, generator=g).masked_fill(mask, float("-inf"))).to(device)


def _as(mask, x):
    """A float mask in x's dtype (the oracle runs in float64)."""
    return mask if mask is None or mask.dtype == torch.bool else mask.to(x.dtype)


@PROFILE
@given(heads=st.integers(1, 3), head_dim=st.sampled_from([8, 16]), batch=st.integers(1, 3), l_q=st.integers(1, 12),
       s_k=st.integers(1, 12), batch_first=st.booleans(), cross=st.booleans(), kv_extra=st.integers(0, 3),
       bias=st.booleans(),
       add_bias_kv=st.booleans(), add_zero_attn=st.booleans(), attn=st.sampled_from([None, "bool", "float"]),
       attn_3d=st.booleans(), padding=st.sampled_from([None, "bool", "float"]), seed=st.integers(0, 2**16))
def test_multihead_attention_properties(backend_device, heads, head_dim, batch, l_q, s_k, batch_first, cross, kv_extra,
                                        bias, add_bias_kv, add_zero_attn, attn, attn_3d, padding, seed):
    device = _device_of_own(backend_device, "attention")
    g = torch.Generator().manual_seed(seed)
    e = heads * head_dim
    s_k = s_k if cross else l_q
    widths = (e, e + kv_extra, e + 2 * kv_extra) if cross else (e, e, e)  # key and value may have other widths
    config = dict(bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, kdim=widths[1], vdim=widths[2],
                  batch_first=batch_first, device=device)
    ours, theirs = fastenc.nn.MultiheadAttention(e, heads, **config), torch.nn.MultiheadAttention(e, heads, **config)

    def seq(length, width):
        return torch.randn((batch, length, width) if batch_first else (length, batch, width), generator=g).to(device)

    inputs = (seq(l_q, widths[0]), seq(s_k, widths[1]), seq(s_k, widths[2])) if cross else (seq(l_q, e),)
    attn_mask = _mask(attn, (batch * heads, l_q, s_k) if attn_3d else (l_q, s_k), g, device)
    key_padding_mask = _mask(padding, (batch, s_k), g, device)

    def forward(call, query, *kv):
        kv = kv or (query, query)
        return call(query, *kv, need_weights=False, attn_mask=_as(attn_mask, query),
                    key_padding_mask=_as(key_padding_mask, query))[:1]

    _against_torch_module(ours, theirs, inputs, ["query", "key", "value"][:len(inputs)], ["out"], forward, g)


@PROFILE
@given(heads=st.integers(1, 3), head_dim=st.sampled_from([8, 16]), ff=st.integers(1, 40), batch=st.integers(1, 3),
       length=st.integers(1, 12), norm_first=st.booleans(), activation=st.sampled_from(["relu", "gelu"]),
       batch_first=st.booleans(), attn=st.sampled_from([None, "bool", "float"]),
       padding=st.sampled_from([None, "bool", "float"]), seed=st.integers(0, 2**16))
def test_transformer_encoder_layer_properties(backend_device, heads, head_dim, ff, batch, length, norm_first,
                                              activation, batch_first, attn, padding, seed):
    """With a bool padding mask alone fastenc packs the tokens; it is compared at the tokens that are not padding."""
    _, device = backend_device
    g = torch.Generator().manual_seed(seed)
    e = heads * head_dim
    config = dict(dropout=0.0, activation=activation, norm_first=norm_first, batch_first=batch_first, device=device)
    ours = fastenc.nn.TransformerEncoderLayer(e, heads, ff, **config)
    theirs = torch.nn.TransformerEncoderLayer(e, heads, ff, **config)
    src = torch.randn((batch, length, e) if batch_first else (length, batch, e), generator=g).to(device)
    src_mask = _mask(attn, (length, length), g, device)
    key_padding_mask = _mask(padding, (batch, length), g, device)
    kept = ~key_padding_mask if padding == "bool" else torch.ones(batch, length, dtype=torch.bool, device=device)
    kept = kept if batch_first else kept.t()

    def forward(call, src):
        out = call(src, src_mask=_as(src_mask, src), src_key_padding_mask=_as(key_padding_mask, src))
        return (out[kept],)

    _against_torch_module(ours, theirs, (src,), ["src"], ["out"], forward, g)


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
