"""Every benchmark case lives here: one `OpBench` entry per op, shared by `python -m bench` and pytest-benchmark.

Adding an op = one `register(OpBench(...))` below: its shapes per device, dtypes, modes, how to make random
inputs, the fastenc call, the torch call users would otherwise write (eager and `torch.compile` peers are built
from it), and the work formula (bytes moved and / or FLOPs) that turns a time into a rate.

An op's `fastenc_fn` and `torch_fn` take the dict from `make_inputs` and return one tensor; in "fwd+bwd" mode the
runner differentiates that tensor with respect to `grad_inputs`. The backend is selected around the call by the
runner (`with fastenc.backend(name)`), never inside these functions.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

FWD = "fwd"
FWD_BWD = "fwd+bwd"

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(set(DTYPES))}") from None


@dataclasses.dataclass(frozen=True)
class Work:
    """What one call of a case does: bytes that must cross memory at least once, and FLOPs (None: not counted)."""

    bytes: int | None = None
    flops: int | None = None


@dataclasses.dataclass(frozen=True)
class OpBench:
    name: str
    bound: str  # "memory" (rate in GB/s against the copy limit) or "compute" (TFLOP/s against the GEMM limit)
    modes: tuple[str, ...]
    # "cuda", "cpu", "quick" (a few tiny cases for CI, any device) and "headline": the few of "cuda"'s shapes that
    # the GPU targets name, run by `--headline` (and `make gpu-check`) when a GPU's time is short.
    shapes: dict[str, list[dict]]
    dtypes: dict[str, tuple[torch.dtype, ...]]  # default dtypes per device type ("cuda", "cpu")
    make_inputs: Callable[[dict, torch.dtype, torch.device, torch.Generator], dict[str, Tensor]]
    grad_inputs: tuple[str, ...]  # inputs differentiated in fwd+bwd mode
    fastenc_fn: Callable[[dict[str, Tensor]], Tensor]
    torch_fn: Callable[[dict[str, Tensor]], Tensor]
    work: Callable[[dict, torch.dtype, str], Work]
    x_axis: tuple[str, Callable[[dict], float]]  # the size plotted on the x axis: (label, value of params)
    # Further peers users might pick instead (e.g. SDPA per backend, cuDNN LSTM): name -> torch-only function.
    extra_peers: dict[str, Callable[[dict[str, Tensor]], Tensor]] = dataclasses.field(default_factory=dict)
    compiled_peer: bool = True  # torch.compile of torch_fn as a peer


@dataclasses.dataclass(frozen=True)
class Case:
    op: OpBench
    params: dict
    dtype: torch.dtype
    mode: str

    @property
    def shape(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.params.items())

    @property
    def id(self) -> str:
        return f"{self.op.name}-{self.shape}-{dtype_name(self.dtype)}-{self.mode}"

    def work(self) -> Work:
        return self.op.work(self.params, self.dtype, self.mode)


REGISTRY: dict[str, OpBench] = {}


def register(op: OpBench) -> OpBench:
    if op.name in REGISTRY:
        raise ValueError(f"op {op.name!r} is registered twice")
    REGISTRY[op.name] = op
    return op


def cases_for(
    device_type: str, *, quick: bool = False, headline: bool = False, ops: list[str] | None = None,
    dtypes: list[torch.dtype] | None = None
) -> list[Case]:
    """The cases to run on `device_type`: every registered op (or `ops`), its shapes, dtypes and modes.

    `headline` takes the "headline" shapes on CUDA (the device's own shapes elsewhere)."""
    unknown = sorted(set(ops or ()) - set(REGISTRY))
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; registered: {sorted(REGISTRY)}")
    selected = [REGISTRY[name] for name in (ops or REGISTRY)]
    cases = []
    for op in selected:
        shapes = op.shapes["quick" if quick else "headline" if headline and device_type == "cuda" else device_type]
        for dtype in dtypes or op.dtypes[device_type]:
            for params in shapes:
                for mode in op.modes:
                    cases.append(Case(op, dict(params), dtype, mode))
    return cases


def _randn(shape, dtype, device, generator, scale=1.0, shift=0.0) -> Tensor:
    # Drawn in float32 on the CPU generator (reproducible on any device), then moved and cast.
    t = torch.randn(shape, generator=generator, dtype=torch.float32) * scale + shift
    return t.to(device=device, dtype=dtype)


def _padded_lengths(params: dict) -> Tensor | None:
    """Lengths uniform in [min_len, S], or None (no mask) when min_len = S. Drawn from a generator of their own,
    so that the work formula, which sees only params, counts the tokens the inputs hold."""
    if params["min_len"] >= params["S"]:
        return None
    return torch.randint(params["min_len"], params["S"] + 1, (params["B"],),
                         generator=torch.Generator().manual_seed(0))


def _zero_padding(out: Tensor, padding: Tensor | None) -> Tensor:
    # fastenc leaves zeros at padded positions, torch and Hugging Face other values: zeroed for all, alike.
    return out if padding is None else out.masked_fill(padding[..., None], 0.0)


# ---------------------------------------------------------------------------------------------------------------
# residual-add + LayerNorm: y = layer_norm(x + residual) * weight + bias over the last dimension N, M rows.
# ---------------------------------------------------------------------------------------------------------------

def _layer_norm_inputs(params: dict, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> dict:
    m, n = params["M"], params["N"]
    return {
        "x": _randn((m, n), dtype, device, gen),
        "residual": _randn((m, n), dtype, device, gen),
        "weight": _randn((n,), dtype, device, gen, scale=0.1, shift=1.0),
        "bias": _randn((n,), dtype, device, gen, scale=0.1),
    }


def _layer_norm_fastenc(t: dict) -> Tensor:
    import fastenc

    n = t["x"].shape[-1]
    return fastenc.functional.layer_norm(t["x"], (n,), t["weight"], t["bias"], residual=t["residual"])


def _layer_norm_torch(t: dict) -> Tensor:
    n = t["x"].shape[-1]
    return F.layer_norm(t["x"] + t["residual"], (n,), t["weight"], t["bias"])


def _layer_norm_work(params: dict, dtype: torch.dtype, mode: str) -> Work:
    """The least traffic a fused kernel can have.

    fwd:     read x, residual, weight, bias; write y.
    fwd+bwd: the forward above, plus writing the sum x + residual and mean / rstd (float32) that the backward
             needs; the backward reads dy, the sum, weight, mean / rstd and writes dx (which is also the
             residual's gradient: one tensor), dweight and dbias.
    """
    m, n = params["M"], params["N"]
    e = torch.empty((), dtype=dtype).element_size()
    stats = 2 * m * 4
    forward = (2 * m * n + 2 * n) * e + m * n * e
    if mode == FWD:
        return Work(bytes=forward)
    saved = m * n * e + stats
    backward = (2 * m * n + n) * e + stats + (m * n + 2 * n) * e
    return Work(bytes=forward + saved + backward)


LAYER_NORM = register(OpBench(
    name="layer_norm",
    bound="memory",
    modes=(FWD, FWD_BWD),
    shapes={
        "cuda": [{"M": 16384, "N": n} for n in (768, 1024, 4096, 8192)],
        "headline": [{"M": 16384, "N": n} for n in (768, 4096)],
        "cpu": [{"M": 4096, "N": n} for n in (768, 1024, 4096)],
        "quick": [{"M": 256, "N": n} for n in (256, 1024)],
    },
    dtypes={"cuda": (torch.bfloat16,), "cpu": (torch.float32,)},
    make_inputs=_layer_norm_inputs,
    grad_inputs=("x", "residual", "weight", "bias"),
    fastenc_fn=_layer_norm_fastenc,
    torch_fn=_layer_norm_torch,
    work=_layer_norm_work,
    x_axis=("N (hidden size)", lambda p: p["N"]),
))


# ---------------------------------------------------------------------------------------------------------------
# attention: softmax(q kᵀ · scale) v over (B, H, S, D), non-causal; peers are SDPA with each of its backends.
# ---------------------------------------------------------------------------------------------------------------

def _attention_inputs(params: dict, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> dict:
    shape = (params["B"], params["H"], params["S"], params["D"])
    return {name: _randn(shape, dtype, device, gen) for name in ("q", "k", "v")}


def _attention_fastenc(t: dict) -> Tensor:
    import fastenc

    return fastenc.functional.attention(t["q"], t["k"], t["v"])


def _attention_torch(t: dict) -> Tensor:
    return F.scaled_dot_product_attention(t["q"], t["k"], t["v"])


def _sdpa_with(backend_name: str, sdpa: Callable[[dict], Tensor] = _attention_torch) -> Callable[[dict], Tensor]:
    """`sdpa` forced onto one of SDPA's backends (a provider that cannot run a case is reported as skipped)."""
    def run(t: dict) -> Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return sdpa(t)
    return run


SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def _attention_work(params: dict, dtype: torch.dtype, mode: str) -> Work:
    """4·B·H·S²·D FLOPs forward (two matrix products); the backward is 2.5× that."""
    forward = 4 * params["B"] * params["H"] * params["S"] ** 2 * params["D"]
    return Work(flops=forward if mode == FWD else int(3.5 * forward))


ATTENTION = register(OpBench(
    name="attention",
    bound="compute",
    modes=(FWD, FWD_BWD),
    # 16k tokens per batch on a GPU (the target shapes); small ones on a CPU, where only the reference runs.
    shapes={
        "cuda": [{"B": 16384 // s, "H": 16, "S": s, "D": d} for d in (64, 128) for s in (512, 1024, 2048, 4096, 8192)],
        "headline": [{"B": 8, "H": 16, "S": 2048, "D": d} for d in (64, 128)],
        "cpu": [{"B": 4, "H": 8, "S": s, "D": 64} for s in (128, 256)],
        "quick": [{"B": 1, "H": 2, "S": 64, "D": 32}],
    },
    dtypes={"cuda": (torch.bfloat16,), "cpu": (torch.float32,)},
    make_inputs=_attention_inputs,
    grad_inputs=("q", "k", "v"),
    fastenc_fn=_attention_fastenc,
    torch_fn=_attention_torch,
    work=_attention_work,
    x_axis=("S (sequence length)", lambda p: p["S"]),
    extra_peers={f"sdpa.{name.lower()}": _sdpa_with(name) for name in SDPA_BACKENDS},
))


# ---------------------------------------------------------------------------------------------------------------
# attention on a padded batch (lengths uniform in [S/4, S]): fastenc packs the tokens, runs attention_varlen and
# unpacks; the peers run SDPA on the padded batch with the key padding mask. Padded query rows are zeroed for all.
# ---------------------------------------------------------------------------------------------------------------

def _padded_attention_inputs(params: dict, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> dict:
    # int64 lengths; the float64 oracle gets a float64 copy, which holds these integers exactly
    return {**_attention_inputs(params, dtype, device, gen), "lengths": _padded_lengths(params).to(device)}


def _key_padding(t: dict) -> Tensor:
    """(B, S), True at padding."""
    return torch.arange(t["q"].shape[2], device=t["q"].device) >= t["lengths"][:, None]


def _padded_attention_fastenc(t: dict) -> Tensor:
    import fastenc

    valid = ~_key_padding(t)
    b, h, s, d = t["q"].shape
    pack = lambda x: x.transpose(1, 2)[valid]  # noqa: E731  (B, H, S, D) -> (tokens, H, D)
    cu = F.pad(t["lengths"].long().cumsum(0), (1, 0)).to(torch.int32)
    # max_seqlen = S bounds every sequence without reading the lengths back from the device.
    out = fastenc.functional.attention_varlen(pack(t["q"]), pack(t["k"]), pack(t["v"]), cu, cu, s, s)
    padded = out.new_zeros(b, s, h, d)
    padded[valid] = out
    return padded.transpose(1, 2)


def _padded_attention_sdpa(t: dict) -> Tensor:
    padding = _key_padding(t)
    out = F.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=~padding[:, None, None, :])
    return out.masked_fill(padding[:, None, :, None], 0.0)


def _padded_attention_work(params: dict, dtype: torch.dtype, mode: str) -> Work:
    """The work on real tokens: sum over sequences of 4·H·L²·D forward; the backward 2.5× that."""
    forward = sum(4 * params["H"] * n * n * params["D"] for n in _padded_lengths(params).tolist())
    return Work(flops=forward if mode == FWD else int(3.5 * forward))


PADDED_ATTENTION = register(OpBench(
    name="attention_varlen",
    bound="compute",
    modes=(FWD, FWD_BWD),
    shapes={
        "cuda": [{"B": 16384 // s, "H": 16, "S": s, "D": d, "min_len": s // 4} for d in (64, 128)
                 for s in (512, 1024, 2048, 4096, 8192)],
        "headline": [{"B": 8, "H": 16, "S": 2048, "D": 128, "min_len": 512}],
        "cpu": [{"B": 4, "H": 8, "S": 256, "D": 64, "min_len": 64}],
        "quick": [{"B": 2, "H": 2, "S": 64, "D": 32, "min_len": 16}],
    },
    dtypes={"cuda": (torch.bfloat16,), "cpu": (torch.float32,)},
    make_inputs=_padded_attention_inputs,
    grad_inputs=("q", "k", "v"),
    fastenc_fn=_padded_attention_fastenc,
    torch_fn=_padded_attention_sdpa,
    work=_padded_attention_work,
    x_axis=("S (longest sequence)", lambda p: p["S"]),
    extra_peers={f"sdpa.{name.lower()}": _sdpa_with(name, _padded_attention_sdpa) for name in SDPA_BACKENDS},
))


# ---------------------------------------------------------------------------------------------------------------
# bias + activation (+ dropout): the epilogue after a feed-forward block's first linear layer, GELU, (tokens, 4d).
# ---------------------------------------------------------------------------------------------------------------

def _bias_activation_inputs(params: dict, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> dict:
    m, n = params["M"], params["N"]
    return {"x": _randn((m, n), dtype, device, gen), "bias": _randn((n,), dtype, device, gen, scale=0.1)}


def _bias_activation_fastenc(t: dict) -> Tensor:
    import fastenc

    return fastenc.functional.bias_activation(t["x"], t["bias"], "gelu")


def _bias_activation_torch(t: dict) -> Tensor:
    return F.gelu(t["x"] + t["bias"])


def _bias_activation_work(params: dict, dtype: torch.dtype, mode: str) -> Work:
    """fwd: read x, bias; write y. fwd+bwd adds: read dy, x, bias; write dx and dbias."""
    m, n = params["M"], params["N"]
    e = torch.empty((), dtype=dtype).element_size()
    forward = (2 * m * n + n) * e
    return Work(bytes=forward if mode == FWD else forward + (3 * m * n + 2 * n) * e)


BIAS_ACTIVATION = register(OpBench(
    name="bias_activation",
    bound="memory",
    modes=(FWD, FWD_BWD),
    shapes={
        "cuda": [{"M": 16384, "N": n} for n in (3072, 4096)],
        "headline": [{"M": 16384, "N": 3072}],
        "cpu": [{"M": 2048, "N": 3072}],
        "quick": [{"M": 128, "N": 384}],
    },
    dtypes={"cuda": (torch.bfloat16,), "cpu": (torch.float32,)},
    make_inputs=_bias_activation_inputs,
    grad_inputs=("x", "bias"),
    fastenc_fn=_bias_activation_fastenc,
    torch_fn=_bias_activation_torch,
    work=_bias_activation_work,
    x_axis=("N (feed-forward width)", lambda p: p["N"]),
))


# ---------------------------------------------------------------------------------------------------------------
# encoder: BERT-base layers (d 768, 12 heads of 64, ff 3072, exact GELU, post-norm, batch_first, dropout 0), one
# layer (L=1) and a stack of 12, on fixed lengths or on lengths uniform in [min_len, S] given as a padding mask.
# ---------------------------------------------------------------------------------------------------------------

ENCODER_HEAD_DIM = 64  # BERT's: a case has d // 64 heads
# One layer's parameters in torch's names. The inputs hold each stacked over the L layers, and every provider
# runs a weightless skeleton of its module on views of them (torch.func.functional_call): the same weights for
# all, so the error column compares like with like, and fwd+bwd differentiates every parameter, as training does.
ENCODER_PARAMS = (
    "self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
    "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
)
# Where they sit in Hugging Face's BertLayer (in_proj's query / key / value thirds go to three Linear layers).
BERT_NAMES = {"self_attn.out_proj": "attention.output.dense", "norm1": "attention.output.LayerNorm",
              "linear1": "intermediate.dense", "linear2": "output.dense", "norm2": "output.LayerNorm"}
# (kind, d, ff, L) -> skeleton on the meta device. make_inputs builds them, so a compiled function only looks up.
_ENCODER_SKELETONS: dict[tuple, torch.nn.Module] = {}


def _build_encoder_skeletons(d: int, ff: int, layers: int) -> None:
    import fastenc

    heads = d // ENCODER_HEAD_DIM
    with torch.device("meta"):
        layer = torch.nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, activation="gelu", batch_first=True)
        # Dropout 0: eval mode computes what training mode does, and lets torch take its inference fast path
        # (nested tensors for a padded batch) under no_grad, as a user's inference would.
        # fastenc skips padded positions (padding_free): every provider's padded outputs are zeroed here, so
        # they compute one function; torch's encoder does the same by itself only in its inference fast path.
        skeletons = {"torch": torch.nn.TransformerEncoder(layer, layers).eval(),
                     "fastenc": fastenc.nn.TransformerEncoder(layer, layers, padding_free=True).eval()}
        try:
            from transformers import BertConfig, BertModel
        except ImportError:  # the Hugging Face peer then reports itself as skipped
            pass
        else:  # torch's LayerNorm eps (BERT's own is 1e-12): every provider computes the same function
            config = BertConfig(hidden_size=d, num_attention_heads=heads, intermediate_size=ff,
                                num_hidden_layers=layers, hidden_act="gelu", layer_norm_eps=1e-5,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, vocab_size=1,
                                max_position_embeddings=1, type_vocab_size=1, attn_implementation="sdpa")
            skeletons["bert"] = BertModel(config, add_pooling_layer=False).eval()
    _ENCODER_SKELETONS.update({(kind, d, ff, layers): module for kind, module in skeletons.items()})


def _encoder_inputs(params: dict, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> dict:
    b, s, d, ff, layers = params["B"], params["S"], params["d"], params["ff"], params["L"]
    if ("torch", d, ff, layers) not in _ENCODER_SKELETONS:
        _build_encoder_skeletons(d, ff, layers)
    inputs = {"x": _randn((b, s, d), dtype, device, gen)}
    shapes = {"self_attn.in_proj_weight": (3 * d, d), "self_attn.in_proj_bias": (3 * d,),
              "self_attn.out_proj.weight": (d, d), "linear1.weight": (ff, d), "linear1.bias": (ff,),
              "linear2.weight": (d, ff)}
    for name in ENCODER_PARAMS:
        shape = shapes.get(name, (d,))
        if len(shape) == 2:  # outputs of about unit variance for inputs of unit variance
            inputs[name] = _randn((layers, *shape), dtype, device, gen, scale=shape[1] ** -0.5)
        else:  # biases about 0, LayerNorm weights about 1
            shift = 1.0 if name.startswith("norm") and name.endswith("weight") else 0.0
            inputs[name] = _randn((layers, *shape), dtype, device, gen, scale=0.1, shift=shift)
    lengths = _padded_lengths(params)
    if lengths is not None:  # int64; the float64 oracle gets a float64 copy, which holds these integers exactly
        inputs["lengths"] = lengths.to(device)
    return inputs


def _encoder_padding(t: dict) -> Tensor | None:
    if "lengths" not in t:
        return None
    return torch.arange(t["x"].shape[1], device=t["x"].device) >= t["lengths"][:, None]


def _encoder_layers(t: dict) -> list[dict[str, Tensor]]:
    """Each layer's parameters in torch's names: views of the stacked inputs (their backward is one copy)."""
    slices = {name: t[name].unbind(0) for name in ENCODER_PARAMS}
    return [{name: slices[name][i] for name in ENCODER_PARAMS} for i in range(t["linear1.weight"].shape[0])]


def _encoder_skeleton(kind: str, t: dict) -> torch.nn.Module:
    layers, ff, d = t["linear1.weight"].shape
    return _ENCODER_SKELETONS[(kind, d, ff, layers)]


def _encoder_module(kind: str) -> Callable[[dict], Tensor]:
    """torch.nn.TransformerEncoder ("torch") or fastenc.nn.TransformerEncoder ("fastenc") on the case's weights."""
    def run(t: dict) -> Tensor:
        padding = _encoder_padding(t)
        weights = {f"layers.{i}.{name}": w for i, layer in enumerate(_encoder_layers(t)) for name, w in layer.items()}
        out = torch.func.functional_call(_encoder_skeleton(kind, t), weights, (t["x"],),
                                         {"src_key_padding_mask": padding})
        return _zero_padding(out, padding)
    return run


def _encoder_bert_sdpa(t: dict) -> Tensor:
    """Hugging Face's BertModel layers (attn_implementation="sdpa") on the case's weights, with the padding mask
    made as BertModel makes it."""
    from transformers.masking_utils import create_bidirectional_mask

    model = _encoder_skeleton("bert", t)
    weights = {}
    for i, layer in enumerate(_encoder_layers(t)):
        qkv = zip(layer["self_attn.in_proj_weight"].chunk(3), layer["self_attn.in_proj_bias"].chunk(3))
        for part, (w, b) in zip(("query", "key", "value"), qkv):
            weights[f"layer.{i}.attention.self.{part}.weight"] = w
            weights[f"layer.{i}.attention.self.{part}.bias"] = b
        for ours, theirs in BERT_NAMES.items():
            for kind in ("weight", "bias"):
                weights[f"layer.{i}.{theirs}.{kind}"] = layer[f"{ours}.{kind}"]
    padding = _encoder_padding(t)
    mask = None if padding is None else create_bidirectional_mask(config=model.config, inputs_embeds=t["x"],
                                                                  attention_mask=~padding)
    out = torch.func.functional_call(model.encoder, weights, (t["x"],), {"attention_mask": mask})
    return _zero_padding(out.last_hidden_state, padding)


def _encoder_tokens(params: dict) -> list[int]:
    lengths = _padded_lengths(params)
    return [params["S"]] * params["B"] if lengths is None else lengths.tolist()


def _encoder_work(params: dict, dtype: torch.dtype, mode: str) -> Work:
    """FLOPs of the real tokens (padding is not useful work: a provider that computes it reaches a lower rate).

    Per layer forward, with T = ΣLᵢ tokens and 2 FLOPs per multiply-add: the Q, K, V and output projections
    4·2·T·d² = 8·T·d², the feed-forward pair 2·2·T·d·ff = 4·T·d·ff, and attention 4·d·ΣLᵢ² (QKᵀ and PV over all
    heads). fwd+bwd adds the backward: twice the GEMMs, 2.5× the attention. LayerNorm, bias,
    GELU and softmax are not counted.
    """
    lengths = _encoder_tokens(params)
    d, ff = params["d"], params["ff"]
    tokens = sum(lengths)
    gemms = 8 * tokens * d * d + 4 * tokens * d * ff
    attention = 4 * d * sum(n * n for n in lengths)
    per_layer = gemms + attention if mode == FWD else 3 * gemms + int(3.5 * attention)
    return Work(flops=params["L"] * per_layer)


ENCODER = register(OpBench(
    name="encoder",
    bound="compute",
    modes=(FWD, FWD_BWD),
    # cuda: BERT-base at batch 32, S 512, one layer and twelve, lengths fixed or uniform in [64, 512] (the issue's
    # targets). cpu and quick: a narrower model, one layer on fixed lengths and two on lengths in [S/8, S] (every
    # case compiles torch's module once: four cases keep a CPU run to about a minute).
    shapes={
        "cuda": [dict(B=32, S=512, d=768, ff=3072, L=layers, min_len=low) for layers in (1, 12) for low in (512, 64)],
        "headline": [dict(B=32, S=512, d=768, ff=3072, L=12, min_len=64)],
        "cpu": [dict(B=4, S=128, d=256, ff=1024, L=1, min_len=128),
                dict(B=4, S=128, d=256, ff=1024, L=2, min_len=16)],
        "quick": [dict(B=2, S=32, d=128, ff=256, L=1, min_len=32), dict(B=2, S=32, d=128, ff=256, L=2, min_len=4)],
    },
    dtypes={"cuda": (torch.bfloat16,), "cpu": (torch.float32,)},
    make_inputs=_encoder_inputs,
    grad_inputs=("x", *ENCODER_PARAMS),
    fastenc_fn=_encoder_module("fastenc"),
    torch_fn=_encoder_module("torch"),
    work=_encoder_work,
    x_axis=("real tokens × layers", lambda p: sum(_encoder_tokens(p)) * p["L"]),
    extra_peers={"hf.bert.sdpa": _encoder_bert_sdpa},
))


# ---------------------------------------------------------------------------------------------------------------
# hf_encoder: Hugging Face encoder families as users load them (a random-weight model of a common size from the
# family's own config class), converted with fastenc.convert(padding_free=True) against the same model on
# transformers' sdpa attention (eager for MPNet, which has no sdpa path). Inputs are embeddings (B, S, d): the
# embedding lookup is the same for both. fwd+bwd differentiates the embeddings only, not the weights. Work is
# counted as BERT's (ff = 4 d; ModernBERT's gated feed-forward and DistilBERT's layout differ a little).
# ---------------------------------------------------------------------------------------------------------------

HF_FAMILIES = ("bert", "roberta", "electra", "distilbert", "mpnet", "modernbert")
_HF_MODELS: dict[tuple, torch.nn.Module] = {}


def _hf_config(family: str, d: int, layers: int):
    from transformers import AutoConfig

    heads = d // ENCODER_HEAD_DIM
    if family == "distilbert":
        kwargs = dict(dim=d, n_heads=heads, hidden_dim=4 * d, n_layers=layers, dropout=0.0, attention_dropout=0.0)
    else:
        kwargs = dict(hidden_size=d, num_attention_heads=heads, intermediate_size=4 * d, num_hidden_layers=layers,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if family == "electra":  # embeddings as wide as the model: the inputs are embeddings
        kwargs.update(embedding_size=d)
    if family == "modernbert":  # its local layers see 64 tokens each side, every third layer is global
        kwargs.update(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                      local_attention=128)
    return AutoConfig.for_model(family, vocab_size=64, max_position_embeddings=1024, **kwargs)


def _hf_model(kind: str, params: dict, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The family's model, seeded so that every kind and dtype has the same weights; kind "fastenc" converted."""
    key = (kind, params["family"], params["d"], params["L"], dtype, device)
    if key not in _HF_MODELS:
        import fastenc
        from transformers import AutoModel

        family = params["family"]
        torch.manual_seed(0)
        attn = "eager" if family == "mpnet" else "sdpa"
        model = AutoModel.from_config(_hf_config(family, params["d"], params["L"]), attn_implementation=attn)
        model = model.to(device=device, dtype=dtype).eval()
        _HF_MODELS[key] = fastenc.convert(model, padding_free=True) if kind == "fastenc" else model
    return _HF_MODELS[key]


def _hf_inputs(params: dict, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> dict:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise RuntimeError("transformers is not installed (pip install .[hf])") from None
    # The family and depth travel with the inputs (as numbers: the float64 oracle gets float64 copies of them).
    inputs = {"embeds": _randn((params["B"], params["S"], params["d"]), dtype, device, gen),
              "family": torch.tensor(HF_FAMILIES.index(params["family"])), "layers": torch.tensor(params["L"])}
    lengths = _padded_lengths(params)
    if lengths is not None:
        inputs["lengths"] = lengths.to(device)
    return inputs


def _hf_run(kind: str) -> Callable[[dict], Tensor]:
    def run(t: dict) -> Tensor:
        x = t["embeds"]
        params = dict(family=HF_FAMILIES[int(t["family"])], d=x.shape[-1], L=int(t["layers"]))
        padding = None if "lengths" not in t else torch.arange(x.shape[1], device=x.device) >= t["lengths"][:, None]
        mask = None if padding is None else (~padding).long()
        out = _hf_model(kind, params, x.dtype, x.device)(inputs_embeds=x, attention_mask=mask).last_hidden_state
        return _zero_padding(out, padding)
    return run


HF_ENCODER = register(OpBench(
    name="hf_encoder",
    bound="compute",
    modes=(FWD, FWD_BWD),
    # One size for every family (d 384, 6 heads of 64, ff 1536, 2 layers; BERT-base on CUDA), on fixed lengths and
    # on lengths uniform in [S/4, S], which the padding-free path does not compute.
    shapes={
        "cuda": [dict(family=f, B=32, S=512, d=768, ff=3072, L=2, min_len=low) for f in HF_FAMILIES
                 for low in (512, 128)],
        "headline": [dict(family="bert", B=32, S=512, d=768, ff=3072, L=2, min_len=128)],
        "cpu": [dict(family=f, B=8, S=128, d=384, ff=1536, L=2, min_len=low) for f in HF_FAMILIES
                for low in (128, 32)],
        "quick": [dict(family="bert", B=2, S=32, d=128, ff=512, L=2, min_len=8)],
    },
    dtypes={"cuda": (torch.bfloat16,), "cpu": (torch.float32,)},
    make_inputs=_hf_inputs,
    grad_inputs=("embeds",),
    fastenc_fn=_hf_run("fastenc"),
    torch_fn=_hf_run("torch"),
    work=_encoder_work,
    x_axis=("real tokens × layers", lambda p: sum(_encoder_tokens(p)) * p["L"]),
    compiled_peer=False,  # each case would compile a whole Hugging Face model
))


# ---------------------------------------------------------------------------------------------------------------
# lstm: one LSTM layer (input size = hidden size, biases, no projection), (T, B, H) input, output and gradients of
# the input and both weight matrices. The peer is torch's own LSTM (cuDNN on a GPU, oneDNN on a CPU).
# ---------------------------------------------------------------------------------------------------------------

def _lstm_inputs(params: dict, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> dict:
    t, b, h = params["T"], params["B"], params["H"]
    scale = h ** -0.5  # torch's init range, so the gates neither saturate nor vanish
    return {
        "x": _randn((t, b, h), dtype, device, gen),
        "h0": _randn((b, h), dtype, device, gen),
        "c0": _randn((b, h), dtype, device, gen),
        "w_ih": _randn((4 * h, h), dtype, device, gen, scale=scale),
        "w_hh": _randn((4 * h, h), dtype, device, gen, scale=scale),
        "b_ih": _randn((4 * h,), dtype, device, gen, scale=scale),
        "b_hh": _randn((4 * h,), dtype, device, gen, scale=scale),
    }


def _lstm_fastenc(t: dict) -> Tensor:
    import fastenc

    return fastenc.functional.lstm_layer(t["x"], t["h0"], t["c0"], t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"])[0]


def _lstm_torch(t: dict) -> Tensor:
    """What torch.nn.LSTM.forward runs for one layer: _VF.lstm(input, hx, params, has_biases, num_layers, dropout,
    train, bidirectional, batch_first)."""
    hx = (t["h0"].unsqueeze(0), t["c0"].unsqueeze(0))
    weights = [t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"]]
    return torch._VF.lstm(t["x"], hx, weights, True, 1, 0.0, torch.is_grad_enabled(), False, False)[0]


def _lstm_work(params: dict, dtype: torch.dtype, mode: str) -> Work:
    """2·T·B·4H·(I + H) FLOPs forward (input projection + recurrent product; the cell is noise); the backward is
    twice the forward (input and weight gradients of both products)."""
    forward = 2 * params["T"] * params["B"] * 4 * params["H"] * 2 * params["H"]
    return Work(flops=forward if mode == FWD else 3 * forward)


LSTM = register(OpBench(
    name="lstm",
    bound="compute",
    modes=(FWD, FWD_BWD),
    shapes={
        "cuda": [{"T": t, "B": b, "H": h} for t in (128, 512) for h in (128, 256, 512, 1024) for b in (1, 16, 64, 256)],
        "headline": [{"T": 128, "B": 64, "H": 512}, {"T": 128, "B": 256, "H": 1024}],
        # The CPU target shape (hidden 256, batch 32, T 128) and one size either side.
        "cpu": [{"T": 128, "B": 32, "H": h} for h in (128, 256, 512)],
        "quick": [{"T": 8, "B": 3, "H": 16}],
    },
    dtypes={"cuda": (torch.bfloat16,), "cpu": (torch.float32,)},
    make_inputs=_lstm_inputs,
    grad_inputs=("x", "w_ih", "w_hh"),
    fastenc_fn=_lstm_fastenc,
    torch_fn=_lstm_torch,
    work=_lstm_work,
    x_axis=("H (hidden size)", lambda p: p["H"]),
))
