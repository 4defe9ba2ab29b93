"""DeepSeek-V2 forward pass built from the op catalogue (every op runs as CUDA kernel or reference).

One forward handles a flat batch of T tokens from any number of sequences, in one of two modes:
  * prefill: whole prompts, varlen (``cu_seqlens``); K/V are decompressed from the new latents by ``kv_b``
    and attention is ``prefill_attention`` (q/k head 192, v head 128);
  * decode: one new token per sequence; W_UK is absorbed into the query, attention runs over the paged
    576-wide latent cache with ``decode_attention``, and W_UV maps its 512-wide latent output to the v heads.
Both write the tokens' latents into the cache with ``compress_kv``. Decode does no host sync (CUDA-graph capturable).

Matches transformers' DeepseekV2ForCausalLM, with two documented choices: RoPE is the interleaved-pair form that
transformers uses (the hub's remote code de-interleaves first; q.k is the same either way), and the router follows
the hub's rule for ``norm_topk_prob`` (normalize, no scaling) where transformers ignores that flag; both agree for
every released V2 checkpoint (``norm_topk_prob`` false).
"""

from __future__ import annotations

import dataclasses
import types

import torch
import torch.nn.functional as F

from .. import fp8, mla, moe, norm
from .weights import Weights

_OP_NAMES = {
    norm: ("rms_norm", "fused_add_rms_norm"),
    mla: ("rope_q", "compress_kv", "decode_attention", "prefill_attention"),
    moe: ("route", "dispatch_contiguous", "dispatch_masked", "combine"),
    fp8: ("silu_mul_quant", "fp8_grouped_gemm_contiguous", "fp8_grouped_gemm_masked"),
}


def catalogue_ops(dtype=torch.bfloat16) -> types.SimpleNamespace:
    """The ops the model calls, in one namespace (check mode wraps it).

    bf16 (the dtype the ops and their kernels take): the public wrappers. fp32 (the reference precision, for parity
    tests): the catalogue's references ``<op>_ref`` directly, which compute in any dtype; ``combine`` keeps fp32
    here because ``combine_ref`` rounds to bf16, the op's output dtype.
    """
    if dtype == torch.bfloat16:
        ops = {n: getattr(mod, n) for mod, names in _OP_NAMES.items() for n in names}
    else:
        ops = {n: getattr(mod, n + "_ref") for mod, names in _OP_NAMES.items() for n in names}
        ops["combine"] = _combine_keep_dtype
    return types.SimpleNamespace(layer=None, **ops)


def _combine_keep_dtype(expert_out, token_row, topk_weights, shared_out):
    flat = expert_out.reshape(-1, expert_out.shape[-1])
    weights = topk_weights * (token_row >= 0)
    out = (flat[token_row.clamp_min(0).long()] * weights.unsqueeze(-1).to(flat.dtype)).sum(1)
    return out if shared_out is None else out + shared_out


@dataclasses.dataclass
class Batch:
    """Where the T tokens of one forward sit. Prefill sets cu_seqlens/max_seqlen; decode sets block_table/seqlens."""

    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, flat cache slot to write (-1: write nothing)
    cu_seqlens: torch.Tensor | None = None  # [B+1] int32
    max_seqlen: int = 0
    block_table: torch.Tensor | None = None  # [B, max_blocks] int32
    cache_seqlens: torch.Tensor | None = None  # [B] int32, tokens in the cache including this one
    logit_rows: torch.Tensor | None = None  # rows whose logits to return (None: all)

    @property
    def decode(self) -> bool:
        return self.block_table is not None


