"""FP8 family: quantizers and block-scaled GEMM references vs straightforward float64 math (CPU), bad inputs, fake
impls under torch.compile, and kernel vs reference on the GPU."""

import numpy as np
import pytest
import torch

import dsv2_kernels
from dsv2_kernels import OpError, fp8
from tests.conftest import assert_close, poison_, requires_cuda_kernel

FP8 = torch.float8_e4m3fn


# ---- independent float64 math ----------------------------------------------------------------------------------
def e4m3_round(v: np.ndarray) -> np.ndarray:
    """Round float64 to the nearest e4m3fn value (ties to even), saturating at 448. Normal binade 2^e (e >= -6) has
    3 mantissa bits, so its step is 2^(e-3); subnormals keep the step of the lowest binade, 2^-9."""
    a = np.abs(v)
    _, ex = np.frexp(a)  # a = m * 2^ex with m in [0.5, 1): binade exponent ex - 1, exact (no log2 rounding)
    step = np.exp2(np.maximum(ex - 1, -6) - 3.0)
    return np.sign(v) * np.minimum(np.round(a / step) * step, 448.0)  # np.round rounds halves to even


def near_tie(v: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Where v/step is within eps of a rounding midpoint: fp32 and float64 division may round these differently."""
    a = np.abs(v)
    _, ex = np.frexp(a)
    t = a / np.exp2(np.maximum(ex - 1, -6) - 3.0)
    return np.abs(t - np.floor(t) - 0.5) < eps


def naive_quant_groups(x: torch.Tensor, group_size: int):
    """Row by row, group by group in float64: (q values as float64 [..., K], scales float64 [..., K/g], x / scale)."""
    x64 = x.double().numpy().reshape(-1, x.shape[-1])
    groups = x.shape[-1] // group_size
    scales = np.empty((x64.shape[0], groups))
    v = np.empty_like(x64)
    for r in range(x64.shape[0]):
        for g in range(groups):
            cols = slice(g * group_size, (g + 1) * group_size)
            scales[r, g] = max(np.abs(x64[r, cols]).max(), 1e-10) / 448.0
            v[r, cols] = x64[r, cols] / scales[r, g]
    return e4m3_round(v).reshape(x.shape), scales.reshape(*x.shape[:-1], groups), v.reshape(x.shape)


def assert_quant_matches(q, scales, x, group_size, what):
    """q/scales from the reference against the float64 quantization of x (scales: one fp32 rounding; q: bit-exact
    except at rounding midpoints, where it may be one e4m3 step off)."""
    want_q, want_s, v = naive_quant_groups(x, group_size)
    assert q.dtype == FP8 and q.is_contiguous() and scales.dtype == torch.float32
    assert_close(scales, torch.from_numpy(want_s), atol=0, rtol=1.2e-7, what=f"{what} scales")
    got = q.float().double().numpy()
    tie = near_tie(v)
    assert np.array_equal(got[~tie], want_q[~tie]), f"{what}: q differs from float64 rounding"
    # At a midpoint (frequent for bf16 inputs: x * 448 / amax is often a short binary fraction) either neighbour is
    # fine: fp32 rounding of the scale decides which side of the exact midpoint the quotient falls.
    half_step = np.exp2(np.maximum(np.frexp(np.abs(v))[1] - 1, -6) - 4.0)
    assert np.all(np.abs(got - v)[tie] <= half_step[tie] * (1 + 1e-4)), f"{what}: q off by more than half a step"
    # The largest magnitude of every group maps to exactly +-448.
    x2 = x.double().reshape(-1, x.shape[-1] // group_size, group_size)
    idx = x2.abs().argmax(-1, keepdim=True)
    amax_q = torch.from_numpy(got).reshape(x2.shape).gather(-1, idx)
    nonzero = x2.abs().amax(-1, keepdim=True) > 0
    want_amax = torch.where(nonzero, x2.gather(-1, idx).sign() * 448.0, torch.zeros_like(amax_q))
    assert torch.equal(amax_q, want_amax), f"{what}: a group's amax element did not map to +-448"


def naive_gemm_per_block(a, a_scales, b, b_scales) -> torch.Tensor:
    """float64: dequantize each 128-wide K block of a and b, multiply block by block, add the block products."""
    (m, k), n = a.shape, b.shape[0]
    kb = k // 128
    a3 = a.double().reshape(m, kb, 128) * a_scales.double()[:, :, None]
    b_rows = b_scales.double().repeat_interleave(128, 0)[:n]
    b3 = b.double().reshape(n, kb, 128) * b_rows[:, :, None]
    return torch.einsum("mkc,nkc->kmn", a3, b3).sum(0)


def make_gemm_inputs(m, n, k, g, column_major=False, n_experts=None):
    """Fresh random activations and weights, quantized with the references (weights with varying block scales).
    Made on the generator's device."""
    dev = g.device
    x = torch.randn(m, k, generator=g, device=dev) * (torch.rand(m, 1, generator=g, device=dev) * 4 + 0.1)
    wshape = (n, k) if n_experts is None else (n_experts, n, k)
    w = torch.randn(wshape, generator=g, device=dev) * 0.05
    w = w * (torch.rand(*wshape[:-2], 1, k, generator=g, device=dev) + 0.5)
    a, sa = fp8.quant_per_token_group_ref(x, 128, column_major)
    b, sb = fp8.quant_weight_block_ref(w, 128)
    return a, sa, b, sb


# ---- quantizers ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, group_size", [((1, 256), 128), ((5, 384), 128), ((3, 4, 256), 128), ((6, 192), 64)])
@pytest.mark.parametrize("column_major", [False, True])
def test_quant_per_token_group_reference(dtype, shape, group_size, column_major):
    g = torch.Generator().manual_seed(sum(shape) + group_size)
    x = (torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[-1]).roll(7)).to(dtype)
    x[..., 0, :group_size] = 0  # an all-zero group: scale 1e-10 / 448, q zeros
    x[..., -1, -group_size:] = -x[..., -1, -group_size:].abs() - 0.25  # an all-negative group
    q, s = fp8.quant_per_token_group(x, group_size, column_major)
    assert_quant_matches(q, s, x, group_size, f"quant {shape}")
    assert torch.all(q[..., 0, :group_size].float() == 0)
    assert s[..., 0, 0].eq(torch.tensor(1e-10, dtype=torch.float32) / 448).all()
    assert torch.equal(s, fp8.quant_per_token_group_ref(x, group_size, False)[1])  # same values in either layout


