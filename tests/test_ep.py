"""Expert parallelism (dsv2_kernels.ep, runner.distributed) against single-process references, on CPU with gloo in
processes spawned by torch.multiprocessing (world sizes 1, 2, 4); the same checks with NCCL on >= 2 GPUs.

One spawned job per world size runs every check (process start-up dominates on CPU) and returns its measurements; the
test functions assert on them in the parent, so a failed check never leaves a rank waiting in a collective.

Tolerances:
  * dispatch: exact. Each local expert's rows (bf16, or e4m3 bytes + fp32 scales) equal, bit for bit and in order,
    that expert's rows of a single-process ``moe.dispatch_*_ref`` over all ranks' tokens concatenated rank after rank.
  * dispatch + combine (bf16): |ep - ref| <= 2^-6 * mag per element, mag = sum_j |w_j y_j| + |shared|. EP rounds each
    rank's partial sum to bf16 (<= 2^-8 |partial|: bf16 keeps 8 significant bits) and the home sum once (2^-8), the
    reference once (2^-8): at most 3 * 2^-8 * mag (measured: up to 0.5 of the bound).
  * runner, fp32 (``catalogue_ops(fp32)``: references): logits within 1e-5 of the 1-process model, relative to their
    largest magnitude (only the order of fp32 sums differs), same greedy tokens. bf16 with FP8 experts: the first
    token's logits within 2e-2 (bf16 partial sums; later bf16 tokens may diverge).
"""

import contextlib
import dataclasses
import datetime
import io
import json
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv2_kernels import ep, moe
from dsv2_kernels.fp8 import dequant_per_token_group
from dsv2_kernels.runner import PRESETS, Engine, Model, load_checkpoint, random_weights
from dsv2_kernels.runner.distributed import ExpertParallel, expert_shard
from dsv2_kernels.runner.weights import RandomSource, load_weights

E, K, H = 16, 3, 256  # experts, top-k, hidden (two 128-wide FP8 groups)
ROUTINGS = ("random", "skewed", "empty")
RUNNER_CFG = PRESETS["tiny"].replace(num_hidden_layers=3)  # 1 dense + 2 MoE layers, 16 experts top-4
PROMPT_LENS = (9, 13, 5)  # 3 prompts: with 4 ranks one rank has none and only serves its experts
NEW_TOKENS = 4


# ---- spawning ----------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, backend, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        result = {"ops": _ops_checks(rank, world, device), "runner": _runner_checks(rank, world, device),
                  "errors": _error_checks(rank, world, device)}
        if world == 2 and backend == "gloo":
            result["cli"] = _cli_output()
        if backend == "nccl":
            result["graph"] = _graph_check(rank, world, device)
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))


def _run(world, backend="gloo"):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world, _free_port(), backend, out_dir), nprocs=world, join=True)
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=(1, 2, 4), ids=lambda w: f"world{w}")
def gloo(request):
    return request.param, _run(request.param)


# ---- the EP ops: dispatch (both modes) and combine ------------------------------------------------------------------
def _inputs(world, routing, seed):
    """Every rank's (x, ids, weights, shared), drawn identically on every rank (so each can compute the reference)."""
    gen = torch.Generator().manual_seed(seed)
    num_local = E // world
    out = []
    for r in range(world):
        t = 0 if routing == "empty" and r == 0 else int(torch.randint(1, 12, (1,), generator=gen))
        x = torch.randn(t, H, generator=gen).bfloat16()
        if routing == "skewed":  # every token of every rank picks only the last rank's experts
            ids = (world - 1) * num_local + torch.rand(t, num_local, generator=gen).argsort(1)[:, :K]
        else:
            ids = torch.rand(t, E, generator=gen).argsort(1)[:, :K]
            ids[torch.rand(t, K, generator=gen) < 0.1] = -1  # some slots not routed
        w = torch.rand(t, K, generator=gen)
        shared = torch.randn(t, H, generator=gen).bfloat16()
        out.append((x, ids.int(), w, shared))
    return out


