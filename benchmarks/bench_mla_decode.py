"""MLA decode attention (``mla.decode_attention``) vs a torch version over the gathered cache.

    python -m benchmarks.bench_mla_decode [--quick] [--block-size 64] [--json out.json] [--md out.md]

Sweep: B=128, s_k in {1024, 4096, 8192, 16384}, fixed lengths and variable ones (uniform in [s_k/4, 7 s_k/4], mean
s_k), H in {16, 32, 64, 128}, s_q in {1, 2} (causal), bf16 and FP8 (e4m3 + per-token scales) cache, page 64 by
default. Bytes = the cache rows of every sequence read once (FP8: plus 8 bytes of scales per token) + q + out;
FLOPs = 2 * s_q * H * sum(L_b) * (576 + 512). The torch version gathers each sequence's pages into a dense
[B, max L, 576] tensor (FP8: dequantized to bf16), then runs two bf16 bmm with an fp32 masked softmax between them.

Kernels (see the file headers): H * s_q <= 32 runs the narrow kernel (csrc/mla/decode_attention_narrow.cu:
transposed MMAs, S^T = K Q^T and O^T = V^T P^T with N = 16 or 32, so no padded query rows), the rest the 64-row
kernel (csrc/mla/decode_attention.cu: warpgroup 0 Q K^T + softmax, both warpgroups P V, warpgroup 1 loading the next
tile; FP8 through a producer warpgroup converting e4m3 into f16 stages, with f16 MMAs). Metadata -> main -> combine are chained by programmatic launch.
`DSV2_DECODE_NARROW=0` forces the 64-row kernel for A/B runs. FP8 at H * s_q <= 32 runs the narrow file's pipelined
kernel (a cp.async-only producer filling a raw e4m3 ring; scores and values warpgroups convert into f16 wgmma register
fragments); `DSV2_DECODE_FP8_PIPE=0` runs the one-stage path.

Predictions and results (H200, B=128, page 64; benchmarks/RESULTS.md has the tables and the misses):
* Memory-bound bf16 (H * s_q <= 32): predicted 3.3-3.6 TB/s at s_k >= 4096 once the MMAs stop padding to 64 rows;
  measured 3.76 (H=16), 3.54 (H=32), up to 4.26 at 16384 (reads only: above the 4.2 TB/s read+write copy
  ceiling). s_k = 1024: 3.13 / 3.01 fixed, 2.73 / 2.51 variable (H=16 / 32); the fixed ~10 us of metadata, fill and
  combine weigh more there.
* H = 128 bf16: compute-bound; predicted 420-445 TFLOP/s with the pipelined loads, measured 464-480.
* FP8 cache: half the bytes, but the e4m3 -> bf16 conversion and the narrow consumers are not yet overlapped well:
  predicted ~1.6x bf16 tokens/s, measured 0.91-0.95x (H=16), 0.83x (H=32); H = 128 FP8 ~325-360 TFLOP/s.
  Pipelined FP8 kernel (H * s_q <= 16, sixth session): predicted ~98 us at H=16 s_k=4096 (range 90-112, ~1.65x
  bf16); measured 149 us (1.09x bf16; the one-stage kernel 170), 1.01-1.05x at s_k 1024 / 8192 / 16384. ncu: DRAM
  35 % busy, waits on global loads dominate: too few tiles in flight (RESULTS.md, sixth session). Eighth session:
  that kernel was shared-memory bound (~3,000 wavefronts per tile: the converted f16 stage crossed shared memory four
  times); rebuilt on a raw ring with the conversion in the consumers' registers, predicted 95-115 us, measured 115 us
  (1.39x bf16 at 4096, 1.45x at 8192 / 16384, 1.23x at 1024); the scores warpgroup now set the pace. Ninth session:
  softmax moved to the value warpgroup, predicted 98-110 us, measured 112 us (1.45x at 4096, 1.50-1.51x at 8192 /
  16384, 1.29x at 1024); without the PV the kernel runs at its skeleton's 93-95 us: the PV is what is not overlapped.
  Tenth session: the pipelined kernel for H * s_q in 17..32 too (N = 32: H=32, H=16 s_q=2), predicted 120-135 us at
  H=32 s_k=4096 (1.27-1.42x), measured 152 us (1.14x; the one-stage kernel 210 us, 0.82x); with a lazy running max
  (O^T rescaled only when a column max moves by > 2^8) 148 us (1.17x), H=16 unchanged at 112 us. Thirteenth
  session: the N=16 PV by per-warp mma.sync, predicted ~100 us, measured 107 us at H=16 (1.49x; 1.52-1.54x at 8192 /
  16384); at N=32 the mask and per-warp maxima moved to the scores warpgroup, predicted ~135 us, measured 137 us at
  H=32 and H=16 s_q=2 (1.24x). Fourteenth session, the 64-row kernel (H * s_q > 32) in f16 (stages of f16 codes,
  Q and P in f16 with power-of-two factors): predicted 452 -> 320-340 us at H=128 s_k=4096, measured 410 us
  (0.74-0.76x bf16, from 0.67x); 0.85-0.88x at 16384, H=64 0.79-0.88x. Fifteenth session: its O-rescale skip, -1 to
  -2 %; the narrow kernel with e4m3 S^T wgmmas and the softmax in the scores warpgroup ran H=16 at 100.6 us (1.58x)
  but is not used: the e4m3 tensor-core accumulation (~13 mantissa bits) fails the wide-scales lse test.
* The torch version materializes the gathered (FP8: dequantized) cache and the fp32 scores: several times the bytes
  and three extra passes; measured 4.6-31x slower.
"""

