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
    shapes: dict[str, list[dict]]  # "cuda", "cpu" and "quick" (a few tiny cases for CI, any device)
    dtypes: dict[str, tuple[torch.dtype, ...]]  # default dtypes per device type ("cuda", "cpu")
    make_inputs: Callable[[dict, torch.dtype, torch.device, torch.Generator], dict[str, Tensor]]
    grad_inputs: tuple[str, ...]  # inputs differentiated in fwd+bwd mode
    fastenc_fn: Callable[[dict[str, Tensor]], Tensor]
    torch_fn: Callable[[dict[str, Tensor]], Tensor]
    work: Callable[[dict, torch.dtype, str], Work]
    x_axis: tuple[str, Callable[[dict], float]]  # the size plotted on the x axis: (label, value of params)
    # Further peers users might pick instead (e.g. SDPA per backend, cuDNN LSTM): name -> torch-only function.
    extra_peers: dict[str, Callable[[dict[str, Tensor]], Tensor]] = dataclasses.field(default_factory=dict)


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
    device_type: str, *, quick: bool = False, ops: list[str] | None = None, dtypes: list[torch.dtype] | None = None
) -> list[Case]:
    """The cases to run on `device_type`: every registered op (or `ops`), its shapes, dtypes and modes."""
    unknown = sorted(set(ops or ()) - set(REGISTRY))
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; registered: {sorted(REGISTRY)}")
    selected = [REGISTRY[name] for name in (ops or REGISTRY)]
    cases = []
    for op in selected:
        shapes = op.shapes["quick" if quick else device_type]
        for dtype in dtypes or op.dtypes[device_type]:
            for params in shapes:
                for mode in op.modes:
                    cases.append(Case(op, dict(params), dtype, mode))
    return cases


def _randn(shape, dtype, device, generator, scale=1.0, shift=0.0) -> Tensor:
    # Drawn in float32 on the CPU generator (reproducible on any device), then moved and cast.
    t = torch.randn(shape, generator=generator, dtype=torch.float32) * scale + shift
    return t.to(device=device, dtype=dtype)


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
    """The least traffic a fused kernel can have (BENCHMARKING.md).

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


def _sdpa_with(backend_name: str) -> Callable[[dict], Tensor]:
    """SDPA forced onto one of its backends (a provider that cannot run a case is reported as skipped)."""
    def run(t: dict) -> Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return _attention_torch(t)
    return run


def _attention_work(params: dict, dtype: torch.dtype, mode: str) -> Work:
    """4·B·H·S²·D FLOPs forward (two matrix products); the backward is 2.5× that (BENCHMARKING.md)."""
    forward = 4 * params["B"] * params["H"] * params["S"] ** 2 * params["D"]
    return Work(flops=forward if mode == FWD else int(3.5 * forward))


ATTENTION = register(OpBench(
    name="attention",
    bound="compute",
    modes=(FWD, FWD_BWD),
    # 16k tokens per batch on a GPU (the target shapes); small ones on a CPU, where only the reference runs.
    shapes={
        "cuda": [{"B": 16384 // s, "H": 16, "S": s, "D": d} for d in (64, 128) for s in (512, 1024, 2048, 4096, 8192)],
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
    extra_peers={f"sdpa.{name.lower()}": _sdpa_with(name)
                 for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")},
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
