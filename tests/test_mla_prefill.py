"""GPU tests of the MLA prefill kernels (csrc/mla/prefill_attention.cu, csrc/mla/merge_attention_states.cu) against
the fp32 references (``kernels("none")``): ragged batches (lengths 1 ... 8192, on and off multiples of 64/128), cached
prefixes (lk > lq), lq > lk (rows that see nothing: out 0, lse +inf), causal and not, H in {1, 3, 16, 128}, strided
and misaligned q/k/v (v a slice of a [T, H, 256] tensor, as the model passes it), with and without the warpgroup
ping-pong; CUDA-graph replay with new lengths (the op never syncs); merge vs its reference with empty parts
(+-inf lse, NaN outs that must not be read) and chained with prefill (prefix + new tokens == one causal attention);
direct torch.ops calls with unsupported or bad metadata (clear errors) and bad values (no out-of-bounds access).

Outputs are allocated by the ops; before each kernel call, blocks of the outputs' sizes are filled with NaN and freed,
so the caching allocator hands NaN-filled memory to the outputs and an unwritten element shows up as a mismatch.
"""

import pytest
import torch

import dsv2_kernels
from dsv2_kernels import mla
from tests.conftest import assert_close, poison_, requires_cuda_kernel
from tests.test_mla_ref import V2_YARN

pytestmark = [pytest.mark.gpu]
prefill_kernel = requires_cuda_kernel("prefill_attention")
merge_kernel = requires_cuda_kernel("merge_attention_states")

# Scores and softmax in fp32 (bf16 inputs are exact in the tensor-core products); P is rounded to bf16 for P V and the
# output to bf16: out within 2e-2 (abs + rel), lse (fp32 throughout, ex2.approx) within 1e-3 absolute.
TOL_OUT, TOL_LSE = 2e-2, 1e-3
SCALE = mla.softmax_scale(192, V2_YARN)


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")


