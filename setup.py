"""Build dsv2_kernels: one CUDA extension, dsv2_kernels._C, for Hopper (sm_90a).

Where torch has no CUDA or no nvcc is found, the package installs as pure Python (every op runs its PyTorch
reference) and says so in one line. Install with ``pip install --no-build-isolation .`` so the build uses the torch
you run with (the extension must match its ABI).
"""

import glob
import os
import runpy
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
GENERATED = os.path.join(ROOT, "build", "generated")


def log(msg: str) -> None:
    print(f"dsv2_kernels: {msg}", file=sys.stderr)


def write_schema_include() -> None:
    """csrc/torch_bindings.cpp includes op_schemas.inc: the TORCH_LIBRARY definitions from dsv2_kernels/schemas.py."""
    schemas = runpy.run_path(os.path.join(ROOT, "dsv2_kernels", "schemas.py"))
    os.makedirs(GENERATED, exist_ok=True)
    path = os.path.join(GENERATED, "op_schemas.inc")
    text = schemas["cpp_definitions"]()
    if not os.path.exists(path) or open(path).read() != text:  # keep the mtime when unchanged: no needless rebuild
        with open(path, "w") as f:
            f.write(text)


def cutlass_include() -> str:
    """CUTLASS/CuTe headers as shipped by the nvidia-cutlass wheel (never vendored)."""
    try:
        import cutlass_library
    except ImportError as e:
        raise RuntimeError("dsv2_kernels: the CUDA build needs `pip install nvidia-cutlass` (CUTLASS headers)") from e
    inc = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    if not os.path.isfile(os.path.join(inc, "cutlass", "cutlass.h")):
        raise RuntimeError(f"dsv2_kernels: nvidia-cutlass is installed but has no headers under {inc}")
    return inc


def cuda_library_includes() -> list:
    """Headers torch's CUDA includes pull in (cusparse.h, cublas) come from its nvidia-* pip dependencies."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in getattr(nvidia, "__path__", []):
        found += sorted(glob.glob(os.path.join(base, "cu*", "include")))  # CUDA 13 wheels: nvidia/cu13/include
        found += sorted(glob.glob(os.path.join(base, "*", "include")))  # CUDA 12 wheels: nvidia/<lib>/include
    return [p for p in dict.fromkeys(found) if os.path.isdir(p)]


def arch_flags() -> list:
    # TORCH_CUDA_ARCH_LIST (e.g. "9.0a") wins and torch turns it into -gencode flags itself. By default we build
    # sm_90a machine code only: no PTX for older archs to fall back to, since wgmma/TMA kernels cannot run there.
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    return ["-gencode=arch=compute_90a,code=sm_90a"]


def find_cuda_home() -> None:
    """Point torch at a real toolkit. torch takes the parent of `which nvcc`, which is wrong where nvcc on the PATH is
    a wrapper script (e.g. /usr/local/bin/nvcc exec-ing /usr/local/cuda-13.0/bin/nvcc): no headers, no libcudart."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(home, "bin", "nvcc")
        ):
            os.environ["CUDA_HOME"] = home
            return


def cuda_extension():
    find_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        log("torch is not installed in the build environment: installing pure Python (use --no-build-isolation).")
        return [], {}
    if os.environ.get("DSV2_KERNELS_NO_CUDA") == "1":
        log("DSV2_KERNELS_NO_CUDA=1: installing pure Python; every op runs its PyTorch reference.")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        why = "torch has no CUDA" if torch.version.cuda is None else "no nvcc/CUDA_HOME found"
        log(f"{why}: installing pure Python; every op runs its PyTorch reference.")
        return [], {}

    write_schema_include()
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    includes = [os.path.join(ROOT, "csrc"), GENERATED, cutlass_include()] + cuda_library_includes()
    common = ["-O3", "-std=c++20", "-DNDEBUG"]
    nvcc = common + arch_flags() + [
        "--expt-relaxed-constexpr",
        "--expt-extended-lambda",
        # torch disables the half/bf16 operators for its own headers; our kernels convert explicitly anyway and
        # CUTLASS expects them available.
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
        "--threads=1",
        "-diag-suppress=3189",  # torch's C++ API headers use `module` as an identifier; harmless under C++20  # MAX_JOBS parallelises over files; small translation units keep that effective
    ]
    cxx = common + ["-I" + os.path.join(CUDA_HOME, "include", "cccl")]
    log(f"building the CUDA extension ({len(sources)} sources, CUDA {torch.version.cuda}, nvcc in {CUDA_HOME}).")
    ext = CUDAExtension(
        name="dsv2_kernels._C",
        sources=sources,
        include_dirs=includes,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
