"""fastenc.nn.TransformerEncoderLayer / TransformerEncoder and fastenc.convert against torch.nn."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import fastenc
import fastenc.nn.transformer

D, NHEAD, FF = 16, 4, 24


def _copy_of(torch_module, fastenc_module, scale=0.3):
    """Non-trivial weights in the torch module, carried to fastenc's through the state_dict."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in torch_module.parameters():
            p.normal_(0, scale)
    assert list(fastenc_module.state_dict()) == list(torch_module.state_dict())
    fastenc_module.load_state_dict(torch_module.state_dict())
    return fastenc_module.eval(), torch_module.eval()


def _layers(padding_free=False, **kwargs):
    kwargs = {"dropout": 0.0, **kwargs}
    torch.manual_seed(0)
    return _copy_of(torch.nn.TransformerEncoderLayer(D, NHEAD, FF, **kwargs),
                    fastenc.nn.TransformerEncoderLayer(D, NHEAD, FF, padding_free=padding_free, **kwargs))


def _compare(ours, theirs, x, valid=None, atol=1e-5, **kwargs):
    """Forward and every gradient, at the positions `valid` marks (all by default)."""
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = ours(x_ours, **kwargs), theirs(x_theirs, **kwargs)
    keep = torch.ones_like(out) if valid is None else valid.to(out.dtype)
    torch.testing.assert_close(out * keep, expected * keep, atol=atol, rtol=atol)
    dy = torch.randn_like(out) * keep
    got = torch.autograd.grad(out, [x_ours, *ours.parameters()], dy)
    want = torch.autograd.grad(expected, [x_theirs, *theirs.parameters()], dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=10 * atol, rtol=10 * atol)
    return out


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu", torch.nn.functional.silu], ids=["relu", "gelu", "silu"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_layer_matches_torch(backend_device, norm_first, activation, batch_first):
    _, device = backend_device
    ours, theirs = _layers(norm_first=norm_first, activation=activation, batch_first=batch_first, device=device)
    _compare(ours, theirs, torch.randn(5, 3, D, device=device))


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_layer_inference_matches_torch(backend_device, grad_mode, activation):
    """Where no gradient can be wanted the feed-forward bias is added in the matrix product, not the epilogue."""
    _, device = backend_device
    ours, theirs = _layers(activation=activation, device=device)
    x = torch.randn(5, 3, D, device=device)
    with grad_mode():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_feed_forward_runs_in_row_blocks_in_inference(monkeypatch, norm_first):
    """In inference on a CPU the feed-forward block runs over blocks of rows (transformer.by_row_blocks): here
    150 rows in blocks of 64, 64 and 22, against torch's layer; where a gradient is recorded, or a module has a
    forward hook (global or on a module), in one piece."""
    monkeypatch.setattr(fastenc.nn.transformer, "FEED_FORWARD_BLOCK_BYTES", 1)  # blocks of the least, 64 rows
    ours, theirs = _layers(norm_first=norm_first)
    blocks = []
    ff_rows = ours._ff_rows
    ours._ff_rows = lambda h: blocks.append(h.shape[1]) or ff_rows(h)
    x = torch.randn(50, 3, D)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    assert blocks == [64, 64, 22]
    blocks.clear()
    _compare(ours, theirs, x)
    assert len(blocks) == 1
    blocks.clear()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)  # a global hook
    with torch.no_grad():
        ours(x)
    handle.remove()
    assert len(blocks) == 1
    blocks.clear()
    ours.linear2.register_forward_hook(lambda *args: None)
    with torch.no_grad():
        ours(x)
    assert len(blocks) == 1


def test_layer_without_bias_and_unbatched(backend_device):
    _, device = backend_device
    ours, theirs = _layers(bias=False, device=device)
    _compare(ours, theirs, torch.randn(6, D, device=device))


def _zero_at(padding, out):
    """Assert that `out` is exactly 0 at the padded positions (the padding-free path)."""
    assert torch.all(out[padding] == 0)


