"""fastenc.nn.TransformerEncoder with the rest of PyTorch: DistributedDataParallel, activation checkpointing,
autocast, and saving / copying a whole encoder (the single layer's round trips are in test_transformer.py; a fully
padded sequence is tested there too).

`python -m tests.test_encoder_ecosystem OUT` under torchrun is the DDP test's worker.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

import fastenc
from fastenc.ops.attention import AttentionArgs
from tests.conftest import ATOL_FLOOR, skip_unless_takes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, NHEAD, FF, LAYERS = 16, 4, 32, 2


def _encoder(dropout: float = 0.0, device="cpu", seed: int = 0, d: int = D, ff: int = FF, activation="relu"):
    """A batch-first fastenc encoder with a final norm and distinct random weights in every layer (torch's
    constructor copies one layer, so its layers start equal), the same for the same seed."""
    torch.manual_seed(seed)
    layer = fastenc.nn.TransformerEncoderLayer(d, NHEAD, ff, dropout, activation, batch_first=True, device=device)
    encoder = fastenc.nn.TransformerEncoder(layer, LAYERS, norm=torch.nn.LayerNorm(d, device=device),
                                            enable_nested_tensor=False)
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0, 0.3)
    return encoder


def _batch(lengths, seq_len: int, device="cpu", d: int = D, generator=None):
    """Random (N, S, d) input and its key padding mask (True = pad) for sequences of `lengths`."""
    x = torch.randn(len(lengths), seq_len, d, generator=generator).to(device)
    padding = torch.arange(seq_len)[None, :] >= torch.tensor(lengths)[:, None]
    return x, padding.to(device)


# ------------------------------------------------------------------------------------- DistributedDataParallel

DDP_LENGTHS = (7, 3, 5, 1)  # the global batch; with 2 processes rank 0 takes the first two, rank 1 the last two
DDP_STEPS, DDP_LR = 3, 2.0


def _train(model: torch.nn.Module, rows: slice) -> None:
    """DDP_STEPS of SGD on rows of fresh global batches, the loss a mean over every element of those rows."""
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=DDP_LR)
    for _ in range(DDP_STEPS):
        x, padding = _batch(DDP_LENGTHS, max(DDP_LENGTHS), generator=generator)
        target = torch.randn(x.shape, generator=generator)
        optimizer.zero_grad()
        out = model(x[rows], src_key_padding_mask=padding[rows])
        (out - target[rows]).square().mean().backward()
        optimizer.step()


def _ddp_worker(out_path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, half = dist.get_rank(), len(DDP_LENGTHS) // dist.get_world_size()
    model = torch.nn.parallel.DistributedDataParallel(_encoder())
    _train(model, slice(rank * half, (rank + 1) * half))
    if rank == 0:
        torch.save(model.module.state_dict(), out_path)
    # Both ranks tear down together: a rank leaving while the other still holds the gloo connection aborted in
    # about 1 of 10 runs ("terminate called without an active exception" at exit, in gloo's teardown).
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_matches_single_process(tmp_path):
    """torchrun, 2 processes, gloo, dropout 0, padded batches (the packed path). Each rank's loss is the mean over
    its half of the global batch and DDP averages the two gradients, which is exactly the gradient of the global
    mean, so the parameters equal a single process's on the whole batch up to float32 summation order (each
    gradient is summed in halves, then all-reduced): a few ulps per step, hence rtol 1e-5 / atol 1e-6, while a
    rank training on the wrong rows, or gradients summed instead of averaged, moves them by ~1e-3."""
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "tests.test_encoder_ecosystem", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    single = _encoder()
    initial = copy.deepcopy(single.state_dict())
    _train(single, slice(None))
    trained = torch.load(out)
    assert list(trained) == list(initial)
    for name, p in single.state_dict().items():
        if name.endswith("weight"):
            assert (p - initial[name]).abs().max() > 100 * 1e-6, f"{name} did not train"
        torch.testing.assert_close(trained[name], p, rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------- activation checkpointing

@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_activation_checkpointing_gives_the_same_outputs_and_gradients(backend_device, padded):
    """torch's apply_activation_checkpointing wraps each layer, which then runs as
    torch.utils.checkpoint.checkpoint(layer, ..., use_reentrant=False) inside the encoder's forward (on the packed
    tokens, for a padded batch) and again in the backward. torch restores the random state before recomputing, so
    the dropout masks (torch's and the fused kernels', all seeded from torch's generator) are the forward's, and
    outputs and gradients equal the plain encoder's. Dropout is on: without it nothing random has to be
    reproduced, and the rest of the check is the same."""
    name, device = backend_device
    probe = torch.empty(1, 1, 1, 16, device=device)
    skip_unless_takes("attention", name,
                      AttentionArgs(probe, probe, probe, None, None, None, None, 1, 1, False, 1.0, 0.25, None))
    plain = _encoder(0.25, device).train()
    wrapped = copy.deepcopy(plain)
    apply_activation_checkpointing(wrapped, check_fn=lambda m: isinstance(m, fastenc.nn.TransformerEncoderLayer))
    calls = []
    for module in wrapped.modules():
        if isinstance(module, fastenc.nn.TransformerEncoderLayer):
            module.register_forward_pre_hook(lambda *_: calls.append(1))
    x, padding = _batch((6, 2, 4), 6, device)
    padding = padding if padded else None
    dy = torch.randn_like(x)

    def run(encoder):
        torch.manual_seed(2)
        h = x.clone().requires_grad_()
        out = encoder(h, src_key_padding_mask=padding)
        return [out, *torch.autograd.grad(out, [h, *encoder.parameters()], dy)]

    expected = run(plain)
    got = run(wrapped)
    assert len(calls) == 2 * LAYERS  # each layer ran in the forward and again in the backward
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------------- autocast

def _rms(t: torch.Tensor) -> float:
    return t.double().square().mean().sqrt().item()


def _check_autocast(device: str, dtype: torch.dtype, padded: bool) -> None:
    """fastenc's encoder and torch's, with the same weights, under autocast; the output and every gradient are
    measured against the float64 oracle (no autocast), as in conftest.assert_close_to_oracle, but by their RMS
    error over the tensor, within 3× torch's (+ conftest's floor). The two runs round at different points
    (fastenc adds linear1's bias in float32 in its fused epilogue, torch in a low-precision GEMM; the attention
    kernels sum in their own orders), so their errors are two samples of one size rather than one bounding the
    other: over seeds fastenc's RMS error is torch's ×1 in the median, up to ×2.4 for single small tensors, and a
    tensor's max error is decided by one element. A fault (a wrong mask, a lost bias or scale) is off by the size
    of the values. GELU, not ReLU, whose kink turns a rounding difference at 0 into slopes of 0 and 1: a
    difference of values, not of rounding, in everything upstream."""
    ours = _encoder(device=device, d=64, ff=128, activation="gelu")
    layer = torch.nn.TransformerEncoderLayer(64, NHEAD, 128, 0.0, "gelu", batch_first=True, device=device)
    theirs = torch.nn.TransformerEncoder(layer, LAYERS, norm=torch.nn.LayerNorm(64, device=device),
                                         enable_nested_tensor=False)
    theirs.load_state_dict(ours.state_dict())
    oracle = copy.deepcopy(theirs).double()
    x, padding = _batch((16, 7, 12), 16, device, d=64)
    padding = padding if padded else None
    valid = 1.0 if padding is None else (~padding)[..., None]  # torch's outputs at padded positions are arbitrary
    dy = torch.randn_like(x) * valid

    def run(module, h, autocast=True):
        h = h.clone().requires_grad_()
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            out = module(h, src_key_padding_mask=padding)
        return [out * valid, *torch.autograd.grad(out, [h, *module.parameters()], dy.to(h.dtype))]

    names = ["out", "dx", *(f"d{name}" for name, _ in ours.named_parameters())]
    for name, a, t, o in zip(names, run(ours, x), run(theirs, x), run(oracle, x.double(), autocast=False)):
        assert a.dtype == t.dtype, f"{name}: dtype {a.dtype} != torch's {t.dtype}"
        err, torch_err = _rms(a - o), _rms(t - o)
        bound = 3 * torch_err + ATOL_FLOOR[a.dtype] * max(1.0, o.abs().max().item())
        assert err <= bound, f"{name}: RMS error {err:.3g} exceeds {bound:.3g} (torch's is {torch_err:.3g})"


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_cpu_bf16_autocast_matches_torch(backend_device, padded):
    name, device = backend_device
    if device != "cpu":
        pytest.skip("the CUDA autocast test is test_cuda_autocast_matches_torch")
    probe = torch.empty(1, 1, 1, 16, dtype=torch.bfloat16)
    skip_unless_takes("attention", name,
                      AttentionArgs(probe, probe, probe, None, None, None, None, 1, 1, False, 1.0, 0.0, None))
    _check_autocast("cpu", torch.bfloat16, padded)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_cuda_autocast_matches_torch(dtype, padded):
    with fastenc.backend("triton"):
        _check_autocast("cuda", dtype, padded)


# ------------------------------------------------------------------------------------------ saving and copying

def test_encoder_state_dict_file_round_trip_copy_and_pickle(tmp_path):
    encoder = _encoder().eval()
    x, padding = _batch((5, 2, 4), 5)
    valid = (~padding)[..., None]
    expected = encoder(x, src_key_padding_mask=padding)
    torch.save(encoder.state_dict(), tmp_path / "encoder.pt")
    state = torch.load(tmp_path / "encoder.pt", weights_only=True)
    fresh = _encoder(seed=1).eval()
    assert not torch.equal(fresh(x, src_key_padding_mask=padding), expected)
    fresh.load_state_dict(state)
    for clone in (fresh, copy.deepcopy(encoder), pickle.loads(pickle.dumps(encoder))):
        assert type(clone) is fastenc.nn.TransformerEncoder and type(clone.norm) is fastenc.nn.LayerNorm
        assert all(type(m) is fastenc.nn.TransformerEncoderLayer for m in clone.layers)
        assert all(type(m.self_attn) is fastenc.nn.MultiheadAttention for m in clone.layers)
        torch.testing.assert_close(clone(x, src_key_padding_mask=padding), expected)
    layer = torch.nn.TransformerEncoderLayer(D, NHEAD, FF, batch_first=True)
    theirs = torch.nn.TransformerEncoder(layer, LAYERS, norm=torch.nn.LayerNorm(D), enable_nested_tensor=False)
    theirs.load_state_dict(state)
    torch.testing.assert_close(theirs.eval()(x, src_key_padding_mask=padding) * valid, expected * valid)
    # A copy is independent of its original.
    clone = copy.deepcopy(encoder)
    with torch.no_grad():
        clone.layers[0].linear1.weight.add_(1.0)
    torch.testing.assert_close(encoder(x, src_key_padding_mask=padding), expected)


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
