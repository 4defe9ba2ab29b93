"""The op library: schemas, the compiled extension, and the switches that choose kernel or reference.

Every op lives in the ``dsv2_kernels`` namespace. ``SCHEMAS`` below is the single list of them. The build turns it
into the ``TORCH_LIBRARY`` block of ``csrc/torch_bindings.cpp`` (see ``setup.py``/``CMakeLists.txt``), so the compiled
extension defines every op once, in C++, and registers its CUDA kernels beside them. Where no extension was built
(torch without CUDA, or no nvcc) the same schemas are defined here from Python, so the ops exist everywhere.

Each family module (``norm``, ``mla``, ``moe``, ``fp8``) registers, per op:
  * the PyTorch reference as the ``CompositeExplicitAutograd`` kernel (CPU, and CUDA where no kernel was built);
  * a fake impl (shapes only) for ``torch.compile`` and meta tensors.
The dispatcher then picks the CUDA kernel for CUDA inputs whenever the extension registered one.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Iterable

import torch

from .schemas import FAMILIES, SCHEMAS  # noqa: F401  (the single list of every op)

NAMESPACE = "dsv2_kernels"


def _load_extension():
    try:
        from dsv2_kernels import _C  # noqa: F401  (defines the ops and registers the CUDA kernels)

        return True, None
    except ImportError as e:  # pure-Python install, or an extension built for another torch
        return False, str(e)


HAS_EXTENSION, EXTENSION_ERROR = _load_extension()

if not HAS_EXTENSION:
    # Same schemas, defined from Python so every op exists without a compiled extension.
    _fallback_lib = torch.library.Library(NAMESPACE, "DEF")
    for _family, _schema in SCHEMAS.values():
        _fallback_lib.define(_schema)


def op(name: str):
    """The torch op ``torch.ops.dsv2_kernels.<name>`` (its default overload)."""
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def has_cuda_kernel(name: str) -> bool:
    """True when the compiled extension registered a CUDA kernel for op ``name``."""
    return HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", "CUDA")


def register(name: str, reference: Callable, fake: Callable) -> None:
    """Register an op's reference (every device without a kernel) and its fake impl (shapes only)."""
    qualname = f"{NAMESPACE}::{name}"
    torch.library.impl(qualname, "CompositeExplicitAutograd")(reference)
    torch.library.register_fake(qualname)(fake)


# ---- switches --------------------------------------------------------------------------------------------------
_state = threading.local()


def _enabled_families() -> frozenset[str]:
    if not hasattr(_state, "families"):
        env = os.environ.get("DSV2_KERNELS", "all")
        _state.families = parse_families(env)
    return _state.families


def parse_families(spec: str | Iterable[str]) -> frozenset[str]:
    """'all' | 'none' | 'mla,moe' (or an iterable of names) -> the set of families whose kernels run."""
    if isinstance(spec, str):
        spec = spec.strip().lower()
        if spec == "all":
            return frozenset(FAMILIES)
        if spec in ("none", ""):
            return frozenset()
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    families = frozenset(spec)
    unknown = families - set(FAMILIES)
    if unknown:
        raise ValueError(f"dsv2_kernels: unknown kernel families {sorted(unknown)}; choose from {list(FAMILIES)}")
    return families


def set_kernels(spec: str | Iterable[str]) -> None:
    """Choose which op families run CUDA kernels ('all', 'none' or e.g. 'mla,moe'); the rest run the reference."""
    _state.families = parse_families(spec)


@contextlib.contextmanager
def kernels(spec: str | Iterable[str]):
    """Context manager form of :func:`set_kernels`; ``with kernels('none'):`` forces every reference."""
    old = _enabled_families()
    _state.families = parse_families(spec)
    try:
        yield
    finally:
        _state.families = old


def use_kernel(name: str, *tensors: torch.Tensor) -> bool:
    """Whether a wrapper should call the op (which dispatches to its CUDA kernel) rather than the Python reference.

    The reference is called directly when the op's family is switched off, so a forced reference is the same
    Python code on every device, and runs even where a kernel exists.
    """
    return SCHEMAS[name][0] in _enabled_families()


# Value checks (indices in range, lengths consistent) need the data on the host: a device sync. They run by default
# for clear errors, are skipped while a CUDA graph is being captured or torch.compile traces (where a sync is
# impossible), and can be switched off for benchmarks. The kernels never read out of bounds either way.
_value_checks = os.environ.get("DSV2_KERNELS_VALUE_CHECKS", "1") != "0"


def set_value_checks(enabled: bool) -> None:
    global _value_checks
    _value_checks = bool(enabled)


def value_checks_active(*tensors: torch.Tensor) -> bool:
    if not _value_checks:
        return False
    if torch.compiler.is_compiling():
        return False
    if any(t.is_cuda for t in tensors if isinstance(t, torch.Tensor)) and torch.cuda.is_current_stream_capturing():
        return False
    return True
