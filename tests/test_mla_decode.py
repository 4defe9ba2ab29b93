"""GPU tests of the MLA decode kernel (csrc/mla/decode_*.cu) against the fp32 reference (``kernels("none")``): a grid
over batch, s_q, lengths (zero, shorter than s_q, one page, many splits), heads (row blocks of 64, padded), page
sizes and cache dtype (s_q * H <= 32 runs the narrow kernel; DSV2_DECODE_NARROW=0 forces the 64-row one), with
random block tables, unused pages NaN-poisoned and unused table entries out of range;
CUDA-graph replay with new lengths; direct torch.ops calls with bad metadata or bad values (value checks off: no
crash, no out-of-bounds access; run under compute-sanitizer via tests/sanitize.sh)."""

import pytest
import torch

import dsv2_kernels
from dsv2_kernels import mla
from tests.conftest import assert_close, poison_, requires_cuda_kernel
from tests.test_mla_ref import V2_YARN, make_paged_cache

pytestmark = [pytest.mark.gpu, requires_cuda_kernel("decode_attention")]

# bf16 cache: exact scores in fp32, P rounded to bf16 for the PV product, bf16 output. FP8 cache: the kernel now
# applies the per-token scales in fp32 (scores as exact as the bf16 cache's; P times the value scale rounded to
# bf16), so it should meet the bf16 tolerances too; the looser ones date from the former dequantization to bf16
# (one more rounding of 2^-9 relative, which with the test's large logits, |q.k| * scale ~ 50, moved a peaked
# softmax by a few percent: 1 of 8.4M outputs reached 0.056 at B=128 H=128) and are kept until measured on the GPU.
TOL = {False: (2e-2, 1e-3), True: (6e-2, 5e-2)}


