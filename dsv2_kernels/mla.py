"""Multi-head latent attention (MLA) ops: ``rope_q``, ``compress_kv``, ``decode_attention``, ``prefill_attention``,
``merge_attention_states`` (CUDA kernels in ``csrc/mla/``), and the plain helpers ``rope_cos_sin_cache``,
``softmax_scale``, ``yarn_get_mscale`` and ``dequant_kv_cache``.

DeepSeek-V2 sizes: kv_lora_rank 512 (the compressed latent ``c_kv``), qk_rope_head_dim 64 (the decoupled RoPE part,
one ``k_pe`` shared by all heads), qk_nope_head_dim 128, v_head_dim 128. One latent-cache row holds ``[c_kv | k_pe]``
= 576 values per token. Decode runs "absorbed" MLA: the query is projected into the latent space
(``q = [q_nope @ W_UK | q_pe]``, 576 wide), keys are whole cache rows and values their first 512 columns; the output
(512 wide, per head) is projected back by ``W_UV`` outside these ops. Prefill runs ordinary attention over up-projected
keys/values (qk dim 192 = 128 + 64, v dim 128).

RoPE layout ("DeepSeek interleaved-pair RoPE"). For a 64-dim vector ``x`` at position ``p``, pair ``i`` is
``(x[2i], x[2i+1])``, rotated by the angle ``p * inv_freq[i]``::

    out[2i]   = x[2i] * cos - x[2i+1] * sin
    out[2i+1] = x[2i+1] * cos + x[2i] * sin

and the output stays interleaved: this is the complex product ``(x[2i] + j x[2i+1]) * e^(j p inv_freq[i])``, the form
of the ``transformers`` DeepseekV2 code. DeepSeek's original modeling_deepseek.py first de-interleaves the vector
(``[x0, x2, ..., x62, x1, x3, ..., x63]``) and then applies rotate_half RoPE; its output holds the same numbers in that
de-interleaved order. Queries and keys are permuted alike, so every ``q_pe . k_pe`` (all attention sees) is identical.

Conventions shared by the attention ops: scores are ``q . k * softmax_scale`` in fp32, ``lse`` is the natural-log
logsumexp of the scaled scores over the keys a query sees, and a query that sees no key has ``out = 0`` and
``lse = +inf`` (so that ``merge_attention_states`` gives it weight zero).
"""

from __future__ import annotations

import math

import torch

from . import _library as lib
from .checks import FP8, check, check_index_range, check_same_device, check_tensor, fail

KV_LORA_RANK = 512
ROPE_DIM = 64
KV_DIM = KV_LORA_RANK + ROPE_DIM  # 576: one latent-cache row
QK_HEAD_DIM, V_HEAD_DIM = 192, 128  # prefill's per-head query/key (128 nope + 64 rope) and value widths
FP8_MAX = 448.0
# Floor of the amax in the FP8 cache scales: an all-zero part gets a tiny (but normal fp32) scale instead of 0.
_AMAX_FLOOR = 1e-10
_INDEX_DTYPES = (torch.int32, torch.int64)
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Largest fp32 score block (elements) the attention references materialise at once, so they stay usable on a GPU
# for long sequences and many heads.
_SCORE_BLOCK_ELEMS = 1 << 26


# ---- helpers (plain functions, not ops) ------------------------------------------------------------------------
def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN attention-magnitude factor: ``0.1 * mscale * ln(scale) + 1`` for ``scale > 1``, else 1."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _rope_type(rope_scaling: dict | None) -> str:
    if not rope_scaling:
        return "default"
    return rope_scaling.get("type", rope_scaling.get("rope_type", "default"))


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    # The dimension index whose frequency completes `num_rotations` turns over `max_pos` positions.
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def _rope_inv_freq(rope_dim: int, base: float, rope_scaling: dict | None, device) -> tuple[torch.Tensor, float]:
    """(inv_freq [rope_dim/2] fp32, cos/sin multiplier), computed in fp32 in the order DeepSeek's code does."""
    exponents = torch.arange(0, rope_dim, 2, dtype=torch.float32, device=device) / rope_dim
    kind = _rope_type(rope_scaling)
    if kind == "default":
        return 1.0 / (base**exponents), 1.0
    if kind != "yarn":
        raise ValueError(f"dsv2_kernels.rope_cos_sin_cache: unsupported rope_scaling type {kind!r} (default or yarn)")
    factor = float(rope_scaling["factor"])
    original_max = rope_scaling.get("original_max_position_embeddings", 4096)
    beta_fast, beta_slow = rope_scaling.get("beta_fast", 32), rope_scaling.get("beta_slow", 1)
    mscale, mscale_all_dim = rope_scaling.get("mscale", 1), rope_scaling.get("mscale_all_dim", 0)

    freq_extra = 1.0 / (base**exponents)  # original frequencies (extrapolation)
    freq_inter = 1.0 / (factor * base**exponents)  # frequencies divided by the factor (interpolation)
    # Dimensions below `low` turn fast enough to keep their frequency; above `high` they are interpolated; between,
    # a linear ramp blends the two.
    low = max(math.floor(_yarn_correction_dim(beta_fast, rope_dim, base, original_max)), 0)
    high = min(math.ceil(_yarn_correction_dim(beta_slow, rope_dim, base, original_max)), rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extra_weight = 1.0 - ramp
    inv_freq = freq_inter * (1 - extra_weight) + freq_extra * extra_weight
    return inv_freq, float(yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim))


