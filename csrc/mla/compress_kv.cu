// MLA KV compression in one pass: c = RMSNorm(kv_a[:, :512]) * weight, k_pe = RoPE(kv_a[:, 512:]) at positions[t],
// row [c | k_pe] written to the paged latent cache at slot_mapping[t] (bf16, or e4m3 with a per-token scale for each
// part), and optionally c / k_pe returned in bf16.
//
// Memory-bound: each token's 1152-byte kv_a row is read once and its cache row (1152 bytes, or 576 + 8) written once.
// At T = 8192 that is ~19 MB, ~4.5 us at the copy rate, so what decides the time is how early every read is in
// flight and how short the dependent chains are, not the arithmetic. Design:
//
// * One warp per token (lane l holds c vectors l and l + 32, 16 bytes = 8 values each, so each warp access covers
//   512 contiguous bytes, and k_pe pair l with its cos and sin); the sum of squares is a shuffle reduction, the
//   e4m3 amaxes one REDUX each. Warps are otherwise independent: the only CTA barrier is the one after the weight
//   (as fp32) is put in shared memory at the start, read back per token with conflict-free 16-byte loads rather than
//   held in 16 registers per lane (which would cost the occupancy below).
// * Exactly one wave: the grid is the resident capacity (4 CTAs x 8 warps per SM at <= 64 registers), and with W
//   warps in all, warp w takes tokens w, w + W, w + 2W, ... (at most 32; more waves beyond that), so at T = 8192
//   every SM has ~62 tokens and every warp 1-2. Interleaved rather than contiguous runs: at any moment the W live
//   warps work on one dense window of ~W consecutive tokens, i.e. neighbouring kv_a rows and (slots filling pages in
//   order) whole cache pages written together, which the L2 write-back and the DRAM pages serve better than W rows
//   scattered a run apart over the whole tensor.
// * Rows are staged in shared memory with cp.async (a 4-row ring per warp, 147 KB per SM): the loads do not tie up
//   registers, so a warp keeps up to 3 rows in flight while it processes one (at T = 8192 every row of the kernel
//   is requested in the first instructions of each warp). Each lane copies exactly the bytes it later reads, so the
//   ring needs no __syncwarp: cp.async.wait_group alone orders each lane's copy before its own reads, and a stage is
//   refilled only in the iteration after the one that consumed it. kv_a is read with an L2 evict-first policy
//   (read once), leaving the L2 to the cos/sin table, the indices and the cache rows just written.
// * Index loads are hoisted: lane j loads positions / slot_mapping of the warp's token j once, up front (one load
//   each, 32 sectors per warp once: negligible), already clamped / validated to 32-bit; each token then gets them
//   with a shuffle. The cos/sin row of token k + 1 is loaded (L2) while token k is processed, so the per-token chain
//   is just the row.
//   kv_a is read even for a token whose slot is skipped (padding is rare, and gating the loads would add a round
//   trip).
// * Instructions: ~190 warp instructions per token for the bf16 cache, ~310 for e4m3 (two amax reductions, the
//   exactly rounded division per value), i.e. ~30% / ~60% of the SMs' issue rate at 85% of the copy bandwidth:
//   affordable, but no room for a per-token address or index setup, hence the hoisting above.
//
// Numerics follow compress_kv_ref in fp32: x * rsqrt(mean(x^2) + eps) * w (only the summation order differs), the
// RoPE products and sums rounded separately (bit-equal), e4m3 scales max(amax, 1e-10) * fp32(1 / 448) (what the
// reference's "/ 448" computes on CUDA) and values v / scale (correctly rounded, as IEEE division) converted with
// round-to-nearest-even and saturation (the same as the reference's clamp to +-448 then cast).

#include "../common/torch_cuda.h"

#include <cuda_fp8.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>

#include "../common/vec.cuh"
#include "../ops.h"
#include "rope_common.cuh"

