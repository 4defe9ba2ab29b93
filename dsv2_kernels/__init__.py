"""dsv2_kernels: CUDA kernels for DeepSeek-V2-class models on Hopper, each a torch op with a PyTorch reference.

Ops live in ``torch.ops.dsv2_kernels``; the documented wrappers are in the family modules ``norm``, ``mla``, ``moe``
and ``fp8``. ``set_kernels('none')`` (or ``with kernels('none'):``, or ``DSV2_KERNELS=none``) forces the references.
"""

from . import _library
from ._library import HAS_EXTENSION, has_cuda_kernel, kernels, set_kernels, set_value_checks
from .checks import OpError
from . import fp8, mla, moe, norm  # noqa: E402  (registers every op's reference and fake impl)

__version__ = "0.1.0"


def info() -> dict:
    """Versions, the GPU, and which ops have CUDA kernels in this build."""
    import torch

    gpu = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)"
    return {
        "dsv2_kernels": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": gpu,
        "extension": "built" if HAS_EXTENSION else f"not built ({_library.EXTENSION_ERROR})",
        "ops": {name: ("cuda" if has_cuda_kernel(name) else "reference") for name in _library.SCHEMAS},
    }


__all__ = ["info", "kernels", "set_kernels", "set_value_checks", "has_cuda_kernel", "OpError", "HAS_EXTENSION",
           "fp8", "mla", "moe", "norm"]
