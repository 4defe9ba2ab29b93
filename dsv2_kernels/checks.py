"""Argument checks shared by every op. Each error names the op and the argument, e.g.
``dsv2_kernels.rms_norm: argument 'weight' must have shape (5120,), got (4096,)``.

Checks on metadata (dtype, device, shape, stride) cost nothing on the GPU and always run. Checks on values (an index in
range) need a device sync and run only while ``_library.value_checks_active`` says so.
"""

from __future__ import annotations

from typing import Sequence

import torch

FP8 = torch.float8_e4m3fn


class OpError(ValueError):
    """Raised for a bad argument to a dsv2_kernels op."""


def fail(op: str, arg: str, msg: str) -> None:
    raise OpError(f"dsv2_kernels.{op}: argument '{arg}' {msg}")


def check_tensor(
    op: str,
    arg: str,
    t,
    *,
    dtype: torch.dtype | Sequence[torch.dtype] | None = None,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    contiguous: bool = False,
    last_dim_contiguous: bool = False,
) -> None:
    """Check one tensor argument. ``shape`` entries of None match any size."""
    if not isinstance(t, torch.Tensor):
        fail(op, arg, f"must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in allowed:
            names = " or ".join(str(d).replace("torch.", "") for d in allowed)
            fail(op, arg, f"must have dtype {names}, got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        fail(op, arg, f"must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        for want, got in zip(shape, t.shape):
            if want is not None and want != got:
                pretty = tuple("*" if s is None else s for s in shape)
                fail(op, arg, f"must have shape {pretty}, got {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        fail(op, arg, f"must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")
    if last_dim_contiguous and t.dim() > 0 and t.size(-1) > 1 and t.stride(-1) != 1:
        fail(op, arg, f"must have a contiguous last dimension, got strides {t.stride()}")


def check_same_device(op: str, **tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise OpError(f"dsv2_kernels.{op}: all tensors must be on one device, got {listing}")


def check(op: str, arg: str, cond: bool, msg: str) -> None:
    if not cond:
        fail(op, arg, msg)


def check_index_range(op: str, arg: str, t: torch.Tensor, low: int, high: int, *, ignore_negative: bool = False):
    """Values of ``t`` must lie in [low, high) (negative values allowed when ``ignore_negative``). Syncs the device."""
    if t.numel() == 0:
        return
    vals = t[t >= 0] if ignore_negative else t
    if vals.numel() == 0:
        return
    lo, hi = int(vals.min()), int(vals.max())
    if lo < low or hi >= high:
        bad = lo if lo < low else hi
        fail(op, arg, f"holds {bad}, outside the valid range [{low}, {high})")
