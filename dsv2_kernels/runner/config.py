"""Model configuration: read from a Hugging Face ``config.json`` (hub or transformers-5 spelling) or a named preset.

Only what the runner implements is accepted; anything else fails at load with a :class:`CheckpointError` that names
the field, so a checkpoint never runs with silently different math.
"""

from __future__ import annotations

import dataclasses
import json
import os


class CheckpointError(ValueError):
    """A model directory the runner cannot load: missing file, missing or mis-shaped tensor, unsupported config."""


# The MLA ops are built for DeepSeek-V2's latent shape: a 512 + 64 = 576-wide cache row, 128 + 64 = 192-wide q/k heads.
MLA_DIMS = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128}


@dataclasses.dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size: int  # one routed expert (the shared experts are n_shared_experts times wider)
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int = 1
    topk_method: str = "greedy"  # or "group_limited_greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # YaRN parameters, hub spelling ("type": "yarn", "factor", ...)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dir(cls, path: str) -> "ModelConfig":
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model directory)")
        with open(file) as f:
            return cls.from_hf(json.load(f), where=file)

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json") -> "ModelConfig":
        def bad(field, value, want):
            raise CheckpointError(f"{where}: unsupported {field}={value!r} (the runner supports {want})")

        if d.get("model_type", "deepseek_v2") != "deepseek_v2":
            bad("model_type", d.get("model_type"), "'deepseek_v2'")
        for field, want in MLA_DIMS.items():
            if d.get(field, want) != want:
                bad(field, d.get(field), f"{want}, DeepSeek-V2's MLA shape")
        if d.get("hidden_act", "silu") != "silu":
            bad("hidden_act", d["hidden_act"], "'silu'")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                bad(flag, d[flag], "false")
        if d.get("moe_layer_freq", 1) != 1:
            bad("moe_layer_freq", d["moe_layer_freq"], "1")
        if d.get("scoring_func", "softmax") != "softmax":
            bad("scoring_func", d["scoring_func"], "'softmax'")
        method = d.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            bad("topk_method", method, "'greedy' or 'group_limited_greedy'")
        if not d.get("n_routed_experts"):
            bad("n_routed_experts", d.get("n_routed_experts"), "a positive number of routed experts")

        # transformers 5 writes rope_parameters (rope_type, rope_theta, ...); the hub writes rope_theta + rope_scaling.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        if kind not in ("default", "yarn"):
            bad("rope type", kind, "'default' or 'yarn'")
        scaling = {"type": "yarn", "rope_type": "yarn", **rope} if kind == "yarn" else None
        if scaling is not None and ("factor" not in scaling or "original_max_position_embeddings" not in scaling):
            bad("rope_scaling", rope, "YaRN with 'factor' and 'original_max_position_embeddings'")

        n_group = d.get("n_group") or 1
        topk_group = d.get("topk_group") or 1
        if method == "group_limited_greedy" and (d["n_routed_experts"] % n_group or topk_group > n_group):
            bad("n_group/topk_group", (n_group, topk_group), f"groups dividing {d['n_routed_experts']} experts")
        eos = d.get("eos_token_id")
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            moe_intermediate_size=d["moe_intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"], q_lora_rank=d.get("q_lora_rank"),
            n_routed_experts=d["n_routed_experts"], n_shared_experts=d.get("n_shared_experts") or 0,
            num_experts_per_tok=d["num_experts_per_tok"], first_k_dense_replace=d.get("first_k_dense_replace", 0),
            topk_method=method, n_group=n_group, topk_group=topk_group,
            routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(d.get("norm_topk_prob", False)), rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), bos_token_id=d.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        )


_YARN = {"type": "yarn", "rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}

# Named shapes for random-weight runs (bench, the embedded default). v2-lite and v2 are the released models' shapes.
PRESETS = {
    "tiny": ModelConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, q_lora_rank=128, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.0,
        rope_scaling={**_YARN, "factor": 4.0, "original_max_position_embeddings": 1024}, max_position_embeddings=4096,
        bos_token_id=0, eos_token_ids=(1,)),
    "v2-lite": ModelConfig(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, rope_scaling=_YARN, max_position_embeddings=163840, bos_token_id=100000,
        eos_token_ids=(100001,)),
    "v2": ModelConfig(
        vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536, n_routed_experts=160, n_shared_experts=2,
        num_experts_per_tok=6, topk_method="group_limited_greedy", n_group=8, topk_group=3,
        routed_scaling_factor=16.0, rope_scaling=_YARN, max_position_embeddings=163840, bos_token_id=100000,
        eos_token_ids=(100001,)),
}
