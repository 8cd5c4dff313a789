"""Fused LSTM: fastenc.nn.LSTM on every backend with an implementation, against torch.nn.LSTM (float32) and
torch.nn.LSTM in float64 as the oracle; the reference's written-out backward against autograd; the op's contract."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastenc
from fastenc import backends
from fastenc import functional as F
from fastenc.ops import lstm as lstm_op
from fastenc.reference import lstm as reference
from tests.conftest import compare_with_oracle, gradient_penalty_grads

INPUT, HIDDEN, STEPS, BATCH = 5, 6, 4, 3
LENGTHS = [3, 4, 1]  # unsorted, with the longest in the middle and a one-step sequence


@pytest.fixture
def lstm_backend(backend_device):
    name, device = backend_device
    if name not in backends.implemented("lstm"):
        pytest.skip(f"{name} has no lstm of its own yet (it runs the reference, see test_backends)")
    return name, device


@pytest.fixture
def lstm_op_backend(lstm_backend):
    """A backend with its own fastenc::lstm_layer (the torch backend runs torch's LSTM op in its place)."""
    if lstm_backend[0] == "torch":
        pytest.skip("the torch backend is torch's LSTM op, with its own autograd, run in place of fastenc's op")
    return lstm_backend


def _modules(device, seed=0, input_size=INPUT, hidden=HIDDEN, **config):
    """(fastenc module, torch module) with the same weights, in float32."""
    torch.manual_seed(seed)
    theirs = torch.nn.LSTM(input_size, hidden, **config).to(device)
    ours = fastenc.nn.LSTM(input_size, hidden, **config).to(device)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _inputs(module, kind, with_hx, device, dtype=torch.float32, steps=STEPS, seed=1, batch=BATCH):
    """(x, h0, c0) for `kind` ("batched", "unbatched", "packed": padded here, packed inside _run)."""
    g = torch.Generator().manual_seed(seed)
    layers = module.num_layers * (2 if module.bidirectional else 1)
    out_size = module.proj_size or module.hidden_size
    if kind == "unbatched":
        x = torch.randn(steps, module.input_size, generator=g)
        hx = [torch.randn(layers, size, generator=g) for size in (out_size, module.hidden_size)]
    else:
        x = torch.randn(batch, steps, module.input_size, generator=g)
        x = x if module.batch_first else x.transpose(0, 1).contiguous()
        hx = [torch.randn(layers, batch, size, generator=g) for size in (out_size, module.hidden_size)]
    tensors = [t.to(dtype).to(device) for t in (x, *hx)]
    return tensors if with_hx else tensors[:1]


def _run(module, kind, inputs, seed=2, lengths=LENGTHS):
    """[output, h_n, c_n, then the gradients of the inputs and of every parameter] for random output gradients."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    params = list(module.parameters())
    x, hx = leaves[0], (tuple(leaves[1:]) or None)
    if kind == "packed":
        packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=module.batch_first, enforce_sorted=False)
        out, (h_n, c_n) = module(packed, hx)
        out = out.data
    else:
        out, (h_n, c_n) = module(x, hx)
    g = torch.Generator().manual_seed(seed)
    grads_out = [torch.randn(t.shape, generator=g).to(t) for t in (out, h_n, c_n)]
    grads = torch.autograd.grad((out, h_n, c_n), leaves + params, grads_out)
    return [t.detach() for t in (out, h_n, c_n)] + list(grads)


def _check_inference_against_torch(ours, theirs, inputs):
    """Without autograd the layers take other paths (nothing saved, no gates stored): output, h_n and c_n against
    torch's, both measured against a float64 copy of torch's module."""
    with torch.no_grad():
        got, want = ours(inputs[0], inputs[1:]), theirs(inputs[0], inputs[1:])
        exact = copy.deepcopy(theirs).double()(inputs[0].double(), tuple(t.double() for t in inputs[1:]))
    flat = lambda result: [result[0], *result[1]]  # noqa: E731
    compare_with_oracle(["output", "h_n", "c_n"], flat(got), flat(want), flat(exact))


def _names(module, with_hx):
    return ["output", "h_n", "c_n", "d input"] + (["d h0", "d c0"] if with_hx else []) + [
        f"d {name}" for name, _ in module.named_parameters()]


def _check_against_torch(ours, theirs, kind, inputs, lengths=LENGTHS):
    got = _run(ours, kind, inputs, lengths=lengths)
    want = _run(theirs, kind, inputs, lengths=lengths)
    exact = _run(copy.deepcopy(theirs).double(), kind, [t.double() for t in inputs], lengths=lengths)
    compare_with_oracle(_names(ours, len(inputs) > 1), got, want, exact)
    return got


CASES = [  # (module config, input kind, with (h0, c0))
    (dict(), "batched", True),
    (dict(), "unbatched", False),
    (dict(), "packed", True),
    (dict(num_layers=2, bidirectional=True), "batched", False),
    (dict(num_layers=2, bidirectional=True), "packed", True),
    (dict(proj_size=4), "batched", True),
    (dict(proj_size=4, bidirectional=True), "unbatched", True),
    (dict(num_layers=2, bidirectional=True, proj_size=4, batch_first=True), "packed", True),
    (dict(bias=False, batch_first=True), "batched", False),
    (dict(bias=False, num_layers=2, batch_first=True), "packed", False),
]


@pytest.mark.parametrize("config,kind,with_hx", CASES, ids=[f"{c}-{k}-{'hx' if h else 'nohx'}" for c, k, h in CASES])
def test_against_torch(lstm_backend, config, kind, with_hx):
    name, device = lstm_backend
    ours, theirs = _modules(device, **config)
    _check_against_torch(ours, theirs, kind, _inputs(theirs, kind, with_hx, device))
    assert backends.last_used()["lstm"] == name, "the selected backend did not run"


def test_packed_output_is_packed_like_torchs(lstm_backend):
    _, device = lstm_backend
    ours, theirs = _modules(device, bidirectional=True)
    x = _inputs(theirs, "batched", False, device)[0]
    packed = pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False)
    got, (h_n, _) = ours(packed)
    want, (h_want, _) = theirs(packed)
    assert torch.equal(got.batch_sizes, want.batch_sizes)
    assert torch.equal(got.sorted_indices, want.sorted_indices)
    assert torch.equal(got.unsorted_indices, want.unsorted_indices)
    torch.testing.assert_close(h_n, h_want)  # h_n comes back in the caller's (unsorted) batch order


def test_dropout_between_layers_matches_torch():
    """torch's LSTM draws its inter-layer dropout masks from the same generator, in the same order."""
    ours, theirs = _modules("cpu", num_layers=3, dropout=0.4)
    x = _inputs(theirs, "batched", False, "cpu")[0]
    torch.manual_seed(5)
    got = ours(x)[0]
    torch.manual_seed(5)
    want = theirs(x)[0]
    torch.testing.assert_close(got, want)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x)[0], theirs(x)[0])  # no dropout in evaluation