def _experts(rows, scales, expert, fp8):
    """Stand-in for the grouped GEMMs: row * (1 + e / 8) in bf16 for the row's (global) expert e; NaN on rows of no
    expert, which combine must never read."""
    v = dequant_per_token_group(rows, scales) if fp8 else rows.float()
    out = (v * (1 + expert.clamp_min(0).float() / 8)[:, None]).bfloat16()
    out[expert < 0] = float("nan")
    return out


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _ops_checks(rank, world, device):
    """For each routing, mode and payload: (dispatch layout exact, combine error / bound, tokens sent once/rank)."""
    num_local, first = E // world, rank * (E // world)
    results = {}
    for routing in ROUTINGS:
        for fp8 in (False, True):
            everyone = _inputs(world, routing, seed=len(results))
            x, ids, w, shared = (a.to(device) for a in everyone[rank])
            xs, idss, ws, shareds = (torch.cat(a) for a in zip(*everyone))  # all ranks' tokens, rank after rank
            lo = sum(len(a[0]) for a in everyone[:rank])
            mine = slice(lo, lo + len(x))
            max_tokens = max(len(a[0]) for a in everyone) + 1
            align = 128 if fp8 else 4
            copies = torch.bincount(idss[idss >= 0].long(), minlength=E)  # per expert, over all ranks
            dest = torch.where(ids >= 0, ids // num_local, -1).tolist()
            messages = sum(len(set(row) - {-1}) for row in dest)  # distinct (token, rank) pairs of this rank
            for mode in ("prefill", "decode"):
                if mode == "prefill":
                    d = ep.dispatch(x, ids, w, num_local, alignment=align, quant_fp8=fp8)
                    ref = moe.dispatch_contiguous_ref(xs, idss, E, align, fp8)
                    ref_counts, counts = ref[2].diff(), d.offsets.diff()  # padded segment sizes
                    n = copies[first: first + num_local].tolist()  # compare the copies, not the padding rows
                    segment = [(d.rows[d.offsets[l]:][: n[l]], d.scales[d.offsets[l]:][: n[l]] if fp8 else d.scales)
                               for l in range(num_local)]
                    ref_segment = [(ref[0][ref[2][e]:][: copies[e]], ref[1][ref[2][e]:][: copies[e]] if fp8 else ref[1])
                                   for e in range(first, first + num_local)]
                    y = _experts(d.rows, d.scales, torch.where(d.row_expert >= 0, d.row_expert + first, -1), fp8)
                    ref_y = _experts(ref[0], ref[1], ref[3], fp8)
                    sent_once = sum(d.send_splits) == messages
                else:
                    d = ep.dispatch_low_latency(x, ids, w, num_local, max_tokens, quant_fp8=fp8)
                    max_m = world * max_tokens
                    ref = moe.dispatch_masked_ref(xs, idss, E, max_m, fp8)
                    ref_counts, counts = ref[2], d.counts
                    segment = [(d.rows[l, : d.counts[l]], d.scales[l, : d.counts[l]] if fp8 else d.scales)
                               for l in range(num_local)]
                    ref_segment = [(ref[0][e, : ref[2][e]], ref[1][e, : ref[2][e]] if fp8 else ref[1])
                                   for e in range(first, first + num_local)]
                    valid = torch.arange(max_m, device=device) < d.counts[:, None]
                    expert = torch.where(valid, torch.arange(first, first + num_local, device=device)[:, None], -1)
                    scales = d.scales.reshape(-1, H // 128) if fp8 else d.scales
                    y = _experts(d.rows.reshape(-1, H), scales, expert.reshape(-1), fp8).view(num_local, max_m, H)
                    ref_valid = torch.arange(max_m) < ref[2][:, None]
                    ref_expert = torch.where(ref_valid, torch.arange(E)[:, None], -1).reshape(-1)
                    ref_scales = ref[1].reshape(-1, H // 128) if fp8 else ref[1]
                    ref_y = _experts(ref[0].reshape(-1, H), ref_scales, ref_expert, fp8).view(E, max_m, H)
                    sent_once = int((d.home_row >= 0).sum()) == messages
                layout = torch.equal(counts.cpu(), ref_counts[first: first + num_local].cpu()) and all(
                    torch.equal(_bits(a).cpu(), _bits(b)) and torch.equal(s.cpu(), rs)
                    for (a, s), (b, rs) in zip(segment, ref_segment))
                out = ep.combine(y, d, shared)
                ref_out = moe.combine_ref(ref_y, ref[-1], ws, shareds)[mine]
                terms = ref_y.reshape(-1, H)[ref[-1].clamp_min(0).long()].float().abs() * ws.abs()[..., None]
                mag = (terms * (ref[-1] >= 0)[..., None]).nan_to_num().sum(1) + shareds.float().abs()
                err = ((out.cpu().float() - ref_out.float()).abs() / (2**-6 * mag[mine] + 1e-30)).max().item() \
                    if len(x) else 0.0
                results[routing, fp8, mode] = {"layout": layout, "err": err, "sent_once": sent_once,
                                               "shape": tuple(out.shape) == (len(x), H)}
    return results


def _assert_ops(results):
    for rank, res in enumerate(results):
        for case, r in res["ops"].items():
            assert r["layout"], f"rank {rank} {case}: dispatched layout differs from the single-process reference"
            assert r["shape"] and r["sent_once"], f"rank {rank} {case}: {r}"
            assert r["err"] <= 1.0, f"rank {rank} {case}: combine error {r['err']:.2f} x the bound 2^-6 * mag"


def test_dispatch_combine_equal_reference(gloo):
    _assert_ops(gloo[1])


def test_low_latency_capacity_error():
    x = torch.zeros(5, H, dtype=torch.bfloat16)
    ids = torch.zeros(5, K, dtype=torch.int32)
    with pytest.raises(ValueError, match="5 tokens on this rank exceed max_tokens_per_rank=4"):
        ep.dispatch_low_latency(x, ids, torch.ones(5, K), 4, 4)


# ---- the runner -------------------------------------------------------------------------------------------------
def _prompts():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(2, RUNNER_CFG.vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _generate(model, prompts, max_batch):
    engine = Engine(model, num_blocks=64, block_size=4, max_model_len=64, max_batch=max_batch, max_prefill_tokens=12)
    return engine.generate(prompts, NEW_TOKENS, return_logits=True)


def _runner_checks(rank, world, device):
    """This rank's prompts (every world-th) through the EP model: {prompt index: (tokens, logits)} per dtype."""
    prompts, out = _prompts(), {}
    per_rank = -(-len(prompts) // world)
    mine = list(range(rank, len(prompts), world))
    for dtype, fp8 in ((torch.float32, False), (torch.bfloat16, True)):
        weights = random_weights(RUNNER_CFG, dtype=dtype, device=device, fp8_experts=fp8, progress=False,
                                 experts=expert_shard(RUNNER_CFG.n_routed_experts, rank, world))
        model = Model(weights, max_position=64, ep=ExpertParallel(weights, max_decode_tokens=per_rank))
        run = _generate(model, [prompts[i] for i in mine], per_rank)
        out[dtype] = {i: (t, l.cpu()) for i, t, l in zip(mine, run.tokens, run.logits)}
    return out


def _single_process(device="cpu"):
    """Every prompt through the whole model in this process: {dtype: {prompt index: (tokens, logits)}}."""
    out = {}
    for dtype, fp8 in ((torch.float32, False), (torch.bfloat16, True)):
        weights = random_weights(RUNNER_CFG, dtype=dtype, device=device, fp8_experts=fp8, progress=False)
        run = _generate(Model(weights, max_position=64), _prompts(), len(PROMPT_LENS))
        out[dtype] = dict(enumerate(zip(run.tokens, run.logits)))
    return out


@pytest.fixture(scope="module")
def single_process():
    return _single_process()


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_runner_ep_equals_single_process(gloo, single_process):
    _assert_runner(*gloo, single_process)


def _assert_runner(world, results, single_process):
    for dtype in (torch.float32, torch.bfloat16):
        got = {i: v for res in results for i, v in res["runner"][dtype].items()}
        assert sorted(got) == list(range(len(PROMPT_LENS)))
        for i, (tokens, logits) in got.items():
            ref_tokens, ref_logits = single_process[dtype][i]
            if dtype == torch.float32:
                assert tokens == ref_tokens, f"world {world}, prompt {i}: tokens differ"
                assert _rel(logits, ref_logits) <= 1e-5, f"world {world}, prompt {i}: {_rel(logits, ref_logits):.2e}"
            else:
                assert _rel(logits[0], ref_logits[0]) <= 2e-2, f"world {world}, prompt {i}, bf16 + FP8 experts"


def _cli_output():
    from dsv2_kernels.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["generate", "--max-new-tokens", "3", "--dtype", "fp32", "--device", "cpu"])
    return buf.getvalue()


def test_cli_generate_two_processes(gloo, capsys):
    """``torchrun --nproc-per-node 2 -m dsv2_kernels generate``: same CLI, rank 0 prints what one process prints."""
    world, results = gloo
    if world != 2:
        pytest.skip("run with 2 processes only")
    from dsv2_kernels.cli import main

    main(["generate", "--max-new-tokens", "3", "--dtype", "fp32", "--device", "cpu"])
    single = capsys.readouterr().out

    def tokens(text):
        return [line for line in text.splitlines() if line.startswith("[")]

    assert "2 processes (expert parallel)" in results[0]["cli"]
    assert tokens(results[0]["cli"]) == tokens(single) and len(tokens(single)) == 2
    assert results[1]["cli"] == ""  # only rank 0 prints


# ---- bad configurations ---------------------------------------------------------------------------------------------
def _error_checks(rank, world, device):
    """Messages of the errors bad EP configurations raise (on every rank alike, so none waits in a collective)."""
    small = RUNNER_CFG.replace(num_hidden_layers=2)
    out = {}

    def attempt(name, fn):
        try:
            fn()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)

    if world > 1:  # weights sharded for twice this world size
        shard = expert_shard(small.n_routed_experts, rank, 2 * world)
        w = random_weights(small, device=device, progress=False, experts=shard)
        attempt("wrong world", lambda: ExpertParallel(w, max_decode_tokens=4))
        # rank 1 loaded another config
        cfg = small.replace(rms_norm_eps=1e-5) if rank == 1 else small
        w = random_weights(cfg, device=device, progress=False,
                           experts=expert_shard(small.n_routed_experts, rank, world))
        attempt("config mismatch", lambda: ExpertParallel(w, max_decode_tokens=4))
    if world == 4:  # 6 experts over 4 ranks
        w = random_weights(small.replace(n_routed_experts=6, n_group=1, topk_group=1), device=device, progress=False)
        attempt("not divisible", lambda: ExpertParallel(w, max_decode_tokens=4))
    return out


def test_bad_configurations(gloo):
    world, results = gloo
    for rank, res in enumerate(results):
        errors = res["errors"]
        if world > 1:
            assert f"rank 0's weights hold routed experts [0, {16 // (2 * world)}] of 16, but with world size " \
                   f"{world} rank 0 owns [0, {16 // world}]" in errors["wrong world"]
            assert "rank 1's rms_norm_eps differ from rank 0's" in errors["config mismatch"]
        if world == 4:
            assert "n_routed_experts=6 is not divisible by world size 4" in errors["not divisible"]


def test_expert_shard_and_model_errors():
    assert expert_shard(16, 3, 4) == (12, 16)
    with pytest.raises(ValueError, match=r"n_routed_experts=16 is not divisible by world size 3 \(use one of "):
        expert_shard(16, 0, 3)
    shard = random_weights(RUNNER_CFG.replace(num_hidden_layers=2), progress=False, experts=(4, 8))
    assert shard.layers[1]["w13"].shape[0] == 4
    with pytest.raises(ValueError, match=r"hold only routed experts \[4, 8\] of 16 .* ep=ExpertParallel"):
        Model(shard)


def test_checkpoint_expert_shard_equals_slice_of_full_load(tmp_path):
    """load_checkpoint(experts=...) on both layouts (hub: per-expert tensors, only the shard's are read; fused: a
    safetensors slice read) equals that slice of the full load."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    cfg = RUNNER_CFG.replace(num_hidden_layers=2)
    src, state = RandomSource(0, "cpu"), {}

    class Recorder:  # the tensors random_weights reads, by name, in the fused layout
        def has(self, name):
            return src.has(name)

        def get(self, name, shape, rows=None):
            state[name] = src.get(name, shape).bfloat16()
            return state[name] if rows is None else state[name][rows[0]: rows[1]]

    full = load_weights(Recorder(), cfg, progress=False)
    hf = {**dataclasses.asdict(cfg), "eos_token_id": list(cfg.eos_token_ids), "model_type": "deepseek_v2"}
    hf.pop("eos_token_ids")
    for layout in ("fused", "hub"):
        path = tmp_path / layout
        path.mkdir()
        tensors = dict(state)
        if layout == "hub":
            p = "model.layers.1.mlp.experts."
            gate_up, down = tensors.pop(p + "gate_up_proj"), tensors.pop(p + "down_proj")
            for e in range(cfg.n_routed_experts):
                inter = cfg.moe_intermediate_size
                tensors[f"{p}{e}.gate_proj.weight"] = gate_up[e, :inter].clone()
                tensors[f"{p}{e}.up_proj.weight"] = gate_up[e, inter:].clone()
                tensors[f"{p}{e}.down_proj.weight"] = down[e].clone()
        safetensors_torch.save_file(tensors, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(hf))
        part = load_checkpoint(str(path), progress=False, experts=(8, 12))
        assert part.experts == (8, 12)
        for key in ("w13", "w2"):
            assert torch.equal(part.layers[1][key], full.layers[1][key][8:12]), (layout, key)
        assert torch.equal(part.layers[0]["kv_b"], full.layers[0]["kv_b"])


# ---- NCCL on GPUs -------------------------------------------------------------------------------------------------
def _graph_check(rank, world, device):
    """The low-latency dispatch + combine captured in a CUDA graph and replayed on new inputs equals eager."""
    num_local, t, max_tokens = E // world, 6, 8
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(t, H, generator=gen).bfloat16().to(device)
    ids = torch.rand(t, E, generator=gen).argsort(1)[:, :K].int().to(device)
    w = torch.rand(t, K, generator=gen).to(device)

    def step():
        d = ep.dispatch_low_latency(x, ids, w, num_local, max_tokens, quant_fp8=True)
        return ep.combine((d.rows.float() * 2).bfloat16(), d)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.copy_(torch.randn(t, H, generator=gen).bfloat16())
    ids.copy_(torch.rand(t, E, generator=gen).argsort(1)[:, :K].int())
    graph.replay()
    torch.cuda.synchronize()
    return torch.equal(captured, step())


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs >= 2 GPUs")
def test_nccl_two_gpus():
    results = _run(2, "nccl")
    _assert_ops(results)
    assert all(res["graph"] for res in results), "low-latency dispatch + combine replayed from a CUDA graph != eager"
    _assert_runner(2, results, _single_process("cuda"))  # the random weights are drawn on the GPU there
