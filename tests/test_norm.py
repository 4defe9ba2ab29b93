"""rms_norm / fused_add_rms_norm: reference vs straightforward math (CPU), kernel vs reference (GPU), bad inputs,
fake impl under torch.compile."""

import pytest
import torch

import dsv2_kernels
from dsv2_kernels import OpError, norm
from tests.conftest import assert_close, poison_, requires_cuda_kernel


def naive_rms_norm(x, w, eps):
    """Row by row in float64, from the definition."""
    out = torch.empty(x.shape, dtype=torch.float64)
    xd, wd = x.double().reshape(-1, x.shape[-1]), w.double()
    for i, row in enumerate(xd):
        out.view(-1, x.shape[-1])[i] = row / (row.pow(2).sum() / row.numel() + eps) ** 0.5 * wd
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8), (3, 5, 64), (7, 200)])
def test_rms_norm_reference(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype) * 3
    w = torch.randn(shape[-1], generator=g).to(dtype)
    got = norm.rms_norm_ref(x, w, 1e-6)
    # bf16 output: one rounding of a value of magnitude ~|w|*3 -> relative 2^-8
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert_close(got, naive_rms_norm(x, w, 1e-6), atol=tol, rtol=tol, what="rms_norm_ref")


def test_fused_add_rms_norm_reference():
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(4, 96, generator=g), torch.randn(4, 96, generator=g)
    w = torch.rand(96, generator=g) + 0.5
    out, res = norm.fused_add_rms_norm_ref(x, r, w, 1e-5)
    assert_close(res, x.double() + r.double(), atol=1e-6, rtol=1e-6, what="residual")
    assert_close(out, naive_rms_norm(x + r, w, 1e-5), atol=1e-5, rtol=1e-5, what="normed")


def test_wrappers_run_reference_on_cpu_and_when_forced():
    x, w = torch.randn(2, 16), torch.randn(16)
    expected = norm.rms_norm_ref(x, w, 1e-6)
    assert torch.equal(norm.rms_norm(x, w), expected)  # CPU: op -> reference
    with dsv2_kernels.kernels("none"):
        assert torch.equal(norm.rms_norm(x, w), expected)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: norm.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.randn(8)), "rms_norm.*'x'.*dtype"),
        (lambda: norm.rms_norm(torch.randn(2, 8), torch.randn(9)), "rms_norm.*'weight'.*shape"),
        (lambda: norm.rms_norm(torch.randn(8, 2).t(), torch.randn(8)), "rms_norm.*'x'.*contiguous"),
        (lambda: norm.rms_norm(torch.randn(2, 8), torch.randn(8), eps=0.0), "rms_norm.*'eps'"),
        (lambda: norm.rms_norm(torch.randn(2, 8), torch.randn(8).int()), "rms_norm.*'weight'.*dtype"),
        (
            lambda: norm.fused_add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), torch.randn(8)),
            "fused_add_rms_norm.*'residual'.*shape",
        ),
        (
            lambda: norm.fused_add_rms_norm(torch.randn(2, 8), torch.randn(2, 8).bfloat16(), torch.randn(8)),
            "fused_add_rms_norm.*'residual'.*dtype",
        ),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(OpError, match=match):
        call()
    with dsv2_kernels.kernels("none"), pytest.raises(OpError, match=match):
        call()


def test_fake_impl_under_compile():
    op, op2 = torch.ops.dsv2_kernels.rms_norm, torch.ops.dsv2_kernels.fused_add_rms_norm

    def f(x, r, w):
        a = op(x, w, 1e-6)
        b, c = op2(x, r, w, 1e-6)
        return a + b, c

    x, r, w = torch.randn(3, 4, 32), torch.randn(3, 4, 32), torch.randn(32)
    got = torch.compile(f, fullgraph=True, backend="eager")(x, r, w)
    want = f(x, r, w)
    for g_, w_ in zip(got, want):
        assert g_.shape == w_.shape and g_.dtype == w_.dtype
        assert_close(g_, w_, atol=1e-6, rtol=1e-6, what="compiled")
    with torch._subclasses.FakeTensorMode():
        fx = torch.empty(5, 64, dtype=torch.bfloat16)
        out, res = op2(fx, torch.empty_like(fx), torch.empty(64), 1e-6)
        assert out.shape == (5, 64) and out.dtype == torch.bfloat16 and res.shape == (5, 64)


