"""MLA prefill attention (``mla.prefill_attention``, causal varlen, qk head 192, v head 128) vs torch SDPA.

    python -m benchmarks.bench_mla_prefill [--quick] [--json out.json] [--md out.md] [--no-torch]

Sweep: H in {128, 16}; total length T in {4096, 8192, 16384} as one sequence and as a ragged batch of 8 sequences
(random lengths, mostly not multiples of 128, summing to T); causal (queries are the whole sequence, lq = lk). Inputs
as the model passes them: q, k [T, H, 192] contiguous, v = ``kv[..., 128:]`` of a [T, H, 256] tensor. FLOPs =
2 * (192 + 128) * H * visible (query, key) pairs, the causal triangle counted once (L (L + 1) / 2 pairs per
sequence); the % column is of the 744 TFLOP/s bf16 GEMM ceiling.

Rows: ``dsv2_kernels`` (warpgroup ping-pong on, the default) and, for H = 128 single sequences,
``dsv2_kernels (no ping-pong)`` (DSV2_PREFILL_PINGPONG=0), so one run shows which schedule to keep. Peer, timed in
the same run: ``torch.nn.functional.scaled_dot_product_attention`` per sequence on [1, H, L, D] views of the packed
tensors (``is_causal=True``; the views are strided, as the packed layout forces), under every backend torch offers
that runs these shapes: FLASH needs equal qk and v head dims, so usually cuDNN and EFFICIENT (memory-efficient)
remain; each one that runs is listed (the impl column names it), and our row's note gives the speed-up over the
fastest.

Prediction (design in csrc/mla/prefill_attention.cu: 128 query rows per CTA, two consumer warpgroups with ping-pong
and intra-warpgroup overlap of softmax and P V, a cp.async producer warpgroup, 128-key tiles, two K and two V stages):
* H = 128, one sequence: 450-530 TFLOP/s (60-70% of the ceiling) at T >= 8192, 430-500 at T = 4096 (a CTA has at
  most 32 tiles: the Q load and first-tile latency weigh more).
* Ragged batches (8 sequences of ~T/8): ~10-15% lower (more diagonal tiles, shorter CTAs).
* H = 16: T = 16384 close to H = 128; T = 4096 only 512 CTAs (3.9 waves, causal imbalance): 330-420.
* SDPA: cuDNN (if it takes 192/128) ~300-450 TFLOP/s; EFFICIENT ~150-250 (an sm80 design): expected >= 1.3x the
  fastest.
"""

import os

import torch
import torch.nn.functional as F

from benchmarks.harness import Result, cli, time_cuda
from dsv2_kernels import mla

D_QK, D_V = 192, 128
SCALE = mla.softmax_scale(192)


def ragged_lengths(total: int, n: int = 8, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g) + 0.25
    lens = (w / w.sum() * total).long().tolist()
    lens[-1] += total - sum(lens)
    return lens


def make_case(lengths, heads, device="cuda"):
    t = sum(lengths)
    q = torch.randn(t, heads, D_QK, device=device, dtype=torch.bfloat16)
    k = torch.randn(t, heads, D_QK, device=device, dtype=torch.bfloat16)
    kv = torch.randn(t, heads, 256, device=device, dtype=torch.bfloat16)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return dict(q=q, k=k, v=kv[..., 128:], cu=cu)


def sdpa_backends():
    """(name, SDPBackend) for every backend this torch build knows; which of them run is probed per shape."""
    from torch.nn.attention import SDPBackend

    names = [("cudnn", "CUDNN_ATTENTION"), ("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION")]
    return [(n, getattr(SDPBackend, a)) for n, a in names if hasattr(SDPBackend, a)]


def torch_sdpa(inp, lengths, backend):
    from torch.nn.attention import sdpa_kernel

    outs = []
    with sdpa_kernel([backend]):
        s0 = 0
        for n in lengths:
            q, k, v = (inp[x][s0 : s0 + n].transpose(0, 1).unsqueeze(0) for x in ("q", "k", "v"))
            outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE))
            s0 += n
    return outs


