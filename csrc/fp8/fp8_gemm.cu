// fp8_gemm: out[M, N] (bf16) = sum over K blocks kb of (a[:, kb] @ b[:, kb].T) * a_scales[:, kb] * b_scales[n/128, kb]
// with fp32 accumulation, on CUTLASS's warp-specialized blockwise-scaled FP8 mainloop (gemm_config.cuh).
//
// Operands as the quantizers make them need no preparation: a and b are loaded by TMA in place (16-byte aligned
// rows), a_scales column-major [M, K/128] with a 16-byte multiple K-block stride are loaded by TMA in place (128
// scales of a tile in one box), b_scales [N/128, K/128] contiguous one scalar per tile and K block. Row-major a_scales
// are transposed into a column-major copy first (column_major_scales()), and misaligned a / b rows copied; both cost
// a small fraction of the GEMM and never happen with the quantizers' outputs. The M tail (M arbitrary, 1 included)
// is handled by TMA: out-of-bounds rows load as zeros and are not stored.

#include "gemm_config.cuh"

#include "../common/torch_cuda.h"

namespace dsv2 {
namespace fp8 {
namespace {

using Dense = DenseGemm<Tile128>;

// Scheduling knobs of the one dense instantiation. The raster order follows CUTLASS's heuristic (along M when there
// are more N tiles than M tiles: a wave then shares a few weight column blocks and streams A, the smaller operand at
// the shapes of interest); stream-K (CUTLASS's heuristic) splits K when there is less than a wave of tiles, or a last
// wave less than half full.
typename Dense::Kernel::TileSchedulerArguments dense_schedule(int64_t m, int64_t n) {
  typename Dense::Kernel::TileSchedulerArguments s;
  // A swizzle of 2 output tiles keeps pairs of neighbouring CTAs on a shared A (or B) block when there are enough
  // tiles for it to matter; small problems keep the plain order.
  s.max_swizzle_size = (m >= 1024 && n >= 1024) ? 2 : 1;
  return s;
}

void run_dense(const at::Tensor& out, const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
               const at::Tensor& sb, cudaStream_t stream) {
  using namespace cute;
  using Kernel = Dense::Kernel;
  const int m = static_cast<int>(a.size(0)), n = static_cast<int>(b.size(0)), k = static_cast<int>(a.size(1));
  const int64_t lda = m > 1 ? a.stride(0) : k, ldb = b.stride(0);
  typename Kernel::StrideA stride_a = make_stride(lda, Int<1>{}, lda * m);
  typename Kernel::StrideB stride_b = make_stride(ldb, Int<1>{}, ldb * n);
  typename Kernel::StrideD stride_d = make_stride(int64_t(n), Int<1>{}, int64_t(n) * m);
  typename Kernel::StrideC stride_c = stride_d;

  cutlass::KernelHardwareInfo hw;
  hw.device_id = a.get_device();
  hw.sm_count = sm_count(hw.device_id);

  typename Dense::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {m, n, k, 1},
      {reinterpret_cast<const ElementA*>(a.data_ptr()), stride_a, reinterpret_cast<const ElementB*>(b.data_ptr()),
       stride_b, sa.data_ptr<float>(), make_layout_sfa(m, k / kBlock, scales_ld(sa)), sb.data_ptr<float>(),
       make_layout_sfb(n / kBlock, k / kBlock)},
      {{}, nullptr, stride_c, reinterpret_cast<ElementD*>(out.data_ptr()), stride_d},
      hw,
      dense_schedule(m, n)};
  // CUTLASS's can_implement asks the M extent of TMA-loaded scales to be a multiple of 4 (16 bytes); the TMA unit
  // itself only needs the 16-byte stride and base we guarantee (its box of 128 scales reads zeros past row M), so the
  // check sees M rounded up while the kernel gets the true M and never reads scales past the tensor.
  typename Dense::Gemm::Arguments probe = args;
  probe.mainloop.layout_SFA = make_layout_sfa((m + 3) / 4 * 4, k / kBlock, scales_ld(sa));
  run_cutlass<Dense::Gemm>(args, probe, a, stream, "fp8_gemm");
}

}  // namespace
}  // namespace fp8

at::Tensor fp8_gemm_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                         const at::Tensor& b_scales) {
  using namespace fp8;
  const char* op = "fp8_gemm";
  check_cuda(op, "a", a);
  check_device(op, "a_scales", a_scales, a);
  check_device(op, "b", b, a);
  check_device(op, "b_scales", b_scales, a);
  DSV2_CHECK(a.scalar_type() == at::kFloat8_e4m3fn, op, "a", "must have dtype float8_e4m3fn, got ", a.scalar_type());
  DSV2_CHECK(a.dim() == 2, op, "a", "must have 2 dimensions, got shape ", a.sizes());
  const int64_t n = check_gemm_operands(op, a, a_scales, b, b_scales, /*batched_b=*/false);
  const int64_t m = a.size(0), k = a.size(1);
  DSV2_CHECK(m < INT_MAX && n < INT_MAX && k < INT_MAX, op, "a",
             "is too large for the CUDA kernel: M, N and K must be < 2^31, got shape ", a.sizes(), " and N = ", n);

  at::Tensor out = at::empty({m, n}, a.options().dtype(at::kBFloat16));
  if (m == 0) return out;
  const c10::cuda::CUDAGuard guard(a.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  run_dense(out, tma_rows(a), column_major_scales(a_scales), tma_rows(b), b_scales, stream);
  return out;
}

}  // namespace dsv2
