"""FP8 GEMM kernels on the GPU, beyond tests/test_fp8_ref.py: operand layouts the C++ entries prepare themselves
(row-major, widely strided and misaligned activation scales; strided and misaligned rows), index values a direct op
call does not check (out-of-range experts, negative or too large counts: no crash, every other row right), experts in
any order with absent and split segments, the V2 expert shapes, and CUDA-graph replays with new routings.

Tolerances as in test_fp8_ref.py: the same quantized inputs, bf16 outputs within 1e-2 relative, atol 1e-3 of the
largest reference magnitude. Every reference row is fp8_gemm_ref (fp32 per-block promotion) of that row alone.
"""

import pytest
import torch

from dsv2_kernels import fp8
from tests.conftest import poison_, requires_cuda_kernel
from tests.test_fp8_ref import _assert_gemm_close, make_gemm_inputs

FP8 = torch.float8_e4m3fn
ops = torch.ops.dsv2_kernels


def _inputs(m, n, k, seed, column_major=False, experts=None):
    return make_gemm_inputs(m, n, k, torch.Generator(device="cuda").manual_seed(seed), column_major, experts)


def _nan_buffer(numel):
    return torch.full((numel,), float("nan"), device="cuda")


def _scale_layouts(sa):
    """The same [M, KB] scale values in layouts the kernels must read (or copy): name -> tensor. Unused padding is NaN,
    so a kernel reading outside the view poisons its output."""
    m, kb = sa.shape
    m_pad = (m + 3) // 4 * 4
    out = {"row-major": sa.contiguous()}
    for name, ld in (("col-major ld=M_pad", m_pad), ("col-major ld=M_pad+8", m_pad + 8), ("col-major ld=M+13", m + 13)):
        buf = _nan_buffer(ld * kb)
        view = buf.as_strided((m, kb), (1, ld))
        view.copy_(sa)
        out[name] = view
    buf = _nan_buffer(m_pad * kb + 1)  # base 4 bytes past a 16-byte boundary: TMA cannot take it in place
    view = buf[1:].as_strided((m, kb), (1, m_pad))
    view.copy_(sa)
    out["col-major misaligned base"] = view
    wide = _nan_buffer(m * (kb + 3)).view(m, kb + 3)
    wide[:, 2:2 + kb] = sa
    out["row-major strided view"] = wide[:, 2:2 + kb]
    return out


def _misaligned_copy(t):
    """t's values in a view whose base is 8 bytes off a 16-byte boundary."""
    flat = torch.empty(t.numel() + 8, dtype=torch.uint8, device=t.device)
    view = flat[8:].view(t.dtype).view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.gpu
@requires_cuda_kernel("fp8_gemm")
@pytest.mark.parametrize("m", [1, 3, 33, 130])
def test_kernel_fp8_gemm_operand_layouts(m):
    n, k = 384, 640
    a, sa, b, sb = _inputs(m, n, k, seed=m)
    want = fp8.fp8_gemm_ref(a, sa, b, sb)
    for name, scales in _scale_layouts(sa).items():
        _assert_gemm_close(ops.fp8_gemm(a, scales, b, sb), want, f"M={m} a_scales {name}")
    wide = torch.zeros(m, k + 128, dtype=torch.uint8, device="cuda").view(FP8)
    wide[:, 128:] = a
    _assert_gemm_close(ops.fp8_gemm(wide[:, 128:], sa, b, sb), want, f"M={m} strided a rows")
    _assert_gemm_close(ops.fp8_gemm(_misaligned_copy(a), sa, _misaligned_copy(b), sb), want, f"M={m} misaligned")


def _contiguous_layout(segments, trailing=0):
    """row_expert for (expert, valid rows) segments, each padded with -1 to a multiple of 128."""
    rows = []
    for ex, count in segments:
        rows += [ex] * count + [-1] * (-count % 128)
    return torch.tensor(rows + [-1] * trailing, dtype=torch.int32, device="cuda")


def _contiguous_want(a, sa, b, sb, row_expert, experts):
    """{expert: (rows, reference rows)} for the given experts."""
    want = {}
    for ex in experts:
        rows = (row_expert == ex).nonzero().squeeze(1)
        want[ex] = rows, fp8.fp8_gemm_ref(a[rows], sa[rows], b[ex], sb[ex])
    return want


@pytest.mark.gpu
@requires_cuda_kernel("fp8_grouped_gemm_contiguous")
@pytest.mark.parametrize("column_major", [False, True])
def test_kernel_grouped_contiguous_order_and_bad_values(column_major):
    """Experts out of order, absent experts, a split expert (skipped: its rows are unspecified), out-of-range values
    (skipped) through a direct op call: no crash, and every other expert's rows right."""
    e, n, k = 6, 256, 512
    row_expert = _contiguous_layout([(3, 100), (0, 133), (5, 1), (2, 128), (4, 7), (1, 40), (4, 9)], trailing=70)
    row_expert[-70:-60] = 6  # out of range (>= E)
    row_expert[-60:-50] = -7  # negative other than -1
    a, sa, b, sb = _inputs(row_expert.numel(), n, k, seed=7, column_major=column_major, experts=e)
    out = ops.fp8_grouped_gemm_contiguous(a, sa, b, sb, row_expert)
    torch.cuda.synchronize()
    assert out.shape == (row_expert.numel(), n) and out.dtype == torch.bfloat16
    for ex, (rows, want) in _contiguous_want(a, sa, b, sb, row_expert, [0, 1, 2, 3, 5]).items():
        _assert_gemm_close(out[rows], want, f"expert {ex}")