def sdpa_runs(backend, heads) -> bool:
    """Whether the backend takes these head dims (probed on a small causal case, checked against the reference)."""
    lengths = [200, 77]
    inp = make_case(lengths, heads)
    try:
        outs = torch_sdpa(inp, lengths, backend)
        torch.cuda.synchronize()
    except RuntimeError:
        return False
    got = torch.cat([o[0].transpose(0, 1) for o in outs])
    import dsv2_kernels

    with dsv2_kernels.kernels("none"):
        want, _ = mla.prefill_attention(inp["q"], inp["k"], inp["v"], inp["cu"], inp["cu"], 200, 200, SCALE, True)
    return bool(torch.allclose(got.float(), want.float(), atol=3e-2, rtol=3e-2))


def run(args):
    torch.manual_seed(0)
    totals = [8192] if args.quick else [4096, 8192, 16384]
    heads_list = [128, 16]
    results = []
    backends = [] if args.no_torch else sdpa_backends()
    for heads in heads_list:
        working = [(n, b) for n, b in backends if sdpa_runs(b, heads)]
        print(f"H={heads}: SDPA backends that run 192/128: {[n for n, _ in working] or 'none'}", flush=True)
        for total in totals:
            for ragged in (False, True):
                lengths = ragged_lengths(total) if ragged else [total]
                pairs = sum(n * (n + 1) // 2 for n in lengths)
                flops = 2.0 * (D_QK + D_V) * heads * pairs
                nbytes = total * heads * (2 * D_QK + 2 * D_V) * 2 + heads * total * 4  # q, k, v, out, lse
                case = f"T={total}{' ragged x8' if ragged else ''} H={heads}"
                iters = 100 if flops < 2e12 else 30
                max_len = max(lengths)

                def make():
                    return make_case(lengths, heads)

                def ours(i):
                    return mla.prefill_attention(i["q"], i["k"], i["v"], i["cu"], i["cu"], max_len, max_len, SCALE,
                                                 True)

                variants = [("dsv2_kernels", "1")]
                if heads == 128 and not ragged:
                    variants.append(("dsv2_kernels (no ping-pong)", "0"))
                mine = []
                for impl, pp in variants:
                    old = os.environ.get("DSV2_PREFILL_PINGPONG")
                    os.environ["DSV2_PREFILL_PINGPONG"] = pp
                    try:
                        times = time_cuda(ours, make, iters=iters)
                    finally:
                        if old is None:
                            os.environ.pop("DSV2_PREFILL_PINGPONG")
                        else:
                            os.environ["DSV2_PREFILL_PINGPONG"] = old
                    mine.append(Result(case, impl, times, flops, nbytes, "bf16"))
                    r = mine[-1]
                    print(f"{case} {impl}: {r.median_us:.0f} us, {r.tflops:.0f} TFLOP/s", flush=True)
                peers = []
                for name, backend in working:
                    def ref(i, backend=backend):
                        return torch_sdpa(i, lengths, backend)

                    peers.append(Result(case, f"torch SDPA ({name})", time_cuda(ref, make, iters=iters), flops,
                                        nbytes, "bf16", note="per sequence, strided [1, H, L, D] views"))
                    r = peers[-1]
                    print(f"{case} SDPA {name}: {r.median_us:.0f} us, {r.tflops:.0f} TFLOP/s", flush=True)
                if peers:
                    best = min(peers, key=lambda r: r.median_us)
                    for r in mine:
                        r.note = f"{best.median_us / r.median_us:.2f}x SDPA {best.impl[12:-1]}"
                results += mine + peers
    return results


def add_args(parser):
    parser.add_argument("--no-torch", action="store_true", help="skip torch SDPA")


if __name__ == "__main__":
    cli("MLA prefill attention (causal, qk 192 / v 128)", "mla_prefill", run, add_args)