import torch

from benchmarks.harness import Result, cli, time_cuda
from dsv2_kernels import mla

KV_DIM, V_DIM = 576, 512


def make_case(batch, s_q, heads, lens, block_size, fp8, device="cuda"):
    """Random paged cache (pages of the batch shuffled), block table, q; returns a dict of inputs."""
    pages = [(int(n) + block_size - 1) // block_size for n in lens]
    max_blocks = max(max(pages), 1)
    num_blocks = sum(pages) + 1
    perm = torch.randperm(num_blocks, device=device).int()
    table = torch.zeros(batch, max_blocks, dtype=torch.int32, device=device)
    start = 0
    for b, n in enumerate(pages):
        table[b, :n] = perm[start : start + n]
        start += n
    cache = torch.randn(num_blocks, block_size, KV_DIM, device=device, dtype=torch.bfloat16)
    scale = None
    if fp8:
        scale = torch.rand(num_blocks, block_size, 2, device=device) / 100 + 1e-3
        cache = (cache.float() * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    q = torch.randn(batch, s_q, heads, KV_DIM, device=device, dtype=torch.bfloat16)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    return dict(q=q, cache=cache, scale=scale, table=table, lens=seqlens)


def torch_decode(q, cache, scale, table, lens, sm_scale, max_len):
    """Gather the pages densely, bf16 bmm -> fp32 masked softmax -> bf16 bmm."""
    batch, s_q, heads, _ = q.shape
    block_size = cache.shape[1]
    nb = (max_len + block_size - 1) // block_size
    pages = table[:, :nb].long()
    if scale is None:
        kv = cache[pages].view(batch, nb * block_size, KV_DIM)
    else:
        raw = cache.view(torch.uint8)[pages].view(torch.float8_e4m3fn).float()
        s = scale[pages]
        kv = torch.cat((raw[..., :V_DIM] * s[..., :1], raw[..., V_DIM:] * s[..., 1:]), -1)
        kv = kv.to(torch.bfloat16).view(batch, nb * block_size, KV_DIM)
    span = kv.shape[1]
    scores = torch.bmm(q.view(batch, s_q * heads, KV_DIM), kv.transpose(1, 2)).view(batch, s_q, heads, span)
    pos = torch.arange(span, device=q.device)
    ends = lens[:, None] - s_q + 1 + torch.arange(s_q, device=q.device)[None, :]  # causal, end-aligned
    mask = pos[None, None, :] < ends[..., None]
    p = torch.softmax(scores.float().mul_(sm_scale).masked_fill_(~mask[:, :, None, :], float("-inf")), dim=-1)
    out = torch.bmm(p.to(torch.bfloat16).view(batch, s_q * heads, span), kv[..., :V_DIM])
    return out.view(batch, s_q, heads, V_DIM)


def run(args):
    torch.manual_seed(0)
    batch, bs = 128, args.block_size
    s_ks = args.s_k or ([4096] if args.quick else [1024, 4096, 8192, 16384])
    heads_list = args.heads or ([16, 128] if args.quick else [16, 32, 64, 128])
    s_qs = args.s_q or ([1] if args.quick else [1, 2])
    sm_scale = mla.softmax_scale(192)
    results = []
    for s_k in s_ks:
        for variable in (False, True):
            if variable:
                lens = torch.randint(s_k // 4, 7 * s_k // 4 + 1, (batch,)).tolist()
            else:
                lens = [s_k] * batch
            total = sum(lens)
            for fp8 in (False, True):
                for heads in heads_list:
                    for s_q in s_qs:
                        def make():
                            return make_case(batch, s_q, heads, lens, bs, fp8)

                        row_bytes = KV_DIM * (1 if fp8 else 2) + (8 if fp8 else 0)
                        nbytes = total * row_bytes + batch * s_q * heads * (KV_DIM + V_DIM) * 2
                        flops = 2.0 * s_q * heads * total * (KV_DIM + V_DIM)
                        ceiling = "copy" if heads * s_q <= 64 else "bf16"
                        case = (f"s_k={s_k}{' var' if variable else ''} H={heads} s_q={s_q} "
                                f"{'fp8' if fp8 else 'bf16'}")
                        ours = lambda i: mla.decode_attention(i["q"], i["cache"], i["scale"], i["table"],  # noqa: E731
                                                              i["lens"], sm_scale, True)
                        results.append(Result(case, "dsv2_kernels", time_cuda(ours, make), flops, nbytes, ceiling))
                        r = results[-1]
                        print(f"{case}: {r.median_us:.1f} us, {r.gbps:.0f} GB/s, {r.tflops:.0f} TFLOP/s", flush=True)
                        if not args.no_torch:
                            ref = lambda i: torch_decode(i["q"], i["cache"], i["scale"], i["table"],  # noqa: E731
                                                         i["lens"], sm_scale, max(lens))
                            results.append(Result(case, "torch (gathered bmm)", time_cuda(ref, make, iters=20),
                                                  flops, nbytes, ceiling))
    return results


def add_args(parser):
    parser.add_argument("--block-size", type=int, default=64, help="page size of the paged cache")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch version")
    ints = lambda v: [int(x) for x in v.split(",")]  # noqa: E731
    parser.add_argument("--s-k", type=ints, help="comma-separated cache lengths (overrides the case list)")
    parser.add_argument("--heads", type=ints, help="comma-separated head counts (overrides the case list)")
    parser.add_argument("--s-q", type=ints, help="comma-separated query lengths (overrides the case list)")


if __name__ == "__main__":
    cli("MLA decode attention (B=128, causal)", "mla_decode", run, add_args)
