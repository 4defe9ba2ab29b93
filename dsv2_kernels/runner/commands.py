"""The ``generate`` and ``bench`` subcommands of ``dsv2-kernels`` (argument parsing lives in ``dsv2_kernels.cli``)."""

from __future__ import annotations

import resource

import torch

from .. import _library as lib
from .cache import PagedCache
from .check import CheckedOps
from . import distributed
from .config import PRESETS, ModelConfig
from .engine import Engine
from .model import Model, catalogue_ops
from .sampler import SamplingParams
from .weights import Tokenizer, load_checkpoint, random_weights

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _setup(args):
    lib.set_kernels(args.kernels)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype]
    return device, dtype


def _engine(model, device, args, tokens_needed: list[int], check: bool = False, max_batch: int | None = None
            ) -> Engine:
    bs = args.block_size
    blocks = sum(PagedCache.blocks_for(n, bs) for n in tokens_needed) + 1
    return Engine(model, num_blocks=blocks, block_size=bs, max_model_len=max(tokens_needed),
                  max_batch=max_batch or max(len(tokens_needed), 1),
                  cuda_graph=device.type == "cuda" and not args.eager and not check,
                  kv_dtype=torch.float8_e4m3fn if args.kv_fp8 else None)


def generate(args) -> int:
    """Under torchrun (WORLD_SIZE > 1): expert parallelism, each rank serving every WORLD_SIZE-th prompt (see
    ``runner.distributed``); rank 0 prints every result."""
    device, dtype = _setup(args)
    rank, world = 0, distributed.world_size_from_env()
    if world > 1:
        device = distributed.init_from_env(args.device)
        rank = torch.distributed.get_rank()
    say = print if rank == 0 else (lambda *a, **k: None)
    if args.model:
        experts = distributed.expert_shard(ModelConfig.from_dir(args.model).n_routed_experts, rank, world)
        weights = load_checkpoint(args.model, dtype=dtype, device=device, fp8_experts=args.fp8_experts,
                                  experts=experts, progress=rank == 0)
        tokenizer = Tokenizer.from_dir(args.model, weights.config.bos_token_id)
    else:
        name = "v2-lite" if device.type == "cuda" else "tiny"
        say(f"no model directory given: random-weight {name} model on {device} ({dtype})"
            f"{f', {world} processes (expert parallel)' if world > 1 else ''}")
        experts = distributed.expert_shard(PRESETS[name].n_routed_experts, rank, world)
        weights = random_weights(PRESETS[name], seed=args.seed or 0, dtype=dtype, device=device,
                                 fp8_experts=args.fp8_experts, experts=experts, progress=rank == 0)
        tokenizer = None
    cfg = weights.config
    if args.prompt and tokenizer is None:
        raise SystemExit("--prompt needs a tokenizer.json in the model directory; pass token ids with --ids")
    prompts = [tokenizer.encode(p) for p in args.prompt or []]
    prompts += [[int(t) for t in ids.replace(",", " ").split()] for ids in args.ids or []]
    if not prompts:  # two prompts of different lengths, so the default run exercises varlen prefill and batching
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(2, cfg.vocab_size, (n,), generator=gen).tolist() for n in (7, 19)]
    for p in prompts:
        if not p or min(p) < 0 or max(p) >= cfg.vocab_size:
            raise SystemExit(f"token ids must be in [0, {cfg.vocab_size}) and prompts non-empty, got {p}")

    ops = CheckedOps(catalogue_ops(dtype)) if args.check else None
    needed = [len(p) + args.max_new_tokens for p in prompts]  # all prompts: every rank sizes its engine the same
    per_rank = -(-len(prompts) // world)  # the most requests one rank serves
    ep = distributed.ExpertParallel(weights, max_decode_tokens=per_rank) if world > 1 else None
    model = Model(weights, max_position=max(needed), ops=ops, ep=ep)
    engine = _engine(model, device, args, needed, check=args.check, max_batch=per_rank)
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    mine = list(range(rank, len(prompts), world))  # data-parallel: this rank's requests
    out = engine.generate([prompts[i] for i in mine], args.max_new_tokens, sampling,
                          stop_ids=() if args.ignore_eos else cfg.eos_token_ids)
    tokens = dict(zip(mine, out.tokens))
    if ep is not None:
        tokens = {i: t for part in ep.gather(tokens) for i, t in part.items()}
    for i, prompt in enumerate(prompts):
        new = tokens[i]
        if tokenizer:
            say(f"[{i}] {tokenizer.decode(prompt)!r} -> {tokenizer.decode(new)!r}")
        else:
            say(f"[{i}] {prompt} -> {new}")
    n_new = sum(map(len, tokens.values()))
    say(f"prefill {sum(map(len, prompts))} tokens in {out.prefill_s * 1e3:.1f} ms; decode {n_new - len(prompts)} "
        f"tokens in {out.decode_steps} steps, {out.decode_s * 1e3:.1f} ms"
        f"{' (CUDA graphs)' if engine.cuda_graph else ''}; kernels: {args.kernels}"
        f"{f'; {world} processes, times of rank 0' if world > 1 else ''}")
    if ops is not None:
        say(ops.report(device))
    return 0


def bench(args) -> int:
    if distributed.world_size_from_env() > 1:
        raise SystemExit("bench runs in one process; for expert parallelism use benchmarks/bench_ep.py (or generate)")
    device, dtype = _setup(args)
    cfg = PRESETS[args.config]
    layers = args.layers or (8 if args.config == "v2" else None)  # 60 V2 layers do not fit one GPU in bf16
    if layers:
        cfg = cfg.replace(num_hidden_layers=layers)
    print(f"bench {args.config} ({cfg.num_hidden_layers} layers, random weights) on {device}, {dtype}, "
          f"kernels {args.kernels}{', fp8 experts' if args.fp8_experts else ''}")
    weights = random_weights(cfg, dtype=dtype, device=device, fp8_experts=args.fp8_experts)
    model = Model(weights, max_position=args.input_len + args.output_len)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    engine = _engine(model, device, args, [args.input_len + args.output_len] * max(batch_sizes))
    gen = torch.Generator().manual_seed(0)
    print("| batch | input | output | prefill tok/s | decode tok/s | step ms | peak mem GiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for b in batch_sizes:
        prompts = torch.randint(2, cfg.vocab_size, (b, args.input_len), generator=gen).tolist()
        engine.generate(prompts, 2)  # warm-up: lazy inits, and the CUDA graph of this batch's bucket
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out = engine.generate(prompts, args.output_len)
        steps = max(out.decode_steps, 1)
        mem = (torch.cuda.max_memory_allocated() if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
        print(f"| {b} | {args.input_len} | {args.output_len} | {b * args.input_len / out.prefill_s:,.0f} | "
              f"{b * out.decode_steps / max(out.decode_s, 1e-9):,.0f} | {out.decode_s / steps * 1e3:.2f} | {mem:.1f} |")
    print(f"decode step: {'CUDA graph replay' if engine.cuda_graph else 'eager'}")
    return 0
