"""Expert-parallel dispatch / combine (dsv2_kernels.ep) beside torch.distributed.all_to_all_single used directly.

    torchrun --nproc-per-node 8 -m benchmarks.bench_ep [--tokens 4096] [--hidden 5120] [--top-k 6] [--experts 160]
                                                       [--decode-tokens 128] [--iters 20] [--md out.md]
    python -m benchmarks.bench_ep --quick        # one process (gloo on CPU without a GPU): a smoke run

Cases, per rank (every rank has the same number of tokens, routed by ``moe.route`` on random logits: balanced):
  * prefill (high-throughput mode): ``ep.dispatch`` (bf16 rows, and FP8 rows + 1x128 scales) and ``ep.combine`` of
    ``--tokens`` tokens; peer: one ``all_to_all_single`` of the same rows with the same splits (the transport alone,
    without counting, metadata, quantization and the local layout).
  * decode (low-latency mode): ``ep.dispatch_low_latency`` (FP8) + ``ep.combine`` of ``--decode-tokens`` tokens,
    latency of the pair; peer: ``all_to_all_single`` of the same fixed buffer there and back.

GB/s per GPU = payload bytes this rank sends (rows to every rank, itself included; FP8 rows count their scales) /
time. Time: median over ``--iters`` calls after a barrier, the slowest rank's median (the step waits for it). The
expert GEMMs are not run: combine gets the dispatched rows back (bf16), so its bytes equal the bf16 dispatch's.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist

from dsv2_kernels import ep, moe


def _init():
    """torchrun's process group, or a one-process group when started plainly."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def _time(fn, iters: int, device) -> float:
    """The slowest rank's median seconds per call of ``fn``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up: communicators, allocator
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    worst = torch.tensor([statistics.median(times)], device=device, dtype=torch.float64)
    dist.all_reduce(worst, dist.ReduceOp.MAX)
    return worst.item()


def run(args) -> list[tuple[str, str, float, float]]:
    device = _init()
    world, rank = dist.get_world_size(), dist.get_rank()
    if args.experts % world:
        raise SystemExit(f"--experts {args.experts} is not divisible by the world size {world}")
    num_local, h, k = args.experts // world, args.hidden, args.top_k
    gen = torch.Generator(device).manual_seed(rank)
    rows = []  # (case, impl, seconds, bytes sent per rank)

    def routed(t):
        x = torch.randn(t, h, device=device, generator=gen).bfloat16()
        ids, w = moe.route(torch.randn(t, args.experts, device=device, generator=gen), k)
        return x, ids, w

    # ---- prefill: high-throughput mode -------------------------------------------------------------------------
    t = args.tokens
    x, ids, w = routed(t)
    for fp8 in (False, True):
        d = ep.dispatch(x, ids, w, num_local, quant_fp8=fp8)
        row_bytes = ep.row_bytes(h, fp8)
        sent = sum(d.send_splits) * row_bytes
        name = f"prefill T={t} H={h} top-{k} {'fp8' if fp8 else 'bf16'}"
        rows.append((name, "ep.dispatch", _time(lambda: ep.dispatch(x, ids, w, num_local, quant_fp8=fp8),
                                                args.iters, device), sent))
        payload = torch.zeros(sum(d.send_splits), row_bytes // 2, dtype=torch.bfloat16, device=device)
        recv = payload.new_empty(sum(d.recv_splits), payload.shape[1])
        rows.append((name, "all_to_all_single", _time(
            lambda: dist.all_to_all_single(recv, payload, d.recv_splits, d.send_splits), args.iters, device), sent))
    d = ep.dispatch(x, ids, w, num_local)
    out = d.rows  # stands in for the experts' output (same shape and dtype)
    name = f"prefill T={t} H={h} top-{k} combine"
    rows.append((name, "ep.combine", _time(lambda: ep.combine(out, d), args.iters, device),
                 sum(d.recv_splits) * h * 2))

    # ---- decode: low-latency mode (latency of dispatch + combine) ------------------------------------------------
    m = args.decode_tokens
    x, ids, w = routed(m)

    y = torch.zeros(num_local, world * m, h, dtype=torch.bfloat16, device=device)  # stands in for the experts' output

    def decode_step():
        return ep.combine(y, ep.dispatch_low_latency(x, ids, w, num_local, m, quant_fp8=True))

    buf_bytes = world * m * ep.row_bytes(h, True)
    name = f"decode {m} tokens/rank H={h} top-{k} fp8, dispatch + combine"
    rows.append((name, "ep low-latency", _time(decode_step, args.iters, device), buf_bytes + world * m * h * 2))
    send = torch.zeros(world * m, ep.row_bytes(h, True) // 2, dtype=torch.bfloat16, device=device)
    back = torch.zeros(world * m, h, dtype=torch.bfloat16, device=device)

    def raw_step():
        dist.all_to_all_single(torch.empty_like(send), send)
        dist.all_to_all_single(torch.empty_like(back), back)

    rows.append((name, "all_to_all_single x2", _time(raw_step, args.iters, device), buf_bytes + world * m * h * 2))

    if rank == 0:
        table = [f"EP on {world} x {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
                 f"{args.experts} experts",
                 "| case | impl | time us | GB/s per GPU |", "|---|---|---:|---:|"]
        table += [f"| {c} | {i} | {s * 1e6:,.1f} | {b / s / 1e9:,.1f} |" for c, i, s, b in rows]
        print("\n".join(table))
        if args.md:
            with open(args.md, "a") as f:
                f.write("\n".join(table) + "\n\n")
    dist.destroy_process_group()
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="prefill tokens per rank")
    p.add_argument("--hidden", type=int, default=5120)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--experts", type=int, default=160)
    p.add_argument("--decode-tokens", type=int, default=128, help="decode tokens per rank")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="small shapes, few iterations (CPU smoke run)")
    p.add_argument("--md", help="append the Markdown table to this file")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.hidden, args.decode_tokens, args.iters = 256, 512, 16, 3
    run(args)


if __name__ == "__main__":
    main()
