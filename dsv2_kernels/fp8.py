"""FP8 ops: quantization (``quant_per_token_group``, ``quant_weight_block``, ``silu_mul_quant``) and block-scaled FP8
GEMMs (``fp8_gemm``, ``fp8_grouped_gemm_contiguous``, ``fp8_grouped_gemm_masked``). CUDA kernels in ``csrc/fp8/``.

DeepSeek's FP8 recipe: e4m3 data (largest finite value 448), fp32 scales, fp32 accumulation, bf16 output.
  * Activations are scaled per 1 x ``group_size`` group of a row (128; 64 is also accepted by the quantizers, but the
    GEMMs read 128-wide groups only). ``scale = max(amax, 1e-10) / 448`` and ``q = e4m3(x / scale)``: the group's
    largest magnitude maps to +-448, and the 1e-10 floor keeps an all-zero group finite (its q is all zeros).
    ``x / scale`` is an IEEE fp32 division, clamped to [-448, 448] before the round-to-nearest-even cast (it can only
    exceed 448 by a rounding error; this is the SATFINITE conversion of the kernels).
  * Weights are scaled per ``block_size`` x ``block_size`` block (128 x 128), the same way; ragged edge blocks take
    the amax of the elements they hold.
  * A GEMM multiplies each 128-wide K block exactly (fp32 accumulation of e4m3 products), scales that partial product
    by ``a_scale[m, kb] * b_scale[n // 128, kb]`` and adds it to an fp32 accumulator ("promotion" per K block), then
    rounds once to bf16.

Activation scales come in two layouts, and every GEMM reads both: row-major (contiguous ``[M, K/g]``), or column-major,
the TMA-friendly layout of the GEMM kernels: logical shape ``[M, K/g]`` with strides ``(1, M_pad)``,
``M_pad = round_up(M, 4)`` so each column starts 16-byte aligned. For a batched ``[B, M, K]`` input the column-major
scales are column-major per batch: strides ``(K/g * M_pad, 1, M_pad)``.

Shape limits (the kernels tile by 128): GEMM ``K`` and ``N`` are positive multiples of 128; ``M`` (and the grouped
row counts) is arbitrary, 0 included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _library as lib
from .checks import FP8, check, check_index_range, check_same_device, check_tensor, fail

FP8_MAX = 448.0
_AMAX_FLOOR = 1e-10
GEMM_BLOCK = 128  # the GEMMs' K group / N block of the scales
_GROUP_SIZES = (64, 128)
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _round_up(x, m: int):
    return (x + m - 1) // m * m


def _ceil_div(x, m: int):
    return (x + m - 1) // m


def _empty_scales(lead: list, m, groups, column_major: bool, device) -> torch.Tensor:
    """fp32 scales of logical shape ``[*lead, m, groups]``, row-major or column-major (see the module docstring)."""
    if not column_major:
        return torch.empty(*lead, m, groups, dtype=torch.float32, device=device)
    m_pad = _round_up(m, 4)
    lead_strides, batch_stride = [], groups * m_pad
    for size in reversed(lead):  # batch dims: contiguous over the [groups, m_pad] column-major matrices
        lead_strides.insert(0, batch_stride)
        batch_stride = batch_stride * size
    return torch.empty_strided((*lead, m, groups), (*lead_strides, 1, m_pad), dtype=torch.float32, device=device)


# ---- references ------------------------------------------------------------------------------------------------
def quant_per_token_group_ref(x: torch.Tensor, group_size: int = 128, column_major_scales: bool = False):
    """x [..., M, K] -> (q [..., M, K] e4m3 contiguous, scales fp32 [..., M, K/group_size]).

    See :func:`quant_per_token_group` for the layouts; this is the plain PyTorch reference (any device, no checks).
    """
    *lead, m, k = x.shape
    groups = k // group_size
    xf = x.float().reshape(*lead, m, groups, group_size)
    scales = xf.abs().amax(-1).clamp_min(_AMAX_FLOOR) / FP8_MAX
    q = (xf / scales.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8).reshape(x.shape)
    out_scales = _empty_scales(lead, m, groups, column_major_scales, x.device)
    out_scales.copy_(scales)
    return q.contiguous(), out_scales


def dequant_per_token_group(q: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype = torch.float32):
    """Inverse of the per-token-group quantization: ``q [..., K]`` times its group's scale (``scales [..., K/g]``,
    any strides), computed in fp32."""
    groups = scales.shape[-1]
    qf = q.float().reshape(*q.shape[:-1], groups, q.shape[-1] // groups)
    return (qf * scales.float().unsqueeze(-1)).reshape(q.shape).to(out_dtype)


def quant_weight_block_ref(w: torch.Tensor, block_size: int = 128):
    """w [..., N, K] -> (q [..., N, K] e4m3 contiguous, scales fp32 [..., ceil(N/bs), ceil(K/bs)] contiguous)."""
    *lead, n, k = w.shape
    nb, kb = _ceil_div(n, block_size), _ceil_div(k, block_size)
    # Zero padding leaves every amax unchanged; the padded part is cut off again below.
    wf = F.pad(w.float(), (0, kb * block_size - k, 0, nb * block_size - n))
    blocks = wf.reshape(*lead, nb, block_size, kb, block_size)
    scales = blocks.abs().amax(dim=(-3, -1)).clamp_min(_AMAX_FLOOR) / FP8_MAX
    q = (blocks / scales[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    q = q.reshape(*lead, nb * block_size, kb * block_size)[..., :n, :k]
    return q.contiguous(), scales.contiguous()


def dequant_weight_block(
    q: torch.Tensor, scales: torch.Tensor, block_size: int = 128, out_dtype: torch.dtype = torch.float32
):
    """Inverse of the block quantization: ``q [..., N, K]`` times ``scales [..., ceil(N/bs), ceil(K/bs)]``, in fp32."""
    n, k = q.shape[-2:]
    full = scales.float().repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :n, :k]
    return (q.float() * full).to(out_dtype)


def silu_mul_quant_ref(x: torch.Tensor, group_size: int = 128, column_major_scales: bool = False):
    """x [..., M, 2N] -> quant_per_token_group_ref(silu(x[..., :N]) * x[..., N:]) with h kept in fp32 (never bf16)."""
    xf = x.float()
    n = x.shape[-1] // 2
    h = F.silu(xf[..., :n]) * xf[..., n:]
    return quant_per_token_group_ref(h, group_size, column_major_scales)


def fp8_gemm_ref(a, a_scales, b, b_scales, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """a [M, K] e4m3, a_scales [M, K/128], b [N, K] e4m3, b_scales [N/128, K/128] -> [M, N] ``out_dtype``.

    ``out_dtype=torch.float32`` returns the fp32 accumulator itself (the tests check it against float64 math).
    """
    m, k = a.shape
    n = b.shape[0]
    af, bf = a.float(), b.float()
    b_scale_rows = b_scales.float().repeat_interleave(GEMM_BLOCK, 0)[:n]  # [N, K/128]: each row's block scale
    acc = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    for kb in range(k // GEMM_BLOCK):
        cols = slice(kb * GEMM_BLOCK, (kb + 1) * GEMM_BLOCK)
        partial = af[:, cols] @ bf[:, cols].T  # exact up to fp32 rounding of the 128-term sums
        acc += partial * (a_scales[:, kb, None].float() * b_scale_rows[None, :, kb])
    return acc.to(out_dtype)


def fp8_grouped_gemm_contiguous_ref(a, a_scales, b, b_scales, row_expert, out_dtype=torch.bfloat16):
    """Row r of ``a`` times expert ``row_expert[r]``'s weight; rows with expert -1 are left 0. Gathers the rows of
    each expert, so it does not rely on the dispatch's contiguous, aligned segments."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    for e in row_expert.unique().tolist():
        if e < 0:
            continue
        rows = (row_expert == e).nonzero().squeeze(1)
        out[rows] = fp8_gemm_ref(a[rows], a_scales[rows], b[e], b_scales[e], out_dtype)
    return out


