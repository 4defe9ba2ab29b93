"""MoE family: route / dispatch_contiguous / dispatch_masked / combine references vs straightforward Python loops in
float64 (CPU), adversarial routings, bad inputs, fake impls (FakeTensorMode and torch.compile), and kernel vs reference
on the GPU."""

import itertools
import math

import pytest
import torch

import dsv2_kernels
from dsv2_kernels import OpError, moe
from tests.conftest import assert_close, requires_cuda_kernel

FP8 = torch.float8_e4m3fn
OPS = torch.ops.dsv2_kernels

# name -> route kwargs
CONFIGS = {
    "v2_lite": dict(top_k=6, scoring="softmax", method="greedy"),
    "v2": dict(top_k=6, scoring="softmax", method="group_limited_greedy", n_group=8, topk_group=3,
               routed_scaling_factor=16.0),
    "v3": dict(top_k=8, scoring="sigmoid", method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=True,
               routed_scaling_factor=2.5),
    "softmax_norm": dict(top_k=4, scoring="softmax", method="greedy", norm_topk_prob=True),
    "sigmoid_grouped": dict(top_k=3, scoring="sigmoid", method="group_limited_greedy", n_group=4, topk_group=2),
}
NUM_EXPERTS = {"v2_lite": 64, "v2": 160, "v3": 256, "softmax_norm": 24, "sigmoid_grouped": 16}


def need_fp8_ref():
    if not hasattr(dsv2_kernels.fp8, "quant_per_token_group_ref"):
        pytest.skip("dsv2_kernels.fp8.quant_per_token_group_ref not written yet")
    return dsv2_kernels.fp8


