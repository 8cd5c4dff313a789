"""fastenc's Triton kernels (installed as fastenc.kernels), one file per op; see fastenc/ops for the contracts."""

if __name__ == "kernels":
    # Imported as a top-level `kernels`: a source checkout's root is on sys.path (pytest, `python -m bench`), and
    # this directory shadows the `kernels` distribution (Hugging Face's hub kernels, which transformers imports).
    # Hand the name over to that distribution where one is installed; without one, nothing asks for this name.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _path = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is not None and _spec.loader is not None:
        _installed = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _installed  # the import statement returns what sys.modules holds once this ends
        _spec.loader.exec_module(_installed)