# ---- GPU: kernel vs reference ----------------------------------------------------------------------------------
SHAPES = [(1, 8), (5, 2048), (33, 5120), (7, 1408), (4, 576), (3, 511), (2, 40000), (6, 3, 7168)]


@pytest.mark.gpu
@requires_cuda_kernel("fused_add_rms_norm")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("wdtype", ["same", "float32"])
def test_kernel_matches_reference(dtype, shape, wdtype):
    g = torch.Generator(device="cuda").manual_seed(hash(shape) % 1000)
    x = (torch.randn(shape, device="cuda", generator=g) * 4).to(dtype)
    r = torch.randn(shape, device="cuda", generator=g).to(dtype)
    w = (torch.rand(shape[-1], device="cuda", generator=g) + 0.5).to(dtype if wdtype == "same" else torch.float32)
    with dsv2_kernels.kernels("none"):
        want = norm.rms_norm(x, w, 1e-6)
        want_out, want_res = norm.fused_add_rms_norm(x, r, w, 1e-6)
    got = norm.rms_norm(x, w, 1e-6)
    got_out, got_res = norm.fused_add_rms_norm(x, r, w, 1e-6)
    # Same fp32 math in a different summation order: outputs may differ by one rounding of the output dtype.
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert_close(got, want, atol=tol, rtol=tol, what="rms_norm")
    assert torch.equal(got_res, want_res), "the residual sum is one rounding: it must be bit-exact"
    assert_close(got_out, want_out, atol=tol, rtol=tol, what="fused_add_rms_norm")


@pytest.mark.gpu
@requires_cuda_kernel("rms_norm")
def test_kernel_strided_rows_and_unaligned():
    base = torch.randn(64, 5120 + 8, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(5120, device="cuda", dtype=torch.bfloat16)
    for x in (base[:, :5120], base[:, 1:5121], base[::2, 8:]):  # strided rows; misaligned start -> generic path
        with dsv2_kernels.kernels("none"):
            want = norm.rms_norm(x, w)
        assert_close(norm.rms_norm(x, w), want, atol=1.6e-2, rtol=1.6e-2, what=f"strides {x.stride()}")


@pytest.mark.gpu
@requires_cuda_kernel("rms_norm")
def test_kernel_empty_and_cuda_graph():
    w = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    assert norm.rms_norm(torch.empty(0, 256, device="cuda", dtype=torch.bfloat16), w).shape == (0, 256)
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    norm.fused_add_rms_norm(x, r, w)  # warm up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, res = norm.fused_add_rms_norm(x, r, w)
    poison_(out), poison_(res)
    x.copy_(torch.randn_like(x))
    graph.replay()
    with dsv2_kernels.kernels("none"):
        want_out, want_res = norm.fused_add_rms_norm(x, r, w)
    assert torch.equal(res, want_res)
    assert_close(out, want_out, atol=1.6e-2, rtol=1.6e-2, what="graph replay")


@pytest.mark.gpu
@requires_cuda_kernel("rms_norm")
def test_kernel_bad_inputs_direct_op():
    """Calling the torch op directly skips the Python wrapper: the C++ entry must still reject bad input."""
    op = torch.ops.dsv2_kernels.rms_norm
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="rms_norm.*'weight'"):
        op(x, torch.randn(32, device="cuda"), 1e-6)
    with pytest.raises(ValueError, match="rms_norm.*'x'.*contiguous"):
        op(torch.randn(64, 4, device="cuda", dtype=torch.bfloat16).t(), torch.randn(4, device="cuda"), 1e-6)
    with pytest.raises(ValueError, match="rms_norm.*'weight'.*on"):
        op(x, torch.randn(64), 1e-6)
