"""fastenc.convert on every Hugging Face encoder family: tiny random configs from transformers itself (no download),
each converted model against the same model on HF's eager attention, in float32 and (the oracle) float64, forward
and every parameter's gradient, with padding in the batch."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch

import fastenc
import fastenc.nn.transformer
from fastenc import backends
from tests.conftest import assert_close_to_oracle

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (pip install .[hf])")

_BERT_LIKE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=100,
                  max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_TOKEN_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# model_type -> config arguments. ModernBERT's local layers see 2 tokens each side (local_attention 4), so the
# 11-token batch below crosses its sliding window; EuroBERT has 2 key / value heads for 4 query heads.
FAMILIES = {
    "bert": _BERT_LIKE,
    "roberta": dict(_BERT_LIKE, pad_token_id=1),
    "xlm-roberta": dict(_BERT_LIKE, pad_token_id=1),
    "camembert": dict(_BERT_LIKE, pad_token_id=1),
    "electra": dict(_BERT_LIKE, embedding_size=16),
    "albert": dict(_BERT_LIKE, embedding_size=16),
    "distilbert": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=48, vocab_size=100, max_position_embeddings=64,
                       dropout=0.0, attention_dropout=0.0),
    "modernbert": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                       vocab_size=100, max_position_embeddings=64, local_attention=4, global_attn_every_n_layers=2,
                       cls_token_id=1, sep_token_id=2, **_TOKEN_IDS),
    "gte": _BERT_LIKE,
    "nomic_bert": _BERT_LIKE,
    "eurobert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=48, vocab_size=100, max_position_embeddings=64, mask_token_id=3,
                     **_TOKEN_IDS),
    "mpnet": _BERT_LIKE,  # its own attention code, with a learned relative position bias per head
}
# Families whose blocks are BERT's own code (or DistilBERT's), so the residual + LayerNorm and bias + activation
# fusions apply.
BERT_BLOCKS = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet", "distilbert"}
# EuroBERT normalizes with RMSNorm, which fastenc does not replace.
RMS_NORM = {"eurobert"}
# Families whose attention is code fastenc does not reach: converted around it, with a warning.
OWN_ATTENTION = {"deberta-v2": _BERT_LIKE}


def _model(family: str, kwargs: dict) -> torch.nn.Module:
    if family not in transformers.models.auto.configuration_auto.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {family} models")
    config = transformers.AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config, attn_implementation="eager").train()


def _batch(padding_side="right"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 100, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    if padding_side == "left":
        mask = mask.flip(1)
    return ids, mask


def _outputs_and_grads(model, ids, mask, one_by_one=False):
    """The last hidden states at real tokens (0 at padding) and every parameter's gradient of a random projection
    of them. one_by_one: each sequence alone, without its padding."""
    weight = torch.randn(ids.shape + (model.config.hidden_size,), generator=torch.Generator().manual_seed(2),
                         dtype=torch.float64).to(model.dtype).to(ids.device) * mask[..., None]
    if one_by_one:
        out = torch.zeros(weight.shape, dtype=model.dtype, device=ids.device)
        for i, real in enumerate(mask.bool()):
            out[i, real] = model(input_ids=ids[i:i + 1, real]).last_hidden_state[0]
    else:
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad((out * weight).sum(), params, allow_unused=True)
    kept = [(n, g) for n, g in zip(names, grads) if g is not None]
    return ["last_hidden_state"] + [n for n, _ in kept], [out.detach()] + [g for _, g in kept]


def _oracle(model, ids, mask):
    """The float64 model's outputs and gradients. HF's eager attention gives NaN to a padded query that sees no
    key (ModernBERT's local layers) when the float64 mask's minimum overflows its float32 softmax, and the NaN
    spreads; then each sequence runs alone (right for the families whose positions do not move with left padding:
    ModernBERT's rotary embeddings are relative)."""
    names, exact = _outputs_and_grads(model, ids, mask)
    if exact[0].isnan().any():
        names, exact = _outputs_and_grads(model, ids, mask, one_by_one=True)
    return names, exact


# float16 on the triton backend only (the CPU backends compute it by conversion); the interpreter is slow, so
# triton runs one padding side per dtype.
CASES = {"right-float32": ("right", torch.float32), "left-float32": ("left", torch.float32),
         "left-float16": ("left", torch.float16)}
TRITON_CASES = {"right-float32", "left-float16"}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_converted_family_matches_eager(backend_device, family, case):
    name, device = backend_device
    padding_side, dtype = CASES[case]
    runs_here = case in TRITON_CASES if name == "triton" else dtype != torch.float16
    if not runs_here:
        pytest.skip(f"{case} runs on {'the other backends' if name == 'triton' else 'the triton backend'}")
    converted, (ids, mask) = _converted_matches_eager(family, device, dtype, padding_side)
    # Inference runs every op on fastenc.
    backends._last_used.clear()
    with torch.no_grad():
        converted.eval()(input_ids=ids, attention_mask=mask)
    used = backends.last_used()
    ops = ["attention"] + (["layer_norm"] if family not in RMS_NORM else [])
    ops += ["bias_activation"] if family in BERT_BLOCKS else []
    for op in ops:
        expected_backend = name if name in backends.implemented(op) else "reference"
        assert used.get(op) == expected_backend, f"{family}: {op} did not run on fastenc's {name} backend: {used}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bert_blocks_are_fused_where_they_are_berts_code(family):
    model = fastenc.convert(_model(family, FAMILIES[family]))
    fused = sorted(type(m).__name__ for m in model.modules() if type(m).__module__ == "fastenc.huggingface")
    assert bool(fused) == (family in BERT_BLOCKS), fused


def _converted_matches_eager(family, device, dtype, padding_side, padding_free=False):
    """The converted model's outputs at real tokens and parameter gradients against HF's eager attention (with
    the float64 oracle); returns the converted model and its inputs."""
    eager = _model(family, FAMILIES[family]).to(device, dtype)
    oracle = copy.deepcopy(eager).double()
    converted = copy.deepcopy(eager)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a family the conversion reaches converts without a warning
        assert fastenc.convert(converted, padding_free=padding_free) is converted
    ids, mask = (t.to(device) for t in _batch(padding_side))
    names, want = _outputs_and_grads(eager, ids, mask)
    _, exact = _oracle(oracle, ids, mask)
    got_names, got = _outputs_and_grads(converted, ids, mask)
    assert got_names == names
    for n, a, t, o in zip(names, got, want, exact):
        assert_close_to_oracle(f"{family} {n}", a, o, t)
    return converted, (ids, mask)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("family", sorted(BERT_BLOCKS - {"mpnet"}))
def test_padding_free_family_matches_eager(backend_device, family, padding_side):
    """padding_free=True: the encoder runs on packed tokens (the padded attention never runs)."""
    name, device = backend_device
    if name == "triton" and padding_side == "left":
        pytest.skip("the interpreter is slow: triton runs one padding side")

    def padded_attention(*args, **kwargs):
        raise AssertionError("the padded attention ran")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fastenc.functional, "attention", padded_attention)
        _converted_matches_eager(family, device, torch.float32, padding_side, padding_free=True)


@pytest.mark.parametrize("family", sorted(BERT_BLOCKS))
def test_feed_forward_runs_in_row_blocks_in_inference(monkeypatch, family):
    """BERT's (and MPNet's and DistilBERT's) layers run their feed-forward sub-layers over blocks of rows in
    inference on a CPU (see fastenc.nn.transformer.by_row_blocks): 8 x 20 tokens in blocks of 64, 64 and 32, against
    the float64 oracle."""
    monkeypatch.setattr(fastenc.nn.transformer, "FEED_FORWARD_BLOCK_BYTES", 1)  # blocks of the least, 64 rows
    from fastenc import huggingface

    blocks = []
    by_row_blocks = huggingface.by_row_blocks

    def counted(block, *args):
        return by_row_blocks(lambda h: blocks.append(h.shape[1]) or block(h), *args)

    monkeypatch.setattr(huggingface, "by_row_blocks", counted)
    eager = _model(family, FAMILIES[family]).eval()
    oracle = copy.deepcopy(eager).double()
    converted = fastenc.convert(copy.deepcopy(eager))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 100, (8, 20), generator=g)
    mask = (torch.arange(20) < torch.randint(1, 21, (8, 1), generator=g)).long()
    with torch.no_grad():
        got, want, exact = (m(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]
                            for m in (converted, eager, oracle))
    assert blocks == [64, 64, 32] * eager.config.num_hidden_layers
    assert_close_to_oracle(f"{family} last_hidden_state", got, exact, want)


