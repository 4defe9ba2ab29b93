"""GPU tests of the compress_kv / rope_q CUDA kernels, beyond the kernel-vs-reference cases of test_mla_ref.py:
more tokens than resident warps (each warp strides over several tokens), int32/int64 and strided index tensors,
weights of every float dtype, misaligned inputs (the aligned-copy fallback), out-of-range slots and positions with
the value checks bypassed (skipped / clamped, never out of bounds), CUDA-graph replay, and empty inputs.

Exactness claims checked: RoPE is bit-equal to the fp32 reference (same separately rounded products and sums), so
rope_q and every k_pe value (returned, bf16 cache, e4m3 codes and scale) match exactly; c_kv differs from the
reference only by the order of the 512-term sum of squares, i.e. at most one bf16 rounding, and its e4m3 codes
rarely (< 1%)."""

import pytest
import torch

import dsv2_kernels
from dsv2_kernels import mla
from tests.conftest import assert_close, poison_, requires_cuda_kernel

FP8 = torch.float8_e4m3fn
NAN = float("nan")
pytestmark = pytest.mark.gpu


def gen(seed):
    return torch.Generator().manual_seed(seed)


def compress_inputs(tokens, num_slots, g, *, w_dtype=torch.bfloat16, idx_dtype=torch.int64, misalign=False):
    """kv_a as a slice of a wider projection output (misaligned by 3 elements on request), strided positions."""
    off = 1536 + (3 if misalign else 0)
    kv_a = (torch.randn(tokens, 2120, generator=g) * 3).bfloat16().cuda()[:, off : off + 576]
    w = (torch.rand(512, generator=g) + 0.5).to(w_dtype).cuda()
    cs = mla.rope_cos_sin_cache(64, 4096, rope_scaling=dict(type="yarn", factor=40), device="cuda")
    pos = torch.randint(0, 4096, (2 * tokens,), generator=g).to(idx_dtype).cuda()[::2]
    slots = torch.randperm(num_slots, generator=g)[:tokens]
    slots[5::11] = -1  # padding tokens
    return kv_a, w, cs, pos, slots.to(idx_dtype).cuda()


def fresh_cache(fp8, num_blocks, block_size):
    if fp8:
        cache = torch.empty(num_blocks, block_size, 576, dtype=FP8, device="cuda")
        poison_(cache)
        return cache, torch.full((num_blocks, block_size, 2), NAN, device="cuda")
    return torch.full((num_blocks, block_size, 576), NAN, dtype=torch.bfloat16, device="cuda"), None


def check_against_reference(args, fp8, num_blocks, block_size, normed=True):
    kv_a, w, cs, pos, slots = args
    (wc, ws), (gc, gs) = fresh_cache(fp8, num_blocks, block_size), fresh_cache(fp8, num_blocks, block_size)
    with dsv2_kernels.kernels("none"):
        want = mla.compress_kv(kv_a, w, 1e-6, pos, cs, slots, wc, ws, normed)
    got = mla.compress_kv(kv_a, w, 1e-6, pos, cs, slots, gc, gs, normed)
    if not normed:
        assert got[0].shape == (0,) and got[1].shape == (0,) and got[0].dtype == torch.bfloat16
    else:
        assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
        assert_close(got[0], want[0], atol=1.6e-2, rtol=1.6e-2, what="c_kv")  # one bf16 rounding apart at most
        assert torch.equal(got[1], want[1]), "k_pe must be bit-equal to the reference"
    written = slots[slots >= 0].long()
    keep = torch.ones(num_blocks * block_size, dtype=torch.bool, device="cuda")
    keep[written] = False
    g_rows, w_rows = gc.view(-1, 576), wc.view(-1, 576)
    if not fp8:
        assert_close(gc, wc, atol=1.6e-2, rtol=1.6e-2, what="bf16 cache (unwritten slots stay NaN)")
        assert torch.equal(g_rows[written, 512:], w_rows[written, 512:]), "cached k_pe must be bit-equal"
        return
    assert_close(gs, ws, atol=0, rtol=1e-5, what="e4m3 scales (unwritten stay NaN)")
    assert torch.equal(gs.view(-1, 2)[written, 1], ws.view(-1, 2)[written, 1]), "k_pe scale must be bit-equal"
    # e4m3 rows gathered as bytes (indexing need not support float8)
    a, b = g_rows.view(torch.uint8)[written], w_rows.view(torch.uint8)[written]
    assert torch.equal(a[:, 512:], b[:, 512:]), "k_pe codes must be bit-equal (correctly rounded division)"
    af, bf = a.view(FP8).float(), b.view(FP8).float()
    assert ((af - bf).abs() <= bf.abs() / 8 + 2**-9).all() and (a != b).float().mean() < 0.01
    assert (g_rows.view(torch.uint8)[keep] == 0x7F).all(), "unwritten slots must be left alone"


