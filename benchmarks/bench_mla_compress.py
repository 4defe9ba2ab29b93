"""MLA ``compress_kv`` (RMSNorm + RoPE + paged-cache write, bf16 or FP8 cache) and ``rope_q`` vs torch.

    python -m benchmarks.bench_mla_compress [--quick] [--json out.json] [--md out.md]

Sweep: T in {1, 64, 1024, 8192, 65536}. compress_kv: bf16 and e4m3 cache, return_normed off and on, kv_a a strided
slice of the [T, 2112] q_a|kv_a projection output, bf16 weight, positions ``arange(T) % 4096`` (a batch of prefill
sequences), a random slot mapping (``randperm`` of the cache's slots, page 64). rope_q: q_pe = ``q[..., 128:]`` of a
[T, H, 192] bf16 query, H in {16, 128}.

Peers, timed in the same run: the three-step torch sequence (``F.rms_norm``; RoPE; ``index_copy_`` of the
concatenated rows into the cache, with the e4m3 quantization in between for the FP8 cache), the eager reference
(``mla.compress_kv_ref`` / ``mla.rope_q_ref``) and ``torch.compile`` of the reference (dynamic shapes); for
compress_kv also a plain copy of as many bytes (what the per-call timing reaches at that size).

Bytes counted (as the % of the 4.2 TB/s copy ceiling): compress_kv reads kv_a (1152 B/token) and writes the cache
row (1152 B bf16; 576 + 8 B e4m3), plus 1152 B of returned c_kv/k_pe with return_normed. Not counted: the cos/sin
rows and the weight (L2-resident), positions and slot_mapping (16 B/token with int64, <1%). rope_q: q_pe read once,
the output written once (256 B per head and token).

Prediction (design in csrc/mla/compress_kv.cu: one warp per token, at most one wave of resident warps striding over
the tokens with the next row's loads in flight; csrc/mla/rope_q.cu: one thread per 16-byte vector):
* compress_kv, T = 65536: bf16 cache ~3.7-3.9 TB/s (88-93%): ~185 warp instructions per 2.3 KB token, ~27% of the
  SMs' issue rate at that bandwidth. e4m3 cache ~3.4-3.8 TB/s (81-90%): ~305 warp instructions per 1.7 KB token
  (two amax reductions, the exactly rounded division per value) need ~60% of the issue rate at 3.6 TB/s, the one
  case that may fall short of 85% (lever: a plain multiply by the reciprocal, ~36 instructions fewer, at the price
  of rare one-code differences from the reference). return_normed adds 1152 B/token of plain stores and few
  instructions: ~3.8-3.9 TB/s for both caches.
* T = 8192 (3.4-6.7 us of traffic at the ceiling): each warp handles 2-3 tokens; the launch, the first DRAM round
  trip and the drain (~1-1.5 us) weigh 15-25%: 3.2-3.6 TB/s (76-86%), the 85% bar at the top of the range, more
  likely met with return_normed (more bytes against the same fixed cost).
* T = 1 / 64: latency-bound, one dependent chain (slot/position + row loads, then the cos/sin row): ~3-5 us, vs
  ~12+ kernels (~25-40 us) for the eager three-step sequence and ~3-5 fused kernels (~10-15 us) for torch.compile.
  T = 1024 (one token per warp, one wave): ~3-4 us, 0.6-0.8 TB/s, well ahead of every peer.
* The three-step torch sequence makes ~4-6 passes over T x 576 (fp32 temporaries of RoPE, the concatenation, the
  index_copy; FP8 adds amax/divide/cast passes): expected 4-8x slower at large T; torch.compile fuses most of it but
  keeps the scatter separate: expected 1.5-3x slower.
* rope_q, T * H >= 128k rows: ~3.8-4.0 TB/s (90-95%): a plain 16-byte streaming kernel (~40 instructions per 16 B);
  eager reference ~6x slower (fp32 temporaries), torch.compile close to the copy rate on the contiguous output but
  paying the strided input and the cos/sin gather (~0.7-0.9x our speed).
"""

import torch
import torch.nn.functional as F

from benchmarks.harness import Result, cli, copy_peer, time_cuda
from dsv2_kernels import mla

FP8 = torch.float8_e4m3fn
KV_RANK, ROPE, KV_DIM = 512, 64, 576
BLOCK_SIZE = 64
EPS = 1e-6


def torch_three_step(kv_a, w, eps, pos, cs, slots, cache, scale, return_normed):
    """What a model without a fused kernel runs: RMSNorm, RoPE, then one index_copy_ of the rows into the cache."""
    c = F.rms_norm(kv_a[:, :KV_RANK], (KV_RANK,), w, eps)
    k = mla.rope_q_ref(kv_a[:, None, KV_RANK:], pos, cs)[:, 0]
    flat = cache.view(-1, KV_DIM)
    if scale is None:
        flat.index_copy_(0, slots, torch.cat((c, k), -1))
    else:
        cf, kf = c.float(), k.float()
        c_scale = cf.abs().amax(-1, keepdim=True).clamp_min(1e-10) / 448
        k_scale = kf.abs().amax(-1, keepdim=True).clamp_min(1e-10) / 448
        row = torch.cat((cf / c_scale, kf / k_scale), -1).clamp(-448, 448).to(FP8)
        flat.view(torch.uint8).index_copy_(0, slots, row.view(torch.uint8))
        scale.view(-1, 2).index_copy_(0, slots, torch.cat((c_scale, k_scale), -1))
    return c, k


