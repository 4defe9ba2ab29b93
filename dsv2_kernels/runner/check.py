"""``--check``: every catalogue op runs twice, as configured (kernels) and as the PyTorch reference on a copy of the
same inputs; the model continues with the kernel's result, so each op is compared on identical inputs, layer by
layer, and errors do not compound. The report gives, per op, the largest relative error
``max|kernel - reference| / max|reference|`` over all calls, and the layer where it occurred.

Outputs whose layout is the op's own choice are compared in a layout-free form: routing as the sorted expert set,
dispatched rows gathered back per (token, k), grouped-GEMM outputs on their valid rows only.
"""

from __future__ import annotations

import torch

from .. import _library as lib
from ..fp8 import dequant_per_token_group


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _routing(ids, weights):
    ids, order = ids.sort(-1)
    return ids, weights.gather(-1, order)


def _dispatched(rows, scales, token_row, quantized):
    """Each (token, k)'s dispatched row, dequantized: independent of how the op laid the rows out."""
    flat = rows.reshape(-1, rows.shape[-1])
    picked = flat[token_row.reshape(-1).long()]
    if quantized:
        picked = dequant_per_token_group(picked, scales.reshape(-1, scales.shape[-1])[token_row.reshape(-1).long()])
    return picked.float()


def _errors(name, args, out, ref_args, ref) -> float:
    if name == "route":
        (i_k, w_k), (i_r, w_r) = _routing(*out), _routing(*ref)
        return 1.0 if not torch.equal(i_k, i_r) else _rel(w_k, w_r)
    if name.startswith("dispatch_"):
        quant = args[-1]
        count_err = 0.0 if torch.equal(out[2], ref[2]) else 1.0  # expert offsets / counts
        return max(count_err, _rel(_dispatched(out[0], out[1], out[-1], quant),
                                   _dispatched(ref[0], ref[1], ref[-1], quant)))
    if name == "fp8_grouped_gemm_contiguous":
        valid = args[4] >= 0
        return _rel(out[valid], ref[valid])
    if name == "fp8_grouped_gemm_masked":
        valid = torch.arange(out.shape[1], device=out.device)[None] < args[4][:, None]
        return _rel(out[valid], ref[valid])
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    err = max(_rel(a.float(), b.float()) for a, b in zip(outs, refs))
    if name == "compress_kv":  # the cache rows it wrote (and FP8 scales)
        err = max(err, *(_rel(a.float(), b.float()) for a, b in zip(args[6:8], ref_args[6:8]) if a is not None))
    return err


class CheckedOps:
    """Stands in for the model's op namespace in check mode (see the module docstring)."""

    def __init__(self, ops):
        self._ops, self.layer = ops, None
        self.worst: dict[str, tuple[float, int | None, int]] = {}  # op -> (error, layer, calls)

    def __getattr__(self, name):
        fn = getattr(self._ops, name)

        def run(*args):
            ref_args = list(args)
            if name == "compress_kv":  # the only op that writes into an input: give the reference its own cache
                ref_args[6:8] = [None if a is None else a.clone() for a in args[6:8]]
            out = fn(*args)
            with lib.kernels("none"):
                ref = fn(*ref_args)
            err = _errors(name, args, out, ref_args, ref)
            old_err, old_layer, calls = self.worst.get(name, (-1.0, None, 0))
            self.worst[name] = (err, self.layer, calls + 1) if err > old_err else (old_err, old_layer, calls + 1)
            return out

        return run

    def report(self, device) -> str:
        lines = [f"{'op':30} {'runs as':10} {'calls':>6} {'max rel err':>12}  layer"]
        for name, (err, layer, calls) in sorted(self.worst.items()):
            kernel = lib.use_kernel(name) and lib.has_cuda_kernel(name) and device.type == "cuda"
            where = "-" if layer is None else str(layer)
            lines.append(f"{name:30} {'kernel' if kernel else 'reference':10} {calls:6d} {err:12.3e}  {where}")
        return "\n".join(lines)