def fp8_grouped_gemm_masked_ref(a, a_scales, b, b_scales, counts, out_dtype=torch.bfloat16):
    """Expert e multiplies its first ``min(counts[e], max_m)`` rows of ``a[e]``; the other rows are left 0."""
    num_experts, max_m = a.shape[:2]
    out = torch.zeros(num_experts, max_m, b.shape[1], dtype=out_dtype, device=a.device)
    for e, count in enumerate(counts.tolist()):
        rows = min(count, max_m)
        if rows > 0:
            out[e, :rows] = fp8_gemm_ref(a[e, :rows], a_scales[e, :rows], b[e], b_scales[e], out_dtype)
    return out


# ---- checks and fakes ------------------------------------------------------------------------------------------
def _check_group_size(op: str, arg: str, size: int):
    check(op, arg, size in _GROUP_SIZES, f"must be one of {_GROUP_SIZES}, got {size}")


def _check_quant_input(op: str, x, group_size: int):
    check_tensor(op, "x", x, dtype=_FLOAT_DTYPES, last_dim_contiguous=True)
    check(op, "x", x.dim() in (2, 3), f"must have 2 or 3 dimensions ([M, K] or [B, M, K]), got shape {tuple(x.shape)}")
    _check_group_size(op, "group_size", group_size)