def test_long_sequence_error_growth(lstm_backend):
    """T = 1000 (T = 60 on Triton's interpreter, which runs one program at a time): the error must not grow beyond
    torch's own float32 error over the sequence."""
    name, device = lstm_backend
    steps = 60 if name == "triton" and device == "cpu" else 1000
    ours, theirs = _modules(device, seed=3, hidden=16)  # one whole 16-unit panel of the native CPU step
    inputs = _inputs(theirs, "batched", True, device, steps=steps, seed=4)
    got = _check_against_torch(ours, theirs, "batched", inputs)
    assert torch.isfinite(got[0]).all()


def test_sizes_off_the_tiles(lstm_backend):
    """Input and hidden sizes that are no multiple of the native CPU step's tiles (16 units a panel, 16 x 16
    blocks in its weight packing, 6 rows a tile): several whole panels and a partial one, whole and partial depth
    blocks, a batch over two thread shares with a partial row tile; inference and training."""
    name, device = lstm_backend
    ours, theirs = _modules(device, seed=5, input_size=37, hidden=45, bidirectional=True)
    inputs = _inputs(theirs, "batched", True, device, steps=5, batch=13)
    _check_against_torch(ours, theirs, "batched", inputs)
    _check_inference_against_torch(ours, theirs, inputs)