@pytest.mark.parametrize("padding_free", [False, True], ids=["every-position", "padding-free"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_layer_masks(backend_device, norm_first, padding_free):
    """By default every position is torch's, padded ones too; padding_free compares the real ones and gives 0."""
    _, device = backend_device
    ours, theirs = _layers(padding_free, norm_first=norm_first, batch_first=True, device=device)
    x = torch.randn(3, 7, D, device=device)
    padding = (torch.arange(7)[None, :] >= torch.tensor([[7], [3], [5]])).to(device)
    valid = (~padding)[..., None] if padding_free else None
    causal = torch.nn.Transformer.generate_square_subsequent_mask(7, device=device)
    out = _compare(ours, theirs, x, valid, src_key_padding_mask=padding)
    out_causal = _compare(ours, theirs, x, valid, src_key_padding_mask=padding, src_mask=causal, is_causal=True)
    if padding_free:
        _zero_at(padding, out)
        _zero_at(padding, out_causal)
    _compare(ours, theirs, x, src_mask=torch.randn(7, 7, device=device))  # float mask: the padded path
    _compare(ours, theirs, x, valid, src_mask=torch.rand(7, 7, device=device) > 0.8, src_key_padding_mask=padding)


@pytest.mark.parametrize("padding_free", [False, True], ids=["every-position", "padding-free"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_stack(backend_device, norm_first, padding_free):
    _, device = backend_device
    layer = torch.nn.TransformerEncoderLayer(D, NHEAD, FF, dropout=0.0, norm_first=norm_first, device=device)
    ours, theirs = _copy_of(
        torch.nn.TransformerEncoder(layer, 3, norm=torch.nn.LayerNorm(D, device=device), enable_nested_tensor=False),
        fastenc.nn.TransformerEncoder(layer, 3, norm=torch.nn.LayerNorm(D, device=device),
                                      enable_nested_tensor=False, padding_free=padding_free),
    )
    assert all(type(m) is fastenc.nn.TransformerEncoderLayer for m in ours.layers)
    assert type(ours.norm) is fastenc.nn.LayerNorm
    x = torch.randn(9, 4, D, device=device)
    padding = (torch.arange(9)[None, :] >= torch.tensor([[9], [1], [6], [4]])).to(device)
    _compare(ours, theirs, x)
    out = _compare(ours, theirs, x, (~padding).t()[..., None] if padding_free else None,
                   src_key_padding_mask=padding)
    if padding_free:
        _zero_at(padding.t(), out)


def test_encoder_zeroes_padding_where_torch_takes_its_nested_tensor_path(backend_device):
    """Inference with enable_nested_tensor: torch returns 0 at padded positions, and so does fastenc (packed)."""
    _, device = backend_device
    layer = torch.nn.TransformerEncoderLayer(D, NHEAD, FF, dropout=0.0, batch_first=True, device=device)
    ours, theirs = _copy_of(torch.nn.TransformerEncoder(layer, 2), fastenc.nn.TransformerEncoder(layer, 2))
    x = torch.randn(3, 6, D, device=device)
    padding = (torch.arange(6)[None, :] >= torch.tensor([[6], [2], [4]])).to(device)
    with torch.no_grad():
        out, expected = ours(x, src_key_padding_mask=padding), theirs(x, src_key_padding_mask=padding)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    _zero_at(padding, expected)
    with torch.no_grad():  # right-aligned padding: torch's mask_check leaves the fast path, and computes them
        flipped = padding.flip(1)
        out, expected = ours(x, src_key_padding_mask=flipped), theirs(x, src_key_padding_mask=flipped)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert expected[flipped].abs().min() > 0


@pytest.mark.parametrize("module", ["layer", "encoder", "attention"])
def test_empty_batch(backend_device, module):
    _, device = backend_device
    layer = torch.nn.TransformerEncoderLayer(D, NHEAD, FF, dropout=0.0, batch_first=True, device=device)
    ours = {"layer": lambda: fastenc.nn.TransformerEncoderLayer(D, NHEAD, FF, dropout=0.0, batch_first=True,
                                                                device=device),
            "encoder": lambda: fastenc.nn.TransformerEncoder(layer, 2),
            "attention": lambda: fastenc.nn.MultiheadAttention(D, NHEAD, batch_first=True, device=device)}[module]()
    x = torch.randn(0, 5, D, device=device, requires_grad=True)
    for padding in (None, torch.zeros(0, 5, dtype=torch.bool, device=device)):
        if module == "attention":
            out = ours(x, x, x, key_padding_mask=padding)[0]
        else:
            out = ours(x, src_key_padding_mask=padding)
        assert out.shape == (0, 5, D)
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert grad.shape == x.shape


def test_fully_padded_sequence_is_finite_and_isolated():
    layer = fastenc.nn.TransformerEncoderLayer(D, NHEAD, FF, dropout=0.0, batch_first=True)
    encoder = fastenc.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False, padding_free=True).eval()
    x = torch.randn(3, 5, D, requires_grad=True)
    padding = torch.tensor([[False] * 5, [True] * 5, [False] * 3 + [True] * 2])
    out = encoder(x, src_key_padding_mask=padding)
    assert torch.all(out[1] == 0) and torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.isfinite(grad).all() and torch.all(grad[1] == 0)
    alone = encoder(x[[0, 2]], src_key_padding_mask=padding[[0, 2]])
    torch.testing.assert_close(out[[0, 2]], alone)


# PyTorch's published figures for TransformerEncoderLayer(4, 2, 16, dropout=0) with parameters set to
# cos(0..n-1) (torch's test_nn): the output of one token, two tokens, and two with the first padded.
PUBLISHED = [
    ([[[20.0, 30.0, 40.0, 50.0]]], None, [[[2.258703, 0.127985, -0.697881, 0.170862]]]),
    ([[[1.0, 2.0, 3.0, 4.0]], [[5.0, 6.0, 7.0, 8.0]]], None,
     [[[2.272644, 0.119035, -0.691669, 0.153486]], [[2.272644, 0.119035, -0.691669, 0.153486]]]),
    ([[[1.0, 2.0, 3.0, 4.0]], [[5.0, 6.0, 7.0, 8.0]]], [[True, False]],
     [[[2.301516, 0.092249, -0.679101, 0.103088]], [[2.301516, 0.092249, -0.679101, 0.103088]]]),
]


@pytest.mark.parametrize("src,padding,expected", PUBLISHED)
def test_published_figures(backend_device, src, padding, expected):
    _, device = backend_device
    layer = fastenc.nn.TransformerEncoderLayer(4, 2, 16, 0.0, device=device).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.cos(torch.arange(p.numel(), dtype=torch.float32)).view(p.shape))
        mask = None if padding is None else torch.tensor(padding, device=device)
        out = layer(torch.tensor(src, device=device), src_key_padding_mask=mask)
    # At every position, the padded one included.
    torch.testing.assert_close(out, torch.tensor(expected, device=device), atol=1e-5, rtol=1e-5)


def test_convert_replaces_modules_and_keeps_everything():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.TransformerEncoder(
                torch.nn.TransformerEncoderLayer(D, NHEAD, FF, dropout=0.0, batch_first=True), 2,
                enable_nested_tensor=False)
            self.attention = torch.nn.MultiheadAttention(D, 2, batch_first=True)
            self.head = torch.nn.Sequential(torch.nn.LayerNorm(D), torch.nn.Linear(D, 3))

        def forward(self, x, padding=None):
            h = self.encoder(x, src_key_padding_mask=padding)
            h = h + self.attention(h, h, h, key_padding_mask=padding, need_weights=False)[0]
            return self.head(h)

    model = Model().double().train()
    x = torch.randn(2, 6, D, dtype=torch.float64)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    expected = model(x, padding)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = fastenc.convert(model)
    assert converted is model and model.training
    assert type(model.encoder) is fastenc.nn.TransformerEncoder
    assert type(model.encoder.layers[1].self_attn) is fastenc.nn.MultiheadAttention
    assert type(model.attention) is fastenc.nn.MultiheadAttention
    assert type(model.head[0]) is fastenc.nn.LayerNorm and type(model.head[1]) is torch.nn.Linear
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.float64
    torch.testing.assert_close(model(x, padding), expected)  # at every position, padded ones included


def test_copy_pickle_and_state_dict_round_trip():
    layer = fastenc.nn.TransformerEncoderLayer(D, NHEAD, FF, dropout=0.0).eval()
    x = torch.randn(4, 2, D)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert type(clone) is type(layer)
        torch.testing.assert_close(clone(x), layer(x))
    theirs = torch.nn.TransformerEncoderLayer(D, NHEAD, FF, dropout=0.0).eval()
    theirs.load_state_dict(layer.state_dict())
    torch.testing.assert_close(theirs(x), layer(x))


def test_torch_compile_fullgraph_encoder():
    layer = fastenc.nn.TransformerEncoderLayer(D, NHEAD, FF, dropout=0.0, batch_first=True)
    encoder = fastenc.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, D)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    compiled = torch.compile(encoder, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, src_key_padding_mask=padding), encoder(x, src_key_padding_mask=padding))


