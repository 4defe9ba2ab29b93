// silu_mul_quant: x [.., M, 2N] = [gate | up] -> h = silu(gate) * up in fp32 (never rounded to bf16), quantized per
// 1 x G group exactly as quant_per_token_group quantizes: e4m3 q [.., M, N] + fp32 scales [.., M, N/G].
// The MoE down projection's input: gate and up are each read once, only the fp8 h is written (5 bytes moved per bf16
// output element instead of 4 + 2 + 2 + 1 through a bf16 h). Semantics and the shared quantizer in quant_common.cuh.
//
// Two kernels:
// * group_quant_kernel<T, G, true> (quant_common.cuh): fp16/fp32 inputs, group 64, small M, odd layouts.
// * silu_lut_kernel below: bf16, group 128, enough rows to fill the GPU (the MoE case). Why a second kernel: the
//   generic one measured 55.7 % of the copy ceiling at M=8192 N=1408 on the H200. Per element it spends ~31
//   instructions (expf 8, IEEE division 10 incl. FCHK + branch, constants re-materialised around the slow-path
//   call, quantizer ~7), and each short-lived warp loads, then computes, then stores, ~2.4 waves in near lockstep,
//   so DRAM and the ALUs mostly take turns instead of overlapping.
//
// silu_lut_kernel:
// * SiLU by table. A bf16 gate takes only 2^16 values, so silu(g) = g / (1 + expf(-g)) is looked up instead of
//   computed: each CTA fills a shared-memory table with fp8_quant::silu (the very function the generic kernel uses
//   and torch's F.silu evaluates, so bit-identical by construction; no new division algorithm) for all |g| in
//   [2^-25, 128), both signs: 8192 entries, computed while the CTA's first loads are in flight. The index comes
//   straight from the packed bf16 pair: t = w - (M0 | M0 << 16) puts each half's (bits - M0) mod 2^16 in t's
//   halves; a half is in the table iff its bits 12..14 are 0 (bit 15 is the sign), so one OR + mask over the 8 words
//   flags a lane's 16 elements, and the entry is half & 0x8FFF: positive entries at [0, 16 KiB), negative at
//   [128 KiB, 144 KiB) (a sparse 144 KiB table; the gap is never read: out-of-table elements are flagged and redone).
//   A borrow out of the low half only happens when the low half is below the table, i.e. flagged. Checked
//   exhaustively on the host for all 2^32 words (flag, entry, bounds).
//   ~4 instructions per element (LOP3 + LEA + LDS, the shared subtract and flag) instead of ~18. Hot loop in SASS:
//   ~20 instructions per element (5 of them the shared quotient), no FCHK/branch per element, 110 registers.
// * Flagged lanes (g = +-0, |g| < 2^-25, |g| >= 128, inf, NaN: rare, except the all-zero padding rows of the
//   contiguous layout) redo their 16 elements: table (re-indexed per half), +-0 -> +-0 (0 / (1 + e) for any finite
//   e > 0, which is what silu returns), anything else fp8_quant::silu itself. So every value equals silu's.
// * Persistent: one 512-thread CTA per SM (the table fills 144 KiB of shared memory). A team of 8 lanes holds one
//   1 x 128 group (16 elements per lane: two 16-byte gate and two up vectors, each vector instruction reading one
//   contiguous 128-byte line per team), a warp four consecutive groups of a row-major (batch, row, group) order. Warp
//   w takes a contiguous, balanced range of these 4-group steps (ceil(avg)/avg <= ~3 % imbalance at M=8192 N=1408)
//   and keeps two steps of loads in flight (a 3-slot register ring: 128 bytes per lane, 64 KiB per SM) while it
//   computes the third, so DRAM streams continuously. Group amax: 3 xor shuffles in the team; q: two 8-byte stores
//   per lane (64 contiguous bytes per team each); the scale by the team's lane 0.

#include "quant_common.cuh"

#include "../ops.h"