def test_full_size_on_a_compiled_backend(lstm_backend):
    """The benchmark's CPU size (hidden 256, batch 32, T 128), a bidirectional layer with a projection off and
    on, where the interpreter is not in the way (native on CPU, every backend on a GPU)."""
    name, device = lstm_backend
    if device == "cpu" and name != "native":
        pytest.skip(f"full size runs on compiled kernels only; {name} on CPU is covered by the small cases")
    for proj in (0, 64):
        ours, theirs = _modules(device, input_size=128, hidden=256, bidirectional=True,
                                proj_size=proj)
        inputs = _inputs(theirs, "batched", True, device, steps=128, batch=32)
        _check_against_torch(ours, theirs, "batched", inputs)
        _check_inference_against_torch(ours, theirs, inputs)
    assert backends.last_used()["lstm"] == name


@pytest.mark.parametrize("used", ["output", "h_n", "c_n"])
def test_gradients_through_one_output(lstm_backend, used):
    """A loss on one of (output, h_n, c_n) only: the op's backward gets None for the others (autograd does not
    fill zeros for them) and must give torch's gradients."""
    name, device = lstm_backend
    ours, theirs = _modules(device, bidirectional=True)
    x, h0, c0 = _inputs(theirs, "batched", True, device)
    grads = []
    for module, dtype in ((ours, torch.float32), (theirs, torch.float32), (copy.deepcopy(theirs).double(),
                                                                           torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, h0, c0)]
        out, (h_n, c_n) = module(leaves[0], tuple(leaves[1:]))
        chosen = {"output": out, "h_n": h_n, "c_n": c_n}[used]
        grads.append(list(torch.autograd.grad((chosen * chosen).sum(), leaves + list(module.parameters()))))
    compare_with_oracle(_names(ours, True)[3:], *grads)


def _gradient_penalty_grads(module, kind, inputs):
    """gradient_penalty_grads through the module (inputs: x, h0, c0), with respect to them and its parameters."""
    def layer(x, h0, c0):
        if kind == "packed":
            x = pack_padded_sequence(x, torch.tensor(LENGTHS), batch_first=module.batch_first, enforce_sorted=False)
        out, (h_n, c_n) = module(x, (h0, c0))
        return (out.data if kind == "packed" else out), h_n, c_n
    return gradient_penalty_grads(layer, inputs, module.parameters())


@pytest.mark.parametrize("config,kind", [(dict(), "batched"),
                                         (dict(num_layers=2, bidirectional=True, proj_size=4), "packed")])
def test_double_backward_against_torch(lstm_backend, config, kind):
    """Gradients of gradients through the layer (every backend's first backward under create_graph) against
    torch's LSTM, with torch's LSTM in float64 as the oracle."""
    name, device = lstm_backend
    ours, theirs = _modules(device, **config)
    inputs = _inputs(theirs, kind, True, device)
    with fastenc.backend(name):
        got = _gradient_penalty_grads(ours, kind, inputs)
    want = _gradient_penalty_grads(theirs, kind, inputs)
    exact = _gradient_penalty_grads(copy.deepcopy(theirs).double(), kind, [t.double() for t in inputs])
    compare_with_oracle(_names(ours, True)[3:], got, want, exact)
    assert backends.last_used()["lstm"] == name


PACKED_LENGTHS = {  # batch sizes 1, 4 and 33 of random lengths; and 12 rows whose shares on 2 or 3 threads start
    # past the last step's one row (a share with no rows in a step next to one with some)
    f"random-{batch}": torch.randint(1, 13, (batch,), generator=torch.Generator().manual_seed(5)).tolist()
    for batch in (1, 4, 33)
} | {"12-one-long": [6] + [5] * 11}


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("lengths", PACKED_LENGTHS.values(), ids=PACKED_LENGTHS.keys())
def test_packed_batch_on_a_compiled_backend(lstm_backend, lengths, threads):
    """Packed batches of unsorted lengths, bidirectional, projection off and on, training and inference, at hidden
    20: on the native CPU backend's fused step a whole 16-unit panel and a partial one, row tiles (6 rows) that
    end short at every one of these batch sizes, and a reverse direction that takes h0 for rows that start late.
    With 2 or 3 threads its fused steps give each thread a share of the batch (shares of unequal lengths)."""
    name, device = lstm_backend
    if device == "cpu" and name != "native":
        pytest.skip(f"runs on compiled kernels only; {name} on CPU is covered by the small cases")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_packed_batch(device, lengths)
    finally:
        torch.set_num_threads(before)
    assert backends.last_used()["lstm"] == name