namespace dsv2 {
namespace {

using namespace mla_rope;

constexpr int kKvRank = 512;
constexpr int kKvDim = kKvRank + kRopeDim;  // 576
constexpr int kRowBytes = kKvDim * 2;       // one kv_a row in bf16: 1152
constexpr int kWarps = 8;                   // warps per CTA
constexpr int kThreads = kWarps * 32;
constexpr int kMinCtas = 4;      // per SM: 32 warps, <= 64 registers per thread
constexpr int kStages = 4;       // shared-memory ring per warp: 8 x 4 x 1152 = 36 KB per CTA (static, < 48 KB)
static_assert((kStages & (kStages - 1)) == 0, "stage index is a mask");
constexpr int kMaxPerWarp = 32;  // tokens per warp: one index per lane, loaded once
constexpr float kFp8Max = 448.f;
constexpr float kAmaxFloor = 1e-10f;
constexpr unsigned kFull = 0xffffffffu;

struct Params {
  const __nv_bfloat16* kv_a;  // [T, 576], rows kv_stride elements apart, 16-byte aligned
  int64_t kv_stride;
  const void* weight;  // [512] W, 16-byte aligned
  const void* positions;
  int64_t pos_stride;
  const void* slots;
  int64_t slot_stride;
  const float* cos_sin;  // [max_pos, 64]
  int64_t max_pos;
  uint8_t* cache;  // [num_slots, 576] bf16 or e4m3
  float* scale;    // [num_slots, 2] (e4m3 only)
  int64_t num_slots;
  __nv_bfloat16* c_out;  // [T, 512] (return_normed only)
  __nv_bfloat16* k_out;  // [T, 64]
  int64_t tokens;
  int64_t warps;  // warps in the grid (set at launch): warp w takes tokens w, w + warps, ...
  float eps;
  bool pos64, slot64;
};

// A token's row, as this lane holds it.
struct TokenLoads {
  uint4 c0, c1;  // c vectors lane and lane + 32 (bf16 x 8 each)
  uint32_t k;    // k_pe pair `lane` (bf16 x 2)
};

// positions / slot_mapping may be int32 or int64: a runtime flag, uniform over the grid (so the branch is free and
// the template instances do not multiply).
__device__ __forceinline__ int64_t load_index(const void* base, int64_t i, bool is64) {
  return is64 ? static_cast<int64_t>(__ldg(static_cast<const long long*>(base) + i))
              : static_cast<int64_t>(__ldg(static_cast<const int*>(base) + i));
}

// ---- cp.async (sm_80+): global -> shared without registers, completion tracked per thread in commit groups.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, uint64_t pol) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "l"(pol)
               : "memory");
}