namespace dsv2 {
namespace silu_lut {

using fp8_quant::Divisor;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kGroup = 128;
constexpr int kTeamLanes = 8;                 // lanes per group: 16 elements each
constexpr int kTeams = 32 / kTeamLanes;       // groups per warp step
constexpr uint32_t kM0 = 0x3300;              // bf16 bits of 2^-25: the table's first magnitude
constexpr uint32_t kSpan = 0x1000;            // magnitudes per sign: [2^-25, 2^7)
constexpr uint32_t kNegBase = 0x8000;         // first entry of the negative half (the sign bit of bits - M0)
constexpr uint32_t kTableEntries = kNegBase + kSpan;
constexpr size_t kSmemBytes = kTableEntries * sizeof(float);  // 144 KiB
constexpr uint32_t kIndexMask = kNegBase | (kSpan - 1);  // 0x8FFF: sign + 12-bit offset
constexpr uint32_t kFlagMask = 0x70007000u;   // bits 12..14 of either half: outside [M0, M0 + span)
static_assert(kM0 + kSpan == 0x4300, "table ends at bf16 128.0");
static_assert(kSpan == 0x1000 && kIndexMask == 0x8FFFu, "index layout assumed by the masks");

struct Params {
  const __nv_bfloat16* x;  // [B, M, 2N] rows, 16-byte aligned, strides multiples of 8 elements
  uint8_t* q;              // [B, M, N] contiguous
  float* s;                // [B, M, N/128] with strides s_sb, s_sm, s_sc
  int64_t x_sb, x_sm;      // elements
  int64_t s_sb, s_sm, s_sc;
  int32_t m, width, groups;  // rows per batch, N, N / 128
  int32_t items;           // B * M * groups
  int32_t steps;           // ceil(items / kTeams)
};

// A team's current group: item = ((b * m) + row) * groups + grp, advanced by kTeams groups each warp step, with the
// row's offsets into x (elements), q (bytes) and s (floats) kept up to date so that a step's addresses are adds.
struct Cursor {
  int32_t item, b, row, grp;
  int64_t xr, qr, sr;
};

__device__ __forceinline__ Cursor make_cursor(int32_t item, const Params& p) {
  Cursor c;
  c.item = item;
  const uint32_t rows = static_cast<uint32_t>(item) / static_cast<uint32_t>(p.groups);
  c.grp = item - static_cast<int32_t>(rows) * p.groups;
  c.b = static_cast<int32_t>(rows / static_cast<uint32_t>(p.m));
  c.row = static_cast<int32_t>(rows) - c.b * p.m;
  c.xr = c.b * p.x_sb + c.row * p.x_sm;
  c.qr = static_cast<int64_t>(rows) * p.width;
  c.sr = c.b * p.s_sb + c.row * p.s_sm;
  return c;
}

__device__ __forceinline__ void advance(Cursor& c, const Params& p) {
  c.item += kTeams;
  c.grp += kTeams;
  while (c.grp >= p.groups) {  // at most once per step when groups >= 4
    c.grp -= p.groups;
    c.qr += p.width;
    if (++c.row == p.m) {
      c.row = 0, ++c.b;
      c.xr = c.b * p.x_sb, c.sr = c.b * p.s_sb;
    } else {
      c.xr += p.x_sm, c.sr += p.s_sm;
    }
  }
}

// Gate vectors (columns sub*8 .. +7 and 64 + sub*8 .. +7 of the group) and the matching up vectors. A team past
// the last group loads the first group of x instead (valid memory; cheaper than zero-filling 16 registers each step)
// and stores nothing.
__device__ __forceinline__ void load(uint4 (&v)[4], const Cursor& c, const Params& p, int sub) {
  const __nv_bfloat16* g = p.x + (c.item < p.items ? c.xr + (c.grp * kGroup + sub * 8) : sub * 8);
  const __nv_bfloat16* u = g + p.width;
  v[0] = __ldcs(reinterpret_cast<const uint4*>(g));  // read once: evict first
  v[1] = __ldcs(reinterpret_cast<const uint4*>(g + 64));
  v[2] = __ldcs(reinterpret_cast<const uint4*>(u));
  v[3] = __ldcs(reinterpret_cast<const uint4*>(u + 64));
}

// Table entries of the low and high halves of t = w - (M0 | M0 << 16): one LOP3 + one LEA (LEA.HI) each, the table
// base folded into the LEA.
__device__ __forceinline__ float lookup_lo(const float* tbl, uint32_t t) {
  uint32_t i;  // the mask in PTX: otherwise NVVM rewrites tbl[t & m] as ((t << 2) & (m << 2)) + base, one op more
  asm("and.b32 %0, %1, %2;" : "=r"(i) : "r"(t), "n"(kIndexMask));
  return tbl[i];
}
__device__ __forceinline__ float lookup_hi(const float* tbl, uint32_t t) {
  return *reinterpret_cast<const float*>(reinterpret_cast<const char*>(tbl) + ((t & (kIndexMask << 16)) >> 14));
}

// Table entry (or silu itself) for one bf16 gate, each half indexed on its own (no borrow): the slow path.
__device__ __forceinline__ bool table_index(uint32_t bits, uint32_t& idx) {
  idx = (bits - kM0) & 0xFFFFu;
  return (idx & 0x7000u) == 0;
}

__device__ __forceinline__ void fixup(const uint32_t (&gw)[8], float (&sg)[16], const float* tbl) {
  uint32_t need = 0;  // elements that are neither in the table nor +-0
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const uint32_t bits = j % 2 ? gw[j / 2] >> 16 : gw[j / 2] & 0xFFFFu;
    uint32_t idx;
    if (table_index(bits, idx)) {
      sg[j] = tbl[idx];
    } else {
      sg[j] = __uint_as_float(bits << 16);  // +-0 -> +-0, as silu gives (0 / (1 + 1) keeps the sign)
      if ((bits & 0x7FFFu) != 0) need |= 1u << j;
    }
  }
  if (need) {  // tiny, |g| >= 128, inf, NaN: the exact function, as the table was filled
#pragma unroll
    for (int j = 0; j < 16; ++j)
      if (need >> j & 1u) sg[j] = fp8_quant::silu(sg[j]);
  }
}

__device__ __forceinline__ uint32_t fp8x4(const float* v, Divisor d) {
  return fp8_quant::fp8x2(v[0], v[1], d) | (fp8_quant::fp8x2(v[2], v[3], d) << 16);
}

__device__ __forceinline__ void compute(const uint4 (&v)[4], const Cursor& c, const Params& p, const float* tbl,
                                        int sub) {
  const uint32_t gw[8] = {v[0].x, v[0].y, v[0].z, v[0].w, v[1].x, v[1].y, v[1].z, v[1].w};
  const uint32_t uw[8] = {v[2].x, v[2].y, v[2].z, v[2].w, v[3].x, v[3].y, v[3].z, v[3].w};
  uint32_t t[8], any = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    t[i] = gw[i] - kM0 * 0x10001u;  // both halves' (bits - M0) at once
    any |= t[i];
  }
  float sg[16];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    sg[2 * i] = lookup_lo(tbl, t[i]);
    sg[2 * i + 1] = lookup_hi(tbl, t[i]);
  }
  if (any & kFlagMask) fixup(gw, sg, tbl);  // some half outside the table: rare

  float h[16];
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {  // fp32 h, never rounded to bf16
    h[2 * i] = __fmul_rn(sg[2 * i], __uint_as_float(uw[i] << 16));
    h[2 * i + 1] = __fmul_rn(sg[2 * i + 1], __uint_as_float(uw[i] & 0xFFFF0000u));
    amax = fp8_quant::max_nan(amax, fp8_quant::max_nan(fabsf(h[2 * i]), fabsf(h[2 * i + 1])));
  }
