// silu_mul_quant: x [.., M, 2N] = [gate | up] -> h = silu(gate) * up in fp32 (never rounded to bf16), quantized per
// 1 x G group: e4m3 q [.., M, N] + fp32 scales [.., M, N/G], scale = max(amax, 1e-10) * fp32(1/448) as in
// quant_per_token_group. The MoE down projection's input: gate and up are each read once, only the fp8 h is written
// (5 bytes moved per output element instead of 4 + 2 + 2 + 1 through a bf16 h).
//
// Numerics (not bit-exact with the PyTorch reference; the tests state the tolerance): silu is fp8_quant::silu
// (quant_common.cuh: ex2.approx / rcp.approx, ~1e-6 relative at most for g >= -10, torch's special values), so
// scales agree with the reference to ~1e-6 relative and q may sit one e4m3 step off where h / scale lies that close
// to a rounding midpoint (~1e-5 of elements). The bf16 kernel below also quantizes as h * RN(1 / scale) instead of
// an IEEE division (at most one fp32 ulp apart: again at most one step, at midpoints only; same signed zeros, and an
// infinite scale still gives 0 for finite h and NaN for inf, as the division does).
//
// Two kernels:
// * silu_bf16_kernel below: bf16 input, group 128 (the MoE case), any M and batch, strided rows and batches read in
//   place (a view that is not 16-byte aligned is copied first).
// * group_quant_kernel<T, G, true> (quant_common.cuh): fp16/fp32 inputs and group 64 (same silu, exact quotient).
//
// silu_bf16_kernel is a pure stream (58 MB at M=8192 N=1408: 13.8 us at the 4.2 TB/s copy ceiling), so it is built
// for memory-level parallelism with few instructions per element:
// * A team of 8 lanes holds one 1 x 128 group: 16 elements per lane as two 16-byte gate and two 16-byte up vectors
//   (columns sub*8 .. +7 and 64 + sub*8 .. +7 of the group, so each vector instruction reads one contiguous 128-byte
//   line per team); a warp "step" is 4 consecutive groups of the row-major (batch, row, group) order.
// * Persistent, grid-stride: 2 CTAs of 256 threads per SM; warp w takes steps w, w + W, w + 2W, ... (W warps in the
//   grid), so the whole GPU sweeps x front to back and every warp gets the same number of steps +-1. Each warp keeps
//   a 3-slot register ring: while it computes step k, steps k+1 and k+2 are loading, i.e. 3 x 64 bytes per lane and
//   96 KB per SM outstanding at each wait (Little's law needs ~30 KB per SM at ~1 us loaded latency).
// * Per element: 2 bf16 unpacks, FMUL + MUFU.EX2 + FADD + MUFU.RCP + FMUL (silu), FMUL (* up), FMNMX (amax), FMUL
//   (* 1/scale), half an F2FP (packing included): 11 SASS instructions, plus ~5 per element of addressing, cursor
//   and control per step (115 registers, no spills). Issue and MUFU stay ~1/3 busy at the target rate. Group amax:
//   3 xor shuffles in the team; q: two 8-byte stores per lane (64 contiguous bytes per team each); the scale by the
//   team's lane 0.

#include "quant_common.cuh"

#include <algorithm>

#include "../ops.h"

