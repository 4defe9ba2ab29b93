// Declarations of every CUDA kernel entry point, one section per family. Registered in torch_bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace dsv2 {

// ---- norm (csrc/norm) ----
at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                           const at::Tensor& weight, double eps);

// ---- mla: decode attention (csrc/mla/decode_*.cu) ----
std::tuple<at::Tensor, at::Tensor> decode_attention_cuda(const at::Tensor& q, const at::Tensor& kv_cache,
                                                         const std::optional<at::Tensor>& kv_scale,
                                                         const at::Tensor& block_table,
                                                         const at::Tensor& cache_seqlens, double softmax_scale,
                                                         bool causal);

// ---- mla: compress_kv, rope_q (csrc/mla/compress_kv.cu, csrc/mla/rope_q.cu) ----
std::tuple<at::Tensor, at::Tensor> compress_kv_cuda(const at::Tensor& kv_a, const at::Tensor& norm_weight,
                                                    double eps, const at::Tensor& positions,
                                                    const at::Tensor& cos_sin_cache, const at::Tensor& slot_mapping,
                                                    at::Tensor& kv_cache, const std::optional<at::Tensor>& kv_scale,
                                                    bool return_normed);
at::Tensor rope_q_cuda(const at::Tensor& q_pe, const at::Tensor& positions, const at::Tensor& cos_sin_cache);

// ---- moe (csrc/moe/route.cu, dispatch.cu, combine.cu) ----
std::tuple<at::Tensor, at::Tensor> route_cuda(const at::Tensor& logits, int64_t top_k, std::string_view scoring,
                                              std::string_view method, int64_t n_group, int64_t topk_group,
                                              bool norm_topk_prob, double routed_scaling_factor,
                                              const std::optional<at::Tensor>& correction_bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_contiguous_cuda(
    const at::Tensor& hidden, const at::Tensor& topk_ids, int64_t num_experts, int64_t alignment, bool quant_fp8);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_masked_cuda(const at::Tensor& hidden,
                                                                                const at::Tensor& topk_ids,
                                                                                int64_t num_experts, int64_t max_m,
                                                                                bool quant_fp8);
at::Tensor combine_cuda(const at::Tensor& expert_out, const at::Tensor& token_row, const at::Tensor& topk_weights,
                        const std::optional<at::Tensor>& shared_out);

// ---- fp8: quantization (csrc/fp8/quant_per_token_group.cu, silu_mul_quant.cu, quant_weight_block.cu) ----
std::tuple<at::Tensor, at::Tensor> quant_per_token_group_cuda(const at::Tensor& x, int64_t group_size,
                                                              bool column_major_scales);
std::tuple<at::Tensor, at::Tensor> silu_mul_quant_cuda(const at::Tensor& x, int64_t group_size,
                                                       bool column_major_scales);
std::tuple<at::Tensor, at::Tensor> quant_weight_block_cuda(const at::Tensor& w, int64_t block_size);

// ---- fp8: block-scaled GEMMs (csrc/fp8/fp8_gemm.cu, fp8_grouped_gemm{,_contiguous,_masked}.cu) ----
at::Tensor fp8_gemm_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                         const at::Tensor& b_scales);
at::Tensor fp8_grouped_gemm_contiguous_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                                            const at::Tensor& b_scales, const at::Tensor& row_expert);
at::Tensor fp8_grouped_gemm_masked_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                                        const at::Tensor& b_scales, const at::Tensor& counts);

// ---- mla: prefill attention, merge of two attention states (csrc/mla/prefill_attention.cu, merge_attention_states.cu)
std::tuple<at::Tensor, at::Tensor> prefill_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                          const at::Tensor& cu_seqlens_q,
                                                          const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                          int64_t max_seqlen_k, double softmax_scale, bool causal);
std::tuple<at::Tensor, at::Tensor> merge_attention_states_cuda(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                               const at::Tensor& out_b, const at::Tensor& lse_b);

}  // namespace dsv2
