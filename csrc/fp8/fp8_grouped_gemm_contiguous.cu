// fp8_grouped_gemm_contiguous: row r of a [R, K] times expert row_expert[r]'s weight, for the dispatch's layout:
// each expert's rows one contiguous segment (valid rows first, then -1 padding up to a multiple of 128), experts in
// any order, absent experts allowed.
//
// The expert segments are found on the GPU by contiguous_segments.cuh (no host sync, CUDA-graph safe); the scan's
// last block writes the grouped kernel's per-group arrays: group e covers expert e's segment, trailing padding
// excluded, and a grouped kernel (128- or 64-row tiles, chosen below) runs over the E groups.
//
// Rows with row_expert -1 (or out of range) are not written: their values are unspecified. An expert whose rows are
// not one contiguous segment (not the dispatch's layout) is skipped entirely and its rows left unwritten, rather than
// computing rows that belong to other experts.
//
// This CUTLASS kernel runs with DSV2_FP8_GEMM_IMPL=cutlass, or where our own kernel (fp8_grouped_gemm_contiguous_sm90.cu,
// the default: same inputs and output) does not apply.

#include "contiguous_segments.cuh"
#include "gemm_common.cuh"

namespace dsv2 {
namespace fp8 {
namespace {

__global__ void __launch_bounds__(kScanThreads)
    contiguous_groups_kernel(GroupArrays g, GroupCommon c, const int* __restrict__ row_expert, int rows,
                             int num_experts, int* scratch) {
  find_contiguous_segments(row_expert, rows, num_experts, scratch, [&](int e, int first, int m) {
    const int64_t row0 = first;
    write_group(g, c, e, m, row0 * c.lda, row0, row0 * c.n);
  });
}

}  // namespace
}  // namespace fp8

at::Tensor fp8_grouped_gemm_contiguous_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                                            const at::Tensor& b_scales, const at::Tensor& row_expert) {
  using namespace fp8;
  const char* op = "fp8_grouped_gemm_contiguous";
  check_cuda(op, "a", a);
  check_device(op, "a_scales", a_scales, a);
  check_device(op, "b", b, a);
  check_device(op, "b_scales", b_scales, a);
  check_device(op, "row_expert", row_expert, a);
  DSV2_CHECK(a.scalar_type() == at::kFloat8_e4m3fn, op, "a", "must have dtype float8_e4m3fn, got ", a.scalar_type());
  DSV2_CHECK(a.dim() == 2, op, "a", "must have 2 dimensions, got shape ", a.sizes());
  const int64_t n = check_gemm_operands(op, a, a_scales, b, b_scales, /*batched_b=*/true);
  const int64_t rows = a.size(0), k = a.size(1), num_experts = b.size(0);
  DSV2_CHECK(row_expert.scalar_type() == at::kInt, op, "row_expert", "must have dtype int32, got ",
             row_expert.scalar_type());
  DSV2_CHECK(row_expert.dim() == 1 && row_expert.size(0) == rows, op, "row_expert", "must have shape (", rows,
             ",), got ", row_expert.sizes());
  DSV2_CHECK(row_expert.is_contiguous(), op, "row_expert", "must be contiguous, got strides ", row_expert.strides());
  DSV2_CHECK(rows < INT_MAX && num_experts < INT_MAX && n < INT_MAX && k < INT_MAX, op, "a",
             "is too large for the CUDA kernel: every dimension must be < 2^31, got shape ", a.sizes());

  at::Tensor out = at::empty({rows, n}, a.options().dtype(at::kBFloat16));
  if (rows == 0 || num_experts == 0) return out;
  const c10::cuda::CUDAGuard guard(a.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor a2 = tma_rows(a), b2 = tma_rows(b), sa = column_major_scales(a_scales);
  if (use_own_grouped_gemm() && run_grouped_contiguous_sm90(a2, sa, b2, b_scales, row_expert, out, stream)) return out;
  const int e = static_cast<int>(num_experts), r = static_cast<int>(rows);
  const size_t scratch_bytes = sizeof(int) * segment_scratch_ints(e);
  at::Tensor meta =
      at::empty({static_cast<int64_t>(GroupArrays::bytes(e, scratch_bytes))}, a.options().dtype(at::kByte));
  int* scratch = static_cast<int*>(meta.data_ptr());
  C10_CUDA_CHECK(cudaMemsetAsync(scratch, 0, scratch_bytes, stream));
  const GroupArrays g = GroupArrays::carve(meta.data_ptr(), e, scratch_bytes);
  const GroupCommon c = group_common(a2, sa, b2, b_scales, out);
  const int blocks = std::min((r + kScanThreads - 1) / kScanThreads, 2 * sm_count(a.get_device()));
  contiguous_groups_kernel<<<blocks, kScanThreads, 0, stream>>>(g, c, row_expert.data_ptr<int>(), r, e, scratch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Tile height from the rows per expert, known on the host without a sync: the dispatch bounds R by the copies
  // (T * top_k) plus at most 127 padding rows per expert, so R / E - 64 estimates the valid rows of an average expert.
  // A group of m rows computes ceil(m / 128) * 128 rows with 128-row tiles, ceil(m / 64) * 64 with 64-row ones: on
  // average 64 vs 32 rows too many. Below ~256 rows per expert that difference (V2 at 4096 tokens: ~154 rows, 256 vs
  // 192 computed) outweighs the 128-row cooperative kernel's better per-tile efficiency (about 10 %).
  if (rows / num_experts - 64 < 256)
    run_grouped_gemm_64(g, e, a, stream, op);
  else
    run_grouped_gemm(g, e, a, stream, op);
  return out;
}

}  // namespace dsv2
