"""Fused attention: every backend with an implementation against a float64 oracle and torch's SDPA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastenc
from fastenc import backends
from fastenc import functional as F
from fastenc.ops.attention import AttentionArgs
from fastenc.reference.attention import attention_math
from tests.conftest import compare_with_oracle, gradient_penalty_grads, outputs_and_grads, skip_unless_takes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, H, S_q, S_k, D): lengths of 1, primes, S_q != S_k both ways, head dims that are not powers of two.
SHAPES = [(1, 2, 1, 1, 16), (2, 3, 7, 7, 40), (1, 2, 65, 33, 80), (2, 1, 33, 65, 96), (1, 1, 31, 17, 128),
          (1, 1, 9, 13, 256)]


@pytest.fixture
def attention_backend(backend_device):
    name, device = backend_device
    if name not in backends.implemented("attention"):
        pytest.skip(f"{name} has no attention of its own (it runs the reference, see test_backends)")
    q = torch.empty(1, 1, 1, 16, device=device)
    skip_unless_takes("attention", name,
                      AttentionArgs(q, q, q, None, None, None, None, 1, 1, False, 1.0, 0.0, None))
    return name, device


def _qkv(b, h, s_q, s_k, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g).to(dtype).to(device) for s in (s_q, s_k, s_k)]


def _torch_mask(b, h, s_q, s_k, attn_mask, key_padding_mask, is_causal, dtype, device):
    """One additive mask for SDPA with everything fastenc was told, or None."""
    mask = torch.zeros(b, h, s_q, s_k, dtype=dtype, device=device)
    if attn_mask is not None:
        mask = mask + (attn_mask.to(dtype) if attn_mask.is_floating_point()
                       else torch.zeros_like(attn_mask, dtype=dtype).masked_fill(~attn_mask, -math.inf))
    if key_padding_mask is not None:
        mask = mask.masked_fill(key_padding_mask[:, None, None, :], -math.inf)
    if is_causal:
        mask = mask.masked_fill(torch.ones(s_q, s_k, dtype=torch.bool, device=device).triu(1), -math.inf)
    return mask


def _check(q, k, v, attn_mask=None, key_padding_mask=None, is_causal=False, scale=None):
    b, h, s_q, d = q.shape
    s_k = k.shape[2]
    bias = None if attn_mask is None else attn_mask.to(q.dtype if attn_mask.dtype == torch.bool else attn_mask.dtype)
    skip_unless_takes("attention", fastenc.get_backend(),
                      AttentionArgs(q, k, v, bias, key_padding_mask, None, None, s_q, s_k, is_causal, 1.0, 0.0, None))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(q)

    def ours(q, k, v):
        return F.attention(q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                           scale=scale)

    def sdpa(q, k, v):
        """torch's SDPA, with a query row that sees no key defined as fastenc defines it: output 0 and no
        gradient (SDPA itself gives NaN there, which would spread to every key's gradient)."""
        mask = _torch_mask(b, h, s_q, s_k, attn_mask, key_padding_mask, is_causal, q.dtype, q.device)
        sees_a_key = ~torch.isneginf(mask).all(dim=-1, keepdim=True)
        out = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask.masked_fill(~sees_a_key, 0.0), scale=scale)
        return out * sees_a_key

    got = outputs_and_grads(ours, (q, k, v), [dout])
    assert backends.last_used()["attention"] == fastenc.get_backend(), "the selected backend did not run"
    want = outputs_and_grads(sdpa, (q, k, v), [dout])
    exact = outputs_and_grads(sdpa, (q, k, v), [dout], cast=torch.float64)  # the oracle: torch in float64
    compare_with_oracle(["out", "dq", "dk", "dv"], got, want, exact)
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_attention(attention_backend, shape, dtype):
    _, device = attention_backend
    _check(*_qkv(*shape, dtype, device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("s_q,s_k", [(19, 19), (13, 40), (40, 13)])
def test_causal(attention_backend, s_q, s_k, dtype):
    _, device = attention_backend
    _check(*_qkv(2, 2, s_q, s_k, 32, dtype, device), is_causal=True)


def test_masks(attention_backend):
    _, device = attention_backend
    b, h, s_q, s_k = 3, 2, 21, 37
    q, k, v = _qkv(b, h, s_q, s_k, 48, torch.float32, device)
    g = torch.Generator().manual_seed(3)
    padding = torch.arange(s_k)[None, :] >= torch.tensor([[37], [5], [0]])  # full, short, and fully padded
    padding = padding.to(device)
    allowed = (torch.rand(s_q, s_k, generator=g) > 0.3).to(device)  # bool, True = may attend (SDPA's meaning)
    additive = torch.randn(b, 1, s_q, s_k, generator=g).to(device)
    _check(q, k, v, key_padding_mask=padding)
    _check(q, k, v, attn_mask=allowed)
    _check(q, k, v, attn_mask=additive, scale=0.3)
    _check(q, k, v, attn_mask=allowed, key_padding_mask=padding, is_causal=True)


def test_masks_that_are_not_contiguous(attention_backend):
    """Strided views of both masks (a repeat-and-slice key padding mask, a transposed attn_mask) give the numbers
    of their contiguous copies, and the oracle's."""
    _, device = attention_backend
    b, h, s_q, s_k = 2, 2, 9, 13
    q, k, v = _qkv(b, h, s_q, s_k, 16, torch.float32, device)
    g = torch.Generator().manual_seed(4)
    padding = (torch.arange(s_k)[None, :] >= torch.tensor([[13], [6]])).to(device)
    strided = torch.repeat_interleave(padding, 2, dim=-1)[..., ::2]
    allowed = (torch.rand(s_k, s_q, generator=g) > 0.3).to(device).t()
    additive = torch.randn(s_k + 3, s_q, generator=g).to(device)[2:-1].t()
    assert not strided.is_contiguous() and not allowed.is_contiguous() and not additive.is_contiguous()
    for attn_mask in (allowed, additive):
        got = _check(q, k, v, attn_mask=attn_mask, key_padding_mask=strided)
        want = _check(q, k, v, attn_mask=attn_mask.contiguous(), key_padding_mask=strided.contiguous())
        for name, a, e in zip(["out", "dq", "dk", "dv"], got, want):
            torch.testing.assert_close(a, e, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("is_causal", [False, True])
def test_double_backward_against_torch(attention_backend, is_causal):
    """Gradients of a gradient penalty through attention with a padding mask, against torch's SDPA on its math
    path (the one torch differentiates twice)."""
    _, device = attention_backend
    q, k, v = _qkv(2, 3, 5, 6, 16, torch.float32, device)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2], device=device)

    def ours(q, k, v):
        return F.attention(q, k, v, key_padding_mask=padding, is_causal=is_causal)

    def sdpa(q, k, v):
        mask = _torch_mask(2, 3, 5, 6, None, padding, is_causal, q.dtype, q.device)
        with sdpa_kernel(SDPBackend.MATH):
            return TF.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    compare_with_oracle(["d q", "d k", "d v"], gradient_penalty_grads(ours, (q, k, v)),
                        gradient_penalty_grads(sdpa, (q, k, v)),
                        gradient_penalty_grads(sdpa, (q, k, v), cast=torch.float64))


def test_long_sequences_on_compiled_backends(attention_backend):
    name, device = attention_backend
    if device == "cpu" and name in ("triton", "reference"):
        pytest.skip(f"{name} on CPU is slow at this length; the short cases cover it")
    q, k, v = _qkv(2, 2, 1000, 1000, 64, torch.float32, device)
    padding = (torch.arange(1000)[None, :] >= torch.tensor([[1000], [377]])).to(device)
    _check(q, k, v, key_padding_mask=padding, is_causal=True)
    _check(q[:1, :1], k[:1, :1, :999], v[:1, :1, :999], attn_mask=torch.randn(1000, 999, device=device))


def test_fully_masked_rows_give_zero_and_finite_gradients(attention_backend):
    _, device = attention_backend
    q, k, v = _qkv(2, 1, 6, 6, 16, torch.float32, device)
    allowed = torch.ones(6, 6, dtype=torch.bool, device=device)
    allowed[2] = False  # query 2 may see nothing
    padding = torch.tensor([[False] * 6, [True] * 6], device=device)  # sequence 1 has no keys at all
    out, dq, dk, dv = _check(q, k, v, attn_mask=allowed, key_padding_mask=padding)
    assert torch.all(out[:, :, 2] == 0) and torch.all(out[1] == 0)
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    assert torch.all(dk[1] == 0) and torch.all(dv[1] == 0)


def _dropout_mask(name, device, b, h, s_q, s_k, p, seed):
    """The keep mask the backend draws for `seed`: with q = 0 every key gets weight 1 / S_k, and v = I makes
    the output column j that weight times the dropout decision for key j."""
    d = max(16, s_k)
    q = torch.zeros(b, h, s_q, d, device=device)
    k = torch.randn(b, h, s_k, d, device=device)
    v = torch.eye(s_k, d, device=device).expand(b, h, s_k, d)
    torch.manual_seed(seed)
    with fastenc.backend(name):
        out = F.attention(q, k, v, dropout_p=p)
    return out[..., :s_k] > 0.5 / s_k


def test_dropout(attention_backend):
    name, device = attention_backend
    b, h, s_q, s_k, p = 2, 2, 24, 40, 0.25
    q, k, v = _qkv(b, h, s_q, s_k, 32, torch.float32, device, seed=5)
    skip_unless_takes("attention", name,
                      AttentionArgs(q, k, v, None, None, None, None, s_q, s_k, False, 1.0, p, None))
    keep = _dropout_mask(name, device, b, h, s_q, s_k, p, seed=11)
    # Keep rate: 3840 Bernoulli draws, so 5 standard deviations is about 0.035.
    sd = math.sqrt(p * (1 - p) / keep.numel())
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sd
    assert torch.equal(keep, _dropout_mask(name, device, b, h, s_q, s_k, p, seed=11)), "same seed, same mask"
    assert not torch.equal(keep, _dropout_mask(name, device, b, h, s_q, s_k, p, seed=12)), "another seed, another"

    # Forward and backward with random inputs use that same mask: compare with the math on it in float64.
    dout = torch.randn_like(q)

    def ours(q, k, v):
        torch.manual_seed(11)
        return F.attention(q, k, v, dropout_p=p)

    def with_mask(q, k, v):
        return attention_math(q, k, v, keep=keep, dropout_p=p)[0]

    got = outputs_and_grads(ours, (q, k, v), [dout])
    exact = outputs_and_grads(with_mask, (q, k, v), [dout], cast=torch.float64)
    low = outputs_and_grads(with_mask, (q, k, v), [dout])
    compare_with_oracle(["out", "dq", "dk", "dv"], got, low, exact)


def test_dropout_streams_of_seeds_and_heads_do_not_overlap(attention_backend, monkeypatch):
    """Head 1 under seed s must not draw head 0's mask under seed s + 1: each (seed, head) has its own stream."""
    name, device = attention_backend
    q, k, v = _qkv(1, 2, 24, 40, 32, torch.float32, device, seed=5)
    skip_unless_takes("attention", name,
                      AttentionArgs(q, k, v, None, None, None, None, 24, 40, False, 1.0, 0.25, None))
    masks = {}
    for seed in (7, 8):
        monkeypatch.setattr(F, "_dropout_seed", lambda p, seed=seed: torch.tensor(seed))
        masks[seed] = _dropout_mask(name, device, 1, 2, 24, 40, 0.25, seed=0)
    assert not torch.equal(masks[7][0, 1], masks[8][0, 0])


def _pack(x, lengths):
    """(B, H, S, D) padded -> (T, H, D) packed tokens."""
    return torch.cat([x[i, :, :n].transpose(0, 1) for i, n in enumerate(lengths)])


@pytest.mark.parametrize("is_causal", [False, True])
def test_varlen_equals_padded(attention_backend, is_causal):
    name, device = attention_backend
    lengths_q = [5, 1, 23, 17]
    lengths_k = lengths_q if is_causal else [9, 4, 30, 1]
    s_q, s_k = max(lengths_q), max(lengths_k)
    q, k, v = _qkv(len(lengths_q), 2, s_q, s_k, 40, torch.float32 if name == "native" else torch.float16, device,
                   seed=9)
    padding = torch.arange(s_k, device=device)[None, :] >= torch.tensor(lengths_k, device=device)[:, None]
    cu_q = torch.tensor([0] + lengths_q, device=device).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lengths_k, device=device).cumsum(0).to(torch.int32)
    packed = [_pack(q, lengths_q), _pack(k, lengths_k), _pack(v, lengths_k)]
    dout = torch.randn_like(packed[0])

    def varlen(q, k, v):
        return F.attention_varlen(q, k, v, cu_q, cu_k, s_q, s_k, is_causal=is_causal)

    def padded(q, k, v):
        return _pack(F.attention(q, k, v, key_padding_mask=padding, is_causal=is_causal), lengths_q)

    got = outputs_and_grads(varlen, packed, [dout])
    assert backends.last_used()["attention"] == fastenc.get_backend()
    want = outputs_and_grads(padded, (q, k, v), [dout])
    want = [want[0], _pack(want[1], lengths_q), _pack(want[2], lengths_k), _pack(want[3], lengths_k)]
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, want):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("bias_shape,padded,causal", [((2, 3, 9, 12), True, False), ((3, 9, 12), False, True),
                                                       ((1, 1, 9, 12), True, True)])
