"""Weights: read a Hugging Face DeepSeek-V2 directory (or make random ones) and prepare them once for the model.

Accepted layouts: ``model.safetensors``, or shards listed in ``model.safetensors.index.json``; routed experts either as
on the hub (``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``) or fused as transformers 5 keeps them in memory
(``mlp.experts.gate_up_proj`` [E, 2I, H] with gate rows first, ``mlp.experts.down_proj`` [E, H, I]; a ``.weight``
suffix is accepted too). transformers 5.24's ``save_pretrained`` writes the hub layout.

Prepared per layer (``Weights.layers[i]``, a dict): ``input_norm``, ``post_norm``; ``q_proj`` or ``q_a``/``q_a_norm``/
``q_b``; ``kv_a`` [576, H], ``kv_a_norm``, ``kv_b`` [heads*256, 512] for prefill, and its split for absorbed decode:
``w_uk`` [heads, 128, 512] (q_nope -> latent) and ``w_uv_t`` [heads, 512, 128] (latent -> v); ``o_proj``. Dense layers:
``gate_up`` [2I, H], ``down``. MoE layers: ``router`` [E, H] fp32 (as transformers keeps it), ``w13`` [E, 2I, H],
``w2`` [E, H, I] (or with ``--fp8-experts`` ``w13_q``/``w13_s``/``w2_q``/``w2_s``: e4m3 and 128x128 block scales),
``shared_gate_up``, ``shared_down``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import torch
from tqdm import tqdm

from .. import fp8
from .config import CheckpointError, ModelConfig

_NORMS = ("norm.weight", "layernorm.weight")


@dataclasses.dataclass
class Weights:
    config: ModelConfig
    embed: torch.Tensor
    lm_head: torch.Tensor
    norm: torch.Tensor
    layers: list[dict]
    fp8_experts: bool = False
    experts: tuple[int, int] | None = None  # the routed experts [lo, hi) held (expert parallelism); None: all


class CheckpointSource:
    """Tensors of a safetensors checkpoint by name, each checked against the shape the config implies."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                self.file_of = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            self.file_of = None
        else:
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                  "(only safetensors checkpoints are supported)")
        files = sorted(set(self.file_of.values())) if self.file_of else ["model.safetensors"]
        self.handles = {}
        for name in files:
            full = os.path.join(path, name)
            if not os.path.isfile(full):
                raise CheckpointError(f"{path}: shard {name} listed in model.safetensors.index.json is missing")
            self.handles[name] = safe_open(full, "pt")
        if self.file_of is None:
            self.file_of = {k: "model.safetensors" for k in self.handles["model.safetensors"].keys()}

    def has(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str, shape: tuple[int, ...], rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or only its slice ``rows`` of the first dim (an expert shard: only that part is read)."""
        if name not in self.file_of:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        part = self.handles[self.file_of[name]].get_slice(name)
        if tuple(part.get_shape()) != tuple(shape):
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {tuple(part.get_shape())}, config.json "
                                  f"implies {tuple(shape)}")
        t = part[:] if rows is None else part[rows[0]: rows[1]]
        if not t.dtype.is_floating_point or t.element_size() < 2:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {t.dtype}; only bf16/fp16/fp32 "
                                  "checkpoints are supported")
        return t


class RandomSource:
    """Random weights (normal, std 0.02, as transformers initializes; norms 1), experts already fused."""

    def __init__(self, seed: int, device):
        self.device = torch.device(device)
        self.gen = torch.Generator(self.device).manual_seed(seed)

    def has(self, name: str) -> bool:
        return name.endswith("experts.gate_up_proj")

    def get(self, name: str, shape, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name.endswith(_NORMS):
            t = torch.ones(shape, device=self.device)
        else:
            t = torch.randn(shape, generator=self.gen, device=self.device).mul_(0.02)
        # A shard is cut from the whole tensor, so every world size draws the same weights.
        return t if rows is None else t[rows[0]: rows[1]].clone()


def load_weights(source, cfg: ModelConfig, *, dtype=torch.bfloat16, device="cpu", fp8_experts=False,
                 progress=True, experts: tuple[int, int] | None = None) -> Weights:
    """Read every tensor the config implies from ``source`` and prepare it (see the module docstring).

    ``experts=(lo, hi)``: keep only routed experts [lo, hi) (one rank's shard under expert parallelism, see
    ``runner.distributed.expert_shard``); only their tensors are read from a checkpoint.
    """
    if experts is not None and not 0 <= experts[0] < experts[1] <= cfg.n_routed_experts:
        raise CheckpointError(f"expert shard {list(experts)} is not a nonempty range of the {cfg.n_routed_experts} "
                              "routed experts")
    if fp8_experts and (cfg.moe_intermediate_size % 128 or cfg.hidden_size % 128):
        raise CheckpointError(f"--fp8-experts needs hidden_size and moe_intermediate_size multiples of 128, got "
                              f"{cfg.hidden_size} and {cfg.moe_intermediate_size}")

    def get(name, shape, dt=dtype, rows=None):
        return source.get(name, shape, rows).to(device=device, dtype=dt)

    hid, vocab = cfg.hidden_size, cfg.vocab_size
    embed = get("model.embed_tokens.weight", (vocab, hid))
    lm_head = embed if cfg.tie_word_embeddings else get("lm_head.weight", (vocab, hid))
    norm = get("model.norm.weight", (hid,))
    layers = []
    for i in tqdm(range(cfg.num_hidden_layers), desc="loading weights", unit="layer", disable=not progress):
        layers.append(_load_layer(source, get, cfg, f"model.layers.{i}.", i, fp8_experts, dtype, device,
                                  experts or (0, cfg.n_routed_experts)))
    return Weights(cfg, embed, lm_head, norm, layers, fp8_experts, experts)


def _load_layer(source, get, cfg: ModelConfig, p: str, i: int, fp8_experts: bool, dtype, device,
                experts: tuple[int, int]) -> dict:
    hid, heads = cfg.hidden_size, cfg.num_attention_heads
    nope, rope, v, rank = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    a = p + "self_attn."
    w = {"input_norm": get(p + "input_layernorm.weight", (hid,)),
         "post_norm": get(p + "post_attention_layernorm.weight", (hid,))}
    if cfg.q_lora_rank is None:
        w["q_proj"] = get(a + "q_proj.weight", (heads * cfg.qk_head_dim, hid))
    else:
        w["q_a"] = get(a + "q_a_proj.weight", (cfg.q_lora_rank, hid))
        w["q_a_norm"] = get(a + "q_a_layernorm.weight", (cfg.q_lora_rank,))
        w["q_b"] = get(a + "q_b_proj.weight", (heads * cfg.qk_head_dim, cfg.q_lora_rank))
    w["kv_a"] = get(a + "kv_a_proj_with_mqa.weight", (rank + rope, hid))
    w["kv_a_norm"] = get(a + "kv_a_layernorm.weight", (rank,))
    w["kv_b"] = get(a + "kv_b_proj.weight", (heads * (nope + v), rank))
    per_head = w["kv_b"].view(heads, nope + v, rank)
    w["w_uk"] = per_head[:, :nope]
    w["w_uv_t"] = per_head[:, nope:].transpose(1, 2).contiguous()
    w["o_proj"] = get(a + "o_proj.weight", (hid, heads * v))

    m = p + "mlp."
    if not cfg.is_moe(i):
        inter = cfg.intermediate_size
        w["gate_up"] = torch.cat([get(m + "gate_proj.weight", (inter, hid)), get(m + "up_proj.weight", (inter, hid))])
        w["down"] = get(m + "down_proj.weight", (hid, inter))
        return w
    n_exp, inter = cfg.n_routed_experts, cfg.moe_intermediate_size
    w["router"] = get(m + "gate.weight", (n_exp, hid), torch.float32)
    if cfg.n_shared_experts:
        s, si = m + "shared_experts.", inter * cfg.n_shared_experts
        w["shared_gate_up"] = torch.cat([get(s + "gate_proj.weight", (si, hid)), get(s + "up_proj.weight", (si, hid))])
        w["shared_down"] = get(s + "down_proj.weight", (hid, si))
    fused = next((n for n in (m + "experts.gate_up_proj", m + "experts.gate_up_proj.weight") if source.has(n)), None)
    lo, hi = experts
    if fused is not None:
        w13 = get(fused, (n_exp, 2 * inter, hid), rows=experts)
        w2 = get(fused.replace("gate_up_proj", "down_proj"), (n_exp, hid, inter), rows=experts)
    else:
        w13 = torch.empty(hi - lo, 2 * inter, hid, dtype=dtype, device=device)
        w2 = torch.empty(hi - lo, hid, inter, dtype=dtype, device=device)
        for e in range(lo, hi):
            x = f"{m}experts.{e}."
            w13[e - lo, :inter] = get(x + "gate_proj.weight", (inter, hid))
            w13[e - lo, inter:] = get(x + "up_proj.weight", (inter, hid))
            w2[e - lo] = get(x + "down_proj.weight", (hid, inter))
    if fp8_experts:
        w["w13_q"], w["w13_s"] = fp8.quant_weight_block(w13, 128)
        w["w2_q"], w["w2_s"] = fp8.quant_weight_block(w2, 128)
    else:
        w["w13"], w["w2"] = w13, w2
    return w


def random_weights(cfg: ModelConfig, *, seed=0, dtype=torch.bfloat16, device="cpu", fp8_experts=False,
                   progress=True, experts: tuple[int, int] | None = None) -> Weights:
    return load_weights(RandomSource(seed, device), cfg, dtype=dtype, device=device, fp8_experts=fp8_experts,
                        progress=progress, experts=experts)


def load_checkpoint(path: str, **kw) -> Weights:
    """``config.json`` + safetensors of ``path`` -> prepared :class:`Weights` (kwargs as :func:`load_weights`)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    cfg = ModelConfig.from_dir(path)
    return load_weights(CheckpointSource(path), cfg, **kw)


class Tokenizer:
    """``tokenizer.json`` of a model directory; adds BOS when ``tokenizer_config.json`` asks for it."""

    def __init__(self, path: str, bos_token_id: int | None):
        from tokenizers import Tokenizer as HFTokenizer

        self.tok = HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
        cfg_file = os.path.join(path, "tokenizer_config.json")
        extra = json.load(open(cfg_file)) if os.path.isfile(cfg_file) else {}
        self.bos = bos_token_id if extra.get("add_bos_token") else None

    @classmethod
    def from_dir(cls, path: str, bos_token_id: int | None):
        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            return None
        try:
            return cls(path, bos_token_id)
        except ImportError:
            warnings.warn("tokenizer.json found but the 'tokenizers' package is not installed: token ids only")
            return None

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ids if self.bos is None else [self.bos, *ids]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)
