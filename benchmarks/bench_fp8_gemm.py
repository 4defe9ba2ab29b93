"""Block-scaled FP8 GEMMs (e4m3, 1x128 activation / 128x128 weight scales, bf16 out): fp8_gemm,
fp8_grouped_gemm_contiguous and fp8_grouped_gemm_masked beside torch in the same run.

    python -m benchmarks.bench_fp8_gemm [--quick] [--only dense,contiguous,masked] [--json out.json] [--md out.md]

Peers: dense beside torch's block-wise scaled_mm (cuBLAS, (1x128, 128x128) recipe, through
torch.nn.functional.scaled_mm or torch._scaled_mm, whichever this torch accepts); grouped beside
torch._scaled_grouped_mm, which on Hopper only has row-wise scales (a different, cheaper recipe: one scale per row and
per output column, no promotion per K block), timed on the same padded layout. A peer this torch cannot run is
reported as a row with a note instead of a crash.

Counting: FLOPs = 2 M N K over valid rows only (padding rows of the contiguous layout and rows beyond the counts of
the masked layout are not counted). % is of the 1203 TFLOP/s block-wise ceiling (harness CEILINGS["fp8_block"]),
except for the masked rows, where % is of the 4.2 TB/s copy ceiling: decode is a weight stream, and bytes = expert
weights + weight scales + A rows read + output rows written.

Routings (contiguous): T tokens x top-6 assignments spread over E experts, each expert padded to a multiple of 128 rows
with -1 (the dispatch layout); "balanced" = every expert within +-30% of the mean, "skewed" = log-normal counts
(sigma 1: a few experts get 3-5x the mean, some almost none).

Prediction (H200). The kernels are CUTLASS's warp-specialized cooperative blockwise mainloop, 128x128x128 tiles, one
promotion (FFMA of the 64 accumulator registers of a warpgroup) per K block, during which that warpgroup's WGMMAs
are drained (wait<0>): ~80% of the FP8 tensor rate is the practical top for this design.
  * dense 4096x7168x16384: ~950-1050 TFLOP/s (80-87% of ceiling), about torch's cuBLAS (1135 in the issue), below the
    1250 bar. M=128/64: stream-K splits the K loop of the 56 output tiles over the 132 SMs, ~550-700 (the tile still
    computes 128 rows, so at M=64 half of the MMA work is padding): about torch (655 at M=128).
    4096x2816x2048: 704 tiles (5.3 waves) of 16 K blocks each, prologue/epilogue weigh more: ~750-900.
  * grouped contiguous, 4096 tokens: V2-Lite gate_up (64 x ~384 rows) ~800-900, down (K=1408, 11 K blocks) ~700-800;
    V2 (160 x ~154 valid rows) computes two 128-row tiles per expert for ~154 valid rows, capping the valid-row rate at
    ~60% of the tile rate: ~500-550 (gate_up) and ~450-550 (down). 16384 tokens: +5-10% (more tiles per group).
    Skewed routing: similar or slightly better (fewer, fuller tiles). torch row-wise: 673 / 258 / 568 / 200 (issue).
    Since the fifth session the default grouped-contiguous kernel is our own (csrc/fp8/fp8_grouped_gemm_contiguous_sm90.cu:
    scales copied into each stage, compile-time weight-scale split, 64-row tail tiles, store warps doing the
    epilogue); predicted 820-920 / 720-860 / 560-680 / 540-660, measured 900-917 / 812-828 / 591-632 / 654-712 at
    4096 tokens against CUTLASS's 825-833 / 695-735 / 562-570 / 573-610 (DSV2_FP8_GEMM_IMPL=cutlass runs it).
    Sixth session: the V2 shapes at 4096 tokens were DRAM-bound (weights read twice: a tail tile ran ahead of the
    full tile sharing its B tile); tail pairs (an expert's <= 64-row tail over two n-blocks, scheduled with the full
    tiles, DSV2_FP8_GEMM_TWON) predicted 700-800 / 720-800, measured 733-745 / 692-741.
    Seventh session: split-N software-pipelined K loop (one column half's promotion under the other's wgmmas)
    predicted V2-Lite 990-1060 / 880-970, measured 920-923 / 820-845 (ptxas overlapped only one wgmma per promotion
    and each warpgroup's queue drained twice per K block); tile counter kept in registers: V2-Lite unchanged
    (909-913 / 826-847), V2 834-835 / 747-748 (gate_up balanced / skewed), 729-747 (down).
  * masked, 1-64 rows per expert: a weight stream with ~16-40 K blocks per tile; per-tile overhead (group switch:
    TMA descriptor update, epilogue) ~1-2 us against ~10 us of streaming at 25 GB/s per SM: ~2.6-3.1 TB/s of weights
    (62-74% of the copy ceiling), below the 3.3 TB/s bar; flat from 1 to 64 rows (the tile is 128 rows either way).
"""

import torch

from benchmarks.harness import Result, cli, time_cuda
from dsv2_kernels import fp8

FP8 = torch.float8_e4m3fn
TOPK = 6


