// Interleaved-pair RoPE of the query's rope part: q_pe [T, H, 64] (bf16 or fp32, rows at any stride) -> a new
// contiguous [T, H, 64] tensor, pair i of token t rotated by cos_sin_cache[positions[t]] column i.
//
// Memory-bound elementwise op: one thread per 16-byte vector of a head row (8 bf16 = 4 pairs, or 4 fp32 = 2 pairs),
// so every load and store is 16 bytes and a warp covers 4 (bf16) or 2 (fp32) whole head rows. The position and the
// 32-byte (bf16) / 16-byte (fp32) slice of its cos/sin row are shared by all heads of a token and come from L1/L2.
// The products and sums round as the fp32 reference's (bit-equal before the final cast).

#include "../common/torch_cuda.h"

#include <cstdint>
#include <limits>

#include "../ops.h"
#include "rope_common.cuh"

namespace dsv2 {
namespace {

using namespace mla_rope;

constexpr int kThreads = 256;

struct Params {
  const void* q;   // [T, H, 64], 16-byte aligned, strides in elements (multiples of the vector width)
  int64_t s0, s1;  // token / head strides (0 where that dimension has size 1)
  void* out;       // [T, H, 64] contiguous
  const void* positions;
  int64_t pos_stride;
  const float* cos_sin;  // [max_pos, 64], 16-byte aligned
  int64_t max_pos;
  uint32_t heads;
  uint32_t items;  // T * H * vectors per head row
  bool pos64;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) rope_q_kernel(const __grid_constant__ Params p) {
  constexpr int E = 16 / sizeof(T);  // elements per thread
  constexpr int P = E / 2;           // pairs per thread
  constexpr int kPerRow = kRopeDim / E;
  const uint32_t g = blockIdx.x * kThreads + threadIdx.x;
  if (g >= p.items) return;
  const uint32_t row = g / kPerRow, chunk = g % kPerRow;
  const uint32_t t = row / p.heads, h = row - t * p.heads;

  const int64_t pos_raw =
      p.pos64 ? static_cast<int64_t>(__ldg(static_cast<const long long*>(p.positions) + t * p.pos_stride))
              : static_cast<int64_t>(__ldg(static_cast<const int*>(p.positions) + t * p.pos_stride));
  const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(static_cast<const T*>(p.q) + t * p.s0 + h * p.s1) + chunk);
  const float* cs = p.cos_sin + clamp_position(pos_raw, p.max_pos) * kRopeDim + chunk * P;
  float c[P], s[P];
  if constexpr (P == 4) {
    const float4 cv = __ldg(reinterpret_cast<const float4*>(cs));
    const float4 sv = __ldg(reinterpret_cast<const float4*>(cs + kHalf));
    c[0] = cv.x, c[1] = cv.y, c[2] = cv.z, c[3] = cv.w;
    s[0] = sv.x, s[1] = sv.y, s[2] = sv.z, s[3] = sv.w;
  } else {
    const float2 cv = __ldg(reinterpret_cast<const float2*>(cs));
    const float2 sv = __ldg(reinterpret_cast<const float2*>(cs + kHalf));
    c[0] = cv.x, c[1] = cv.y;
    s[0] = sv.x, s[1] = sv.y;
  }

  float v[E];
  if constexpr (E == 8) {
    unpack_bf16x8(raw, v);
  } else {
    v[0] = __uint_as_float(raw.x), v[1] = __uint_as_float(raw.y), v[2] = __uint_as_float(raw.z),
    v[3] = __uint_as_float(raw.w);
  }
#pragma unroll
  for (int i = 0; i < P; ++i) rotate_pair(v[2 * i], v[2 * i + 1], c[i], s[i]);
  uint4 o;
  if constexpr (E == 8) {
    o = pack_bf16x8(v);
  } else {
    o = make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
  }
  reinterpret_cast<uint4*>(p.out)[g] = o;
}

}  // namespace

