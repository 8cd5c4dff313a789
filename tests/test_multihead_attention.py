"""fastenc.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same weights."""

from __future__ import annotations

import pytest
import torch

import fastenc

E, H, L, S, N = 24, 3, 7, 9, 2


def _pair(device, **kwargs):
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(E, H, device=device, **kwargs)
    ours = fastenc.nn.MultiheadAttention(E, H, device=device, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        for p in theirs.parameters():  # torch initialises the biases to 0: make every parameter matter
            p.normal_(0, 0.3)
    ours.load_state_dict(theirs.state_dict())
    return ours.eval(), theirs.eval()


def _inputs(device, batch_first, kdim=E, vdim=E, self_attention=True, batched=True):
    g = torch.Generator().manual_seed(1)

    def rand(length, width):
        shape = ((N, length) if batch_first else (length, N)) if batched else (length,)
        return torch.randn(*shape, width, generator=g).to(device)

    q = rand(L if not self_attention else L, E)
    if self_attention:
        return q, q, q
    return q, rand(S, kdim), rand(S, vdim)


def _compare(ours, theirs, inputs, **kwargs):
    leaves = [t.detach().requires_grad_() for t in inputs]
    if inputs[0] is inputs[1] is inputs[2]:
        leaves = [leaves[0]] * 3
    out, weights = ours(*leaves, need_weights=False, **kwargs)
    expected, _ = theirs(*leaves, need_weights=False, **kwargs)
    assert weights is None
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    dy = torch.randn_like(out)
    params_ours, params_theirs = list(ours.parameters()), list(theirs.parameters())
    unique = list({id(t): t for t in leaves}.values())
    got = torch.autograd.grad(out, unique + params_ours, dy)
    want = torch.autograd.grad(expected, unique + params_theirs, dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize(
    "kwargs", [dict(), dict(bias=False), dict(add_bias_kv=True), dict(add_zero_attn=True),
               dict(add_bias_kv=True, add_zero_attn=True)], ids=str)
def test_self_attention(backend_device, batch_first, kwargs):
    _, device = backend_device
    ours, theirs = _pair(device, batch_first=batch_first, **kwargs)
    _compare(ours, theirs, _inputs(device, batch_first))


def test_cross_attention_with_kdim_vdim(backend_device):
    _, device = backend_device
    ours, theirs = _pair(device, kdim=10, vdim=14, batch_first=True)
    _compare(ours, theirs, _inputs(device, True, kdim=10, vdim=14, self_attention=False))


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("padding_kind", [None, "bool", "float"])
@pytest.mark.parametrize("mask_dim", [None, 2, 3])
def test_masks(backend_device, mask_kind, padding_kind, mask_dim):
    _, device = backend_device
    ours, theirs = _pair(device, batch_first=True, add_bias_kv=mask_dim == 3)
    x = _inputs(device, True)
    g = torch.Generator().manual_seed(4)
    kwargs = {}
    if mask_dim is not None:
        shape = (L, L) if mask_dim == 2 else (N * H, L, L)
        allowed = torch.rand(shape, generator=g) > 0.3
        allowed[..., 0] = True  # every query keeps a key, so torch has no NaN rows
        mask = ~allowed if mask_kind == "bool" else torch.randn(shape, generator=g).masked_fill(~allowed, -1e9)
        kwargs["attn_mask"] = mask.to(device)
    if padding_kind is not None:
        pad = torch.arange(L)[None, :] >= torch.tensor([[L], [4]])
        kwargs["key_padding_mask"] = (pad if padding_kind == "bool" else pad.float() * -1e9).to(device)
    _compare(ours, theirs, x, **kwargs)


def test_causal_hint(backend_device):
    _, device = backend_device
    ours, theirs = _pair(device)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, device=device)
    _compare(ours, theirs, _inputs(device, False), attn_mask=causal, is_causal=True)
    with pytest.raises(RuntimeError, match="attn_mask"):
        ours(*_inputs(device, False), need_weights=False, is_causal=True)


def test_unbatched(backend_device):
    _, device = backend_device
    ours, theirs = _pair(device)
    _compare(ours, theirs, _inputs(device, False, batched=False))


def test_need_weights_returns_torchs_weights():
    ours, theirs = _pair("cpu", batch_first=True)
    x = _inputs("cpu", True)
    out, weights = ours(*x)
    expected, expected_weights = theirs(*x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights, expected_weights)


def test_dropout_only_in_training():
    ours, _ = _pair("cpu", dropout=0.5, batch_first=True)
    x = _inputs("cpu", True)
    torch.testing.assert_close(ours(*x, need_weights=False)[0], ours(*x, need_weights=False)[0])
    ours.train()
    torch.manual_seed(3)
    first = ours(*x, need_weights=False)[0]
    torch.manual_seed(3)
    assert torch.equal(first, ours(*x, need_weights=False)[0])
    assert not torch.allclose(first, ours.eval()(*x, need_weights=False)[0])


def test_learned_mask_is_differentiated_as_torch_does(backend_device):
    """A mask that requires grad (a learned relative-position bias) gets its gradient, as in torch."""
    _, device = backend_device
    ours, theirs = _pair(device, batch_first=True)
    q, k, v = _inputs(device, True)
    bias = torch.randn(L, L, device=device, requires_grad=True)
    out, _ = ours(q, k, v, attn_mask=bias, need_weights=False)
    expected, _ = theirs(q, k, v, attn_mask=bias, need_weights=False)
    torch.testing.assert_close(out, expected)
    dy = torch.randn_like(out)
    (got,), (want,) = torch.autograd.grad(out, [bias], dy), torch.autograd.grad(expected, [bias], dy)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("build", [
    lambda: fastenc.nn.MultiheadAttention(E, H), lambda: fastenc.nn.LayerNorm(E), lambda: fastenc.nn.LSTM(4, E),
    lambda: fastenc.nn.TransformerEncoderLayer(E, H, 2 * E),
    lambda: fastenc.convert(torch.nn.Sequential(torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(E, H, 2 * E), 1, enable_nested_tensor=False)))],
    ids=["mha", "layer_norm", "lstm", "encoder_layer", "converted_model"])
