"""Backend selection, availability, fallback and `fastenc info`."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import threading

import pytest
import torch

import fastenc
from fastenc import backends
from fastenc.ops.attention import AttentionArgs
from tests.conftest import REQUIRED


def test_required_backends_are_available():
    missing = {b: backends.unavailable_reason(b) for b in REQUIRED if backends.unavailable_reason(b) is not None}
    assert not missing, f"FASTENC_REQUIRE_BACKENDS names backends that cannot run here: {missing}"


def test_reference_is_always_available():
    assert "reference" in fastenc.available_backends()


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="'cudnn'"):
        fastenc.set_backend("cudnn")
    with pytest.raises(ValueError, match="'nope'"):
        with fastenc.backend("nope"):
            pass


def test_set_backend_and_scope_restore():
    assert fastenc.get_backend() == "auto"
    try:
        fastenc.set_backend("reference")
        assert fastenc.get_backend() == "reference"
        seen = []
        worker = threading.Thread(target=lambda: seen.append(fastenc.get_backend()))
        worker.start()
        worker.join()
        assert seen == ["reference"], "set_backend must apply to every thread"
    finally:
        fastenc.set_backend("auto")
    with fastenc.backend("reference"):
        assert fastenc.get_backend() == "reference"
    assert fastenc.get_backend() == "auto"


def test_last_used_reports_the_implementation_that_ran():
    x = torch.randn(3, 8)
    with fastenc.backend("reference"):
        fastenc.functional.layer_norm(x, (8,))
    assert fastenc.info(file=None)["last_used"]["layer_norm"] == "reference"
    fastenc.functional.layer_norm(x, (8,))
    expected = "native" if "native" in fastenc.available_backends() else "reference"
    assert backends.last_used()["layer_norm"] == expected


def test_backend_without_the_op_falls_back_to_reference():
    backends.register("test_only_op", {"reference": "fastenc.reference.layer_norm"})
    with fastenc.backend("reference" if "native" not in fastenc.available_backends() else "native"):
        assert backends.select("test_only_op", "cpu") == "reference"


def test_backward_runs_the_backend_of_its_forward():
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    with fastenc.backend("reference"):
        y = fastenc.functional.layer_norm(x, (8,))
    backends._last_used.clear()
    y.sum().backward()
    assert backends.last_used() == {"layer_norm": "reference"}


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=300
    )


def test_environment_variable_selects_the_backend():
    done = _run_python("import fastenc; print(fastenc.get_backend())", FASTENC_BACKEND="reference")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "reference"
    bad = _run_python("import fastenc", FASTENC_BACKEND="fastest")
    assert bad.returncode != 0 and "'fastest'" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_triton_on_cpu_without_interpreter_says_why():
    code = (
        "import torch, fastenc\n"
        "print(fastenc.available_backends())\n"
        "try:\n"
        "    fastenc.set_backend('triton')\n"
        "except ValueError as e:\n"
        "    print('refused:', e)\n"
    )
    done = _run_python(code, TRITON_INTERPRET="0")
    assert done.returncode == 0, done.stderr
    assert "'triton'" not in done.stdout.splitlines()[0]
    assert "refused: backend 'triton' is not available" in done.stdout and "TRITON_INTERPRET" in done.stdout


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_checkout_root_leaves_the_name_kernels_to_the_installed_distribution():
    """kernels/ is fastenc.kernels; run from a checkout's root (pytest, python -m bench), where it is also
    importable as a top-level `kernels`, that name must still reach the installed `kernels` distribution
    (Hugging Face's hub kernels, which transformers imports), and fastenc.kernels must still be fastenc's."""
    try:
        installed = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the kernels distribution is not installed: nothing here can be shadowed")
    code = ("import kernels, fastenc.kernels.layer_norm as ln\n"
            "print(kernels.__file__, hasattr(ln, 'layer_norm_forward'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    theirs, ours_is_fastencs = done.stdout.split()
    assert os.path.realpath(theirs) == os.path.realpath(installed.locate_file("kernels/__init__.py"))
    assert ours_is_fastencs == "True"


def test_info_command():
    done = subprocess.run([sys.executable, "-m", "fastenc", "info"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for key in ("torch", "triton", "available_backends", "extension", "device"):
        assert key in done.stdout
    report = fastenc.info(file=None)
    if report["extension"]["built"]:
        assert isinstance(report["extension"]["cuda_archs"], list)


def _ran(op):
    return backends.last_used()[op]


@pytest.mark.skipif("native" not in fastenc.available_backends(), reason="needs the built extension")
def test_auto_runs_what_takes_the_inputs_and_the_numbers_are_right():
    """"auto" walks the op's order and takes the first backend that takes these inputs: a float64 attention (the
    native kernel is float32 only) runs torch's op, a float32 one the native kernel; each gives the reference's
    numbers."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16, generator=g, dtype=torch.float64) for _ in range(3))
    out = fastenc.functional.attention(q, k, v, is_causal=True)
    assert _ran("attention") == "torch"
    with fastenc.backend("reference"):
        torch.testing.assert_close(out, fastenc.functional.attention(q, k, v, is_causal=True))
    fastenc.functional.attention(q.float(), k.float(), v.float())
    probe = AttentionArgs(q.float(), k.float(), v.float(), None, None, None, None, 9, 9, False, 1.0, 0.0, None)
    native = "native" in backends.implemented("attention")
    expected = "native" if native and backends.input_reason("attention", "native", probe) is None else "torch"
    assert _ran("attention") == expected