def _inputs(seqlens, s_q, heads, block_size, fp8, seed):
    g = torch.Generator().manual_seed(seed)
    pages = [(n + block_size - 1) // block_size for n in seqlens]
    max_blocks = max(pages + [1]) + 1  # one spare column: out-of-range entries the kernel must never read
    cache, scale, table, lens = make_paged_cache(seqlens, block_size, max_blocks, sum(pages) + 3, fp8, g, "cuda")
    q = torch.randn(len(seqlens), s_q, heads, 576, generator=g).bfloat16().cuda()
    return q, cache, scale, table, lens


def _check(q, cache, scale, table, lens, causal=True, what=""):
    sm = mla.softmax_scale(192, V2_YARN)
    with dsv2_kernels.kernels("none"):
        want_o, want_l = mla.decode_attention(q, cache, scale, table, lens, sm, causal)
    got_o, got_l = mla.decode_attention(q, cache, scale, table, lens, sm, causal)
    assert got_o.shape == want_o.shape and got_o.dtype == torch.bfloat16 and got_o.is_contiguous()
    assert got_l.shape == want_l.shape and got_l.dtype == torch.float32 and got_l.is_contiguous()
    tol_o, tol_l = TOL[scale is not None]
    assert_close(got_o, want_o, atol=tol_o, rtol=tol_o, what=f"out {what}")
    assert_close(got_l, want_l, atol=tol_l, rtol=0, what=f"lse {what}")
    again = mla.decode_attention(q, cache, scale, table, lens, sm, causal)
    assert torch.equal(again[0], got_o) and torch.equal(again[1], got_l), "not deterministic"
    return got_o, got_l


def _lengths(spec, batch, g):
    if isinstance(spec, list):
        return spec
    return torch.randint(0, spec + 1, (batch,), generator=g).tolist()


# (batch, s_q, heads, lengths (a list, or the max of random lengths), block size)
GRID = [
    (1, 1, 1, [1], 64),
    (2, 2, 16, [20, 140], 16),
    (6, 4, 32, [0, 1, 3, 20, 140, 4096], 32),  # empty, shorter than s_q (rows that see nothing), ragged
    (5, 3, 20, [7, 64, 65, 0, 300], 48),  # 60 rows, an odd page size
    (3, 5, 16, [100, 1, 2000], 128),  # 80 rows: a second, mostly padded row block
    (64, 1, 64, 4096, 64),
    (128, 1, 128, 4096, 128),  # two row blocks
    (128, 2, 16, [4096] * 128, 64),
    (6, 2, 128, [16384, 0, 1, 5000, 64, 129], 64),  # four row blocks
    (2, 1, 128, [16384, 16384], 64),  # many splits per sequence
    (1, 2, 64, [16384], 32),
    (33, 1, 128, 2560, 16),
    # s_q * H <= 32: the narrow kernel (N = 16 or 32 query columns; decode_attention_narrow.cu)
    (6, 4, 8, [0, 1, 3, 20, 140, 4096], 32),  # 32 rows: empty, shorter than s_q, ragged
    (5, 3, 5, [7, 64, 65, 0, 300], 48),  # 15 rows (N = 16), odd page size
    (4, 1, 32, [16384, 5, 0, 3000], 128),  # 32 rows at s_q = 1, many splits, page 128
    (3, 2, 12, [100, 1, 2000], 64),  # 24 rows: padded columns of N = 32
    (2, 1, 16, [16384, 16384], 16),  # many splits per sequence, page 16
]


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("batch, s_q, heads, lens, block_size", GRID,
                         ids=[f"B{c[0]}-sq{c[1]}-H{c[2]}-bs{c[4]}" for c in GRID])
def test_decode_grid(batch, s_q, heads, lens, block_size, fp8):
    g = torch.Generator().manual_seed(batch * 7 + s_q)
    seqlens = _lengths(lens, batch, g)
    inputs = _inputs(seqlens, s_q, heads, block_size, fp8, seed=batch + heads)
    _check(*inputs, what=f"lens={seqlens[:8]}")


# H8 / H5 at s_q = 3: 24 / 15 query rows, the narrow kernel with N = 32 / 16 (FP8: the pipelined kernel).
@pytest.mark.parametrize("heads", [16, 8, 5], ids=["H16", "H8-narrow", "H5-narrow16"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_decode_not_causal_and_strided_q(fp8, heads):
    q, cache, scale, table, lens = _inputs([3, 0, 700, 64], 3, heads, 64, fp8, seed=5)
    _check(q, cache, scale, table, lens, causal=False, what="non-causal")
    # Rows of q strided (a slice of a wider buffer): 16-byte aligned strides are read in place, others copied.
    for width in (640, 580):
        wide = torch.randn(*q.shape[:3], width, device="cuda").bfloat16()
        wide[..., :576] = q
        _check(wide[..., :576], cache, scale, table, lens, what=f"q width {width}")


@pytest.mark.parametrize("heads", [16, 8, 4], ids=["H16", "H8-narrow", "H4-narrow16"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_decode_per_request_query_lengths(fp8, heads):
    """Speculative decoding with a different number of new tokens n_b per request: each request's queries
    right-aligned in q [B, s_q_max] (padding rows first) give exactly what a call with s_q = n_b gives that request."""
    lens, new, s_max = [300, 7, 64, 1000, 2, 129], [3, 1, 4, 2, 2, 4], 4
    q, cache, scale, table, seqlens = _inputs(lens, s_max, heads, 32, fp8, seed=12)
    sm = mla.softmax_scale(192, V2_YARN)
    out, lse = mla.decode_attention(q, cache, scale, table, seqlens, sm, True)
    tol_o, tol_l = TOL[fp8]
    for b, n in enumerate(new):
        with dsv2_kernels.kernels("none"):
            want_o, want_l = mla.decode_attention(q[b:b + 1, s_max - n:], cache, scale, table[b:b + 1],
                                                  seqlens[b:b + 1], sm, True)
        assert_close(out[b:b + 1, s_max - n:], want_o, atol=tol_o, rtol=tol_o, what=f"out of request {b}")
        assert_close(lse[b:b + 1, :, s_max - n:], want_l, atol=tol_l, rtol=0, what=f"lse of request {b}")


# Narrow shapes (s_q * H <= 32) on both kernels: DSV2_DECODE_NARROW=0 sends them to the 64-row kernel (A/B).
NARROW = [(128, 1, 16, 4096, 64), (128, 2, 16, [4096] * 128, 64), (8, 1, 32, 3000, 64), (6, 4, 8, 2000, 16)]


@pytest.mark.parametrize("wide", [False, True], ids=["narrow", "wide"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("batch, s_q, heads, lens, block_size", NARROW,
                         ids=[f"B{c[0]}-sq{c[1]}-H{c[2]}-bs{c[4]}" for c in NARROW])
def test_decode_narrow_shapes_both_kernels(batch, s_q, heads, lens, block_size, fp8, wide, monkeypatch):
    if wide:
        monkeypatch.setenv("DSV2_DECODE_NARROW", "0")
    g = torch.Generator().manual_seed(batch * 5 + heads)
    seqlens = _lengths(lens, batch, g)
    inputs = _inputs(seqlens, s_q, heads, block_size, fp8, seed=batch + s_q)
    _check(*inputs, what=f"{'wide' if wide else 'narrow'} lens={seqlens[:8]}")


# FP8 at s_q * H <= 32 runs the pipelined kernel (f16 MMAs, N = 16 or 32) by default; DSV2_DECODE_FP8_PIPE=0 the
# one-stage kernel (the A/B variant). N = 32: 32 rows at s_q = 1 and 2 (all columns used), 24 rows (8 padded).
PIPE = [(128, 1, 16, 4096, 64), (5, 3, 5, [7, 64, 65, 0, 300], 48), (2, 1, 16, [16384, 16384], 16),
        (64, 1, 32, 4096, 64), (64, 2, 16, [4096] * 64, 64), (6, 3, 8, [0, 1, 3, 20, 140, 4096], 32),
        (2, 1, 32, [16384, 16384], 16)]


@pytest.mark.parametrize("pipe", ["1", "0"], ids=["pipelined", "one-stage"])
@pytest.mark.parametrize("batch, s_q, heads, lens, block_size", PIPE,
                         ids=[f"B{c[0]}-sq{c[1]}-H{c[2]}-bs{c[4]}" for c in PIPE])
def test_decode_fp8_narrow_variants(batch, s_q, heads, lens, block_size, pipe, monkeypatch):
    monkeypatch.setenv("DSV2_DECODE_FP8_PIPE", pipe)
    g = torch.Generator().manual_seed(batch * 3 + heads)
    seqlens = _lengths(lens, batch, g)
    _check(*_inputs(seqlens, s_q, heads, block_size, True, seed=batch + 2 * s_q), what=f"pipe={pipe}")


# (query magnitude exponent, lowest cache scale exponent): scales span 2^sc_lo .. 2^(sc_lo + 24)
WIDE = [(-30, -20), (0, -20), (30, -20), (0, -4)]


@pytest.mark.parametrize("heads", [16, 32, 128], ids=["H16", "H32", "H128"])
@pytest.mark.parametrize("q_exp, sc_lo", WIDE, ids=[f"q2^{q}-scales2^{s}" for q, s in WIDE])
def test_decode_fp8_wide_scales(q_exp, sc_lo, heads):
    """FP8 cache whose per-token scales (c_kv and k_pe) span 24 binades inside every tile, and query rows of
    magnitudes 2^(q_exp - 8) .. 2^(q_exp + 8) in one call (the softmax scale compensating both). Both e4m3 kernels
    (the pipelined narrow one at H = 16 and 32, the 64-row one at H = 128) run their MMAs in f16 and move these
    magnitudes into power-of-two fp32 factors (per query row for Q, per tile for P s_c): q rows of 2^-38 or 2^38, or
    values up to 2^20 * 448, do not fit f16 otherwise."""
    q, cache, scale, table, lens = _inputs([4096, 130, 64, 1, 700], 1, heads, 64, True, seed=21)
    g = torch.Generator().manual_seed(22)
    wide = torch.exp2(torch.rand(scale.shape, generator=g) * 24 + sc_lo).to(scale.device)
    scale = torch.where(scale.isnan(), scale, wide)  # unused slots stay NaN-poisoned
    row_exp = torch.tensor([q_exp + 4 * (h % 5) - 8 for h in range(heads)], dtype=torch.float32)
    q = (q.float() * torch.exp2(row_exp).view(1, 1, heads, 1).to(q.device)).bfloat16()
    sm = 2e-4 * 2.0 ** -(q_exp + sc_lo + 20)
    with dsv2_kernels.kernels("none"):
        want_o, want_l = mla.decode_attention(q, cache, scale, table, lens, sm, True)
    got_o, got_l = mla.decode_attention(q, cache, scale, table, lens, sm, True)
    tol_l = TOL[True][1]
    # Values scale with the cache scales, and here output rows range over many binades: errors are measured against
    # each row's magnitude (its largest |out|, at least 2^(sc_lo + 20), the default case's unit). P enters the PV
    # product as f16 (2^-11 relative per token), and a row's elements are sums over tokens that can cancel: an element
    # near 0 in a row of magnitude ~2e3 carries the row's absolute error. A CPU emulation of the kernel's numerics
    # (f16 Q and P, per-tile sigma) gives 0.41 at the element of H = 32, q_exp = 0 that measured 0.36 (row max 1758).
    # Tolerance 1e-2 of the row max: f16 P (2^-11), bf16 output (2^-9) and fp32 sums stay below 3e-3 of it.
    row = want_o.abs().amax(-1, keepdim=True).clamp_min(2.0 ** (sc_lo + 20))
    assert_close(got_o / row, want_o / row, atol=1e-2, rtol=1e-2, what=f"out q_exp={q_exp} sc_lo={sc_lo}")
    assert_close(got_l, want_l, atol=tol_l, rtol=0, what=f"lse q_exp={q_exp} sc_lo={sc_lo}")


def test_decode_all_empty():
    q, cache, scale, table, lens = _inputs([0, 0, 0], 2, 16, 64, False, seed=6)
    out, lse = _check(q, cache, scale, table, lens)
    assert (out == 0).all() and (lse == float("inf")).all()


@pytest.mark.parametrize("heads", [32, 16, 8], ids=["H32", "H16-narrow", "H8-narrow16"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_decode_cuda_graph_new_lengths(fp8, heads):
    # The cache holds full pages (47, 1, 1, 16 of 64 tokens) so that every new length below reads written rows only;
    # the graph is captured with shorter lengths.
    q, cache, scale, table, lens = _inputs([47 * 64, 64, 64, 16 * 64], 2, heads, 64, fp8, seed=7)
    lens.copy_(torch.tensor([3000, 5, 64, 1000], dtype=torch.int32))
    sm = 0.1
    mla.decode_attention(q, cache, scale, table, lens, sm, True)
    dsv2_kernels.set_value_checks(False)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, lse = mla.decode_attention(q, cache, scale, table, lens, sm, True)
    finally:
        dsv2_kernels.set_value_checks(True)
    # New lengths within each sequence's pages, same buffers.
    for new in ([3000, 5, 64, 1000], [0, 63, 1, 1024], [47 * 64, 64, 0, 0]):
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        poison_(out), poison_(lse)
        graph.replay()
        with dsv2_kernels.kernels("none"):
            want_o, want_l = mla.decode_attention(q, cache, scale, table, lens, sm, True)
        tol_o, tol_l = TOL[fp8]
        assert_close(out, want_o, atol=tol_o, rtol=tol_o, what=f"graph out {new}")
        assert_close(lse, want_l, atol=tol_l, rtol=0, what=f"graph lse {new}")


def test_decode_direct_op_bad_metadata():
    ops = torch.ops.dsv2_kernels
    q, cache, _, table, lens = _inputs([10, 70], 1, 16, 64, False, seed=8)
    fcache, fscale, _, _ = make_paged_cache([10, 70], 64, 3, 4, True, torch.Generator().manual_seed(1), "cuda")
    bad = [
        (lambda: ops.decode_attention(q.float(), cache, None, table, lens, 0.1, True), "'q'"),
        (lambda: ops.decode_attention(q[..., :512], cache, None, table, lens, 0.1, True), "'q'"),
        (lambda: ops.decode_attention(q, cache[..., :512].contiguous(), None, table, lens, 0.1, True), "'kv_cache'"),
        (lambda: ops.decode_attention(q, cache.transpose(0, 1), None, table, lens, 0.1, True), "'kv_cache'"),
        (lambda: ops.decode_attention(q, fcache, None, table, lens, 0.1, True), "'kv_scale'"),
        (lambda: ops.decode_attention(q, cache, fscale, table, lens, 0.1, True), "'kv_scale'"),
        (lambda: ops.decode_attention(q, fcache, fscale[..., :1].contiguous(), table, lens, 0.1, True), "'kv_scale'"),
        (lambda: ops.decode_attention(q, cache, None, table[:1], lens, 0.1, True), "'block_table'"),
        (lambda: ops.decode_attention(q, cache, None, table, lens.long(), 0.1, True), "'cache_seqlens'"),
        (lambda: ops.decode_attention(q, cache, None, table, lens, 0.0, True), "'softmax_scale'"),
        (lambda: ops.decode_attention(q, cache, None, table, lens.cpu(), 0.1, True), "'cache_seqlens'"),
    ]
    for call, arg in bad:
        with pytest.raises(ValueError, match=f"decode_attention.*{arg}"):
            call()


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_decode_direct_op_bad_values_stay_in_bounds(fp8):
    """Value checks are the wrapper's job; the kernel only has to stay in bounds for any table/length values."""
    ops = torch.ops.dsv2_kernels
    q, cache, scale, table, lens = _inputs([100, 70, 5], 2, 16, 32, fp8, seed=9)
    table = table.clone()
    table[0, 1] = 10**6  # a used entry out of range
    table[1, 0] = -5
    for bad_lens in ([100, 70, 5], [10**6, -3, 5], [2**31 - 1, 0, -(2**31)]):
        ops.decode_attention(q, cache, scale, table, torch.tensor(bad_lens, dtype=torch.int32, device="cuda"), 0.1,
                             True)
    torch.cuda.synchronize()  # an illegal address would surface here (and in compute-sanitizer)
