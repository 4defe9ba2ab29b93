// Device helpers shared by compress_kv.cu and rope_q.cu: position clamping, bf16 packing, and the interleaved-pair
// rotation, written so each product and sum rounds exactly as the fp32 PyTorch reference does.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace dsv2 {
namespace mla_rope {

constexpr int kRopeDim = 64;
constexpr int kHalf = kRopeDim / 2;  // cos_sin_cache row: [cos (32) | sin (32)]

// A position outside the table is a caller error the value checks report; with them off it must still never read
// out of bounds, so it is clamped (a wrong rotation, not a fault). max_pos >= 1 is checked on the host.
__device__ __forceinline__ int64_t clamp_position(int64_t pos, int64_t max_pos) {
  return pos < 0 ? 0 : (pos >= max_pos ? max_pos - 1 : pos);
}

// bf16 -> fp32 is exact: the bf16 bits are the high half of the float.
__device__ __forceinline__ void unpack_bf16x8(const uint4& v, float* out) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // round to nearest even, lo in the low half
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ uint4 pack_bf16x8(const float* x) {
  return make_uint4(pack_bf16x2(x[0], x[1]), pack_bf16x2(x[2], x[3]), pack_bf16x2(x[4], x[5]),
                    pack_bf16x2(x[6], x[7]));
}

// Pair (e, o) rotated by (c, s). The _rn intrinsics keep nvcc from contracting into FMAs, so the result is bit-equal
// to the reference's separate fp32 products and sums.
__device__ __forceinline__ void rotate_pair(float& e, float& o, float c, float s) {
  const float ne = __fsub_rn(__fmul_rn(e, c), __fmul_rn(o, s));
  const float no = __fadd_rn(__fmul_rn(o, c), __fmul_rn(e, s));
  e = ne;
  o = no;
}

}  // namespace mla_rope
}  // namespace dsv2