namespace dsv2 {
namespace silu_bf16 {

constexpr int kThreads = 256;
constexpr int kCtasPerSm = 2;
constexpr int kWarps = kThreads / 32;
constexpr int kGroup = 128;
constexpr int kTeamLanes = 8;            // lanes per group: 16 elements each
constexpr int kTeams = 32 / kTeamLanes;  // groups per warp step
constexpr int kRing = 3;                 // register slots per lane: kRing - 1 steps ahead

struct Params {
  const __nv_bfloat16* x;  // [B, M, 2N] rows, 16-byte aligned, strides multiples of 8 elements
  uint8_t* q;              // [B, M, N] contiguous
  float* s;                // [B, M, N/128] with strides s_sb, s_sm, s_sc
  int64_t x_sb, x_sm;      // elements
  int64_t s_sb, s_sm, s_sc;
  int32_t m, width, groups;  // rows per batch, N, N / 128
  int32_t items;             // B * M * groups
  int32_t steps;             // ceil(items / kTeams)
  int32_t stride;            // groups per grid stride: kTeams * W
  int32_t d_rows, d_grp;     // the same as whole rows + groups
  int64_t dx, dq, ds;        // d_rows rows of x (elements), q (bytes), s (floats)
};

// A team's current group: item = ((b * m) + row) * groups + grp, with its row's offsets into x (elements), q (bytes)
// and s (floats).
struct Cursor {
  int32_t item, b, row, grp;
  int64_t xr, qr, sr;
};

__device__ __forceinline__ void set_offsets(Cursor& c, const Params& p) {
  c.xr = c.b * p.x_sb + c.row * p.x_sm;
  c.qr = (static_cast<int64_t>(c.b) * p.m + c.row) * p.width;
  c.sr = c.b * p.s_sb + c.row * p.s_sm;
}

__device__ __forceinline__ Cursor make_cursor(int32_t item, const Params& p) {
  Cursor c;
  c.item = item;
  const uint32_t rows = static_cast<uint32_t>(item) / static_cast<uint32_t>(p.groups);
  c.grp = item - static_cast<int32_t>(rows) * p.groups;
  c.b = static_cast<int32_t>(rows / static_cast<uint32_t>(p.m));
  c.row = static_cast<int32_t>(rows) - c.b * p.m;
  set_offsets(c, p);
  return c;
}

// One grid stride ahead: adds only (the compiler drops what a cursor does not use: x offsets of the compute cursor, q
// and s offsets of the load cursor). A division only when the stride crosses into another batch (never for 2-d
// inputs until past the end); a cursor past the last item keeps counting harmlessly (load and store check
// item < items).
__device__ __forceinline__ void advance(Cursor& c, const Params& p) {
  c.item += p.stride;
  c.grp += p.d_grp;
  c.row += p.d_rows;
  c.xr += p.dx, c.qr += p.dq, c.sr += p.ds;
  if (c.grp >= p.groups) {
    c.grp -= p.groups, ++c.row;
    c.xr += p.x_sm, c.qr += p.width, c.sr += p.s_sm;
  }
  if (c.row >= p.m) {  // q rows are global (b * m + row): qr stays right across batches
    const int32_t carry = c.row / p.m;
    c.b += carry, c.row -= carry * p.m;
    c.xr = c.b * p.x_sb + c.row * p.x_sm;
    c.sr = c.b * p.s_sb + c.row * p.s_sm;
  }
}

// Gate vectors (columns sub*8 .. +7 and 64 + sub*8 .. +7 of the group) and the matching up vectors. A team past
// the last group loads the first group of x instead (valid memory; cheaper than zero-filling 16 registers) and
// stores nothing.
__device__ __forceinline__ void load(uint4 (&v)[4], const Cursor& c, const Params& p, int sub) {
  const __nv_bfloat16* g = p.x + (c.item < p.items ? c.xr + (c.grp * kGroup + sub * 8) : sub * 8);
  const __nv_bfloat16* u = g + p.width;
  v[0] = __ldcs(reinterpret_cast<const uint4*>(g));  // read once: evict first
  v[1] = __ldcs(reinterpret_cast<const uint4*>(g + 64));
  v[2] = __ldcs(reinterpret_cast<const uint4*>(u));
  v[3] = __ldcs(reinterpret_cast<const uint4*>(u + 64));
}

// Four e4m3 codes of h * r (RN, saturated to +-448: a product can only pass 448 by a rounding error).
__device__ __forceinline__ uint32_t fp8x4(const float* h, float r) {
  const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(h[0] * r, h[1] * r), __NV_SATFINITE, __NV_E4M3);
  const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(h[2] * r, h[3] * r), __NV_SATFINITE, __NV_E4M3);
  return lo | hi << 16;
}

__device__ __forceinline__ void compute(const uint4 (&v)[4], const Cursor& c, const Params& p, int sub) {
  const uint32_t gw[8] = {v[0].x, v[0].y, v[0].z, v[0].w, v[1].x, v[1].y, v[1].z, v[1].w};
  const uint32_t uw[8] = {v[2].x, v[2].y, v[2].z, v[2].w, v[3].x, v[3].y, v[3].z, v[3].w};
  float h[16];
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {  // fp32 h, never rounded to bf16; bf16 -> fp32 is exact (the high half of a word)
    h[2 * i] = fp8_quant::silu(__uint_as_float(gw[i] << 16)) * __uint_as_float(uw[i] << 16);
    h[2 * i + 1] = fp8_quant::silu(__uint_as_float(gw[i] & 0xFFFF0000u)) * __uint_as_float(uw[i] & 0xFFFF0000u);
    amax = fp8_quant::max_nan(amax, fp8_quant::max_nan(fabsf(h[2 * i]), fabsf(h[2 * i + 1])));
  }
#pragma unroll
  for (int o = kTeamLanes / 2; o > 0; o >>= 1)
    amax = fp8_quant::max_nan(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
  const float scale = fp8_quant::group_scale(amax);
  if (c.item < p.items) {
    const float r = __frcp_rn(scale);  // 1 / inf = 0: finite h -> +-0, inf -> NaN, as h / inf
    uint8_t* dst = p.q + c.qr + (c.grp * kGroup + sub * 8);
    *reinterpret_cast<uint2*>(dst) = make_uint2(fp8x4(h, r), fp8x4(h + 4, r));
    *reinterpret_cast<uint2*>(dst + 64) = make_uint2(fp8x4(h + 8, r), fp8x4(h + 12, r));
    if (sub == 0) p.s[c.sr + c.grp * p.s_sc] = scale;
  }
}

__global__ void __launch_bounds__(kThreads, kCtasPerSm) silu_bf16_kernel(const __grid_constant__ Params p) {
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int nwarps = gridDim.x * kWarps;
  const int lane = threadIdx.x % 32, team = lane / kTeamLanes, sub = lane % kTeamLanes;
  const int n = warp < p.steps ? (p.steps - warp + nwarps - 1) / nwarps : 0;  // warp-uniform

  Cursor cc = make_cursor(warp * kTeams + team, p), lc = cc;
  uint4 buf[kRing][4];
#pragma unroll
  for (int s = 0; s < kRing - 1; ++s)
    if (s < n) load(buf[s], lc, p, sub), advance(lc, p);

  for (int k0 = 0; k0 < n; k0 += kRing) {
#pragma unroll
    for (int s = 0; s < kRing; ++s) {
      const int k = k0 + s;
      if (k >= n) break;
      if (k + kRing - 1 < n) load(buf[(s + kRing - 1) % kRing], lc, p, sub), advance(lc, p);
      compute(buf[s], cc, p, sub);
      advance(cc, p);
    }
  }
}

}  // namespace silu_bf16

