"""Backend selection: which implementation of an op runs, for every op, in one place.

Backends:
  "reference"  pure PyTorch (fastenc/reference), differentiable and fp64-capable: the oracle of the tests, and
               the last resort of "auto" (it takes every input).
  "torch"      torch's own fastest op for the same job (fastenc/torch_ops: SDPA's fused kernels, native_layer_norm,
               F.gelu), under fastenc's op contract: what "auto" runs where fastenc has no kernel of its own.
  "triton"     Triton kernels (kernels/, imported as fastenc.kernels): CUDA tensors, and CPU tensors when
               TRITON_INTERPRET=1 was set before triton was imported.
  "native"     the compiled extension fastenc._C, as dispatcher ops (fastenc/native.py): CUDA kernels on CUDA
               tensors, C++ kernels on CPU tensors.

Each op file registers, per backend, the module that implements it and, as data, which inputs that backend
takes (`register(op, {backend: module_name}, supports={backend: fn})`, where fn(the op's argument record, the
NamedTuple its op file declares) returns None or the reason it cannot take them), and where a backend takes some
inputs but runs them slower than the next one of AUTO_ORDER, which "auto" passes over (`slower={backend: fn}`,
the same kind of function; bench/results/ holds the measurements). Every such module defines the same functions,
`<op>_forward` and `<op>_backward` (the LSTM's torch backend is the exception: torch's LSTM op with its own
autograd, fastenc/torch_ops/lstm.py), and is imported only when first used, so `import fastenc` never needs triton
or the extension. `select` picks the backend (global choice, `with backend(...)`, or FASTENC_BACKEND); the custom
ops take its name and call `implementation`.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Callable, Iterator

import torch

BACKENDS = ("reference", "torch", "triton", "native")
AUTO = "auto"

# "auto" tries these in order, per device type, and takes the first backend that implements the op and supports
# the inputs: fastenc's kernels, then torch's own op, then the reference (which takes anything, slowly). Where a
# kernel of ours is not yet faster than torch's op, bench/results/ says so. The Triton interpreter is a test
# vehicle, never a CPU default. On CUDA, Triton before the CUDA C++ kernels.
AUTO_ORDER = {
    "cuda": ("triton", "native", "torch", "reference"),
    "cpu": ("native", "torch", "reference"),
}

Supports = Callable[..., "str | None"]
_implementations: dict[str, dict[str, str]] = {}
_supports: dict[str, dict[str, Supports]] = {}
_slower: dict[str, dict[str, Supports]] = {}
_last_used: dict[str, str] = {}
_imported: dict[str, ModuleType] = {}  # implementation modules by path
# set_backend() sets the process-wide choice; `with backend(...)` overrides it in the current thread / task.
_global_choice = AUTO
_scoped_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastenc_backend", default=None)


def register(op: str, modules: dict[str, str], supports: dict[str, Supports] | None = None,
             slower: dict[str, Supports] | None = None) -> None:
    """Name, per backend, the module that implements `op`; the reference is required (it is the fallback).

    supports: per backend, a function of the op's inputs returning None when that backend takes them, else the
    reason it does not. It runs on every call (and is traced by torch.compile): tensor metadata only. A backend
    without an entry takes every input of the devices it runs.
    slower: per backend, a function of the same inputs returning None, or why "auto" passes this backend over for
    inputs it takes but runs slower than what comes after it in AUTO_ORDER. Selected by name, it still runs them.
    """
    unknown = set(modules) - set(BACKENDS)
    hooked = set(supports or {}) | set(slower or {})
    if unknown or "reference" not in modules or not hooked <= set(modules) - {"reference"}:
        raise ValueError(f"op {op!r}: backends must be among {BACKENDS} and include 'reference' (which takes "
                         f"every input), got {sorted(modules)} and supports or slower for {sorted(hooked)}")
    _implementations[op] = dict(modules)
    _supports[op] = dict(supports or {})
    _slower[op] = dict(slower or {})


def implemented(op: str) -> list[str]:
    """The backends that have their own implementation of `op` (the others run its reference)."""
    return list(_implementations[op])


# Triton decides between compiling and interpreting when a kernel is defined, so what counts is the variable's
# value when fastenc was imported.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe_machine() -> tuple[dict[str, str], list[str]]:
    """Once, at import: {backend: why it cannot run} for the backends that cannot, and the extension's CUDA archs.
    Kept in plain data so that torch.compile can trace `select` without importing anything."""
    import torch

    unavailable: dict[str, str] = {}
    if importlib.util.find_spec("triton") is None:
        unavailable["triton"] = "triton is not installed"
    elif not torch.cuda.is_available() and not INTERPRETER:
        unavailable["triton"] = "no CUDA device, and TRITON_INTERPRET=1 was not set before import"
    try:
        extension = importlib.import_module("fastenc._C")
    except ImportError as e:
        unavailable["native"] = (f"the extension fastenc._C is not built ({e}); "
                                 "build it with `pip install --no-build-isolation -e .`")
        return unavailable, []
    return unavailable, list(extension.cuda_archs())


UNAVAILABLE, CUDA_ARCHS = _probe_machine()


def unavailable_reason(backend: str) -> str | None:
    """None when `backend` can run on this machine, else the reason it cannot."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected one of {BACKENDS} or {AUTO!r}"
    return UNAVAILABLE.get(backend)


