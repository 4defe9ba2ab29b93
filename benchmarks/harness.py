"""One way to time an op and report it.

* Timing: CUDA events around each call, median over many calls, all enqueued behind a spin kernel so launch
  overhead on the host is not counted (the runner replays CUDA graphs, where it does not exist either). Inputs are rotated over enough copies that their
  total size exceeds several times the L2 (the H200 has 60 MB), so each call reads from HBM as in a real model
  rather than from a warm cache.
* ``--back-to-back N`` times groups of N consecutive calls (rotated inputs) between one event pair instead, and
  reports each group's mean per call: the throughput of a kernel inside a stream of kernels (a CUDA graph), where its
  launch and ramp overlap the previous kernel's tail. Kernels of a few µs read very differently in the two modes
  (RESULTS.md names the mode of every table).
* Report: time, TFLOP/s, GB/s and % of the ceilings measured on the H200, with a peer (torch, or another library)
  timed in the same run; printed as a Markdown table and written as pytest-benchmark-format JSON, so
  ``pytest-benchmark compare`` can read our runs beside others.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import subprocess
import time
from typing import Callable, Sequence

import torch

# Ceilings measured on the H200 (see benchmarks/RESULTS.md): bytes/s and FLOP/s.
CEILINGS = {
    "copy": 4.2e12,  # device-to-device copy, bytes read + written
    "bf16": 744e12,  # bf16 GEMM
    "fp8": 1417e12,  # FP8 GEMM, tensor-wise scales (torch._scaled_mm)
    "fp8_block": 1203e12,  # FP8 GEMM, 1x128 / 128x128 block scales (torch._scaled_mm)
    "fp8_grouped": 606e12,  # torch._scaled_grouped_mm, row-wise, V2-Lite expert shapes
}
L2_BYTES = 60 * 2**20
BACK_TO_BACK = 0  # set by cli(): calls per timed group (0: each call alone)


@dataclasses.dataclass
class Result:
    case: str  # e.g. "T=16384 H=5120"
    impl: str  # e.g. "dsv2_kernels", "torch eager"
    times_us: list[float]
    flops: float = 0.0
    bytes: float = 0.0
    ceiling: str = "copy"  # which CEILINGS entry the % column uses
    note: str = ""

    @property
    def median_us(self) -> float:
        return statistics.median(self.times_us)

    @property
    def tflops(self) -> float:
        return self.flops / (self.median_us * 1e-6) / 1e12

    @property
    def gbps(self) -> float:
        return self.bytes / (self.median_us * 1e-6) / 1e9

    @property
    def pct(self) -> float:
        rate = self.bytes / (self.median_us * 1e-6) if self.ceiling == "copy" else self.tflops * 1e12
        return 100.0 * rate / CEILINGS[self.ceiling]


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 0


def time_cuda(
    fn: Callable, make_inputs: Callable[[], object], *, iters: int = 100, warmup: int = 10, max_copies: int = 32
) -> list[float]:
    """Per-call times in µs of ``fn(inputs)``, rotating over copies of the inputs so their total exceeds 3x L2."""
    first = make_inputs()
    copies = [first]
    size = max(_nbytes(first), 1)
    while len(copies) < max_copies and size * len(copies) < 3 * L2_BYTES:
        copies.append(make_inputs())
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(warmup):
        fn(copies[i % len(copies)])
    cpu_per_call = (time.perf_counter() - t0) / warmup  # an upper bound on the host's enqueue cost per call
    torch.cuda.synchronize()
    # Park the GPU on a spin kernel while the host enqueues every timed call, so each event pair measures GPU time
    # only: without it, small kernels would be timed at the speed of the Python launch path.
    torch.cuda._sleep(int(min(cpu_per_call * iters * max(BACK_TO_BACK, 1) * 1.5, 2.0) * 2.0e9))
    group = max(BACK_TO_BACK, 1)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        for j in range(group):
            fn(copies[(i * group + j) % len(copies)])
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e3 / group for s, e in zip(starts, ends)]


def copy_peer(case: str, nbytes: float) -> Result:
    """A device-to-device copy moving the same bytes (half read, half written), timed like the kernels: what this
    timing method reaches at this size, next to the copy ceiling (measured on large buffers). A few-µs kernel cannot
    beat it; the bars still count against the ceiling."""
    half = max(int(nbytes) // 32 * 16, 16)

    def make():
        return (torch.empty(half, dtype=torch.uint8, device="cuda"),
                torch.empty(half, dtype=torch.uint8, device="cuda"))

    return Result(case, "torch copy of the same bytes", time_cuda(lambda io: io[1].copy_(io[0]), make),
                  bytes=2 * half)


def markdown(results: Sequence[Result], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| case | impl | time (µs) | TFLOP/s | GB/s | % of ceiling | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        tf = f"{r.tflops:.1f}" if r.flops else "–"
        gb = f"{r.gbps:.0f}" if r.bytes else "–"
        lines.append(
            f"| {r.case} | {r.impl} | {r.median_us:.2f} | {tf} | {gb} | {r.pct:.1f}% of {r.ceiling} | {r.note} |"
        )
    return "\n".join(lines) + "\n"


def benchmark_json(results: Sequence[Result], group: str) -> dict:
    """pytest-benchmark's JSON layout (times in seconds), with our derived rates in extra_info."""

    def stats(ts_us):
        ts = sorted(t * 1e-6 for t in ts_us)
        q1, q3 = ts[len(ts) // 4], ts[(3 * len(ts)) // 4]
        return {
            "min": ts[0],
            "max": ts[-1],
            "mean": statistics.fmean(ts),
            "stddev": statistics.pstdev(ts),
            "median": statistics.median(ts),
            "q1": q1,
            "q3": q3,
            "iqr": q3 - q1,
            "rounds": len(ts),
            "iterations": 1,
            "ops": 1.0 / statistics.fmean(ts),
            "outliers": "0;0",
            "ld15iqr": ts[0],
            "hd15iqr": ts[-1],
            "total": sum(ts),
        }

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "machine_info": {"node": platform.node(), "python_version": platform.python_version(), "gpu": gpu,
                         "torch": torch.__version__, "cuda": torch.version.cuda},
        "commit_info": {"id": commit},
        "benchmarks": [
            {
                "group": group,
                "name": f"{r.impl} [{r.case}]",
                "fullname": f"{group}::{r.impl} [{r.case}]",
                "params": {"case": r.case, "impl": r.impl},
                "stats": stats(r.times_us),
                "options": {"timer": "cuda_event", "warmup": True},
                "extra_info": {"tflops": r.tflops, "gbps": r.gbps, "pct_of_ceiling": r.pct, "ceiling": r.ceiling,
                               "note": r.note},
            }
            for r in results
        ],
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "version": "5.2.3",
    }


