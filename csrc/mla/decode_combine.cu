// Combine step of the MLA decode kernel: merges the fp32 partial outputs of sequences split across CTAs, weighting each
// split by exp(lse_split - lse), and writes the outputs of empty sequences (out 0, lse +inf). Sequences with a single
// split were written by the main kernel and are skipped. One warp per (sequence, query row); each lane owns 16 of the
// 512 columns as four float4 spaced 128 columns apart, so every load instruction of a warp reads 512 contiguous bytes.
// Latency, not bandwidth, is what this kernel costs (a few MB, mostly from L2): two dependent memory round trips per
// warp (nsplit and the slot, then the splits' lse AND the rows of their first kGroup splits together), the lse of up
// to 32 splits held one per lane. It is a programmatic dependent of the main kernel: its CTAs are placed as main CTAs
// retire and wait there (griddep_wait) for the main grid to complete.

#include "../common/torch_cuda.h"

#include "decode_common.cuh"

namespace dsv2 {
namespace mla_decode {
namespace {

constexpr int kRowsPerCta = 8;
constexpr int kGroup = 4;  // splits whose partial rows are loaded together (16 float4 per lane; 128 registers: 2 CTAs per SM)

__global__ void __launch_bounds__(kRowsPerCta * 32) decode_combine_kernel(const __grid_constant__ DecodeParams p) {
  const int b = blockIdx.x, lane = threadIdx.x & 31;
  const int r = blockIdx.y * kRowsPerCta + (threadIdx.x >> 5);
  // No global access before this (common/pdl.cuh): the schedule, the partials and this call's outputs are the main
  // kernel's (and the metadata kernel's) until their grids complete.
  griddep_wait();
  if (r >= p.rows) return;
  // L2 loads (ld.global.cg) for everything another kernel wrote: read once, nothing to keep in L1.
  const int ns = __ldcg(p.nsplit + b);
  const int slot0 = __ldcg(p.cu_partial + b);  // requested with ns: meaningful only when ns >= 2
  if (ns == 1) return;
  const int i = r / p.heads, h = r - i * p.heads;
  __nv_bfloat16* out = p.out + (static_cast<int64_t>(b) * p.rows + r) * kVDim;
  float* lse = p.lse + (static_cast<int64_t>(b) * p.heads + h) * p.s_q + i;

  float lse_total = -INFINITY;
  float acc[4][4] = {};
  if (ns >= 2) {
    const int64_t split_stride = static_cast<int64_t>(p.rows) * kVDim;
    const float* lse_part = p.lse_part + static_cast<int64_t>(slot0) * p.rows + r;
    const float4* o_part = reinterpret_cast<const float4*>(p.o_part + static_cast<int64_t>(slot0) * split_stride +
                                                           static_cast<int64_t>(r) * kVDim) + lane;
    float4 v[kGroup][4];
    auto load_group = [&](int s0) {  // the rows of splits s0 .. s0 + kGroup - 1 (those that exist)
#pragma unroll
      for (int j = 0; j < kGroup; ++j)
        if (s0 + j < ns) {
#pragma unroll
          for (int k = 0; k < 4; ++k) v[j][k] = __ldcg(o_part + (s0 + j) * (split_stride / 4) + 32 * k);
        }
    };
    load_group(0);
    // lse of split `lane` (and of lane + 32, ... beyond 32 splits, re-read when needed).
    const float l0 = lane < ns ? __ldcg(lse_part + static_cast<int64_t>(lane) * p.rows) : -INFINITY;
    float mx = l0;
    for (int s = lane + 32; s < ns; s += 32) mx = fmaxf(mx, __ldcg(lse_part + static_cast<int64_t>(s) * p.rows));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (mx != -INFINITY) {
      float sum = expf(l0 - mx);  // exp(-inf) = 0
      for (int s = lane + 32; s < ns; s += 32) sum += expf(__ldcg(lse_part + static_cast<int64_t>(s) * p.rows) - mx);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      lse_total = mx + logf(sum);
      const float w0 = expf(l0 - lse_total);  // weight of split `lane`
      for (int s0 = 0; s0 < ns; s0 += kGroup) {  // warp-uniform
        if (s0 > 0) load_group(s0);
#pragma unroll
        for (int j = 0; j < kGroup; ++j) {
          const int s = s0 + j;
          if (s >= ns) break;
          const float w = s < 32 ? __shfl_sync(0xffffffffu, w0, s)
                                 : expf(__ldcg(lse_part + static_cast<int64_t>(s) * p.rows) - lse_total);
          if (w == 0.f) continue;  // a split that saw no key for this row: its output is not used
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            acc[k][0] += w * v[j][k].x;
            acc[k][1] += w * v[j][k].y;
            acc[k][2] += w * v[j][k].z;
            acc[k][3] += w * v[j][k].w;
          }
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

void launch_decode_combine(const DecodeParams& p, bool programmatic, cudaStream_t stream) {
  const dim3 grid(p.batch, ceil_div(p.rows, kRowsPerCta));
  launch_kernel(programmatic, decode_combine_kernel, grid, dim3(kRowsPerCta * 32), 0, stream, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mla_decode
}  // namespace dsv2
