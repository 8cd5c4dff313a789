"""Fine-tuning fastenc encoders on a text classification task: `finetune(FinetuneConfig(...))` or
`python -m fastenc.finetune` (see its --help)."""

from fastenc.finetune.textdata import read_examples, train_word_tokenizer
from fastenc.finetune.train import FinetuneConfig, FinetuneResult, build_model, finetune

__all__ = ["FinetuneConfig", "FinetuneResult", "build_model", "finetune", "read_examples", "train_word_tokenizer"]