def _inputs(pairs, heads, seed, q_mult=1.0, layout="model"):
    """q [Tq, H, 192], k [Tk, H, 192], v [Tk, H, 128] bf16 for (lq, lk) pairs. layout "model": q, k contiguous, v the
    second half of a [Tk, H, 256] tensor; "strided": q, k slices of wider rows (16-byte aligned strides), v
    head-major; "misaligned": row strides that are not multiples of 8 elements (the op copies them)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    tq, tk = sum(p[0] for p in pairs), sum(p[1] for p in pairs)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda")

    if layout == "model":
        q = (rnd(tq, heads, 192) * q_mult).bfloat16()
        k = rnd(tk, heads, 192).bfloat16()
        v = rnd(tk, heads, 256).bfloat16()[..., 128:]
    elif layout == "strided":
        q = (rnd(tq, heads, 256) * q_mult).bfloat16()[..., 32:224]
        k = rnd(heads, tk, 192).bfloat16().transpose(0, 1)
        v = rnd(tk, heads, 384).bfloat16()[..., 64:192]
    else:
        q = (rnd(tq, heads, 196) * q_mult).bfloat16()[..., :192]
        k = rnd(tk, heads, 197).bfloat16()[..., 5:]
        v = rnd(tk, heads, 131).bfloat16()[..., 1:129]
    return q, k, v, _cu([p[0] for p in pairs]), _cu([p[1] for p in pairs])


def _close(actual, expected, *, atol, rtol, what):
    """assert_close, compared on the GPU first (the H=128 outputs hold ~10^8 values); the full report on failure."""
    a, e = actual.double(), expected.double()
    if a.shape == e.shape and torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True).all():
        return
    assert_close(actual, expected, atol=atol, rtol=rtol, what=what)


def _poison_allocator(*shapes_dtypes):
    blocks = [poison_(torch.empty(shape, dtype=dtype, device="cuda")) for shape, dtype in shapes_dtypes]
    del blocks


def _check(q, k, v, cu_q, cu_k, causal, what="", max_q=None, max_k=None):
    lq = (cu_q[1:] - cu_q[:-1]).tolist()
    lk = (cu_k[1:] - cu_k[:-1]).tolist()
    max_q = max(lq + [0]) if max_q is None else max_q
    max_k = max(lk + [0]) if max_k is None else max_k
    args = (q, k, v, cu_q, cu_k, max_q, max_k, SCALE, causal)
    with dsv2_kernels.kernels("none"):
        want_o, want_l = mla.prefill_attention(*args)
    tq, heads = q.shape[:2]
    _poison_allocator(((tq, heads, 128), torch.bfloat16), ((heads, tq), torch.float32))
    got_o, got_l = mla.prefill_attention(*args)
    assert got_o.shape == (tq, heads, 128) and got_o.dtype == torch.bfloat16 and got_o.is_contiguous()
    assert got_l.shape == (heads, tq) and got_l.dtype == torch.float32 and got_l.is_contiguous()
    _close(got_o, want_o, atol=TOL_OUT, rtol=TOL_OUT, what=f"out {what}")
    _close(got_l, want_l, atol=TOL_LSE, rtol=0, what=f"lse {what}")
    again = mla.prefill_attention(*args)
    assert torch.equal(again[0], got_o) and torch.equal(again[1], got_l), f"not deterministic {what}"
    return got_o, got_l


# (name, (lq, lk) pairs, heads, causal)
GRID = [
    ("ragged", [(1, 1), (7, 7), (63, 63), (64, 64), (65, 65), (127, 127), (128, 128), (129, 129), (1000, 1000),
                (8192, 8192)], 16, True),
    ("prefix", [(1, 1), (5, 300), (128, 1000), (77, 4096), (200, 201), (129, 8192), (1, 8192)], 16, True),
    ("lq>lk", [(300, 5), (129, 0), (64, 1), (0, 10), (260, 130), (1, 0), (5, 4), (200, 72)], 16, True),
    ("lq>lk-noncausal", [(300, 5), (129, 0), (64, 1), (0, 10), (260, 130), (1, 0)], 16, False),
    ("noncausal", [(1, 1), (100, 37), (129, 500), (513, 513), (64, 4096), (3000, 2000)], 16, False),
    ("H1", [(1, 1), (130, 130), (257, 1000)], 1, True),
    ("odd-heads", [(300, 300), (2, 5)], 3, True),
    ("H128", [(4096, 4096), (1, 1), (3000, 3000), (1100, 1100), (1, 700)], 128, True),
    ("H128-long", [(8192, 8192)], 128, True),
    ("H128-prefix-noncausal", [(512, 4096), (100, 100), (129, 1)], 128, False),
]


@prefill_kernel
@pytest.mark.parametrize("name, pairs, heads, causal", GRID, ids=[c[0] for c in GRID])
def test_prefill_grid(name, pairs, heads, causal):
    inputs = _inputs(pairs, heads, seed=len(pairs) * 31 + heads)
    out, lse = _check(*inputs, causal, what=name)
    if name.startswith("lq>lk"):  # the first lq - lk queries of a causal sequence see nothing
        tq = 0
        for lq, lk in pairs:
            blind = max(0, lq - lk) if causal else (lq if lk == 0 else 0)
            assert (out[tq : tq + blind] == 0).all() and (lse[:, tq : tq + blind] == float("inf")).all()
            tq += lq


@prefill_kernel
@pytest.mark.parametrize("layout", ["strided", "misaligned"])
def test_prefill_layouts_and_peaked_scores(layout):
    pairs = [(1, 1), (130, 130), (77, 333), (300, 300)]
    _check(*_inputs(pairs, 16, seed=3, layout=layout), True, what=layout)
    # Larger logits (|q.k| * scale ~ 15): a peaked softmax, exercising the running-max rescale.
    _check(*_inputs(pairs, 16, seed=4, q_mult=8.0, layout=layout), True, what=f"{layout} peaked")


@prefill_kernel
def test_prefill_without_pingpong(monkeypatch):
    monkeypatch.setenv("DSV2_PREFILL_PINGPONG", "0")
    pairs = [(1, 1), (129, 129), (77, 1000), (300, 5), (1000, 1000)]
    _check(*_inputs(pairs, 16, seed=5), True, what="no ping-pong")
    _check(*_inputs(pairs, 16, seed=6), False, what="no ping-pong, non-causal")


@prefill_kernel
def test_prefill_empty():
    q, k, v, cu_q, cu_k = _inputs([(0, 0), (0, 5)], 16, seed=7)
    out, lse = mla.prefill_attention(q, k, v, cu_q, cu_k, 0, 5, SCALE, True)
    assert out.shape == (0, 16, 128) and lse.shape == (16, 0)
    out, lse = _check(*_inputs([(3, 0), (5, 0)], 16, seed=8), True, what="no keys")
    assert (out == 0).all() and (lse == float("inf")).all()
    # A max_seqlen_q above every length only adds CTAs that exit.
    _check(*_inputs([(3, 3), (130, 130)], 16, seed=9), True, max_q=10**6, max_k=10**6, what="large max_seqlen")


@prefill_kernel
def test_prefill_cuda_graph_new_lengths():
    q, k, v, cu_q, cu_k = _inputs([(300, 300), (100, 100), (600, 600)], 16, seed=10)
    max_len = 700  # the grid covers lengths up to this
    args = lambda: (q, k, v, cu_q, cu_k, max_len, max_len, SCALE, True)  # noqa: E731
    mla.prefill_attention(*args())
    dsv2_kernels.set_value_checks(False)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, lse = mla.prefill_attention(*args())
    finally:
        dsv2_kernels.set_value_checks(True)
    for lengths in ([300, 100, 600], [700, 0, 300], [1, 998, 1]):
        cu_q.copy_(_cu(lengths))
        cu_k.copy_(_cu(lengths))
        poison_(out), poison_(lse)
        graph.replay()
        if max(lengths) > max_len:  # beyond the captured grid: rows past it stay unwritten, nothing worse
            torch.cuda.synchronize()
            continue
        with dsv2_kernels.kernels("none"):
            want_o, want_l = mla.prefill_attention(*args())
        _close(out, want_o, atol=TOL_OUT, rtol=TOL_OUT, what=f"graph out {lengths}")
        _close(lse, want_l, atol=TOL_LSE, rtol=0, what=f"graph lse {lengths}")


@prefill_kernel
def test_prefill_unsupported_and_bad_metadata():
    ops = torch.ops.dsv2_kernels
    q, k, v, cu_q, cu_k = _inputs([(10, 10), (70, 90)], 16, seed=11)

    def call(q=q, k=k, v=v, cu_q=cu_q, cu_k=cu_k, max_q=70, max_k=90, scale=0.1):
        return ops.prefill_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale, True)

    bad = [
        (lambda: call(q=q.half(), k=k.half(), v=v.half()), "'q'.*bfloat16"),
        (lambda: call(q=q.float(), k=k.float(), v=v.float()), "'q'.*bfloat16"),
        (lambda: call(q=q[..., :128], k=k[..., :128]), "'q'.*192"),
        (lambda: call(v=torch.cat([v, v[..., :64]], -1)), "'v'.*128"),
        (lambda: call(k=k.half()), "'k'.*dtype"),
        (lambda: call(k=k[:, :8]), "'k'.*shape"),
        (lambda: call(v=v[:5]), "'v'.*shape"),
        (lambda: call(q=q.transpose(1, 2).contiguous().transpose(1, 2)), "'q'.*contiguous"),
        (lambda: call(cu_q=cu_q.long()), "'cu_seqlens_q'.*dtype"),
        (lambda: call(cu_q=cu_q.cpu()), "'cu_seqlens_q'"),
        (lambda: call(cu_q=cu_q[None]), "'cu_seqlens_q'.*shape"),
        (lambda: call(cu_k=cu_k[:2]), "'cu_seqlens_k'.*shape"),
        (lambda: call(cu_k=cu_k.long()), "'cu_seqlens_k'.*dtype"),
        (lambda: call(max_q=-1), "'max_seqlen_q'"),
        (lambda: call(max_k=-1), "'max_seqlen_k'"),
        (lambda: call(scale=0.0), "'softmax_scale'"),
        (lambda: call(scale=float("nan")), "'softmax_scale'"),
    ]
    for fn, pattern in bad:
        with pytest.raises(ValueError, match=f"prefill_attention.*{pattern}"):
            fn()
    # Dtypes the reference accepts but the kernel does not: the op's CUDA kernel rejects them, naming the way to the
    # reference; the public wrapper sends them to the reference itself.
    args = (q.half(), k.half(), v.half(), cu_q, cu_k, 70, 90, 0.1, True)
    with pytest.raises(ValueError, match="prefill_attention.*'q'.*kernels\\('none'\\)"):
        ops.prefill_attention(*args)
    out, _ = mla.prefill_attention(*args)
    with dsv2_kernels.kernels("none"):
        want, _ = mla.prefill_attention(*args)
    assert out.dtype == torch.float16 and torch.equal(out, want)


@prefill_kernel
def test_prefill_bad_values_stay_in_bounds():
    """Value checks are the wrapper's job; the kernel only has to stay in bounds for any cu_seqlens values."""
    ops = torch.ops.dsv2_kernels
    q, k, v, _, _ = _inputs([(100, 100), (70, 170)], 16, seed=12)
    for cq, ck in (([0, 100, 170], [0, 100, 270]), ([0, 10**6, -5], [0, -3, 2**31 - 1]),
                   ([-(2**31), 2**31 - 1, 0], [5, 4, 3]), ([170, 0, 170], [270, 270, 0])):
        ops.prefill_attention(q, k, v, torch.tensor(cq, dtype=torch.int32, device="cuda"),
                              torch.tensor(ck, dtype=torch.int32, device="cuda"), 2**31 - 1, 2**31 - 1, 0.1, True)
    torch.cuda.synchronize()  # an illegal address would surface here (and in compute-sanitizer)


