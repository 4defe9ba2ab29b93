"""MLA ops: references vs straightforward float64 math (CPU), kernel vs reference (GPU), bad inputs, fake impls under
torch.compile. Covers rope_cos_sin_cache / softmax_scale (incl. YaRN), rope_q, compress_kv (bf16 and FP8 caches),
decode_attention (paged, ragged, causal s_q > 1), prefill_attention (varlen, end-aligned causal) and
merge_attention_states."""

import math

import pytest
import torch

import dsv2_kernels
from dsv2_kernels import OpError, mla
from tests.conftest import assert_close, poison_, requires_cuda_kernel

FP8 = torch.float8_e4m3fn
V2_YARN = dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
               mscale=0.707, mscale_all_dim=0.707)
INF = float("inf")


def poisoned_fp8(*shape, device="cpu"):
    t = torch.empty(*shape, dtype=FP8, device=device)
    poison_(t)  # returns the uint8 view: keep the fp8 tensor
    return t


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_cos_sin(rows, g):
    """A cos/sin table of random angles (fp32), so rope tests do not depend on rope_cos_sin_cache."""
    angles = (torch.rand(rows, 32, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    return torch.cat((angles.cos(), angles.sin()), -1).float()


# ---- independent math ------------------------------------------------------------------------------------------
def naive_rope_complex(x, positions, cos_sin):
    """Interleaved pairs as complex numbers times e^(j angle), in complex128."""
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], 32, 2).contiguous())
    cs = cos_sin.double()[positions.long()]
    rot = torch.complex(cs[:, :32], cs[:, 32:]).view(x.shape[0], *([1] * (x.dim() - 2)), 32)
    return torch.view_as_real(xc * rot).reshape(x.shape)


def naive_rope_row(x, cos_row, sin_row):
    """One 64-vector, pair by pair, float64."""
    out = [0.0] * 64
    for i in range(32):
        a, b, c, s = float(x[2 * i]), float(x[2 * i + 1]), float(cos_row[i]), float(sin_row[i])
        out[2 * i], out[2 * i + 1] = a * c - b * s, b * c + a * s
    return torch.tensor(out, dtype=torch.float64)


def naive_attention(q, k, v, scale, n_visible):
    """One query vector over the first n_visible rows of k/v, float64: (out, natural-log lse); empty -> (0, +inf)."""
    if n_visible <= 0:
        return torch.zeros(v.shape[-1], dtype=torch.float64), INF
    s = (k[:n_visible].double() @ q.double()) * scale
    m = s.max()
    e = torch.exp(s - m)
    return (e @ v[:n_visible].double()) / e.sum(), float(m + torch.log(e.sum()))