def _check_quant_per_token_group(x, group_size, column_major_scales):
    op = "quant_per_token_group"
    _check_quant_input(op, x, group_size)
    k = x.size(-1)
    check(op, "x", k > 0 and k % group_size == 0,
          f"must have a last dimension that is a positive multiple of group_size={group_size}, got {k}")


def _check_silu_mul_quant(x, group_size, column_major_scales):
    op = "silu_mul_quant"
    _check_quant_input(op, x, group_size)
    two_n = x.size(-1)
    check(op, "x", two_n > 0 and two_n % (2 * group_size) == 0,
          f"must have a last dimension 2*N with N a positive multiple of group_size={group_size}, got {two_n}")


def _check_quant_weight_block(w, block_size):
    op = "quant_weight_block"
    check_tensor(op, "w", w, dtype=_FLOAT_DTYPES, last_dim_contiguous=True)
    check(op, "w", w.dim() in (2, 3), f"must have 2 or 3 dimensions ([N, K] or [E, N, K]), got shape {tuple(w.shape)}")
    _check_group_size(op, "block_size", block_size)


def _check_scale_layout(op: str, arg: str, t):
    """Activation scales: the last two dims [rows, groups] row-major or column-major, any other strides."""
    rows, groups = t.shape[-2:]
    row_major = groups <= 1 or t.stride(-1) == 1
    col_major = rows <= 1 or t.stride(-2) == 1
    check(op, arg, row_major or col_major,
          f"must be row-major (stride[-1] == 1) or column-major (stride[-2] == 1), got strides {t.stride()}")