# ---- merge_attention_states ----------------------------------------------------------------------------------------
MERGE_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def _merge_inputs(tokens, heads, dim, dtype, seed, strided):
    g = torch.Generator(device="cuda").manual_seed(seed)
    width = dim + (8 if strided else 0)
    out_a = torch.randn(tokens, heads, width, generator=g, device="cuda").to(dtype)[..., :dim]
    out_b = torch.randn(tokens, heads, width, generator=g, device="cuda").to(dtype)[..., width - dim:]
    lse_a = (torch.randn(heads, tokens + 3, generator=g, device="cuda") * 4)[:, :tokens]  # strided rows
    lse_b = torch.randn(heads, tokens, generator=g, device="cuda") * 4
    # Empty parts: +inf ("saw no key") and -inf; their outs hold NaN, which must not be read.
    inf = float("inf")
    lse_a[:, 0], lse_b[:, 1] = inf, -inf
    lse_a[:, 2], lse_b[:, 2] = inf, inf  # both empty: out 0, lse +inf
    lse_a[:, 3], lse_b[:, 3] = -inf, inf
    lse_a[0, 4] = -inf
    lse_b[:, 5] = lse_a[:, 5] + 40.0  # one part dominates
    for lse, out in ((lse_a, out_a), (lse_b, out_b)):
        out.transpose(0, 1)[lse.isinf()] = float("nan")
    return out_a, lse_a, out_b, lse_b