def test_learned_bias_gets_its_gradient(attention_backend, bias_shape, padded, causal):
    """A float attn_mask that requires grad (MPNet's relative position bias, T5-style biases): its gradient,
    summed over the dimensions it was broadcast along, with padded and causally hidden keys (whose bias gradient
    is 0), against torch's SDPA (which differentiates its mask), in float64 as the oracle."""
    name, device = attention_backend
    q, k, v = _qkv(2, 3, 9, 12, 16, torch.float32, device)
    bias = torch.randn(bias_shape, generator=torch.Generator().manual_seed(5)).to(device)
    padding = None
    if padded:
        padding = torch.zeros(2, 12, dtype=torch.bool, device=device)
        padding[1, 7:] = True
    skip_unless_takes("attention", name, AttentionArgs(q, k, v, bias.expand(2, 3, 9, 12), padding, None, None, 9,
                                                       12, causal, 1.0, 0.0, None))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(q)

    def ours(q, k, v, bias):
        return F.attention(q, k, v, attn_mask=bias, key_padding_mask=padding, is_causal=causal)

    def sdpa(q, k, v, bias):
        mask = _torch_mask(2, 3, 9, 12, None, padding, causal, q.dtype, q.device) + bias
        return TF.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    got = outputs_and_grads(ours, (q, k, v, bias), [dout])
    assert backends.last_used()["attention"] == name, "the selected backend did not run"
    want = outputs_and_grads(sdpa, (q, k, v, bias), [dout])
    exact = outputs_and_grads(sdpa, (q, k, v, bias), [dout], cast=torch.float64)
    compare_with_oracle(["out", "dq", "dk", "dv", "dbias"], got, want, exact)


