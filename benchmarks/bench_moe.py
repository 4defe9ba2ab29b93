"""DeepSeekMoE routing, token dispatch and combine (dsv2_kernels.moe) vs the PyTorch references (eager), same run.

    python -m benchmarks.bench_moe [--quick] [--ops route,contiguous,masked,combine] [--tokens 256,4096]
                                   [--json out.json] [--md out.md]

Configs: DeepSeek-V2-Lite (H=2048, 64 experts, top-6, softmax greedy) and DeepSeek-V2 (H=5120, 160 experts, top-6,
group_limited_greedy n_group=8 topk_group=3, routed_scaling_factor=16); T in {1, 128, 4096, 16384, 32768}. The
routing is the route kernel's on random fp32 logits (roughly balanced, as a trained gate with its aux loss).

Bytes counted, actually read + written (padding rows the kernels never touch are not counted):
  * route: logits [T, E] fp32 read, ids + weights [T, k] written.
  * dispatch (contiguous, bf16 or fp8 with 1x128 scales; masked fp8): hidden [T, H] bf16 read once, topk_ids read,
    each placed copy's row written (2 or 1 bytes per value, + 4 bytes per 128 values with fp8), token_row written,
    and for the contiguous layout row_expert [R] written. Masked: max_m = min(T, max(16, round_up(2 T k / E, 16))).
  * combine: the k expert rows of every token read (bf16, [R, H] contiguous layout), shared_out read, token_row and
    weights read, out [T, H] bf16 written.

Prediction (H200, 4.2 TB/s copy ceiling):
  * route: latency-bound up to T = 128 (one wave of warps; ~3-5 us including the launch), ~10-20 us at T = 16384
    (compute: softmax, group scan, 6 warp-argmax rounds per token). The reference is a dozen kernels with two
    segmented sorts: ~100-300 us at T = 16384, so >= 5x there.
  * dispatch: writes are 3/4 (fp8) to 6/7 (bf16) of the traffic. Up to 32768 copies one cooperative kernel (row
    loads in flight while the copies are ranked, one grid barrier, TMA bulk stores); beyond, count -> rank -> copy
    kernels chained by programmatic launch (FP8: + a scales kernel that writes the column-major scales in whole
    sectors). Predicted 85-93 % (bf16) and 75-88 % (fp8) at T = 4096; measured 72-81 % and 48-62 % (RESULTS.md
    explains the miss), fp8 68-77 % at T = 16384; decode (T <= 128) ~5-8 us, a single kernel. The reference
    (sort, index_put of whole rows, quantization of all R rows incl. padding) is >= 10x slower from T = 256 on.
  * combine: a gather of whole 4-10 KB rows with k loads in flight per thread: ~3.5-3.8 TB/s (85-90%) from
    T = 4096 on; the reference does k gathers + fp32 temporaries, >= 5x slower.
"""

from __future__ import annotations

import torch

import dsv2_kernels
from benchmarks.harness import Result, cli, time_cuda
from dsv2_kernels import moe

CONFIGS = {
    "V2-Lite": dict(hidden=2048, experts=64, route=dict(top_k=6, scoring="softmax", method="greedy")),
    "V2": dict(hidden=5120, experts=160, route=dict(top_k=6, scoring="softmax", method="group_limited_greedy",
                                                    n_group=8, topk_group=3, routed_scaling_factor=16.0)),
}
TOKENS = [1, 128, 4096, 16384, 32768]
ALIGNMENT = 128
OPS = ("route", "contiguous", "masked", "combine")


def _iters(t: int) -> int:
    return 100 if t <= 4096 else 30