def compress_bytes(T, fp8, normed):
    return T * (2 * KV_DIM + (KV_DIM + 8 if fp8 else 2 * KV_DIM) + (2 * KV_DIM if normed else 0))


def timed(results, case, name, fn, make, nbytes, warm=False):
    """Time one implementation; a peer that fails (e.g. a torch.compile limitation) is reported, not fatal."""
    try:
        if warm:  # compile outside the timed loop
            fn(make())
        results.append(Result(case, name, time_cuda(fn, make), bytes=nbytes))
    except Exception as e:  # noqa: BLE001
        print(f"# {case} / {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)


def run(args):
    torch._dynamo.config.cache_size_limit = 64
    tokens = [1, 8192, 65536] if args.quick else [1, 64, 1024, 8192, 65536]
    configs = [(False, False), (True, False)] if args.quick else [(False, False), (True, False), (False, True),
                                                                   (True, True)]
    heads_list = [128] if args.quick else [16, 128]
    cs = mla.rope_cos_sin_cache(ROPE, 163840, rope_scaling=dict(type="yarn", factor=40, mscale=0.707,
                                                                 mscale_all_dim=0.707), device="cuda")
    w = (torch.rand(KV_RANK, device="cuda") + 0.5).bfloat16()
    compiled_compress = torch.compile(mla.compress_kv_ref, dynamic=True)
    compiled_rope = torch.compile(mla.rope_q_ref, dynamic=True)
    results = []

    for fp8, normed in configs:
        for T in tokens:
            num_blocks = (T + BLOCK_SIZE - 1) // BLOCK_SIZE
            pos = (torch.arange(T, device="cuda") % 4096)

            def make():
                kv_a = torch.randn(T, 2112, device="cuda", dtype=torch.bfloat16)[:, 1536:]
                # As in serving: a prefill's tokens fill their sequences' pages in order, the pages themselves lie
                # anywhere in the cache (a token-level random permutation would scatter 1 KB writes over DRAM pages).
                pages = torch.randperm(num_blocks, device="cuda")
                slots = (pages[:, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE, device="cuda")).view(-1)[:T]
                if fp8:
                    cache = torch.empty(num_blocks, BLOCK_SIZE, KV_DIM, device="cuda", dtype=FP8)
                    scale = torch.empty(num_blocks, BLOCK_SIZE, 2, device="cuda")
                else:
                    cache = torch.empty(num_blocks, BLOCK_SIZE, KV_DIM, device="cuda", dtype=torch.bfloat16)
                    scale = None
                return kv_a, slots, cache, scale

            case = f"compress_kv T={T} cache={'e4m3' if fp8 else 'bf16'} normed={int(normed)}"
            nbytes = compress_bytes(T, fp8, normed)
            impls = {
                "dsv2_kernels": (lambda i: mla.compress_kv(i[0], w, EPS, pos, cs, i[1], i[2], i[3], normed), False),
                "torch 3-step (rms_norm, rope, index_copy)":
                    (lambda i: torch_three_step(i[0], w, EPS, pos, cs, i[1], i[2], i[3], normed), False),
                "torch eager (reference)":
                    (lambda i: mla.compress_kv_ref(i[0], w, EPS, pos, cs, i[1], i[2], i[3], normed), False),
                "torch.compile (reference)":
                    (lambda i: compiled_compress(i[0], w, EPS, pos, cs, i[1], i[2], i[3], normed), True),
            }
            for name, (fn, warm) in impls.items():
                timed(results, case, name, fn, make, nbytes, warm)
            results.append(copy_peer(case, nbytes))

    for H in heads_list:
        for T in tokens:
            pos = (torch.arange(T, device="cuda") % 4096).int()

            def make():
                return torch.randn(T, H, 192, device="cuda", dtype=torch.bfloat16)[..., 128:]

            case, nbytes = f"rope_q T={T} H={H}", 2 * T * H * ROPE * 2
            impls = {
                "dsv2_kernels": (lambda q: mla.rope_q(q, pos, cs), False),
                "torch eager (reference)": (lambda q: mla.rope_q_ref(q, pos, cs), False),
                "torch.compile (reference)": (lambda q: compiled_rope(q, pos, cs), True),
            }
            for name, (fn, warm) in impls.items():
                timed(results, case, name, fn, make, nbytes, warm)
    return results


if __name__ == "__main__":
    cli("MLA compress_kv / rope_q", "mla_compress", run)