@merge_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("tokens, heads, dim, strided",
                         [(37, 16, 128, False), (37, 16, 128, True), (9, 3, 7, True), (1000, 128, 128, True),
                          (6, 2, 0, False)])
def test_merge_vs_reference(dtype, tokens, heads, dim, strided):
    out_a, lse_a, out_b, lse_b = _merge_inputs(tokens, heads, dim, dtype, seed=tokens + dim, strided=strided)
    want_o, want_l = mla.merge_attention_states_ref(out_a, lse_a, out_b, lse_b)
    _poison_allocator(((tokens, heads, dim), dtype), ((heads, tokens), torch.float32))
    got_o, got_l = mla.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert got_o.dtype == dtype and got_o.is_contiguous() and got_o.shape == (tokens, heads, dim)
    assert got_l.dtype == torch.float32 and got_l.is_contiguous() and got_l.shape == (heads, tokens)
    tol = MERGE_TOL[dtype]
    _close(got_o, want_o, atol=tol, rtol=tol, what="merged out")
    _close(got_l, want_l, atol=1e-5, rtol=1e-6, what="merged lse")
    assert not got_o.isnan().any()
    assert (got_o[2] == 0).all() and (got_l[:, 2] == float("inf")).all()


@prefill_kernel
@merge_kernel
def test_prefix_plus_new_tokens_equals_full_attention():
    """Chunked prefill: attention over a cached prefix (non-causal: every new token sees all of it) merged with causal
    attention over the new tokens equals causal attention over prefix + new tokens."""
    pairs = [(100, 900), (1, 1), (130, 130), (257, 5000), (64, 64 + 129)]
    q, k, v, cu_q, cu_k = _inputs(pairs, 16, seed=13)
    lq = [p[0] for p in pairs]
    prefix = [lk - lq_ for lq_, lk in pairs]
    new_idx = torch.cat([torch.arange(int(cu_k[b]) + prefix[b], int(cu_k[b + 1])) for b in range(len(pairs))]).cuda()
    old_idx = torch.cat([torch.arange(int(cu_k[b]), int(cu_k[b]) + prefix[b]) for b in range(len(pairs))]).cuda()
    part_new = mla.prefill_attention(q, k[new_idx], v[new_idx], cu_q, _cu(lq), max(lq), max(lq), SCALE, True)
    part_old = mla.prefill_attention(q, k[old_idx], v[old_idx], cu_q, _cu(prefix), max(lq), max(prefix), SCALE,
                                     False)
    out, lse = mla.merge_attention_states(*part_old, *part_new)
    with dsv2_kernels.kernels("none"):
        want_o, want_l = mla.prefill_attention(q, k, v, cu_q, cu_k, max(lq), max(p[1] for p in pairs), SCALE, True)
    _close(out, want_o, atol=TOL_OUT, rtol=TOL_OUT, what="chunked out")
    _close(lse, want_l, atol=TOL_LSE, rtol=0, what="chunked lse")