def _check_gemm_operands(op: str, a, a_scales, b, b_scales, batched_b: bool):
    """a [..., M, K], b [(E,) N, K]; returns (N, K)."""
    check_tensor(op, "a", a, dtype=FP8, last_dim_contiguous=True)
    check_tensor(op, "b", b, dtype=FP8, ndim=3 if batched_b else 2, last_dim_contiguous=True)
    k = a.size(-1)
    check(op, "a", k > 0 and k % GEMM_BLOCK == 0, f"must have K (last dimension) a positive multiple of 128, got {k}")
    n = b.size(-2)
    check(op, "b", b.size(-1) == k, f"must have K = {k} (that of 'a') as its last dimension, got shape {tuple(b.shape)}")
    check(op, "b", n > 0 and n % GEMM_BLOCK == 0, f"must have N a positive multiple of 128, got shape {tuple(b.shape)}")
    check_tensor(op, "a_scales", a_scales, dtype=torch.float32, shape=(*a.shape[:-1], k // GEMM_BLOCK))
    _check_scale_layout(op, "a_scales", a_scales)
    lead = (b.size(0),) if batched_b else ()
    check_tensor(op, "b_scales", b_scales, dtype=torch.float32, shape=(*lead, n // GEMM_BLOCK, k // GEMM_BLOCK),
                 contiguous=True)
    return n, k


def _check_fp8_gemm(a, a_scales, b, b_scales):
    op = "fp8_gemm"
    check_tensor(op, "a", a, dtype=FP8, ndim=2)
    n, _ = _check_gemm_operands(op, a, a_scales, b, b_scales, batched_b=False)
    check_same_device(op, a=a, a_scales=a_scales, b=b, b_scales=b_scales)
    return n


def _check_fp8_grouped_gemm_contiguous(a, a_scales, b, b_scales, row_expert):
    op = "fp8_grouped_gemm_contiguous"
    check_tensor(op, "a", a, dtype=FP8, ndim=2)
    n, _ = _check_gemm_operands(op, a, a_scales, b, b_scales, batched_b=True)
    check_tensor(op, "row_expert", row_expert, dtype=torch.int32, shape=(a.size(0),), contiguous=True)
    check_same_device(op, a=a, a_scales=a_scales, b=b, b_scales=b_scales, row_expert=row_expert)
    return n


def _check_fp8_grouped_gemm_masked(a, a_scales, b, b_scales, counts):
    op = "fp8_grouped_gemm_masked"
    check_tensor(op, "a", a, dtype=FP8, ndim=3)
    n, _ = _check_gemm_operands(op, a, a_scales, b, b_scales, batched_b=True)
    check(op, "b", b.size(0) == a.size(0),
          f"must hold one weight per expert of 'a' ({a.size(0)}), got shape {tuple(b.shape)}")
    check_tensor(op, "counts", counts, dtype=torch.int32, shape=(a.size(0),), contiguous=True)
    check_same_device(op, a=a, a_scales=a_scales, b=b, b_scales=b_scales, counts=counts)
    return n


def _value_check_row_expert(row_expert, num_experts):
    op = "fp8_grouped_gemm_contiguous"
    if row_expert.numel() and int(row_expert.min()) < -1:
        fail(op, "row_expert", f"holds {int(row_expert.min())}; -1 (skip the row) is the only negative value allowed")
    check_index_range(op, "row_expert", row_expert, 0, num_experts, ignore_negative=True)


def _value_check_counts(counts):
    if counts.numel() and int(counts.min()) < 0:
        fail("fp8_grouped_gemm_masked", "counts", f"holds {int(counts.min())}; counts must be >= 0")


def _quant_per_token_group_impl(x, group_size, column_major_scales):
    _check_quant_per_token_group(x, group_size, column_major_scales)
    return quant_per_token_group_ref(x, group_size, column_major_scales)


def _quant_per_token_group_fake(x, group_size, column_major_scales):
    _check_quant_per_token_group(x, group_size, column_major_scales)
    *lead, m, k = x.shape
    q = torch.empty(x.shape, dtype=FP8, device=x.device)
    return q, _empty_scales(lead, m, k // group_size, column_major_scales, x.device)


def _silu_mul_quant_impl(x, group_size, column_major_scales):
    _check_silu_mul_quant(x, group_size, column_major_scales)
    return silu_mul_quant_ref(x, group_size, column_major_scales)


def _silu_mul_quant_fake(x, group_size, column_major_scales):
    _check_silu_mul_quant(x, group_size, column_major_scales)
    *lead, m, two_n = x.shape
    q = torch.empty(*lead, m, two_n // 2, dtype=FP8, device=x.device)
    return q, _empty_scales(lead, m, two_n // 2 // group_size, column_major_scales, x.device)


def _quant_weight_block_impl(w, block_size):
    _check_quant_weight_block(w, block_size)
    return quant_weight_block_ref(w, block_size)


def _quant_weight_block_fake(w, block_size):
    _check_quant_weight_block(w, block_size)
    *lead, n, k = w.shape
    scales = torch.empty(*lead, _ceil_div(n, block_size), _ceil_div(k, block_size), dtype=torch.float32,
                         device=w.device)
    return torch.empty(w.shape, dtype=FP8, device=w.device), scales


def _fp8_gemm_impl(a, a_scales, b, b_scales):
    _check_fp8_gemm(a, a_scales, b, b_scales)
    return fp8_gemm_ref(a, a_scales, b, b_scales)


def _fp8_gemm_fake(a, a_scales, b, b_scales):
    n = _check_fp8_gemm(a, a_scales, b, b_scales)
    return torch.empty(a.size(0), n, dtype=torch.bfloat16, device=a.device)


def _fp8_grouped_gemm_contiguous_impl(a, a_scales, b, b_scales, row_expert):
    _check_fp8_grouped_gemm_contiguous(a, a_scales, b, b_scales, row_expert)
    if lib.value_checks_active(row_expert):
        _value_check_row_expert(row_expert, b.size(0))
    return fp8_grouped_gemm_contiguous_ref(a, a_scales, b, b_scales, row_expert)


def _fp8_grouped_gemm_contiguous_fake(a, a_scales, b, b_scales, row_expert):
    n = _check_fp8_grouped_gemm_contiguous(a, a_scales, b, b_scales, row_expert)
    return torch.empty(a.size(0), n, dtype=torch.bfloat16, device=a.device)


def _fp8_grouped_gemm_masked_impl(a, a_scales, b, b_scales, counts):
    _check_fp8_grouped_gemm_masked(a, a_scales, b, b_scales, counts)
    if lib.value_checks_active(counts):
        _value_check_counts(counts)
    return fp8_grouped_gemm_masked_ref(a, a_scales, b, b_scales, counts)


def _fp8_grouped_gemm_masked_fake(a, a_scales, b, b_scales, counts):
    n = _check_fp8_grouped_gemm_masked(a, a_scales, b, b_scales, counts)
    return torch.empty(a.size(0), a.size(1), n, dtype=torch.bfloat16, device=a.device)


lib.register("quant_per_token_group", _quant_per_token_group_impl, _quant_per_token_group_fake)
lib.register("quant_weight_block", _quant_weight_block_impl, _quant_weight_block_fake)
lib.register("silu_mul_quant", _silu_mul_quant_impl, _silu_mul_quant_fake)
lib.register("fp8_gemm", _fp8_gemm_impl, _fp8_gemm_fake)
lib.register("fp8_grouped_gemm_contiguous", _fp8_grouped_gemm_contiguous_impl, _fp8_grouped_gemm_contiguous_fake)
lib.register("fp8_grouped_gemm_masked", _fp8_grouped_gemm_masked_impl, _fp8_grouped_gemm_masked_fake)


# ---- public wrappers -------------------------------------------------------------------------------------------
def quant_per_token_group(
    x: torch.Tensor, group_size: int = 128, column_major_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to e4m3 with one fp32 scale per 1 x ``group_size`` group of a row.

    Args:
        x: [M, K] or [B, M, K], bf16/fp16/fp32, last dimension contiguous (rows may be strided). K must be a positive
            multiple of ``group_size``; M may be 0.
        group_size: 128 (the GEMMs' group) or 64.
        column_major_scales: lay the scales out column-major (strides ``(1, M_pad)``, ``M_pad = round_up(M, 4)``;
            ``(K/g * M_pad, 1, M_pad)`` for a batched input), the layout the GEMM kernels load with TMA.
    Returns:
        ``(q, scales)``: ``q`` [.., M, K] float8_e4m3fn contiguous, ``q = e4m3(x / scale)``; ``scales`` fp32
        [.., M, K/group_size], ``scale = max(amax of the group, 1e-10) / 448`` (row-major contiguous unless
        ``column_major_scales``). ``dequant_per_token_group(q, scales)`` approximates ``x``.
    """
    if not lib.use_kernel("quant_per_token_group"):
        return _quant_per_token_group_impl(x, group_size, column_major_scales)
    return lib.op("quant_per_token_group")(x, group_size, column_major_scales)


def quant_weight_block(w: torch.Tensor, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight (or a stack of expert weights) to e4m3 with one fp32 scale per block.

    Args:
        w: [N, K] or [E, N, K] (experts stacked, each quantized on its own), bf16/fp16/fp32, last dimension
            contiguous. N and K need not be multiples of ``block_size``: edge blocks are ragged.
        block_size: 128 (the GEMMs' block) or 64.
    Returns:
        ``(q, scales)``: ``q`` like ``w`` in float8_e4m3fn, contiguous; ``scales`` fp32 contiguous
        [(E,) ceil(N/bs), ceil(K/bs)], ``max(block amax, 1e-10) / 448``.
    """
    if not lib.use_kernel("quant_weight_block"):
        return _quant_weight_block_impl(w, block_size)
    return lib.op("quant_weight_block")(w, block_size)


def silu_mul_quant(
    x: torch.Tensor, group_size: int = 128, column_major_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP activation fused with the quantization of its output: ``h = silu(gate) * up``, then per-token-group.

    Args:
        x: [M, 2N] or [B, M, 2N] bf16/fp16/fp32, last dimension contiguous: ``gate = x[..., :N]``,
            ``up = x[..., N:]``. N must be a positive multiple of ``group_size``.
        group_size, column_major_scales: as in :func:`quant_per_token_group`.
    Returns:
        ``(q [.., M, N] e4m3, scales [.., M, N/group_size] fp32)``: ``h`` is computed in fp32 and quantized from fp32
        (no intermediate bf16 rounding of ``h``) and quantized as ``quant_per_token_group`` quantizes. The CUDA
        kernel evaluates SiLU with the hardware exp2 / reciprocal (~1e-6 relative error, as production MoE kernels
        do), so a q value may differ from :func:`silu_mul_quant_ref` by one e4m3 step where h sits at a rounding
        midpoint; the tests state the tolerance.
    """
    if not lib.use_kernel("silu_mul_quant"):
        return _silu_mul_quant_impl(x, group_size, column_major_scales)
    return lib.op("silu_mul_quant")(x, group_size, column_major_scales)


def fp8_gemm(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor) -> torch.Tensor:
    """Block-scaled FP8 GEMM ``out = dequant(a) @ dequant(b).T`` (a linear layer: ``b`` is the [out, in] weight).

    Args:
        a: [M, K] float8_e4m3fn, last dimension contiguous; M arbitrary (0 and 1 included), K a positive multiple
            of 128.
        a_scales: [M, K/128] fp32, row-major or column-major (as :func:`quant_per_token_group` makes them).
        b: [N, K] float8_e4m3fn, last dimension contiguous; N a positive multiple of 128.
        b_scales: [N/128, K/128] fp32 contiguous (as :func:`quant_weight_block` makes them).
    Returns:
        [M, N] bf16 contiguous: ``sum over kb of (a[:, kb] @ b[:, kb].T) * a_scales[:, kb, None] *
        b_scales[n // 128, kb]`` accumulated in fp32 (each 128-wide K block's product scaled, then added).
    """
    if not lib.use_kernel("fp8_gemm"):
        return _fp8_gemm_impl(a, a_scales, b, b_scales)
    return lib.op("fp8_gemm")(a, a_scales, b, b_scales)


def fp8_grouped_gemm_contiguous(
    a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, row_expert: torch.Tensor
) -> torch.Tensor:
    """Grouped FP8 GEMM over the rows of a contiguous MoE dispatch: row r is multiplied by expert ``row_expert[r]``.

    Args:
        a: [R, K] float8_e4m3fn (the dispatched tokens, expert after expert), a_scales: [R, K/128] fp32 row- or
            column-major.
        b: [E, N, K] float8_e4m3fn stacked expert weights, b_scales: [E, N/128, K/128] fp32 contiguous.
        row_expert: [R] int32, each in [-1, E); -1 marks a padding row. The kernels expect the dispatch's layout
            (each expert's rows one contiguous segment whose length is a multiple of 128); the result is defined
            per row either way.
    Returns:
        [R, N] bf16: row r as ``fp8_gemm`` of that row with expert ``row_expert[r]``; rows with -1 are unspecified
        (the reference writes 0).
    """
    if not lib.use_kernel("fp8_grouped_gemm_contiguous"):
        return _fp8_grouped_gemm_contiguous_impl(a, a_scales, b, b_scales, row_expert)
    if lib.value_checks_active(a, row_expert):
        _check_fp8_grouped_gemm_contiguous(a, a_scales, b, b_scales, row_expert)
        _value_check_row_expert(row_expert, b.size(0))
    return lib.op("fp8_grouped_gemm_contiguous")(a, a_scales, b, b_scales, row_expert)


def fp8_grouped_gemm_masked(
    a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Grouped FP8 GEMM over a masked (padded per expert) MoE dispatch, the CUDA-graph-friendly decode layout.

    Args:
        a: [E, max_m, K] float8_e4m3fn, a_scales: [E, max_m, K/128] fp32, each expert's [max_m, K/128] row- or
            column-major.
        b: [E, N, K] float8_e4m3fn, b_scales: [E, N/128, K/128] fp32 contiguous.
        counts: [E] int32 >= 0, the valid rows of each expert; values above max_m are clamped to max_m.
    Returns:
        [E, max_m, N] bf16: ``out[e, :c] = fp8_gemm(a[e, :c], a_scales[e, :c], b[e], b_scales[e])`` with
        ``c = min(counts[e], max_m)``; rows from c on are unspecified (the reference writes 0).
    """
    if not lib.use_kernel("fp8_grouped_gemm_masked"):
        return _fp8_grouped_gemm_masked_impl(a, a_scales, b, b_scales, counts)
    if lib.value_checks_active(a, counts):
        _check_fp8_grouped_gemm_masked(a, a_scales, b, b_scales, counts)
        _value_check_counts(counts)
    return lib.op("fp8_grouped_gemm_masked")(a, a_scales, b, b_scales, counts)
