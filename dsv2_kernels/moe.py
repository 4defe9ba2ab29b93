"""DeepSeekMoE ops: ``route`` (gate logits -> top-k experts and weights), ``dispatch_contiguous`` / ``dispatch_masked``
(copy each token to the experts it was routed to, optionally quantized to FP8) and ``combine`` (the weighted sum of the
expert outputs, back per token). CUDA kernels in ``csrc/moe/``.

One MoE layer::

    ids, w = route(x @ gate.T, ...)
    rows, scales, offsets, row_expert, token_row = dispatch_contiguous(x, ids, E, 128, quant_fp8=True)
    y = down(silu_mul(gate_up(rows)))                      # grouped GEMMs over ``row_expert``
    out = combine(y, token_row, w, shared_experts(x))

Two dispatch layouts:
  * contiguous (prefill): the copies of all experts in one ``[R, H]`` matrix, expert after expert, each expert's
    segment padded to a multiple of ``alignment`` rows (128: the grouped FP8 GEMM's M tile, so no tile spans two
    experts). ``R`` is a static bound (:func:`contiguous_rows_bound`): shapes never depend on the routing, which
    torch.compile and CUDA graphs need.
  * masked (decode): one ``[max_m, H]`` block per expert and the number of copies each expert got; a fixed shape that
    a CUDA graph replays, at the price of dropping the copies beyond ``max_m``.

Both order the copies of one expert by (token, slot), the order of ``topk_ids`` flattened: a stable sort by expert.
The layout is therefore a function of ``topk_ids`` alone, and the kernels reproduce it exactly (no atomics-order
dependence), so reruns are bit-identical.

Negative ``topk_ids`` mean "not routed" (an expert owned by another rank under expert parallelism, or a dropped
slot): such a copy is skipped, its ``token_row`` is -1, and ``combine`` skips it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _library as lib
from .checks import FP8, check, check_index_range, check_same_device, check_tensor

# The route kernel keeps one token's scores in one warp's registers (8 per lane); k <= 16 bounds its selection loop.
MAX_ROUTE_EXPERTS = 256
MAX_TOP_K = 16
# The dispatch kernels count copies per expert in shared memory (one int32 counter per expert per block).
MAX_DISPATCH_EXPERTS = 1024
QUANT_GROUP = 128  # the FP8 GEMMs' K group: dispatch quantizes per 1 x 128 group of a row
_SCORINGS = ("softmax", "sigmoid")
_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
_LOGIT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def contiguous_rows_bound(num_tokens, top_k: int, num_experts: int, alignment: int):
    """Rows of the contiguous dispatch's outputs: the largest number of rows any routing of ``num_tokens * top_k``
    copies over ``num_experts`` experts can use, each nonempty expert padded to a multiple of ``alignment``.

    With ``n = num_tokens * top_k`` copies, at most ``m = min(n, num_experts)`` experts are nonempty and each pads by at
    most ``alignment - 1`` rows, so the used rows, a multiple of ``alignment``, are at most
    ``alignment * floor((n + m * (alignment - 1)) / alignment)``. Some routing reaches it (m experts with one copy each
    and the rest in full ``alignment`` blocks), so no smaller static bound fits every routing.
    Accepts a SymInt ``num_tokens`` (under torch.compile with dynamic shapes).
    """
    n = num_tokens * top_k
    return (n + torch.sym_min(n, num_experts) * (alignment - 1)) // alignment * alignment


# ---- references ------------------------------------------------------------------------------------------------
def _sort_desc(x: torch.Tensor) -> torch.Tensor:
    """Indices sorting the last dim descending, equal values in increasing index order (torch.topk leaves tie order
    unspecified, and the kernels must agree with the reference on ties)."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices


