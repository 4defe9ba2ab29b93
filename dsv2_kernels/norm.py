"""RMSNorm ops: ``rms_norm`` and ``fused_add_rms_norm`` (CUDA kernels in ``csrc/norm/``).

DeepSeek-V2's RMSNorm computes in fp32 and casts back: ``w * (x / sqrt(mean(x^2) + eps))``, with the product by the
weight done in fp32 before the cast (as the HF implementation does: ``weight * hidden.to(input_dtype)`` differs from
it by one bf16 rounding of the normalized value; both are within the tests' tolerance).
"""

from __future__ import annotations

import torch

from . import _library as lib
from .checks import check_same_device, check_tensor, fail

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ---- references ------------------------------------------------------------------------------------------------
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * inv * weight.float()).to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    # The sum is rounded to the activation dtype first: that rounded value is the residual stream the next layer sees,
    # and the norm is taken of it, as an unfused add followed by RMSNorm would.
    summed = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(summed, weight, eps), summed


# ---- checks and fakes ------------------------------------------------------------------------------------------
def _check_rms_norm(op: str, x, weight, eps, residual=None):
    check_tensor(op, "x", x, dtype=_FLOAT_DTYPES, last_dim_contiguous=True)
    if x.dim() < 1 or x.size(-1) == 0:
        fail(op, "x", f"must have a non-empty last dimension, got shape {tuple(x.shape)}")
    hidden = x.size(-1)
    check_tensor(op, "weight", weight, dtype=_FLOAT_DTYPES, shape=(hidden,), contiguous=True)
    if residual is not None:
        check_tensor(op, "residual", residual, dtype=x.dtype, shape=tuple(x.shape), last_dim_contiguous=True)
    check_same_device(op, x=x, weight=weight, residual=residual)
    if not (eps > 0):
        fail(op, "eps", f"must be > 0, got {eps}")


def _rms_norm_impl(x, weight, eps):
    _check_rms_norm("rms_norm", x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def _rms_norm_fake(x, weight, eps):
    _check_rms_norm("rms_norm", x, weight, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fused_add_rms_norm_impl(x, residual, weight, eps):
    _check_rms_norm("fused_add_rms_norm", x, weight, eps, residual)
    return fused_add_rms_norm_ref(x, residual, weight, eps)


def _fused_add_rms_norm_fake(x, residual, weight, eps):
    _check_rms_norm("fused_add_rms_norm", x, weight, eps, residual)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out, torch.empty_like(out)


lib.register("rms_norm", _rms_norm_impl, _rms_norm_fake)
lib.register("fused_add_rms_norm", _fused_add_rms_norm_impl, _fused_add_rms_norm_fake)


# ---- public wrappers -------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension.

    Args:
        x: [..., H] bf16/fp16/fp32, last dimension contiguous (rows may be strided).
        weight: [H], any float dtype.
        eps: added to the mean square before the reciprocal square root.
    Returns:
        [..., H] contiguous, dtype of ``x``: ``weight * x / sqrt(mean(x^2) + eps)`` computed in fp32.
    """
    if not lib.use_kernel("rms_norm"):
        return _rms_norm_impl(x, weight, eps)
    return lib.op("rms_norm")(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add followed by RMSNorm, in one pass over memory.

    Args:
        x: [..., H] bf16/fp16/fp32 (e.g. the output of attention or MLP).
        residual: [..., H], same dtype and shape as ``x``.
        weight: [H]; eps as in :func:`rms_norm`.
    Returns:
        ``(normed, new_residual)``: ``new_residual = x + residual`` rounded to the dtype of ``x``,
        ``normed = rms_norm(new_residual, weight, eps)``. Both contiguous.
    """
    if not lib.use_kernel("fused_add_rms_norm"):
        return _fused_add_rms_norm_impl(x, residual, weight, eps)
    return lib.op("fused_add_rms_norm")(x, residual, weight, eps)