at::Tensor rope_q_cuda(const at::Tensor& q_in, const at::Tensor& positions, const at::Tensor& cos_sin_cache) {
  const char* op = "rope_q";
  check_cuda(op, "q_pe", q_in);
  const bool bf16 = q_in.scalar_type() == at::kBFloat16;
  DSV2_CHECK(bf16 || q_in.scalar_type() == at::kFloat, op, "q_pe", "must have dtype bfloat16 or float32, got ",
             q_in.scalar_type());
  DSV2_CHECK(q_in.dim() == 3 && q_in.size(2) == kRopeDim, op, "q_pe", "must have shape ('*', '*', 64), got ",
             q_in.sizes());
  DSV2_CHECK(q_in.stride(2) == 1, op, "q_pe", "must have a contiguous last dimension, got strides ", q_in.strides());
  const int64_t tokens = q_in.size(0), heads = q_in.size(1);

  check_same_device(op, "positions", positions, q_in);
  DSV2_CHECK(positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong, op, "positions",
             "must have dtype int32 or int64, got ", positions.scalar_type());
  DSV2_CHECK(positions.dim() == 1 && positions.size(0) == tokens, op, "positions", "must have shape (", tokens,
             ",), got ", positions.sizes());
  check_same_device(op, "cos_sin_cache", cos_sin_cache, q_in);
  check_dtype(op, "cos_sin_cache", cos_sin_cache, at::kFloat);
  DSV2_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == kRopeDim, op, "cos_sin_cache",
             "must have shape ('*', 64), got ", cos_sin_cache.sizes());
  DSV2_CHECK(cos_sin_cache.is_contiguous(), op, "cos_sin_cache", "must be contiguous, got strides ",
             cos_sin_cache.strides());

  at::Tensor out = at::empty({tokens, heads, kRopeDim}, q_in.options());  // contiguous, as the fake impl
  if (tokens == 0 || heads == 0) return out;
  // With no row every position is out of range; the kernel (which clamps positions) needs at least one.
  DSV2_CHECK(cos_sin_cache.size(0) > 0, op, "cos_sin_cache", "has no rows, but there are ", tokens,
             " positions to look up");
  const int elems = bf16 ? 8 : 4;  // per 16-byte vector
  const int64_t items = tokens * heads * (kRopeDim / elems);
  DSV2_CHECK(items <= std::numeric_limits<uint32_t>::max() - kThreads, op, "q_pe", "has too many rows (",
             tokens * heads, ") for the CUDA kernel");

  const c10::cuda::CUDAGuard guard(q_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // 16-byte vectors need 16-byte aligned head rows; anything else (a rare view) gets an aligned copy.
  at::Tensor q = q_in;
  const int64_t s0 = tokens > 1 ? q.stride(0) : 0, s1 = heads > 1 ? q.stride(1) : 0;
  const bool vec_ok = aligned16(q) && s0 % elems == 0 && s1 % elems == 0;
  if (!vec_ok) q = q_in.clone(at::MemoryFormat::Contiguous);
  const at::Tensor cos_sin = aligned16(cos_sin_cache) ? cos_sin_cache : cos_sin_cache.clone();

  Params p;
  p.q = q.data_ptr();
  p.s0 = vec_ok ? s0 : heads * kRopeDim;
  p.s1 = vec_ok ? s1 : kRopeDim;
  p.out = out.data_ptr();
  p.positions = positions.data_ptr();
  p.pos_stride = positions.stride(0);
  p.pos64 = positions.scalar_type() == at::kLong;
  p.cos_sin = cos_sin.data_ptr<float>();
  p.max_pos = cos_sin.size(0);
  p.heads = static_cast<uint32_t>(heads);
  p.items = static_cast<uint32_t>(items);
  const unsigned blocks = static_cast<unsigned>((items + kThreads - 1) / kThreads);
  if (bf16)
    rope_q_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(p);
  else
    rope_q_kernel<float><<<blocks, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace dsv2