__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, uint64_t pol) {
  asm volatile("cp.async.ca.shared.global.L2::cache_hint [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "l"(pol)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// This lane's share of a row into a stage: the same bytes it reads back in read_stage.
__device__ __forceinline__ void issue_row(uint32_t stage, const __nv_bfloat16* row, int lane, uint64_t pol) {
  const char* src = reinterpret_cast<const char*>(row);
  cp_async16(stage + 16 * lane, src + 16 * lane, pol);
  cp_async16(stage + 512 + 16 * lane, src + 512 + 16 * lane, pol);
  cp_async4(stage + 2 * kKvRank + 4 * lane, src + 2 * kKvRank + 4 * lane, pol);
}

__device__ __forceinline__ TokenLoads read_stage(const uint8_t* stage, int lane) {
  TokenLoads x;
  x.c0 = reinterpret_cast<const uint4*>(stage)[lane];
  x.c1 = reinterpret_cast<const uint4*>(stage)[32 + lane];
  x.k = reinterpret_cast<const uint32_t*>(stage + 2 * kKvRank)[lane];
  return x;
}

// The weight as fp32 in shared memory, laid out so that lane l's 16 weights (8l..8l+7 and 256+8l..256+8l+7, the
// columns of its c vectors) are the 16-byte words [i][l], i < 4: each per-token read is a conflict-free LDS.128.
// Kept out of registers (16 per lane) so the 4-CTA occupancy fits without spills.
struct WeightTable {
  float4 v[4][32];
};

template <typename W>
__device__ __forceinline__ void fill_weights(WeightTable& tab, const W* w) {
  if (threadIdx.x < 128) {
    const int i = threadIdx.x >> 5, l = threadIdx.x & 31;
    const W* src = w + (i < 2 ? 0 : 256) + 8 * l + 4 * (i & 1);
    tab.v[i][l] = make_float4(to_float(__ldg(src)), to_float(__ldg(src + 1)), to_float(__ldg(src + 2)),
                              to_float(__ldg(src + 3)));  // exact widening of any float dtype
  }
}

__device__ __forceinline__ float weight_at(const WeightTable& tab, int i, int lane) {
  // i in [0, 16): this lane's c[i].
  const float4& v = tab.v[i >> 2][lane];
  const int j = i & 3;
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

__device__ __forceinline__ uint32_t pack_e4m3x2(float a, float b) {
  return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
}

// x / scale given rcp = RN(1 / scale): q = RN(x * rcp) is within an ulp of the quotient and one FMA correction makes
// it the correctly rounded quotient (Markstein), i.e. the reference's IEEE division, in 3 instructions instead of a
// division sequence. The residual is formed as q * scale - x (exact) and subtracted so that x = -0 keeps its sign
// (-0 / scale = -0: e4m3 code 0x80, as the reference). Quotients far below the e4m3 range, where the theorem's
// no-underflow premise fails, become 0 either way.
__device__ __forceinline__ float div_by_scale(float x, float scale, float rcp) {
  const float q = __fmul_rn(x, rcp);
  const float r = __fmaf_rn(q, scale, -x);
  return __fmaf_rn(-r, rcp, q);
}

__device__ __forceinline__ uint2 quantize8(const float* x, float scale, float rcp) {
  float q[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) q[i] = div_by_scale(x[i], scale, rcp);
  return make_uint2(pack_e4m3x2(q[0], q[1]) | (pack_e4m3x2(q[2], q[3]) << 16),
                    pack_e4m3x2(q[4], q[5]) | (pack_e4m3x2(q[6], q[7]) << 16));
}

// Warp max of per-lane values that are never NaN and >= +0 (each lane's fmaxf chain starts at +0, and fmaxf drops a
// NaN operand): for such floats the order of the bit patterns as unsigned integers is the numeric order, so one
// REDUX (sm_80+) gives exactly what 5 rounds of shuffle + fmaxf give, without the 5-deep shuffle chain.
__device__ __forceinline__ float warp_max_nonneg(float v) {
  return __uint_as_float(__reduce_max_sync(kFull, __float_as_uint(v)));
}

// One token: its row, this lane's cos/sin, its slot (already validated: -1 = skip).
template <bool kFp8, bool kNormed>
__device__ __forceinline__ void process_token(const Params& p, const TokenLoads& x, const WeightTable& wt, float cosv,
                                              float sinv, int slot, int64_t t, int lane) {
  // c: RMSNorm in fp32, (x * inv) * w as the reference orders it.
  float c[16];
  unpack_bf16x8(x.c0, c);
  unpack_bf16x8(x.c1, c + 8);
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < 16; ++i) ss = fmaf(c[i], c[i], ss);
  const float inv = rsqrtf(warp_sum(ss) / kKvRank + p.eps);
#pragma unroll
  for (int i = 0; i < 16; ++i) c[i] = c[i] * inv * weight_at(wt, i, lane);

  // k_pe: this lane's pair.
  float ke = __uint_as_float(x.k << 16), ko = __uint_as_float(x.k & 0xFFFF0000u);
  rotate_pair(ke, ko, cosv, sinv);

  if constexpr (kNormed) {
    uint4* co = reinterpret_cast<uint4*>(p.c_out + t * kKvRank);
    co[lane] = pack_bf16x8(c);
    co[32 + lane] = pack_bf16x8(c + 8);
    reinterpret_cast<uint32_t*>(p.k_out + t * kRopeDim)[lane] = pack_bf16x2(ke, ko);
  }
  if (slot < 0) return;  // padding, or (value checks off) past the cache: uniform across the warp
  if constexpr (!kFp8) {
    __nv_bfloat16* dst = reinterpret_cast<__nv_bfloat16*>(p.cache) + static_cast<int64_t>(slot) * kKvDim;
    reinterpret_cast<uint4*>(dst)[lane] = pack_bf16x8(c);
    reinterpret_cast<uint4*>(dst)[32 + lane] = pack_bf16x8(c + 8);
    reinterpret_cast<uint32_t*>(dst + kKvRank)[lane] = pack_bf16x2(ke, ko);
  } else {
    float amax_c = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) amax_c = fmaxf(amax_c, fabsf(c[i]));
    amax_c = warp_max_nonneg(amax_c);
    // Starting from +0 as amax_c does: a lane whose pair is all NaN contributes 0 rather than NaN. The shuffle
    // version let such a lane's NaN through only when every lane had one, and then fmaxf(NaN, floor) below gave the
    // floor, which is what 0 gives too.
    const float amax_k = warp_max_nonneg(fmaxf(fmaxf(0.f, fabsf(ke)), fabsf(ko)));
    // PyTorch's CUDA division by a Python scalar multiplies by its fp32 reciprocal: do the same, bit for bit.
    const float c_scale = fmaxf(amax_c, kAmaxFloor) * (1.f / kFp8Max);
    const float k_scale = fmaxf(amax_k, kAmaxFloor) * (1.f / kFp8Max);
    const float c_rcp = __frcp_rn(c_scale), k_rcp = __frcp_rn(k_scale);
    uint8_t* dst = p.cache + static_cast<int64_t>(slot) * kKvDim;
    reinterpret_cast<uint2*>(dst)[lane] = quantize8(c, c_scale, c_rcp);
    reinterpret_cast<uint2*>(dst)[32 + lane] = quantize8(c + 8, c_scale, c_rcp);
    reinterpret_cast<uint16_t*>(dst + kKvRank)[lane] =
        static_cast<uint16_t>(pack_e4m3x2(div_by_scale(ke, k_scale, k_rcp), div_by_scale(ko, k_scale, k_rcp)));
    if (lane < 2) p.scale[static_cast<int64_t>(slot) * 2 + lane] = lane == 0 ? c_scale : k_scale;
  }
}

// Each warp processes its n (<= 32) tokens (p.warps apart) in order. Row i goes to stage i % kStages; before token k is
// processed, row k + kStages - 1 is requested (into the stage token k - 1 used, whose values are consumed by now),
// so kStages - 1 rows are in flight behind the one being processed. One commit group per row (empty groups past the
// warp's last row keep the count uniform), so wait_group<kStages - 1> at token k means rows 0..k have landed.
template <typename W, bool kFp8, bool kNormed>
__global__ void __launch_bounds__(kThreads, kMinCtas) compress_kv_kernel(const __grid_constant__ Params p) {
  __shared__ __align__(16) uint8_t ring[kWarps][kStages][kRowBytes];
  __shared__ WeightTable wt;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  // Tokens gw + k * p.warps for k < n (n <= 32: set at launch); 0 for trailing warps of the last CTA.
  // 32-bit division: tokens < 2^31 (checked on the host).
  const int n = gw < p.tokens ? static_cast<int>(static_cast<uint32_t>(p.tokens - 1 - gw) /
                                                 static_cast<uint32_t>(p.warps)) + 1
                              : 0;
  const __nv_bfloat16* rows = p.kv_a + gw * p.kv_stride;
  const int64_t row_step = p.warps * p.kv_stride;  // elements from one of this warp's rows to the next
  const uint64_t pol = l2_evict_first_policy();
  uint8_t(*const stages)[kRowBytes] = ring[warp];

  // Everything that does not depend on a load first: the first kStages - 1 rows ...
  int issued = 0;
  auto issue_next = [&] {
    if (issued < n) {
      const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(stages[issued & (kStages - 1)]));
      issue_row(dst, rows + issued * row_step, lane, pol);
    }
    cp_async_commit();
    ++issued;
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue_next();

  // ... then the indices (lane j: token j), the first cos/sin row once its position is in, and the weights.
  // Positions are clamped and slots validated here, so each fits 32 bits (a table or cache of 2^31 rows would not
  // fit in memory) and the per-token shuffles are single.
  int pos = 0, slot = -1;
  if (lane < n) {
    const int64_t t = gw + lane * p.warps;
    pos = static_cast<int>(clamp_position(load_index(p.positions, t * p.pos_stride, p.pos64), p.max_pos));
    // Slots past the cache are caller errors the value checks report; with them off, skip rather than write out of
    // bounds.
    const int64_t s = load_index(p.slots, t * p.slot_stride, p.slot64);
    slot = s < 0 || s >= p.num_slots ? -1 : static_cast<int>(s);
  }
  const float* cs = p.cos_sin + static_cast<int64_t>(__shfl_sync(kFull, pos, 0)) * kRopeDim;
  float cosv = __ldg(cs + lane), sinv = __ldg(cs + kHalf + lane);
  fill_weights(wt, static_cast<const W*>(p.weight));
  __syncthreads();  // the only CTA barrier; every warp reaches it (the row loads are already in flight)
  if (n == 0) return;  // whole warps: the shuffles see all 32 lanes

#pragma unroll 1
  for (int k = 0; k < n; ++k) {
    issue_next();  // row k + kStages - 1
    // Token k + 1's cos/sin, a full token ahead of its use.
    const int pos_next = __shfl_sync(kFull, pos, (k + 1) & 31);
    float cos_next = 0.f, sin_next = 0.f;
    if (k + 1 < n) {
      const float* cn = p.cos_sin + static_cast<int64_t>(pos_next) * kRopeDim;
      cos_next = __ldg(cn + lane);
      sin_next = __ldg(cn + kHalf + lane);
    }
    const int slot_k = __shfl_sync(kFull, slot, k);
    cp_async_wait<kStages - 1>();  // row k has landed (this lane's part, which is all it reads)
    const TokenLoads x = read_stage(stages[k & (kStages - 1)], lane);
    process_token<kFp8, kNormed>(p, x, wt, cosv, sinv, slot_k, gw + k * p.warps, lane);
    cosv = cos_next;
    sinv = sin_next;
  }
}

template <typename W, bool kFp8, bool kNormed>
void launch_kernel(const Params& p, int device, cudaStream_t stream) {
  const auto kernel = compress_kv_kernel<W, kFp8, kNormed>;
  // CTAs resident per SM (per device: the carveout preference is a per-context attribute). Ask for the largest
  // shared-memory carveout so 4 CTAs' rings (147 KB) fit next to each other.
  static int cached[64] = {};
  const int dev = device >= 0 && device < 64 ? device : 0;
  if (cached[dev] == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                        cudaSharedmemCarveoutMaxShared));
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0));
    cached[dev] = std::max(n, 1);
  }
  // One wave of resident warps, warp w taking every warps-th token from w (T / warps of them, +1 for the first
  // T % warps), so all warps finish together; past 32 tokens per warp, whole extra waves of equal size. Below one
  // warp per token, one token per warp (the trailing warps of the last CTA get none).
  const int64_t resident = static_cast<int64_t>(cached[dev]) * sm_count(device) * kWarps;
  const int64_t waves = (p.tokens + kMaxPerWarp * resident - 1) / (kMaxPerWarp * resident);
  const int64_t want = std::min(p.tokens, resident * waves);
  const int64_t blocks = (want + kWarps - 1) / kWarps;
  const int64_t warps = blocks * kWarps;
  Params q = p;
  q.warps = warps;  // ceil(T / warps) <= 32: warps >= T / 32, or warps >= T
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(q);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename W>
void launch(const Params& p, bool fp8, int device, cudaStream_t stream) {
  const bool normed = p.c_out != nullptr;
  if (fp8)
    normed ? launch_kernel<W, true, true>(p, device, stream) : launch_kernel<W, true, false>(p, device, stream);
  else
    normed ? launch_kernel<W, false, true>(p, device, stream) : launch_kernel<W, false, false>(p, device, stream);
}

