// Combine step of the MLA decode kernel: merges the fp32 partial outputs of sequences split across CTAs, weighting each
// split by exp(lse_split - lse), and writes the outputs of empty sequences (out 0, lse +inf). Sequences with a single
// split were written by the main kernel and are skipped. One warp per (sequence, query row); each lane owns 16 of the
// 512 columns as four float4 spaced 128 columns apart, so every load instruction of a warp reads 512 contiguous bytes.

#include "../common/torch_cuda.h"

#include "decode_common.cuh"

namespace dsv2 {
namespace mla_decode {
namespace {

constexpr int kRowsPerCta = 8;

__global__ void __launch_bounds__(kRowsPerCta * 32) decode_combine_kernel(const __grid_constant__ DecodeParams p) {
  const int b = blockIdx.x, lane = threadIdx.x & 31;
  const int r = blockIdx.y * kRowsPerCta + (threadIdx.x >> 5);
  if (r >= p.rows) return;
  const int ns = p.nsplit[b];
  if (ns == 1) return;
  const int i = r / p.heads, h = r - i * p.heads;
  __nv_bfloat16* out = p.out + (static_cast<int64_t>(b) * p.rows + r) * kVDim;
  float* lse = p.lse + (static_cast<int64_t>(b) * p.heads + h) * p.s_q + i;

  float lse_total = -INFINITY;
  float acc[4][4] = {};
  if (ns >= 2) {
    const int64_t slot0 = p.cu_partial[b];
    const float* lse_part = p.lse_part + slot0 * p.rows + r;
    float mx = -INFINITY;
    for (int s = lane; s < ns; s += 32) mx = fmaxf(mx, lse_part[int64_t(s) * p.rows]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (mx != -INFINITY) {
      float sum = 0.f;
      for (int s = lane; s < ns; s += 32) sum += expf(lse_part[int64_t(s) * p.rows] - mx);  // exp(-inf) = 0
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      lse_total = mx + logf(sum);
      for (int s = 0; s < ns; ++s) {
        const float w = expf(lse_part[int64_t(s) * p.rows] - lse_total);
        if (w == 0.f) continue;  // an empty split: its output is not read
        const float4* src = reinterpret_cast<const float4*>(p.o_part + ((slot0 + s) * p.rows + r) * kVDim);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const float4 v = src[lane + 32 * k];
          acc[k][0] += w * v.x;
          acc[k][1] += w * v.y;
          acc[k][2] += w * v.z;
          acc[k][3] += w * v.w;
        }
      }
    }
  }
  // No key seen by any split (or an empty sequence): out 0 (acc is still 0), lse +inf.
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint2 v = make_uint2(pack_bf16x2(acc[k][0], acc[k][1]), pack_bf16x2(acc[k][2], acc[k][3]));
    reinterpret_cast<uint2*>(out)[lane + 32 * k] = v;
  }
  if (lane == 0) *lse = lse_total == -INFINITY ? INFINITY : lse_total;
}

}  // namespace

void launch_decode_combine(const DecodeParams& p, cudaStream_t stream) {
  const dim3 grid(p.batch, ceil_div(p.rows, kRowsPerCta));
  decode_combine_kernel<<<grid, kRowsPerCta * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mla_decode
}  // namespace dsv2
