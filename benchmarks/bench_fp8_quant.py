"""FP8 activation quantizers: quant_per_token_group and silu_mul_quant (bf16 in, e4m3 + fp32 1x128 scales out) vs the
PyTorch reference eager and under torch.compile.

    python -m benchmarks.bench_fp8_quant [--quick] [--row-major] [--json out.json] [--md out.md]

Bytes counted: the input read once, q (1 byte per element) and the fp32 scales written once; a plain copy of as many
bytes is timed beside each case (what the per-call timing reaches at that size). Scales are column-major
(the layout the FP8 GEMMs read) unless --row-major; one extra row-major case is always timed at M=8192 to show the
cost of its strided scale writes.

Prediction (H200, copy ceiling 4.2 TB/s): both kernels are pure streams with ~15 (quant) / ~35 (silu_mul_quant) SASS
instructions per output element, under the ~30 / ~50 the issue rate allows at 80% of the ceiling (silu_mul_quant
uses the hardware exp2 / reciprocal, ~16 per element), so they should run at the read-heavy
stream rate, 3.4-3.7 TB/s (80-88%), from M=4096 on: quant K=7168 M=8192 (178 MB) in
~50 us, silu_mul_quant N=1408 M=8192 (58 MB) in ~17 us. At M=128 (1 MB or less) the launch and one DRAM round trip
dominate: ~3-5 us, 5-20% of the ceiling. torch eager makes ~8 passes over fp32 copies of the data (float, abs,
amax, div, clamp, cast, copy): ~10x slower. torch.compile fuses it into one or two kernels that read the input
twice (amax, then quantize) and compute the scale/division in fp32: ~1.5-2.5x slower than ours.
"""

import torch

from benchmarks.harness import Result, cli, copy_peer, time_cuda
from dsv2_kernels import fp8

GROUP = 128


def _compiled(fn):
    torch._dynamo.reset()  # a fresh cache per case: shapes never hit the recompile limit (and fall back to eager)
    return torch.compile(fn)


def quant_cases(args):
    ms = [128, 8192] if args.quick else [128, 4096, 8192, 32768]
    ks = [7168] if args.quick else [2048, 7168]
    cases = [(m, k, not args.row_major) for m in ms for k in ks]
    if not args.row_major:
        cases.append((8192, 7168, False))
    results = []
    for m, k, col in cases:
        def make():
            return torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        layout = "col-major" if col else "row-major"
        case = f"quant M={m} K={k} {layout}"
        nbytes = m * k * 2 + m * k + m * (k // GROUP) * 4
        compiled = _compiled(fp8.quant_per_token_group_ref)
        impls = {
            "dsv2_kernels": lambda x: fp8.quant_per_token_group(x, GROUP, col),
            "torch eager (reference)": lambda x: fp8.quant_per_token_group_ref(x, GROUP, col),
            "torch.compile (reference)": lambda x: compiled(x, GROUP, col),
        }
        for name, fn in impls.items():
            results.append(Result(case, name, time_cuda(fn, make), bytes=nbytes))
        results.append(copy_peer(case, nbytes))
    return results


def silu_cases(args):
    ms = [128, 8192] if args.quick else [128, 4096, 8192, 32768]
    ns = [(1408, "V2-Lite")] if args.quick else [(1408, "V2-Lite"), (1536, "V2")]
    col = not args.row_major
    results = []
    for m in ms:
        for n, model in ns:
            def make():
                return torch.randn(m, 2 * n, device="cuda", dtype=torch.bfloat16)
            case = f"silu_mul_quant M={m} 2N=2*{n} ({model})"
            nbytes = m * 2 * n * 2 + m * n + m * (n // GROUP) * 4
            compiled = _compiled(fp8.silu_mul_quant_ref)
            impls = {
                "dsv2_kernels": lambda x: fp8.silu_mul_quant(x, GROUP, col),
                "torch eager (reference)": lambda x: fp8.silu_mul_quant_ref(x, GROUP, col),
                "torch.compile (reference)": lambda x: compiled(x, GROUP, col),
            }
            for name, fn in impls.items():
                results.append(Result(case, name, time_cuda(fn, make), bytes=nbytes))
            results.append(copy_peer(case, nbytes))
    return results


def run(args):
    return quant_cases(args) + silu_cases(args)


def add_args(parser):
    parser.add_argument("--row-major", action="store_true", help="row-major scales instead of column-major")


if __name__ == "__main__":
    cli("FP8 per-token-group quantization (bf16 -> e4m3, 1x128 groups)", "fp8_quant", run, add_args)