@pytest.mark.parametrize("model", ["encoder", "lstm"])
def test_torch_export(backend_device, model):
    """torch.export captures fastenc's ops as custom ops (their fake kernels give the shapes), and the exported
    program computes what the module computes."""
    name, device = backend_device
    torch.manual_seed(0)
    if model == "encoder":
        layer = fastenc.nn.TransformerEncoderLayer(D, NHEAD, FF, dropout=0.0, batch_first=True)
        module = fastenc.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).to(device).eval()
        args = (torch.randn(2, 5, D, device=device),)
        kwargs = {"src_key_padding_mask": torch.tensor([[False] * 5, [False] * 3 + [True] * 2], device=device)}
    else:
        module = fastenc.nn.LSTM(D, 6, num_layers=2, bidirectional=True).to(device)
        args, kwargs = (torch.randn(5, 2, D, device=device),), {}
    with fastenc.backend(name):
        program = torch.export.export(module, args, kwargs)
        torch.testing.assert_close(program.module()(*args, **kwargs), module(*args, **kwargs))
    runs_a_fastenc_op = not (model == "lstm" and name == "torch")  # the torch backend's LSTM is torch's own op
    assert any(str(node.target).startswith("fastenc.") for node in program.graph.nodes) == runs_a_fastenc_op