#pragma unroll
  for (int o = kTeamLanes / 2; o > 0; o >>= 1)
    amax = fp8_quant::max_nan(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
  const float scale = fp8_quant::group_scale(amax);
  if (c.item < p.items) {
    const Divisor d = fp8_quant::make_divisor(scale);
    uint8_t* dst = p.q + c.qr + (c.grp * kGroup + sub * 8);
    *reinterpret_cast<uint2*>(dst) = make_uint2(fp8x4(h, d), fp8x4(h + 4, d));
    *reinterpret_cast<uint2*>(dst + 64) = make_uint2(fp8x4(h + 8, d), fp8x4(h + 12, d));
    if (sub == 0) p.s[c.sr + c.grp * p.s_sc] = scale;
  }
}

__global__ void __launch_bounds__(kThreads, 1) silu_lut_kernel(const __grid_constant__ Params p) {
  extern __shared__ float tbl[];
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
  const int lane = threadIdx.x % 32, team = lane / kTeamLanes, sub = lane % kTeamLanes;
  const int s0 = static_cast<int>(warp * static_cast<int64_t>(p.steps) / nwarps);
  const int n = static_cast<int>((warp + 1) * static_cast<int64_t>(p.steps) / nwarps) - s0;  // warp-uniform

  Cursor cc = make_cursor(s0 * kTeams + team, p), lc = cc;
  uint4 buf[3][4];
  if (n > 0) load(buf[0], lc, p, sub), advance(lc, p);
  if (n > 1) load(buf[1], lc, p, sub), advance(lc, p);

  // The table, while those loads are in flight: silu of every bf16 in +-[2^-25, 128).
  for (uint32_t i = threadIdx.x; i < 2 * kSpan; i += kThreads) {
    const uint32_t neg = i >= kSpan ? 1u : 0u, o = i - neg * kSpan;
    const uint32_t bits = kM0 + o + neg * 0x8000u;
    tbl[o + neg * kNegBase] = fp8_quant::silu(__uint_as_float(bits << 16));
  }
  __syncthreads();

  for (int k0 = 0; k0 < n; k0 += 3) {
#pragma unroll
    for (int s = 0; s < 3; ++s) {
      const int k = k0 + s;
      if (k >= n) break;
      if (k + 2 < n) load(buf[(s + 2) % 3], lc, p, sub), advance(lc, p);  // two steps ahead
      compute(buf[s], cc, p, tbl, sub);
      advance(cc, p);
    }
  }
}