def _max_m(t: int, k: int, e: int) -> int:
    """Twice the mean copies per expert, rounded up to 16 (a decode runner's static bound), at most T."""
    return min(t, max(16, (2 * t * k // e + 15) // 16 * 16))


def _route_args(cfg):
    r = cfg["route"]
    return (r["top_k"], r["scoring"], r["method"], r.get("n_group", 1), r.get("topk_group", 1), False,
            r.get("routed_scaling_factor", 1.0), None)


def bench_config(name: str, cfg: dict, tokens: list[int], ops: set[str]) -> list[Result]:
    h, e, k = cfg["hidden"], cfg["experts"], cfg["route"]["top_k"]
    rargs = _route_args(cfg)
    results = []
    for t in tokens:
        case = f"{name} T={t}"
        iters = _iters(t)
        logits = torch.randn(t, e, device="cuda") * 2
        ids, w = moe.route(logits, *rargs)
        placed = int((ids >= 0).sum())
        r = moe.contiguous_rows_bound(t, k, e, ALIGNMENT)

        def make_hidden():
            return torch.randn(t, h, device="cuda").bfloat16()

        if "route" in ops:
            nbytes = t * e * 4 + t * k * 8
            make = lambda: torch.randn(t, e, device="cuda") * 2  # noqa: E731
            results.append(Result(case, "dsv2_kernels route", time_cuda(lambda x: moe.route(x, *rargs), make,
                                                                         iters=iters), bytes=nbytes))
            results.append(Result(case, "torch eager (route_ref)", time_cuda(lambda x: moe.route_ref(x, *rargs), make,
                                                                              iters=iters), bytes=nbytes))
        if "contiguous" in ops:
            for quant in (False, True):
                row_bytes = h * (1 + 4 / 128) if quant else h * 2
                nbytes = t * h * 2 + t * k * 4 + placed * row_bytes + t * k * 4 + r * 4
                label = "fp8" if quant else "bf16"
                results.append(Result(
                    case, f"dsv2_kernels dispatch_contiguous {label}",
                    time_cuda(lambda x: moe.dispatch_contiguous(x, ids, e, ALIGNMENT, quant), make_hidden,
                              iters=iters), bytes=nbytes))
                results.append(Result(
                    case, f"torch eager (dispatch_contiguous_ref {label})",
                    time_cuda(lambda x: moe.dispatch_contiguous_ref(x, ids, e, ALIGNMENT, quant), make_hidden,
                              iters=min(iters, 30)), bytes=nbytes))
        if "masked" in ops:
            max_m = _max_m(t, k, e)
            _, _, counts, token_row = moe.dispatch_masked(make_hidden(), ids, e, max_m, True)
            kept = int((token_row >= 0).sum())
            nbytes = t * h * 2 + t * k * 4 + kept * h * (1 + 4 / 128) + t * k * 4 + e * 4
            note = f"max_m={max_m}" + (f", {placed - kept} copies dropped" if kept < placed else "")
            results.append(Result(case, "dsv2_kernels dispatch_masked fp8",
                                  time_cuda(lambda x: moe.dispatch_masked(x, ids, e, max_m, True), make_hidden,
                                            iters=iters), bytes=nbytes, note=note))
            results.append(Result(case, "torch eager (dispatch_masked_ref fp8)",
                                  time_cuda(lambda x: moe.dispatch_masked_ref(x, ids, e, max_m, True), make_hidden,
                                            iters=min(iters, 30)), bytes=nbytes, note=note))
        if "combine" in ops:
            _, _, _, _, token_row = moe.dispatch_contiguous(make_hidden(), ids, e, ALIGNMENT, False)
            nbytes = placed * h * 2 + t * h * 2 + t * k * 8 + t * h * 2

            def make_combine():
                return torch.randn(r, h, device="cuda").bfloat16(), make_hidden()

            results.append(Result(case, "dsv2_kernels combine",
                                  time_cuda(lambda x: moe.combine(x[0], token_row, w, x[1]), make_combine,
                                            iters=iters), bytes=nbytes))
            results.append(Result(case, "torch eager (combine_ref)",
                                  time_cuda(lambda x: moe.combine_ref(x[0], token_row, w, x[1]), make_combine,
                                            iters=min(iters, 30)), bytes=nbytes))
        torch.cuda.empty_cache()
    return results


def run(args):
    ops = set(args.ops.split(",")) if args.ops else set(OPS)
    unknown = ops - set(OPS)
    if unknown:
        raise SystemExit(f"unknown --ops {sorted(unknown)}; choose from {OPS}")
    for name in ("route", "dispatch_contiguous", "dispatch_masked", "combine"):
        if not dsv2_kernels.has_cuda_kernel(name):
            print(f"warning: no CUDA kernel for {name} in this build: 'dsv2_kernels' rows time the reference")
    if args.tokens:
        tokens = [int(x) for x in args.tokens.split(",")]
    else:
        tokens = [1, 128, 4096, 16384] if args.quick else TOKENS
    results = []
    for name, cfg in CONFIGS.items():
        results += bench_config(name, cfg, tokens, ops)
    return results


def add_args(parser):
    parser.add_argument("--ops", help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--tokens", help="comma-separated T values (default: 1,128,4096,16384,32768)")


if __name__ == "__main__":
    cli("DeepSeekMoE route / dispatch / combine", "moe", run, add_args)
