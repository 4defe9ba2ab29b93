"""Expert parallelism (EP): MoE dispatch and combine between the ranks of a ``torch.distributed`` process group.

Rank r of W owns the ``L = E / W`` routed experts ``[r * L, (r + 1) * L)``. Every rank routes its own tokens over all
E experts (global ``topk_ids``), then::

    d = ep.dispatch(x, topk_ids, topk_weights, L)                 # prefill; or ep.dispatch_low_latency(..., max_tokens)
    y = grouped_gemms(d.rows, d.scales, d.row_expert)             # the local experts, as without EP
    out = ep.combine(y, d, shared_out)                            # [T, H] at home

How a token travels:
  * dispatch: a token goes **once to each rank** that owns at least one of its experts (not once per expert), with
    its ids there (local ids, -1 for the other slots) and its weights. FP8 experts get the e4m3 payload with its
    1x128 fp32 scales (``fp8.quant_per_token_group``), half the bytes of bf16. On the expert rank the received tokens
    are laid out by the local op (``moe.dispatch_contiguous`` / ``moe.dispatch_masked``), so ``d`` is exactly the
    input of the local experts' grouped GEMM: each local expert's copies in (source rank, token) order, which is the
    order a single-process dispatch of all ranks' tokens (concatenated rank after rank) gives that expert.
  * combine: on the expert rank, ``moe.combine`` reduces each received token's copies with their weights (fp32 sum,
    one rounding to the activation dtype) into one partial row, which goes back home: again one row per (token,
    rank), the same traffic as the dispatch. At home ``moe.combine`` (weights 1) sums the token's <= W partial rows
    in rank order and the shared experts' output, in fp32, rounded once. Versus a single process this adds one
    rounding of each partial (bf16: at most 2^-8 of the partial, i.e. the result may differ by one bf16 ulp); with
    fp32 activations only the order of the fp32 sums differs.

Two modes, as DeepEP has them:
  * ``dispatch`` (high throughput, prefill): messages sized to the routing. The per-destination token counts are
    exchanged first (an ``all_to_all_single`` of W integers) and read on the host to size the buffers: one host
    sync per MoE layer, acceptable in prefill. Output: the contiguous layout (``moe.dispatch_contiguous``).
  * ``dispatch_low_latency`` (decode): fixed buffers ``[W, max_tokens_per_rank, ...]`` whatever the routing; slot
    ``(w, t)`` carries token t to rank w (or nothing). Every shape is fixed, no host sync: CUDA-graph capturable.
    Output: the masked layout ``[L, max_m, H]`` + counts with ``max_m = W * max_tokens_per_rank``. Nothing is ever
    dropped: an expert receives at most one copy of each token (``moe.route`` never repeats an expert within a
    token), so at most W * max_tokens_per_rank copies; a source rank sends each rank at most ``max_tokens_per_rank``
    tokens, i.e. at most ``max_tokens_per_rank * min(top_k, L)`` copies. More than ``max_tokens_per_rank`` tokens on
    a rank is an error (a shape check, no sync). The price of fixed shapes: the whole buffer travels every step.

Transport: ``torch.distributed.all_to_all_single`` (NCCL on GPUs, gloo on CPU), two messages per direction of a
dispatch: the payload rows and an int32 row of routing metadata (local ids, and the weights' bits). Payloads travel
as bf16/fp32 tensors (FP8 rows with their scales are packed into bytes and viewed as bf16), dtypes every backend has.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from . import fp8, moe
from .fp8 import _empty_scales

QUANT_GROUP = moe.QUANT_GROUP  # 1 x 128 groups: the FP8 GEMMs' K group


@dataclasses.dataclass
class Dispatched:
    """The local experts' grouped-GEMM input (public fields) and what :func:`combine` needs to send results home.

    Contiguous (``dispatch``): ``rows`` [R, H], ``scales`` [R, H/128] column-major (FP8) or empty, ``offsets``
    [L + 1], ``row_expert`` [R] (local expert ids, -1 padding), as ``moe.dispatch_contiguous`` returns them.
    Masked (``dispatch_low_latency``): ``rows`` [L, max_m, H], ``scales`` [L, max_m, H/128] column-major per expert
    (FP8) or empty, ``counts`` [L], as ``moe.dispatch_masked`` returns them.
    """

    rows: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None = None
    row_expert: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    # for combine
    token_row: torch.Tensor | None = None  # [N_recv, k]: where each received (token, slot) copy sits in rows
    weights: torch.Tensor | None = None  # [N_recv, k] fp32, the received tokens' weights
    home_row: torch.Tensor | None = None  # [T, W]: row of combine's return buffer with rank w's partial, or -1
    send_splits: list[int] | None = None  # rows sent to each rank (None: low-latency, equal splits)
    recv_splits: list[int] | None = None


def _sent(topk_ids: torch.Tensor, num_local: int, world: int):
    """dest [T, k]: the rank owning each slot's expert (-1 where not routed); sent [T, W]: token t goes to rank w."""
    ids = topk_ids.long()
    dest = torch.where(ids >= 0, ids.div(num_local, rounding_mode="floor"), -1)
    ranks = torch.arange(world, device=ids.device)
    return dest, (dest.unsqueeze(-1) == ranks).any(1)