def test_quant_amax_exactly_representable():
    """Groups whose amax is known: the amax element maps to exactly +-448, and every element whose value is an e4m3
    number times amax / 448 comes back as that number."""
    vals = torch.tensor([448.0, -448.0, 224.0, 1.0, -0.5, 0.015625, 2.0**-9])
    x = torch.rand(2, 128) * 0.5  # below every listed value's magnitude except the smallest ones: the amax is 448
    for r, unit in enumerate((3.0 / 448, 2.0**-20 / 448)):  # scale 3/448, and a tiny but nonzero amax
        x[r] *= unit
        x[r, : vals.numel()] = vals * unit
    q, s = fp8.quant_per_token_group_ref(x)
    for r in range(2):
        assert torch.equal(q[r, : vals.numel()].float(), vals), q[r, : vals.numel()]
    assert_quant_matches(q, s, x, 128, "exact amax")


def test_column_major_scale_layout():
    for m in (0, 1, 3, 4, 5, 8, 13):
        x = torch.randn(m, 512)
        _, s = fp8.quant_per_token_group(x, 128, True)
        m_pad = (m + 3) // 4 * 4
        assert s.shape == (m, 4) and s.stride() == (1, m_pad), (m, s.stride())
        assert (s.stride(1) * 4) % 16 == 0  # every column starts 16-byte aligned
        _, s3 = fp8.quant_per_token_group(torch.randn(2, m, 256), 128, True)
        assert s3.shape == (2, m, 2) and s3.stride() == (2 * m_pad, 1, m_pad)
        _, srow = fp8.quant_per_token_group(x, 128, False)
        assert srow.is_contiguous() and torch.equal(s, srow)
    # strided rows in, contiguous q out
    base = torch.randn(6, 640)
    q, s = fp8.quant_per_token_group(base[:, 128:512], 128, True)
    assert q.is_contiguous() and q.shape == (6, 384)
    assert_quant_matches(q, s, base[:, 128:512], 128, "strided rows")


def test_dequant_per_token_group():
    x = torch.randn(3, 2, 256)
    q, s = fp8.quant_per_token_group_ref(x, 64, True)
    d = fp8.dequant_per_token_group(q, s)
    want = q.double().reshape(3, 2, 4, 64) * s.double()[..., None]
    assert_close(d, want.reshape(3, 2, 256), atol=0, rtol=1e-7, what="dequant")
    # e4m3 keeps 3 mantissa bits: each element within half a step (1/16 relative, or 2^-10 * scale when subnormal)
    bound = x.abs() / 16 + s.repeat_interleave(64, -1) * 2.0**-10 + 1e-12
    assert torch.all((d - x).abs() <= bound)


