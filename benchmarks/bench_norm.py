"""fused_add_rms_norm / rms_norm vs torch eager and torch.compile.

    python -m benchmarks.bench_norm [--quick] [--json out.json] [--md out.md]

Bytes counted: x (and residual) read once, out (and the new residual) written once; the weight is negligible.
"""

import torch
import torch.nn.functional as F

from benchmarks.harness import Result, cli, time_cuda
from dsv2_kernels import norm


def torch_eager(x, r, w, eps):
    s = x + r
    return F.rms_norm(s, (s.shape[-1],), w, eps), s


def run(args):
    shapes = [(16384, 5120), (4096, 2048)] if args.quick else [
        (1, 5120), (128, 5120), (2048, 2048), (2048, 5120), (16384, 2048), (16384, 5120), (65536, 5120)]
    compiled = torch.compile(norm.fused_add_rms_norm_ref)
    results = []
    for T, H in shapes:
        def make():
            return (torch.randn(T, H, device="cuda", dtype=torch.bfloat16),
                    torch.randn(T, H, device="cuda", dtype=torch.bfloat16))
        w = torch.rand(H, device="cuda", dtype=torch.bfloat16) + 0.5
        case, nbytes = f"T={T} H={H}", 4 * T * H * 2
        impls = {
            "dsv2_kernels fused_add_rms_norm": lambda i: norm.fused_add_rms_norm(i[0], i[1], w, 1e-6),
            "torch eager (add + F.rms_norm)": lambda i: torch_eager(i[0], i[1], w, 1e-6),
            "torch.compile (reference)": lambda i: compiled(i[0], i[1], w, 1e-6),
        }
        for name, fn in impls.items():
            results.append(Result(case, name, time_cuda(fn, make), bytes=nbytes))
        results.append(Result(case, "dsv2_kernels rms_norm", time_cuda(lambda i: norm.rms_norm(i[0], w, 1e-6), make),
                              bytes=2 * T * H * 2))
    return results


if __name__ == "__main__":
    cli("fused add + RMSNorm (bf16)", "norm", run)