def test_opcheck(attention_backend):
    name, device = attention_backend
    q, k, v = _qkv(2, 2, 9, 12, 16, torch.float32, device)
    padding = torch.zeros(2, 12, dtype=torch.bool, device=device)
    padding[1, 7:] = True
    bias = torch.randn(9, 12, device=device).expand(2, 2, 9, 12)
    torch.library.opcheck(torch.ops.fastenc.attention.default,
                          (q, k, v, bias, padding, None, None, 9, 12, True, 0.25, 0.0, None, name))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    packed = [t[0, 0].reshape(-1, 1, 16)[:9].contiguous() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.fastenc.attention.default,
                          (*packed, None, None, cu, cu, 5, 5, False, 0.25, 0.0, None, name))


def test_torch_compile_fullgraph(attention_backend):
    _, device = attention_backend
    q, k, v = _qkv(2, 2, 11, 11, 16, torch.float32, device)

    def step(q, k, v):
        return F.attention(q * 2, k, v, is_causal=True).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [t.requires_grad_() for t in (q, k, v)]
    for a, e in zip(torch.autograd.grad(compiled(*leaves), leaves), torch.autograd.grad(step(*leaves), leaves)):
        torch.testing.assert_close(a, e)


def test_autocast_runs_in_the_autocast_dtype():
    q, k, v = _qkv(1, 2, 8, 8, 16, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16), fastenc.backend("reference"):
        out = F.attention(q, k, v)
    assert out.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="large shapes run on a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("s,d", [(1000, 64), (1024, 128), (513, 80), (257, 256)])
def test_large_on_gpu(s, d, dtype):
    with fastenc.backend("triton"):
        _check(*_qkv(2, 4, s, s, d, dtype, "cuda"), is_causal=s % 2 == 1)


@pytest.mark.skipif("native" not in backends.implemented("attention"), reason="this CPU runs no native attention")
def test_auto_on_cpu_runs_torch_past_one_block_of_keys():
    """"auto" runs the native CPU attention up to 256 keys (one softmax block) or under a causal mask, and torch's
    CPU flash kernel on longer sequences without one (ops/attention.py's slower rule), padded and packed alike."""
    def backend_for(s, is_causal=False, packed=False):
        q = torch.randn(s, 2, 8) if packed else torch.randn(1, 2, s, 8)
        cu = torch.tensor([0, s], dtype=torch.int32)
        with torch.no_grad():
            if packed:
                F.attention_varlen(q, q, q, cu, cu, s, s, is_causal=is_causal)
            else:
                F.attention(q, q, q, is_causal=is_causal)
        return backends.last_used()["attention"]

    for packed in (False, True):
        assert backend_for(256, packed=packed) == "native"
        assert backend_for(257, packed=packed) == "torch"
        assert backend_for(257, is_causal=True, packed=packed) == "native"
