// quant_per_token_group: x [M, K] or [B, M, K] (bf16/fp16/fp32, rows at any stride) -> e4m3 q [.., M, K] contiguous
// + fp32 scales [.., M, K/G], one per 1 x G group (G = 128 or 64), row-major or column-major (the GEMMs' TMA layout).
// The kernel and its design notes are in quant_common.cuh.

#include "quant_common.cuh"

#include "../ops.h"

namespace dsv2 {

std::tuple<at::Tensor, at::Tensor> quant_per_token_group_cuda(const at::Tensor& x, int64_t group_size,
                                                              bool column_major_scales) {
  return fp8_quant::group_quant<false>("quant_per_token_group", x, group_size, column_major_scales);
}

}  // namespace dsv2
