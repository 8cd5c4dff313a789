"""Backend selection: which implementation of an op runs, for every op, in one place.

Backends:
  "reference"  pure PyTorch (fastenc/reference), differentiable and fp64-capable: the oracle and the fallback.
  "triton"     Triton kernels (kernels/, imported as fastenc.kernels): CUDA tensors, and CPU tensors when
               TRITON_INTERPRET=1 was set before triton was imported.
  "native"     the compiled extension fastenc._C: CUDA kernels on CUDA tensors, C++ kernels on CPU tensors.

Each op file registers, per backend, the module that implements it (`register(op, {backend: module_name})`);
every such module defines the same functions, `<op>_forward` and `<op>_backward`, and is imported only when first
used, so `import fastenc` never needs triton or the extension. `select` picks the backend by name (global choice,
`with backend(...)`, or FASTENC_BACKEND); the custom ops take that name and call `implementation`.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Iterator

BACKENDS = ("reference", "triton", "native")
AUTO = "auto"

# "auto" tries these in order, per device type, and takes the first backend that implements the op. The order
# comes from the benchmarks (bench/results/): on CPU the C++ kernels beat torch eager and the reference; the
# Triton interpreter is a test vehicle, never a CPU default. On CUDA, Triton before the CUDA C++ kernels.
AUTO_ORDER = {
    "cuda": ("triton", "native", "reference"),
    "cpu": ("native", "reference"),
}

_implementations: dict[str, dict[str, str]] = {}
_last_used: dict[str, str] = {}
# set_backend() sets the process-wide choice; `with backend(...)` overrides it in the current thread / task.
_global_choice = AUTO
_scoped_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastenc_backend", default=None)


def register(op: str, modules: dict[str, str]) -> None:
    """Name, per backend, the module that implements `op`; the reference is required (it is the fallback)."""
    unknown = set(modules) - set(BACKENDS)
    if unknown or "reference" not in modules:
        raise ValueError(f"op {op!r}: backends must be among {BACKENDS} and include 'reference', got {sorted(modules)}")
    _implementations[op] = dict(modules)


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


def get_backend() -> str:
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


def select(op: str, device_type: str) -> str:
    """The backend that runs `op` on `device_type` tensors under the current choice.

    functional calls this and hands the name to the op's forward, which saves it for the backward: a backward
    always runs the backend its forward ran, whatever is selected when it runs. (torch.compile traces this
    function and guards on the choice, so a compiled graph follows the selection too.)
    """
    impls = _implementations[op]
    chosen = get_backend()
    if chosen == AUTO:
        order = AUTO_ORDER.get(device_type, ("reference",))
        runnable = (b for b in order if unavailable_reason(b) is None and device_reason(b, device_type) is None)
        return next(b for b in runnable if b in impls)
    reason = device_reason(chosen, device_type)
    if reason is not None:
        raise RuntimeError(f"backend {chosen!r} cannot run op {op!r} on {device_type} tensors: {reason}")
    return chosen if chosen in impls else "reference"  # a backend without this op falls back; info() shows it


def implementation(op: str, backend: str) -> ModuleType:
    """The module implementing `op` for `backend` (from select), imported on first use; records it as used."""
    _last_used[op] = backend
    return importlib.import_module(_implementations[op][backend])


def last_used() -> dict[str, str]:
    """For each op that has run: the backend whose implementation ran last."""
    return dict(_last_used)


if os.environ.get("FASTENC_BACKEND", "").strip():
    set_backend(os.environ["FASTENC_BACKEND"].strip())
