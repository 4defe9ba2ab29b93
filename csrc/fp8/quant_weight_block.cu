// quant_weight_block: w [N, K] or [E, N, K] (bf16/fp16/fp32, rows at any stride) -> e4m3 q like w (contiguous) +
// fp32 scales [(E,) ceil(N/bs), ceil(K/bs)] contiguous, one per bs x bs block (bs = 128 or 64; ragged edge blocks
// take the amax of the elements they hold). Same rounding as the per-token quantizers (quant_common.cuh).
//
// Runs once per weight at load time: one CTA per block, two passes over the block (amax, then quantize). The second
// pass re-reads the block (32 KB for bf16 128 x 128) from L1/L2, not DRAM, so DRAM sees each weight byte read once.
// Accesses are 16-byte vectors along K where K, the strides and the base allow it, single elements otherwise.

#include "quant_common.cuh"

#include "../ops.h"

namespace dsv2 {
namespace {

using namespace fp8_quant;

constexpr int kBlockThreads = 256;

struct WeightParams {
  const void* w;        // [E, N, K] rows of T
  uint8_t* q;           // [E, N, K] contiguous
  float* s;             // [E, nblocks, kblocks] contiguous
  int64_t w_se, w_sn;   // expert / row strides in elements (0 for a size-1 dimension)
  int32_t n, k;
  uint32_t kblocks;     // ceil(k / BS); blockIdx.x = nb * kblocks + kb
};

// EA: elements per access, a 16-byte vector of T or 1.
template <typename T, int BS, int EA>
__global__ void __launch_bounds__(kBlockThreads) quant_weight_block_kernel(const __grid_constant__ WeightParams p) {
  constexpr int kChunksPerRow = BS / EA;
  constexpr int kIters = BS * kChunksPerRow / kBlockThreads;
  constexpr int kUnroll = kIters < 8 ? kIters : 8;  // up to 8 independent loads in flight per thread
  static_assert(BS * kChunksPerRow % kBlockThreads == 0);
  __shared__ float warp_amax[kBlockThreads / 32];

  const uint32_t e = blockIdx.y, nb = blockIdx.x / p.kblocks, kb = blockIdx.x % p.kblocks;
  const int n0 = nb * BS, k0 = kb * BS;
  const int rows = min(BS, p.n - n0), cols = min(BS, p.k - k0);  // cols is a multiple of EA
  const T* wb = static_cast<const T*>(p.w) + e * p.w_se + n0 * p.w_sn + k0;
  uint8_t* qb = p.q + (static_cast<int64_t>(e) * p.n + n0) * p.k + k0;

  // Chunk `it` of this thread: row r, column c of the block; false where it lies outside the weight.
  auto locate = [&](int it, int& r, int& c) {
    const int i = threadIdx.x + it * kBlockThreads;
    r = i / kChunksPerRow;
    c = i % kChunksPerRow * EA;
    return r < rows && c < cols;
  };
  auto load = [&](int r, int c, float (&v)[EA], bool last_use) {
    const T* src = wb + r * p.w_sn + c;
    if constexpr (EA == 1) {
      v[0] = scalar_to_float(last_use ? __ldcs(src) : __ldg(src));
    } else {
      static_assert(EA == kVecElems<T>);
      const uint4* vsrc = reinterpret_cast<const uint4*>(src);
      to_floats<T>(last_use ? __ldcs(vsrc) : __ldg(vsrc), v);
    }
  };

  float amax = 0.f;
#pragma unroll kUnroll
  for (int it = 0; it < kIters; ++it) {
    int r, c;
    if (locate(it, r, c)) {
      float v[EA];
      load(r, c, v, false);
#pragma unroll
      for (int j = 0; j < EA; ++j) amax = max_nan(amax, fabsf(v[j]));
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = max_nan(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
  if (threadIdx.x % 32 == 0) warp_amax[threadIdx.x / 32] = amax;
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kBlockThreads / 32; ++i) amax = max_nan(amax, warp_amax[i]);
  const float scale = group_scale(amax);
  const Divisor d = make_divisor(scale);
  if (threadIdx.x == 0) p.s[(static_cast<int64_t>(e) * gridDim.x + blockIdx.x)] = scale;

#pragma unroll kUnroll
  for (int it = 0; it < kIters; ++it) {
    int r, c;
    if (locate(it, r, c)) {
      float v[EA];
      load(r, c, v, true);
      uint8_t* dst = qb + static_cast<int64_t>(r) * p.k + c;
      if constexpr (EA == 1)
        *dst = fp8x1(v[0], d);
      else
        store_fp8<EA>(dst, v, d);
    }
  }
}

template <typename T, int BS>
void launch(bool vec, dim3 grid, cudaStream_t stream, const WeightParams& p) {
  if (vec)
    quant_weight_block_kernel<T, BS, kVecElems<T>><<<grid, kBlockThreads, 0, stream>>>(p);
  else
    quant_weight_block_kernel<T, BS, 1><<<grid, kBlockThreads, 0, stream>>>(p);
}

template <typename T>
void launch(int64_t block_size, bool vec, dim3 grid, cudaStream_t stream, const WeightParams& p) {
  if (block_size == 128)
    launch<T, 128>(vec, grid, stream, p);
  else
    launch<T, 64>(vec, grid, stream, p);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quant_weight_block_cuda(const at::Tensor& w, int64_t block_size) {
  const char* op = "quant_weight_block";
  check_cuda(op, "w", w);
  const at::ScalarType dt = w.scalar_type();
  DSV2_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat, op, "w",
             "must have dtype bfloat16 or float16 or float32, got ", dt);
  DSV2_CHECK(w.dim() == 0 || w.size(-1) <= 1 || w.stride(-1) == 1, op, "w",
             "must have a contiguous last dimension, got strides ", w.strides());
  DSV2_CHECK(w.dim() == 2 || w.dim() == 3, op, "w", "must have 2 or 3 dimensions ([N, K] or [E, N, K]), got shape ",
             w.sizes());
  DSV2_CHECK(block_size == 64 || block_size == 128, op, "block_size", "must be one of (64, 128), got ", block_size);
  const bool stacked = w.dim() == 3;
  const int64_t experts = stacked ? w.size(0) : 1, n = w.size(-2), k = w.size(-1);
  const int64_t nblocks = (n + block_size - 1) / block_size, kblocks = (k + block_size - 1) / block_size;

  at::Tensor q = at::empty(w.sizes(), w.options().dtype(at::kFloat8_e4m3fn));
  std::vector<int64_t> s_sizes = {nblocks, kblocks};
  if (stacked) s_sizes.insert(s_sizes.begin(), experts);
  at::Tensor s = at::empty(s_sizes, w.options().dtype(at::kFloat));
  if (q.numel() == 0) return {q, s};
  DSV2_CHECK(experts <= 65535 && n <= std::numeric_limits<int32_t>::max() - 128 &&
                 k <= std::numeric_limits<int32_t>::max() - 128 &&
                 nblocks * kblocks <= std::numeric_limits<int32_t>::max(),
             op, "w", "is too large for the CUDA kernel: shape ", w.sizes());

  const int e = dt == at::kFloat ? 4 : 8;  // elements per 16-byte vector
  const int64_t w_se = experts > 1 ? w.stride(0) : 0, w_sn = n > 1 ? w.stride(-2) : 0;
  const bool vec = aligned16(w.data_ptr()) && k % e == 0 && w_se % e == 0 && w_sn % e == 0;

  WeightParams p;
  p.w = w.data_ptr();
  p.q = reinterpret_cast<uint8_t*>(q.data_ptr());
  p.s = s.data_ptr<float>();
  p.w_se = w_se, p.w_sn = w_sn;
  p.n = static_cast<int32_t>(n), p.k = static_cast<int32_t>(k);
  p.kblocks = static_cast<uint32_t>(kblocks);
  const dim3 grid(static_cast<unsigned>(nblocks * kblocks), static_cast<unsigned>(experts));

  const c10::cuda::CUDAGuard guard(w.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (dt == at::kBFloat16)
    launch<__nv_bfloat16>(block_size, vec, grid, stream, p);
  else if (dt == at::kHalf)
    launch<__half>(block_size, vec, grid, stream, p);
  else
    launch<float>(block_size, vec, grid, stream, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, s};
}

}  // namespace dsv2