def _check_packed_batch(device, lengths):
    batch = len(lengths)
    for proj in (0, 5):
        ours, theirs = _modules(device, input_size=7, hidden=20, bidirectional=True, proj_size=proj)
        inputs = _inputs(theirs, "packed", True, device, steps=max(lengths), batch=batch)
        _check_against_torch(ours, theirs, "packed", inputs, lengths)

        def infer(module, dtype):
            x, *hx = (t.to(dtype) for t in inputs)
            with torch.no_grad():
                out, (h_n, c_n) = module(pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False),
                                         tuple(hx))
            return [out.data, h_n, c_n]

        compare_with_oracle(["output", "h_n", "c_n"], infer(ours, torch.float32), infer(theirs, torch.float32),
                            infer(copy.deepcopy(theirs).double(), torch.float64))


@pytest.mark.parametrize("proj,packed,reverse", [(0, False, False), (0, True, True), (3, True, False)])
def test_gradcheck(lstm_backend, proj, packed, reverse):
    """The op's backward (each backend's own) is the derivative of its forward, in float64."""
    name, device = lstm_backend
    if name == "triton":
        pytest.skip("the triton lstm has no float64 (test_against_torch checks its backward in float32)")
    g = torch.Generator().manual_seed(8)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    p = proj or HIDDEN
    batch_sizes = torch.tensor([3, 2, 2]) if packed else None
    x = rnd(7, INPUT) if packed else rnd(3, BATCH, INPUT)
    leaves = [x, rnd(BATCH, p), rnd(BATCH, HIDDEN), rnd(4 * HIDDEN, INPUT) * 0.5, rnd(4 * HIDDEN, p) * 0.5,
              rnd(4 * HIDDEN), rnd(4 * HIDDEN), rnd(p, HIDDEN) * 0.5 if proj else None]
    leaves = [t if t is None else t.requires_grad_() for t in leaves]
    with fastenc.backend(name):
        assert torch.autograd.gradcheck(
            lambda *a: F.lstm_layer(*a, batch_sizes=batch_sizes, reverse=reverse), leaves, eps=1e-6, atol=1e-7)
    assert backends.last_used()["lstm"] == name


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("proj", [0, 3])
@pytest.mark.parametrize("packed", [False, True])
def test_reference_backward_is_autograds(reverse, proj, packed):
    g = torch.Generator().manual_seed(6)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    p = proj or HIDDEN
    batch_sizes = torch.tensor([3, 3, 2, 1]) if packed else None
    x = rnd(9, INPUT) if packed else rnd(STEPS, BATCH, INPUT)
    inputs = [x, rnd(BATCH, p), rnd(BATCH, HIDDEN), rnd(4 * HIDDEN, INPUT) * 0.5, rnd(4 * HIDDEN, p) * 0.5,
              rnd(4 * HIDDEN), rnd(p, HIDDEN) if proj else None]
    leaves = [t if t is None else t.requires_grad_() for t in inputs]
    outs = reference.lstm_layer_forward(lstm_op.LstmArgs(*leaves, batch_sizes, reverse, True))
    grads_out = [rnd(*t.shape) for t in outs[:3]]
    wanted = [t for t in leaves if t is not None]
    expected = torch.autograd.grad(outs[:3], wanted, grads_out)
    detached = [t if t is None else t.detach() for t in leaves]
    saved = [t.detach() for t in outs]
    got = reference.lstm_layer_backward(lstm_op.LstmBackwardArgs(*grads_out, saved[0], *saved[3:], [True] * 7),
                                        lstm_op.LstmArgs(*detached, batch_sizes, reverse, True))
    for name, a, e in zip(["dx", "dh0", "dc0", "dw_ih", "dw_hh", "d_bias", "dw_hr"], got, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_on_a_cpu_runs_the_faster_lstm(dtype):
    """"auto" on a CPU runs the native float32 LSTM only where its fused step runs (x86 with AVX-512), torch's LSTM
    elsewhere (faster than the native per-step path there); other dtypes stay native. Either gives torch's numbers."""
    ours, theirs = _modules("cpu", bidirectional=True)
    inputs = _inputs(theirs, "packed", True, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        got = _run(ours, "packed", inputs)
    native = backends.unavailable_reason("native") is None
    expected = "native" if native and (lstm_op._FUSED_CPU_STEP or dtype != torch.float32) else "torch"
    assert backends.last_used()["lstm"] == expected
    if dtype == torch.float32:  # (the bf16 numbers are test_autocast_runs_in_the_autocast_dtype's)
        compare_with_oracle(_names(ours, True), got, _run(theirs, "packed", inputs),
                            _run(copy.deepcopy(theirs).double(), "packed", [t.double() for t in inputs]))


def test_native_finds_onednns_matmul():
    """The native backward's CPU weight-gradient GEMMs look oneDNN's matmul up in libtorch by its symbol at run
    time: a torch that renamed it would lose that fast path without a word, so this test says so."""
    reason = backends.unavailable_reason("native")
    if reason:
        pytest.skip(reason)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch is built without oneDNN")
    from fastenc import _C

    assert _C.lstm_onednn_gemm_found()


FORMS = [  # (batch, hidden, proj, packed, reverse): one or two programs / batch tiles, one or two hidden tiles
    (3, 6, 0, False, False), (3, 6, 4, True, True), (70, 20, 0, True, True), (70, 20, 5, True, False),
    (5, 40, 0, False, True),
]


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "per-step"])
@pytest.mark.parametrize("batch,hidden,proj,packed,reverse", FORMS)
def test_triton_forms(lstm_backend, persistent, batch, hidden, proj, packed, reverse):
    """Both forms of the Triton LSTM (the time loop in one launch; a launch per step), whichever the shape would
    get by default: forward and backward against the reference in float32 and float64."""
    name, device = lstm_backend
    if name != "triton":
        pytest.skip("the persistent and per-step forms are the triton backend's")
    from fastenc.kernels import lstm as kernels

    g = torch.Generator().manual_seed(9)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    steps, p = 3, proj or hidden
    batch_sizes = torch.tensor([batch, batch - 1, 2]) if packed else None
    x = rnd(int(batch_sizes.sum()), INPUT) if packed else rnd(steps, batch, INPUT)
    inputs = [x, rnd(batch, p), rnd(batch, hidden), rnd(4 * hidden, INPUT) * 0.4, rnd(4 * hidden, p) * 0.4,
              rnd(4 * hidden), rnd(p, hidden) * 0.4 if proj else None]

    def run(impl, dtype, **form):
        args = [t if t is None else t.to(device, dtype) for t in inputs]
        a = lstm_op.LstmArgs(*args, batch_sizes, reverse, True)
        outs = impl.lstm_layer_forward(a, **form)
        grads_out = [torch.randn(t.shape, generator=torch.Generator().manual_seed(10)).to(t) for t in outs[:3]]
        grads = impl.lstm_layer_backward(lstm_op.LstmBackwardArgs(*grads_out, outs[0], *outs[3:], [True] * 7), a,
                                         **form)
        return [t for t in (*outs[:3], *grads) if t.numel()]

    names = ["out", "h_n", "c_n", "dx", "dh0", "dc0", "dw_ih", "dw_hh", "d_bias"] + (["dw_hr"] if proj else [])
    compare_with_oracle(names, run(kernels, torch.float32, persistent=persistent), run(reference, torch.float32),
                        run(reference, torch.float64))


