// silu_mul_quant: x [.., M, 2N] = [gate | up] -> h = silu(gate) * up in fp32 (never rounded to bf16), quantized per
// 1 x G group exactly as quant_per_token_group quantizes: e4m3 q [.., M, N] + fp32 scales [.., M, N/G].
// The MoE down projection's input: gate and up are each read once, only the fp8 h is written (5 bytes moved per bf16
// output element instead of 4 + 2 + 2 + 1 through a bf16 h). Kernel and design notes in quant_common.cuh.

#include "quant_common.cuh"

#include "../ops.h"

namespace dsv2 {

std::tuple<at::Tensor, at::Tensor> silu_mul_quant_cuda(const at::Tensor& x, int64_t group_size,
                                                       bool column_major_scales) {
  return fp8_quant::group_quant<true>("silu_mul_quant", x, group_size, column_major_scales);
}

}  // namespace dsv2