@requires_cuda_kernel("compress_kv")
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("normed", [True, False])
@pytest.mark.parametrize("tokens", [7001, 65536, 140013])
def test_compress_kv_many_tokens_per_warp(tokens, fp8, normed):
    # The kernel runs one wave of 32 warps per SM (4224 warps on 132 SMs), warp w over tokens w, w + 4224, ... through
    # a 4-slot ring of rows: 7001 tokens are 1-2 per warp, 65536 reuse the ring (15-16 per warp), 140013 exceed the
    # 32 tokens of a warp and add a second wave (8448 warps, 16-17 each); the odd counts leave warps with uneven runs.
    args = compress_inputs(tokens, (tokens + 63) // 64 * 64 + 64, gen(1))
    check_against_reference(args, fp8, (tokens + 63) // 64 + 1, 64, normed)


@requires_cuda_kernel("compress_kv")
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_compress_kv_weight_and_index_dtypes(w_dtype, idx_dtype):
    args = compress_inputs(77, 8 * 16, gen(2), w_dtype=w_dtype, idx_dtype=idx_dtype)
    check_against_reference(args, True, 8, 16)
    check_against_reference(args, False, 8, 16)


@requires_cuda_kernel("compress_kv")
@pytest.mark.parametrize("fp8", [False, True])
def test_compress_kv_misaligned_kv_a(fp8):
    args = compress_inputs(33, 3 * 16, gen(3), misalign=True)
    assert args[0].data_ptr() % 16 != 0
    check_against_reference(args, fp8, 3, 16)


@requires_cuda_kernel("compress_kv")
@pytest.mark.parametrize("fp8", [False, True])
def test_compress_kv_out_of_range_values_skipped(fp8):
    """Bypassing the Python wrapper (no value checks): slots past the cache are skipped, positions clamped."""
    num_blocks, block_size = 2, 8
    kv_a, w, cs, _, _ = compress_inputs(6, 16, gen(4))
    slots = torch.tensor([0, 16, 2**40, -3, 15, 7], device="cuda")
    pos = torch.tensor([0, 10**12, -5, 4096, 3, 4095], device="cuda")
    (gc, gs), (wc, ws) = fresh_cache(fp8, num_blocks, block_size), fresh_cache(fp8, num_blocks, block_size)
    torch.ops.dsv2_kernels.compress_kv(kv_a, w, 1e-6, pos, cs, slots, gc, gs, False)
    torch.cuda.synchronize()
    ok = torch.tensor([0, 4, 5], device="cuda")  # tokens with a valid slot and position
    with dsv2_kernels.kernels("none"):
        mla.compress_kv(kv_a[ok], w, 1e-6, pos[ok], cs, slots[ok], wc, ws)
    written = torch.zeros(16, dtype=torch.bool, device="cuda")
    written[slots[ok]] = True
    g_rows, w_rows = gc.view(-1, 576), wc.view(-1, 576)
    if fp8:
        assert (g_rows.view(torch.uint8)[~written] == 0x7F).all() and gs.view(-1, 2)[~written].isnan().all()
        assert_close(gs, ws, atol=0, rtol=1e-5, what="scales")
    else:
        assert g_rows[~written].isnan().all()
        assert_close(gc, wc, atol=1.6e-2, rtol=1.6e-2, what="cache")


@requires_cuda_kernel("compress_kv")
def test_compress_kv_cuda_graph_replay():
    num_blocks, block_size = 4, 16
    kv_a, w, cs, pos, slots = compress_inputs(40, 64, gen(5))
    cache, scale = fresh_cache(True, num_blocks, block_size)
    mla.compress_kv(kv_a, w, 1e-6, pos, cs, slots, cache, scale, True)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        c_kv, k_pe = mla.compress_kv(kv_a, w, 1e-6, pos, cs, slots, cache, scale, True)
    kv_a.copy_(torch.randn(kv_a.shape, generator=gen(6)).bfloat16())  # new values, same buffers
    poison_(cache), scale.fill_(NAN), poison_(c_kv), poison_(k_pe)
    graph.replay()
    want_cache, want_scale = fresh_cache(True, num_blocks, block_size)
    with dsv2_kernels.kernels("none"):
        want = mla.compress_kv(kv_a, w, 1e-6, pos, cs, slots, want_cache, want_scale, True)
    assert_close(c_kv, want[0], atol=1.6e-2, rtol=1.6e-2, what="c_kv")
    assert torch.equal(k_pe, want[1])
    assert_close(scale, want_scale, atol=0, rtol=1e-5, what="scales")


@requires_cuda_kernel("compress_kv")
def test_compress_kv_no_tokens():
    cache, scale = fresh_cache(True, 2, 4)
    kv_a, w, cs, pos, slots = compress_inputs(0, 8, gen(7))
    c_kv, k_pe = mla.compress_kv(kv_a, w, 1e-6, pos, cs, slots, cache, scale, True)
    assert c_kv.shape == (0, 512) and k_pe.shape == (0, 64)
    assert (cache.view(torch.uint8) == 0x7F).all()


@requires_cuda_kernel("rope_q")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["slice", "misaligned", "transposed", "single"])
def test_rope_q_layouts_bit_equal(dtype, layout):
    g = gen(8)
    cs = mla.rope_cos_sin_cache(64, 163840, rope_scaling=dict(type="yarn", factor=40), device="cuda")
    if layout == "slice":  # q[..., 128:] of the [T, H, 192] query
        q = torch.randn(3000, 16, 192, generator=g).to(dtype).cuda()[..., 128:]
    elif layout == "misaligned":  # rows start one element past a 16-byte boundary: aligned-copy fallback
        q = torch.randn(37, 5, 200, generator=g).to(dtype).cuda()[..., 129:193]
        assert q.data_ptr() % 16 != 0
    elif layout == "transposed":  # [H, T, 64] storage viewed as [T, H, 64]
        q = torch.randn(7, 300, 64, generator=g).to(dtype).cuda().transpose(0, 1)
    else:
        q = torch.randn(1, 1, 64, generator=g).to(dtype).cuda()
    tokens = q.shape[0]
    pos = torch.randint(0, 163840, (2 * tokens,), generator=g).int().cuda()[::2]
    got = mla.rope_q(q, pos, cs)
    assert got.shape == q.shape and got.dtype == dtype and got.is_contiguous()
    with dsv2_kernels.kernels("none"):
        want = mla.rope_q(q, pos, cs)
    assert torch.equal(got, want), "rope_q must be bit-equal to the fp32 reference"


@requires_cuda_kernel("rope_q")
def test_rope_q_clamps_positions_and_handles_empty():
    cs = mla.rope_cos_sin_cache(64, 16, device="cuda")
    q = torch.randn(3, 2, 64, device="cuda")
    got = torch.ops.dsv2_kernels.rope_q(q, torch.tensor([-4, 3, 99], device="cuda"), cs)  # no value checks here
    with dsv2_kernels.kernels("none"):
        want = mla.rope_q(q, torch.tensor([0, 3, 15], device="cuda"), cs)
    assert torch.equal(got, want)
    assert mla.rope_q(q[:0], torch.zeros(0, dtype=torch.long, device="cuda"), cs).shape == (0, 2, 64)
    assert mla.rope_q(q[:, :0], torch.zeros(3, dtype=torch.long, device="cuda"), cs).shape == (3, 0, 64)
