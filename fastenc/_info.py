"""fastenc.info(): what this installation can run, and what it ran."""

from __future__ import annotations

import importlib
import platform
import sys
from typing import IO, Any

import torch

from fastenc import backends
from fastenc._version import __version__


def _version_of(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def _extension() -> dict[str, Any]:
    reason = backends.unavailable_reason("native")
    if reason is not None:
        return {"built": False, "reason": reason}
    extension = importlib.import_module("fastenc._C")
    # cpu_attention needs AVX2 + FMA; without it the native backend has no attention. Without lstm_onednn_gemm the
    # LSTM's weight gradients run at::mm.
    return {"built": True, "cuda_archs": backends.CUDA_ARCHS,
            "cpu_attention": extension.attention_cpu_available(),
            "lstm_onednn_gemm": extension.lstm_onednn_gemm_found()}


def info(file: IO[str] | None = sys.stdout) -> dict[str, Any]:
    """Versions, backends, the extension and the device; printed to `file` (None: only returned)."""
    cuda = torch.cuda.is_available()
    report = {
        "fastenc": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version_of("triton"),
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_threads": torch.get_num_threads(),
        "triton_interpreter": backends.INTERPRETER,
        "available_backends": backends.available_backends(),
        "unavailable_backends": backends.UNAVAILABLE,
        "backend": backends.get_backend(),
        "extension": _extension(),
        "last_used": backends.last_used(),
    }
    if file is not None:
        width = max(map(len, report))
        for key, value in report.items():
            print(f"{key:<{width}}  {value}", file=file)
    return report