def _op_args(device, proj, packed, reverse, save, backend, seed=7):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    p = proj or HIDDEN
    batch_sizes = torch.tensor([3, 2, 2]) if packed else None
    x = rnd(7, INPUT) if packed else rnd(3, BATCH, INPUT)
    return (x, rnd(BATCH, p), rnd(BATCH, HIDDEN), rnd(4 * HIDDEN, INPUT), rnd(4 * HIDDEN, p), rnd(4 * HIDDEN),
            rnd(p, HIDDEN) if proj else None, batch_sizes, reverse, save, backend)


@pytest.mark.parametrize("proj,packed,reverse,save", [(0, False, False, True), (3, True, True, True),
                                                      (3, True, False, False)])
def test_opcheck(lstm_op_backend, proj, packed, reverse, save):
    name, device = lstm_op_backend
    torch.library.opcheck(torch.ops.fastenc.lstm_layer.default, _op_args(device, proj, packed, reverse, save, name))


@pytest.mark.parametrize("proj,packed,reverse", [(0, False, False), (3, True, False), (0, True, True)])
def test_inference_saves_nothing_and_computes_the_same(lstm_op_backend, proj, packed, reverse):
    """save=False (what functional passes when no gradient is wanted) returns the same outputs, bit for bit, and
    no saved tensors; in a packed batch each row's c_n still comes from its own last step."""
    name, device = lstm_op_backend
    training = torch.ops.fastenc.lstm_layer(*_op_args(device, proj, packed, reverse, True, name))
    inference = torch.ops.fastenc.lstm_layer(*_op_args(device, proj, packed, reverse, False, name))
    for what, a, b in zip(("out", "h_n", "c_n"), training, inference):
        assert torch.equal(a, b), what
    assert all(t.numel() == 0 for t in inference[3:])


