"""The runner on several processes (``torchrun --nproc-per-node N -m dsv2_kernels generate ...``): routed experts
sharded by expert parallelism (EP), everything else data-parallel.

  * Experts: rank r of N holds routed experts ``[r * E / N, (r + 1) * E / N)`` (:func:`expert_shard`; only those are
    read from the checkpoint); the MoE layers move tokens with ``dsv2_kernels.ep`` (high-throughput dispatch in
    prefill, low-latency in decode).
  * Attention, dense layers, shared experts, embeddings: replicated; each rank runs its own requests (data-parallel
    attention). For DeepSeek-V2(-Lite) this beats tensor-parallel attention: the MLA cache is one 576-wide latent row
    per token shared by all heads, so splitting heads would not split the cache (each TP rank would keep the whole
    latent: duplication), and V2-Lite's 16 heads leave little to split; TP would also add an all-reduce per layer.
  * Lockstep: every MoE layer exchanges tokens with every rank, so all ranks run the same sequence of forwards
    (prefill or decode); a rank with nothing to do runs :meth:`Model.idle`, which still serves its experts. The
    engine agrees on the number of forwards with :meth:`ExpertParallel.agree` (one tiny all-reduce).

Backends: NCCL on GPUs (one GPU per process, ``LOCAL_RANK``), gloo on CPU (tests).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from .. import ep
from .weights import Weights


def expert_shard(num_experts: int, rank: int, world_size: int) -> tuple[int, int]:
    """The routed experts ``[lo, hi)`` rank ``rank`` owns among ``world_size`` ranks (equal contiguous shards)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world size {world_size})")
    if num_experts % world_size:
        divisors = [n for n in range(1, num_experts + 1) if num_experts % n == 0]
        raise ValueError(f"expert parallelism needs n_routed_experts divisible by the world size: "
                         f"n_routed_experts={num_experts} is not divisible by world size {world_size} "
                         f"(use one of {divisors} processes)")
    n = num_experts // world_size
    return rank * n, (rank + 1) * n


def world_size_from_env() -> int:
    """Processes of this job as torchrun announces them (1 when not started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str | None = None) -> torch.device:
    """Join the process group torchrun set up (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``):
    NCCL with one GPU per process when CUDA is available (unless ``device='cpu'``), else gloo. Returns the device."""
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= gpus:
            raise SystemExit(f"LOCAL_RANK={local} but only {gpus} GPUs are visible: start at most {gpus} processes "
                             "per node (torchrun --nproc-per-node)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dev


class ExpertParallel:
    """A model's MoE layers spread over the ranks of ``group`` (see the module docstring).

    Checks, identically on every rank so that all of them fail together: the ranks run the same config, the experts
    divide over the world size, and each rank's weights hold its shard (not another world size's).
    """

    def __init__(self, weights: Weights, max_decode_tokens: int, group=None):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.device = weights.embed.device
        self.max_decode_tokens = max_decode_tokens  # low-latency buffers: decode tokens per rank, same on every rank
        cfg = weights.config
        mine = (dataclasses.asdict(cfg), weights.fp8_experts, weights.experts, max_decode_tokens)
        everyone = [None] * self.world
        dist.all_gather_object(everyone, mine, group=group)
        first = everyone[0]
        for r, (config, fp8_experts, _, max_tokens) in enumerate(everyone):
            diff = [k for k in config if config[k] != first[0][k]]
            diff += ["fp8_experts"] * (fp8_experts != first[1]) + ["max_decode_tokens"] * (max_tokens != first[3])
            if diff:
                raise ValueError(f"ranks disagree on the model: rank {r}'s {', '.join(diff)} differ from rank 0's "
                                 "(every rank must load the same checkpoint with the same options)")
        every = (0, cfg.n_routed_experts)
        for r, theirs in enumerate(everyone):
            want, held = expert_shard(cfg.n_routed_experts, r, self.world), theirs[2] or every
            if held != want:
                raise ValueError(f"rank {r}'s weights hold routed experts {list(held)} of {cfg.n_routed_experts}, "
                                 f"but with world size "
                                 f"{self.world} rank {r} owns {list(want)} (weights loaded for another world size? "
                                 "load with experts=expert_shard(n_routed_experts, rank, world_size))")
        lo, hi = weights.experts or every
        self.num_local = hi - lo

    def moe(self, model, x, topk_ids, topk_weights, shared, lw, decode: bool):
        """One MoE layer's routed experts across the ranks: dispatch, the local experts, combine (+ shared)."""
        ops, fp8_experts = model.ops, model.w.fp8_experts
        if decode:  # no host sync: the decode step stays CUDA-graph capturable
            d = ep.dispatch_low_latency(x, topk_ids, topk_weights, self.num_local, self.max_decode_tokens,
                                        quant_fp8=fp8_experts, group=self.group, ops=ops)
            out = model.experts_masked(d.rows, d.scales, d.counts, lw)
        else:
            d = ep.dispatch(x, topk_ids, topk_weights, self.num_local, alignment=128 if fp8_experts else 1,
                            quant_fp8=fp8_experts, group=self.group, ops=ops)
            out = model.experts_contiguous(d.rows, d.scales, d.offsets, d.row_expert, lw)
        return ep.combine(out.to(x.dtype), d, shared, group=self.group, ops=ops)

    def agree(self, n: int) -> int:
        """The largest ``n`` over the ranks (e.g. the forwards a phase needs), so that every rank runs that many."""
        t = torch.tensor([n], device=self.device)
        dist.all_reduce(t, dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (on every rank)."""
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out