struct DeviceInfo {
  int sms = 0;
  bool fits = false;  // the table fits a CTA's shared memory and the opt-in is set
};

inline const DeviceInfo& device_info(int device) {
  static DeviceInfo cached[64];
  DeviceInfo& d = cached[device];
  if (d.sms == 0) {
    const int sms = sm_count(device);
    int optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    d.fits = optin >= static_cast<int>(kSmemBytes);
    if (d.fits)
      C10_CUDA_CHECK(cudaFuncSetAttribute(silu_lut_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(kSmemBytes)));
    d.sms = sms;
  }
  return d;
}

}  // namespace silu_lut

std::tuple<at::Tensor, at::Tensor> silu_mul_quant_cuda(const at::Tensor& x, int64_t group_size,
                                                       bool column_major_scales) {
  using namespace silu_lut;
  // The table kernel takes only inputs that pass every check of group_quant and need no copy; everything else
  // (including every error) goes through the generic path unchanged.
  const bool shape_ok = x.is_cuda() && x.scalar_type() == at::kBFloat16 && group_size == kGroup &&
                        (x.dim() == 2 || x.dim() == 3) && x.size(-1) > 0 && x.size(-1) % (2 * kGroup) == 0 &&
                        x.stride(-1) == 1 && x.size(-2) > 0 && (x.dim() == 2 || x.size(0) > 0);
  if (!shape_ok || x.get_device() >= 64)
    return fp8_quant::group_quant<true>("silu_mul_quant", x, group_size, column_major_scales);
  const bool batched = x.dim() == 3;
  const int64_t batches = batched ? x.size(0) : 1, m = x.size(-2);
  const int64_t in_width = x.size(-1), width = in_width / 2, groups = width / kGroup;
  constexpr int nt = fp8_quant::rows_per_unit<__nv_bfloat16, kGroup>();
  const int64_t units = batches * ((m + nt - 1) / nt) * groups;  // group_quant's size limits, exactly
  const int64_t items = batches * m * groups;
  const int64_t x_sb = batched && batches > 1 ? x.stride(0) : 0, x_sm = m > 1 ? x.stride(-2) : 0;
  const c10::cuda::CUDAGuard guard(x.device());  // before device_info: the smem opt-in is set on the current device
  const DeviceInfo& dev = device_info(x.get_device());
  // Below ~4 groups per team of a full grid the table (built per CTA) does not pay; generic kernel there.
  const bool use_lut = m < std::numeric_limits<int32_t>::max() - 64 && width <= std::numeric_limits<int32_t>::max() &&
                       units <= std::numeric_limits<int32_t>::max() - fp8_quant::kThreads &&
                       items <= std::numeric_limits<int32_t>::max() - 2 * kThreads &&
                       aligned16(x.data_ptr()) && x_sb % 8 == 0 && x_sm % 8 == 0 && dev.fits &&
                       items >= static_cast<int64_t>(dev.sms) * kWarps * kTeams * 4;
  if (!use_lut) return fp8_quant::group_quant<true>("silu_mul_quant", x, group_size, column_major_scales);

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

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  silu_lut_kernel<<<dev.sms, kThreads, kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, s};
}

}  // namespace dsv2