GRADIENT_NAMES = ["dx", "dh0", "dc0", "dw_ih", "dw_hh", "d_bias", "dw_hr"]


@pytest.mark.parametrize("proj,packed,reverse", [(0, False, False), (3, True, True)])
def test_backward_computes_only_the_gradients_asked_for(lstm_op_backend, proj, packed, reverse):
    """output_mask: a gradient asked for is the one the full backward gives; one not asked for comes back empty."""
    name, device = lstm_op_backend
    args = _op_args(device, proj, packed, reverse, True, name)
    out, h_n, c_n, *saved = torch.ops.fastenc.lstm_layer(*args)
    g = torch.Generator().manual_seed(11)
    grads_out = [torch.randn(t.shape, generator=g).to(t) for t in (out, h_n, c_n)]
    full = torch.ops.fastenc.lstm_layer_backward(*grads_out, out, *saved, [True] * 7, *args)
    for mask in ([False, True, True, False, True, False, True], [True, False, False, True, False, True, False]):
        part = torch.ops.fastenc.lstm_layer_backward(*grads_out, out, *saved, mask, *args)
        for grad_name, got, expected, wanted in zip(GRADIENT_NAMES, part, full, mask):
            if wanted:
                torch.testing.assert_close(got, expected, msg=lambda m: f"{grad_name} under {mask}: {m}")
            else:
                assert got.shape == (0,), f"{grad_name} was not asked for, yet has shape {tuple(got.shape)}"


# The masks each layer's backward gets (backward order: layer 1, then layer 0; none where nothing needs one).
FROZEN_CASES = {
    ("weight_ih_l1", "weight_hh_l1"): [[False, False, False, True, True, False, False]],
    ("weight_ih_l0", "bias_hh_l0"): [[True, False, False, False, False, False, False],
                                     [False, False, False, True, False, True, False]],
}