def test_a_backend_named_for_inputs_it_does_not_take_raises_naming_why():
    backends.register("test_only_picky", {"reference": "fastenc.reference.layer_norm",
                                          "native": "fastenc.native"},
                      supports={"native": lambda x: "it takes no odd widths" if x.shape[-1] % 2 else None})
    if "native" not in fastenc.available_backends():
        pytest.skip("needs the built extension")
    assert backends.select("test_only_picky", "cpu", torch.empty(2, 3)) == "reference"  # auto: the next one
    with fastenc.backend("native"):
        assert backends.select("test_only_picky", "cpu", torch.empty(2, 4)) == "native"
        with pytest.raises(ValueError, match="backend 'native' cannot run op 'test_only_picky' on these inputs: it "
                                             "takes no odd widths"):
            backends.select("test_only_picky", "cpu", torch.empty(2, 3))


def test_auto_passes_over_a_backend_registered_as_slower_on_the_inputs():
    backends.register("test_only_slow", {"reference": "fastenc.reference.layer_norm",
                                         "torch": "fastenc.torch_ops.layer_norm", "native": "fastenc.native"},
                      slower={"native": lambda x: "it is slow on odd widths" if x.shape[-1] % 2 else None})
    if "native" not in fastenc.available_backends():
        pytest.skip("needs the built extension")
    assert backends.slower_reason("test_only_slow", "native", torch.empty(2, 3)) == "it is slow on odd widths"
    assert backends.select("test_only_slow", "cpu", torch.empty(2, 3)) == "torch"  # auto: the next one
    assert backends.select("test_only_slow", "cpu", torch.empty(2, 4)) == "native"
    with fastenc.backend("native"):  # chosen by name it runs them
        assert backends.select("test_only_slow", "cpu", torch.empty(2, 3)) == "native"


@pytest.mark.skipif("native" not in fastenc.available_backends(), reason="needs the built extension")
def test_native_without_its_cpu_attention_still_runs_attention():
    """The native attention needs AVX2 + FMA (or AVX-512). Where this CPU lacks it the native backend has no attention, so a model
    under backend("native") runs the reference's attention (and every other op natively) instead of raising."""
    from fastenc import _C

    assert ("native" in backends.implemented("attention")) == _C.attention_cpu_available()
    q, k, v = (torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with fastenc.backend("native"):
        out = fastenc.functional.attention(q, k, v)
    assert _ran("attention") == ("native" if _C.attention_cpu_available() else "reference")
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
