"""Every op of the ``dsv2_kernels`` namespace: family and schema.

This module imports nothing, so the build (setup.py, CMakeLists.txt) can read it without torch initialised and write
the ``TORCH_LIBRARY`` definitions of ``csrc/torch_bindings.cpp`` from it.
"""

# Op families, as the runner's --kernels flag names them.
FAMILIES = ("norm", "mla", "moe", "fp8")

# name -> (family, schema). Order is the order of the README's op table.
SCHEMAS: dict[str, tuple[str, str]] = {
    # ---- norm -------------------------------------------------------------------------------------------------
    "rms_norm": ("norm", "rms_norm(Tensor x, Tensor weight, float eps) -> Tensor"),
    "fused_add_rms_norm": (
        "norm",
        "fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)",
    ),
    # ---- mla --------------------------------------------------------------------------------------------------
    "compress_kv": (
        "mla",
        "compress_kv(Tensor kv_a, Tensor norm_weight, float eps, Tensor positions, Tensor cos_sin_cache, "
        "Tensor slot_mapping, Tensor(a!) kv_cache, Tensor(b!)? kv_scale, bool return_normed) -> (Tensor, Tensor)",
    ),
    "rope_q": ("mla", "rope_q(Tensor q_pe, Tensor positions, Tensor cos_sin_cache) -> Tensor"),
    "decode_attention": (
        "mla",
        "decode_attention(Tensor q, Tensor kv_cache, Tensor? kv_scale, Tensor block_table, Tensor cache_seqlens, "
        "float softmax_scale, bool causal) -> (Tensor, Tensor)",
    ),
    "prefill_attention": (
        "mla",
        "prefill_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal) -> (Tensor, Tensor)",
    ),
    "merge_attention_states": (
        "mla",
        "merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> (Tensor, Tensor)",
    ),
    # ---- moe --------------------------------------------------------------------------------------------------
    "route": (
        "moe",
        "route(Tensor logits, int top_k, str scoring, str method, int n_group, int topk_group, bool norm_topk_prob, "
        "float routed_scaling_factor, Tensor? correction_bias) -> (Tensor, Tensor)",
    ),
    "dispatch_contiguous": (
        "moe",
        "dispatch_contiguous(Tensor hidden, Tensor topk_ids, int num_experts, int alignment, bool quant_fp8) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    ),
    "dispatch_masked": (
        "moe",
        "dispatch_masked(Tensor hidden, Tensor topk_ids, int num_experts, int max_m, bool quant_fp8) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
    ),
    "combine": (
        "moe",
        "combine(Tensor expert_out, Tensor token_row, Tensor topk_weights, Tensor? shared_out) -> Tensor",
    ),
    # ---- fp8 --------------------------------------------------------------------------------------------------
    "quant_per_token_group": (
        "fp8",
        "quant_per_token_group(Tensor x, int group_size, bool column_major_scales) -> (Tensor, Tensor)",
    ),
    "quant_weight_block": ("fp8", "quant_weight_block(Tensor w, int block_size) -> (Tensor, Tensor)"),
    "silu_mul_quant": (
        "fp8",
        "silu_mul_quant(Tensor x, int group_size, bool column_major_scales) -> (Tensor, Tensor)",
    ),
    "fp8_gemm": ("fp8", "fp8_gemm(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales) -> Tensor"),
    "fp8_grouped_gemm_contiguous": (
        "fp8",
        "fp8_grouped_gemm_contiguous(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, Tensor row_expert) "
        "-> Tensor",
    ),
    "fp8_grouped_gemm_masked": (
        "fp8",
        "fp8_grouped_gemm_masked(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, Tensor counts) -> Tensor",
    ),
}


def cpp_definitions() -> str:
    """The body of the TORCH_LIBRARY block: one ``m.def(...)`` per op."""
    return "".join(f'm.def("{schema}");\n' for _, schema in SCHEMAS.values())


if __name__ == "__main__":  # used by CMakeLists.txt
    import sys

    with open(sys.argv[1], "w") as f:
        f.write(cpp_definitions())