@pytest.mark.parametrize("trained,masks", FROZEN_CASES.items(), ids=["trained-over-frozen", "frozen-over-trained"])
def test_frozen_weights_and_an_input_without_gradient(lstm_op_backend, monkeypatch, trained, masks):
    """The fine-tuning cases: a frozen layer under a trained one, or over it, and an input that needs no gradient.
    Each layer's backward is asked for what autograd needs and no more, and those gradients are torch's."""
    _, device = lstm_op_backend
    ours, theirs = _modules(device, num_layers=2)
    exact = copy.deepcopy(theirs).double()
    for module in (ours, theirs, exact):
        for param_name, p in module.named_parameters():
            p.requires_grad_(param_name in trained)
    x = _inputs(ours, "batched", False, device)[0]
    asked = []
    backward_op = lstm_op.lstm_layer_backward
    monkeypatch.setattr(lstm_op, "lstm_layer_backward",
                        lambda *args: asked.append(list(backward_op.unflatten(args)[0].output_mask))
                        or backward_op(*args))

    def outputs_and_grads(module, x):
        out, (h_n, c_n) = module(x)
        g = torch.Generator().manual_seed(4)
        grads_out = [torch.randn(t.shape, generator=g).to(t) for t in (out, h_n, c_n)]
        leaves = [p for p in module.parameters() if p.requires_grad]
        return [out.detach(), *torch.autograd.grad((out, h_n, c_n), leaves, grads_out)]

    got = outputs_and_grads(ours, x)
    assert asked == masks
    compare_with_oracle(["out", *trained], got, outputs_and_grads(theirs, x), outputs_and_grads(exact, x.double()))


def test_swap_classes_keeps_the_state():
    from fastenc.nn._swap import swap_classes

    model = torch.nn.Sequential(torch.nn.LSTM(INPUT, HIDDEN, num_layers=2))
    x = torch.randn(STEPS, BATCH, INPUT)
    want = model(x)[0]
    swap_classes(model)
    assert type(model[0]) is fastenc.nn.LSTM
    model[0].flatten_parameters()
    with fastenc.backend("reference"):
        torch.testing.assert_close(model(x)[0], want)


def _bad_calls():
    x = torch.randn(STEPS, BATCH, INPUT)
    h, c = torch.zeros(1, BATCH, HIDDEN), torch.zeros(1, BATCH, HIDDEN)
    packed = pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False)
    return [
        ("input_size", (torch.randn(STEPS, BATCH, INPUT + 1),), RuntimeError, "input.size\\(-1\\) must be equal"),
        ("h0 shape", (x, (torch.zeros(1, BATCH + 1, HIDDEN), c)), RuntimeError, "Expected hidden\\[0\\] size"),
        ("c0 shape", (x, (h, torch.zeros(2, BATCH, HIDDEN))), RuntimeError, "Expected hidden\\[1\\] size"),
        ("dtype", (x.double(),), ValueError, "input dtype \\(torch.float64\\) does not match weight dtype"),
        ("4-D input", (x[None],), ValueError, "Expected input to be 2D or 3D"),
        ("unbatched hx", (x[:, 0], (h, c)), RuntimeError, "For unbatched 2-D input, hx and cx should also be 2-D"),
        ("batched hx", (x, (h[0], c[0])), RuntimeError, "For batched 3-D input, hx and cx should also be 3-D"),
        # With a PackedSequence torch fails deeper down ("mat1 and mat2 shapes cannot be multiplied", an index out of
        # bounds); fastenc checks it as torch checks a padded input, with the same messages.
        ("packed input_size", (pack_padded_sequence(torch.randn(STEPS, BATCH, 2), torch.tensor(LENGTHS),
                                                    enforce_sorted=False),), RuntimeError, "input.size\\(-1\\)"),
        ("packed hx batch", (packed, (torch.zeros(1, 2, HIDDEN), c)), RuntimeError, "Expected hidden\\[0\\] size"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_errors_like_torch(case):
    label, args, error, match = case
    ours, theirs = _modules("cpu")
    with pytest.raises(error if not label.startswith("packed") else RuntimeError,
                       match=match if not label.startswith("packed") else None):
        theirs(*args)
    with pytest.raises(error, match=match):
        ours(*args)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(weight_hh=torch.randn(24, 5)), ValueError, "weight_hh must have shape \\(24, 6\\)"),
        (dict(h0=torch.randn(2, 6)), ValueError, "h0 must have shape \\(3, 6\\)"),
        (dict(c0=torch.randn(3, 6, dtype=torch.float64)), TypeError, "c0 has dtype torch.float64"),
        (dict(bias_ih=torch.randn(23)), ValueError, "bias_ih must have shape"),
        (dict(weight_ih=torch.randn(22, 5)), ValueError, "weight_ih must be a \\(4 \\* hidden_size"),
        (dict(batch_sizes=torch.tensor([1, 3])), ValueError, "input must be \\(N, input_size\\)"),
    ],
)
def test_functional_bad_input_names_the_argument(change, error, match):
    args = dict(input=torch.randn(STEPS, BATCH, INPUT), h0=None, c0=None, weight_ih=torch.randn(24, INPUT),
                weight_hh=torch.randn(24, HIDDEN), bias_ih=torch.randn(24))
    args.update(change)
    with pytest.raises(error, match=match):
        F.lstm_layer(**args)


