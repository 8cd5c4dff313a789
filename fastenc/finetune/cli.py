"""`python -m fastenc.finetune` (and `python -m fastenc finetune`): the fine-tuning workflow's options."""

from __future__ import annotations

import argparse
import os

from fastenc.finetune.train import MODELS, FinetuneConfig, finetune


def parser() -> argparse.ArgumentParser:
    d = FinetuneConfig()
    p = argparse.ArgumentParser(
        prog="python -m fastenc.finetune",
        description="Fine-tune a fastenc encoder on text classification (default: the shipped 4-topic dataset, "
                    "a 2-layer d=64 Transformer, on CPU in a minute or two). Under torchrun it runs "
                    "DistributedDataParallel (gloo on CPU, nccl on GPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", help="CSV (with a header) or JSONL of text and label; default: the shipped "
                                     "dataset fastenc/finetune/data/topics.jsonl")
    data.add_argument("--val-data", help="validation CSV / JSONL; default: hold out --val-fraction of --data")
    data.add_argument("--val-fraction", type=float, default=d.val_fraction)
    data.add_argument("--text-column", default=d.text_column)
    data.add_argument("--label-column", default=d.label_column)
    data.add_argument("--max-len", type=int, default=d.max_len, help="tokens per text, longer texts are cut")
    data.add_argument("--vocab-size", type=int, default=d.vocab_size,
                      help="of the word-level tokenizer trained on the training texts (not for BERT models)")
    model = p.add_argument_group("model")
    model.add_argument("--model", default=d.model, help=f"one of {', '.join(MODELS)} (minilm: all-MiniLM-L6-v2), "
                                                         "or the folder of a Hugging Face BERT checkpoint")
    model.add_argument("--d-model", type=int, default=d.d_model, help="width of the transformer / lstm / conv")
    model.add_argument("--layers", type=int, default=d.layers)
    model.add_argument("--heads", type=int, default=d.heads)
    model.add_argument("--mlp-dims", type=int, nargs="+", default=list(d.mlp_dims), help="hidden sizes of mlp")
    model.add_argument("--pooling", help="cls|mean (transformer), last|mean (lstm), max|mean (conv); "
                                         "default: cls, last, max, and mean for BERT checkpoints")
    model.add_argument("--dropout", type=float, default=d.dropout)
    train = p.add_argument_group("training")
    train.add_argument("--pretrain-epochs", type=int, default=d.pretrain_epochs,
                       help="masked-token pretraining first (reconstruction, as an autoencoder, for mlp)")
    train.add_argument("--mask-fraction", type=float, default=d.mask_fraction)
    train.add_argument("--epochs", type=int, default=d.epochs)
    train.add_argument("--batch-size", type=int, default=d.batch_size, help="global, split across processes")
    train.add_argument("--lr", type=float, default=d.lr)
    train.add_argument("--weight-decay", type=float, default=d.weight_decay)
    train.add_argument("--layer-decay", type=float, default=d.layer_decay,
                       help="layer-wise learning-rate decay: block i from the top trains at lr * decay**i")
    train.add_argument("--freeze-encoder", action="store_true", help="train the classification head only")
    train.add_argument("--train-top", type=int, help="train the head and the top N encoder blocks only")
    train.add_argument("--unfreeze-epoch", type=int, help="from this epoch on, train everything")
    train.add_argument("--clip-norm", type=float, default=d.clip_norm, help="gradient clipping; 0: none")
    train.add_argument("--patience", type=int, default=d.patience,
                       help="early stopping: epochs without a better validation loss; 0: never stop early")
    train.add_argument("--no-bf16", dest="bf16", action="store_false", help="no bf16 autocast on GPU")
    train.add_argument("--seed", type=int, default=d.seed)
    run = p.add_argument_group("run")
    run.add_argument("--device", help="default: cuda (this rank's) when available, else cpu")
    run.add_argument("--backend", default=d.backend, help="fastenc backend: reference, triton, native or auto")
    run.add_argument("--output-dir", default=d.output_dir,
                     help="checkpoint.pt, metrics.csv, metrics.json, curves.png, tokenizer.json")
    run.add_argument("--resume", help="continue from this checkpoint.pt")
    run.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    args["mlp_dims"] = tuple(args["mlp_dims"])
    args["clip_norm"] = args["clip_norm"] or None
    args["patience"] = args["patience"] or None
    result = finetune(FinetuneConfig(**args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"validation accuracy {result.val_accuracy:.3f} (loss {result.val_loss:.4f}, epoch "
              f"{result.best_epoch}) over {len(result.classes)} classes in {result.seconds:.1f}s; "
              f"outputs in {args['output_dir']}")
    return 0
