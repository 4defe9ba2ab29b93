"""Shared test helpers: the GPU marker, the kernel-vs-reference comparison, NaN poisoning."""

import pytest
import torch

import dsv2_kernels

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def requires_cuda_kernel(name: str):
    """Skip unless a GPU is present and the extension registered a CUDA kernel for op ``name``."""
    return pytest.mark.skipif(
        not (HAS_CUDA and dsv2_kernels.has_cuda_kernel(name)), reason=f"no CUDA kernel for {name} in this build/machine"
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str = ""):
    """Compare in fp64 with NaN treated as a mismatch unless both sides have it; report the worst element."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    torch.testing.assert_close(a, e, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (or, for integer/fp8 tensors, their most harmful value) so unwritten outputs show up."""
    if t.dtype.is_floating_point and t.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return t.fill_(float("nan"))
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).fill_(0x7F)  # e4m3 NaN
    return t.fill_(-(2**31) if t.dtype == torch.int32 else -1)