@pytest.mark.parametrize("batch_sizes,match", [
    (torch.tensor([1, 3]), "non-increasing"),
    (torch.tensor([3, 2]), "sum to 5 but input has 4 rows"),
    (torch.tensor([3, 1], dtype=torch.int32), "1-D int64"),
])
def test_functional_bad_batch_sizes(batch_sizes, match):
    with pytest.raises(ValueError, match=match):
        F.lstm_layer(torch.randn(4, INPUT), None, None, torch.randn(24, INPUT), torch.randn(24, HIDDEN),
                     batch_sizes=batch_sizes)


# On a machine without a GPU, the Triton kernels run bf16 through the interpreter (with tests/triton_bf16.py's
# patch, as a GPU computes it) against torch's CPU LSTM under CPU autocast, which has no float16 LSTM.
AUTOCAST_CASES = [pytest.param("cuda", torch.float16, marks=pytest.mark.gpu),
                  pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu), ("cpu", torch.bfloat16)]


@pytest.mark.parametrize("device,dtype", AUTOCAST_CASES, ids=str)
@pytest.mark.parametrize("config,kind", [(dict(num_layers=2, bidirectional=True), "packed"),
                                         (dict(proj_size=32, batch_first=True), "batched")])
def test_triton_autocast(device, dtype, config, kind):
    """Under autocast fastenc's Triton LSTM runs in the autocast dtype, as torch's (cuDNN) does; both against the
    float64 oracle, with a length where error growth shows."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("a CUDA case")
    if device == "cpu" and (torch.cuda.is_available() or not backends.INTERPRETER):
        pytest.skip("Triton runs CPU tensors only through its interpreter, on a machine without a GPU")
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(INPUT, 64, **config).to(device)
    ours = fastenc.nn.LSTM(INPUT, 64, **config).to(device)
    ours.load_state_dict(theirs.state_dict())
    inputs = _inputs(theirs, kind, True, device, steps=max(LENGTHS))
    with fastenc.backend("triton"), torch.autocast(device, dtype=dtype):
        got = _run(ours, kind, inputs)
        want = _run(theirs, kind, inputs)
    assert got[0].dtype == dtype and (device == "cpu" or want[0].dtype == dtype)
    exact = _run(copy.deepcopy(theirs).double(), kind, [t.double() for t in inputs])
    # Gradients of float32 leaves come back in float32 from both; outputs in the autocast dtype. (Under CPU autocast
    # torch's LSTM returns c_n, and for packed input everything, in float32; fastenc's runs in the autocast dtype as
    # on CUDA: torch's results are compared in fastenc's dtypes.)
    want = [w.to(g.dtype) for w, g in zip(want, got)] if device == "cpu" else want
    compare_with_oracle(_names(ours, True), got, want, exact)


def test_autocast_runs_in_the_autocast_dtype():
    ours, theirs = _modules("cpu", bidirectional=True)
    x = _inputs(theirs, "batched", False, "cpu")[0]
    with torch.autocast("cpu", dtype=torch.bfloat16), fastenc.backend("reference"):
        out, (h_n, c_n) = ours(x)
    assert out.dtype == h_n.dtype == c_n.dtype == torch.bfloat16
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, (h_want, _) = theirs(x)
        assert want.dtype == h_want.dtype == torch.bfloat16
    except RuntimeError as e:  # torch's oneDNN LSTM has no bf16 kernel for CPUs without AVX-512 (BF16)
        assert "primitive descriptor" in str(e), e
        want = theirs(x)[0]  # then torch in float32, within the same bf16-sized tolerance
    torch.testing.assert_close(out.float(), want.float(), atol=3e-2, rtol=3e-2)

