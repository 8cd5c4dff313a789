"""fastenc: fused encoder layers (Triton, C++/CUDA) behind drop-in torch.nn modules."""

from fastenc import functional, nn
from fastenc._info import info
from fastenc.convert import convert
from fastenc._version import __version__
from fastenc.backends import available_backends, backend, get_backend, set_backend

__all__ = [
    "__version__",
    "available_backends",
    "backend",
    "convert",
    "functional",
    "get_backend",
    "info",
    "nn",
    "set_backend",
]
