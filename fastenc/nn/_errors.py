"""The modules' argument errors, of torch's type for the same call as well as of Python's usual one.

torch.nn's modules check their arguments with `assert` (AssertionError), while fastenc's checks raise ValueError or
TypeError, which `python -O` does not strip. These classes are both, so a drop-in raises what torch raises and
`except ValueError` keeps working.
"""

from __future__ import annotations


class ArgumentValueError(ValueError, AssertionError):
    """An argument of the wrong shape or value (torch.nn: AssertionError)."""


class ArgumentTypeError(TypeError, AssertionError):
    """An argument of the wrong dtype (torch.nn: AssertionError)."""
