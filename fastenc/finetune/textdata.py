"""Labelled text from CSV or JSONL (the shipped dataset is in data/), its classes, and tokenisation with the
`tokenizers` library."""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer
from torch import Tensor

SHIPPED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "topics.jsonl")
FORMATS = (".csv", ".jsonl")
# The word-level tokenizer's special tokens; their ids are their positions here (the trainer puts them first).
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK]


@dataclass
class Examples:
    texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def _label(value, where: str) -> str:
    """A label is a class name: a non-empty string or an integer (kept as its decimal string)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: label {value!r} is not a class; expected a non-empty string or an integer")
    return str(value).strip()


def _text(value, where: str, column: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {column} {value!r} is not a text; expected a non-empty string")
    return value


def read_examples(path: str, text_column: str = "text", label_column: str = "label") -> Examples:
    """(text, label) rows from a .csv file with a header row or a .jsonl file of one object a line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist (expected a .csv or .jsonl file)")
    extension = os.path.splitext(path)[1].lower()
    if extension not in FORMATS:
        raise ValueError(f"data file {path!r} has extension {extension!r}; expected one of {FORMATS}")
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        if extension == ".csv":
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            for column in (text_column, label_column):
                if column not in columns:
                    raise ValueError(f"{path}: no column {column!r}; the columns are {columns}, expected "
                                     f"{text_column!r} and {label_column!r} (see --text-column, --label-column)")
            rows = ((reader.line_num, row) for row in reader)
        else:
            rows = ((n, line) for n, line in enumerate(f, 1) if line.strip())
        for line, row in rows:
            where = f"{path}:{line}"
            if extension == ".jsonl":
                try:
                    row = json.loads(row)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not a JSON object ({e})") from None
                missing = [c for c in (text_column, label_column) if not isinstance(row, dict) or c not in row]
                if missing:
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise ValueError(f"{where}: no key {missing[0]!r} (has {keys}); expected {text_column!r} "
                                     f"and {label_column!r} (see --text-column, --label-column)")
            texts.append(_text(row[text_column], where, text_column))
            labels.append(_label(row[label_column], where))
    if not texts:
        raise ValueError(f"data file {path!r} has no rows")
    return Examples(texts, labels)


def class_names(labels: list[str], source: str) -> list[str]:
    """The sorted distinct labels; a classification task needs at least two."""
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"{source} has {len(classes)} distinct label(s) {classes}; a classifier needs at least 2")
    return classes


def label_ids(labels: list[str], classes: list[str], source: str) -> Tensor:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"{source} has labels {unknown} that are not among the classes {classes}")
    return torch.tensor([index[label] for label in labels])


def split(examples: Examples, val_fraction: float, seed: int) -> tuple[Examples, Examples]:
    """A seeded shuffle, then the last `val_fraction` of the rows held out for validation."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(order)))
    if n_val >= len(order):
        raise ValueError(f"{len(order)} rows are too few to hold out a validation fraction of {val_fraction}")

    def pick(rows: list[int]) -> Examples:
        return Examples([examples.texts[i] for i in rows], [examples.labels[i] for i in rows])

    return pick(order[:-n_val]), pick(order[-n_val:])


def train_word_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """A lower-casing word-level tokenizer trained on `texts`; every sequence starts with [CLS]."""
    tokenizer = Tokenizer(WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                                          show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{CLS} $A", special_tokens=[
        (CLS, tokenizer.token_to_id(CLS))])
    return tokenizer


def pretrained_tokenizer(folder: str) -> Tokenizer:
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist; a pretrained model folder needs its tokenizer.json")
    return Tokenizer.from_file(path)


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """pad, mask and the ids never masked in pretraining, from the [PAD]/[MASK]/[CLS]/[SEP]/[UNK] tokens
    (BERT's and the word-level tokenizer's names)."""
    ids = {name: tokenizer.token_to_id(name) for name in SPECIAL_TOKENS}
    for name in (PAD, MASK):
        if ids[name] is None:
            raise ValueError(f"the tokenizer has no {name} token; fastenc.finetune needs {PAD} and {MASK}")
    return {"pad": ids[PAD], "mask": ids[MASK], "special": sorted(i for i in ids.values() if i is not None)}


def encode(tokenizer: Tokenizer, texts: list[str], max_len: int) -> Tensor:
    """(N, L) token ids, padded with [PAD] to the longest text (L <= max_len; longer texts are cut)."""
    tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: padding and truncation are tokenizer state
    tokenizer.enable_truncation(max_len)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id(PAD), pad_token=PAD)
    return torch.tensor([e.ids for e in tokenizer.encode_batch(texts)])


def bag_of_words(input_ids: Tensor, vocab_size: int, pad_id: int) -> Tensor:
    """(N, vocab_size) features: log(1 + count) of each token in the row, pads not counted."""
    counts = torch.zeros(input_ids.shape[0], vocab_size, device=input_ids.device)
    counts.scatter_add_(1, input_ids, (input_ids != pad_id).float())
    return counts.log1p()