def rope_cos_sin_cache(
    rope_dim: int = ROPE_DIM,
    max_position: int = 163840,
    base: float = 10000.0,
    rope_scaling: dict | None = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """The cos/sin table that ``rope_q`` and ``compress_kv`` read.

    Args:
        rope_dim: rotated dimensions (64 for DeepSeek-V2).
        max_position: rows of the table (DeepSeek-V2's max_position_embeddings is 163840).
        base: rope_theta.
        rope_scaling: the config's ``rope_scaling`` dict or None. ``{"type" (or "rope_type"): "yarn", "factor",
            "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}`` gives YaRN
            exactly as DeepSeek-V2's DeepseekV2YarnRotaryEmbedding (same defaults for missing keys: 4096, 32, 1, 1, 0).
    Returns:
        [max_position, rope_dim] contiguous: row ``p`` = ``[cos(p * inv_freq) | sin(p * inv_freq)]`` times the YaRN
        multiplier ``yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)`` (1 without YaRN),
        with ``inv_freq[i] = base^(-2i/rope_dim)`` (YaRN blends it with ``inv_freq / factor``). Computed in fp32 as
        DeepSeek's code does (angles ``p * inv_freq`` rounded to fp32), then cast to ``dtype``.
    """
    if rope_dim <= 0 or rope_dim % 2:
        raise ValueError(f"dsv2_kernels.rope_cos_sin_cache: rope_dim must be even and > 0, got {rope_dim}")
    inv_freq, multiplier = _rope_inv_freq(rope_dim, base, rope_scaling, device)
    t = torch.arange(max_position, dtype=torch.float32, device=device)
    angles = torch.outer(t, inv_freq)
    return torch.cat((angles.cos() * multiplier, angles.sin() * multiplier), dim=-1).to(dtype).contiguous()


def softmax_scale(qk_head_dim: int = 192, rope_scaling: dict | None = None) -> float:
    """DeepSeek-V2's attention scale: ``qk_head_dim^-0.5``, times ``yarn_get_mscale(factor, mscale_all_dim)^2`` when
    ``rope_scaling`` sets a non-zero ``mscale_all_dim`` (as DeepSeek's code does). Use the qk head dim of the
    un-absorbed model (192) for decode too: absorption does not change the scores."""
    scale = qk_head_dim**-0.5
    if rope_scaling and rope_scaling.get("mscale_all_dim", 0):
        m = yarn_get_mscale(float(rope_scaling["factor"]), rope_scaling["mscale_all_dim"])
        scale = scale * m * m
    return scale


def dequant_kv_cache(kv_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> torch.Tensor:
    """Latent-cache rows [..., 576] (bf16, or e4m3 with scales [..., 2]) -> fp32 [..., 576] values."""
    if kv_scale is None:
        return kv_cache.float()
    vals = kv_cache.float()
    return torch.cat(
        (vals[..., :KV_LORA_RANK] * kv_scale[..., 0:1].float(), vals[..., KV_LORA_RANK:] * kv_scale[..., 1:2].float()),
        dim=-1,
    )


def _raw(t: torch.Tensor) -> torch.Tensor:
    # FP8 caches are gathered/scattered as bytes: index and index_put need not support float8 on every backend.
    return t.view(torch.uint8) if t.dtype == FP8 else t


def _rope_fp32(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair RoPE of x [T, ..., 64] at positions [T], in fp32."""
    half = x.size(-1) // 2
    cs = cos_sin_cache.float()[positions.long()]
    cs = cs.view(cs.size(0), *([1] * (x.dim() - 2)), cs.size(-1))  # broadcast over middle dims (heads)
    cos, sin = cs[..., :half], cs[..., half:]
    pairs = x.float().unflatten(-1, (half, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)


# ---- references ------------------------------------------------------------------------------------------------
def rope_q_ref(q_pe: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    return _rope_fp32(q_pe, positions, cos_sin_cache).to(q_pe.dtype)


def compress_kv_ref(
    kv_a, norm_weight, eps, positions, cos_sin_cache, slot_mapping, kv_cache, kv_scale, return_normed
) -> tuple[torch.Tensor, torch.Tensor]:
    xf = kv_a.float()
    c = xf[:, :KV_LORA_RANK]
    c = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    k_pe = _rope_fp32(xf[:, KV_LORA_RANK:], positions, cos_sin_cache)

    if kv_cache.dtype == FP8:
        # Quantized from the fp32 values (not from their bf16 rounding): one rounding, to e4m3, in the cache.
        c_scale = c.abs().amax(-1, keepdim=True).clamp_min(_AMAX_FLOOR) / FP8_MAX
        k_scale = k_pe.abs().amax(-1, keepdim=True).clamp_min(_AMAX_FLOOR) / FP8_MAX
        row = torch.cat((c / c_scale, k_pe / k_scale), dim=-1).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        _scatter_rows(kv_scale.view(-1, 2), slot_mapping, torch.cat((c_scale, k_scale), dim=-1))
    else:
        row = torch.cat((c, k_pe), dim=-1).to(kv_cache.dtype)
    _scatter_rows(_raw(kv_cache).view(-1, KV_DIM), slot_mapping, _raw(row))

    if not return_normed:
        empty = kv_a.new_empty((0,))
        return empty, empty.clone()
    return c.to(kv_a.dtype), k_pe.to(kv_a.dtype)


def _scatter_rows(dst: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """dst[slots[t]] = rows[t] for slots[t] >= 0, with no host sync (so it can be captured in a CUDA graph).

    A skipped token (slot < 0) re-writes the row of the first kept token to that token's slot: a duplicate write of
    identical bytes, harmless in any order. When no token is kept, a row is re-written with its own old content.
    """
    if slots.numel() == 0:
        return
    keep = slots >= 0
    first = torch.argmax(keep.to(torch.int32))  # first kept token, or 0 when none is kept
    src = torch.where(keep, torch.arange(slots.numel(), device=slots.device), first)
    index = slots[src].long().clamp_min(0)
    values = torch.where(keep.any(), rows[src], dst[index])
    dst[index] = values


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, first_visible_end: int | None):
    """One sequence, fp32: q [lq, H, D], k [lk, H or 1, D], v [lk, H or 1, Dv] -> (out [lq, H, Dv], lse [H, lq]).

    Query i sees keys j < lk, and with ``first_visible_end`` set (causal), only keys j < first_visible_end + i.
    """
    lq, heads = q.shape[0], q.shape[1]
    lk = k.shape[0]
    out = q.new_zeros(lq, heads, v.shape[-1], dtype=torch.float32)
    lse = q.new_full((heads, lq), float("inf"), dtype=torch.float32)
    if lq == 0 or lk == 0:
        return out, lse
    kf, vf = k.float().transpose(0, 1), v.float().transpose(0, 1)  # [H or 1, lk, D]
    rows = max(1, _SCORE_BLOCK_ELEMS // (heads * lk))
    for r0 in range(0, lq, rows):
        qf = q[r0 : r0 + rows].float().transpose(0, 1)  # [H, r, D]
        scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [H, r, lk]
        if first_visible_end is not None:
            ends = first_visible_end + torch.arange(r0, r0 + qf.shape[1], device=q.device)
            visible = torch.arange(lk, device=q.device)[None, :] < ends[:, None]
            scores = scores.masked_fill(~visible, float("-inf"))
        m = scores.amax(-1, keepdim=True)
        empty = m == float("-inf")
        m = m.masked_fill(empty, 0.0)
        p = torch.exp(scores - m)
        denom = p.sum(-1, keepdim=True)
        o = torch.matmul(p, vf) / denom.clamp_min(1e-30)  # denom >= 1 wherever a key is visible
        out[r0 : r0 + rows] = o.masked_fill(empty, 0.0).transpose(0, 1)
        lse[:, r0 : r0 + rows] = (m + denom.log()).masked_fill(empty, float("inf")).squeeze(-1)
    return out, lse


def decode_attention_ref(q, kv_cache, kv_scale, block_table, cache_seqlens, softmax_scale, causal):
    # Written without host syncs (no .tolist(), no boolean indexing), so the runner can capture the reference decode
    # step in a CUDA graph: every batch entry gathers all max_blocks pages of its table and masks what it may not see.
    batch, s_q, heads, _ = q.shape
    num_blocks, block_size = kv_cache.shape[:2]
    span = block_table.shape[1] * block_size
    out = q.new_empty(batch, s_q, heads, KV_LORA_RANK)
    lse = q.new_empty(batch, heads, s_q, dtype=torch.float32)
    pos = torch.arange(span, device=q.device)
    # Query i (of s_q) sits at position L - s_q + i and, when causal, sees keys j <= that position.
    shift = (s_q - 1 - torch.arange(s_q, device=q.device)) if causal else torch.zeros(s_q, device=q.device)
    chunk = max(1, _SCORE_BLOCK_ELEMS // max(1, span * max(KV_DIM, heads * s_q)))
    for b0 in range(0, batch, chunk):
        b1 = min(batch, b0 + chunk)
        # Entries past a sequence's last page may hold anything: clamp them to a real page, masked below.
        pages = block_table[b0:b1].long().clamp(0, num_blocks - 1)
        rows = dequant_kv_cache(_raw(kv_cache)[pages].view(kv_cache.dtype),
                                None if kv_scale is None else kv_scale[pages]).reshape(b1 - b0, span, KV_DIM)
        length = cache_seqlens[b0:b1].long()
        rows = torch.where((pos[None, :] < length[:, None])[..., None], rows, 0.0)  # unused slots may be NaN
        visible = pos[None, None, :] < (length[:, None] - shift[None, :])[..., None]  # [b, s_q, span]
        scores = torch.einsum("bqhd,bsd->bhqs", q[b0:b1].float(), rows) * softmax_scale
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        m = scores.amax(-1, keepdim=True)
        empty = m == float("-inf")  # no visible key: out 0, lse +inf
        p = torch.exp(scores - m.masked_fill(empty, 0.0))
        denom = p.sum(-1, keepdim=True)
        o = torch.einsum("bhqs,bsd->bqhd", p / denom.clamp_min(1e-30), rows[..., :KV_LORA_RANK])
        out[b0:b1] = o.to(out.dtype)
        lse[b0:b1] = (m + denom.log()).masked_fill(empty, float("inf")).squeeze(-1)
    return out, lse


def prefill_attention_ref(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal
):
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    lse = q.new_full((q.shape[1], q.shape[0]), float("inf"), dtype=torch.float32)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        # Causal mask aligned at the end: query i of lq sees keys j <= lk - lq + i (a cached prefix is all visible).
        first_end = (k1 - k0) - (q1 - q0) + 1 if causal else None
        o, l = _attend(q[q0:q1], k[k0:k1], v[k0:k1], softmax_scale, first_end)
        out[q0:q1], lse[:, q0:q1] = o.to(out.dtype), l
    return out, lse


def merge_attention_states_ref(out_a, lse_a, out_b, lse_b):
    # +inf (our "no key seen") and -inf (log of an empty sum) both mean an empty part: weight 0, out not read.
    la, lb = lse_a.float(), lse_b.float()
    la = la.masked_fill(la.isinf(), float("-inf"))
    lb = lb.masked_fill(lb.isinf(), float("-inf"))
    m = torch.maximum(la, lb)
    both_empty = m == float("-inf")
    m = m.masked_fill(both_empty, 0.0)
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    total = wa + wb
    lse = (m + total.log()).masked_fill(both_empty, float("inf"))
    wa = (wa / total).t().unsqueeze(-1)  # [T, H, 1]
    wb = (wb / total).t().unsqueeze(-1)
    part_a = torch.where(wa > 0, out_a.float() * wa, 0.0)
    part_b = torch.where(wb > 0, out_b.float() * wb, 0.0)
    out = (part_a + part_b).masked_fill(both_empty.t().unsqueeze(-1), 0.0)
    return out.to(out_a.dtype), lse


# ---- checks, value checks and fakes ----------------------------------------------------------------------------
def _check_positions(op: str, positions, cos_sin_cache, tokens: int):
    check_tensor(op, "positions", positions, dtype=_INDEX_DTYPES, shape=(tokens,))
    check_tensor(op, "cos_sin_cache", cos_sin_cache, dtype=torch.float32, shape=(None, ROPE_DIM), contiguous=True)


def _check_rope_q(q_pe, positions, cos_sin_cache):
    op = "rope_q"
    check_tensor(op, "q_pe", q_pe, dtype=(torch.bfloat16, torch.float32), shape=(None, None, ROPE_DIM),
                 last_dim_contiguous=True)
    _check_positions(op, positions, cos_sin_cache, q_pe.shape[0])
    check_same_device(op, q_pe=q_pe, positions=positions, cos_sin_cache=cos_sin_cache)


def _value_check_rope_q(q_pe, positions, cos_sin_cache):
    check_index_range("rope_q", "positions", positions, 0, cos_sin_cache.shape[0])


def _check_kv_cache(op: str, kv_cache, kv_scale):
    check_tensor(op, "kv_cache", kv_cache, dtype=(torch.bfloat16, FP8), shape=(None, None, KV_DIM), contiguous=True)
    if kv_cache.dtype == FP8:
        if kv_scale is None:
            fail(op, "kv_scale", "is required with a float8_e4m3fn kv_cache")
        check_tensor(op, "kv_scale", kv_scale, dtype=torch.float32, shape=(*kv_cache.shape[:2], 2), contiguous=True)
    elif kv_scale is not None:
        fail(op, "kv_scale", "must be None with a bfloat16 kv_cache")


def _check_compress_kv(kv_a, norm_weight, eps, positions, cos_sin_cache, slot_mapping, kv_cache, kv_scale):
    op = "compress_kv"
    check_tensor(op, "kv_a", kv_a, dtype=torch.bfloat16, shape=(None, KV_DIM), last_dim_contiguous=True)
    tokens = kv_a.shape[0]
    check_tensor(op, "norm_weight", norm_weight, dtype=_FLOAT_DTYPES, shape=(KV_LORA_RANK,), contiguous=True)
    check(op, "eps", eps > 0, f"must be > 0, got {eps}")
    _check_positions(op, positions, cos_sin_cache, tokens)
    check_tensor(op, "slot_mapping", slot_mapping, dtype=_INDEX_DTYPES, shape=(tokens,))
    _check_kv_cache(op, kv_cache, kv_scale)
    check_same_device(op, kv_a=kv_a, norm_weight=norm_weight, positions=positions, cos_sin_cache=cos_sin_cache,
                      slot_mapping=slot_mapping, kv_cache=kv_cache, kv_scale=kv_scale)


def _value_check_compress_kv(positions, cos_sin_cache, slot_mapping, kv_cache):
    check_index_range("compress_kv", "positions", positions, 0, cos_sin_cache.shape[0])
    slots = kv_cache.shape[0] * kv_cache.shape[1]
    check_index_range("compress_kv", "slot_mapping", slot_mapping, 0, slots, ignore_negative=True)


def _check_decode_attention(q, kv_cache, kv_scale, block_table, cache_seqlens, softmax_scale):
    op = "decode_attention"
    check_tensor(op, "q", q, dtype=torch.bfloat16, shape=(None, None, None, KV_DIM), last_dim_contiguous=True)
    _check_kv_cache(op, kv_cache, kv_scale)
    check_tensor(op, "block_table", block_table, dtype=torch.int32, shape=(q.shape[0], None), last_dim_contiguous=True)
    check_tensor(op, "cache_seqlens", cache_seqlens, dtype=torch.int32, shape=(q.shape[0],), contiguous=True)
    check(op, "softmax_scale", softmax_scale > 0 and math.isfinite(softmax_scale),
          f"must be finite and > 0, got {softmax_scale}")
    check_same_device(op, q=q, kv_cache=kv_cache, kv_scale=kv_scale, block_table=block_table,
                      cache_seqlens=cache_seqlens)


def _value_check_decode_attention(kv_cache, block_table, cache_seqlens):
    op, block_size = "decode_attention", kv_cache.shape[1]
    check_index_range(op, "cache_seqlens", cache_seqlens, 0, block_table.shape[1] * block_size + 1)
    # Only the pages covering tokens [0, L) are read, so only those entries must be valid page indices.
    pages_used = (cache_seqlens.long() + block_size - 1) // block_size
    used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < pages_used[:, None]
    check_index_range(op, "block_table", block_table[used], 0, kv_cache.shape[0])


def _check_prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    op = "prefill_attention"
    check_tensor(op, "q", q, dtype=_FLOAT_DTYPES, ndim=3, last_dim_contiguous=True)
    tq, heads, d_qk = q.shape
    check_tensor(op, "k", k, dtype=q.dtype, shape=(None, heads, d_qk), last_dim_contiguous=True)
    check_tensor(op, "v", v, dtype=q.dtype, shape=(k.shape[0], heads, None), last_dim_contiguous=True)
    check_tensor(op, "cu_seqlens_q", cu_seqlens_q, dtype=torch.int32, ndim=1, contiguous=True)
    check(op, "cu_seqlens_q", cu_seqlens_q.shape[0] >= 1, "must hold at least one entry (the leading 0)")
    check_tensor(op, "cu_seqlens_k", cu_seqlens_k, dtype=torch.int32, shape=cu_seqlens_q.shape, contiguous=True)
    check(op, "max_seqlen_q", max_seqlen_q >= 0, f"must be >= 0, got {max_seqlen_q}")
    check(op, "max_seqlen_k", max_seqlen_k >= 0, f"must be >= 0, got {max_seqlen_k}")
    check(op, "softmax_scale", softmax_scale > 0 and math.isfinite(softmax_scale),
          f"must be finite and > 0, got {softmax_scale}")
    check_same_device(op, q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)


def _value_check_cu_seqlens(arg: str, cu: torch.Tensor, total: int, max_seqlen: int, max_arg: str):
    op = "prefill_attention"
    vals = cu.tolist()
    check(op, arg, vals[0] == 0, f"must start at 0, got {vals[0]}")
    check(op, arg, vals[-1] == total, f"must end at the token count {total}, got {vals[-1]}")
    lengths = [b - a for a, b in zip(vals, vals[1:])]
    check(op, arg, all(n >= 0 for n in lengths), f"must be non-decreasing, got {vals}")
    longest = max(lengths, default=0)
    check(op, max_arg, longest <= max_seqlen, f"is {max_seqlen}, less than the longest sequence ({longest})")


def _value_check_prefill_attention(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    _value_check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
    _value_check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")


def _check_merge_attention_states(out_a, lse_a, out_b, lse_b):
    op = "merge_attention_states"
    check_tensor(op, "out_a", out_a, dtype=_FLOAT_DTYPES, ndim=3, last_dim_contiguous=True)
    tokens, heads, _ = out_a.shape
    check_tensor(op, "out_b", out_b, dtype=out_a.dtype, shape=tuple(out_a.shape), last_dim_contiguous=True)
    check_tensor(op, "lse_a", lse_a, dtype=torch.float32, shape=(heads, tokens), last_dim_contiguous=True)
    check_tensor(op, "lse_b", lse_b, dtype=torch.float32, shape=(heads, tokens), last_dim_contiguous=True)
    check_same_device(op, out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)


def _rope_q_impl(q_pe, positions, cos_sin_cache):
    _check_rope_q(q_pe, positions, cos_sin_cache)
    if lib.value_checks_active(q_pe):
        _value_check_rope_q(q_pe, positions, cos_sin_cache)
    return rope_q_ref(q_pe, positions, cos_sin_cache)


def _rope_q_fake(q_pe, positions, cos_sin_cache):
    _check_rope_q(q_pe, positions, cos_sin_cache)
    return torch.empty(q_pe.shape, dtype=q_pe.dtype, device=q_pe.device)


def _compress_kv_impl(kv_a, norm_weight, eps, positions, cos_sin_cache, slot_mapping, kv_cache, kv_scale,
                      return_normed):
    _check_compress_kv(kv_a, norm_weight, eps, positions, cos_sin_cache, slot_mapping, kv_cache, kv_scale)
    if lib.value_checks_active(kv_a):
        _value_check_compress_kv(positions, cos_sin_cache, slot_mapping, kv_cache)
    return compress_kv_ref(kv_a, norm_weight, eps, positions, cos_sin_cache, slot_mapping, kv_cache, kv_scale,
                           return_normed)


def _compress_kv_fake(kv_a, norm_weight, eps, positions, cos_sin_cache, slot_mapping, kv_cache, kv_scale,
                      return_normed):
    _check_compress_kv(kv_a, norm_weight, eps, positions, cos_sin_cache, slot_mapping, kv_cache, kv_scale)
    if not return_normed:
        return kv_a.new_empty((0,)), kv_a.new_empty((0,))
    return kv_a.new_empty((kv_a.shape[0], KV_LORA_RANK)), kv_a.new_empty((kv_a.shape[0], ROPE_DIM))


def _decode_attention_impl(q, kv_cache, kv_scale, block_table, cache_seqlens, softmax_scale, causal):
    _check_decode_attention(q, kv_cache, kv_scale, block_table, cache_seqlens, softmax_scale)
    if lib.value_checks_active(q):
        _value_check_decode_attention(kv_cache, block_table, cache_seqlens)
    return decode_attention_ref(q, kv_cache, kv_scale, block_table, cache_seqlens, softmax_scale, causal)


def _decode_attention_fake(q, kv_cache, kv_scale, block_table, cache_seqlens, softmax_scale, causal):
    _check_decode_attention(q, kv_cache, kv_scale, block_table, cache_seqlens, softmax_scale)
    batch, s_q, heads, _ = q.shape
    out = q.new_empty((batch, s_q, heads, KV_LORA_RANK))
    return out, q.new_empty((batch, heads, s_q), dtype=torch.float32)


def _prefill_attention_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    _check_prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)
    if lib.value_checks_active(q):
        _value_check_prefill_attention(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return prefill_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                 causal)


def _prefill_attention_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    _check_prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))
    return out, q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _merge_attention_states_impl(out_a, lse_a, out_b, lse_b):
    _check_merge_attention_states(out_a, lse_a, out_b, lse_b)
    return merge_attention_states_ref(out_a, lse_a, out_b, lse_b)


def _merge_attention_states_fake(out_a, lse_a, out_b, lse_b):
    _check_merge_attention_states(out_a, lse_a, out_b, lse_b)
    return torch.empty(out_a.shape, dtype=out_a.dtype, device=out_a.device), torch.empty(
        lse_a.shape, dtype=torch.float32, device=lse_a.device
    )


lib.register("rope_q", _rope_q_impl, _rope_q_fake)
lib.register("compress_kv", _compress_kv_impl, _compress_kv_fake)
lib.register("decode_attention", _decode_attention_impl, _decode_attention_fake)
lib.register("prefill_attention", _prefill_attention_impl, _prefill_attention_fake)
lib.register("merge_attention_states", _merge_attention_states_impl, _merge_attention_states_fake)


def _kernel_runs(name: str, t: torch.Tensor) -> bool:
    # The op reaches a C++ kernel, which does no value checks: the wrapper does them (the reference impl does its own).
    return t.is_cuda and lib.has_cuda_kernel(name) and lib.value_checks_active(t)


# ---- public wrappers -------------------------------------------------------------------------------------------
def rope_q(q_pe: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """DeepSeek interleaved-pair RoPE of the query's rope part (see the module docstring for the layout).

    Args:
        q_pe: [T, H, 64] bf16/fp32, last dimension contiguous (e.g. ``q[..., 128:]`` of a [T, H, 192] query).
        positions: [T] int64/int32, each in [0, cos_sin_cache rows).
        cos_sin_cache: [max_position, 64] fp32 contiguous, from :func:`rope_cos_sin_cache`.
    Returns:
        [T, H, 64] contiguous, dtype of ``q_pe``: pair i of token t rotated by angle row ``positions[t]``, column i,
        computed in fp32 and rounded once.
    """
    if not lib.use_kernel("rope_q"):
        return _rope_q_impl(q_pe, positions, cos_sin_cache)
    if _kernel_runs("rope_q", q_pe):
        _check_rope_q(q_pe, positions, cos_sin_cache)
        _value_check_rope_q(q_pe, positions, cos_sin_cache)
    return lib.op("rope_q")(q_pe, positions, cos_sin_cache)


def compress_kv(
    kv_a: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
    return_normed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Finish the KV down-projection and append it to the paged latent cache, in one pass.

    ``c = RMSNorm(kv_a[:, :512]) * norm_weight`` (fp32, as ``norm.rms_norm``) and ``k_pe = rope(kv_a[:, 512:])``
    (fp32, layout of :func:`rope_q`); row ``[c | k_pe]`` of token t goes to cache slot ``slot_mapping[t]``, i.e.
    ``kv_cache.view(-1, 576)[slot]`` (page ``slot // block_size``, offset ``slot % block_size``). Tokens with a
    negative slot are not written (padding). Slots must be distinct; other slots are left untouched.

    Args:
        kv_a: [T, 576] bf16, last dimension contiguous (rows may be strided): the output of kv_a_proj_with_mqa.
        norm_weight: [512] (kv_a_layernorm.weight), any float dtype; eps: its epsilon (> 0).
        positions: [T] int64/int32 in [0, cos_sin_cache rows); cos_sin_cache: [max_position, 64] fp32.
        slot_mapping: [T] int64/int32, < num_blocks * block_size, or negative to skip.
        kv_cache: [num_blocks, block_size, 576] contiguous, written in place. bf16: the fp32 values rounded once.
            float8_e4m3fn: each part quantized from the fp32 values with its own per-token scale,
            ``kv_scale[..., 0] = max(amax|c|, 1e-10) / 448`` for the 512 ``c`` values and ``kv_scale[..., 1]`` the same
            over the 64 ``k_pe`` values (so the small RoPE part keeps its own resolution); stored ``v / scale``
            (always within +-448). See :func:`dequant_kv_cache`.
        kv_scale: [num_blocks, block_size, 2] fp32 contiguous, written in place; required with an FP8 cache, None
            with a bf16 one.
        return_normed: also return ``c`` and ``k_pe`` (needed by prefill's up-projection).
    Returns:
        ``(c_kv [T, 512], k_pe [T, 64])`` in the dtype of ``kv_a`` (the fp32 values rounded once; equal to the bf16
        cache rows) when ``return_normed``, else two empty tensors of shape (0,).
    """
    args = (kv_a, norm_weight, eps, positions, cos_sin_cache, slot_mapping, kv_cache, kv_scale, return_normed)
    if not lib.use_kernel("compress_kv"):
        return _compress_kv_impl(*args)
    if _kernel_runs("compress_kv", kv_a):
        _check_compress_kv(*args[:-1])
        _value_check_compress_kv(positions, cos_sin_cache, slot_mapping, kv_cache)
    return lib.op("compress_kv")(*args)


def decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    kv_scale: torch.Tensor | None,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed-MLA attention of new queries over the paged latent cache (decode, speculative decode).

    Every head shares one key/value stream: key = the whole cache row (576), value = its first 512 columns. Token j
    of sequence b is row ``kv_cache[block_table[b, j // block_size], j % block_size]``; the sequence holds
    ``L = cache_seqlens[b]`` tokens (only the pages covering them are read: unused pages/entries may hold anything).
    Scores ``q . k * softmax_scale`` in fp32 (FP8 rows dequantized with ``kv_scale``). With ``causal`` and s_q > 1,
    query i sits at position ``L - s_q + i`` (the new tokens are the last s_q of the cache) and sees keys j <= it;
    otherwise every query sees all L keys. Requests with fewer new tokens n_b < s_q (speculative decoding with a
    per-request draft length) place their n_b queries last in their s_q rows (right-aligned): query s_q - n_b + t then
    sits at position L - n_b + t, exactly as in a call with s_q = n_b; the padding rows before it are computed and
    can be ignored.

    Precision (CUDA kernels): fp32 accumulation and softmax. bf16 cache: P rounded to bf16 for the P V product. FP8
    cache: the MMAs run in f16 on the e4m3 codes (exact), Q rounded to f16 after a per-row power-of-two scale, P s_c
    (s_c the token's c_kv scale) rounded to f16 after a per-tile power-of-two scale; the scales are applied in fp32.
    The tests hold outputs within 2e-2 (bf16) / 6e-2 (FP8) of the fp32 reference, lse within 1e-3 / 5e-2.

    Args:
        q: [B, s_q, H, 576] bf16, last dimension contiguous: ``[q_nope @ W_UK (512) | rope(q_pe) (64)]``.
        kv_cache, kv_scale: as written by :func:`compress_kv` (bf16 with None, or e4m3 with fp32 [..., 2] scales).
        block_table: [B, max_blocks] int32; entries for the pages in use within [0, num_blocks).
        cache_seqlens: [B] int32 in [0, max_blocks * block_size].
        softmax_scale: e.g. :func:`softmax_scale` (192^-0.5 times the YaRN factor).
    Returns:
        ``(out [B, s_q, H, 512] bf16 contiguous, lse [B, H, s_q] fp32)``, lse the natural-log logsumexp of the scaled
        scores. A query that sees no key (L == 0, or causal with ``L - s_q + i < 0``) gets out 0 and lse +inf.
    """
    args = (q, kv_cache, kv_scale, block_table, cache_seqlens, softmax_scale, causal)
    if not lib.use_kernel("decode_attention"):
        return _decode_attention_impl(*args)
    if _kernel_runs("decode_attention", q):
        _check_decode_attention(*args[:-1])
        _value_check_decode_attention(kv_cache, block_table, cache_seqlens)
    return lib.op("decode_attention")(*args)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length multi-head attention (prefill, chunked prefill over a cached prefix).

    Sequence b has queries ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]`` (lq of them) and keys/values
    ``k/v[cu_seqlens_k[b]:cu_seqlens_k[b+1]]`` (lk). With ``causal`` the mask is aligned at the end: query i sees keys
    j <= lk - lq + i, so queries that are the last lq of lk tokens see the whole cached prefix (lq > lk is allowed;
    the first queries then see nothing).

    Args:
        q: [Tq, H, D] bf16/fp16/fp32; k: [Tk, H, D]; v: [Tk, H, Dv]; one dtype, last dimensions contiguous.
            DeepSeek-V2: D = 192 (128 nope + 64 rope), Dv = 128; any sizes are accepted by the reference.
        cu_seqlens_q, cu_seqlens_k: [B+1] int32, starting at 0, non-decreasing, ending at Tq and Tk.
        max_seqlen_q, max_seqlen_k: upper bounds of the per-sequence lengths (kernels size their grid by them).
        softmax_scale: e.g. :func:`softmax_scale`.
    Returns:
        ``(out [Tq, H, Dv] contiguous, dtype of q; lse [H, Tq] fp32)``: softmax in fp32; a query that sees no key
        gets out 0 and lse +inf.
    """
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal)
    # The CUDA kernel covers DeepSeek-V2's shapes (bf16, head dims 192/128) and rejects others: they run the reference.
    kernel_shapes = q.dtype == torch.bfloat16 and q.shape[-1] == QK_HEAD_DIM and v.shape[-1] == V_HEAD_DIM
    if not lib.use_kernel("prefill_attention") or (q.is_cuda and not kernel_shapes):
        return _prefill_attention_impl(*args)
    if _kernel_runs("prefill_attention", q):
        _check_prefill_attention(*args[:-1])
        _value_check_prefill_attention(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return lib.op("prefill_attention")(*args)


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attentions of the same queries over disjoint key sets into the attention over their union.

    ``lse = logaddexp(lse_a, lse_b)``, ``out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)``, in fp32.
    An infinite lse (+inf, this package's "saw no key", or -inf) marks an empty part: its weight is 0 and its out is
    not read (may hold anything). Both parts empty: out 0, lse +inf.

    Args:
        out_a, out_b: [T, H, D] bf16/fp16/fp32, one dtype, last dimension contiguous.
        lse_a, lse_b: [H, T] fp32 (the layout ``prefill_attention`` returns), last dimension contiguous.
    Returns:
        ``(out [T, H, D] contiguous, dtype of out_a; lse [H, T] fp32 contiguous)``.
    """
    if not lib.use_kernel("merge_attention_states"):
        return _merge_attention_states_impl(out_a, lse_a, out_b, lse_b)
    return lib.op("merge_attention_states")(out_a, lse_a, out_b, lse_b)