@pytest.mark.gpu
@requires_cuda_kernel("fp8_grouped_gemm_contiguous")
@pytest.mark.parametrize("n, k", [(5120, 1536), (3072, 5120)])
def test_kernel_grouped_contiguous_v2_shapes(n, k):
    g = torch.Generator().manual_seed(n)
    e = 12
    counts = torch.randint(0, 300, (e,), generator=g).tolist()
    counts[3] = 0
    row_expert = _contiguous_layout(list(enumerate(counts)))
    a, sa, b, sb = _inputs(row_expert.numel(), n, k, seed=n + k, column_major=True, experts=e)
    out = fp8.fp8_grouped_gemm_contiguous(a, sa, b, sb, row_expert)
    for ex, (rows, want) in _contiguous_want(a, sa, b, sb, row_expert, range(e)).items():
        _assert_gemm_close(out[rows], want, f"N={n} K={k} expert {ex}")


@pytest.mark.gpu
@requires_cuda_kernel("fp8_grouped_gemm_contiguous")
def test_kernel_grouped_contiguous_cuda_graph():
    """Captured once, replayed with another routing over the same number of rows: segments are found on the GPU."""
    e, n, k = 4, 2048, 1408
    row_expert = _contiguous_layout([(0, 200), (1, 5), (2, 128), (3, 60)])
    a, sa, b, sb = _inputs(row_expert.numel(), n, k, seed=3, column_major=True, experts=e)
    fp8.fp8_grouped_gemm_contiguous(a, sa, b, sb, row_expert)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8.fp8_grouped_gemm_contiguous(a, sa, b, sb, row_expert)
    poison_(out)
    new = _contiguous_layout([(2, 300), (0, 100), (3, 1)], trailing=row_expert.numel() - 640)
    row_expert.copy_(new)
    graph.replay()
    for ex, (rows, want) in _contiguous_want(a, sa, b, sb, row_expert, [0, 2, 3]).items():
        _assert_gemm_close(out[rows], want, f"replay expert {ex}")


def _masked_want(a, sa, b, sb, counts):
    max_m = a.shape[1]
    return {ex: fp8.fp8_gemm_ref(a[ex, :c], sa[ex, :c], b[ex], sb[ex])
            for ex, c in enumerate(min(max(c, 0), max_m) for c in counts)}


@pytest.mark.gpu
@requires_cuda_kernel("fp8_grouped_gemm_masked")
@pytest.mark.parametrize("column_major", [False, True])
def test_kernel_grouped_masked_views_and_bad_counts(column_major):
    """a as a view into a taller buffer (expert stride > max_m rows), counts below 0 and above max_m through a direct
    op call (clamped: no crash)."""
    e, max_m, n, k = 5, 40, 256, 384
    a, sa, b, sb = _inputs(e * max_m, n, k, seed=11, experts=e)
    a, sa = a.view(e, max_m, k), sa.view(e, max_m, k // 128)
    if column_major:
        sa = sa.transpose(1, 2).contiguous().transpose(1, 2)
    tall = torch.zeros(e, max_m + 24, k, dtype=torch.uint8, device="cuda").view(FP8)
    tall[:, :max_m] = a
    counts = [-3, 0, 1, 40, 1000]
    out = ops.fp8_grouped_gemm_masked(tall[:, :max_m], sa, b, sb, torch.tensor(counts, dtype=torch.int32,
                                                                                    device="cuda"))
    torch.cuda.synchronize()
    for ex, want in _masked_want(a, sa, b, sb, counts).items():
        _assert_gemm_close(out[ex, :want.shape[0]], want, f"expert {ex}")


@pytest.mark.gpu
@requires_cuda_kernel("fp8_grouped_gemm_masked")
@pytest.mark.parametrize("n, k", [(3072, 5120), (2816, 2048)])
def test_kernel_grouped_masked_decode_shapes(n, k):
    """Decode: 1-64 rows per expert (the 64-row tiles), and one group of 130 rows (three tiles)."""
    e, max_m = 9, 136
    a, sa, b, sb = _inputs(e * max_m, n, k, seed=n, experts=e)
    a = a.view(e, max_m, k)
    _, sa = fp8.quant_per_token_group_ref(fp8.dequant_per_token_group(a, sa.view(e, max_m, -1)), 128, True)
    counts = [1, 2, 7, 16, 31, 33, 64, 0, 130]
    out = fp8.fp8_grouped_gemm_masked(a, sa, b, sb, torch.tensor(counts, dtype=torch.int32, device="cuda"))
    for ex, want in _masked_want(a, sa, b, sb, counts).items():
        _assert_gemm_close(out[ex, :want.shape[0]], want, f"N={n} K={k} expert {ex}")