@merge_kernel
def test_merge_bad_metadata():
    ops = torch.ops.dsv2_kernels
    out_a, lse_a, out_b, lse_b = _merge_inputs(8, 4, 16, torch.bfloat16, seed=14, strided=False)
    bad = [
        (lambda: ops.merge_attention_states(out_a.double(), lse_a, out_b.double(), lse_b), "'out_a'.*dtype"),
        (lambda: ops.merge_attention_states(out_a, lse_a, out_b.float(), lse_b), "'out_b'.*dtype"),
        (lambda: ops.merge_attention_states(out_a, lse_a, out_b[:4], lse_b), "'out_b'.*shape"),
        (lambda: ops.merge_attention_states(out_a, lse_a.t(), out_b, lse_b), "'lse_a'.*shape"),
        (lambda: ops.merge_attention_states(out_a, lse_a, out_b, lse_b.double()), "'lse_b'.*dtype"),
        (lambda: ops.merge_attention_states(out_a, lse_a, out_b, lse_b.cpu()), "'lse_b'"),
        (lambda: ops.merge_attention_states(out_a.transpose(1, 2), lse_a, out_b, lse_b), "'out_a'"),
    ]
    for fn, pattern in bad:
        with pytest.raises(ValueError, match=f"merge_attention_states.*{pattern}"):
            fn()