def route_ref(
    logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    method: str = "greedy",
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
    correction_bias: torch.Tensor | None = None,
):
    """See :func:`route`. Plain PyTorch, any device, no checks."""
    scores = logits.float().softmax(-1) if scoring == "softmax" else logits.float().sigmoid()
    choice = scores + correction_bias.float() if method == "noaux_tc" else scores
    if method != "greedy":
        t, e = choice.shape
        grouped = choice.view(t, n_group, e // n_group)
        if method == "group_limited_greedy":
            group_scores = grouped.amax(-1)
        else:  # a sum of two values does not depend on their order, so topk's tie order is harmless here
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        kept = torch.zeros(t, n_group, dtype=torch.bool, device=logits.device)
        kept.scatter_(1, _sort_desc(group_scores)[:, :topk_group], True)
        # -inf, not HF's 0.0: an expert of a dropped group can never be picked, even where scores underflow to 0
        choice = grouped.masked_fill(~kept.unsqueeze(-1), float("-inf")).view(t, e)
    ids = _sort_desc(choice)[:, :top_k]
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    weights = weights * routed_scaling_factor
    return ids.to(torch.int32), weights


def _expert_ranks(topk_ids: torch.Tensor, num_experts: int):
    """For each copy (token, slot), flattened: its expert (``num_experts`` where not routed), its position among the
    copies of that expert in (token, slot) order; and the number of copies per expert.

    No host sync anywhere (the runner captures the reference path in CUDA graphs too): counts by scatter_add (not
    bincount, which reads the max on the host), ranks from a stable sort of the expert keys."""
    key = topk_ids.reshape(-1).long()
    key = torch.where(key >= 0, key, num_experts)  # not routed: an extra bucket after every expert
    order = torch.sort(key, stable=True).indices  # by (expert, token, slot): the flat index breaks ties
    counts = key.new_zeros(num_experts + 1).scatter_add_(0, key, torch.ones_like(key))
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(key)
    rank[order] = torch.arange(key.numel(), device=key.device) - starts[key[order]]
    return key, rank, counts[:num_experts]


def _scatter_rows(hidden: torch.Tensor, dest: torch.Tensor, num_rows: int, top_k: int) -> torch.Tensor:
    """``[num_rows, H]`` zeros with ``hidden[c // top_k]`` copied to row ``dest[c]`` for each copy c with dest >= 0.

    Copies with dest < 0 land in a spare last row that is sliced off (a boolean mask would sync the host)."""
    rows = hidden.new_zeros(num_rows + 1, hidden.size(1))
    src = torch.arange(dest.numel(), device=hidden.device) // top_k
    rows[torch.where(dest >= 0, dest, num_rows)] = hidden[src]
    return rows[:num_rows]


def _quantize_rows(rows: torch.Tensor, quant_fp8: bool):
    if not quant_fp8:
        return rows, torch.empty(0, dtype=torch.float32, device=rows.device)
    from .fp8 import quant_per_token_group_ref  # lazily: the families load in any order

    # Quantizing after the copy equals quantizing each token once (the groups are per row); padding rows are zero,
    # so their q is 0 and their scale the quantizer's floor 1e-10/448.
    return quant_per_token_group_ref(rows, QUANT_GROUP, column_major_scales=True)


def dispatch_contiguous_ref(
    hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, alignment: int, quant_fp8: bool
):
    """See :func:`dispatch_contiguous`. Plain PyTorch, any device, no checks."""
    t, k = topk_ids.shape
    num_rows = contiguous_rows_bound(t, k, num_experts, alignment)
    key, rank, counts = _expert_ranks(topk_ids, num_experts)
    padded = (counts + alignment - 1) // alignment * alignment
    offsets = F.pad(padded.cumsum(0), (1, 0))  # [E + 1]; offsets[E] (the not-routed bucket) = rows used
    token_row = torch.where(key < num_experts, offsets[key] + rank, -1)
    rows = _scatter_rows(hidden, token_row, num_rows, k)
    row_expert = torch.full((num_rows + 1,), -1, dtype=torch.int32, device=hidden.device)  # + a trash entry
    row_expert[torch.where(token_row >= 0, token_row, num_rows)] = key.to(torch.int32)
    row_expert = row_expert[:num_rows]
    rows, row_scales = _quantize_rows(rows, quant_fp8)
    return rows, row_scales, offsets.to(torch.int32), row_expert, token_row.view(t, k).to(torch.int32)


def dispatch_masked_ref(hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, max_m: int, quant_fp8: bool):
    """See :func:`dispatch_masked`. Plain PyTorch, any device, no checks."""
    t, k = topk_ids.shape
    key, rank, counts = _expert_ranks(topk_ids, num_experts)
    token_row = torch.where((key < num_experts) & (rank < max_m), key * max_m + rank, -1)
    rows = _scatter_rows(hidden, token_row, num_experts * max_m, k).view(num_experts, max_m, -1)
    rows, row_scales = _quantize_rows(rows, quant_fp8)
    return rows, row_scales, counts.to(torch.int32), token_row.view(t, k).to(torch.int32)


def combine_ref(
    expert_out: torch.Tensor,
    token_row: torch.Tensor,
    topk_weights: torch.Tensor,
    shared_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """See :func:`combine`. Plain PyTorch, any device, no checks."""
    flat = expert_out.reshape(-1, expert_out.size(-1))
    if flat.size(0) == 0:  # then every entry is skipped; a zero row keeps the gather below in bounds
        flat = flat.new_zeros(1, flat.size(1))
    acc = torch.zeros(token_row.size(0), flat.size(1), dtype=torch.float32, device=flat.device)
    for slot in range(token_row.size(1)):  # fixed slot order: the sum is deterministic
        r = token_row[:, slot].long()
        hit = (r >= 0).unsqueeze(1)
        # Skipped entries gather row 0 and add exactly +0.0 (acc is never -0.0), so whatever the unreferenced rows
        # hold (NaN included) cannot leak in; no boolean-mask indexing, which would sync the host.
        term = topk_weights[:, slot, None].float() * flat[torch.where(r >= 0, r, 0)].float()
        acc += torch.where(hit, term, 0.0)
    if shared_out is not None:
        acc += shared_out.float()
    return acc.to(torch.bfloat16)


# ---- checks and fakes ------------------------------------------------------------------------------------------
def _check_route(logits, top_k, scoring, method, n_group, topk_group, norm_topk_prob, routed_scaling_factor,
                 correction_bias):
    op = "route"
    check_tensor(op, "logits", logits, dtype=_LOGIT_DTYPES, ndim=2, last_dim_contiguous=True)
    e = logits.size(1)
    check(op, "logits", 1 <= e <= MAX_ROUTE_EXPERTS,
          f"must have between 1 and {MAX_ROUTE_EXPERTS} experts (columns), got shape {tuple(logits.shape)}")
    check(op, "scoring", scoring in _SCORINGS, f"must be one of {_SCORINGS}, got {scoring!r}")
    check(op, "method", method in _METHODS, f"must be one of {_METHODS}, got {method!r}")
    check(op, "top_k", 1 <= top_k <= min(MAX_TOP_K, e),
          f"must be in [1, min({MAX_TOP_K}, num_experts={e})], got {top_k}")
    if method != "greedy":
        check(op, "n_group", n_group >= 1 and e % n_group == 0,
              f"must be >= 1 and divide the number of experts {e}, got {n_group}")
        check(op, "topk_group", 1 <= topk_group <= n_group, f"must be in [1, n_group={n_group}], got {topk_group}")
        available = topk_group * (e // n_group)
        check(op, "top_k", top_k <= available,
              f"must be <= the {available} experts of the topk_group={topk_group} kept groups, got {top_k}")
        if method == "noaux_tc":
            check(op, "n_group", e // n_group >= 2,
                  f"must leave >= 2 experts per group (noaux_tc scores a group by its top-2), got {e // n_group}")
    check(op, "routed_scaling_factor", math.isfinite(routed_scaling_factor) and routed_scaling_factor > 0,
          f"must be finite and > 0, got {routed_scaling_factor}")
    if method == "noaux_tc":
        check(op, "correction_bias", correction_bias is not None, "is required by method='noaux_tc'")
        check_tensor(op, "correction_bias", correction_bias, dtype=torch.float32, shape=(e,), contiguous=True)
    else:
        check(op, "correction_bias", correction_bias is None,
              f"is only used by method='noaux_tc'; pass None with method={method!r}")
    check_same_device(op, logits=logits, correction_bias=correction_bias)


def _check_dispatch(op: str, hidden, topk_ids, num_experts, quant_fp8):
    check_tensor(op, "hidden", hidden, dtype=torch.bfloat16, ndim=2, contiguous=True)
    h = hidden.size(1)
    if quant_fp8:
        check(op, "hidden", h > 0 and h % QUANT_GROUP == 0,
              f"must have a hidden size that is a positive multiple of {QUANT_GROUP} with quant_fp8, got {h}")
    else:  # 16-byte rows: the kernels copy 8 bf16 per vector load/store
        check(op, "hidden", h > 0 and h % 8 == 0, f"must have a hidden size that is a positive multiple of 8, got {h}")
    check_tensor(op, "topk_ids", topk_ids, dtype=torch.int32, ndim=2, contiguous=True)
    check(op, "topk_ids", topk_ids.size(0) == hidden.size(0) and topk_ids.size(1) >= 1,
          f"must have shape ({hidden.size(0)}, top_k) with top_k >= 1 (one row per token of 'hidden'), "
          f"got {tuple(topk_ids.shape)}")
    check(op, "num_experts", 1 <= num_experts <= MAX_DISPATCH_EXPERTS,
          f"must be in [1, {MAX_DISPATCH_EXPERTS}], got {num_experts}")
    check_same_device(op, hidden=hidden, topk_ids=topk_ids)


def _check_dispatch_contiguous(hidden, topk_ids, num_experts, alignment, quant_fp8):
    _check_dispatch("dispatch_contiguous", hidden, topk_ids, num_experts, quant_fp8)
    check("dispatch_contiguous", "alignment", alignment >= 1, f"must be >= 1, got {alignment}")


def _check_dispatch_masked(hidden, topk_ids, num_experts, max_m, quant_fp8):
    _check_dispatch("dispatch_masked", hidden, topk_ids, num_experts, quant_fp8)
    check("dispatch_masked", "max_m", 1 <= max_m and num_experts * max_m < 2**31,
          f"must be >= 1 with num_experts * max_m < 2**31 (int32 rows), got {max_m}")


def _check_combine(expert_out, token_row, topk_weights, shared_out):
    op = "combine"
    check_tensor(op, "expert_out", expert_out, dtype=torch.bfloat16, contiguous=True)
    check(op, "expert_out", expert_out.dim() in (2, 3),
          f"must be [R, N] or [E, max_m, N], got shape {tuple(expert_out.shape)}")
    n = expert_out.size(-1)
    check(op, "expert_out", n > 0 and n % 8 == 0, f"must have N a positive multiple of 8, got {n}")
    check_tensor(op, "token_row", token_row, dtype=torch.int32, ndim=2, contiguous=True)
    t, k = token_row.shape
    check(op, "token_row", k >= 1, f"must have shape (T, top_k) with top_k >= 1, got {tuple(token_row.shape)}")
    check_tensor(op, "topk_weights", topk_weights, dtype=torch.float32, shape=(t, k), contiguous=True)
    if shared_out is not None:
        check_tensor(op, "shared_out", shared_out, dtype=torch.bfloat16, shape=(t, n), contiguous=True)
    check_same_device(op, expert_out=expert_out, token_row=token_row, topk_weights=topk_weights,
                      shared_out=shared_out)


def _value_check_topk_ids(op: str, topk_ids, num_experts):
    check_index_range(op, "topk_ids", topk_ids, 0, num_experts, ignore_negative=True)


def _value_check_token_row(expert_out, token_row):
    rows = expert_out.numel() // expert_out.size(-1)
    check_index_range("combine", "token_row", token_row, 0, rows, ignore_negative=True)


def _column_major_scales(lead: tuple, m, groups: int, device) -> torch.Tensor:
    """The FP8 family's column-major activation scales (see ``dsv2_kernels.fp8``): ``[*lead, m, groups]`` with the m
    dim innermost, each column padded to ``m_pad = round_up(m, 4)`` (16-byte aligned TMA columns)."""
    m_pad = (m + 3) // 4 * 4
    batch_strides = (groups * m_pad,) if lead else ()
    return torch.empty_strided((*lead, m, groups), (*batch_strides, 1, m_pad), dtype=torch.float32, device=device)


def _dispatch_outputs_fake(hidden, lead: tuple, m, quant_fp8):
    h = hidden.size(1)
    if not quant_fp8:
        rows = torch.empty(*lead, m, h, dtype=hidden.dtype, device=hidden.device)
        return rows, torch.empty(0, dtype=torch.float32, device=hidden.device)
    rows = torch.empty(*lead, m, h, dtype=FP8, device=hidden.device)
    return rows, _column_major_scales(lead, m, h // QUANT_GROUP, hidden.device)


def _route_impl(logits, top_k, scoring, method, n_group, topk_group, norm_topk_prob, routed_scaling_factor,
                correction_bias):
    args = (logits, top_k, scoring, method, n_group, topk_group, norm_topk_prob, routed_scaling_factor,
            correction_bias)
    _check_route(*args)
    return route_ref(*args)


def _route_fake(logits, top_k, scoring, method, n_group, topk_group, norm_topk_prob, routed_scaling_factor,
                correction_bias):
    _check_route(logits, top_k, scoring, method, n_group, topk_group, norm_topk_prob, routed_scaling_factor,
                 correction_bias)
    t = logits.size(0)
    return (torch.empty(t, top_k, dtype=torch.int32, device=logits.device),
            torch.empty(t, top_k, dtype=torch.float32, device=logits.device))


def _dispatch_contiguous_impl(hidden, topk_ids, num_experts, alignment, quant_fp8):
    _check_dispatch_contiguous(hidden, topk_ids, num_experts, alignment, quant_fp8)
    if lib.value_checks_active(topk_ids):
        _value_check_topk_ids("dispatch_contiguous", topk_ids, num_experts)
    return dispatch_contiguous_ref(hidden, topk_ids, num_experts, alignment, quant_fp8)


def _dispatch_contiguous_fake(hidden, topk_ids, num_experts, alignment, quant_fp8):
    _check_dispatch_contiguous(hidden, topk_ids, num_experts, alignment, quant_fp8)
    t, k = topk_ids.shape
    r = contiguous_rows_bound(t, k, num_experts, alignment)
    rows, row_scales = _dispatch_outputs_fake(hidden, (), r, quant_fp8)
    dev = hidden.device
    return (rows, row_scales, torch.empty(num_experts + 1, dtype=torch.int32, device=dev),
            torch.empty(r, dtype=torch.int32, device=dev), torch.empty(t, k, dtype=torch.int32, device=dev))


def _dispatch_masked_impl(hidden, topk_ids, num_experts, max_m, quant_fp8):
    _check_dispatch_masked(hidden, topk_ids, num_experts, max_m, quant_fp8)
    if lib.value_checks_active(topk_ids):
        _value_check_topk_ids("dispatch_masked", topk_ids, num_experts)
    return dispatch_masked_ref(hidden, topk_ids, num_experts, max_m, quant_fp8)


def _dispatch_masked_fake(hidden, topk_ids, num_experts, max_m, quant_fp8):
    _check_dispatch_masked(hidden, topk_ids, num_experts, max_m, quant_fp8)
    rows, row_scales = _dispatch_outputs_fake(hidden, (num_experts,), max_m, quant_fp8)
    dev = hidden.device
    return (rows, row_scales, torch.empty(num_experts, dtype=torch.int32, device=dev),
            torch.empty(topk_ids.shape, dtype=torch.int32, device=dev))


def _combine_impl(expert_out, token_row, topk_weights, shared_out):
    _check_combine(expert_out, token_row, topk_weights, shared_out)
    if lib.value_checks_active(token_row):
        _value_check_token_row(expert_out, token_row)
    return combine_ref(expert_out, token_row, topk_weights, shared_out)


def _combine_fake(expert_out, token_row, topk_weights, shared_out):
    _check_combine(expert_out, token_row, topk_weights, shared_out)
    return torch.empty(token_row.size(0), expert_out.size(-1), dtype=torch.bfloat16, device=expert_out.device)


lib.register("route", _route_impl, _route_fake)
lib.register("dispatch_contiguous", _dispatch_contiguous_impl, _dispatch_contiguous_fake)
lib.register("dispatch_masked", _dispatch_masked_impl, _dispatch_masked_fake)
lib.register("combine", _combine_impl, _combine_fake)


# ---- public wrappers -------------------------------------------------------------------------------------------
def route(
    logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    method: str = "greedy",
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
    correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE gate: pick ``top_k`` experts per token and their weights. All math in fp32.

    Args:
        logits: [T, E] bf16/fp16/fp32 gate logits (``x @ gate_weight.T``), last dimension contiguous; T may be 0;
            1 <= E <= 256 (the kernel keeps a token's scores in one warp's registers).
        top_k: experts per token, 1 <= top_k <= min(16, E).
        scoring: ``'softmax'`` (V2) or ``'sigmoid'`` (V3) of the logits gives ``scores``.
        method: how experts are selected:
            ``'greedy'``: the top_k ``scores`` (V2-Lite). ``n_group``/``topk_group`` are ignored.
            ``'group_limited_greedy'`` (V2): the experts form ``n_group`` equal groups of consecutive indices, a
            group scores the max of its ``scores``; only the ``topk_group`` best groups stay, and the top_k
            ``scores`` among their experts are picked.
            ``'noaux_tc'`` (V3): ``choice = scores + correction_bias``; a group scores the sum of its two largest
            ``choice`` values (so E / n_group >= 2); the top_k ``choice`` values of the kept groups are picked.
            For grouped methods E % n_group == 0, 1 <= topk_group <= n_group and
            top_k <= topk_group * E / n_group.
        norm_topk_prob: divide the k weights by ``their sum + 1e-20``.
        routed_scaling_factor: (> 0) multiplies the weights, after the normalization if any. HF DeepSeek-V2 applies
            it only when *not* normalizing (V3 applies it always, as here); V2 and V2-Lite ship
            ``norm_topk_prob=False``, where both agree. To mimic V2 with normalization, pass 1.0. (HF V2 also skips
            the normalization when top_k == 1; here it always applies.)
        correction_bias: [E] fp32 contiguous, required by ``'noaux_tc'`` (and only allowed there).
    Returns:
        ``(topk_ids [T, top_k] int32, topk_weights [T, top_k] fp32)``. The weights are ``scores`` (never
        ``choice``) at the picked ids. Order of the k outputs: descending by the selection value (``scores``, or
        ``choice`` for noaux_tc), equal values by increasing expert index; groups tie the same way. Experts of
        dropped groups are never picked (HF masks them with 0.0, which matters only where scores underflow to 0).
    """
    args = (logits, top_k, scoring, method, n_group, topk_group, norm_topk_prob, routed_scaling_factor,
            correction_bias)
    if not lib.use_kernel("route"):
        return _route_impl(*args)
    return lib.op("route")(*args)


def dispatch_contiguous(
    hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, alignment: int = 128, quant_fp8: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy each token to its experts' rows, expert after expert, each expert's segment padded (prefill layout).

    Args:
        hidden: [T, H] bf16 contiguous; T may be 0. H a positive multiple of 8 (16-byte rows), of 128 with
            ``quant_fp8``.
        topk_ids: [T, k] int32 contiguous (k >= 1), each < num_experts; a negative id means "not routed" (skipped).
            Each (t, slot) is one copy: an expert repeated within a row receives the token twice.
        num_experts: E, 1 <= E <= 1024.
        alignment: (>= 1) each expert's segment is padded to a multiple of it (128 for the FP8 grouped GEMM).
        quant_fp8: write the rows as e4m3 with per-1x128-group scales (``dsv2_kernels.fp8.quant_per_token_group``
            semantics: ``scale = max(group amax, 1e-10) / 448``, ``q = e4m3(x / scale)``).
    Returns:
        ``(rows, row_scales, expert_offsets, row_expert, token_row)`` with R = :func:`contiguous_rows_bound`
        ``(T, k, E, alignment)`` (a multiple of ``alignment``, fixed by the shapes):

        * rows: [R, H] contiguous, bf16 (float8_e4m3fn with ``quant_fp8``). Expert e's copies are rows
          ``expert_offsets[e] : expert_offsets[e] + count_e``, in (token, slot) order; the rest of its segment (up to
          ``expert_offsets[e + 1]``) is padding. Padding rows and the unused tail rows are unspecified (the reference
          writes zeros, scale 1e-10/448).
        * row_scales: with ``quant_fp8``, [R, H/128] fp32 column-major, strides ``(1, round_up(R, 4))`` (the FP8
          family's GEMM layout; ``(1, R)`` whenever alignment % 4 == 0); else an empty (0,) fp32 tensor.
        * expert_offsets: [E+1] int32, the start of each expert's padded segment; ``expert_offsets[E]`` = rows used.
          An empty expert has an empty segment.
        * row_expert: [R] int32, the expert of each row; -1 for padding and unused rows.
        * token_row: [T, k] int32, the row that copy (t, slot) landed in; -1 where ``topk_ids`` < 0.
    """
    if not lib.use_kernel("dispatch_contiguous"):
        return _dispatch_contiguous_impl(hidden, topk_ids, num_experts, alignment, quant_fp8)
    if lib.value_checks_active(hidden, topk_ids):
        _check_dispatch_contiguous(hidden, topk_ids, num_experts, alignment, quant_fp8)
        _value_check_topk_ids("dispatch_contiguous", topk_ids, num_experts)
    return lib.op("dispatch_contiguous")(hidden, topk_ids, num_experts, alignment, quant_fp8)


def dispatch_masked(
    hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, max_m: int, quant_fp8: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy each token to its experts' blocks of ``max_m`` rows (decode layout, fixed shapes for CUDA graphs).

    Args:
        hidden, topk_ids, num_experts, quant_fp8: as in :func:`dispatch_contiguous`.
        max_m: (>= 1) rows per expert; copies of an expert beyond the first ``max_m`` (in (token, slot) order) are
            dropped.
    Returns:
        ``(rows, row_scales, counts, token_row)``:

        * rows: [E, max_m, H] contiguous, bf16 (e4m3 with ``quant_fp8``): ``rows[e, :min(counts[e], max_m)]`` are
          expert e's copies in (token, slot) order; the other rows are unspecified (the reference writes zeros).
        * row_scales: with ``quant_fp8``, [E, max_m, H/128] fp32, column-major per expert (the max_m dim innermost):
          strides ``(H/128 * m_pad, 1, m_pad)``, ``m_pad = round_up(max_m, 4)``; else an empty (0,) fp32 tensor.
        * counts: [E] int32, the copies routed to each expert, dropped ones included (may exceed max_m; the masked
          GEMM clamps).
        * token_row: [T, k] int32, ``e * max_m + position`` (a row of ``rows.view(-1, H)``), or -1 where the copy
          was dropped or not routed.
    """
    if not lib.use_kernel("dispatch_masked"):
        return _dispatch_masked_impl(hidden, topk_ids, num_experts, max_m, quant_fp8)
    if lib.value_checks_active(hidden, topk_ids):
        _check_dispatch_masked(hidden, topk_ids, num_experts, max_m, quant_fp8)
        _value_check_topk_ids("dispatch_masked", topk_ids, num_experts)
    return lib.op("dispatch_masked")(hidden, topk_ids, num_experts, max_m, quant_fp8)


def combine(
    expert_out: torch.Tensor,
    token_row: torch.Tensor,
    topk_weights: torch.Tensor,
    shared_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted sum of each token's expert outputs (plus the shared experts' output): the end of a MoE layer.

    Args:
        expert_out: [R, N] (contiguous dispatch) or [E, max_m, N] (masked dispatch) bf16 contiguous, N a positive
            multiple of 8; rows are addressed flat, as ``expert_out.view(-1, N)``.
        token_row: [T, k] int32 contiguous (k >= 1), as the dispatch returned it; negative entries are skipped (their
            rows are never read, so unspecified padding rows may hold anything, NaN included).
        topk_weights: [T, k] fp32 contiguous, as :func:`route` returned them.
        shared_out: [T, N] bf16 contiguous, or None.
    Returns:
        [T, N] bf16 contiguous: ``sum_{j: token_row[t, j] >= 0} topk_weights[t, j] * expert_out_flat[token_row[t, j]]
        + shared_out[t]``, accumulated in fp32 in slot order j = 0..k-1, the shared output added last, rounded to
        bf16 once (deterministic: reruns are bit-identical).
    """
    if not lib.use_kernel("combine"):
        return _combine_impl(expert_out, token_row, topk_weights, shared_out)
    if lib.value_checks_active(expert_out, token_row):
        _check_combine(expert_out, token_row, topk_weights, shared_out)
        _value_check_token_row(expert_out, token_row)
    return lib.op("combine")(expert_out, token_row, topk_weights, shared_out)