std::tuple<at::Tensor, at::Tensor> silu_mul_quant_cuda(const at::Tensor& x_in, int64_t group_size,
                                                       bool column_major_scales) {
  using namespace silu_bf16;
  // The bf16 kernel takes inputs that pass every check of group_quant and are not empty; everything else
  // (including every error and the empty outputs) goes through the generic path.
  const bool shape_ok = x_in.is_cuda() && x_in.scalar_type() == at::kBFloat16 && group_size == kGroup &&
                        (x_in.dim() == 2 || x_in.dim() == 3) && x_in.size(-1) > 0 &&
                        x_in.size(-1) % (2 * kGroup) == 0 && x_in.stride(-1) == 1 && x_in.size(-2) > 0 &&
                        (x_in.dim() == 2 || x_in.size(0) > 0);
  if (!shape_ok) return fp8_quant::group_quant<true>("silu_mul_quant", x_in, group_size, column_major_scales);
  const bool batched = x_in.dim() == 3;
  const int64_t batches = batched ? x_in.size(0) : 1, m = x_in.size(-2);
  const int64_t in_width = x_in.size(-1), width = in_width / 2, groups = width / kGroup;
  const int64_t items = batches * m * groups;
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t grid = std::min<int64_t>(static_cast<int64_t>(sm_count(x_in.get_device())) * kCtasPerSm,
                                         (items + kTeams * kWarps - 1) / (kTeams * kWarps));
  const int64_t stride = grid * kWarps * kTeams;  // groups per grid stride
  // 32-bit item and row arithmetic with a few strides of headroom (beyond that: the generic kernel, 2^31 groups
  // = 1 TB of input, never in practice).
  if (items > std::numeric_limits<int32_t>::max() - 4 * stride || m > std::numeric_limits<int32_t>::max() / 2 - stride)
    return fp8_quant::group_quant<true>("silu_mul_quant", x_in, group_size, column_major_scales);

  // 16-byte vectors need 16-byte aligned rows: a rare misaligned view is copied (strides of size-1 dims unused).
  at::Tensor x = x_in;
  int64_t x_sb = batched && batches > 1 ? x.stride(0) : 0, x_sm = m > 1 ? x.stride(-2) : 0;
  if (!aligned16(x.data_ptr()) || x_sb % 8 != 0 || x_sm % 8 != 0) {
    x = x_in.clone(at::MemoryFormat::Contiguous);
    x_sb = m * in_width, x_sm = in_width;
  }

  // Outputs exactly as group_quant (and the fake impl) lays them out.
  auto [q, s, s_sb, s_sm, s_sc] = fp8_quant::quant_outputs(x, width, groups, column_major_scales);

  Params p;
  p.x = reinterpret_cast<const __nv_bfloat16*>(x.data_ptr());
  p.q = reinterpret_cast<uint8_t*>(q.data_ptr());
  p.s = s.data_ptr<float>();
  p.x_sb = x_sb, p.x_sm = x_sm;
  p.s_sb = s_sb, p.s_sm = s_sm, p.s_sc = s_sc;
  p.m = static_cast<int32_t>(m), p.width = static_cast<int32_t>(width), p.groups = static_cast<int32_t>(groups);
  p.items = static_cast<int32_t>(items);
  p.steps = static_cast<int32_t>((items + kTeams - 1) / kTeams);
  p.stride = static_cast<int32_t>(stride);
  p.d_rows = static_cast<int32_t>(stride / groups), p.d_grp = static_cast<int32_t>(stride % groups);
  p.dx = p.d_rows * x_sm, p.dq = p.d_rows * width, p.ds = p.d_rows * s_sm;

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  silu_bf16_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, s};
}

}  // namespace dsv2
