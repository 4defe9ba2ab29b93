// fp8_grouped_gemm_masked: out[e, :c_e] = fp8_gemm(a[e, :c_e], a_scales[e, :c_e], b[e], b_scales[e]) with
// c_e = clamp(counts[e], 0, max_m), the decode-time MoE layout (A [E, max_m, K], counts on the GPU).
//
// A tiny kernel (a thread per expert) turns counts into the grouped kernel's per-group arrays (problem shape
// (c_e, N, K) and pointers into a[e], a_scales[e], b[e], out[e]), then a grouped kernel runs over the E groups.
// Groups with c_e = 0 have no tiles, and a group's tiles stop at ceil(c_e / 64) M blocks, so the work follows the
// counts without a host sync: the launch is the same for any counts, as a CUDA graph needs. Rows from c_e on are not
// written (their values are unspecified).
//
// Tiles: this layout is the decode path (a few to a few tens of rows per expert), so it runs the 64 x 128 ping-pong
// instantiation (gemm_config.cuh, Tile64), compiled here (run_grouped_gemm_64, which the contiguous layout also uses
// for small groups): a 128-row tile would double the tensor-core work of a 1-64-row group, which then costs as much as
// streaming the expert's weight. Larger counts stay correct, at somewhat lower efficiency than 128-row tiles.

#include "gemm_config.cuh"

namespace dsv2 {
namespace fp8 {
namespace {

__global__ void masked_groups_kernel(GroupArrays g, GroupCommon c, const int* __restrict__ counts, int num_experts,
                                     int max_m, int64_t a_expert_stride, int64_t sfa_expert_stride) {
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < num_experts; e += gridDim.x * blockDim.x) {
    const int m = min(max(counts[e], 0), max_m);
    write_group(g, c, e, m, e * a_expert_stride, e * sfa_expert_stride, static_cast<int64_t>(e) * max_m * c.n);
  }
}

}  // namespace

void run_grouped_gemm_64(const GroupArrays& g, int num_groups, const at::Tensor& like, cudaStream_t stream,
                         const char* op) {
  run_grouped<Tile64>(g, num_groups, like, stream, op);
}

}  // namespace fp8

at::Tensor fp8_grouped_gemm_masked_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                                        const at::Tensor& b_scales, const at::Tensor& counts) {
  using namespace fp8;
  const char* op = "fp8_grouped_gemm_masked";
  check_cuda(op, "a", a);
  check_device(op, "a_scales", a_scales, a);
  check_device(op, "b", b, a);
  check_device(op, "b_scales", b_scales, a);
  check_device(op, "counts", counts, a);
  DSV2_CHECK(a.scalar_type() == at::kFloat8_e4m3fn, op, "a", "must have dtype float8_e4m3fn, got ", a.scalar_type());
  DSV2_CHECK(a.dim() == 3, op, "a", "must have 3 dimensions, got shape ", a.sizes());
  const int64_t n = check_gemm_operands(op, a, a_scales, b, b_scales, /*batched_b=*/true);
  const int64_t num_experts = a.size(0), max_m = a.size(1), k = a.size(2);
  DSV2_CHECK(b.size(0) == num_experts, op, "b", "must hold one weight per expert of 'a' (", num_experts,
             "), got shape ", b.sizes());
  DSV2_CHECK(counts.scalar_type() == at::kInt, op, "counts", "must have dtype int32, got ", counts.scalar_type());
  DSV2_CHECK(counts.dim() == 1 && counts.size(0) == num_experts, op, "counts", "must have shape (", num_experts,
             ",), got ", counts.sizes());
  DSV2_CHECK(counts.is_contiguous(), op, "counts", "must be contiguous, got strides ", counts.strides());
  DSV2_CHECK(max_m < INT_MAX && num_experts < INT_MAX && n < INT_MAX && k < INT_MAX, op, "a",
             "is too large for the CUDA kernel: every dimension must be < 2^31, got shape ", a.sizes());

  at::Tensor out = at::empty({num_experts, max_m, n}, a.options().dtype(at::kBFloat16));
  if (num_experts == 0 || max_m == 0) return out;
  const c10::cuda::CUDAGuard guard(a.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor a2 = tma_rows(a), b2 = tma_rows(b), sa = column_major_scales(a_scales);
  const int e = static_cast<int>(num_experts);
  at::Tensor meta = at::empty({static_cast<int64_t>(GroupArrays::bytes(e, 0))}, a.options().dtype(at::kByte));
  const GroupArrays g = GroupArrays::carve(meta.data_ptr(), e, 0);
  const GroupCommon c = group_common(a2, sa, b2, b_scales, out);
  const int threads = 128, blocks = (e + threads - 1) / threads;
  masked_groups_kernel<<<blocks, threads, 0, stream>>>(g, c, counts.data_ptr<int>(), e, static_cast<int>(max_m),
                                                        a2.stride(0), sa.stride(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  run_grouped_gemm_64(g, e, a, stream, op);
  return out;
}

}  // namespace dsv2
