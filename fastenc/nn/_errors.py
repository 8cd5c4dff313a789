"""The modules' argument errors (of torch's type for the same call as well as Python's usual one), and the
error that TorchScript gets.

torch.nn's modules check their arguments with `assert` (AssertionError), while fastenc's checks raise ValueError or
TypeError, which `python -O` does not strip. These classes are both, so a drop-in raises what torch raises and
`except ValueError` keeps working.
"""

from __future__ import annotations


class ArgumentValueError(ValueError, AssertionError):
    """An argument of the wrong shape or value (torch.nn: AssertionError)."""


class ArgumentTypeError(TypeError, AssertionError):
    """An argument of the wrong dtype (torch.nn: AssertionError)."""


class NotScriptable:
    """Mixed into every fastenc module: torch.jit.script cannot compile them (their forwards call torch.library
    custom ops from Python, with keyword arguments TorchScript rejects), and says so, naming what works."""

    def __prepare_scriptable__(self):
        cls = type(self)
        name = f"{cls.__module__}.{cls.__qualname__}"  # a user's subclass is named as the user's
        raise RuntimeError(
            f"{name} (a fastenc module) cannot be compiled by torch.jit.script (TorchScript): use torch.compile, "
            f"which traces through fastenc's ops, or script the torch.nn model before fastenc.convert")