void check_index_tensor(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref, int64_t n) {
  check_same_device(op, arg, t, ref);
  DSV2_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, arg,
             "must have dtype int32 or int64, got ", t.scalar_type());
  DSV2_CHECK(t.dim() == 1 && t.size(0) == n, op, arg, "must have shape (", n, ",), got ", t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> compress_kv_cuda(const at::Tensor& kv_a_in, const at::Tensor& norm_weight,
                                                    double eps, const at::Tensor& positions,
                                                    const at::Tensor& cos_sin_cache, const at::Tensor& slot_mapping,
                                                    at::Tensor& kv_cache, const std::optional<at::Tensor>& kv_scale,
                                                    bool return_normed) {
  const char* op = "compress_kv";
  check_cuda(op, "kv_a", kv_a_in);
  check_dtype(op, "kv_a", kv_a_in, at::kBFloat16);
  DSV2_CHECK(kv_a_in.dim() == 2 && kv_a_in.size(1) == kKvDim, op, "kv_a", "must have shape ('*', 576), got ",
             kv_a_in.sizes());
  DSV2_CHECK(kv_a_in.stride(1) == 1, op, "kv_a", "must have a contiguous last dimension, got strides ",
             kv_a_in.strides());
  const int64_t tokens = kv_a_in.size(0);
  DSV2_CHECK(tokens <= std::numeric_limits<int32_t>::max(), op, "kv_a", "has too many rows: ", tokens);

  check_same_device(op, "norm_weight", norm_weight, kv_a_in);
  const auto wt = norm_weight.scalar_type();
  DSV2_CHECK(wt == at::kBFloat16 || wt == at::kHalf || wt == at::kFloat, op, "norm_weight",
             "must have dtype bfloat16 or float16 or float32, got ", wt);
  DSV2_CHECK(norm_weight.dim() == 1 && norm_weight.size(0) == kKvRank, op, "norm_weight",
             "must have shape (512,), got ", norm_weight.sizes());
  DSV2_CHECK(norm_weight.is_contiguous(), op, "norm_weight", "must be contiguous, got strides ",
             norm_weight.strides());
  DSV2_CHECK(eps > 0, op, "eps", "must be > 0, got ", eps);

  check_index_tensor(op, "positions", positions, kv_a_in, tokens);
  check_same_device(op, "cos_sin_cache", cos_sin_cache, kv_a_in);
  check_dtype(op, "cos_sin_cache", cos_sin_cache, at::kFloat);
  DSV2_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == kRopeDim, op, "cos_sin_cache",
             "must have shape ('*', 64), got ", cos_sin_cache.sizes());
  DSV2_CHECK(cos_sin_cache.is_contiguous(), op, "cos_sin_cache", "must be contiguous, got strides ",
             cos_sin_cache.strides());
  // With no row every position is out of range; the kernel (which clamps positions) needs at least one.
  DSV2_CHECK(tokens == 0 || cos_sin_cache.size(0) > 0, op, "cos_sin_cache", "has no rows, but there are ", tokens,
             " positions to look up");
  check_index_tensor(op, "slot_mapping", slot_mapping, kv_a_in, tokens);

  check_same_device(op, "kv_cache", kv_cache, kv_a_in);
  const bool fp8 = kv_cache.scalar_type() == at::kFloat8_e4m3fn;
  DSV2_CHECK(kv_cache.scalar_type() == at::kBFloat16 || fp8, op, "kv_cache",
             "must have dtype bfloat16 or float8_e4m3fn, got ", kv_cache.scalar_type());
  DSV2_CHECK(kv_cache.dim() == 3 && kv_cache.size(2) == kKvDim, op, "kv_cache", "must have shape ('*', '*', 576), got ",
             kv_cache.sizes());
  DSV2_CHECK(kv_cache.is_contiguous(), op, "kv_cache", "must be contiguous, got strides ", kv_cache.strides());
  DSV2_CHECK(aligned16(kv_cache), op, "kv_cache", "must be 16-byte aligned for the CUDA kernel");
  const int64_t num_blocks = kv_cache.size(0), block_size = kv_cache.size(1);
  if (fp8) {
    DSV2_CHECK(kv_scale.has_value(), op, "kv_scale", "is required with a float8_e4m3fn kv_cache");
    check_same_device(op, "kv_scale", *kv_scale, kv_a_in);
    check_dtype(op, "kv_scale", *kv_scale, at::kFloat);
    DSV2_CHECK(kv_scale->dim() == 3 && kv_scale->size(0) == num_blocks && kv_scale->size(1) == block_size &&
                   kv_scale->size(2) == 2,
               op, "kv_scale", "must have shape (", num_blocks, ", ", block_size, ", 2), got ", kv_scale->sizes());
    DSV2_CHECK(kv_scale->is_contiguous(), op, "kv_scale", "must be contiguous, got strides ", kv_scale->strides());
  } else {
    DSV2_CHECK(!kv_scale.has_value(), op, "kv_scale", "must be None with a bfloat16 kv_cache");
  }

  // Same shapes/dtypes/strides as the fake impl.
  const auto opts = kv_a_in.options();
  at::Tensor c_out = return_normed ? at::empty({tokens, kKvRank}, opts) : at::empty({0}, opts);
  at::Tensor k_out = return_normed ? at::empty({tokens, kRopeDim}, opts) : at::empty({0}, opts);
  if (tokens == 0) return {c_out, k_out};

  const c10::cuda::CUDAGuard guard(kv_a_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // 16-byte vector access needs 16-byte aligned rows; anything else (a rare view) gets an aligned copy.
  at::Tensor kv_a = kv_a_in;
  if (!aligned16(kv_a) || (tokens > 1 && kv_a.stride(0) % 8 != 0)) kv_a = kv_a_in.clone(at::MemoryFormat::Contiguous);
  const at::Tensor weight = aligned16(norm_weight) ? norm_weight : norm_weight.clone();
  const at::Tensor cos_sin = aligned16(cos_sin_cache) ? cos_sin_cache : cos_sin_cache.clone();

  Params p;
  p.kv_a = reinterpret_cast<const __nv_bfloat16*>(kv_a.data_ptr());
  p.kv_stride = tokens > 1 ? kv_a.stride(0) : kKvDim;
  p.weight = weight.data_ptr();
  p.positions = positions.data_ptr();
  p.pos_stride = positions.stride(0);
  p.pos64 = positions.scalar_type() == at::kLong;
  p.slots = slot_mapping.data_ptr();
  p.slot_stride = slot_mapping.stride(0);
  p.slot64 = slot_mapping.scalar_type() == at::kLong;
  p.cos_sin = cos_sin.data_ptr<float>();
  p.max_pos = cos_sin.size(0);
  p.cache = reinterpret_cast<uint8_t*>(kv_cache.data_ptr());
  p.scale = fp8 ? kv_scale->data_ptr<float>() : nullptr;
  p.num_slots = num_blocks * block_size;
  p.c_out = return_normed ? reinterpret_cast<__nv_bfloat16*>(c_out.data_ptr()) : nullptr;
  p.k_out = return_normed ? reinterpret_cast<__nv_bfloat16*>(k_out.data_ptr()) : nullptr;
  p.tokens = tokens;
  p.eps = static_cast<float>(eps);

  const int device = kv_a.get_device();
  switch (wt) {
    case at::kBFloat16: launch<__nv_bfloat16>(p, fp8, device, stream); break;
    case at::kHalf: launch<__half>(p, fp8, device, stream); break;
    default: launch<float>(p, fp8, device, stream); break;
  }
  return {c_out, k_out};
}

}  // namespace dsv2
