// The grouped FP8 block-scaled GEMM kernel of fp8_grouped_gemm_contiguous (128 x 128 cooperative tiles): one CUTLASS
// ptr-array instantiation (gemm_config.cuh) in its own translation unit, so the entry file stays quick to compile.
// The entry fills the per-group arrays on the GPU (GroupArrays: problem shapes, pointers, strides, scale layouts) and
// calls run_grouped_gemm.

#include "gemm_config.cuh"

namespace dsv2 {
namespace fp8 {

void run_grouped_gemm(const GroupArrays& g, int num_groups, const at::Tensor& like, cudaStream_t stream,
                      const char* op) {
  run_grouped<Tile128>(g, num_groups, like, stream, op);
}

}  // namespace fp8
}  // namespace dsv2