@pytest.mark.parametrize(
    "build,call,error,match",
    [
        (lambda: fastenc.nn.TransformerEncoderLayer(10, 3), None, ValueError, "nhead"),
        (None, lambda m: m(torch.randn(3, 2, D + 1)), ValueError, "src must be"),
        (None, lambda m: m(torch.randn(3, 2, D), src_key_padding_mask=torch.zeros(3, 2, dtype=torch.bool)),
         ValueError, "src_key_padding_mask must have shape"),
        (None, lambda m: m(torch.randn(3, 2, D), src_key_padding_mask=torch.zeros(2, 3, dtype=torch.int64)),
         TypeError, "src_key_padding_mask must be bool"),
    ],
)
def test_bad_input_names_the_argument(build, call, error, match):
    with pytest.raises(error, match=match):
        module = build() if build else fastenc.nn.TransformerEncoderLayer(D, NHEAD, FF)
        if call:
            call(module)


def test_convert_padding_free_skips_padded_positions():
    layer = torch.nn.TransformerEncoderLayer(D, NHEAD, FF, dropout=0.0, batch_first=True)
    theirs = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    ours = fastenc.convert(copy.deepcopy(theirs), padding_free=True)
    assert ours.padding_free and all(m.padding_free for m in ours.layers)
    x = torch.randn(2, 6, D)
    padding = torch.tensor([[False] * 6, [False] * 2 + [True] * 4])
    out, expected = ours(x, src_key_padding_mask=padding), theirs(x, src_key_padding_mask=padding)
    torch.testing.assert_close(out[~padding], expected[~padding], atol=1e-5, rtol=1e-5)
    _zero_at(padding, out)