# ---- route: independent math -----------------------------------------------------------------------------------
def naive_route(logits, top_k, scoring="softmax", method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
                routed_scaling_factor=1.0, correction_bias=None):
    """Token by token in float64, from the definitions. Also returns, per token, the smallest nonzero gap between
    two values whose order decides the result (fp32 and float64 may disagree on near-ties, never on exact ones)."""
    num_experts = logits.shape[1]
    bias = correction_bias.double().tolist() if correction_bias is not None else [0.0] * num_experts
    all_ids, all_weights, margins = [], [], []

    def gap(values):  # smallest nonzero difference of consecutive values, sorted descending
        return min([a - b for a, b in zip(values, values[1:]) if a != b], default=math.inf)

    for row in logits.double().tolist():
        if scoring == "softmax":
            mx = max(row)
            ex = [math.exp(v - mx) for v in row]
            scores = [v / sum(ex) for v in ex]
        else:
            scores = [1.0 / (1.0 + math.exp(-v)) for v in row]
        choice = [s + b for s, b in zip(scores, bias)] if method == "noaux_tc" else scores
        allowed, margin = list(range(num_experts)), math.inf
        if method != "greedy":
            size = num_experts // n_group
            groups = [choice[g * size:(g + 1) * size] for g in range(n_group)]
            if method == "group_limited_greedy":
                group_score = [max(m) for m in groups]
            else:
                group_score = [sum(sorted(m)[-2:]) for m in groups]
            ranked = sorted(range(n_group), key=lambda g: (-group_score[g], g))
            margin = gap([group_score[g] for g in ranked[:topk_group + 1]])
            kept = set(ranked[:topk_group])
            allowed = [e for e in allowed if e // size in kept]
        ranked = sorted(allowed, key=lambda e: (-choice[e], e))
        margin = min(margin, gap([choice[e] for e in ranked[:top_k + 1]]))
        ids = ranked[:top_k]
        w = [scores[e] for e in ids]
        if norm_topk_prob:
            total = sum(w) + 1e-20
            w = [v / total for v in w]
        all_ids.append(ids)
        all_weights.append([v * routed_scaling_factor for v in w])
        margins.append(margin)
    return (torch.tensor(all_ids, dtype=torch.int32).view(-1, top_k),
            torch.tensor(all_weights, dtype=torch.float64).view(-1, top_k), torch.tensor(margins))


def make_logits(t, e, cfg, seed, dtype=torch.float32, bias=None, scale=2.0):
    """Random logits, each token redrawn until no decision of the routing is a near-tie (gap < 1e-6)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(t, e, generator=g) * scale).to(dtype)
    redraw = torch.arange(t)
    for _ in range(50):
        redraw = redraw[naive_route(logits[redraw], correction_bias=bias, **cfg)[2] < 1e-6]
        if not len(redraw):
            return logits
        logits[redraw] = (torch.randn(len(redraw), e, generator=g) * scale).to(dtype)
    raise AssertionError("could not draw logits without near-ties")


def make_bias(e, seed):
    return torch.randn(e, generator=torch.Generator().manual_seed(seed)) * 0.1


def check_route(logits, cfg, bias=None):
    ids, w = moe.route(logits, correction_bias=bias, **cfg)
    want_ids, want_w, _ = naive_route(logits, correction_bias=bias, **cfg)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.shape == w.shape == (logits.shape[0], cfg["top_k"])
    assert torch.equal(ids, want_ids), "route ids"
    # fp32 softmax/sigmoid vs float64: a few ulps relative
    assert_close(w, want_w, atol=1e-7, rtol=2e-6, what="route weights")
    return ids, w


# ---- route: reference tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("t", [1, 7, 33])
def test_route_reference(name, t):
    cfg, e = CONFIGS[name], NUM_EXPERTS[name]
    bias = make_bias(e, t) if cfg["method"] == "noaux_tc" else None
    logits = make_logits(t, e, cfg, seed=t, bias=bias)
    ids, w = check_route(logits, cfg, bias)
    for row in ids.tolist():
        assert len(set(row)) == len(row)
    if cfg.get("norm_topk_prob"):
        assert_close(w.double().sum(-1), torch.full((t,), cfg.get("routed_scaling_factor", 1.0), dtype=torch.float64),
                     atol=0, rtol=1e-6, what="normalized weights sum to the scaling factor")


def test_route_bf16_logits_with_ties():
    # bf16 logits in [-4, 4] repeat values often: exact ties, resolved by expert index (and group index)
    for name in ("v2_lite", "v2", "v3"):
        cfg, e = CONFIGS[name], NUM_EXPERTS[name]
        bias = make_bias(e, 1) if name == "v3" else None
        logits = make_logits(40, e, cfg, seed=2, dtype=torch.bfloat16, bias=bias)
        check_route(logits, cfg, bias)


def noaux_tie_case():
    """Sigmoid scores 0 or 0.5 and biases in quarters: every choice and top-2 group sum is exact in any precision,
    so the many ties (within and across groups) are true ties."""
    g = torch.Generator().manual_seed(4)
    logits = torch.where(torch.rand(50, 32, generator=g) < 0.5, 0.0, float("-inf"))
    bias = torch.randint(0, 3, (32,), generator=g) * 0.25
    return logits, dict(top_k=6, scoring="sigmoid", method="noaux_tc", n_group=8, topk_group=3), bias


def test_route_exact_ties():
    e = 32
    cfg = dict(top_k=5, scoring="softmax", method="group_limited_greedy", n_group=4, topk_group=2)
    # all equal: groups 0, 1 and experts 0..4
    ids, _ = check_route(torch.zeros(2, e) + 0.3, cfg)
    assert ids.tolist() == [[0, 1, 2, 3, 4]] * 2
    # few distinct values: ties within and across groups
    logits = torch.randint(0, 3, (50, e), generator=torch.Generator().manual_seed(3)).float()
    for c in (cfg, CONFIGS["sigmoid_grouped"] | dict(top_k=4), dict(top_k=7, scoring="sigmoid", method="greedy")):
        check_route(logits, c)
    check_route(*noaux_tie_case())
    # the selection is by choice (tied in every group), the weights are the scores
    ids, w = moe.route(torch.arange(8.0).view(1, 8), 2, "sigmoid", "noaux_tc", 2, 1,
                       correction_bias=-torch.sigmoid(torch.arange(8.0)))
    assert ids.tolist() == [[0, 1]]
    assert_close(w, torch.sigmoid(torch.arange(2.0)).view(1, 2), atol=0, rtol=1e-6, what="noaux_tc weights")


def test_route_dropped_groups_never_picked():
    # softmax underflows to exactly 0 for all but expert 5: HF's 0.0 masking could pick a dropped group's expert
    logits = torch.zeros(1, 16)
    logits[0, 5] = 1000.0
    ids, w = moe.route(logits, 4, "softmax", "group_limited_greedy", n_group=4, topk_group=1)
    assert ids.tolist() == [[5, 4, 6, 7]]
    assert w.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    check_route(logits, dict(top_k=4, scoring="softmax", method="group_limited_greedy", n_group=4, topk_group=1))


def test_route_scaling_and_normalization():
    logits = make_logits(9, 20, dict(top_k=3), seed=5)
    scores = logits.softmax(-1)
    ids, w = moe.route(logits, 3, routed_scaling_factor=16.0)
    assert_close(w, scores.gather(1, ids.long()) * 16, atol=0, rtol=1e-6, what="not normalized")
    ids1, w1 = moe.route(logits, 3, norm_topk_prob=True, routed_scaling_factor=3.0)
    assert torch.equal(ids, ids1)
    picked = scores.gather(1, ids.long())
    assert_close(w1, picked / picked.sum(-1, keepdim=True) * 3, atol=0, rtol=1e-6, what="normalized")
    # top_k == 1 with normalization: the weight is the scaling factor (HF V2 would skip the normalization)
    assert_close(moe.route(logits, 1, norm_topk_prob=True)[1], torch.ones(9, 1), atol=0, rtol=1e-7, what="k=1")


def test_route_empty_and_greedy_ignores_groups():
    ids, w = moe.route(torch.empty(0, 64, dtype=torch.bfloat16), 6)
    assert ids.shape == w.shape == (0, 6) and ids.dtype == torch.int32 and w.dtype == torch.float32
    logits = make_logits(4, 12, dict(top_k=4), seed=6)
    assert torch.equal(moe.route(logits, 4, n_group=5, topk_group=9)[0], moe.route(logits, 4)[0])
    ids, _ = moe.route(logits, 12)  # k == E: a full descending ranking
    assert ids.tolist() == [sorted(range(12), key=lambda e: (-row[e], e)) for row in logits.tolist()]


# ---- dispatch: independent math --------------------------------------------------------------------------------
def copies_per_expert(topk_ids, num_experts):
    """Expert e -> its copies (token, slot), by loops over tokens then slots."""
    per = [[] for _ in range(num_experts)]
    for t, row in enumerate(topk_ids.tolist()):
        for s, e in enumerate(row):
            if e >= 0:
                per[e].append((t, s))
    return per


def naive_contiguous(topk_ids, num_experts, alignment):
    """(offsets, {row: (expert, token)}, token_row) of the contiguous layout, expert by expert."""
    t, k = topk_ids.shape
    token_row = [[-1] * k for _ in range(t)]
    offsets, placed, start = [], {}, 0
    for e, copies in enumerate(copies_per_expert(topk_ids, num_experts)):
        offsets.append(start)
        for i, (tok, s) in enumerate(copies):
            token_row[tok][s] = start + i
            placed[start + i] = (e, tok)
        start += -(-len(copies) // alignment) * alignment
    offsets.append(start)
    return offsets, placed, torch.tensor(token_row, dtype=torch.int32).view(t, k)


def naive_masked(topk_ids, num_experts, max_m):
    t, k = topk_ids.shape
    token_row = [[-1] * k for _ in range(t)]
    counts, placed = [], {}
    for e, copies in enumerate(copies_per_expert(topk_ids, num_experts)):
        counts.append(len(copies))
        for i, (tok, s) in enumerate(copies[:max_m]):
            token_row[tok][s] = e * max_m + i
            placed[e * max_m + i] = (e, tok)
    return counts, placed, torch.tensor(token_row, dtype=torch.int32).view(t, k)


def check_rows(rows, scales, hidden, placed, quant_fp8, what):
    """The rows listed in ``placed`` hold their token (bf16 exact; or its per-token-group fp8 quantization), the
    reference's other rows are zero."""
    flat = rows.reshape(-1, rows.shape[-1])
    dest = torch.tensor(sorted(placed), dtype=torch.long)
    src = torch.tensor([placed[r][1] for r in sorted(placed)], dtype=torch.long)
    other = torch.ones(flat.shape[0], dtype=torch.bool)
    other[dest] = False
    if not quant_fp8:
        assert rows.dtype == torch.bfloat16 and scales.shape == (0,) and scales.dtype == torch.float32
        assert torch.equal(flat[dest], hidden[src]), what
        assert not flat[other].any(), f"{what}: reference pads with zeros"
        return
    fp8 = need_fp8_ref()
    assert rows.dtype == FP8 and scales.dtype == torch.float32
    sflat = scales.reshape(-1, scales.shape[-1])  # copies column-major scales into row order
    q_tok, s_tok = fp8.quant_per_token_group_ref(hidden, 128)
    assert torch.equal(flat[dest].view(torch.uint8), q_tok[src].view(torch.uint8)), f"{what}: fp8 rows"
    assert torch.equal(sflat[dest], s_tok[src]), f"{what}: scales"
    # independently: scale = group amax / 448, and dequantization within half an e4m3 step (2^-4 relative)
    x = hidden[src].double().view(len(src), hidden.shape[1] // 128, 128)
    assert torch.equal(sflat[dest].double(), (x.abs().amax(-1).float() / 448).double()), f"{what}: scale formula"
    deq = flat[dest].double().view_as(x) * sflat[dest].double().unsqueeze(-1)
    assert ((deq - x).abs() <= x.abs() / 16 + sflat[dest].double().unsqueeze(-1) / 1024).all(), f"{what}: dequant"
    assert not flat[other].view(torch.uint8).any(), f"{what}: reference pads with zeros"


def routing(kind, t, k, e, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":  # distinct experts per token, as route makes them
        if t == 0:
            return torch.empty(0, k, dtype=torch.int32)
        return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).int().view(t, k)
    if kind == "one_expert":
        return torch.full((t, k), e - 1, dtype=torch.int32)
    if kind == "few_experts":  # most experts empty, duplicates within a token
        return torch.tensor([1, 3])[torch.randint(0, 2, (t, k), generator=g)].int()
    if kind == "not_routed":  # negative ids are skipped
        ids = torch.randint(-3, e, (t, k), generator=g).int()
        ids[0, 0] = -1
        return ids
    raise ValueError(kind)


ROUTINGS = [("random", 5, 3, 8), ("random", 37, 6, 64), ("one_expert", 9, 2, 4), ("few_experts", 13, 4, 6),
            ("not_routed", 11, 3, 5), ("random", 1, 6, 160), ("random", 0, 6, 16), ("one_expert", 1, 1, 1)]


def hidden_for(t, h, seed):
    return (torch.randn(t, h, generator=torch.Generator().manual_seed(seed)) * 3).bfloat16()


# ---- dispatch: reference tests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_fp8", [False, True])
@pytest.mark.parametrize("alignment", [1, 3, 4, 128])
@pytest.mark.parametrize("kind, t, k, e", ROUTINGS)
def test_dispatch_contiguous_reference(kind, t, k, e, alignment, quant_fp8):
    ids = routing(kind, t, k, e, seed=t + k)
    hidden = hidden_for(t, 256, seed=t)
    rows, scales, offsets, row_expert, token_row = moe.dispatch_contiguous(hidden, ids, e, alignment, quant_fp8)
    want_offsets, placed, want_token_row = naive_contiguous(ids, e, alignment)
    r = moe.contiguous_rows_bound(t, k, e, alignment)
    assert r % alignment == 0 and r >= want_offsets[-1]
    assert rows.shape == (r, 256) and rows.is_contiguous()
    assert offsets.dtype == row_expert.dtype == token_row.dtype == torch.int32
    assert offsets.tolist() == want_offsets
    assert torch.equal(token_row, want_token_row)
    assert row_expert.tolist() == [placed[i][0] if i in placed else -1 for i in range(r)]
    if quant_fp8:
        assert scales.shape == (r, 2) and scales.stride() == (1, (r + 3) // 4 * 4)
    check_rows(rows, scales, hidden, placed, quant_fp8, "dispatch_contiguous")


@pytest.mark.parametrize("quant_fp8", [False, True])
@pytest.mark.parametrize("max_m", [1, 2, 5, 64])
@pytest.mark.parametrize("kind, t, k, e", ROUTINGS)
def test_dispatch_masked_reference(kind, t, k, e, max_m, quant_fp8):
    ids = routing(kind, t, k, e, seed=t * k)
    hidden = hidden_for(t, 128, seed=t + 1)
    rows, scales, counts, token_row = moe.dispatch_masked(hidden, ids, e, max_m, quant_fp8)
    want_counts, placed, want_token_row = naive_masked(ids, e, max_m)
    assert rows.shape == (e, max_m, 128) and rows.is_contiguous()
    assert counts.dtype == token_row.dtype == torch.int32
    assert counts.tolist() == want_counts
    assert torch.equal(token_row, want_token_row)
    if quant_fp8:
        m_pad = (max_m + 3) // 4 * 4
        assert scales.shape == (e, max_m, 1) and scales.stride() == (m_pad, 1, m_pad)
    check_rows(rows, scales, hidden, placed, quant_fp8, "dispatch_masked")


def test_dispatch_v2_lite_fp8():
    # V2-Lite: 64 experts, top-6 greedy, H = 2048; the rows the grouped FP8 GEMM reads
    cfg = CONFIGS["v2_lite"]
    logits = make_logits(6, 64, cfg, seed=7)
    ids, _ = moe.route(logits, **cfg)
    hidden = hidden_for(6, 2048, seed=8)
    rows, scales, offsets, row_expert, token_row = moe.dispatch_contiguous(hidden, ids, 64, 128, True)
    assert rows.shape == (36 * 128, 2048) and scales.shape == (36 * 128, 16) and scales.stride() == (1, 36 * 128)
    want_offsets, placed, want_token_row = naive_contiguous(ids, 64, 128)
    assert offsets.tolist() == want_offsets and torch.equal(token_row, want_token_row)
    check_rows(rows, scales, hidden, placed, True, "v2-lite")
    # every 128-row tile of a used segment belongs to one expert, and starts with a real row
    firsts = row_expert[: offsets[-1]].view(-1, 128)[:, 0]
    assert (firsts >= 0).all()


def test_contiguous_rows_bound_is_tight():
    """Exhaustively, over every routing (duplicates and skips included) of a few tiny cases: the bound is the most
    rows any routing uses."""
    for t, k, e, a in [(1, 1, 1, 1), (2, 2, 3, 2), (1, 4, 3, 3), (4, 1, 2, 4), (2, 2, 2, 5), (3, 1, 3, 2)]:
        most = 0
        for flat in itertools.product(range(-1, e), repeat=t * k):
            ids = torch.tensor(flat, dtype=torch.int32).view(t, k)
            most = max(most, naive_contiguous(ids, e, a)[0][-1])
        assert moe.contiguous_rows_bound(t, k, e, a) == most, (t, k, e, a)
    assert moe.contiguous_rows_bound(0, 6, 64, 128) == 0
    assert moe.contiguous_rows_bound(4096, 6, 160, 128) == (4096 * 6 + 160 * 127) // 128 * 128


# ---- combine ---------------------------------------------------------------------------------------------------
def naive_combine(expert_out, token_row, weights, shared_out=None):
    n = expert_out.shape[-1]
    flat = expert_out.double().reshape(-1, n)
    out = torch.zeros(token_row.shape[0], n, dtype=torch.float64)
    for t, row in enumerate(token_row.tolist()):
        for j, r in enumerate(row):
            if r >= 0:
                out[t] += float(weights[t, j]) * flat[r]
        if shared_out is not None:
            out[t] += shared_out[t].double()
    return out


BF16_TOL = dict(atol=1e-5, rtol=2**-8)  # one bf16 rounding of an fp32 sum


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("t, k", [(0, 6), (1, 6), (17, 3), (8, 1)])
def test_combine_reference(t, k, shared, batched):
    g = torch.Generator().manual_seed(t * 10 + k)
    n = 48
    expert_out = torch.randn(4, 9, n, generator=g).bfloat16()
    if not batched:
        expert_out = expert_out.view(36, n)
    token_row = torch.randint(-1, 36, (t, k), generator=g).int()
    weights = torch.rand(t, k, generator=g) * 2
    shared_out = torch.randn(t, n, generator=g).bfloat16() if shared else None
    unread = torch.ones(36, dtype=torch.bool)
    unread[token_row[token_row >= 0].long()] = False
    expert_out.view(36, n)[unread] = float("nan")  # rows never referenced must never be read
    out = moe.combine(expert_out, token_row, weights, shared_out)
    assert out.shape == (t, n) and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert_close(out, naive_combine(expert_out, token_row, weights, shared_out), **BF16_TOL, what="combine")


@pytest.mark.parametrize("layout", ["contiguous", "masked"])
@pytest.mark.parametrize("quant_fp8", [False, True])
@pytest.mark.parametrize("t", [1, 23])
def test_dispatch_identity_combine_round_trip(layout, quant_fp8, t):
    e, k, h = 16, 4, 256
    logits = make_logits(t, e, dict(top_k=k), seed=t)
    ids, w = moe.route(logits, k, norm_topk_prob=True)
    ids[0, -1] = -1  # a skipped slot
    hidden = hidden_for(t, h, seed=t + 3)
    if layout == "contiguous":
        rows, scales, _, _, token_row = moe.dispatch_contiguous(hidden, ids, e, 8, quant_fp8)
    else:  # max_m large enough that nothing is dropped
        rows, scales, _, token_row = moe.dispatch_masked(hidden, ids, e, t * k, quant_fp8)
    if quant_fp8:
        rows = dsv2_kernels.fp8.dequant_per_token_group(rows, scales, torch.bfloat16)
    out = moe.combine(rows, token_row, w, hidden)
    want = torch.zeros(t, h, dtype=torch.float64)
    for tok in range(t):
        want[tok] = hidden[tok].double() * (1 + sum(float(w[tok, j]) for j in range(k) if ids[tok, j] >= 0))
    if quant_fp8:  # each term within 2^-4 relative (e4m3) + one bf16 rounding of the dequantized value
        subnormal = hidden.double().abs().amax(-1, keepdim=True) / 448 / 1024  # half the e4m3 subnormal step
        bound = (hidden.double().abs() * (1 / 16 + 2**-8) + subnormal) * w.double().sum(-1, keepdim=True)
        assert ((out.double() - want).abs() <= bound + want.abs() * 2**-8 + 1e-5).all()
    else:
        assert_close(out, want, **BF16_TOL, what=f"round trip {layout}")


def test_masked_drops_beyond_max_m_round_trip():
    hidden = hidden_for(6, 128, seed=1)
    ids = torch.zeros(6, 2, dtype=torch.int32)
    ids[:, 1] = 1
    w = torch.ones(6, 2)
    rows, _, counts, token_row = moe.dispatch_masked(hidden, ids, 2, 4, False)
    assert counts.tolist() == [6, 6]
    assert token_row.tolist() == [[0, 4], [1, 5], [2, 6], [3, 7], [-1, -1], [-1, -1]]
    out = moe.combine(rows, token_row, w, None)
    assert torch.equal(out[:4], (hidden[:4].float() * 2).bfloat16()) and not out[4:].any()


# ---- wrappers, bad inputs, fakes -------------------------------------------------------------------------------
def test_wrappers_equal_forced_reference():
    logits = make_logits(5, 16, dict(top_k=2), seed=9)
    hidden = hidden_for(5, 128, seed=9)
    ids, w = moe.route(logits, 2)
    calls = [lambda: moe.route(logits, 2), lambda: moe.dispatch_contiguous(hidden, ids, 16, 4, True),
             lambda: moe.dispatch_masked(hidden, ids, 16, 3, False), lambda: (moe.combine(hidden, ids % 5, w),)]
    for call in calls:
        got = call()
        with dsv2_kernels.kernels("none"):
            want = call()
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            assert torch.equal(*(x.view(torch.uint8) if x.dtype == FP8 else x for x in (a, b)))


def _logits(e=16, t=3, dtype=torch.float32):
    return torch.randn(t, e, dtype=dtype)


H, IDS = torch.randn(4, 128).bfloat16(), torch.tensor([[0, 1], [2, 3], [1, 0], [3, 3]], dtype=torch.int32)
BAD = [
    (lambda: moe.route(_logits().int(), 2), "route.*'logits'.*dtype"),
    (lambda: moe.route(torch.randn(16), 2), "route.*'logits'.*dimensions"),
    (lambda: moe.route(_logits(257), 2), "route.*'logits'.*256"),
    (lambda: moe.route(_logits().t(), 2), "route.*'logits'.*contiguous"),
    (lambda: moe.route(_logits(), 2, scoring="relu"), "route.*'scoring'"),
    (lambda: moe.route(_logits(), 2, method="topk"), "route.*'method'"),
    (lambda: moe.route(_logits(), 0), "route.*'top_k'"),
    (lambda: moe.route(_logits(32), 17), "route.*'top_k'"),
    (lambda: moe.route(_logits(4), 5), "route.*'top_k'"),
    (lambda: moe.route(_logits(), 2, method="group_limited_greedy", n_group=3), "route.*'n_group'"),
    (lambda: moe.route(_logits(), 2, method="group_limited_greedy", n_group=0), "route.*'n_group'"),
    (lambda: moe.route(_logits(), 2, method="group_limited_greedy", n_group=4, topk_group=5), "route.*'topk_group'"),
    (lambda: moe.route(_logits(), 2, method="group_limited_greedy", n_group=4, topk_group=0), "route.*'topk_group'"),
    (lambda: moe.route(_logits(), 5, method="group_limited_greedy", n_group=4, topk_group=1), "route.*'top_k'.*kept"),
    (lambda: moe.route(_logits(), 2, "sigmoid", "noaux_tc", 4, 2), "route.*'correction_bias'.*required"),
    (lambda: moe.route(_logits(), 2, correction_bias=torch.zeros(16)), "route.*'correction_bias'.*noaux_tc"),
    (lambda: moe.route(_logits(), 2, "sigmoid", "noaux_tc", 4, 2, correction_bias=torch.zeros(8)),
     "route.*'correction_bias'.*shape"),
    (lambda: moe.route(_logits(), 2, "sigmoid", "noaux_tc", 4, 2, correction_bias=torch.zeros(16).bfloat16()),
     "route.*'correction_bias'.*dtype"),
    (lambda: moe.route(_logits(), 2, "sigmoid", "noaux_tc", 16, 2, correction_bias=torch.zeros(16)),
     "route.*'n_group'.*2 experts"),
    (lambda: moe.route(_logits(), 2, routed_scaling_factor=0.0), "route.*'routed_scaling_factor'"),
    (lambda: moe.route(_logits(), 2, routed_scaling_factor=float("nan")), "route.*'routed_scaling_factor'"),
    (lambda: moe.dispatch_contiguous(H.float(), IDS, 4), "dispatch_contiguous.*'hidden'.*dtype"),
    (lambda: moe.dispatch_contiguous(torch.randn(128, 4).bfloat16().t(), IDS, 4),
     "dispatch_contiguous.*'hidden'.*contiguous"),
    (lambda: moe.dispatch_contiguous(H[:, :100].contiguous(), IDS, 4), "dispatch_contiguous.*'hidden'.*multiple of 8"),
    (lambda: moe.dispatch_contiguous(H[:, :64].contiguous(), IDS, 4, quant_fp8=True),
     "dispatch_contiguous.*'hidden'.*128"),
    (lambda: moe.dispatch_contiguous(H, IDS.long(), 4), "dispatch_contiguous.*'topk_ids'.*dtype"),
    (lambda: moe.dispatch_contiguous(H, IDS[:3], 4), "dispatch_contiguous.*'topk_ids'.*shape"),
    (lambda: moe.dispatch_contiguous(H, IDS[:, :0], 4), "dispatch_contiguous.*'topk_ids'.*top_k >= 1"),
    (lambda: moe.dispatch_contiguous(H, IDS.view(-1), 4), "dispatch_contiguous.*'topk_ids'.*dimensions"),
    (lambda: moe.dispatch_contiguous(H, IDS, 0), "dispatch_contiguous.*'num_experts'"),
    (lambda: moe.dispatch_contiguous(H, IDS, 1025), "dispatch_contiguous.*'num_experts'"),
    (lambda: moe.dispatch_contiguous(H, IDS, 4, alignment=0), "dispatch_contiguous.*'alignment'"),
    (lambda: moe.dispatch_contiguous(H, IDS, 3), "dispatch_contiguous.*'topk_ids'.*range"),
    (lambda: moe.dispatch_masked(H, IDS, 4, 0), "dispatch_masked.*'max_m'"),
    (lambda: moe.dispatch_masked(H, IDS, 2, 8), "dispatch_masked.*'topk_ids'.*range"),
    (lambda: moe.dispatch_masked(H.half(), IDS, 4, 8), "dispatch_masked.*'hidden'.*dtype"),
    (lambda: moe.combine(H.float(), IDS, torch.ones(4, 2)), "combine.*'expert_out'.*dtype"),
    (lambda: moe.combine(H.view(-1), IDS, torch.ones(4, 2)), "combine.*'expert_out'"),
    (lambda: moe.combine(H[:, :12].contiguous(), IDS, torch.ones(4, 2)), "combine.*'expert_out'.*multiple of 8"),
    (lambda: moe.combine(H[:, ::2], IDS, torch.ones(4, 2)), "combine.*'expert_out'.*contiguous"),
    (lambda: moe.combine(H, IDS.long(), torch.ones(4, 2)), "combine.*'token_row'.*dtype"),
    (lambda: moe.combine(H, IDS[:, :0], torch.ones(4, 0)), "combine.*'token_row'.*top_k >= 1"),
    (lambda: moe.combine(H, IDS, torch.ones(4, 3)), "combine.*'topk_weights'.*shape"),
    (lambda: moe.combine(H, IDS, torch.ones(4, 2).bfloat16()), "combine.*'topk_weights'.*dtype"),
    (lambda: moe.combine(H, IDS, torch.ones(4, 2), H[:3]), "combine.*'shared_out'.*shape"),
    (lambda: moe.combine(H, IDS, torch.ones(4, 2), H.float()), "combine.*'shared_out'.*dtype"),
    (lambda: moe.combine(H, IDS + 1, torch.ones(4, 2)), "combine.*'token_row'.*range"),
    (lambda: moe.combine(H.view(2, 2, 128), IDS + 1, torch.ones(4, 2)), "combine.*'token_row'.*range"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_inputs(case):
    call, match = BAD[case]
    with pytest.raises(OpError, match=match):
        call()
    with dsv2_kernels.kernels("none"), pytest.raises(OpError, match=match):
        call()


def _fake_cases():
    cfg = dict(top_k=6, scoring="sigmoid", method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=True,
               routed_scaling_factor=2.5)
    ids = torch.randint(-1, 32, (7, 6), dtype=torch.int32)
    hidden = hidden_for(7, 256, seed=0)
    return [
        (OPS.route, (torch.randn(7, 32).bfloat16(), *cfg.values(), torch.randn(32))),
        (OPS.route, (torch.randn(0, 64), 6, "softmax", "greedy", 1, 1, False, 1.0, None)),
        *[(OPS.dispatch_contiguous, (hidden[:t], ids[:t], 32, a, q)) for t, a, q in
          [(7, 128, True), (7, 3, True), (1, 1, False), (0, 128, True)]],
        *[(OPS.dispatch_masked, (hidden[:t], ids[:t], 32, m, q)) for t, m, q in [(7, 5, True), (3, 8, False)]],
        (OPS.combine, (torch.randn(40, 64).bfloat16(), torch.randint(-1, 40, (7, 6)).int(), torch.rand(7, 6), None)),
        (OPS.combine, (torch.randn(4, 10, 64).bfloat16(), torch.randint(-1, 40, (7, 6)).int(), torch.rand(7, 6),
                       torch.randn(7, 64).bfloat16())),
    ]


def _meta(x):
    return (tuple(x.shape), x.dtype, x.stride() if x.numel() else None)


@pytest.mark.parametrize("case", range(10))
def test_fake_matches_real(case):
    """Shapes, dtypes and strides of the fake impl (FakeTensorMode) equal those of the reference's outputs."""
    op, args = _fake_cases()[case]
    real = op(*args)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    as_tuple = lambda x: x if isinstance(x, tuple) else (x,)  # noqa: E731
    assert [_meta(x) for x in as_tuple(fake)] == [_meta(x) for x in as_tuple(real)]


@pytest.mark.parametrize("dynamic", [False, True])
def test_moe_layer_under_compile(dynamic):
    e = 16

    def layer(logits, hidden, bias):
        ids, w = OPS.route(logits, 4, "sigmoid", "noaux_tc", 4, 2, True, 2.0, bias)
        rows, scales, offsets, row_expert, token_row = OPS.dispatch_contiguous(hidden, ids, e, 8, True)
        y = (rows.float() * scales.repeat_interleave(128, 1)).bfloat16()  # a stand-in for the expert MLPs
        out = OPS.combine(y, token_row, w, hidden)
        rows_m, _, counts, token_row_m = OPS.dispatch_masked(hidden, ids, e, 4, False)
        return out, OPS.combine(rows_m, token_row_m, w, None), offsets, row_expert, counts

    compiled = torch.compile(layer, fullgraph=True, backend="eager", dynamic=dynamic)
    for t in (5, 9):
        args = (torch.randn(t, e), hidden_for(t, 256, seed=t), torch.randn(e) * 0.1)
        for got, want in zip(compiled(*args), layer(*args)):
            assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)


# ---- GPU: kernel vs reference ----------------------------------------------------------------------------------
def _ref(fn, *args, **kwargs):
    with dsv2_kernels.kernels("none"):
        return fn(*args, **kwargs)


def _cuda(*xs):
    return [x.cuda() if isinstance(x, torch.Tensor) else x for x in xs]


@pytest.mark.gpu
@requires_cuda_kernel("route")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("t", [1, 7, 300])
def test_kernel_route(name, t, dtype):
    cfg, e = CONFIGS[name], NUM_EXPERTS[name]
    bias = make_bias(e, t) if cfg["method"] == "noaux_tc" else None
    logits, bias = _cuda(make_logits(t, e, cfg, seed=t, dtype=dtype, bias=bias), bias)
    want_ids, want_w = _ref(moe.route, logits, correction_bias=bias, **cfg)
    ids, w = moe.route(logits, correction_bias=bias, **cfg)
    assert torch.equal(ids, want_ids), "ids (no near-ties by construction; exact ties by index)"
    assert_close(w, want_w, atol=1e-7, rtol=1e-5, what="weights (exp/sigmoid ulps)")
    ids2, w2 = moe.route(logits, correction_bias=bias, **cfg)
    assert torch.equal(ids, ids2) and torch.equal(w, w2), "reruns must be bit-identical"


@pytest.mark.gpu
@requires_cuda_kernel("route")
def test_kernel_route_ties_and_edges():
    logits = torch.randint(0, 3, (64, 32), generator=torch.Generator().manual_seed(3)).float().cuda()
    tie_logits, tie_cfg, tie_bias = _cuda(*noaux_tie_case())
    cases = [(logits, dict(top_k=5, method="group_limited_greedy", n_group=4, topk_group=2)),
             (logits, dict(top_k=7, scoring="sigmoid")), (logits, dict(top_k=16)),
             (tie_logits, tie_cfg | dict(correction_bias=tie_bias)),
             (torch.full((3, 256), 0.25, device="cuda"), dict(top_k=16, method="group_limited_greedy", n_group=8,
                                                               topk_group=1)),
             (torch.empty(0, 64, device="cuda", dtype=torch.bfloat16), dict(top_k=6))]
    for x, kw in cases:
        want_ids, want_w = _ref(moe.route, x, **kw)
        ids, w = moe.route(x, **kw)
        assert torch.equal(ids, want_ids), kw
        assert_close(w, want_w, atol=1e-7, rtol=1e-5, what=str(kw))


def _assert_dispatch_equal(got, want, quant_fp8, what):
    """Metadata exactly; rows (and fp8 scales) exactly where a copy landed; padding rows are unspecified."""
    *got_meta, got_token_row = got[2:]
    *want_meta, want_token_row = want[2:]
    for a, b in zip(got_meta + [got_token_row], want_meta + [want_token_row]):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{what}: metadata"
    used = want_token_row[want_token_row >= 0].long()
    rows_g, rows_w = got[0].reshape(-1, got[0].shape[-1]), want[0].reshape(-1, want[0].shape[-1])
    assert got[0].shape == want[0].shape and got[0].dtype == want[0].dtype
    assert torch.equal(rows_g[used].view(torch.uint8), rows_w[used].view(torch.uint8)), f"{what}: rows"
    assert got[1].shape == want[1].shape and got[1].stride() == want[1].stride(), f"{what}: scale layout"
    if quant_fp8:  # scale = amax / 448 and q = e4m3(x / scale) are IEEE fp32 operations: bit-exact
        sg, sw = got[1].reshape(-1, got[1].shape[-1]), want[1].reshape(-1, want[1].shape[-1])
        assert torch.equal(sg[used], sw[used]), f"{what}: scales"


# Above 4096 copies the single cooperative kernel: 5000 x 6 (H = 5120) gives each CTA more row tiles than pipeline
# stages (the ring refills), 1500 x 8 has skipped slots there. Above 32768 copies (8192 x 6) the count -> rank -> copy
# kernels (+ the FP8 scales kernel).
GPU_ROUTINGS = ROUTINGS + [("random", 2048, 6, 160), ("one_expert", 1000, 6, 64), ("not_routed", 333, 8, 256),
                           ("random", 8192, 6, 64), ("not_routed", 1500, 8, 256), ("random", 5000, 6, 160)]


@pytest.mark.gpu
@requires_cuda_kernel("dispatch_contiguous")
@pytest.mark.parametrize("quant_fp8", [False, True])
@pytest.mark.parametrize("alignment", [1, 3, 128])
@pytest.mark.parametrize("kind, t, k, e", GPU_ROUTINGS)
def test_kernel_dispatch_contiguous(kind, t, k, e, alignment, quant_fp8):
    h = 5120 if t >= 1000 else 2048
    hidden, ids = _cuda(hidden_for(t, h, seed=t), routing(kind, t, k, e, seed=t))
    want = _ref(moe.dispatch_contiguous, hidden, ids, e, alignment, quant_fp8)
    got = moe.dispatch_contiguous(hidden, ids, e, alignment, quant_fp8)
    _assert_dispatch_equal(got, want, quant_fp8, "dispatch_contiguous")
    _assert_dispatch_equal(moe.dispatch_contiguous(hidden, ids, e, alignment, quant_fp8), got, quant_fp8, "rerun")


@pytest.mark.gpu
@requires_cuda_kernel("dispatch_masked")
@pytest.mark.parametrize("quant_fp8", [False, True])
@pytest.mark.parametrize("max_m", [1, 7, 256])
@pytest.mark.parametrize("kind, t, k, e", GPU_ROUTINGS)
def test_kernel_dispatch_masked(kind, t, k, e, max_m, quant_fp8):
    hidden, ids = _cuda(hidden_for(t, 2048, seed=t), routing(kind, t, k, e, seed=t))
    want = _ref(moe.dispatch_masked, hidden, ids, e, max_m, quant_fp8)
    got = moe.dispatch_masked(hidden, ids, e, max_m, quant_fp8)
    _assert_dispatch_equal(got, want, quant_fp8, "dispatch_masked")
    _assert_dispatch_equal(moe.dispatch_masked(hidden, ids, e, max_m, quant_fp8), got, quant_fp8, "rerun")


@pytest.mark.gpu
@requires_cuda_kernel("combine")
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("t, k, n", [(1, 6, 2048), (7, 1, 8), (300, 6, 5120), (4096, 8, 7168), (0, 6, 2048)])
def test_kernel_combine(t, k, n, shared):
    g = torch.Generator(device="cuda").manual_seed(t + k)
    rows = t * k + 64
    expert_out = torch.randn(rows, n, device="cuda", generator=g).bfloat16()
    token_row = torch.randint(-1, rows, (t, k), device="cuda", generator=g).int()
    weights = torch.rand(t, k, device="cuda", generator=g)
    shared_out = torch.randn(t, n, device="cuda", generator=g).bfloat16() if shared else None
    unread = torch.ones(rows, dtype=torch.bool, device="cuda")
    unread[token_row[token_row >= 0].long()] = False
    expert_out[unread] = float("nan")
    want = _ref(moe.combine, expert_out, token_row, weights, shared_out)
    got = moe.combine(expert_out, token_row, weights, shared_out)
    # same fp32 sum in the same order; an FMA may round differently from a multiply then add: one bf16 step at most
    assert_close(got, want, atol=1e-5, rtol=2**-7, what="combine")
    assert torch.equal(moe.combine(expert_out, token_row, weights, shared_out), got), "reruns must be bit-identical"


@pytest.mark.gpu
@requires_cuda_kernel("combine")
def test_kernel_combine_masked_layout():
    expert_out = torch.randn(8, 16, 512, device="cuda").bfloat16()
    token_row = torch.randint(-1, 128, (20, 6), device="cuda").int()
    w = torch.rand(20, 6, device="cuda")
    assert_close(moe.combine(expert_out, token_row, w), _ref(moe.combine, expert_out, token_row, w),
                 atol=1e-5, rtol=2**-7, what="combine [E, max_m, N]")


@pytest.mark.gpu
@requires_cuda_kernel("dispatch_masked")
@requires_cuda_kernel("combine")
@requires_cuda_kernel("route")
def test_kernel_decode_layer_cuda_graph():
    """route -> masked dispatch (fp8) -> stand-in expert -> combine captured once, replayed with new inputs."""
    cfg, e, t, h = CONFIGS["v2"], 160, 16, 5120
    logits, hidden = _cuda(make_logits(t, e, cfg, seed=11), hidden_for(t, h, seed=11))

    def layer():
        ids, w = moe.route(logits, **cfg)
        rows, scales, counts, token_row = moe.dispatch_masked(hidden, ids, e, 8, True)
        y = dsv2_kernels.fp8.dequant_per_token_group(rows, scales, torch.bfloat16)
        return moe.combine(y, token_row, w, hidden), counts

    layer()  # warm up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, counts = layer()
    logits.copy_(make_logits(t, e, cfg, seed=12).cuda())
    hidden.copy_(hidden_for(t, h, seed=12).cuda())
    graph.replay()
    with dsv2_kernels.kernels("none"):
        want_out, want_counts = layer()
    assert torch.equal(counts, want_counts)
    assert_close(out, want_out, atol=1e-5, rtol=2**-7, what="graph replay")


@pytest.mark.gpu
@requires_cuda_kernel("dispatch_contiguous")
@requires_cuda_kernel("dispatch_masked")
@pytest.mark.parametrize("t", [2048, 8192])
def test_kernel_dispatch_large_cuda_graph(t):
    """Above 4096 copies the dispatch is one cooperative kernel (a grid barrier, TMA loads and stores), above 32768
    (t = 8192) four kernels (count, rank, copy, FP8 scales; ordinary edges under capture): captured in a graph and
    replayed, they give the same bits as run eagerly."""
    k, e, h = 6, 160, 2048
    hidden, ids = _cuda(hidden_for(t, h, seed=21), routing("random", t, k, e, seed=21))
    calls = [lambda: moe.dispatch_contiguous(hidden, ids, e, 128, True),
             lambda: moe.dispatch_masked(hidden, ids, e, 64, True)]
    checks_were_on = dsv2_kernels._library._value_checks
    dsv2_kernels.set_value_checks(False)
    try:
        for call in calls:
            want = call()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                got = call()
            graph.replay()
            _assert_dispatch_equal(got, want, True, "graph replay")
    finally:
        dsv2_kernels.set_value_checks(checks_were_on)


@pytest.mark.gpu
@requires_cuda_kernel("dispatch_contiguous")
@requires_cuda_kernel("dispatch_masked")
@pytest.mark.parametrize("quant_fp8", [False, True])
def test_kernel_dispatch_three_kernel_fallback(quant_fp8):
    """More copies per CTA than the cooperative kernel keeps in shared memory (8192 on a 132-SM GPU): the count ->
    rank -> copy kernels."""
    t, k, e = 18000, 64, 6
    hidden, ids = _cuda(hidden_for(t, 128, seed=5), routing("few_experts", t, k, e, seed=5))
    want = _ref(moe.dispatch_contiguous, hidden, ids, e, 128, quant_fp8)
    _assert_dispatch_equal(moe.dispatch_contiguous(hidden, ids, e, 128, quant_fp8), want, quant_fp8, "contiguous")
    del want
    want = _ref(moe.dispatch_masked, hidden, ids, e, 400_000, quant_fp8)
    _assert_dispatch_equal(moe.dispatch_masked(hidden, ids, e, 400_000, quant_fp8), want, quant_fp8, "masked")


@pytest.mark.gpu
def test_reference_decode_layer_cuda_graph():
    """The references have no host sync (the runner captures its decode step on the reference path too): route ->
    masked dispatch (fp8, with drops beyond max_m) -> stand-in expert -> combine, forced to the references, run eagerly
    with sync debugging set to raise, captured once, replayed with new inputs, equal to an eager rerun."""
    cfg, e, t, h, max_m = CONFIGS["v2"], 160, 16, 5120, 2
    logits, hidden = _cuda(make_logits(t, e, cfg, seed=11), hidden_for(t, h, seed=11))
    logits[:8] = logits[:1]  # 8 tokens with one routing: their experts get 8 copies > max_m, so some are dropped

    def layer():
        ids, w = moe.route(logits, **cfg)
        rows, scales, counts, token_row = moe.dispatch_masked(hidden, ids, e, max_m, True)
        y = dsv2_kernels.fp8.dequant_per_token_group(rows, scales, torch.bfloat16)
        return moe.combine(y, token_row, w, hidden), counts, token_row, ids

    checks_were_on = dsv2_kernels._library._value_checks
    dsv2_kernels.set_value_checks(False)
    try:
        with dsv2_kernels.kernels("none"):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                layer()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                layer()  # warm up on the capture stream
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                got = layer()
            logits.copy_(make_logits(t, e, cfg, seed=12).cuda())
            logits[3:9] = logits[3]
            hidden.copy_(hidden_for(t, h, seed=12).cuda())
            graph.replay()
            want = layer()
    finally:
        dsv2_kernels.set_value_checks(checks_were_on)
    assert int(want[1].max()) > max_m and (want[2] < 0).any(), "the replay should drop copies beyond max_m"
    for a, b, what in zip(got, want, ("out", "counts", "token_row", "ids")):
        assert torch.equal(a, b), f"graph replay vs eager: {what}"


@pytest.mark.gpu
@requires_cuda_kernel("dispatch_contiguous")
def test_kernel_bad_inputs_direct_op():
    """The torch ops called directly (no Python wrapper) must still reject bad metadata in C++."""
    hidden = torch.randn(4, 256, device="cuda").bfloat16()
    ids = torch.zeros(4, 2, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="dispatch_contiguous.*'hidden'"):
        OPS.dispatch_contiguous(hidden.float(), ids, 8, 128, False)
    with pytest.raises(ValueError, match="dispatch_contiguous.*'topk_ids'"):
        OPS.dispatch_contiguous(hidden, ids.long(), 8, 128, False)
    with pytest.raises(ValueError, match="dispatch_masked.*'max_m'"):
        OPS.dispatch_masked(hidden, ids, 8, 0, False)
    with pytest.raises(ValueError, match="combine.*'topk_weights'"):
        OPS.combine(hidden, ids, torch.ones(4, 3, device="cuda"), None)
    with pytest.raises(ValueError, match="route.*'top_k'"):
        OPS.route(torch.randn(4, 64, device="cuda"), 17, "softmax", "greedy", 1, 1, False, 1.0, None)