def _encode(x: torch.Tensor, quant_fp8: bool) -> torch.Tensor:
    """The rows to send: ``x`` itself, or with FP8 experts each row quantized (1x128 groups) and packed as
    ``[e4m3 bytes (H) | fp32 scales (H/32 bytes) | zero pad to 16 bytes]`` viewed as bf16, so the local dispatch op
    (which copies rows as 16-byte vectors, bit for bit) and every backend move it like any bf16 row."""
    if not quant_fp8:
        return x
    t, h = x.shape
    q, s = fp8.quant_per_token_group(x, QUANT_GROUP)
    packed = torch.zeros(t, row_bytes(h, True), dtype=torch.uint8, device=x.device)
    packed[:, :h] = q.view(torch.uint8)
    packed[:, h: h + 4 * (h // QUANT_GROUP)] = s.view(torch.uint8)
    return packed.view(torch.bfloat16)


def row_bytes(h: int, quant_fp8: bool, dtype=torch.bfloat16) -> int:
    """Bytes of one dispatched token row on the wire (FP8: e4m3 + scales, padded to 16 bytes; else ``dtype``)."""
    if not quant_fp8:
        return h * dtype.itemsize
    return (h + 4 * (h // QUANT_GROUP) + 15) // 16 * 16


def _decode_fp8(rows: torch.Tensor, h: int):
    """Packed rows ``[..., M, P]`` -> (e4m3 ``[..., M, H]`` contiguous, fp32 scales ``[..., M, H/128]`` in the
    column-major layout the FP8 GEMMs read)."""
    raw = rows.view(torch.uint8)
    q = raw[..., :h].view(fp8.FP8).contiguous()
    groups = h // QUANT_GROUP
    *lead, m, _ = raw.shape
    scales = _empty_scales(lead, m, groups, True, rows.device)
    scales.copy_(raw[..., h: h + 4 * groups].view(torch.float32))
    return q, scales


def _meta(local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One int32 row per message: the local ids, then the fp32 weights' bits (one collective for both)."""
    return torch.cat([local_ids.int(), weights.float().contiguous().view(torch.int32)], -1)


def _split_meta(meta: torch.Tensor, k: int):
    meta = meta.reshape(-1, 2 * k)
    return meta[:, :k].contiguous(), meta[:, k:].contiguous().view(torch.float32)


def _exchange(send: torch.Tensor, recv_splits, send_splits, group) -> torch.Tensor:
    """all_to_all_single; splits None: equal splits (send and receive the same shape)."""
    if send_splits is None:
        recv = torch.empty_like(send)
    else:
        recv = send.new_empty(sum(recv_splits), *send.shape[1:])
    dist.all_to_all_single(recv, send.contiguous(), recv_splits, send_splits, group=group)
    return recv


def dispatch(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_local_experts: int, *,
             alignment: int = 128, quant_fp8: bool = False, group=None, ops=moe) -> Dispatched:
    """High-throughput dispatch (prefill): each token to each rank owning one of its experts, received into the
    contiguous layout of the local experts (see the module docstring).

    Args:
        x: [T, H] activations (bf16 for the ops; fp32 with reference ops), T may differ per rank and be 0.
        topk_ids: [T, k] int32 global expert ids (< L * W; negative: not routed); topk_weights: [T, k] fp32.
        num_local_experts: L, the experts per rank.
        alignment, quant_fp8: as in ``moe.dispatch_contiguous`` (the FP8 rows are quantized before sending).
        ops: namespace with ``dispatch_contiguous``/``combine`` (the runner passes its op namespace).
    Returns:
        :class:`Dispatched` (contiguous fields). Syncs the host once (the counts).
    """
    world = dist.get_world_size(group)
    t, k = topk_ids.shape
    dest, sent = _sent(topk_ids, num_local_experts, world)
    send_counts = sent.sum(0)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    # Prefill mode: read the counts on the host to size the buffers (one sync per layer; decode has no such sync).
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
    dst, src = sent.T.nonzero(as_tuple=True)  # the (rank, token) messages, rank-major: the send buffer's order
    ids = topk_ids[src].long()
    local_ids = torch.where(dest[src] == dst.unsqueeze(1), ids - dst.unsqueeze(1) * num_local_experts, -1)
    recv = _exchange(_encode(x, quant_fp8)[src], recv_splits, send_splits, group)
    recv_ids, recv_weights = _split_meta(_exchange(_meta(local_ids, topk_weights[src]), recv_splits, send_splits,
                                                   group), k)
    rows, scales, offsets, row_expert, token_row = ops.dispatch_contiguous(recv, recv_ids, num_local_experts,
                                                                           alignment, False)
    if quant_fp8:
        rows, scales = _decode_fp8(rows, x.shape[1])
    home_row = torch.full((t, world), -1, dtype=torch.int32, device=x.device)
    home_row[src, dst] = torch.arange(src.numel(), dtype=torch.int32, device=x.device)
    return Dispatched(rows, scales, offsets=offsets, row_expert=row_expert, token_row=token_row,
                      weights=recv_weights, home_row=home_row, send_splits=send_splits, recv_splits=recv_splits)


def dispatch_low_latency(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_local_experts: int,
                         max_tokens_per_rank: int, *, quant_fp8: bool = False, group=None, ops=moe) -> Dispatched:
    """Low-latency dispatch (decode): fixed-size buffers, no host sync, CUDA-graph capturable; received into the
    masked layout ``[L, W * max_tokens_per_rank, H]`` + counts (see the module docstring).

    Args: as :func:`dispatch`, plus ``max_tokens_per_rank`` (the same on every rank): T <= it, else ValueError.
    """
    t, k = topk_ids.shape
    if t > max_tokens_per_rank:
        raise ValueError(f"dispatch_low_latency: {t} tokens on this rank exceed max_tokens_per_rank="
                         f"{max_tokens_per_rank} (the fixed buffer size; raise it, or split the batch)")
    world = dist.get_world_size(group)
    m, h = max_tokens_per_rank, x.shape[1]
    dest, sent = _sent(topk_ids, num_local_experts, world)
    payload = _encode(x, quant_fp8)
    send = payload.new_zeros(world, m, payload.shape[1])
    send[:, :t] = payload  # every rank's slot t holds token t; the receiver ignores slots whose ids are all -1
    ranks = torch.arange(world, device=x.device).view(world, 1, 1)
    local_ids = torch.where(dest == ranks, topk_ids.long() - ranks * num_local_experts, -1)  # [W, T, k]
    meta = torch.full((world, m, 2 * k), -1, dtype=torch.int32, device=x.device)
    meta[:, :t] = _meta(local_ids, topk_weights.expand(world, t, k))
    recv = _exchange(send, None, None, group).view(world * m, -1)
    recv_ids, recv_weights = _split_meta(_exchange(meta, None, None, group), k)
    rows, scales, counts, token_row = ops.dispatch_masked(recv, recv_ids, num_local_experts, world * m, False)
    if quant_fp8:
        rows, scales = _decode_fp8(rows, h)
    slot = torch.arange(world, device=x.device) * m + torch.arange(t, device=x.device).unsqueeze(1)
    home_row = torch.where(sent, slot, -1).int()
    return Dispatched(rows, scales, counts=counts, token_row=token_row, weights=recv_weights, home_row=home_row)


def combine(expert_out: torch.Tensor, d: Dispatched, shared_out: torch.Tensor | None = None, *, group=None,
            ops=moe) -> torch.Tensor:
    """Both modes: the experts' output (``[R, H]`` or ``[L, max_m, H]``, rows as in ``d``) back to each token's home
    rank as ``sum_j topk_weights[t, j] * expert_out(t, j) + shared_out[t]`` ([T, H]).

    Weights are applied on the expert rank in fp32 (one partial row per token and rank, rounded to the activation
    dtype); home sums the partials and ``shared_out`` in fp32 and rounds once. Low-latency ``d``: no host sync.
    """
    partial = ops.combine(expert_out, d.token_row, d.weights, None)
    back = _exchange(partial, d.send_splits, d.recv_splits, group)  # row i: the partial of the message sent as row i
    ones = torch.ones(d.home_row.shape, dtype=torch.float32, device=d.home_row.device)
    return ops.combine(back, d.home_row, ones, shared_out)