def test_torchscript_says_it_cannot_and_names_torch_compile(build):
    with pytest.raises(RuntimeError, match=r"cannot be compiled by torch.jit.script .* use torch.compile"):
        torch.jit.script(build())


@pytest.mark.parametrize("padding", [False, True], ids=["hint", "hint-with-padding"])
def test_causal_hint_takes_torchs_reading_of_attn_mask(backend_device, padding):
    """As torch: without a padding mask the hint stands for attn_mask, which is not read (one query against S keys
    with a mask shaped for S x S, as an incremental decoder passes it, sees key 0 only); with one, attn_mask itself
    is merged with the padding mask (here a mask that is not causal at all)."""
    _, device = backend_device
    ours, theirs = _pair(device, batch_first=True)
    g = torch.Generator().manual_seed(5)
    query = torch.randn(N, 1 if not padding else S, E, generator=g).to(device)
    memory = torch.randn(N, S, E, generator=g).to(device)
    kwargs = dict(attn_mask=(torch.rand(S, S, generator=g) > 0.7).to(device), is_causal=True)
    kwargs["attn_mask"][:, 0] = False
    if padding:
        kwargs["key_padding_mask"] = (torch.arange(S)[None, :] >= torch.tensor([[S], [5]])).to(device)
    _compare(ours, theirs, (query, memory, memory), **kwargs)


class _UserLayer(fastenc.nn.TransformerEncoderLayer):
    """A user's subclass, as torch's tests script them."""


def test_torchscript_error_names_a_users_subclass_as_the_users():
    with pytest.raises(RuntimeError, match=r"^tests\.test_multihead_attention\._UserLayer \(a fastenc module\)"):
        torch.jit.script(_UserLayer(E, H, 2 * E))


RANK_ERRORS = {  # inputs of the wrong rank for a batched query
    "2-D key": dict(key=torch.randn(3, E)),
    "2-D value": dict(value=torch.randn(3, E)),
    "1-D key_padding_mask": dict(key_padding_mask=torch.tensor([False, True, True])),
    "1-D attn_mask": dict(attn_mask=torch.tensor([False, True, True])),
}


@pytest.mark.parametrize("case", RANK_ERRORS)
def test_rank_errors_are_torchs_word_for_word(case):
    """With need_weights=False (fastenc's fused path) an input of the wrong rank raises what torch raises."""
    ours, theirs = _pair("cpu", batch_first=True)
    q = torch.randn(N, L, E)
    args = {**dict(query=q, key=q, value=q, need_weights=False), **RANK_ERRORS[case]}
    with pytest.raises(AssertionError) as want:
        theirs(**args)
    with pytest.raises(AssertionError) as got:
        ours(**args)
    assert type(got.value) is type(want.value) and str(got.value) == str(want.value)