def rand_fp8(*shape):
    """Random e4m3 without NaN/inf: clearing bit 6 keeps the exponent below 8 (|x| < 2)."""
    bits = torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda").bitwise_and_(0xBF)
    return bits.view(FP8)


def rand_scales(*shape):
    return torch.rand(*shape, device="cuda") * 1e-2 + 1e-3


def col_major_scales(m, kb, lead=()):
    """[*lead, m, kb] fp32 in the quantizers' column-major layout (strides (1, M_pad) per matrix)."""
    m_pad = (m + 3) // 4 * 4
    s = rand_scales(*lead, kb, m_pad).transpose(-1, -2)
    return s[..., :m, :]


def weight(e, n, k):
    b = rand_fp8(e, n, k) if e else rand_fp8(n, k)
    sb = rand_scales(*((e,) if e else ()), n // 128, k // 128)
    return b, sb


# ---- dense -----------------------------------------------------------------------------------------------------
def torch_blockwise_mm():
    """A callable (a, sa, b, sb) -> bf16 running torch's block-wise scaled mm, or (None, why)."""
    F = torch.nn.functional
    errors = []
    if hasattr(F, "scaled_mm") and hasattr(F, "ScalingType"):
        ST, SW = F.ScalingType, F.SwizzleType

        def v2(a, sa, b, sb):
            # cuBLAS wants a_scales M-major (our column-major) and b_scales as [K/128 (padded to 4), N/128] stored
            # N-block major: the transpose of our [N/128, K/128] when K/128 is a multiple of 4.
            return F.scaled_mm(a, b.t(), sa, ST.BlockWise1x128, sb.t(), ST.BlockWise128x128, SW.NO_SWIZZLE,
                               SW.NO_SWIZZLE, output_dtype=torch.bfloat16)

        errors.append(("torch F.scaled_mm block-wise", v2))

    def v1(a, sa, b, sb):
        return torch._scaled_mm(a, b.t(), sa, sb.t(), out_dtype=torch.bfloat16)

    errors.append(("torch._scaled_mm block-wise", v1))
    a, sa = rand_fp8(256, 512), col_major_scales(256, 4)
    b, sb = weight(0, 256, 512)
    notes = []
    for name, fn in errors:
        try:
            fn(a, sa, b, sb)
            torch.cuda.synchronize()
            return name, fn, None
        except Exception as e:  # noqa: BLE001 (report whatever this torch raises)
            notes.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    return None, None, "; ".join(notes)


def dense_cases(args):
    # The quick list holds the three M of the dense bar (64, 128, 4096).
    shapes = [(4096, 7168, 16384), (128, 7168, 16384), (64, 7168, 16384)] if args.quick else [
        (4096, 7168, 16384), (128, 7168, 16384), (64, 7168, 16384), (4096, 2816, 2048), (4096, 2048, 1408)]
    peer_name, peer, peer_err = torch_blockwise_mm()
    results = []
    for m, n, k in shapes:
        b, sb = weight(0, n, k)

        def make():
            return rand_fp8(m, k), col_major_scales(m, k // 128)
        case, flops = f"dense M={m} N={n} K={k}", 2.0 * m * n * k
        results.append(Result(case, "dsv2_kernels fp8_gemm", time_cuda(lambda i: fp8.fp8_gemm(i[0], i[1], b, sb), make),
                              flops=flops, ceiling="fp8_block"))
        if peer is None:
            results.append(Result(case, "torch block-wise", [float("nan")], flops=flops, ceiling="fp8_block",
                                  note=f"unavailable: {peer_err}"))
            continue
        try:
            times = time_cuda(lambda i: peer(i[0], i[1], b, sb), make)
            results.append(Result(case, peer_name, times, flops=flops, ceiling="fp8_block"))
        except Exception as e:  # noqa: BLE001
            results.append(Result(case, peer_name, [float("nan")], flops=flops, ceiling="fp8_block",
                                  note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"))
    return results


# ---- grouped contiguous ----------------------------------------------------------------------------------------
def routing_counts(tokens, experts, skewed, seed):
    """Assignments per expert summing to tokens * TOPK."""
    g = torch.Generator().manual_seed(seed)
    total = tokens * TOPK
    if skewed:
        w = torch.exp(torch.randn(experts, generator=g))
    else:
        w = 0.7 + 0.6 * torch.rand(experts, generator=g)
    counts = torch.floor(w / w.sum() * total).long()
    counts[torch.argmax(w)] += total - int(counts.sum())
    return counts


def contiguous_layout(counts):
    """row_expert for segments padded to 128 rows (-1 padding), and the padded segment ends (torch's offs)."""
    padded = (counts + 127) // 128 * 128
    row_expert = torch.full((int(padded.sum()),), -1, dtype=torch.int32)
    start = 0
    for e, (c, p) in enumerate(zip(counts.tolist(), padded.tolist())):
        row_expert[start:start + c] = e
        start += p
    return row_expert.cuda(), padded.cumsum(0).to(torch.int32).cuda()


def torch_grouped_rowwise(a, b, ends):
    """torch._scaled_grouped_mm with row-wise scales (its only FP8 recipe on Hopper)."""
    scale_a = torch.ones(a.size(0), device="cuda")
    scale_b = torch.ones(b.size(0), b.size(1), device="cuda")
    return torch._scaled_grouped_mm(a, b.transpose(-2, -1), scale_a, scale_b, offs=ends, out_dtype=torch.bfloat16)


CONTIGUOUS_SHAPES = [  # (model, E, name, N, K)
    ("V2-Lite", 64, "gate_up", 2816, 2048), ("V2-Lite", 64, "down", 2048, 1408),
    ("V2", 160, "gate_up", 3072, 5120), ("V2", 160, "down", 5120, 1536)]


def contiguous_cases(args):
    token_counts = [4096] if args.quick else [4096, 16384]
    routings = [False] if args.quick else [False, True]
    results = []
    for model, e, name, n, k in CONTIGUOUS_SHAPES:
        b, sb = weight(e, n, k)
        for tokens in token_counts:
            for skewed in routings:
                counts = routing_counts(tokens, e, skewed, seed=tokens + e + n)
                row_expert, ends = contiguous_layout(counts)
                rows = row_expert.numel()

                def make():
                    return rand_fp8(rows, k), col_major_scales(rows, k // 128)
                valid = int(counts.sum())
                case = (f"{model} {name} N={n} K={k} T={tokens}x{TOPK} {'skewed' if skewed else 'balanced'} "
                        f"({rows} rows, {valid} valid)")
                flops = 2.0 * valid * n * k
                fn = lambda i: fp8.fp8_grouped_gemm_contiguous(i[0], i[1], b, sb, row_expert)  # noqa: E731
                results.append(Result(case, "dsv2_kernels", time_cuda(fn, make), flops=flops, ceiling="fp8_block"))
                try:
                    times = time_cuda(lambda i: torch_grouped_rowwise(i[0], b, ends), make)
                    results.append(Result(case, "torch._scaled_grouped_mm row-wise", times, flops=flops,
                                          ceiling="fp8_block", note="row-wise recipe, padded rows computed"))
                except Exception as ex:  # noqa: BLE001
                    results.append(Result(case, "torch._scaled_grouped_mm row-wise", [float("nan")], flops=flops,
                                          ceiling="fp8_block",
                                          note=f"unavailable: {type(ex).__name__}: {str(ex).splitlines()[0][:120]}"))
    return results


# ---- grouped masked ----------------------------------------------------------------------------------------------
MASKED_SHAPES = [("V2-Lite", 64, "gate_up", 2816, 2048), ("V2-Lite", 64, "down", 2048, 1408),
                 ("V2", 160, "gate_up", 3072, 5120)]


def masked_cases(args):
    per_expert = [4, 32] if args.quick else [1, 4, 16, 32, 64]
    shapes = MASKED_SHAPES[:1] if args.quick else MASKED_SHAPES
    max_m = 128
    results = []
    for model, e, name, n, k in shapes:
        b, sb = weight(e, n, k)
        for m in per_expert:
            counts = torch.full((e,), m, dtype=torch.int32, device="cuda")

            def make():
                return rand_fp8(e, max_m, k), col_major_scales(max_m, k // 128, (e,))
            case = f"{model} {name} N={n} K={k} E={e} {m} rows/expert (max_m={max_m})"
            flops = 2.0 * e * m * n * k
            nbytes = e * n * k + sb.numel() * 4 + e * m * (k + k // 128 * 4) + e * m * n * 2
            fn = lambda i: fp8.fp8_grouped_gemm_masked(i[0], i[1], b, sb, counts)  # noqa: E731
            results.append(Result(case, "dsv2_kernels", time_cuda(fn, make), flops=flops, bytes=nbytes,
                                  ceiling="copy"))
            try:
                scale_a = torch.ones(e, max_m, device="cuda")
                scale_b = torch.ones(e, n, device="cuda")

                def peer(i):
                    return torch._scaled_grouped_mm(i[0], b.transpose(-2, -1), scale_a, scale_b,
                                                    out_dtype=torch.bfloat16)
                results.append(Result(case, "torch._scaled_grouped_mm row-wise", time_cuda(peer, make), flops=flops,
                                      bytes=nbytes, ceiling="copy", note="row-wise, all max_m rows computed"))
            except Exception as ex:  # noqa: BLE001
                results.append(Result(case, "torch._scaled_grouped_mm row-wise", [float("nan")], flops=flops,
                                      bytes=nbytes, ceiling="copy",
                                      note=f"unavailable: {type(ex).__name__}: {str(ex).splitlines()[0][:120]}"))
    return results


def run(args):
    parts = {"dense": dense_cases, "contiguous": contiguous_cases, "masked": masked_cases}
    chosen = [p.strip() for p in args.only.split(",")] if args.only else list(parts)
    results = []
    for p in chosen:
        results += parts[p](args)
        torch.cuda.empty_cache()  # the V2 expert weights (2.5 GB per shape) should not pile up
    return results


def add_args(parser):
    parser.add_argument("--only", help="comma-separated subset of: dense, contiguous, masked")


if __name__ == "__main__":
    cli("FP8 block-scaled GEMMs (e4m3, 1x128 / 128x128 scales, bf16 out)", "fp8_gemm", run, add_args)