class Model:
    def __init__(self, weights: Weights, *, max_position: int | None = None, ops=None, ep=None):
        """``ep``: a ``runner.distributed.ExpertParallel`` when the weights hold one rank's shard of the experts."""
        self.w, self.cfg = weights, weights.config
        cfg = self.cfg
        if self.dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"the model runs in bf16 (the ops' dtype) or fp32 (references), not {self.dtype}")
        if weights.experts not in (None, (0, cfg.n_routed_experts)) and ep is None:
            raise ValueError(f"the weights hold only routed experts {list(weights.experts)} of {cfg.n_routed_experts} "
                             "(an expert-parallel shard): build the Model with ep=ExpertParallel(...)")
        self.ep = ep
        device = weights.embed.device
        max_position = min(max_position or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.cos_sin = mla.rope_cos_sin_cache(cfg.qk_rope_head_dim, max_position, cfg.rope_theta,
                                              cfg.rope_scaling).to(device)
        self.softmax_scale = mla.softmax_scale(cfg.qk_head_dim, cfg.rope_scaling)
        self.ops = ops or catalogue_ops(self.dtype)

    @property
    def dtype(self):
        return self.w.embed.dtype

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, batch: Batch, cache) -> torch.Tensor:
        """ids [T] -> fp32 logits [rows, vocab] of ``batch.logit_rows`` (all T rows when None)."""
        op, eps = self.ops, self.cfg.rms_norm_eps
        h, residual = F.embedding(ids, self.w.embed), None
        for i, lw in enumerate(self.w.layers):
            op.layer = i
            if residual is None:
                x, residual = op.rms_norm(h, lw["input_norm"], eps), h
            else:
                x, residual = op.fused_add_rms_norm(h, residual, lw["input_norm"], eps)
            h = self.attention(x, lw, batch, cache.kv[i], cache.scale[i])
            x, residual = op.fused_add_rms_norm(h, residual, lw["post_norm"], eps)
            h = self.moe(x, lw, batch.decode) if self.cfg.is_moe(i) else self.mlp(x, lw["gate_up"], lw["down"])
        op.layer = None
        if batch.logit_rows is not None:
            h, residual = h[batch.logit_rows], residual[batch.logit_rows]
        h, _ = op.fused_add_rms_norm(h, residual, self.w.norm, eps)
        return (h @ self.w.lm_head.T).float()

    def attention(self, x, lw, batch: Batch, kv_cache, kv_scale):
        cfg, op = self.cfg, self.ops
        t, heads, nope = x.shape[0], cfg.num_attention_heads, cfg.qk_nope_head_dim
        if cfg.q_lora_rank is None:
            q = x @ lw["q_proj"].T
        else:
            q = op.rms_norm(x @ lw["q_a"].T, lw["q_a_norm"], cfg.rms_norm_eps) @ lw["q_b"].T
        q = q.view(t, heads, cfg.qk_head_dim)
        q_nope, q_pe = q[..., :nope], op.rope_q(q[..., nope:], batch.positions, self.cos_sin)
        c_kv, k_pe = op.compress_kv(x @ lw["kv_a"].T, lw["kv_a_norm"], cfg.rms_norm_eps, batch.positions,
                                    self.cos_sin, batch.slot_mapping, kv_cache, kv_scale, not batch.decode)
        if batch.decode:
            q_latent = torch.bmm(q_nope.transpose(0, 1), lw["w_uk"]).transpose(0, 1)  # [T, H, 512]
            q = torch.cat([q_latent, q_pe], -1).unsqueeze(1)  # [B, 1, H, 576]
            out, _ = op.decode_attention(q, kv_cache, kv_scale, batch.block_table, batch.cache_seqlens,
                                         self.softmax_scale, True)
            out = torch.bmm(out.squeeze(1).transpose(0, 1), lw["w_uv_t"]).transpose(0, 1)  # [T, H, 128]
        else:
            kv = (c_kv @ lw["kv_b"].T).view(t, heads, nope + cfg.v_head_dim)
            k = torch.cat([kv[..., :nope], k_pe.unsqueeze(1).expand(t, heads, -1)], -1)
            cu, n = batch.cu_seqlens, batch.max_seqlen
            out, _ = op.prefill_attention(torch.cat([q_nope, q_pe], -1), k, kv[..., nope:], cu, cu, n,
                                          n, self.softmax_scale, True)
        return out.reshape(t, -1) @ lw["o_proj"].T

    @staticmethod
    def mlp(x, gate_up, down):
        g, u = (x @ gate_up.T).chunk(2, -1)
        return (F.silu(g) * u) @ down.T

    @torch.inference_mode()
    def idle(self, decode: bool) -> None:
        """A forward's part on a rank with no tokens under expert parallelism: its MoE layers still receive the other
        ranks' tokens for their experts and send the results back (every rank runs each forward in lockstep)."""
        x = self.w.embed.new_empty(0, self.cfg.hidden_size)
        for i, lw in enumerate(self.w.layers):
            if self.cfg.is_moe(i):
                self.ops.layer = i
                self.moe(x, lw, decode)
        self.ops.layer = None

    def moe(self, x, lw, decode: bool):
        cfg, op = self.cfg, self.ops
        logits = x.float() @ lw["router"].T
        # The hub's V2: with norm_topk_prob the weights are normalized and not scaled; otherwise scaled.
        scale = 1.0 if cfg.norm_topk_prob else cfg.routed_scaling_factor
        ids, weights = op.route(logits, cfg.num_experts_per_tok, "softmax", cfg.topk_method, cfg.n_group,
                                cfg.topk_group, cfg.norm_topk_prob, scale, None)
        shared = self.mlp(x, lw["shared_gate_up"], lw["shared_down"]) if cfg.n_shared_experts else None
        if self.ep is not None:  # the experts live on several ranks: dispatch/combine between them
            return self.ep.moe(self, x, ids, weights, shared, lw, decode)
        n_exp, fp8_experts = cfg.n_routed_experts, self.w.fp8_experts
        if decode:  # masked layout: static shapes, no host sync
            rows, scales, counts, token_row = op.dispatch_masked(x, ids, n_exp, x.shape[0], fp8_experts)
            out = self.experts_masked(rows, scales, counts, lw)
        else:
            align = 128 if fp8_experts else 1
            rows, scales, offsets, row_expert, token_row = op.dispatch_contiguous(x, ids, n_exp, align, fp8_experts)
            out = self.experts_contiguous(rows, scales, offsets, row_expert, lw)
        return op.combine(out.to(x.dtype), token_row, weights, shared)

    def experts_masked(self, rows, scales, counts, lw):
        """The routed experts (those in ``lw``) on the masked layout [E, max_m, H] -> [E, max_m, H]."""
        op = self.ops
        if self.w.fp8_experts:
            y = op.fp8_grouped_gemm_masked(rows, scales, lw["w13_q"], lw["w13_s"], counts)
            q, s = op.silu_mul_quant(y, 128, True)
            return op.fp8_grouped_gemm_masked(q, s, lw["w2_q"], lw["w2_s"], counts)
        g, u = torch.bmm(rows, lw["w13"].transpose(1, 2)).chunk(2, -1)
        return torch.bmm(F.silu(g) * u, lw["w2"].transpose(1, 2))

    def experts_contiguous(self, rows, scales, offsets, row_expert, lw):
        """The routed experts (those in ``lw``) on the contiguous layout [R, H] -> [R, H]."""
        op = self.ops
        if self.w.fp8_experts:
            y = op.fp8_grouped_gemm_contiguous(rows, scales, lw["w13_q"], lw["w13_s"], row_expert)
            q, s = op.silu_mul_quant(y, 128, True)
            return op.fp8_grouped_gemm_contiguous(q, s, lw["w2_q"], lw["w2_s"], row_expert)
        out = torch.zeros_like(rows)
        bounds = offsets.tolist()
        for e in range(len(bounds) - 1):
            if bounds[e + 1] > bounds[e]:
                seg = slice(bounds[e], bounds[e + 1])
                out[seg] = self.mlp(rows[seg], lw["w13"][e], lw["w2"][e])
        return out