def cli(title: str, group: str, run: Callable[[argparse.Namespace], list[Result]], add_args=None) -> None:
    """Shared main(): run the cases, print the Markdown table, optionally write JSON/Markdown files."""
    parser = argparse.ArgumentParser(description=title)
    parser.add_argument("--json", help="write pytest-benchmark-format JSON here")
    parser.add_argument("--md", help="append the Markdown table to this file")
    parser.add_argument("--quick", action="store_true", help="fewer cases and iterations")
    parser.add_argument("--back-to-back", type=int, default=0, metavar="N",
                        help="time groups of N consecutive calls (stream throughput) instead of each call alone")
    if add_args:
        add_args(parser)
    args = parser.parse_args()
    global BACK_TO_BACK
    BACK_TO_BACK = args.back_to_back
    if BACK_TO_BACK > 1:
        title += f" (back-to-back groups of {BACK_TO_BACK} calls)"
    if not torch.cuda.is_available():
        raise SystemExit(f"{title}: needs a CUDA GPU")
    import dsv2_kernels

    dsv2_kernels.set_value_checks(False)  # value checks sync the device; a benchmark measures the kernels alone
    results = run(args)
    table = markdown(results, f"{title} — {torch.cuda.get_device_name(0)}")
    print(table, flush=True)
    if args.md:
        with open(args.md, "a") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(benchmark_json(results, group), f, indent=1)