def naive_quant_weight(w: torch.Tensor, bs: int):
    w64 = w.double().numpy()
    n, k = w64.shape
    nb, kb = -(-n // bs), -(-k // bs)
    scales, v = np.empty((nb, kb)), np.empty_like(w64)
    for i in range(nb):
        for j in range(kb):
            blk = (slice(i * bs, (i + 1) * bs), slice(j * bs, (j + 1) * bs))
            scales[i, j] = max(np.abs(w64[blk]).max(), 1e-10) / 448.0
            v[blk] = w64[blk] / scales[i, j]
    return e4m3_round(v), scales, v


@pytest.mark.parametrize("shape, bs", [((300, 200), 128), ((128, 256), 128), ((129, 1), 128), ((3, 130, 70), 64),
                                       ((2, 256, 384), 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_weight_block_reference(shape, bs, dtype):
    g = torch.Generator().manual_seed(shape[-1] + bs)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    w[..., :bs, :bs] *= 1000  # blocks of very different scales
    q, s = fp8.quant_weight_block(w, bs)
    assert q.shape == w.shape and q.dtype == FP8 and q.is_contiguous() and s.is_contiguous()
    lead = shape[:-2]
    assert s.shape == (*lead, -(-shape[-2] // bs), -(-shape[-1] // bs))
    for e in np.ndindex(*lead):  # each expert of a stack is quantized on its own
        want_q, want_s, v = naive_quant_weight(w[e], bs)
        assert_close(s[e], torch.from_numpy(want_s), atol=0, rtol=1.2e-7, what="weight scales")
        tie = near_tie(v)
        assert np.array_equal(q[e].float().double().numpy()[~tie], want_q[~tie])
    d = fp8.dequant_weight_block(q, s, bs)
    full = s.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., : shape[-2], : shape[-1]]
    assert torch.all((d - w.float()).abs() <= w.float().abs() / 16 + full * 2.0**-10 + 1e-12)


@pytest.mark.parametrize("shape, group_size, column_major", [((4, 256), 128, False), ((3, 512), 128, True),
                                                             ((2, 3, 256), 64, True), ((1, 2816), 128, False)])
def test_silu_mul_quant_reference(shape, group_size, column_major):
    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(shape, generator=g) * 3).bfloat16()
    q, s = fp8.silu_mul_quant(x, group_size, column_major)
    n = shape[-1] // 2
    gate, up = x[..., :n].double(), x[..., n:].double()
    h = gate / (1 + torch.exp(-gate)) * up  # float64, from the definition of silu
    assert q.shape == (*shape[:-1], n) and s.shape == (*shape[:-1], n // group_size)
    if column_major:
        assert s.stride(-2) == 1
    # h is fp32 in the op (not rounded to bf16): its scale is amax/448 within fp32 rounding of h, and every q is the
    # float64 value rounded to e4m3 within half a step (plus slack for fp32-vs-float64 midpoint flips).
    want_q, want_s, v = naive_quant_groups(h, group_size)
    assert_close(s, torch.from_numpy(want_s), atol=0, rtol=1e-6, what="silu scales")
    err = np.abs(q.float().double().numpy() - v)
    step_half = np.exp2(np.maximum(np.frexp(np.abs(v))[1] - 1, -6) - 4.0)
    assert np.all(err <= step_half * (1 + 1e-4) + 1e-6)
    # bf16-rounded h would quantize differently somewhere: the op must match the fp32 path
    assert torch.equal(q, fp8.quant_per_token_group_ref(torch.nn.functional.silu(x[..., :n].float())
                                                         * x[..., n:].float(), group_size)[0])


# ---- GEMMs -----------------------------------------------------------------------------------------------------
GEMM_SHAPES = [(1, 128, 128), (7, 256, 384), (0, 128, 256), (5, 384, 128), (33, 2816, 2048), (4, 2048, 1408)]


@pytest.mark.parametrize("m, n, k", GEMM_SHAPES)
@pytest.mark.parametrize("column_major", [False, True])
def test_fp8_gemm_reference(m, n, k, column_major):
    g = torch.Generator().manual_seed(m * 7 + n + k)
    a, sa, b, sb = make_gemm_inputs(m, n, k, g, column_major)
    exact = naive_gemm_per_block(a, sa, b, sb)
    acc = fp8.fp8_gemm_ref(a, sa, b, sb, out_dtype=torch.float32)
    # fp32 accumulation of exact-ish block products: relative error 1e-5 of the output's scale (stated tolerance)
    scale = exact.abs().max().item() if exact.numel() else 1.0
    assert_close(acc, exact, atol=1e-5 * scale, rtol=1e-5, what="fp32 accumulator")
    out = fp8.fp8_gemm(a, sa, b, sb)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert torch.equal(out, acc.bfloat16())
    # per-block product == product of the dequantized operands (block scales are constant within a block); the
    # dequant helpers round each element to fp32 first, hence 1e-6
    full = fp8.dequant_per_token_group(a, sa).double() @ fp8.dequant_weight_block(b, sb).double().T
    assert_close(full, exact, atol=1e-6 * scale, rtol=1e-6, what="dequantized matmul")
    with dsv2_kernels.kernels("none"):
        assert torch.equal(fp8.fp8_gemm(a, sa, b, sb), out)


def test_fp8_gemm_strided_operands():
    g = torch.Generator().manual_seed(3)
    a, sa, b, sb = make_gemm_inputs(9, 256, 512, g)
    wide_a = torch.zeros(9, 640, dtype=torch.uint8).view(FP8)
    wide_a[:, 128:640] = a
    wide_s = torch.zeros(9, 8)
    wide_s[:, 2:6] = sa
    got = fp8.fp8_gemm(wide_a[:, 128:], wide_s[:, 2:6], b, sb)
    assert torch.equal(got, fp8.fp8_gemm(a, sa, b, sb))


def test_fp8_grouped_gemm_contiguous_reference():
    g = torch.Generator().manual_seed(4)
    e, n, k = 4, 256, 384
    # uneven segments, an empty expert (2), -1 padding rows, and rows not sorted by expert
    row_expert = torch.tensor([0] * 5 + [-1] * 3 + [3] * 7 + [1] * 2 + [-1] + [0, 3], dtype=torch.int32)
    a, sa, b, sb = make_gemm_inputs(row_expert.numel(), n, k, g, column_major=True, n_experts=e)
    out = fp8.fp8_grouped_gemm_contiguous(a, sa, b, sb, row_expert)
    assert out.shape == (row_expert.numel(), n) and out.dtype == torch.bfloat16
    for r, ex in enumerate(row_expert.tolist()):
        if ex < 0:
            assert torch.all(out[r] == 0)
            continue
        # row by row: float64 matmul of the dequantized row and expert weight
        want = fp8.dequant_per_token_group(a[r : r + 1], sa[r : r + 1]).double() @ fp8.dequant_weight_block(
            b[ex], sb[ex]).double().T
        assert_close(out[r : r + 1], want, atol=1e-5 * want.abs().max().item(), rtol=4e-3, what=f"row {r}")
    empty = fp8.fp8_grouped_gemm_contiguous(a[:0], sa[:0], b, sb, row_expert[:0])
    assert empty.shape == (0, n)


def test_fp8_grouped_gemm_masked_reference():
    g = torch.Generator().manual_seed(5)
    e, max_m, n, k = 4, 6, 128, 256
    counts = torch.tensor([0, 1, 6, 9], dtype=torch.int32)  # empty, one row, full, above max_m (clamped)
    a, sa, b, sb = make_gemm_inputs(e * max_m, n, k, g, n_experts=e)
    a, sa = a.reshape(e, max_m, k), sa.reshape(e, max_m, 2)
    out = fp8.fp8_grouped_gemm_masked(a, sa, b, sb, counts)
    assert out.shape == (e, max_m, n) and out.dtype == torch.bfloat16
    for ex, c in enumerate(counts.tolist()):
        c = min(c, max_m)
        want = naive_gemm_per_block(a[ex, :c], sa[ex, :c], b[ex], sb[ex])
        if c:
            assert_close(out[ex, :c], want, atol=1e-5 * want.abs().max().item(), rtol=4e-3, what=f"expert {ex}")
        assert torch.all(out[ex, c:] == 0)
    # per-expert column-major scales read the same
    _, sa_cm = fp8.quant_per_token_group_ref(fp8.dequant_per_token_group(a, sa), 128, True)
    assert sa_cm.stride(-2) == 1
    assert torch.equal(fp8.fp8_grouped_gemm_masked(a, sa_cm, b, sb, counts), out)


# ---- bad inputs ------------------------------------------------------------------------------------------------
def _gemm_args(m=4, n=256, k=256, experts=None):
    a = torch.randn(m, k).to(FP8)
    sa = torch.rand(m, k // 128)
    if experts is None:
        return a, sa, torch.randn(n, k).to(FP8), torch.rand(n // 128, k // 128)
    return a, sa, torch.randn(experts, n, k).to(FP8), torch.rand(experts, n // 128, k // 128)


def _bad_cases():
    a, sa, b, sb = _gemm_args()
    ga, gsa, gb, gsb = _gemm_args(m=6, experts=3)
    re = torch.tensor([0, 0, -1, 2, 2, 1], dtype=torch.int32)
    ma, msa = ga.reshape(3, 2, 256), gsa.reshape(3, 2, 2)
    cnt = torch.tensor([1, 0, 2], dtype=torch.int32)
    q, gg, mm = fp8.quant_per_token_group, fp8.fp8_grouped_gemm_contiguous, fp8.fp8_grouped_gemm_masked
    return [
        (lambda: q(torch.randn(4, 256).double()), "quant_per_token_group.*'x'.*dtype"),
        (lambda: q(torch.randn(256)), "quant_per_token_group.*'x'.*dimensions"),
        (lambda: q(torch.randn(4, 200)), "quant_per_token_group.*'x'.*multiple"),
        (lambda: q(torch.randn(4, 0)), "quant_per_token_group.*'x'.*multiple"),
        (lambda: q(torch.randn(4, 256), 32), "quant_per_token_group.*'group_size'"),
        (lambda: q(torch.randn(256, 4).t()), "quant_per_token_group.*'x'.*contiguous"),
        (lambda: fp8.silu_mul_quant(torch.randn(4, 384)), "silu_mul_quant.*'x'.*multiple"),
        (lambda: fp8.silu_mul_quant(torch.randn(4, 256).int()), "silu_mul_quant.*'x'.*dtype"),
        (lambda: fp8.silu_mul_quant(torch.randn(4, 256), 100), "silu_mul_quant.*'group_size'"),
        (lambda: fp8.quant_weight_block(torch.randn(256)), "quant_weight_block.*'w'.*dimensions"),
        (lambda: fp8.quant_weight_block(torch.randn(256, 256), 96), "quant_weight_block.*'block_size'"),
        (lambda: fp8.quant_weight_block(torch.randn(256, 256).t()), "quant_weight_block.*'w'.*contiguous"),
        (lambda: fp8.fp8_gemm(a.float(), sa, b, sb), "fp8_gemm.*'a'.*dtype"),
        (lambda: fp8.fp8_gemm(a[None], sa, b, sb), "fp8_gemm.*'a'.*dimensions"),
        (lambda: fp8.fp8_gemm(a[:, :200], sa, b, sb), "fp8_gemm.*'a'.*128"),
        (lambda: fp8.fp8_gemm(a, sa, b[:, :128], sb), "fp8_gemm.*'b'.*K"),
        (lambda: fp8.fp8_gemm(a, sa, b[:200], sb), "fp8_gemm.*'b'.*multiple of 128"),
        (lambda: fp8.fp8_gemm(a, sa, b.float(), sb), "fp8_gemm.*'b'.*dtype"),
        (lambda: fp8.fp8_gemm(a, sa[:, :1], b, sb), "fp8_gemm.*'a_scales'.*shape"),
        (lambda: fp8.fp8_gemm(a, sa.bfloat16(), b, sb), "fp8_gemm.*'a_scales'.*dtype"),
        (lambda: fp8.fp8_gemm(a, torch.rand(8, 4)[::2, ::2], b, sb), "fp8_gemm.*'a_scales'.*row-major"),
        (lambda: fp8.fp8_gemm(a, sa, b, sb[:1]), "fp8_gemm.*'b_scales'.*shape"),
        (lambda: fp8.fp8_gemm(a, sa, b, sb.t().contiguous().t()), "fp8_gemm.*'b_scales'.*contiguous"),
        (lambda: fp8.fp8_gemm(a, sa, b.to("meta"), sb), "fp8_gemm.*one device"),
        (lambda: gg(ga, gsa, gb, gsb, re.long()), "fp8_grouped_gemm_contiguous.*'row_expert'.*dtype"),
        (lambda: gg(ga, gsa, gb, gsb, re[:5]), "fp8_grouped_gemm_contiguous.*'row_expert'.*shape"),
        (lambda: gg(ga, gsa, gb, gsb, re.clone().fill_(3)), "fp8_grouped_gemm_contiguous.*'row_expert'.*range"),
        (lambda: gg(ga, gsa, gb, gsb, re.clone().fill_(-2)), "fp8_grouped_gemm_contiguous.*'row_expert'.*-1"),
        (lambda: gg(ga, gsa, gb[0], gsb, re), "fp8_grouped_gemm_contiguous.*'b'.*dimensions"),
        (lambda: gg(ga, gsa, gb, gsb[0], re), "fp8_grouped_gemm_contiguous.*'b_scales'.*shape"),
        (lambda: gg(ga, gsa, gb[:, :, :128], gsb, re), "fp8_grouped_gemm_contiguous.*'b'.*K"),
        (lambda: mm(ma, msa, gb, gsb, cnt.clone().fill_(-1)), "fp8_grouped_gemm_masked.*'counts'.*>= 0"),
        (lambda: mm(ma, msa, gb, gsb, cnt[:2]), "fp8_grouped_gemm_masked.*'counts'.*shape"),
        (lambda: mm(ma, msa, gb, gsb, cnt.float()), "fp8_grouped_gemm_masked.*'counts'.*dtype"),
        (lambda: mm(ma, msa, gb[:2], gsb[:2], cnt), "fp8_grouped_gemm_masked.*'b'.*expert"),
        (lambda: mm(ga, gsa, gb, gsb, cnt), "fp8_grouped_gemm_masked.*'a'.*dimensions"),
        (lambda: mm(ma, msa[:, :1], gb, gsb, cnt), "fp8_grouped_gemm_masked.*'a_scales'.*shape"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs(case):
    call, match = _bad_cases()[case]
    with pytest.raises(OpError, match=match):
        call()
    with dsv2_kernels.kernels("none"), pytest.raises(OpError, match=match):
        call()


# ---- fake impls ------------------------------------------------------------------------------------------------
def _fake_cases():
    g = torch.Generator().manual_seed(6)
    a, sa, b, sb = make_gemm_inputs(5, 256, 384, g, column_major=True)
    ga, gsa, gb, gsb = make_gemm_inputs(6, 128, 256, g, n_experts=3)
    re = torch.tensor([0, 0, -1, 2, 2, 1], dtype=torch.int32)
    ops = torch.ops.dsv2_kernels
    return {
        "quant_row": (ops.quant_per_token_group, (torch.randn(5, 256).bfloat16(), 128, False)),
        "quant_col": (ops.quant_per_token_group, (torch.randn(7, 384)[:, :256], 64, True)),
        "quant_col_3d": (ops.quant_per_token_group, (torch.randn(2, 3, 256), 128, True)),
        "quant_weight": (ops.quant_weight_block, (torch.randn(300, 200), 128)),
        "quant_weight_3d": (ops.quant_weight_block, (torch.randn(2, 130, 256).bfloat16(), 128)),
        "silu_mul_quant": (ops.silu_mul_quant, (torch.randn(5, 512).bfloat16(), 128, True)),
        "silu_mul_quant_3d": (ops.silu_mul_quant, (torch.randn(2, 5, 256), 128, False)),
        "fp8_gemm": (ops.fp8_gemm, (a, sa, b, sb)),
        "fp8_gemm_m0": (ops.fp8_gemm, (a[:0], sa[:0], b, sb)),
        "grouped_contiguous": (ops.fp8_grouped_gemm_contiguous, (ga, gsa, gb, gsb, re)),
        "grouped_masked": (ops.fp8_grouped_gemm_masked, (ga.reshape(3, 2, 256), gsa.reshape(3, 2, 2), gb, gsb,
                                                         torch.tensor([2, 0, 5], dtype=torch.int32))),
    }


def _meta(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [(tuple(o.shape), o.dtype, o.stride()) for o in outs]


@pytest.mark.parametrize("name", list(_fake_cases()))
def test_fake_impl_under_compile(name):
    op, args = _fake_cases()[name]
    torch._dynamo.reset()  # every case compiles the same code object: start each from a clean cache

    def f(*xs):
        out = op(*xs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return outs, [o.stride() for o in outs]  # strides traced from the fake impl become graph constants

    outs, strides = torch.compile(f, fullgraph=True, backend="eager")(*args)
    want = op(*args)
    assert _meta(outs) == _meta(want)
    assert [tuple(s) for s in strides] == [m[2] for m in _meta(want)], "fake strides differ from the real ones"
    with torch._subclasses.FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in args]
        assert _meta(op(*fake_args)) == _meta(want)


def test_fake_column_major_dynamic_m():
    op = torch.ops.dsv2_kernels.quant_per_token_group
    torch._dynamo.reset()
    f = torch.compile(lambda x: op(x, 128, True)[1] * 2, fullgraph=True, backend="eager", dynamic=True)
    for m in (3, 6, 9):
        x = torch.randn(m, 256)
        assert torch.equal(f(x), op(x, 128, True)[1] * 2)


# ---- GPU: kernel vs reference ----------------------------------------------------------------------------------
# Quantizers: scales agree to 1e-6 relative (fp32 amax / 448) and q may differ by one e4m3 step where the fp32
# quotient sits on a rounding midpoint: at most 0.1% of elements. silu_mul_quant computes silu with ex2.approx /
# rcp.approx (fp8_quant::silu: ~1e-6 relative at most for gates >= -10, < 4e-6 down to -87) and its bf16 kernel
# quantizes as h * (1 / scale): scales within 1e-5 relative, q within one step (at most 0.1% of elements off), same
# signed zeros, and the reference's inf/NaN scales and NaN positions.
# GEMMs: the same quantized inputs, bf16 outputs within 1e-2 relative (atol 1e-3 of the output's largest magnitude).
def _assert_quant_kernel_matches(got, want, what, scale_rtol=1e-6):
    (gq, gs), (wq, ws) = got, want
    assert gq.shape == wq.shape and gq.dtype == FP8 and gq.is_contiguous(), what
    assert gs.shape == ws.shape and gs.stride() == ws.stride(), f"{what}: scale strides {gs.stride()} != {ws.stride()}"
    assert_close(gs, ws, atol=0, rtol=scale_rtol, what=f"{what} scales")
    gf, wf = gq.float(), wq.float()
    differ = gf != wf
    assert differ.sum().item() <= 1e-3 * differ.numel(), f"{what}: {differ.sum().item()} q values differ"
    step = torch.exp2(torch.floor(torch.log2(wf.abs().clamp_min(2.0**-6))) - 3)
    assert torch.all((gf - wf).abs() <= step), f"{what}: q differs by more than one e4m3 step"


@pytest.mark.gpu
@requires_cuda_kernel("quant_per_token_group")
@pytest.mark.parametrize("shape", [(1, 128), (7, 2048), (33, 5120), (0, 256), (4096, 7168), (3, 5, 1408 * 2),
                                   (513, 576)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group_size", [128, 64])
@pytest.mark.parametrize("column_major", [False, True])
def test_kernel_quant_per_token_group(shape, dtype, group_size, column_major):
    if shape[-1] % group_size:
        pytest.skip("K not a multiple of the group")
    g = torch.Generator(device="cuda").manual_seed(shape[-1])
    x = (torch.randn(shape, device="cuda", generator=g) * 5).to(dtype)
    if x.numel():
        x.view(-1, shape[-1])[0, :group_size] = 0
    with dsv2_kernels.kernels("none"):
        want = fp8.quant_per_token_group(x, group_size, column_major)
    _assert_quant_kernel_matches(fp8.quant_per_token_group(x, group_size, column_major), want, f"quant {shape}")


@pytest.mark.gpu
@requires_cuda_kernel("quant_per_token_group")
def test_kernel_quant_strided_rows():
    base = torch.randn(64, 2048 + 256, device="cuda", dtype=torch.bfloat16)
    for x in (base[:, :2048], base[:, 128:2176], base[::3, 256:]):
        with dsv2_kernels.kernels("none"):
            want = fp8.quant_per_token_group(x, 128, True)
        _assert_quant_kernel_matches(fp8.quant_per_token_group(x, 128, True), want, f"strides {x.stride()}")


SILU_SCALE_RTOL = 1e-5  # fast exp2/rcp silu: a few 1e-6 relative at worst (see the note above)


def _assert_silu_matches(got, want, what):
    """_assert_quant_kernel_matches with silu's scale tolerance, for outputs that may hold NaN (compared by position)
    and with the sign of every zero q checked (the step tolerance alone would let -0 for +0 slip)."""
    (gq, gs), (wq, ws) = got, want
    assert gq.shape == wq.shape and gq.dtype == FP8 and gq.is_contiguous(), what
    assert gs.shape == ws.shape and gs.stride() == ws.stride(), f"{what}: scale strides {gs.stride()} != {ws.stride()}"
    assert_close(gs, ws, atol=0, rtol=SILU_SCALE_RTOL, what=f"{what} scales")  # inf == inf, NaN where NaN
    gf, wf = gq.float(), wq.float()
    nan = wf.isnan()
    assert torch.equal(gf.isnan(), nan), f"{what}: NaN positions differ"
    gf, wf = gf[~nan], wf[~nan]
    differ = gf != wf
    assert differ.sum().item() <= 1e-3 * max(differ.numel(), 1), f"{what}: {differ.sum().item()} q values differ"
    step = torch.exp2(torch.floor(torch.log2(wf.abs().clamp_min(2.0**-6))) - 3)
    assert torch.all((gf - wf).abs() <= step), f"{what}: q differs by more than one e4m3 step"
    zero = wf == 0
    assert torch.equal(torch.signbit(gf[zero]), torch.signbit(wf[zero])), f"{what}: signed zeros differ"


@pytest.mark.gpu
@requires_cuda_kernel("silu_mul_quant")
@pytest.mark.parametrize("shape", [(1, 256), (9, 2816), (4096, 2816), (8192, 3072), (2, 7, 3072), (3, 1, 256),
                                   (0, 512), (2, 0, 256)])
@pytest.mark.parametrize("column_major", [False, True])
def test_kernel_silu_mul_quant(shape, column_major):
    g = torch.Generator(device="cuda").manual_seed(shape[-1] + 1)
    x = (torch.randn(shape, device="cuda", generator=g) * 3).bfloat16()
    with dsv2_kernels.kernels("none"):
        want = fp8.silu_mul_quant(x, 128, column_major)
    _assert_silu_matches(fp8.silu_mul_quant(x, 128, column_major), want, f"silu {shape}")


@pytest.mark.gpu
@requires_cuda_kernel("silu_mul_quant")
@pytest.mark.parametrize("dtype, group_size", [(torch.bfloat16, 64), (torch.float16, 128), (torch.float32, 128),
                                               (torch.float32, 64)])
def test_kernel_silu_mul_quant_generic_path(dtype, group_size):
    """fp16/fp32 inputs and group 64 take the generic kernel (same silu, exact quotient)."""
    g = torch.Generator(device="cuda").manual_seed(7)
    for shape in [(5, 512), (2, 33, 1024), (1000, 2816)]:
        x = (torch.randn(shape, device="cuda", generator=g) * 3).to(dtype)
        for column_major in (False, True):
            with dsv2_kernels.kernels("none"):
                want = fp8.silu_mul_quant(x, group_size, column_major)
            _assert_silu_matches(fp8.silu_mul_quant(x, group_size, column_major), want, f"{dtype} {shape}")


@pytest.mark.gpu
@requires_cuda_kernel("silu_mul_quant")
def test_kernel_silu_mul_quant_views():
    """Strided rows and batches (read in place) and misaligned views (copied first) of a bf16 input."""
    base = (torch.randn(3, 300, 2816 + 264, device="cuda") * 3).bfloat16()
    views = [base[0, :, :2816], base[0, ::3, 256:256 + 2816], base[:, 5:200, 8:8 + 2816],  # 16-byte aligned
             base[0, :, 1:1 + 2816], base[1:, 7:9, 3:3 + 512]]  # misaligned
    for x in views:
        for column_major in (False, True):
            with dsv2_kernels.kernels("none"):
                want = fp8.silu_mul_quant(x, 128, column_major)
            _assert_silu_matches(fp8.silu_mul_quant(x, 128, column_major), want, f"view {x.stride()}")


def _bf16(values):
    """bf16 tensor from floats, or from raw bit patterns given as ints."""
    bits = lambda b: torch.tensor(b - (1 << 16) if b >= 1 << 15 else b, dtype=torch.int16)  # noqa: E731
    return torch.tensor([v if isinstance(v, float) else bits(v).view(torch.bfloat16).item() for v in values],
                        dtype=torch.bfloat16)


@pytest.mark.gpu
@requires_cuda_kernel("silu_mul_quant")
@pytest.mark.parametrize("shape", [(8, 2816), (4096, 2816), (4, 1024, 2816), (3073, 3072)])
def test_kernel_silu_mul_quant_special_values(shape):
    """Gates the fast silu must get right, against the reference within the stated tolerance (scales 1e-5 relative,
    q one step, signed zeros and NaN positions exact): +-0 (signed zero out), subnormal and tiny gates, large
    negative gates (exp overflow; -88.5 is in the range where silu's 1 / (1 + e) is flushed to 0: q -0 either way),
    an all-zero row, a group whose amax comes from gates in [-30, -10] (the least accurate silu values), and rows of
    inf/NaN inputs: +inf gate -> inf h -> inf scale (q 0 / NaN as h / inf), -inf gate -> NaN (as torch's
    -inf / (1 + exp(inf))), NaN, 0 * inf."""
    g = torch.Generator(device="cuda").manual_seed(5)
    x = (torch.randn(shape, device="cuda", generator=g) * 3).bfloat16()
    flat, n = x.view(-1, shape[-1]), shape[-1] // 2
    flat[1] = 0
    gates = _bf16([-0.0, 1e-30, 0x0001, 0x8001, 0x3300, 0x32FF, 0x42FF, 0x4300, 0xC2FF, 0xC300, -88.5, -90.0,
                   -200.0, 200.0, 0.0, -0.0])
    ups = _bf16([-1.5, 2.0, 3.0, -3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0, 2.0])
    flat[2, :len(gates)], flat[2, n:n + len(ups)] = gates.cuda(), ups.cuda()
    flat[3, 130:134] = _bf16([float("inf"), float("-inf"), float("nan"), 0.0]).cuda()
    flat[3, n + 133] = float("inf")  # 0 * inf
    flat[4, :128] = torch.linspace(-30, -10, 128, device="cuda").bfloat16()
    flat[4, n:n + 128] = torch.linspace(0.5, 2, 128, device="cuda").bfloat16()
    flat[5, 3], flat[5, n + 3] = float("inf"), 2.0  # group 0: inf scale
    flat[5, 128 + 9], flat[5, n + 128 + 9] = float("-inf"), 1.0  # group 1: NaN scale
    with dsv2_kernels.kernels("none"):
        wq, ws = fp8.silu_mul_quant(x, 128, True)
    gq, gs = fp8.silu_mul_quant(x, 128, True)
    _assert_silu_matches((gq, gs), (wq, ws), f"special {shape}")
    # The documented special cases, spelled out (not only "as the reference"):
    s = gs.reshape(-1, n // 128)
    assert s[5, 0].isinf() and s[5, 1].isnan() and s[3, 1].isnan() and torch.all(s[1] == ws.reshape(-1, n // 128)[1])
    q2 = gq.view(-1, n)[2, :16].view(torch.uint8).tolist()
    assert q2[0] == 0x00 and q2[14] == 0x00 and q2[15] == 0x80, "silu(+-0) * up: the signs' product"
    assert q2[11] == 0x80 and q2[12] == 0x80, "large negative gates give -0"


@pytest.mark.gpu
@requires_cuda_kernel("quant_weight_block")
@pytest.mark.parametrize("shape", [(2816, 2048), (300, 200), (2048, 10944), (576, 2048), (8, 2816, 2048)])
def test_kernel_quant_weight_block(shape):
    w = (torch.randn(shape, device="cuda") * 0.02).bfloat16()
    with dsv2_kernels.kernels("none"):
        want = fp8.quant_weight_block(w, 128)
    _assert_quant_kernel_matches(fp8.quant_weight_block(w, 128), want, f"weight {shape}")


def _cuda_gemm_inputs(m, n, k, seed, column_major, n_experts=None):
    return make_gemm_inputs(m, n, k, torch.Generator(device="cuda").manual_seed(seed), column_major, n_experts)


def _assert_gemm_close(got, want, what):
    atol = 1e-3 * want.float().abs().max().item() if want.numel() else 0.0
    assert_close(got, want, atol=atol, rtol=1e-2, what=what)


@pytest.mark.gpu
@requires_cuda_kernel("fp8_gemm")
@pytest.mark.parametrize("m", [0, 1, 7, 128, 1000, 4096])
@pytest.mark.parametrize("n, k", [(2816, 2048), (2048, 1408), (3072, 2048), (4096, 512), (128, 128), (21888, 2048)])
@pytest.mark.parametrize("column_major", [False, True])
def test_kernel_fp8_gemm(m, n, k, column_major):
    a, sa, b, sb = _cuda_gemm_inputs(m, n, k, m + n + k, column_major)
    with dsv2_kernels.kernels("none"):
        want = fp8.fp8_gemm(a, sa, b, sb)
    got = fp8.fp8_gemm(a, sa, b, sb)
    assert got.shape == (m, n) and got.dtype == torch.bfloat16 and got.is_contiguous()
    _assert_gemm_close(got, want, f"fp8_gemm {m}x{n}x{k}")


@pytest.mark.gpu
@requires_cuda_kernel("fp8_gemm")
def test_kernel_fp8_gemm_cuda_graph():
    a, sa, b, sb = _cuda_gemm_inputs(16, 2816, 2048, 11, True)
    fp8.fp8_gemm(a, sa, b, sb)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8.fp8_gemm(a, sa, b, sb)
    poison_(out)
    a2, sa2, _, _ = _cuda_gemm_inputs(16, 2816, 2048, 12, True)
    a.copy_(a2), sa.copy_(sa2)
    graph.replay()
    with dsv2_kernels.kernels("none"):
        want = fp8.fp8_gemm(a, sa, b, sb)
    _assert_gemm_close(out, want, "graph replay")


@pytest.mark.gpu
@requires_cuda_kernel("fp8_grouped_gemm_contiguous")
@pytest.mark.parametrize("sizes", [[128, 0, 256, 128], [0, 0, 0, 128], [384] * 8, [128] * 64])
@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("impl", ["default", "cutlass"])
def test_kernel_grouped_gemm_contiguous(sizes, column_major, impl, monkeypatch):
    """Segments as the dispatch lays them out: each expert's rows contiguous, padded to a multiple of 128 with -1."""
    if impl == "cutlass":  # the CUTLASS kernel, which our own kernel replaced as the default
        monkeypatch.setenv("DSV2_FP8_GEMM_IMPL", "cutlass")
    n, k = 2816, 2048
    e = len(sizes)
    g = torch.Generator().manual_seed(sum(sizes))
    row_expert = []
    for ex, size in enumerate(sizes):
        real = int(torch.randint(max(size - 127, 1), size + 1, (1,), generator=g)) if size else 0
        row_expert += [ex] * real + [-1] * (size - real)
    row_expert = torch.tensor(row_expert, dtype=torch.int32, device="cuda")
    a, sa, b, sb = _cuda_gemm_inputs(row_expert.numel(), n, k, e, column_major, n_experts=e)
    with dsv2_kernels.kernels("none"):
        want = fp8.fp8_grouped_gemm_contiguous(a, sa, b, sb, row_expert)
    got = fp8.fp8_grouped_gemm_contiguous(a, sa, b, sb, row_expert)
    valid = row_expert >= 0
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    _assert_gemm_close(got[valid], want[valid], f"grouped contiguous {sizes}")


@pytest.mark.gpu
@requires_cuda_kernel("fp8_grouped_gemm_contiguous")
@pytest.mark.parametrize(
    "impl",
    [
        "ours-192",
        "ours-128",
        "ours-192-twon",  # tail tiles over n-block pairs (the default where experts average <= 2 m-blocks)
        "ours-128-twon",
        "ours-192-cluster",  # pairing picked by R / E: m-block pairs for all but the one-expert case
        "ours-128-cluster",
        "ours-192-cluster-pairn",  # n-block pairs forced (V2-Lite's pairing)
        "ours-128-cluster-pairn",
    ],
)
@pytest.mark.parametrize(
    "sizes, n, k",
    [
        ([100, 37, 300, 5], 640, 256),  # segments at unaligned rows, last tile past R; 5 n-tiles of 128 (odd)
        ([1, 0, 65, 64, 129, 200], 384, 128),  # 64-row tails around the boundary; 1 K block; 2 / 3 n-tiles
        ([130, 0, 250], 2816, 1408),  # V2-Lite down-like K, N 15 x 192 (odd: leftover units in cluster mode)
        ([1000], 128, 384),  # one expert (b expert stride fallback), one n-tile (cluster rank 1 mostly idle)
    ],
)
def test_kernel_grouped_gemm_contiguous_own(sizes, n, k, impl, monkeypatch):
    """Our sm_90a kernel (DSV2_FP8_GEMM_IMPL=ours) against the reference, for segments that start at any row and
    shapes that exercise partial N tiles, 64-row tails (alone, and paired over two n-blocks with an odd n-block count's
    last one alone) and the cluster pairing; every variant forced by env var."""
    parts = impl.split("-")
    monkeypatch.setenv("DSV2_FP8_GEMM_IMPL", "ours")
    monkeypatch.setenv("DSV2_FP8_GEMM_BN", parts[1])
    monkeypatch.setenv("DSV2_FP8_GEMM_TWON", "1" if "twon" in parts else "0")
    monkeypatch.setenv("DSV2_FP8_GEMM_CLUSTER", "1" if "cluster" in parts else "0")
    monkeypatch.setenv("DSV2_FP8_GEMM_PAIR", "n" if "pairn" in parts else "auto")
    e = len(sizes)
    g = torch.Generator().manual_seed(sum(sizes) + n)
    row_expert = []
    for ex, size in enumerate(sizes):
        real = int(torch.randint(max(size - 127, 1), size + 1, (1,), generator=g)) if size else 0
        row_expert += [ex] * real + [-1] * (size - real)
    row_expert = torch.tensor(row_expert, dtype=torch.int32, device="cuda")
    a, sa, b, sb = _cuda_gemm_inputs(row_expert.numel(), n, k, e + n, True, n_experts=e)
    with dsv2_kernels.kernels("none"):
        want = fp8.fp8_grouped_gemm_contiguous(a, sa, b, sb, row_expert)
    got = fp8.fp8_grouped_gemm_contiguous(a, sa, b, sb, row_expert)
    valid = row_expert >= 0
    _assert_gemm_close(got[valid], want[valid], f"grouped contiguous {impl} {sizes} n={n} k={k}")


def _cuda_masked_inputs(e, max_m, n, k, column_major):
    g = torch.Generator(device="cuda").manual_seed(max_m + n)
    a, sa, b, sb = make_gemm_inputs(e * max_m, n, k, g, False, n_experts=e)
    a = a.reshape(e, max_m, k)
    _, sa = fp8.quant_per_token_group_ref(fp8.dequant_per_token_group(a, sa.reshape(e, max_m, -1)), 128, column_major)
    return a, sa, b, sb


def _assert_masked_close(got, want, counts, what):
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    for ex, c in enumerate(counts):
        c = min(c, want.shape[1])
        _assert_gemm_close(got[ex, :c], want[ex, :c], f"{what} expert {ex}")


@pytest.mark.gpu
@requires_cuda_kernel("fp8_grouped_gemm_masked")
@pytest.mark.parametrize("counts", [[0, 1, 130, 300], [256] * 4, [0] * 4, [1, 2, 3, 4]])
@pytest.mark.parametrize("column_major", [False, True])
def test_kernel_grouped_gemm_masked(counts, column_major):
    a, sa, b, sb = _cuda_masked_inputs(4, 256, 2816, 2048, column_major)
    counts_t = torch.tensor(counts, dtype=torch.int32, device="cuda")
    with dsv2_kernels.kernels("none"):
        want = fp8.fp8_grouped_gemm_masked(a, sa, b, sb, counts_t)
    _assert_masked_close(fp8.fp8_grouped_gemm_masked(a, sa, b, sb, counts_t), want, counts, "masked")


@pytest.mark.gpu
@requires_cuda_kernel("fp8_grouped_gemm_masked")
def test_kernel_grouped_gemm_masked_cuda_graph():
    """The decode path captures the GEMM once and replays it with new counts."""
    a, sa, b, sb = _cuda_masked_inputs(4, 128, 2048, 1408, True)
    counts_t = torch.tensor([3, 0, 128, 7], dtype=torch.int32, device="cuda")
    fp8.fp8_grouped_gemm_masked(a, sa, b, sb, counts_t)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8.fp8_grouped_gemm_masked(a, sa, b, sb, counts_t)
    poison_(out)
    counts = [100, 1, 0, 500]
    counts_t.copy_(torch.tensor(counts, dtype=torch.int32))
    graph.replay()
    with dsv2_kernels.kernels("none"):
        want = fp8.fp8_grouped_gemm_masked(a, sa, b, sb, counts_t)
    _assert_masked_close(out, want, counts, "masked replay")


@pytest.mark.gpu
@requires_cuda_kernel("fp8_gemm")
def test_kernel_bad_inputs_direct_op():
    """The C++ entries must reject bad metadata themselves (calling the op skips the Python wrapper)."""
    a, sa, b, sb = _cuda_gemm_inputs(4, 256, 256, 0, False)
    op = torch.ops.dsv2_kernels.fp8_gemm
    with pytest.raises(ValueError, match="fp8_gemm.*'a'"):
        op(a.float(), sa, b, sb)
    with pytest.raises(ValueError, match="fp8_gemm.*'b_scales'"):
        op(a, sa, b, sb[:1])
    with pytest.raises(ValueError, match="fp8_gemm.*'b'"):
        op(a, sa, b[:, :128], sb)
    with pytest.raises(ValueError, match="fp8_gemm.*device"):
        op(a, sa.cpu(), b, sb)
    with pytest.raises(ValueError, match="quant_per_token_group.*'x'"):
        torch.ops.dsv2_kernels.quant_per_token_group(torch.randn(4, 200, device="cuda"), 128, False)