# ---- rope_cos_sin_cache / softmax_scale ------------------------------------------------------------------------
def test_rope_cache_plain_matches_definition():
    cache = mla.rope_cos_sin_cache(64, 4096, base=10000.0)
    assert cache.shape == (4096, 64) and cache.dtype == torch.float32
    i = torch.arange(32, dtype=torch.float64)
    inv = 10000.0 ** (-2 * i / 64)
    for p in (0, 1, 7, 1000, 4095):
        # fp32 angles (as DeepSeek's code computes them): error ~ a few ulps of p * inv_freq
        tol = 4e-7 * p + 2e-6
        assert_close(cache[p, :32], torch.cos(p * inv), atol=tol, rtol=0, what=f"cos row {p}")
        assert_close(cache[p, 32:], torch.sin(p * inv), atol=tol, rtol=0, what=f"sin row {p}")
    assert mla.rope_cos_sin_cache(64, 8, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_yarn_cache_deepseek_v2_config():
    cache = mla.rope_cos_sin_cache(64, 2048, 10000.0, V2_YARN)
    # Transcription of YaRN by hand: correction dims d(r) = dim * ln(L0 / (2 pi r)) / (2 ln base).
    d = lambda r: 64 * math.log(4096 / (2 * math.pi * r)) / (2 * math.log(10000))  # noqa: E731
    low, high = max(math.floor(d(32)), 0), min(math.ceil(d(1)), 63)
    assert (low, high) == (10, 23)
    expected = []
    for i in range(32):
        extra = 10000.0 ** (-2 * i / 64)
        r = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: keep the frequency, 1: divide it by the factor
        expected.append(extra * (1 - r) + extra / 40 * r)
    expected = torch.tensor(expected, dtype=torch.float64)
    assert expected[5] == 10000.0 ** (-10 / 64) and math.isclose(expected[31], 10000.0 ** (-62 / 64) / 40)
    # Row 1 holds angle = inv_freq itself; mscale == mscale_all_dim makes the multiplier 1.
    inv = torch.atan2(cache[1, 32:].double(), cache[1, :32].double())
    assert_close(inv, expected, atol=0, rtol=2e-6, what="yarn inv_freq")
    norm = cache[:, :32].double() ** 2 + cache[:, 32:].double() ** 2
    assert_close(norm, torch.ones_like(norm), atol=1e-6, rtol=0, what="cos^2+sin^2")
    assert_close(cache[1500, :32], torch.cos(1500 * expected), atol=1e-3, rtol=0, what="cos row 1500")
    # "rope_type" spelling; a multiplier != 1 scales every entry by mscale(factor, mscale)/mscale(factor, all_dim).
    assert torch.equal(mla.rope_cos_sin_cache(64, 2048, 10000.0, {**{k: v for k, v in V2_YARN.items() if k != "type"},
                                                                   "rope_type": "yarn"}), cache)
    scaled = mla.rope_cos_sin_cache(64, 2048, 10000.0, {**V2_YARN, "mscale": 1.0, "mscale_all_dim": 0})
    assert_close(scaled, cache.double() * (0.1 * math.log(40) + 1), atol=1e-6, rtol=1e-6, what="mscale")
    # factor <= 1: YaRN changes nothing.
    same = mla.rope_cos_sin_cache(64, 64, 10000.0, {**V2_YARN, "factor": 1.0})
    assert_close(same, mla.rope_cos_sin_cache(64, 64, 10000.0), atol=1e-6, rtol=0, what="factor 1")
    with pytest.raises(ValueError, match="linear"):
        mla.rope_cos_sin_cache(64, 8, rope_scaling={"type": "linear", "factor": 2.0})


def test_softmax_scale():
    assert math.isclose(mla.softmax_scale(192), 1 / math.sqrt(192))
    m = 1 + 0.1 * 0.707 * math.log(40)
    assert math.isclose(mla.softmax_scale(192, V2_YARN), m * m / math.sqrt(192))
    assert math.isclose(mla.softmax_scale(192, {**V2_YARN, "mscale_all_dim": 0}), 1 / math.sqrt(192))
    assert mla.yarn_get_mscale(0.5, 3.0) == 1.0


# ---- rope_q ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32])
def test_rope_q_reference(dtype, pos_dtype):
    g = gen(2)
    cs = random_cos_sin(50, g)
    q = (torch.randn(7, 3, 192, generator=g) * 2).to(dtype)[..., 128:]  # strided rows, contiguous last dim
    pos = torch.randint(0, 50, (7,), generator=g).to(pos_dtype)
    got = mla.rope_q(q, pos, cs)
    assert got.shape == (7, 3, 64) and got.dtype == dtype and got.is_contiguous()
    # fp32: a few roundings of |x| ~ 2; bf16: one rounding of the output (2^-8 relative)
    tol = 2e-6 if dtype == torch.float32 else 8e-3
    assert_close(got, naive_rope_complex(q, pos, cs), atol=tol * 4, rtol=tol, what="rope_q")
    with dsv2_kernels.kernels("none"):
        assert torch.equal(mla.rope_q(q, pos, cs), got)


def test_rope_equals_hf_deinterleaved_rotate_half_up_to_permutation():
    g = gen(3)
    cache = mla.rope_cos_sin_cache(64, 512, rope_scaling=V2_YARN)
    q, k = torch.randn(6, 2, 64, generator=g), torch.randn(6, 1, 64, generator=g)
    pos = torch.tensor([0, 3, 17, 100, 255, 511])
    # DeepSeek's modeling_deepseek.py: de-interleave, then x * cos + rotate_half(x) * sin with cat(freqs, freqs).
    cos = torch.cat((cache[pos, :32], cache[pos, :32]), -1)[:, None]
    sin = torch.cat((cache[pos, 32:], cache[pos, 32:]), -1)[:, None]

    def hf(x):
        x = x.view(*x.shape[:-1], 32, 2).transpose(-1, -2).reshape(x.shape)
        return x * cos + torch.cat((-x[..., 32:], x[..., :32]), -1) * sin

    perm = list(range(0, 64, 2)) + list(range(1, 64, 2))
    ours_q, ours_k = mla.rope_q(q, pos, cache), mla.rope_q(k, pos, cache)
    assert_close(ours_q[..., perm], hf(q), atol=1e-6, rtol=1e-6, what="permuted layout")
    dots = torch.einsum("thd,sd->ths", ours_q, ours_k[:, 0])
    hf_dots = torch.einsum("thd,sd->ths", hf(q), hf(k)[:, 0])
    assert_close(dots, hf_dots, atol=1e-5, rtol=1e-5, what="q.k")
    # Relative position: shifting both positions leaves the product unchanged (plain RoPE; fp32 angles).
    plain = mla.rope_cos_sin_cache(64, 512)
    a = torch.dot(mla.rope_q(q[:1, :1], torch.tensor([7]), plain).flatten(),
                  mla.rope_q(k[:1], torch.tensor([3]), plain).flatten())
    b = torch.dot(mla.rope_q(q[:1, :1], torch.tensor([307]), plain).flatten(),
                  mla.rope_q(k[:1], torch.tensor([303]), plain).flatten())
    assert math.isclose(float(a), float(b), rel_tol=1e-4, abs_tol=1e-4)


# ---- compress_kv -----------------------------------------------------------------------------------------------
def _compress_inputs(seed, tokens=9, num_blocks=4, block_size=4):
    g = gen(seed)
    kv_a = (torch.randn(tokens, 600, generator=g) * 3).bfloat16()[:, 10:586]  # strided rows
    w = torch.rand(512, generator=g) + 0.5
    cs = random_cos_sin(64, g)
    pos = torch.randint(0, 64, (tokens,), generator=g)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[[1, 5]] = -1  # padding tokens: not written
    return kv_a, w, cs, pos, slots


def _expected_rows(kv_a, w, eps, pos, cs):
    """Step by step in float64: RMSNorm of the first 512, then pairwise RoPE of the last 64."""
    rows = []
    for t in range(kv_a.shape[0]):
        x = kv_a[t].double()
        c = x[:512] / math.sqrt(float((x[:512] ** 2).sum()) / 512 + eps) * w.double()
        cs_row = cs[int(pos[t])].double()
        rows.append(torch.cat((c, naive_rope_row(x[512:], cs_row[:32], cs_row[32:]))))
    return torch.stack(rows)


@pytest.mark.parametrize("return_normed", [True, False])
def test_compress_kv_bf16_cache(return_normed):
    kv_a, w, cs, pos, slots = _compress_inputs(4)
    cache = torch.full((4, 4, 576), float("nan"), dtype=torch.bfloat16)
    c_kv, k_pe = mla.compress_kv(kv_a, w, 1e-6, pos, cs, slots.int(), cache, None, return_normed)
    expected = _expected_rows(kv_a, w, 1e-6, pos, cs)
    flat = cache.view(-1, 576)
    written = slots[slots >= 0]
    # bf16 cache: one rounding of values of magnitude ~ w * 1 (rel 2^-8)
    assert_close(flat[written], expected[slots >= 0], atol=1e-2, rtol=8e-3, what="cache rows")
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[written] = False
    assert flat[untouched].isnan().all(), "slots not in slot_mapping must be left alone"
    if return_normed:
        assert c_kv.shape == (9, 512) and k_pe.shape == (9, 64) and c_kv.dtype == torch.bfloat16
        assert_close(torch.cat((c_kv, k_pe), -1), expected, atol=1e-2, rtol=8e-3, what="returned")
        assert torch.equal(torch.cat((c_kv, k_pe), -1)[slots >= 0], flat[written]), "returned == cached values"
    else:
        assert c_kv.shape == (0,) and k_pe.shape == (0,)


def test_compress_kv_fp8_cache():
    kv_a, w, cs, pos, slots = _compress_inputs(5)
    cache = poisoned_fp8(4, 4, 576)
    scale = torch.full((4, 4, 2), float("nan"))
    c_kv, k_pe = mla.compress_kv(kv_a, w, 1e-6, pos, cs, slots, cache, scale, True)
    expected = _expected_rows(kv_a, w, 1e-6, pos, cs)[slots >= 0]
    written = slots[slots >= 0]
    stored, s = cache.view(-1, 576)[written], scale.view(-1, 2)[written]
    # Scales from the fp32 values: amax / 448 per part.
    want_s = torch.stack((expected[:, :512].abs().amax(-1), expected[:, 512:].abs().amax(-1)), -1) / 448
    assert_close(s, want_s, atol=0, rtol=1e-5, what="scales")
    # The largest value of each part encodes exactly +-448: no saturation, full range used, k_pe its own scale.
    amax = stored.float().abs()
    assert (amax[:, :512].amax(-1) == 448).all() and (amax[:, 512:].amax(-1) == 448).all()
    # Round trip: at most half an e4m3 ulp (1/16 relative) for normals, scale * 2^-10 in the subnormal range.
    deq = torch.cat((stored[:, :512].double() * s[:, :1].double(), stored[:, 512:].double() * s[:, 1:].double()), -1)
    sc = torch.cat((s[:, :1].expand(-1, 512), s[:, 1:].expand(-1, 64)), -1).double()
    err = (deq - expected).abs()
    assert (err <= expected.abs() / 16 * 1.001 + sc * 2**-10 + 1e-7).all(), f"fp8 round trip, worst {err.max()}"
    assert (err / expected.abs().clamp_min(1e-3)).mean() < 0.03  # typical relative error ~2^-6
    assert_close(mla.dequant_kv_cache(stored, s), deq, atol=1e-6, rtol=1e-6, what="dequant_kv_cache")
    assert_close(torch.cat((c_kv, k_pe), -1)[slots >= 0], expected, atol=1e-2, rtol=8e-3, what="returned")
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[written] = False
    assert (cache.view(-1, 576)[untouched].view(torch.uint8) == 0x7F).all()
    assert scale.view(-1, 2)[untouched].isnan().all()


# ---- paged cache builder (CPU and GPU tests) -------------------------------------------------------------------
def make_paged_cache(seqlens, block_size, max_blocks, num_blocks, fp8, g, device="cpu"):
    """Random rows in the pages a random block table gives each sequence; every other slot NaN-poisoned, unused
    block-table entries out of range (they must not be read)."""
    batch = len(seqlens)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.full((batch, max_blocks), num_blocks + 7, dtype=torch.int32)
    live = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for b, length in enumerate(seqlens):
        for j in range((length + block_size - 1) // block_size):
            page = perm.pop()
            table[b, j] = page
            live[page, : min(block_size, length - j * block_size)] = True
    if fp8:
        cache = (torch.randn(num_blocks, block_size, 576, generator=g) * 100).clamp(-448, 448).to(FP8)
        scale = (torch.rand(num_blocks, block_size, 2, generator=g) + 0.5) / 100
        cache.view(torch.uint8)[~live] = 0x7F
        scale[~live] = float("nan")
    else:
        cache, scale = torch.randn(num_blocks, block_size, 576, generator=g).bfloat16(), None
        cache[~live] = float("nan")
    lens = torch.tensor(seqlens, dtype=torch.int32)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(cache), to(scale), to(table), to(lens)


def gather_sequence(cache, scale, table, b, length):
    """Token by token, float64: the contiguous (dequantized) rows of sequence b."""
    block_size = cache.shape[1]
    rows = []
    for j in range(length):
        page, off = int(table[b, j // block_size]), j % block_size
        row = cache[page, off].double()
        if scale is not None:
            row = torch.cat((row[:512] * float(scale[page, off, 0]), row[512:] * float(scale[page, off, 1])))
        rows.append(row)
    return torch.stack(rows) if rows else torch.zeros(0, 576, dtype=torch.float64)


# ---- decode_attention ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("s_q, causal", [(1, True), (3, True), (3, False)])
def test_decode_attention_reference(fp8, s_q, causal):
    g = gen(6 + s_q + 2 * fp8)
    seqlens = [13, 0, 48, 1, 2]  # ragged, empty, full table, shorter than s_q
    cache, scale, table, lens = make_paged_cache(seqlens, 8, 6, 30, fp8, g)
    q = torch.randn(5, s_q, 3, 576, generator=g).bfloat16()
    sm = 0.07
    out, lse = mla.decode_attention(q, cache, scale, table, lens, sm, causal)
    assert out.shape == (5, s_q, 3, 512) and out.dtype == torch.bfloat16 and lse.shape == (5, 3, s_q)
    for b, length in enumerate(seqlens):
        rows = gather_sequence(cache, scale, table, b, length)
        for i in range(s_q):
            n_vis = length - s_q + i + 1 if (causal and s_q > 1) else length
            for h in range(3):
                want_o, want_l = naive_attention(q[b, i, h], rows, rows[:, :512], sm, n_vis)
                # out: bf16 rounding of an average of O(1) values; lse: fp32 vs fp64 sums of 576 products
                assert_close(out[b, i, h], want_o, atol=1e-2, rtol=1e-2, what=f"out b={b} i={i} h={h}")
                assert_close(lse[b, h, i], torch.tensor(want_l), atol=2e-4, rtol=0, what=f"lse b={b} i={i} h={h}")
    assert (lse[1] == INF).all() and (out[1] == 0).all()


# ---- prefill_attention -----------------------------------------------------------------------------------------
PREFILL_SEQS = [(5, 5), (3, 11), (0, 4), (4, 0), (6, 2)]  # (lq, lk): plain, cached prefix, no queries, no keys, lq > lk


def _prefill_inputs(seqs, heads, d, dv, dtype, g):
    cu_q = torch.tensor([0] + [sum(s[0] for s in seqs[: i + 1]) for i in range(len(seqs))], dtype=torch.int32)
    cu_k = torch.tensor([0] + [sum(s[1] for s in seqs[: i + 1]) for i in range(len(seqs))], dtype=torch.int32)
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    q = torch.randn(tq, heads, d + 16, generator=g).to(dtype)[..., :d]  # strided rows
    k = torch.randn(tk, heads, d, generator=g).to(dtype)
    v = torch.randn(tk, heads, dv, generator=g).to(dtype)
    return q, k, v, cu_q, cu_k


def naive_prefill(q, k, v, seqs, scale, causal):
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    lse = torch.full((q.shape[1], q.shape[0]), INF, dtype=torch.float64)
    q0 = k0 = 0
    for lq, lk in seqs:
        for i in range(lq):
            n_vis = min(lk, lk - lq + i + 1) if causal else lk
            for h in range(q.shape[1]):
                o, l = naive_attention(q[q0 + i, h], k[k0 : k0 + lk, h], v[k0 : k0 + lk, h], scale, n_vis)
                out[q0 + i, h], lse[h, q0 + i] = o, l
        q0, k0 = q0 + lq, k0 + lk
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_attention_reference(dtype, causal, monkeypatch):
    g = gen(7)
    q, k, v, cu_q, cu_k = _prefill_inputs(PREFILL_SEQS, 2, 192, 128, dtype, g)
    scale = 192**-0.5
    out, lse = mla.prefill_attention(q, k, v, cu_q, cu_k, 6, 11, scale, causal)
    assert out.shape == (q.shape[0], 2, 128) and out.dtype == dtype and lse.shape == (2, q.shape[0])
    want_o, want_l = naive_prefill(q, k, v, PREFILL_SEQS, scale, causal)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the output
    assert_close(out, want_o, atol=tol, rtol=tol, what="out")
    assert_close(lse, want_l, atol=2e-5, rtol=0, what="lse")
    # Query blocking (for long sequences) must not change the result.
    monkeypatch.setattr(mla, "_SCORE_BLOCK_ELEMS", 1)
    out2, lse2 = mla.prefill_attention(q, k, v, cu_q, cu_k, 6, 11, scale, causal)
    # fp32 sums of another shape may differ in the last bit (the CPU BLAS picks its kernel by shape), which can move a
    # bf16 output to the neighbouring value: one bf16 step (at most 2^-7 relative) allowed there.
    tol_b = 1e-6 if dtype == torch.float32 else 2**-7
    assert_close(out2, out, atol=1e-6, rtol=tol_b, what="blocked out")
    assert_close(lse2, lse, atol=1e-6, rtol=0, what="blocked lse")


# ---- merge_attention_states ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_attention_states_reference(dtype):
    g = gen(8)
    tokens, heads, lk = 6, 2, 10
    q, k, v = torch.randn(tokens, heads, 32, generator=g), torch.randn(lk, heads, 32, generator=g), \
        torch.randn(lk, heads, 16, generator=g)
    split = [0, 4, 10, 3, 7, 5]  # keys [0, split) in part a, [split, n_vis) in part b; empty parts at both ends
    n_vis = [10, 10, 10, 3, 9, 0]  # the last token sees nothing at all
    out_a, out_b = torch.full((tokens, heads, 16), float("nan")), torch.full((tokens, heads, 16), float("nan"))
    lse_a, lse_b = torch.empty(heads, tokens), torch.empty(heads, tokens)
    want_o = torch.zeros(tokens, heads, 16, dtype=torch.float64)
    want_l = torch.empty(heads, tokens, dtype=torch.float64)
    for t in range(tokens):
        for h in range(heads):
            s, n = split[t], n_vis[t]
            o, l = naive_attention(q[t, h], k[:s, h], v[:s, h], 0.3, min(s, n))
            if l != INF:  # an empty part's out may be anything: leave the NaN there
                out_a[t, h] = o
            lse_a[h, t] = l
            o, l = naive_attention(q[t, h], k[s:n, h], v[s:n, h], 0.3, n - s)
            if l != INF:
                out_b[t, h] = o
            lse_b[h, t] = l
            want_o[t, h], want_l[h, t] = naive_attention(q[t, h], k[:, h], v[:, h], 0.3, n)
    assert lse_b[0, 2] == INF
    lse_b[0, 2] = -INF  # -inf (log of an empty sum) also means "empty"
    out, lse = mla.merge_attention_states(out_a.to(dtype), lse_a, out_b.to(dtype), lse_b)
    assert out.dtype == dtype and lse.dtype == torch.float32
    tol = 1e-6 if dtype == torch.float32 else 1.6e-2
    assert_close(out, want_o, atol=tol, rtol=tol, what="merged out")
    assert_close(lse, want_l, atol=1e-5, rtol=0, what="merged lse")
    assert (out[5] == 0).all() and (lse[:, 5] == INF).all()


# ---- value checks and bad inputs -------------------------------------------------------------------------------
def _ok_args():
    g = gen(9)
    cs = random_cos_sin(16, g)
    kv_a = torch.randn(3, 576, generator=g).bfloat16()
    cache, scale, table, lens = make_paged_cache([5, 9], 4, 4, 8, False, g)
    fcache, fscale, _, _ = make_paged_cache([5, 9], 4, 4, 8, True, g)
    q = torch.randn(2, 1, 2, 576, generator=g).bfloat16()
    pq, pk, pv, cu_q, cu_k = _prefill_inputs([(2, 3), (1, 1)], 2, 8, 4, torch.float32, g)
    return dict(cs=cs, kv_a=kv_a, w=torch.ones(512), pos=torch.tensor([0, 5, 15]), slots=torch.tensor([0, -1, 31]),
                cache=cache, table=table, lens=lens, fcache=fcache, fscale=fscale, q=q, pq=pq, pk=pk, pv=pv,
                cu_q=cu_q, cu_k=cu_k, o=torch.randn(3, 2, 8), l=torch.randn(2, 3))


A = _ok_args()


def _rope(q=None, pos=None, cs=None):
    return mla.rope_q(A["q"][0, :, :, :64].float() if q is None else q, torch.tensor([1]) if pos is None else pos,
                      A["cs"] if cs is None else cs)


def _compress(**kw):
    args = dict(kv_a=A["kv_a"], norm_weight=A["w"], eps=1e-6, positions=A["pos"], cos_sin_cache=A["cs"],
                slot_mapping=A["slots"], kv_cache=A["cache"].clone(), kv_scale=None, return_normed=True)
    args.update(kw)
    return mla.compress_kv(**args)


def _decode(**kw):
    args = dict(q=A["q"], kv_cache=A["cache"], kv_scale=None, block_table=A["table"], cache_seqlens=A["lens"],
                softmax_scale=0.1, causal=True)
    args.update(kw)
    return mla.decode_attention(**args)


def _prefill(**kw):
    args = dict(q=A["pq"], k=A["pk"], v=A["pv"], cu_seqlens_q=A["cu_q"], cu_seqlens_k=A["cu_k"], max_seqlen_q=2,
                max_seqlen_k=3, softmax_scale=0.1, causal=True)
    args.update(kw)
    return mla.prefill_attention(**args)


def _merge(**kw):
    args = dict(out_a=A["o"], lse_a=A["l"], out_b=A["o"], lse_b=A["l"])
    args.update(kw)
    return mla.merge_attention_states(**args)


def _table_with(b, j, value):
    t = A["table"].clone()
    t[b, j] = value
    return t


BAD = [
    (lambda: _rope(q=torch.randn(1, 2, 64).half()), "rope_q.*'q_pe'.*dtype"),
    (lambda: _rope(q=torch.randn(1, 2, 32)), "rope_q.*'q_pe'.*shape"),
    (lambda: _rope(q=torch.randn(1, 64, 2).transpose(1, 2)), "rope_q.*'q_pe'.*contiguous"),
    (lambda: _rope(pos=torch.tensor([1.0])), "rope_q.*'positions'.*dtype"),
    (lambda: _rope(pos=torch.tensor([1, 2])), "rope_q.*'positions'.*shape"),
    (lambda: _rope(pos=torch.tensor([16])), "rope_q.*'positions'.*outside"),
    (lambda: _rope(cs=A["cs"][:, :32].contiguous()), "rope_q.*'cos_sin_cache'.*shape"),
    (lambda: _rope(cs=A["cs"].bfloat16()), "rope_q.*'cos_sin_cache'.*dtype"),
    (lambda: _rope(pos=torch.tensor([1], device="meta")), "rope_q.*one device"),
    (lambda: _compress(kv_a=A["kv_a"].float()), "compress_kv.*'kv_a'.*dtype"),
    (lambda: _compress(kv_a=A["kv_a"][:, :512]), "compress_kv.*'kv_a'.*shape"),
    (lambda: _compress(norm_weight=torch.ones(511)), "compress_kv.*'norm_weight'.*shape"),
    (lambda: _compress(eps=0.0), "compress_kv.*'eps'"),
    (lambda: _compress(positions=A["pos"][:2]), "compress_kv.*'positions'.*shape"),
    (lambda: _compress(positions=torch.tensor([0, 16, 1])), "compress_kv.*'positions'.*outside"),
    (lambda: _compress(slot_mapping=A["slots"].float()), "compress_kv.*'slot_mapping'.*dtype"),
    (lambda: _compress(slot_mapping=torch.tensor([0, 1])), "compress_kv.*'slot_mapping'.*shape"),
    (lambda: _compress(slot_mapping=torch.tensor([0, 32, 1])), "compress_kv.*'slot_mapping'.*outside.*32"),
    (lambda: _compress(kv_cache=A["cache"].half()), "compress_kv.*'kv_cache'.*dtype"),
    (lambda: _compress(kv_cache=A["cache"][..., :512].contiguous()), "compress_kv.*'kv_cache'.*shape"),
    (lambda: _compress(kv_cache=A["cache"].transpose(0, 1)), "compress_kv.*'kv_cache'.*contiguous"),
    (lambda: _compress(kv_cache=A["fcache"].clone()), "compress_kv.*'kv_scale'.*required"),
    (lambda: _compress(kv_scale=A["fscale"].clone()), "compress_kv.*'kv_scale'.*None"),
    (lambda: _compress(kv_cache=A["fcache"].clone(), kv_scale=A["fscale"][..., :1].clone()),
     "compress_kv.*'kv_scale'.*shape"),
    (lambda: _decode(q=A["q"][..., :512]), "decode_attention.*'q'.*shape"),
    (lambda: _decode(q=A["q"].float()), "decode_attention.*'q'.*dtype"),
    (lambda: _decode(block_table=A["table"].long()), "decode_attention.*'block_table'.*dtype"),
    (lambda: _decode(block_table=A["table"][:1]), "decode_attention.*'block_table'.*shape"),
    (lambda: _decode(cache_seqlens=A["lens"].long()), "decode_attention.*'cache_seqlens'.*dtype"),
    (lambda: _decode(cache_seqlens=torch.tensor([5, 17], dtype=torch.int32)), "decode_attention.*'cache_seqlens'.*17"),
    (lambda: _decode(cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32)), "decode_attention.*'cache_seqlens'"),
    (lambda: _decode(block_table=_table_with(1, 2, 8)), "decode_attention.*'block_table'.*outside"),
    (lambda: _decode(block_table=_table_with(0, 1, -1)), "decode_attention.*'block_table'.*outside"),
    (lambda: _decode(kv_cache=A["fcache"]), "decode_attention.*'kv_scale'.*required"),
    (lambda: _decode(softmax_scale=0.0), "decode_attention.*'softmax_scale'"),
    (lambda: _prefill(k=A["pk"][..., :4].contiguous()), "prefill_attention.*'k'.*shape"),
    (lambda: _prefill(v=A["pv"][:3]), "prefill_attention.*'v'.*shape"),
    (lambda: _prefill(k=A["pk"].bfloat16()), "prefill_attention.*'k'.*dtype"),
    (lambda: _prefill(q=A["pq"].double()), "prefill_attention.*'q'.*dtype"),
    (lambda: _prefill(cu_seqlens_q=A["cu_q"].long()), "prefill_attention.*'cu_seqlens_q'.*dtype"),
    (lambda: _prefill(cu_seqlens_k=A["cu_k"][:2]), "prefill_attention.*'cu_seqlens_k'.*shape"),
    (lambda: _prefill(cu_seqlens_q=torch.tensor([1, 2, 3], dtype=torch.int32)),
     "prefill_attention.*'cu_seqlens_q'.*start"),
    (lambda: _prefill(cu_seqlens_k=torch.tensor([0, 3, 3], dtype=torch.int32)),
     "prefill_attention.*'cu_seqlens_k'.*end"),
    (lambda: _prefill(cu_seqlens_k=torch.tensor([0, 5, 4], dtype=torch.int32)),
     "prefill_attention.*'cu_seqlens_k'.*non-decreasing"),
    (lambda: _prefill(max_seqlen_q=1), "prefill_attention.*'max_seqlen_q'"),
    (lambda: _prefill(max_seqlen_k=-1), "prefill_attention.*'max_seqlen_k'"),
    (lambda: _merge(out_b=A["o"][:2]), "merge_attention_states.*'out_b'.*shape"),
    (lambda: _merge(out_b=A["o"].bfloat16()), "merge_attention_states.*'out_b'.*dtype"),
    (lambda: _merge(lse_a=A["l"].t().contiguous()), "merge_attention_states.*'lse_a'.*shape"),
    (lambda: _merge(lse_b=A["l"].bfloat16()), "merge_attention_states.*'lse_b'.*dtype"),
    (lambda: _merge(out_a=A["o"].int()), "merge_attention_states.*'out_a'.*dtype"),
]


@pytest.mark.parametrize("call, match", BAD, ids=[m for _, m in BAD])
def test_bad_inputs(call, match):
    with pytest.raises(OpError, match=match):
        call()
    with dsv2_kernels.kernels("none"), pytest.raises(OpError, match=match):
        call()


def test_valid_inputs_pass_and_value_checks_can_be_disabled():
    _rope(), _compress(), _decode(), _prefill(), _merge()  # the baselines of BAD are valid
    dsv2_kernels.set_value_checks(False)
    try:
        _prefill(max_seqlen_q=1)  # value checks off: not caught (the reference does not need max_seqlen)
    finally:
        dsv2_kernels.set_value_checks(True)


# ---- fake impls ------------------------------------------------------------------------------------------------
def test_fake_impls_under_compile():
    ops = torch.ops.dsv2_kernels
    g = gen(10)
    kv_a, w, cs, pos, slots = _compress_inputs(11)
    cache, scale, table, lens = make_paged_cache([5, 9], 4, 4, 8, True, g)
    fresh = poisoned_fp8(4, 4, 576), torch.full((4, 4, 2), float("nan"))
    q = torch.randn(2, 2, 2, 576, generator=g).bfloat16()
    pq, pk, pv, cu_q, cu_k = _prefill_inputs([(2, 3), (1, 1)], 2, 8, 4, torch.bfloat16, g)

    def f(kv_cache, kv_scale):
        c, k = ops.compress_kv(kv_a, w, 1e-6, pos, cs, slots, kv_cache, kv_scale, True)
        e1, e2 = ops.compress_kv(kv_a, w, 1e-6, pos, cs, slots, kv_cache, kv_scale, False)
        r = ops.rope_q(kv_a[:, None, 512:], pos, cs)
        o, l = ops.decode_attention(q, cache, scale, table, lens, 0.1, True)
        po, pl = ops.prefill_attention(pq, pk, pv, cu_q, cu_k, 2, 3, 0.1, True)
        mo, ml = ops.merge_attention_states(po, pl, po, pl)
        return c, k, e1, e2, r, o, l, po, pl, mo, ml

    wc, ws = fresh[0].clone(), fresh[1].clone()
    want = f(wc, ws)
    gc, gs = fresh[0].clone(), fresh[1].clone()
    got = torch.compile(f, fullgraph=True, backend="eager")(gc, gs)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"output {i}"
        assert_close(a, b, atol=0, rtol=0, what=f"compiled output {i}")
    assert torch.equal(gc.view(torch.uint8), wc.view(torch.uint8)), "the compiled op must write the cache in place"
    assert torch.equal(gs.isnan(), ws.isnan()) and torch.equal(gs.nan_to_num(), ws.nan_to_num())
    with torch._subclasses.FakeTensorMode():
        fq = torch.empty(3, 2, 16, 576, dtype=torch.bfloat16)
        fc, fs = torch.empty(10, 64, 576, dtype=FP8), torch.empty(10, 64, 2)
        o, l = ops.decode_attention(fq, fc, fs, torch.empty(3, 5, dtype=torch.int32), torch.empty(3, dtype=torch.int32),
                                    0.1, True)
        assert o.shape == (3, 2, 16, 512) and o.dtype == torch.bfloat16 and l.shape == (3, 16, 2)
        assert l.dtype == torch.float32


# ---- GPU: kernel vs reference ----------------------------------------------------------------------------------
@pytest.mark.gpu
@requires_cuda_kernel("rope_q")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens, heads", [(1, 1), (37, 16), (257, 128)])
def test_kernel_rope_q(dtype, tokens, heads):
    g = gen(tokens)
    cs = mla.rope_cos_sin_cache(64, 163840, rope_scaling=V2_YARN, device="cuda")
    q = torch.randn(tokens, heads, 192, generator=g).to(dtype).cuda()[..., 128:]
    pos = torch.randint(0, 163840, (tokens,), generator=g).int().cuda()
    with dsv2_kernels.kernels("none"):
        want = mla.rope_q(q, pos, cs)
    got = mla.rope_q(q, pos, cs)
    # same fp32 products, possibly fused differently: at most one rounding of the output dtype apart
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    assert_close(got, want, atol=tol, rtol=tol, what="rope_q kernel")


@pytest.mark.gpu
@requires_cuda_kernel("compress_kv")
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("tokens", [1, 300])
def test_kernel_compress_kv(fp8, tokens):
    g = gen(tokens + fp8)
    num_blocks, block_size = 12, 64
    cs = mla.rope_cos_sin_cache(64, 4096, rope_scaling=V2_YARN, device="cuda")
    kv_a = (torch.randn(tokens, 2112, generator=g) * 3).bfloat16().cuda()[:, 1536:]  # slice of q_a|kv_a output
    w = (torch.rand(512, generator=g) + 0.5).bfloat16().cuda()
    pos = torch.randint(0, 4096, (tokens,), generator=g).cuda()
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[3::7] = -1  # padding tokens
    slots = slots.cuda()
    caches = []
    for _ in range(2):
        cache = (poisoned_fp8(num_blocks, block_size, 576, device="cuda") if fp8 else
                 torch.full((num_blocks, block_size, 576), float("nan"), dtype=torch.bfloat16, device="cuda"))
        scale = torch.full((num_blocks, block_size, 2), float("nan"), device="cuda") if fp8 else None
        caches.append((cache, scale))
    with dsv2_kernels.kernels("none"):
        want = mla.compress_kv(kv_a, w, 1e-6, pos, cs, slots, *caches[0], True)
    got = mla.compress_kv(kv_a, w, 1e-6, pos, cs, slots, *caches[1], True)
    for a, b, name in zip(got, want, ("c_kv", "k_pe")):
        assert_close(a, b, atol=1.6e-2, rtol=1.6e-2, what=name)  # one bf16 rounding apart at most
    (wc, ws), (gc, gs) = caches
    if not fp8:
        assert_close(gc, wc, atol=1.6e-2, rtol=1.6e-2, what="bf16 cache (unwritten slots stay NaN)")
        return
    assert_close(gs, ws, atol=0, rtol=1e-5, what="fp8 scales (unwritten stay NaN)")
    # Same value up to fp32 rounding before the e4m3 cast: at most one e4m3 step apart, rarely.
    written = slots[slots >= 0]
    a, b = gc.view(-1, 576)[written].float(), wc.view(-1, 576)[written].float()
    assert ((a - b).abs() <= b.abs() / 8 + 2**-9).all() and (a != b).float().mean() < 0.01
    keep = torch.ones(num_blocks * block_size, dtype=torch.bool, device="cuda")
    keep[written] = False
    assert (gc.view(-1, 576)[keep].view(torch.uint8) == 0x7F).all(), "unwritten slots must be left alone"


@pytest.mark.gpu
@requires_cuda_kernel("decode_attention")
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("batch, s_q, heads", [(1, 1, 16), (8, 2, 128), (33, 1, 128), (128, 1, 16)])
def test_kernel_decode_attention(fp8, batch, s_q, heads):
    g = gen(batch * 10 + s_q)
    block_size, max_blocks = 64, 40
    seqlens = torch.randint(0, max_blocks * block_size + 1, (batch,), generator=g)
    seqlens[0] = max_blocks * block_size
    if batch > 2:
        seqlens[1], seqlens[2] = 0, 1
    num_blocks = int(((seqlens + block_size - 1) // block_size).sum()) + 5
    cache, scale, table, lens = make_paged_cache(seqlens.tolist(), block_size, max_blocks, num_blocks, fp8, g, "cuda")
    q = torch.randn(batch, s_q, heads, 576, generator=g).bfloat16().cuda()
    sm = mla.softmax_scale(192, V2_YARN)
    with dsv2_kernels.kernels("none"):
        want_o, want_l = mla.decode_attention(q, cache, scale, table, lens, sm, True)
    got_o, got_l = mla.decode_attention(q, cache, scale, table, lens, sm, True)
    # bf16 cache: bf16 P in the PV product, fp32 accumulation. FP8 cache: the kernel may also run q.K in FP8.
    tol_o, tol_l = (5e-2, 5e-2) if fp8 else (2e-2, 1e-3)
    assert_close(got_o, want_o, atol=tol_o, rtol=tol_o, what="out")
    assert_close(got_l, want_l, atol=tol_l, rtol=0, what="lse (inf where empty)")


@pytest.mark.gpu
@requires_cuda_kernel("decode_attention")
def test_kernel_decode_attention_cuda_graph():
    g = gen(12)
    cache, scale, table, lens = make_paged_cache([100, 700, 3], 64, 12, 20, False, g, "cuda")
    q = torch.randn(3, 1, 16, 576, generator=g).bfloat16().cuda()
    mla.decode_attention(q, cache, scale, table, lens, 0.1, True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = mla.decode_attention(q, cache, scale, table, lens, 0.1, True)
    lens.copy_(torch.tensor([64, 65, 0], dtype=torch.int32))  # new lengths, same buffers
    poison_(out), poison_(lse)
    graph.replay()
    with dsv2_kernels.kernels("none"):
        want_o, want_l = mla.decode_attention(q, cache, scale, table, lens, 0.1, True)
    assert_close(out, want_o, atol=2e-2, rtol=2e-2, what="graph out")
    assert_close(lse, want_l, atol=1e-3, rtol=0, what="graph lse")


@pytest.mark.gpu
@requires_cuda_kernel("prefill_attention")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_prefill_attention(dtype, causal):
    g = gen(13)
    seqs = [(1, 1), (700, 700), (128, 1000), (0, 50), (33, 0), (64, 16), (257, 300)]
    q, k, v, cu_q, cu_k = _prefill_inputs(seqs, 16, 192, 128, dtype, g)
    q, k, v, cu_q, cu_k = (t.cuda() for t in (q, k, v, cu_q, cu_k))
    args = (cu_q, cu_k, max(s[0] for s in seqs), max(s[1] for s in seqs), 192**-0.5, causal)
    with dsv2_kernels.kernels("none"):
        want_o, want_l = mla.prefill_attention(q, k, v, *args)
    got_o, got_l = mla.prefill_attention(q, k, v, *args)
    # fp32 softmax with P rounded to the input dtype for the PV product
    assert_close(got_o, want_o, atol=1.6e-2, rtol=1.6e-2, what="out")
    assert_close(got_l, want_l, atol=1e-3, rtol=0, what="lse")


@pytest.mark.gpu
@requires_cuda_kernel("merge_attention_states")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_merge_attention_states(dtype):
    g = gen(14)
    tokens, heads, dim = 333, 16, 128
    out_a, out_b = (torch.randn(tokens, heads, dim, generator=g).to(dtype).cuda() for _ in range(2))
    lse_a, lse_b = (torch.randn(heads, tokens, generator=g).cuda() * 5 for _ in range(2))
    lse_a[:, :10], lse_b[:, 5:15], lse_b[:, 20:25] = INF, INF, -INF  # empty parts (and both empty at 5..9)
    out_a[:10] = float("nan")  # an empty part's out is not read
    out_b[5:15] = float("nan")
    with dsv2_kernels.kernels("none"):
        want_o, want_l = mla.merge_attention_states(out_a, lse_a, out_b, lse_b)
    got_o, got_l = mla.merge_attention_states(out_a, lse_a, out_b, lse_b)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    assert_close(got_o, want_o, atol=tol, rtol=tol, what="out")
    assert_close(got_l, want_l, atol=1e-5, rtol=1e-6, what="lse")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["rope_q", "compress_kv", "decode_attention", "prefill_attention",
                                  "merge_attention_states"])
def test_kernel_bad_inputs_direct_op(name):
    """Calling the torch op directly skips the Python wrapper: the C++ entry must still reject bad metadata."""
    if not dsv2_kernels.has_cuda_kernel(name):
        pytest.skip(f"no CUDA kernel for {name}")
    ops, c = torch.ops.dsv2_kernels, (lambda t: t.cuda())  # noqa: E731
    cs = c(A["cs"])
    calls = {
        "rope_q": (lambda: ops.rope_q(c(torch.randn(2, 2, 32)), c(torch.tensor([0, 1])), cs), "'q_pe'"),
        "compress_kv": (lambda: ops.compress_kv(c(A["kv_a"]), c(A["w"]), 1e-6, c(A["pos"]), cs, c(A["slots"]),
                                                c(A["fcache"].clone()), None, False), "'kv_scale'"),
        "decode_attention": (lambda: ops.decode_attention(c(A["q"]), c(A["cache"]), None, c(A["table"].long()),
                                                          c(A["lens"]), 0.1, True), "'block_table'"),
        "prefill_attention": (lambda: ops.prefill_attention(c(torch.randn(5, 2, 192)).bfloat16(),
                                                            c(torch.randn(7, 2, 192)).half(),
                                                            c(torch.randn(7, 2, 128)).bfloat16(),
                                                            c(torch.tensor([0, 5], dtype=torch.int32)),
                                                            c(torch.tensor([0, 7], dtype=torch.int32)), 5, 7, 0.1,
                                                            True), "'k'"),
        "merge_attention_states": (lambda: ops.merge_attention_states(c(A["o"]), c(A["l"]), c(A["o"][:2]), c(A["l"])),
                                   "'out_b'"),
    }
    call, arg = calls[name]
    with pytest.raises(ValueError, match=f"{name}.*{arg}"):
        call()


def test_compress_kv_all_slots_skipped_leaves_cache_untouched():
    g = torch.Generator().manual_seed(7)
    kv_a = torch.randn(5, mla.KV_DIM, generator=g).bfloat16()
    cache = torch.randn(3, 4, mla.KV_DIM, generator=g).bfloat16()
    before = cache.clone()
    cos_sin = mla.rope_cos_sin_cache(max_position=64)
    mla.compress_kv(kv_a, torch.rand(512, generator=g) + 0.5, 1e-6, torch.arange(5), cos_sin,
                    torch.full((5,), -1), cache)
    assert torch.equal(cache, before)


@pytest.mark.gpu
def test_references_capture_in_cuda_graph():
    """The runner captures its decode step, reference path included: compress_kv and decode_attention's references
    must not sync the host (a sync inside capture raises)."""
    dev, g = "cuda", torch.Generator(device="cuda").manual_seed(3)
    B, H, blocks, bs = 4, 16, 24, 16
    cache = torch.randn(blocks, bs, mla.KV_DIM, device=dev, generator=g).bfloat16()
    table = torch.randperm(blocks, device=dev, generator=g)[: B * 6].view(B, 6).int()
    lens = torch.tensor([0, 5, 40, 96], device=dev, dtype=torch.int32)
    q = torch.randn(B, 1, H, mla.KV_DIM, device=dev, generator=g).bfloat16()
    kv_a = torch.randn(B, mla.KV_DIM, device=dev, generator=g).bfloat16()
    w = torch.rand(512, device=dev, generator=g) + 0.5
    cos_sin = mla.rope_cos_sin_cache(max_position=128, device=dev)
    slots = torch.tensor([-1, 3, 77, 200], device=dev)
    pos = torch.tensor([0, 4, 39, 95], device=dev)
    with dsv2_kernels.kernels("none"):
        want_cache = cache.clone()
        mla.compress_kv(kv_a, w, 1e-6, pos, cos_sin, slots, want_cache)
        want = mla.decode_attention(q, want_cache, None, table, lens, 0.1, True)
        graph = torch.cuda.CUDAGraph()
        dsv2_kernels.set_value_checks(False)
        try:
            with torch.cuda.graph(graph):
                mla.compress_kv(kv_a, w, 1e-6, pos, cos_sin, slots, cache)
                got = mla.decode_attention(q, cache, None, table, lens, 0.1, True)
        finally:
            dsv2_kernels.set_value_checks(True)
        graph.replay()
    assert torch.equal(cache, want_cache)
    assert_close(got[0], want[0], atol=1e-2, rtol=1e-2, what="out")
    assert_close(got[1], want[1], atol=1e-4, rtol=1e-4, what="lse")