def native_cpu_feature(probe: str) -> bool:
    """Whether fastenc._C is built and its `probe` (e.g. "attention_cpu_available") says this CPU runs that kernel."""
    return unavailable_reason("native") is None and getattr(importlib.import_module("fastenc._C"), probe)()


def available_backends() -> list[str]:
    """The backends that can run here, in BACKENDS order."""
    return [b for b in BACKENDS if unavailable_reason(b) is None]


def device_reason(backend: str, device_type: str) -> str | None:
    """None when `backend` runs tensors of `device_type`, else why not."""
    if backend == "native" and device_type == "cuda" and not CUDA_ARCHS:
        return "fastenc._C was built without CUDA kernels"
    if backend == "triton" and device_type == "cpu" and not INTERPRETER:
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before import)"
    if device_type not in AUTO_ORDER:
        return f"device type {device_type!r} is not supported"
    return None


def _check_name(name: str) -> str:
    if name == AUTO:
        return name
    reason = unavailable_reason(name)
    if reason is not None:
        raise ValueError(f"backend {name!r} is not available: {reason}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for every op from now on, in every thread; "auto" restores the default."""
    global _global_choice
    _global_choice = _check_name(name)


@torch.compiler.assume_constant_result
def _dynamo_guards_context_variables() -> bool:
    """Whether this torch's Dynamo traces a ContextVar read and guards on its value (newer ones do; torch 2.11's
    stops with "does not know how to trace method `get` of class `ContextVar`")."""
    import torch._dynamo.source

    return hasattr(torch._dynamo.source, "ContextVarGetSource")


@torch.compiler.assume_constant_result
def _scoped_choice_when_traced() -> str | None:
    return _scoped_choice.get()


def get_backend() -> str:
    # Where Dynamo cannot read the ContextVar, a graph takes the scoped choice it was traced under (the global
    # one stays guarded: a module global).
    if torch.compiler.is_compiling() and not _dynamo_guards_context_variables():
        scoped = _scoped_choice_when_traced()
    else:
        scoped = _scoped_choice.get()
    return _global_choice if scoped is None else scoped


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """`with fastenc.backend("triton"): ...` selects a backend inside the block (per thread / task)."""
    token = _scoped_choice.set(_check_name(name))
    try:
        yield
    finally:
        _scoped_choice.reset(token)


def input_reason(op: str, backend: str, *inputs) -> str | None:
    """None when `backend` (one that implements `op`) takes these inputs of the op, else the reason it does not."""
    supports = _supports[op].get(backend)
    return None if supports is None else supports(*inputs)


def slower_reason(op: str, backend: str, *inputs) -> str | None:
    """Why "auto" passes `backend` over for these inputs of `op` (it runs them slower than a later one), or None."""
    slower = _slower[op].get(backend)
    return None if slower is None else slower(*inputs)


def select(op: str, device_type: str, *inputs) -> str:
    """The backend that runs `op` on `inputs` (what its supports / slower functions take: the op's argument
    record, on `device_type` tensors) under the current choice.

    "auto" takes the first backend of AUTO_ORDER that can run here, implements the op, supports the inputs and is
    not registered as slower on them than the backends after it. A
    backend chosen by name that cannot take them raises, naming why; one without this op runs the reference.
    functional calls this and hands the name to the op's forward, which saves it for the backward: a backward
    always runs the backend its forward ran, whatever is selected when it runs. (torch.compile traces this
    function and guards on the choice, so a compiled graph follows the selection too.)
    """
    impls = _implementations[op]
    chosen = get_backend()
    if chosen == AUTO:
        for name in AUTO_ORDER.get(device_type, ("reference",)):
            if (name in impls and unavailable_reason(name) is None and device_reason(name, device_type) is None
                    and input_reason(op, name, *inputs) is None and slower_reason(op, name, *inputs) is None):
                return name
        return "reference"
    reason = device_reason(chosen, device_type)
    if reason is not None:
        raise RuntimeError(f"backend {chosen!r} cannot run op {op!r} on {device_type} tensors: {reason}")
    if chosen not in impls:
        return "reference"  # a backend without this op falls back; info() shows it
    reason = input_reason(op, chosen, *inputs)
    if reason is not None:
        raise ValueError(f"backend {chosen!r} cannot run op {op!r} on these inputs: {reason}; "
                         f"select \"auto\" to run what can")
    return chosen


def implementation(op: str, backend: str) -> ModuleType:
    """The module implementing `op` for `backend` (from select), imported on first use; records it as used."""
    _last_used[op] = backend
    path = _implementations[op][backend]
    if path not in _imported:  # import_module's own lookup costs about a microsecond on every op call
        _imported[path] = importlib.import_module(path)
    return _imported[path]


def last_used() -> dict[str, str]:
    """For each op that has run: the backend whose implementation ran last."""
    return dict(_last_used)


if os.environ.get("FASTENC_BACKEND", "").strip():
    set_backend(os.environ["FASTENC_BACKEND"].strip())
