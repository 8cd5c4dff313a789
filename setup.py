"""Build of fastenc and its extension fastenc._C (C++ kernels, plus CUDA kernels when a CUDA torch and nvcc exist).

    pip install --no-build-isolation -e .        # against the torch already installed
    python setup.py build_ext --inplace          # the same, without pip (puts fastenc/_C*.so in place)

Environment:
    FASTENC_NO_CUDA=1            C++ kernels only, even where CUDA could be built
    TORCH_CUDA_ARCH_LIST         archs for the CUDA kernels, torch's syntax ("8.0;9.0", "9.0a", "8.0+PTX");
                                 default "8.0;9.0"
    MAX_JOBS                     parallel compile jobs (torch's ninja build)
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import site
import sysconfig

from setuptools import find_packages, setup

import torch


def _cuda_home_from_nvcc() -> None:
    """Point CUDA_HOME at the toolkit when nvcc on PATH is a wrapper outside it (torch would take nvcc's grandparent
    dir, e.g. /usr/local for /usr/local/bin/nvcc). torch reads CUDA_HOME when cpp_extension is imported."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")) and os.path.isdir(os.path.join(home, "bin")):
            os.environ["CUDA_HOME"] = home
            return


_cuda_home_from_nvcc()
from torch.utils import cpp_extension  # noqa: E402  (after CUDA_HOME is settled)

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def read_version() -> str:
    with open(os.path.join(ROOT, "fastenc", "_version.py")) as f:
        return re.search(r'__version__\s*=\s*"([^"]+)"', f.read()).group(1)


def want_cuda() -> bool:
    if os.environ.get("FASTENC_NO_CUDA", "0") not in ("", "0"):
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def arch_names(arch_list: str) -> list[str]:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0a 10.0+PTX") -> ["sm_80", "sm_90a", "sm_100", "compute_100"]."""
    names = []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        number = entry.removesuffix("+PTX").replace(".", "")
        names.append(f"sm_{number}")
        if ptx:
            names.append(f"compute_{number.rstrip('af')}")
    return names


def nvidia_include_dirs() -> list[str]:
    """Header dirs of the nvidia-* wheels that come with a CUDA torch (site-packages/nvidia/<lib>/include).

    ATen's CUDA headers include cuSPARSE, cuBLAS, ... headers that a bare CUDA toolkit may lack; the wheels carry
    them. They go after the toolkit's own include dir, so the toolkit's headers win where both have one.
    """
    roots = []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        roots += list(spec.submodule_search_locations)
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}:
        roots.append(os.path.join(base, "nvidia"))
    dirs = []
    for root in roots:
        # cu13 / cu12 hold the toolkit's libraries in one wheel; the others (cudnn, nccl, ...) one library each.
        for pattern in ("cu13/include", "cu12/include", "*/include"):
            for d in sorted(glob.glob(os.path.join(root, pattern))):
                d = os.path.realpath(d)
                if os.path.isdir(d) and d not in dirs:
                    dirs.append(d)
    return dirs


def extension():
    cpp_sources = ["csrc/fastenc.cpp", "csrc/lstm.cpp", "csrc/cpu/attention.cpp", "csrc/cpu/bias_activation.cpp",
                   "csrc/cpu/layer_norm.cpp", "csrc/cpu/lstm.cpp"]
    # C++20 for std::bit_cast / std::span (csrc/cpu); torch's cpp_extension would otherwise pick its own default,
    # which is C++17 up to torch 2.13. The ISO modes turn off fused multiply-add contraction, which the vectorised
    # polynomials (erfc, exp, tanh) rely on: -ffp-contract=fast brings it back. -fno-trapping-math lets gcc compute
    # both sides of a select in the element functions: without AVX-512's masked lanes it would otherwise keep a
    # float operation that might raise an exception behind a branch, and leave the AVX2 clone scalar (results are
    # the same; nothing here reads the floating-point exception flags). at::parallel_for is inline OpenMP
    # code: without -fopenmp it would run every loop on one thread. (libgomp is the one torch itself loads.)
    cxx_flags = ["-O3", "-std=c++20", "-ffp-contract=fast", "-fno-trapping-math", "-fopenmp"]
    link_flags = ["-fopenmp"]
    depends = glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True)
    if not want_cuda():
        return cpp_extension.CppExtension("fastenc._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
                                          extra_link_args=link_flags, depends=depends)

    # torch turns TORCH_CUDA_ARCH_LIST into -gencode flags; without it, it would build for every arch it knows
    # (slow) or for the GPU of the build machine. Setting it here keeps the two in step with cuda_archs().
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    # The arch list is for fastenc.cpp only (g++): nvcc would split a -D value at its commas.
    arch_macro = "-DFASTENC_CUDA_ARCHS=" + ",".join(arch_names(archs))
    include_dirs = [os.path.join(cpp_extension.CUDA_HOME, "include"), *nvidia_include_dirs()]
    return cpp_extension.CUDAExtension(
        "fastenc._C",
        cpp_sources + ["csrc/cuda/layer_norm.cu", "csrc/cuda/lstm.cu"],
        include_dirs=include_dirs,
        extra_compile_args={
            "cxx": cxx_flags + ["-DFASTENC_WITH_CUDA", arch_macro],
            "nvcc": ["-O3", "-lineinfo", "-DFASTENC_WITH_CUDA"],
        },
        extra_link_args=link_flags,
        depends=depends,
    )


setup(
    name="fastenc",
    version=read_version(),
    packages=find_packages(include=["fastenc", "fastenc.*"]) + ["fastenc.kernels"],
    # kernels/ is installed as fastenc.kernels, never as a top-level `kernels`.
    package_dir={"fastenc.kernels": "kernels"},
    package_data={"fastenc.finetune": ["data/*.jsonl", "data/README.md", "data/generate.py"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    entry_points={"console_scripts": ["fastenc = fastenc.__main__:main"]},
    zip_safe=False,
)