@pytest.mark.parametrize("family", sorted(OWN_ATTENTION))
def test_family_with_its_own_attention_warns_and_stays_exact(family):
    model = _model(family, OWN_ATTENTION[family]).eval()
    ids, mask = _batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    with pytest.warns(UserWarning, match=f"attention of {type(model).__name__} .* stays on torch"):
        fastenc.convert(model)

    def not_called(*args, **kwargs):
        raise AssertionError("fastenc's attention ran")

    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(fastenc.functional, "attention", not_called)
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert backends.last_used().get("layer_norm") is not None, "its LayerNorms were not converted"
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def _run(code: str) -> str:
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout


def test_saved_converted_model_loads_in_plain_transformers(tmp_path):
    model = fastenc.convert(_model("roberta", FAMILIES["roberta"]).eval())
    model.save_pretrained(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "expected.pt")
    out = _run(f"""
import sys, torch, transformers
model = transformers.AutoModel.from_pretrained({str(tmp_path)!r})
expected = torch.load({str(tmp_path / 'expected.pt')!r})
assert "fastenc" not in sys.modules
assert set(model.state_dict()) == set(expected)
assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
print(model.config._attn_implementation)
""")
    assert out.split() == ["sdpa"], out


def test_pickled_converted_model_loads_in_a_new_process(tmp_path):
    model = fastenc.convert(_model("electra", FAMILIES["electra"]).eval())
    ids, mask = _batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.save((model, ids, mask, expected), tmp_path / "model.pt")
    # Bitwise equality holds at the same thread count (a GEMM's sums are split by threads).
    out = _run(f"""
import torch
from fastenc import backends
torch.set_num_threads({torch.get_num_threads()})
model, ids, mask, expected = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)
with torch.no_grad():
    got = model(input_ids=ids, attention_mask=mask).last_hidden_state
torch.testing.assert_close(got, expected, atol=0, rtol=0)
print(type(model.encoder.layer[0].output).__module__, sorted(backends.last_used()))
""")
    assert out.split() == ["fastenc.huggingface", "['attention',", "'bias_activation',", "'layer_norm']"], out
