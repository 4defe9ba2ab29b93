// MLA decode attention for narrow query blocks (s_q * H <= kNarrowMaxRows = 32), sm_90a. Same schedule, parameters,
// outputs and split partials as decode_attention.cu (which launches this kernel for such shapes); only the math is
// transposed so that the tensor cores stop computing padded query rows.
//
// The 64-row kernel pads s_q * H (16 at H = 16, s_q = 1) to the wgmma M of 64: 4x wasted tensor work, which made it
// compute-bound even where only the cache bytes should count. Here the 64 tokens of a KV tile are the M dimension and
// the query rows the N dimension (N = 16 or 32, rows padded with zero queries):
//   * S^T [64 tokens x N] = K_tile [64 x 576] . Q^T: 36 wgmma m64nNk16 by warpgroup 0, A = the KV tile (K-major, as
//     stored), B = Q [N x 576] (K-major: Q's rows as loaded, in column blocks of N * 128 bytes);
//   * the online softmax runs per column (query row) over the accumulator rows (tokens): 2 tokens per thread, 8 lanes
//     by shuffles, the 4 warps through a small shared-memory exchange (named barrier 2, warpgroup 0 only). Each
//     thread keeps the running max of its N / 4 columns and a partial row sum over its own tokens (summed across the
//     warpgroup only at the end of a sequence). P^T is written to shared memory as bf16 [N x 64 tokens] (K-major B);
//   * O^T [512 x N] += V^T . P^T: each warpgroup owns 256 of the 512 value dims, 4 M-blocks x 4 k steps of wgmma
//     m64nNk16 with A = the V part of the same tile read MN-major (trans-a), B = P^T. The accumulator is 2N registers
//     per thread (32 or 64) instead of 128.
// Loads: bf16 cache with cp.async by warpgroup 1 alone (idle during S^T and the softmax): tile k + 1 right after the
// top barrier of tile k, from cache rows resolved during tile k - 1, so 2 CTA barriers per tile and no block-table
// latency on the critical path (the 64-row kernel's schedule);
// e4m3 cache by a producer warpgroup of decode_kv.cuh (exact e4m3 * 2^-112 conversion, per-token {r, f} scale slot).
// Unlike the 64-row kernel's register producer, the one here (fp8_producer_ring) copies raw e4m3 tiles with cp.async
// into a 3-stage shared-memory ring and converts them into ONE bf16 stage, so that 3 tiles stay in flight (the faster
// consumers left the one-tile register pipeline as the limit; the register producer measured slower
// at every shape). The scale folding is the same: S rows (tokens) scaled by r between the k_pe and c_kv parts of S^T
// and by f after, P^T columns (tokens) by f.
// Every consumer thread arrives on the e4m3 stage's empty barrier itself: one elected arrival after a __syncwarp
// does not order the other lanes' reads of the stage before the producer's next write (racecheck found that hazard).
// e4m3 runs decode_narrow_fp8_kernel instead (bottom of the file; DSV2_DECODE_FP8_PIPE=0 for the one above): fixed
// roles (producer / scores / values) over a raw e4m3 ring, f16 MMAs with A fragments converted in the consumers'
// registers, so that loads, S^T + softmax and PV of consecutive tiles overlap.

#include <cstdlib>
#include <cstring>

#include "../common/torch_cuda.h"

#include "decode_common.cuh"
#include "decode_kv.cuh"       // cursor, tile loads, e4m3 producer
#include "prefill_common.cuh"  // mbarriers, named barriers

namespace dsv2 {
namespace mla_decode {
namespace {

using mla_prefill::mbar_arrive;
using mla_prefill::mbar_wait;
using mla_prefill::named_bar_sync;

// Shared memory plan (byte offsets from a 1024-aligned base): kStages bf16 KV stages, Q [kN x 576] (9 column blocks
// of kN * 128 bytes, 1024-aligned as the swizzle needs), P^T [kN x 64], e4m3 scale slots (one per stage), the
// column-max and row-sum exchanges of warpgroup 0 ([4 warps][kN] each), per column alpha / final l / final m, e4m3
// mbarriers full[kStages], empty[kStages], and (e4m3) the producer's raw e4m3 ring.
// bf16: 2 bf16 stages. e4m3: 1 bf16 stage + kRawStages raw stages (227 KB holds 2 + 1 or 1 + 3; only the second
// keeps more than one tile in flight).
constexpr int kRawStages = 3;
template <bool kFp8, int kN>
struct NarrowSmem {
  static constexpr int kStages = kFp8 ? 1 : 2;
  static constexpr int kQBlock = kN * 128;
  static constexpr int kKV = 0, kQ = kStages * kTileBytes, kP = kQ + 9 * kQBlock, kScale = kP + kQBlock;
  static constexpr int kRed = kScale + (kFp8 ? kStages * kScaleTileBytes : 0), kRedL = kRed + 4 * kN * 4;
  static constexpr int kAlpha = kRedL + 4 * kN * 4, kL = kAlpha + kN * 4, kM = kL + kN * 4;
  static constexpr int kBar = kM + kN * 4;
  static constexpr int kRawRing = (kBar + (kFp8 ? 4 * 8 : 0) + 127) / 128 * 128;
  static constexpr int kBytes = kFp8 ? kRawRing + kRawStages * kRawStageBytes : kBar + (kFp8 ? 4 * 8 : 0);
  static_assert(kQ % 1024 == 0 && kP % 1024 == 0 && kBar % 8 == 0, "swizzled blocks need 1024-byte alignment");
  static_assert(kBytes + kSmemSlack <= 232448, "the H100/H200 per-block shared memory limit is 227 KB");
};

// Q rows 0..kN-1 of sequence b (rows >= p.rows zero-filled): 8 threads per row, threads 0 .. 8 kN - 1.
template <int kN>
__device__ __forceinline__ void load_q_narrow(const DecodeParams& p, uint32_t dst, int b) {
  if (threadIdx.x < kN * 8) {
    const int row = threadIdx.x >> 3;
    load_q_row(p, dst, b, row, row, kN * 128);
  }
}

// S^T [64 x kN] (+)= K_tile[:, 16 kK0 .. 16 kK1) . Q^T over those columns, by one warpgroup (k step kk: 32 bytes into
// column block kk / 4 of both operands).
template <int kN, int kK0, int kK1>
__device__ __forceinline__ void qk_narrow(float (&s)[kN / 2], uint32_t q, uint32_t kv, bool accumulate) {
  fence_regs(s);
  wgmma_fence();
#pragma unroll
  for (int kk = kK0; kk < kK1; ++kk) {
    const uint32_t kv_off = (kk >> 2) * kColBlockBytes + (kk & 3) * 32;
    const uint32_t q_off = (kk >> 2) * (kN * 128) + (kk & 3) * 32;
    wgmma_m64nNk16_ss<kN, 0>(s, smem_desc(kv + kv_off, 16), smem_desc(q + q_off, 16), accumulate || kk > kK0);
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(s);
}

// O^T[256 x kN] (a warpgroup's 4 blocks of 64 dims) += V^T . P^T: A = V dims [64 mb, 64 mb + 64) from `v` (column
// block mb from there, tokens 16 kk.. at 2 KB per k step), B = P^T. With `restart`, O = V^T P^T instead (whatever O
// held is discarded).
template <int kN>
__device__ __forceinline__ void pv_narrow(float (&o)[4][kN / 2], uint32_t sp, uint32_t v, bool restart) {
  constexpr int kMB = 4;
#pragma unroll
  for (int mb = 0; mb < kMB; ++mb) fence_regs(o[mb]);
  wgmma_fence();
  // k step outer, M-block inner: consecutive wgmmas write different accumulators, so a small-N wgmma never waits
  // for the previous one's accumulation (each block still sums its k steps in the same order: identical results).
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk) {
#pragma unroll
    for (int mb = 0; mb < kMB; ++mb)
      wgmma_m64nNk16_ss<kN, 1>(o[mb], smem_desc(v + mb * kColBlockBytes + kk * 2048, kColBlockBytes),
                               smem_desc(sp + kk * 32, 16), kk > 0 || !restart);
  }
  wgmma_commit();
  wgmma_wait<0>();
#pragma unroll
  for (int mb = 0; mb < kMB; ++mb) fence_regs(o[mb]);
}

// Causal / length mask of a tile's S^T (registers as described below: tokens t_lo and t_hi = t_lo + 8 of this
// thread, its kN / 4 columns). Query row c = i * H + h sees tokens j < len - s_q + 1 + i when causal, else j < len.
// Masked before exp: tokens past the end were zero-filled, never read, so nothing non-finite is in S.
template <int kN>
__device__ __forceinline__ void mask_scores(float (&s)[kN / 2], const DecodeParams& p, const Cursor& cur, int t_lo,
                                            int t_hi, int quad) {
  const int tok0 = cur.t * kBlockN;
  const int vis0 = p.causal ? cur.len - p.s_q + 1 : cur.len;
  if (tok0 + kBlockN > vis0) {
#pragma unroll
    for (int jj = 0; jj < kN / 4; ++jj) {
      const int c = 8 * (jj >> 1) + 2 * quad + (jj & 1);
      const int e = p.causal ? min(cur.len, vis0 + c / p.heads) : cur.len;
      const int i = 4 * (jj >> 1) + (jj & 1);
      if (tok0 + t_lo >= e) s[i] = -INFINITY;
      if (tok0 + t_hi >= e) s[i + 2] = -INFINITY;
    }
  }
}

// Per column of this thread: the max over its 2 tokens and the 8 lanes of its quad (the 16 tokens of its warp).
template <int kN>
__device__ __forceinline__ void quad_column_max(const float (&s)[kN / 2], float (&mx)[kN / 4]) {
#pragma unroll
  for (int jj = 0; jj < kN / 4; ++jj) {
    const int i = 4 * (jj >> 1) + (jj & 1);
    mx[jj] = fmaxf(s[i], s[i + 2]);
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) mx[jj] = fmaxf(mx[jj], __shfl_xor_sync(0xffffffffu, mx[jj], off));
  }
}

// A tile's mask, then this warp's column maxima mx over its 16 tokens (quad_column_max) and the max gmax of its
// tokens' s_c (this thread's sc_lo, sc_hi): what the pipelined FP8 kernel's softmax needs from each warp.
template <int kN>
__device__ __forceinline__ void mask_and_warp_maxima(float (&s)[kN / 2], const DecodeParams& p, const Cursor& cur,
                                                     int t_lo, int t_hi, int quad, float sc_lo, float sc_hi,
                                                     float (&mx)[kN / 4], float& gmax) {
  mask_scores<kN>(s, p, cur, t_lo, t_hi, quad);
  quad_column_max<kN>(s, mx);
  gmax = fmaxf(sc_lo, sc_hi);
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) gmax = fmaxf(gmax, __shfl_xor_sync(0xffffffffu, gmax, off));
}
// This warp's mx into red[warp * kN + column] and gmax into sig[warp] (`col(jj)`: the column of this thread's jj-th
// value); warps_column_max then combines the 4 warps'.
template <int kN, typename Col>
__device__ __forceinline__ void publish_warp_maxima(const float (&mx)[kN / 4], float gmax, float* red, float* sig,
                                                    int warp, int lane, Col col) {
  if (lane < 4) {
#pragma unroll
    for (int jj = 0; jj < kN / 4; ++jj) red[warp * kN + col(jj)] = mx[jj];
  }
  if (lane == 0) sig[warp] = gmax;
}

// A sequence's row sums at its last tile, per column: each thread's partial sums l over the 8 lanes of its quad, the
// warp's result into its kN slice of red_l (`col(jj)`: the column of this thread's jj-th value), then named barrier
// `bar` of the warpgroup's 128 threads; warpgroup_column_sum then gives any column's total over the 4 warps.
template <int kN, typename Col>
__device__ __forceinline__ void publish_column_sums(const float (&l)[kN / 4], float* red_l, int warp, int lane,
                                                    Col col, int bar) {
  float t[kN / 4];
#pragma unroll
  for (int jj = 0; jj < kN / 4; ++jj) {
    t[jj] = l[jj];
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) t[jj] += __shfl_xor_sync(0xffffffffu, t[jj], off);
  }
  if (lane < 4) {
#pragma unroll
    for (int jj = 0; jj < kN / 4; ++jj) red_l[warp * kN + col(jj)] = t[jj];
  }
  named_bar_sync<128>(bar);
}
template <int kN>
__device__ __forceinline__ float warpgroup_column_sum(const float* red_l, int c) {
  return (red_l[c] + red_l[kN + c]) + (red_l[2 * kN + c] + red_l[3 * kN + c]);
}

// Column c of this thread's O^T (dims d0 + 64 mb and d0 + 64 mb + 8, mb < kMB; o[mb][i0] and o[mb][i0 + 2]) times
// `inv` into sequence b's output: bf16 when the sequence has one split, else the fp32 partial of split `slot`.
template <int kN, int kMB>
__device__ __forceinline__ void store_o_column(const DecodeParams& p, const float (&o)[kMB][kN / 2], int i0,
                                               float inv, int b, int c, int d0, bool single, int64_t slot) {
  if (single) {
    __nv_bfloat16* dst = p.out + (static_cast<int64_t>(b) * p.rows + c) * kVDim + d0;
#pragma unroll
    for (int mb = 0; mb < kMB; ++mb) {
      dst[64 * mb] = __float2bfloat16_rn(o[mb][i0] * inv);
      dst[64 * mb + 8] = __float2bfloat16_rn(o[mb][i0 + 2] * inv);
    }
  } else {
    float* dst = p.o_part + (slot * p.rows + c) * kVDim + d0;
#pragma unroll
    for (int mb = 0; mb < kMB; ++mb) {
      dst[64 * mb] = o[mb][i0] * inv;
      dst[64 * mb + 8] = o[mb][i0 + 2] * inv;
    }
  }
}

// The state of an online softmax before its first tile: O^T = 0 and, per column of this thread, m = -inf, l = 0 and a
// third per-column value z = 0.
template <int kN, int kMB>
__device__ __forceinline__ void online_softmax_init(float (&o)[kMB][kN / 2], float (&m)[kN / 4], float (&l)[kN / 4],
                                                    float (&z)[kN / 4]) {
#pragma unroll
  for (int mb = 0; mb < kMB; ++mb)
#pragma unroll
    for (int i = 0; i < kN / 2; ++i) o[mb][i] = 0.f;
#pragma unroll
  for (int jj = 0; jj < kN / 4; ++jj) {
    m[jj] = -INFINITY;
    l[jj] = 0.f;
    z[jj] = 0.f;
  }
}

// O^T *= a per column (this thread's kN / 4 columns), skipped when every factor of the warp is exactly 1 (the usual
// case once a sequence's column maxima stopped moving); called warp-uniformly.
template <int kN, int kMB>
__device__ __forceinline__ void rescale_o(float (&o)[kMB][kN / 2], const float (&a)[kN / 4]) {
  bool unit = true;
#pragma unroll
  for (int jj = 0; jj < kN / 4; ++jj) unit = unit && a[jj] == 1.f;
  if (!__all_sync(0xffffffffu, unit)) {
#pragma unroll
    for (int mb = 0; mb < kMB; ++mb)
#pragma unroll
      for (int i = 0; i < kN / 2; ++i) o[mb][i] *= a[2 * (i >> 2) + (i & 1)];
  }
}

// The tile's max of each of this thread's kN / 4 columns over the 4 warps' quad maxima in red[warp * kN + column].
template <int kN>
__device__ __forceinline__ void warps_column_max(const float* red, int quad, float (&w)[kN / 4]) {
#pragma unroll
  for (int jj = 0; jj < kN / 4; ++jj) {
    const int c = 8 * (jj >> 1) + 2 * quad + (jj & 1);
    w[jj] = fmaxf(fmaxf(red[c], red[kN + c]), fmaxf(red[2 * kN + c], red[3 * kN + c]));
  }
}

// Online softmax step of a tile for this thread's kN / 4 columns: the tile's column max w (warps_column_max), times
// the column's log2 scale qs, updates the running max m (log2 domain) and gives the
// rescale factor a of the previous tiles; s becomes exp2(s qs - m) and l (this thread's partial row sums) l a + sum.
// kLazy > 0: m moves only when the tile's max exceeds it by more than kLazy (then to that max), so P <= 2^kLazy and
// most tiles after the first few rescale nothing (a = 1 in the whole warp skips rescale_o); out = O / l and the lse
// m ln 2 + ln l are the same for any m.
template <int kN, int kLazy = 0>
__device__ __forceinline__ void softmax_update(float (&s)[kN / 2], const float (&w)[kN / 4],
                                               const float (&qs)[kN / 4], float (&m)[kN / 4], float (&l)[kN / 4],
                                               float (&a)[kN / 4]) {
  float u[kN / 4], sum[kN / 4];
#pragma unroll
  for (int jj = 0; jj < kN / 4; ++jj) {
    // Running max in the log2 domain; a column that has seen no key yet keeps -inf and subtracts 0 instead.
    const float cand = w[jj] * qs[jj];
    // Lazy: a column that has seen no key yet (m = -inf) takes the first finite max, as fmaxf does.
    const float n = kLazy == 0 ? fmaxf(m[jj], cand) : (cand > m[jj] + kLazy ? cand : m[jj]);
    u[jj] = n == -INFINITY ? 0.f : n;
    a[jj] = fast_exp2(m[jj] - u[jj]);
    m[jj] = n;
    sum[jj] = 0.f;
  }
#pragma unroll
  for (int i = 0; i < kN / 2; ++i) {
    const int jj = 2 * (i >> 2) + (i & 1);
    s[i] = fast_exp2(fmaf(s[i], qs[jj], -u[jj]));
    sum[jj] += s[i];
  }
#pragma unroll
  for (int jj = 0; jj < kN / 4; ++jj) l[jj] = l[jj] * a[jj] + sum[jj];
}

// Accumulator layout of wgmma m64nN (per warpgroup thread): register i holds row 16 * warp + lane / 4 + 8 * ((i >> 1)
// & 1) and column 8 * (i >> 2) + 2 * (lane & 3) + (i & 1). Rows are tokens (S^T) or value dims (O^T), columns query
// rows. A thread's kN / 4 columns are indexed jj = 2 j + e: column 8 j + 2 quad + e, registers 4 j + e (row "lo") and
// 4 j + 2 + e (row "hi" = lo + 8).
template <bool kFp8, int kN>
__global__ void __launch_bounds__(kCtaThreads<kFp8>, 1) decode_narrow_kernel(const __grid_constant__ DecodeParams p) {
  using L = NarrowSmem<kFp8, kN>;
  constexpr int kStages = L::kStages;  // 1 or 2: stage k & (kStages - 1), phase parity (k >> (kStages - 1)) & 1
  constexpr int kCols = kN / 4;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw), base = (raw + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base - raw);
  float* red = reinterpret_cast<float*>(smem + L::kRed);
  float* red_l = reinterpret_cast<float*>(smem + L::kRedL);
  float* s_alpha = reinterpret_cast<float*>(smem + L::kAlpha);
  float* s_l = reinterpret_cast<float*>(smem + L::kL);
  float* s_m = reinterpret_cast<float*>(smem + L::kM);
  const uint32_t bar_full = base + L::kBar, bar_empty = bar_full + 8 * kStages;
  const uint32_t sq = base + L::kQ, sp = base + L::kP;

  // Programmatic dependent of the metadata kernel, as the 64-row kernel (decode_attention.cu): no global access above.
  griddep_wait();
  griddep_launch_dependents();
  const int4 sched = reinterpret_cast<const int4*>(p.sched)[blockIdx.x];
  const int count = sched.z;
  if (count <= 0) return;
  const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, quad = lane & 3;
  const int t_lo = warp * 16 + (lane >> 2), t_hi = t_lo + 8;
  auto col = [&](int jj) { return 8 * (jj >> 1) + 2 * quad + (jj & 1); };

  Cursor cur, ld;
  cur.set(p, sched.x, sched.y);
  ld = cur;
  int split = sched.w;

  if constexpr (kFp8) {
    init_fp8_stage_barriers<kStages>(bar_full, bar_empty);
    // No setmaxnreg: 384 threads get 168 registers each, more than the producer or the narrow consumers need.
    if (wg == 2) {
      fp8_producer_ring<kRawStages>(p, ld, count, base + L::kRawRing, base + L::kKV, base + L::kScale, bar_full,
                                    bar_empty);
      return;
    }
  }

  // bf16 cp.async groups: {Q, tile 0} by all threads, then per tile k: {tile k + 1} (warpgroup 1, right after the top
  // barrier, from cache rows it resolved one tile earlier), [{Q of the next sequence}]; at the top of step k
  // everything outstanding is needed (wait 0). Warpgroup 1 is idle during S^T and the softmax, so neither the
  // block-table latency nor the copy issue sits on the critical path (as in the 64-row kernel).
  // e4m3: Q loads only.
  load_q_narrow<kN>(p, sq, cur.b);
  uint32_t next_rows[4] = {kNoRow, kNoRow, kNoRow, kNoRow};  // bf16, warpgroup 1: the cache rows of tile `ld`
  if constexpr (!kFp8) {
    bf16_first_tile(p, base + L::kKV, ld, wg, count, next_rows);
  }
  cp_async_commit();

  const float scale_log2 = kFp8 ? p.scale_log2 * kPow56 : p.scale_log2;
  constexpr float kOutScale = kFp8 ? kPow56 : 1.f;

  float o[4][kN / 2];
  // Per column of this thread: running max (log2 domain), partial sum over this thread's tokens, rescale factor.
  float m[kCols], l[kCols], a[kCols];
  online_softmax_init<kN>(o, m, l, a);

  for (int k = 0; k < count; ++k) {
    const bool first = k == 0 || cur.t == 0;
    const bool last = k == count - 1 || cur.t == cur.n - 1;
    if constexpr (kFp8) {
      cp_async_wait<0>();  // this thread's part of Q
      fence_proxy_async();
      mbar_wait(bar_full + 8 * (k & (kStages - 1)), (k >> (kStages - 1)) & 1);
      named_bar_sync<kThreads>(1);  // Q ready; P^T and alpha of the previous tile consumed
    } else {
      cp_async_wait<0>();
      fence_proxy_async();
      // Tile k (and Q) ready for wgmma; P^T, alpha and stage (k + 1) & 1 (tile k - 1: S^T waited before the middle
      // barrier of k - 1, PV by every thread before this one) are free.
      __syncthreads();
      if (wg == 1) bf16_next_tile(p, base + L::kKV, ld, k, count, next_rows);
    }
    if (first) {  // O restarts through the PV wgmma's scale-d = 0
#pragma unroll
      for (int jj = 0; jj < kCols; ++jj) {
        m[jj] = -INFINITY;
        l[jj] = 0.f;
      }
    }
    const uint32_t kv = base + L::kKV + (k & (kStages - 1)) * kTileBytes;

    if (wg == 0) {
      float s[kN / 2];
#pragma unroll
      for (int i = 0; i < kN / 2; ++i) s[i] = 0.f;
      // e4m3: {r, f} of this thread's two tokens (the stage's scale slot).
      float2 f_lo = make_float2(1.f, 1.f), f_hi = f_lo;
      if constexpr (kFp8) {
        const float2* fac =
            reinterpret_cast<const float2*>(smem + L::kScale + (k & (kStages - 1)) * kScaleTileBytes);
        f_lo = fac[t_lo];
        f_hi = fac[t_hi];
        qk_narrow<kN, kVDim / 16, kKvDim / 16>(s, sq, kv, false);  // k_pe part, then scaled by r per token
#pragma unroll
        for (int i = 0; i < kN / 2; ++i) s[i] *= (i & 2) ? f_hi.x : f_lo.x;
        qk_narrow<kN, 0, kVDim / 16>(s, sq, kv, true);
#pragma unroll
        for (int i = 0; i < kN / 2; ++i) s[i] *= (i & 2) ? f_hi.y : f_lo.y;
      } else {
        qk_narrow<kN, 0, kKvDim / 16>(s, sq, kv, false);
      }
      mask_scores<kN>(s, p, cur, t_lo, t_hi, quad);
      // Column max over the 64 tokens: own 2, the 8 lanes of the same quad, then the 4 warps.
      float mx[kCols];
      quad_column_max<kN>(s, mx);
      if (lane < 4) {
#pragma unroll
        for (int jj = 0; jj < kCols; ++jj) red[warp * kN + col(jj)] = mx[jj];
      }
      named_bar_sync<128>(2);
      float qs[kCols], w[kCols];
#pragma unroll
      for (int jj = 0; jj < kCols; ++jj) qs[jj] = scale_log2;
      warps_column_max<kN>(red, quad, w);
      softmax_update<kN>(s, w, qs, m, l, a);
      // P^T [kN x 64 tokens] bf16, K-major swizzled (row c, 16-byte chunk tok / 8 at chunk (tok / 8) ^ (c % 8)).
      // e4m3: each token's value factor f (the V tile holds unscaled e4m3 * 2^-112).
#pragma unroll
      for (int i = 0; i < kN / 2; ++i) {
        const int c = 8 * (i >> 2) + 2 * quad + (i & 1), tok = (i & 2) ? t_hi : t_lo;
        float v = s[i];
        if constexpr (kFp8) v *= (i & 2) ? f_hi.y : f_lo.y;
        st_shared_b16(sp + c * 128 + (((tok >> 3) ^ (c & 7)) << 4) + (tok & 7) * 2, __float2bfloat16_rn(v));
      }
      if (warp == 0 && lane < 4) {
#pragma unroll
        for (int jj = 0; jj < kCols; ++jj) s_alpha[col(jj)] = a[jj];
      }
      if (last) {  // the sequence's row sums over all 64 x (its tiles) tokens, and its max, for the output
        publish_column_sums<kN>(l, red_l, warp, lane, col, 2);
        if (warp == 0 && lane < 4) {
#pragma unroll
          for (int jj = 0; jj < kCols; ++jj) {
            const int c = col(jj);
            s_l[c] = warpgroup_column_sum<kN>(red_l, c);
            s_m[c] = m[jj];
          }
        }
      }
      fence_proxy_async();  // P^T, for the PV wgmma of both warpgroups
    }
    // P^T and alpha written; S^T done, so Q is free
    if constexpr (kFp8) named_bar_sync<kThreads>(1);
    else __syncthreads();

    Cursor next = cur;
    next.advance(p);
    if (last && k + 1 < count) {
      load_q_narrow<kN>(p, sq, next.b);
      cp_async_commit();
    }
    if (wg == 1) {
#pragma unroll
      for (int jj = 0; jj < kCols; ++jj) a[jj] = s_alpha[col(jj)];
    }
    // O *= alpha, skipped where it is the identity (every factor of the warp exactly 1: no column max moved; the
    // usual case after a sequence's first tiles) or discarded (first tile: the PV restarts O). first is CTA-uniform,
    // so the vote is warp-uniform.
    if (!first) rescale_o<kN>(o, a);
    pv_narrow<kN>(o, sp, kv + wg * 4 * kColBlockBytes, first);

    if constexpr (kFp8) {
      // Stage k & (kStages - 1) read (scale slot by WG0 before the middle barrier, V just now): every thread
      // releases its own reads. P^T, alpha and the exchanges: the next top barrier.
      mbar_arrive(bar_empty + 8 * (k & (kStages - 1)));
    }
    // bf16: no bottom barrier; the next top barrier orders this PV's reads of stage k & 1 and P^T before their
    // overwrites (tile k + 2 is issued after the top barrier of k + 1).

    if (last) {
      const int ns = __ldg(p.nsplit + cur.b);
      const int64_t slot = ns == 1 ? 0 : __ldg(p.cu_partial + cur.b) + split;
#pragma unroll
      for (int jj = 0; jj < kCols; ++jj) {
        const int c = col(jj);
        if (c >= p.rows) continue;
        const float lc = s_l[c], mc = s_m[c];
        const float inv = lc > 0.f ? kOutScale / lc : 0.f;
        const float lse = lc > 0.f ? mc * 0.69314718055994531f + logf(lc) : (ns == 1 ? INFINITY : -INFINITY);
        const int d0 = wg * 256 + t_lo;  // dims d0 + 64 mb + 8 h
        const int i0 = 4 * (jj >> 1) + (jj & 1);
        if (ns == 1) {
          store_o_column<kN, 4>(p, o, i0, inv, cur.b, c, d0, true, slot);
          if (wg == 0 && warp == 0 && lane < 4) {
            const int i = c / p.heads, h = c - i * p.heads;
            p.lse[(static_cast<int64_t>(cur.b) * p.heads + h) * p.s_q + i] = lse;
          }
        } else {
          store_o_column<kN, 4>(p, o, i0, inv, cur.b, c, d0, false, slot);
          if (wg == 0 && warp == 0 && lane < 4) p.lse_part[slot * p.rows + c] = lse;
        }
      }
      split = 0;  // later sequences of the run start with their first split
    }
    cur = next;
  }
  cp_async_wait<0>();
}

template <bool kFp8, int kN>
void launch_narrow(const DecodeParams& p, int parts, bool programmatic, cudaStream_t stream) {
  constexpr int smem = NarrowSmem<kFp8, kN>::kBytes + kSmemSlack;
  C10_CUDA_CHECK(cudaFuncSetAttribute(decode_narrow_kernel<kFp8, kN>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      smem));
  launch_kernel(programmatic, decode_narrow_kernel<kFp8, kN>, dim3(parts), dim3(kCtaThreads<kFp8>), smem, stream, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- e4m3 cache: the pipelined kernel (N = 16 or 32 query columns) -----------------------------------------------
// The landed e4m3 path above converts into ONE bf16 stage, so the conversion of tile j waits for the PV of tile j - 1
// and warpgroup 1 idles through S^T and the softmax. Here three warpgroups have fixed roles and hand tiles over through
// mbarriers, and nothing converted goes through shared memory:
//   * warpgroup 2 (producer, fp8_producer_raw in decode_kv.cuh): cp.async of raw e4m3 tiles into a ring of
//     kFp8RawStages<kN> stages, nothing else (block-table lookups a tile ahead, one mbarrier arrival per thread);
//   * warpgroup 0 (scores): K straight from the raw stage into wgmma register fragments (16-byte loads, one cvt per
//     pair: e4m3 codes are exact f16 values), S^T(j) = K Q^T (36 wgmma m64nNk16, A from registers), scaled per
//     token, into one of two S slots (each thread its own N / 2 values and its two tokens' s_c; at N = 32 also
//     masked, with each warp's column maxima and max s_c over its 16 tokens: kMaxInScores);
//   * warpgroup 1 (values): the online softmax of S^T(j), P^T(j) as f16 into its P^T buffer (two at N = 32), V^T
//     fragments from the same raw stage (byte interleave of token pairs, then cvt), O^T [512 x kN] *= alpha(j),
//     += V^T(j) P^T(j) (mma.sync at N = 16, 32 wgmma at N = 32), the output and lse at a sequence's last tile.
// The softmax sits with the values: S^T with its K conversions is the longer half (~700 instructions per warp and
// tile against ~390 for PV, profiled with the softmax on the scores side). The m64nN accumulator gives thread
// (warp w, lane) the same columns in both warpgroups, so the S slot hands each thread's registers over unchanged and
// the softmax code is the same one, only run by warpgroup 1. At N = 32 the mask and the per-warp maxima moved to the
// scores (thirteenth session): they leave the value warpgroup's chain, and with them its first named barrier per tile.
// Why: with a converted f16 stage every tile crossed shared memory ~4 times (raw write, raw read, f16 write, and the
// wgmma's A reads of 20 wavefronts per m64n16k16): ~3,000 shared-memory wavefronts per 64-token tile measured
// (ncu), ~77 % of the SM's cycles, which set the pace of all three roles. Register fragments read each raw byte once
// per consumer: ~1,200 wavefronts per tile.
// Dims are permuted inside the MMAs so that a thread's fragments come from whole 16-byte loads:
//   * S^T: thread quad q holds logical k = 16 s + 2 q + {0, 1} (a0) and + 8 (a2) of k step s; those are physical
//     c_kv dims 128 q + 4 s + {0, 1} and {2, 3} (word s % 4 of its chunk 8 q + s / 4), k_pe dims 16 q + 4 s + ... for
//     the 4 k_pe steps. Q is stored in the same logical order (store_q_f16), so S = sum_k K_k Q_k is unchanged.
//   * O^T: rows are dims; thread (warp w, lane group g = lane / 4) owns c_kv chunk 8 w + g (dims 16 (8 w + g) ..
//     + 15): rows g / g + 8 of M-block b are dims 2 b / 2 b + 1 of it. The output store undoes the permutation (two
//     16-byte stores per column instead of 16 scattered 2-byte ones).
// mbarriers: full[s] / empty[s] of the raw stages (producer -> both consumers; empty counts all 256 consumer threads,
// each arriving for its own reads), s_full[b] / s_empty[b] of the S slots (warpgroup 0 -> 1 and back, 128 threads
// each). Tile k of the run uses raw stage k % kFp8RawStages<kN> (own stage/phase counters per role) and S slot k & 1
// (phase parity (k >> 1) & 1), so the scores run up to two tiles ahead of the values.
//
// Numerics (f16 has 5 exponent bits, so the scales that bf16 could carry in its exponent are moved out, as powers of
// two, into fp32 factors; every such move is exact):
//   * Q: row c times 2^e_c, e_c chosen so that max |q_c| 2^e_c is in [2^14, 2^15) (rows of zeros: e_c = 0); 2^-e_c
//     goes into the column's log2 softmax scale. bf16 -> f16 after the power-of-two scale is exact for every value
//     within 2^31 of the row max (f16 keeps bf16's 8 significant bits down to 2^-17); smaller ones round to a multiple
//     of 2^-24, i.e. an absolute error below 2^-39 of the row max: negligible next to the fp32 accumulation.
//   * K, V: the fragments hold the e4m3 codes unscaled (exact); S = s_c acc_c + s_pe acc_pe per token (the c_kv and
//     k_pe steps accumulate separately).
//   * P: the PV product needs P s_c (P <= 2^8: the running max moves lazily, see narrow_fp8_values); per tile,
//     sigma_t = 2^(E - 6) with E = floor(log2 max s_c over the tile's tokens), and P^T holds P s_c / sigma_t < 2^15
//     as f16. O^T is held in units of the last tile's sigma: alpha' = alpha sigma_{t-1} / sigma_t (a power of two:
//     exact), the output is O sigma_last / l. f16 rounds P s_c / sigma_t to 2^-11 relative where the landed bf16 P
//     rounds to 2^-8, down to 2^-21 of the tile's largest s_c; below that (a token whose P s_c is 2^21 under the
//     tile's largest scale) f16 is subnormal, an absolute error under 2^-31 max(s_c) |v| per token. So outputs are at
//     least as precise as the bf16 path's, except where tokens whose P s_c lies more than 2^21 below the tile's
//     largest scale carry the output (per-token scales within one tile far apart); the test with scales spanning 24
//     binades per tile checks the tolerance there.
// Raw tiles in the ring next to Q, P^T and the S slots: 5 x 36.5 KB at kN = 16; 4 at kN = 32, whose Q (36 KB) and
// S slots (2 x 13 KB) are twice as large.
template <int kN>
constexpr int kFp8RawStages = kN == 16 ? 5 : 4;
// Where a tile's mask, per-warp column maxima and max s_c are computed. At kN = 32 in the scores warpgroup (into the S
// slot), which takes them off the value warpgroup's chain and with them its first named barrier per tile: H=32
// s_k=4096 143.5 -> 136.6 us, 16384 -5.5 %, H=16 s_q=2 -4.9 % (thirteenth session, one run, two builds). At kN = 16
// in the value warpgroup after its slot reads (as before): a build with the move (and the layout it needs, see
// NarrowFp8Smem) at both N ran H=16 2-4 % slower.
template <int kN>
constexpr bool kMaxInScores = kN == 32;

// Shared memory plan (byte offsets from a 1024-aligned base): f16 Q [kN x 576] (9 column blocks of kN * 128 bytes,
// logical k order), kPBufs P^T [kN x 64], the raw ring, 2 S slots, warpgroup 1's column maxima and max s_c exchange
// (used without kMaxInScores), kPBufs sets of its row sums, the per column softmax scales of store_q_f16, the
// mbarriers.
// With kMaxInScores, warpgroup 1 passes one named barrier per tile (P^T complete, and at a sequence's last tile its
// row sums), so tile k's P^T and row sums go to buffer k & 1: a warp writes buffer k & 1 again at tile k + 2, after
// the barrier of k + 1, which every warp reaches only after its reads of tile k's (the PV of k, the output of k).
// Without it, one buffer and one exchange suffice: the exchange is a first barrier per tile, and a warp writes tile
// k + 1's after the first barrier of k + 1, which every warp reaches only after its reads of tile k's (exchange:
// before the second barrier of k; P^T: the PV of k). (At kN = 16 this is the layout from before kMaxInScores: a build
// with the double-buffered one at both N ran H=16 at 110.1 us against 107.6 for main in the run before.)
// S slot (per thread t of 128, plain vector stores in thread order, so without bank conflicts): the thread's kN / 2 S
// values 4 v .. 4 v + 3 in float4 array v (kN / 8 arrays of [128]), masked with kMaxInScores; the columns' softmax
// scales (kN / 16 float4 arrays, written at a sequence's first tile only); s_c of tokens t_lo, t_hi (float2 [128]);
// with kMaxInScores, each warp's column maxima over its 16 tokens (float [4][kN]) and max s_c (float [4]).
template <int kN>
struct NarrowFp8Smem {
  static constexpr int kStages = kFp8RawStages<kN>;
  static constexpr int kQBlock = kN * 128;
  static constexpr int kSlotS = 0, kSlotQs = kN / 8 * 128 * 16, kSlotSc = kSlotQs + kN / 16 * 128 * 16;
  static constexpr int kPBufs = kMaxInScores<kN> ? 2 : 1;
  static constexpr int kSlotRed = kSlotSc + 128 * 8, kSlotSig = kSlotRed + 4 * kN * 4;
  static constexpr int kSlotBytes = kMaxInScores<kN> ? kSlotSig + 4 * 4 : kSlotRed;
  static constexpr int kQ = 0, kP = kQ + 9 * kQBlock, kRaw = kP + kPBufs * kQBlock;
  static constexpr int kS = kRaw + kStages * kRawTileBytes, kRed = kS + 2 * kSlotBytes;
  static constexpr int kRedSig = kRed + 4 * kN * 4, kRedL = kRedSig + 4 * 4, kQScale = kRedL + kPBufs * 4 * kN * 4;
  static constexpr int kBar = kQScale + kN * 4;
  static constexpr int kBytes = kBar + (2 * kStages + 4) * 8;
  static_assert(kP % 1024 == 0 && kQBlock % 1024 == 0 && kRaw % 128 == 0 && kS % 16 == 0 && kSlotBytes % 16 == 0 &&
                    kBar % 8 == 0,
                "swizzled blocks need 1024-byte alignment, raw tiles 128, the S slots' vectors 16");
  static_assert(kBytes + kSmemSlack <= 232448, "the H100/H200 per-block shared memory limit is 227 KB");
};
// Registers per thread after setmaxnreg, producer / scores / values: 56 / 224 / 224 at kN = 16, 48 / 224 / 232 at
// kN = 32 (each sum within the launch's 3 x 168). The value warpgroup holds O^T (64 at kN = 16, 128 at 32) and, at
// kN = 32, two sets of V^T fragments (2 x 16, half a k step each; kN = 16's mma.sync PV holds one). At kN = 32 the
// producer had 40 until the twelfth session: ptxas then spilled inside its copy loop, which issued a tile's copies
// half as fast as at kN = 16 (per-tile timeline); with 48 the spill (12 bytes, -Xptxas -v) sits in the scores
// warpgroup, 3 values per tile.
template <int kN>
constexpr int kNarrowProducerRegs = kN == 16 ? 56 : 48;
template <int kN>
constexpr int kNarrowScoreRegs = 224;
template <int kN>
constexpr int kNarrowValueRegs = kN == 16 ? 224 : 232;
static_assert(kNarrowProducerRegs<16> + kNarrowScoreRegs<16> + kNarrowValueRegs<16> <= 504 &&
                  kNarrowProducerRegs<32> + kNarrowScoreRegs<32> + kNarrowValueRegs<32> <= 504,
              "register reallocation exceeds the launch's 384 x 168");

// An S slot's per-thread vectors: this thread's kN floats in kN / 4 float4 arrays of [128] (thread order, so the
// stores and loads are free of bank conflicts).
template <int kN>
__device__ __forceinline__ void slot_store(uint8_t* dst, const float (&v)[kN], int t) {
#pragma unroll
  for (int i = 0; i < kN / 4; ++i)
    reinterpret_cast<float4*>(dst)[128 * i + t] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
}
template <int kN>
__device__ __forceinline__ void slot_load(float (&v)[kN], const uint8_t* src, int t) {
#pragma unroll
  for (int i = 0; i < kN / 4; ++i) {
    const float4 x = reinterpret_cast<const float4*>(src)[128 * i + t];
    v[4 * i] = x.x;
    v[4 * i + 1] = x.y;
    v[4 * i + 2] = x.z;
    v[4 * i + 3] = x.w;
  }
}

// Q rows 0..kN-1 of sequence b as f16 (row c times 2^e_c, see above; rows >= p.rows zero), by the 128 threads of the
// score warpgroup, 8 per row (16-byte segment 8 k + sub of the row, dims 64 k + 8 sub ..) in two steps: fetch_q_rows
// loads this thread's segments into registers (issued a tile ahead, during the previous sequence's last tile, so that
// the load latency is not on the path), store_q_f16 scales and converts them into the swizzled Q blocks in the
// logical k order of the S^T fragments (one f16 pair per 4-byte store) and writes each column's log2 softmax scale
// times 2^-e_c into qscale.
template <int kN>
__device__ __forceinline__ void fetch_q_rows(const DecodeParams& p, int b, uint4 (&v)[kN / 16][9]) {
  const int t = threadIdx.x & 127, sub = t & 7;
#pragma unroll
  for (int it = 0; it < kN / 16; ++it) {
    const int row = (t >> 3) + 16 * it;
    if (row < p.rows) {
      const int i = row / p.heads, h = row - i * p.heads;
      const uint8_t* src = reinterpret_cast<const uint8_t*>(p.q + b * p.q_sb + i * p.q_ss + h * p.q_sh) + sub * 16;
#pragma unroll
      for (int k = 0; k < 9; ++k) v[it][k] = ld_stream_16(src + k * 128);
    } else {
#pragma unroll
      for (int k = 0; k < 9; ++k) v[it][k] = make_uint4(0, 0, 0, 0);
    }
  }
}
// Logical k (within the S^T k order) of the physical dim pair d, d + 1 (d even): c_kv d = 128 q + 4 s + 2 hi -> 16 s +
// 8 hi + 2 q; k_pe (d >= 512) the same inside the 64-dim k_pe block with 16 q for 128 q.
__device__ __forceinline__ int q_logical_k(int d) {
  if (d < kVDim) return 16 * ((d >> 2) & 31) + 8 * ((d >> 1) & 1) + 2 * (d >> 7);
  const int e = d - kVDim;
  return kVDim + 16 * ((e >> 2) & 3) + 8 * ((e >> 1) & 1) + 2 * (e >> 4);
}
template <int kN>
__device__ __forceinline__ void store_q_f16(const DecodeParams& p, const uint4 (&v)[kN / 16][9], uint32_t sq,
                                            float* qscale) {
  const int t = threadIdx.x & 127, sub = t & 7;
  // bf16 -> fp32 is the 16-bit pattern shifted up.
  auto lo = [](uint32_t w) { return __uint_as_float(w << 16); };
  auto hi = [](uint32_t w) { return __uint_as_float(w & 0xFFFF0000u); };
#pragma unroll
  for (int it = 0; it < kN / 16; ++it) {
    const int row = (t >> 3) + 16 * it;
    // Row max |q|: this thread's 72 values, then the row's 8 threads (consecutive lanes).
    float mx = 0.f;
#pragma unroll
    for (int k = 0; k < 9; ++k) {
      const uint32_t w[4] = {v[it][k].x, v[it][k].y, v[it][k].z, v[it][k].w};
#pragma unroll
      for (int e = 0; e < 4; ++e) mx = fmaxf(mx, fmaxf(fabsf(lo(w[e])), fabsf(hi(w[e]))));
    }
#pragma unroll
    for (int off = 1; off < 8; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    const int e = f16_row_exponent(mx);
    const float up = pow2f(e);
#pragma unroll
    for (int k = 0; k < 9; ++k) {
      const uint32_t w[4] = {v[it][k].x, v[it][k].y, v[it][k].z, v[it][k].w};
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const int lk = q_logical_k(64 * k + 8 * sub + 2 * x), blk = lk >> 6, c = (lk >> 3) & 7;
        st_shared_b32(sq + blk * (kN * 128) + row * 128 + ((c ^ (row & 7)) << 4) + (lk & 7) * 2,
                      pack_f16x2(lo(w[x]) * up, hi(w[x]) * up));
      }
    }
    if (sub == 0) qscale[row] = p.scale_log2 * pow2f(-e);
  }
}

// Pins both sets of a double-buffered wgmma A fragment array (every register of it read by this point): after the
// last wait_group of a tile, so that no register of either set is reused while a wgmma may still read it.
template <int N>
__device__ __forceinline__ void fence_fragment_sets(uint32_t (&f)[2][N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    mla_prefill::fence_regs_u32(f[0][i]);
    mla_prefill::fence_regs_u32(f[1][i]);
  }
}

// S^T [64 x kN] of a raw stage: acc_c over the 32 c_kv k steps, acc_pe over the 4 k_pe steps (first, so that their
// loads start the tile), A from registers. This thread's accumulator rows are tokens t_lo, t_hi = t_lo + 8; it loads
// 16-byte chunk `quad` of both tokens' k_pe, then c_kv chunks 8 quad + i (i = 0..7); word w of a chunk is k step 4 i
// + w (a0 / a2: its low / high pair for t_lo, a1 / a3 for t_hi). Two fragment sets: chunk i + 1 converts while the
// wgmmas of chunk i run (wait_group 1 before a set is rewritten); the loads run one chunk ahead. dq: desc_lo of Q.
template <int kN>
__device__ __forceinline__ void qk_raw(float (&acc_c)[kN / 2], float (&acc_pe)[kN / 2], uint32_t dq, uint32_t raw,
                                       int t_lo, int t_hi, int quad) {
  uint32_t frag[2][4][4];
  uint4 lo = ld_shared_v4(raw + kRawPeOff + t_lo * 64 + quad * 16);
  uint4 hi = ld_shared_v4(raw + kRawPeOff + t_hi * 64 + quad * 16);
  fence_regs(acc_c);
  fence_regs(acc_pe);
#pragma unroll
  for (int i = -1; i < 8; ++i) {  // -1: the k_pe chunk
    uint32_t(&f)[4][4] = frag[(i + 1) & 1];
    if (i >= 1) {
      wgmma_wait<1>();  // chunk i - 2's wgmmas, the last readers of this set, are done
#pragma unroll
      for (int w = 0; w < 4; ++w) mla_prefill::fence_regs_u32(f[w]);
    }
    const uint32_t wl[4] = {lo.x, lo.y, lo.z, lo.w}, wh[4] = {hi.x, hi.y, hi.z, hi.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const uint2 a = e4m3x4_to_f16x4(wl[w]), b = e4m3x4_to_f16x4(wh[w]);
      f[w][0] = a.x;
      f[w][1] = b.x;
      f[w][2] = a.y;
      f[w][3] = b.y;
    }
    if (i + 1 < 8) {
      lo = ld_shared_v4(raw + raw_ckv_offset(t_lo, 8 * quad + i + 1));
      hi = ld_shared_v4(raw + raw_ckv_offset(t_hi, 8 * quad + i + 1));
    }
    wgmma_fence();
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int kk = i < 0 ? 32 + w : 4 * i + w;  // k step: column block kk / 4 of Q, 32 bytes per step
      const uint64_t desc = sm90::desc_of(dq + (((kk >> 2) * (kN * 128) + (kk & 3) * 32) >> 4));
      if (i < 0) wgmma_m64nNk16_rs_f16<kN>(acc_pe, f[w], desc, w > 0);
      else wgmma_m64nNk16_rs_f16<kN>(acc_c, f[w], desc, i > 0 || w > 0);
    }
    wgmma_commit();
  }
  wgmma_wait<0>();
  fence_fragment_sets(frag);
  fence_regs(acc_c);
  fence_regs(acc_pe);
}

// O^T [512 x kN] (+)= V^T P^T of a raw stage, A from registers (rows permuted, see above: this thread's c_kv chunk
// `chunk` = 8 warp + lane / 4). k step j (tokens 16 j ..): 16-byte loads of tokens 16 j + 2 quad + {0, 1, 8, 9};
// byte 2 b (+ 1) of the token pairs {0, 1} and {8, 9} interleaved (PRMT) are fragments a0 (a1) and a2 (a3) of
// M-block b. Fragment sets u = 0, 1, ..: a whole k step (8 M-blocks) at kN = 16; at kN = 32, whose O^T takes 64 more
// registers, half a k step each (part h: M-blocks h, h + 2, h + 4, h + 6, the byte pairs {2 h, 2 h + 1} of each
// word), in two register sets used alternately. Every wgmma is its own commit group, and after wgmma i of set u the
// thread converts block i of set u + 1 (wait_group kSetBlocks first: wgmma i of set u - 1 read those registers), so
// the conversions run between the wgmmas instead of after all of them (1-2 % faster at H=16, twelfth session). The
// loads of k step j + 1 are issued when the last set of k step j starts (its words are converted by then). With
// `restart`, O = V^T P^T (whatever O held is discarded). dp: desc_lo of P^T (k step j: 32 bytes further).
// The kernel runs this at kN = 32 only: kN = 16 uses pv_raw_mma, which measured faster there (its kN = 16 branches
// here are kept as the measured reference, not instantiated).
template <int kN>
__device__ __forceinline__ void pv_raw(float (&o)[8][kN / 2], uint32_t dp, uint32_t raw, int chunk, int quad,
                                       bool restart) {
  constexpr int kParts = kN == 16 ? 1 : 2;  // fragment sets per k step
  constexpr int kSetBlocks = 8 / kParts;     // M-blocks per set
  constexpr int kSets = kBlockN / 16 * kParts;
  uint32_t frag[2][kSetBlocks][4];
  uint32_t x[4][4];  // words of tokens t0, t0 + 1, t0 + 8, t0 + 9 (t0 = 16 j + 2 quad) of the k step being converted
  auto load_step = [&](int j) {
    const int t0 = 16 * j + 2 * quad;
    const int tok[4] = {t0, t0 + 1, t0 + 8, t0 + 9};
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const uint4 v = ld_shared_v4(raw + raw_ckv_offset(tok[r], chunk));
      x[r][0] = v.x;
      x[r][1] = v.y;
      x[r][2] = v.z;
      x[r][3] = v.w;
    }
  };
  // Block i of a set of part `part`: word w, byte pair h of both token pairs.
  auto convert = [&](uint32_t (&f)[4], int i, int part) {
    const int w = kParts == 1 ? i >> 1 : i, h = kParts == 1 ? i & 1 : part;
    const uint32_t sel = h ? 0x7362u : 0x5140u;
    const uint2 a = e4m3x4_to_f16x4(__byte_perm(x[0][w], x[1][w], sel));
    const uint2 c = e4m3x4_to_f16x4(__byte_perm(x[2][w], x[3][w], sel));
    f[0] = a.x;
    f[1] = a.y;
    f[2] = c.x;
    f[3] = c.y;
  };
#pragma unroll
  for (int mb = 0; mb < 8; ++mb) fence_regs(o[mb]);
  load_step(0);
#pragma unroll
  for (int i = 0; i < kSetBlocks; ++i) convert(frag[0][i], i, 0);
#pragma unroll
  for (int u = 0; u < kSets; ++u) {
    const int j = u / kParts, part = u % kParts;
    if (u + 1 < kSets && part == kParts - 1) load_step(j + 1);
#pragma unroll
    for (int i = 0; i < kSetBlocks; ++i) {
      const int mb = kParts == 1 ? i : 2 * i + part;
      wgmma_fence();  // before every wgmma: registers of the other set were written since the previous one
      wgmma_m64nNk16_rs_f16<kN>(o[mb], frag[u & 1][i], sm90::desc_of(dp + 2 * j), j > 0 || !restart);
      wgmma_commit();
      if (u + 1 < kSets) {
        uint32_t(&f)[4] = frag[(u + 1) & 1][i];
        if (u >= 1) {
          wgmma_wait<kSetBlocks>();  // wgmma i of set u - 1, the last reader of f, is done
          mla_prefill::fence_regs_u32(f);
        }
        convert(f, i, (u + 1) % kParts);
      }
    }
  }
  wgmma_wait<0>();
  fence_fragment_sets(frag);
#pragma unroll
  for (int mb = 0; mb < 8; ++mb) fence_regs(o[mb]);
}

// The same product with per-warp mma.sync m16n8k16 instead of warpgroup wgmmas: the PV of the N=16 kernel. A wgmma
// is warpgroup-collective, so each of pv_raw's 32 waits for the slowest of the 4 warps (on 4 SM sub-partitions, each
// shared with a scores and a producer warp); mma.sync lets each warp run its own 16 dims x kN columns. Measured at
// N=16 (H=16, B=128): s_k=4096 111 -> 108 us, s_k=16384 397 -> 375 us. At N=32 it is slower (144 -> 155 us): twice
// the tensor work per token, and mma.sync has half the wgmma's rate. The A fragments and the O^T registers are the
// wgmma's per-warp ones; B (P^T, [kN x 64 tokens] swizzled as written by the softmax) comes by ldmatrix: for k step
// j, matrix 2 nb + h is n-block nb, token chunk 2 j + h. No register is read asynchronously, so one fragment at a
// time and no wait_group. `restart`: O = V^T P^T.
template <int kN>
__device__ __forceinline__ void pv_raw_mma(float (&o)[8][kN / 2], uint32_t sp, uint32_t raw, int chunk, int quad,
                                           bool restart) {
  constexpr int kNb = kN / 8;  // n-blocks of 8 columns
  const int lane = threadIdx.x & 31;
  if (restart) {
#pragma unroll
    for (int mb = 0; mb < 8; ++mb)
#pragma unroll
      for (int i = 0; i < kN / 2; ++i) o[mb][i] = 0.f;
  }
#pragma unroll
  for (int j = 0; j < kBlockN / 16; ++j) {
    const int t0 = 16 * j + 2 * quad;
    const uint4 x0 = ld_shared_v4(raw + raw_ckv_offset(t0, chunk));
    const uint4 x1 = ld_shared_v4(raw + raw_ckv_offset(t0 + 1, chunk));
    const uint4 x8 = ld_shared_v4(raw + raw_ckv_offset(t0 + 8, chunk));
    const uint4 x9 = ld_shared_v4(raw + raw_ckv_offset(t0 + 9, chunk));
    const uint32_t w0[4] = {x0.x, x0.y, x0.z, x0.w}, w1[4] = {x1.x, x1.y, x1.z, x1.w};
    const uint32_t w8[4] = {x8.x, x8.y, x8.z, x8.w}, w9[4] = {x9.x, x9.y, x9.z, x9.w};
    uint32_t b[kNb / 2][4];  // per pair of n-blocks: b0, b1 of n-block 2 p, then of 2 p + 1
#pragma unroll
    for (int pr = 0; pr < kNb / 2; ++pr) {
      const int m = lane >> 3, c = 8 * (2 * pr + (m >> 1)) + (lane & 7), ch = 2 * j + (m & 1);
      ldmatrix_x4(b[pr], sp + c * 128 + ((ch ^ (c & 7)) << 4));
    }
#pragma unroll
    for (int w = 0; w < 4; ++w) {  // word w: dims 4 w .. 4 w + 3 of the chunk = M-blocks 2 w, 2 w + 1
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t sel = h ? 0x7362u : 0x5140u;  // bytes {2h, 2h + 1} of both tokens, interleaved
        const uint2 a = e4m3x4_to_f16x4(__byte_perm(w0[w], w1[w], sel));
        const uint2 c = e4m3x4_to_f16x4(__byte_perm(w8[w], w9[w], sel));
        const uint32_t f[4] = {a.x, a.y, c.x, c.y};
        const int mb = 2 * w + h;
#pragma unroll
        for (int nb = 0; nb < kNb; ++nb)
          mma_m16n8k16_f16(*reinterpret_cast<float(*)[4]>(&o[mb][4 * nb]), f, b[nb >> 1][2 * (nb & 1)],
                           b[nb >> 1][2 * (nb & 1) + 1]);
      }
    }
  }
}

// Column c of the pipelined kernel's O^T times `inv` (registers o[b][i0] and o[b][i0 + 2]: dims 16 chunk + 2 b and
// + 1) into sequence b's output: bf16 (two 16-byte stores) when the sequence has one split, else the fp32 partial of
// split `slot` (four).
template <int kN>
__device__ __forceinline__ void store_o_column_raw(const DecodeParams& p, const float (&o)[8][kN / 2], int i0,
                                                   float inv, int b, int c, int chunk, bool single, int64_t slot) {
  float v[16];
#pragma unroll
  for (int mb = 0; mb < 8; ++mb) {
    v[2 * mb] = o[mb][i0] * inv;
    v[2 * mb + 1] = o[mb][i0 + 2] * inv;
  }
  if (single) {
    uint4* dst = reinterpret_cast<uint4*>(p.out + (static_cast<int64_t>(b) * p.rows + c) * kVDim + 16 * chunk);
#pragma unroll
    for (int h = 0; h < 2; ++h)
      dst[h] = make_uint4(pack_bf16x2(v[8 * h], v[8 * h + 1]), pack_bf16x2(v[8 * h + 2], v[8 * h + 3]),
                          pack_bf16x2(v[8 * h + 4], v[8 * h + 5]), pack_bf16x2(v[8 * h + 6], v[8 * h + 7]));
  } else {
    float4* dst = reinterpret_cast<float4*>(p.o_part + (slot * p.rows + c) * kVDim + 16 * chunk);
#pragma unroll
    for (int h = 0; h < 4; ++h) dst[h] = make_float4(v[4 * h], v[4 * h + 1], v[4 * h + 2], v[4 * h + 3]);
  }
}

// Warpgroup 0 of the pipelined kernel: S^T, scaled per token (with kMaxInScores also masked, with each warp's column
// maxima and max s_c), into the S slots (see above). Its own cursor over the run (as the other roles'), so the three
// never exchange positions.
template <int kN>
__device__ __forceinline__ void narrow_fp8_scores(const DecodeParams& p, Cursor cur, int count, uint32_t base,
                                                  uint8_t* smem) {
  using L = NarrowFp8Smem<kN>;
  constexpr int kStages = L::kStages;
  constexpr int kCols = kN / 4;
  const int t = threadIdx.x & 127, warp = t >> 5, lane = threadIdx.x & 31, quad = lane & 3;
  const int t_lo = warp * 16 + (lane >> 2), t_hi = t_lo + 8;
  auto col = [&](int jj) { return 8 * (jj >> 1) + 2 * quad + (jj & 1); };
  float* s_qscale = reinterpret_cast<float*>(smem + L::kQScale);
  const uint32_t sq = base + L::kQ;
  const uint32_t bar_full = base + L::kBar, bar_empty = bar_full + 8 * kStages,
                 bar_sfull = bar_empty + 8 * kStages, bar_sempty = bar_sfull + 16;

  // The log2 softmax scales of this thread's columns (their Q rows' times 2^-e_c), for the S slot of a sequence's
  // first tile: through the slot rather than qscale, which the next sequence's Q may overwrite before the value
  // warpgroup gets to a one-tile sequence.
  float qs[kCols];
#pragma unroll
  for (int jj = 0; jj < kCols; ++jj) qs[jj] = 0.f;
  int rs = 0, rph = 0;   // raw stage of tile k and its phase parity
  uint4 qv[kN / 16][9];  // Q of the next sequence to start, in registers
  fetch_q_rows<kN>(p, cur.b, qv);
  // count is the same in every thread (the CTA's schedule entry), but the compiler cannot tell: through redux.sync
  // (a uniform-register result) the loop counter, the S slot and the wgmma descriptors live in uniform registers.
  count = __reduce_min_sync(0xffffffffu, count);
  for (int k = 0; k < count; ++k) {
    const bool first = k == 0 || cur.t == 0;
    const bool last = k == count - 1 || cur.t == cur.n - 1;
    const int st = k & 1;  // S slot
    if (first) {
      if (k > 0) named_bar_sync<128>(2);  // every warp's S^T of the previous sequence is done with Q and qscale
      store_q_f16<kN>(p, qv, sq, s_qscale);
      fence_proxy_async();  // Q, for this warpgroup's wgmma
      named_bar_sync<128>(2);
#pragma unroll
      for (int jj = 0; jj < kCols; ++jj) qs[jj] = s_qscale[col(jj)];
    }
    if (last && k + 1 < count) {  // the next sequence's Q, in flight during this tile
      Cursor next = cur;
      next.advance(p);
      fetch_q_rows<kN>(p, next.b, qv);
    }
    mbar_wait(bar_full + 8 * rs, rph);
    const uint32_t raw = base + L::kRaw + rs * kRawTileBytes;
    // {s_c, s_pe} of this thread's two tokens.
    const float2* fac = reinterpret_cast<const float2*>(smem + L::kRaw + rs * kRawTileBytes + kRawScaleOff);
    const float2 f_lo = fac[t_lo], f_hi = fac[t_hi];
    float s[kN / 2], s_pe[kN / 2];
    qk_raw<kN>(s, s_pe, sm90::desc_lo(sq), raw, t_lo, t_hi, quad);
    // This thread's reads of the stage are done (fragments and scales in registers); the value warpgroup arrives for
    // its own.
    mbar_arrive(bar_empty + 8 * rs);
    if (++rs == kStages) {
      rs = 0;
      rph ^= 1;
    }
#pragma unroll
    for (int i = 0; i < kN / 2; ++i)
      s[i] = (i & 2) ? s[i] * f_hi.x + s_pe[i] * f_hi.y : s[i] * f_lo.x + s_pe[i] * f_lo.y;
    // kMaxInScores: the mask and this warp's column maxima and max s_c, here rather than in the value warpgroup.
    float mx[kCols], gmax = 0.f;
    if constexpr (kMaxInScores<kN>) mask_and_warp_maxima<kN>(s, p, cur, t_lo, t_hi, quad, f_lo.x, f_hi.x, mx, gmax);

    // Into slot st once the value warpgroup has read tile k - 2 there (parity trick: the first use of each slot passes
    // at once); the softmax (and without kMaxInScores the mask) runs there.
    mbar_wait(bar_sempty + 8 * st, ((k >> 1) & 1) ^ 1);
    uint8_t* sx = smem + L::kS + st * L::kSlotBytes;
    slot_store<kN / 2>(sx + L::kSlotS, s, t);
    reinterpret_cast<float2*>(sx + L::kSlotSc)[t] = make_float2(f_lo.x, f_hi.x);
    if (first) slot_store<kCols>(sx + L::kSlotQs, qs, t);
    if constexpr (kMaxInScores<kN>)
      publish_warp_maxima<kN>(mx, gmax, reinterpret_cast<float*>(sx + L::kSlotRed),
                              reinterpret_cast<float*>(sx + L::kSlotSig), warp, lane, col);
    mbar_arrive(bar_sfull + 8 * st);
    cur.advance(p);
  }
}

// Warpgroup 1 of the pipelined kernel: the online softmax of the S slots, P^T, O^T over all 512 dims, the output and
// lse at each sequence's last tile.
template <int kN>
__device__ __forceinline__ void narrow_fp8_values(const DecodeParams& p, Cursor cur, int count, int split,
                                                  uint32_t base, uint8_t* smem) {
  using L = NarrowFp8Smem<kN>;
  constexpr int kStages = L::kStages;
  constexpr int kCols = kN / 4;
  constexpr int kBar = 4;  // this warpgroup's named barrier (2: warpgroup 0's Q; 1 and 3: the other decode kernels)
  // The running max moves only by more than 8 (log2: P up to 256), so that O^T is rescaled (kN / 2 x 8 FMULs per
  // thread) in few tiles after a sequence's first ones rather than whenever any of the warp's columns got a new max.
  constexpr int kLazyMax = 8;
  const int t = threadIdx.x & 127, warp = t >> 5, lane = threadIdx.x & 31, quad = lane & 3;
  // S^T rows of this thread's slot values (the tokens of warpgroup 0's thread t) and its 16 value dims (O^T rows).
  const int t_lo = warp * 16 + (lane >> 2), t_hi = t_lo + 8;
  const int chunk = 8 * warp + (lane >> 2);
  auto col = [&](int jj) { return 8 * (jj >> 1) + 2 * quad + (jj & 1); };
  const uint32_t bar_full = base + L::kBar, bar_empty = bar_full + 8 * kStages,
                 bar_sfull = bar_empty + 8 * kStages, bar_sempty = bar_sfull + 16;

  float o[8][kN / 2];
  // Per column of this thread: running max (log2 domain), partial sum over this thread's tokens, the log2 softmax
  // scale of the column's Q row (times 2^-e_c). sig_prev: E of the previous tile's sigma.
  float m[kCols], l[kCols], qs[kCols];
  online_softmax_init<kN>(o, m, l, qs);
  int sig_prev = 0;
  int rs = 0, rph = 0;  // raw stage of tile k and its phase parity
  count = __reduce_min_sync(0xffffffffu, count);  // uniform, as in narrow_fp8_scores
  for (int k = 0; k < count; ++k) {
    const bool first = k == 0 || cur.t == 0;
    const bool last = k == count - 1 || cur.t == cur.n - 1;
    const int st = k & 1;  // S slot
    mbar_wait(bar_sfull + 8 * st, (k >> 1) & 1);
    const uint8_t* sx = smem + L::kS + st * L::kSlotBytes;
    float s[kN / 2];  // masked by the scores with kMaxInScores
    slot_load<kN / 2>(s, sx + L::kSlotS, t);
    const float2 sc = reinterpret_cast<const float2*>(sx + L::kSlotSc)[t];  // s_c of tokens t_lo, t_hi
    if (first) {
      slot_load<kCols>(qs, sx + L::kSlotQs, t);
#pragma unroll
      for (int jj = 0; jj < kCols; ++jj) {
        m[jj] = -INFINITY;
        l[jj] = 0.f;
      }
    }
    // The tile's column maxima w and max s_c over the 4 warps' maxima over their 16 tokens.
    float w[kCols], smax;
    if constexpr (kMaxInScores<kN>) {  // computed by the scores, in the slot
      warps_column_max<kN>(reinterpret_cast<const float*>(sx + L::kSlotRed), quad, w);
      const float* sig = reinterpret_cast<const float*>(sx + L::kSlotSig);
      smax = fmaxf(fmaxf(sig[0], sig[1]), fmaxf(sig[2], sig[3]));
      // This thread's reads of slot st are done (registers).
      mbar_arrive(bar_sempty + 8 * st);
    } else {
      mbar_arrive(bar_sempty + 8 * st);  // this thread's reads of slot st are done (registers)
      float mx[kCols], gmax;
      mask_and_warp_maxima<kN>(s, p, cur, t_lo, t_hi, quad, sc.x, sc.y, mx, gmax);
      float* red = reinterpret_cast<float*>(smem + L::kRed);
      float* red_sig = reinterpret_cast<float*>(smem + L::kRedSig);
      publish_warp_maxima<kN>(mx, gmax, red, red_sig, warp, lane, col);
      named_bar_sync<128>(kBar);
      warps_column_max<kN>(red, quad, w);
      smax = fmaxf(fmaxf(red_sig[0], red_sig[1]), fmaxf(red_sig[2], red_sig[3]));
    }

    // sigma = 2^(E - 14 + kLazyMax) with E = floor(log2 max s_c) (scales are >= 0: the exponent field; clamped so
    // that sigma and 1 / sigma stay normal fp32): P s_c / sigma < 2^15 for P <= 2^kLazyMax, inside f16's range.
    const int sig_e = sigma_exponent(smax);
    const float inv_sigma = pow2f(14 - kLazyMax - sig_e);
    // O^T is in units of the previous tile's sigma: times sigma_{k-1} / sigma_k (first tile: O restarts).
    const float ratio = pow2f(first ? 0 : sigma_shift(sig_prev, sig_e));
    sig_prev = sig_e;
    float a[kCols];
    softmax_update<kN, kLazyMax>(s, w, qs, m, l, a);
    // Tile k's P^T and row sums: buffer k & 1 with kMaxInScores, else the one buffer (see NarrowFp8Smem).
    const int pb = L::kPBufs == 2 ? st : 0;
    const uint32_t sp = base + L::kP + pb * L::kQBlock;
    float* red_l = reinterpret_cast<float*>(smem + L::kRedL) + pb * 4 * kN;
    // P^T [kN x 64 tokens] f16 of P s_c / sigma, K-major swizzled as in decode_narrow_kernel.
    const float g_lo = sc.x * inv_sigma, g_hi = sc.y * inv_sigma;
#pragma unroll
    for (int i = 0; i < kN / 2; ++i) {
      const int c = 8 * (i >> 2) + 2 * quad + (i & 1), tok = (i & 2) ? t_hi : t_lo;
      st_shared_b16(sp + c * 128 + (((tok >> 3) ^ (c & 7)) << 4) + (tok & 7) * 2,
                    __float2half_rn(s[i] * ((i & 2) ? g_hi : g_lo)));
    }
    fence_proxy_async();  // P^T, for this warpgroup's wgmma
    // Every warp's P^T before the PV; at a sequence's last tile the same barrier publishes its row sums over all its
    // tokens (red_l, read for the output after the PV).
    if (last) publish_column_sums<kN>(l, red_l, warp, lane, col, kBar);
    else named_bar_sync<128>(kBar);
    // O *= alpha' = alpha sigma_{k-1} / sigma_k, skipped where it is the identity (every factor of the warp exactly
    // 1: no column max moved and sigma unchanged) or discarded (first tile: the PV restarts O).
    if (!first) {
#pragma unroll
      for (int jj = 0; jj < kCols; ++jj) a[jj] *= ratio;
      rescale_o<kN>(o, a);
    }
    mbar_wait(bar_full + 8 * rs, rph);  // complete already (S^T(k) needed it): orders the V reads after the copies
    // N=16: per-warp mma.sync (faster there); N=32: wgmmas (mma.sync measured slower, see pv_raw_mma).
    if constexpr (kN == 16) pv_raw_mma<kN>(o, sp, base + L::kRaw + rs * kRawTileBytes, chunk, quad, first);
    else pv_raw<kN>(o, sm90::desc_lo(sp), base + L::kRaw + rs * kRawTileBytes, chunk, quad, first);
    // Raw stage rs (V) read by this thread.
    mbar_arrive(bar_empty + 8 * rs);
    if (++rs == kStages) {
      rs = 0;
      rph ^= 1;
    }

    if (last) {  // output factor sigma / l per column, and the lse
      const float sigma = pow2f(sig_e + kLazyMax - 14);
      const int ns = __ldg(p.nsplit + cur.b);
      const int64_t slot = ns == 1 ? 0 : __ldg(p.cu_partial + cur.b) + split;
#pragma unroll
      for (int jj = 0; jj < kCols; ++jj) {
        const int c = col(jj);
        if (c >= p.rows) continue;
        const float lc = warpgroup_column_sum<kN>(red_l, c);
        store_o_column_raw<kN>(p, o, 4 * (jj >> 1) + (jj & 1), lc > 0.f ? sigma / lc : 0.f, cur.b, c, chunk, ns == 1,
                           slot);
        if (warp == 0 && lane < 4) {
          const float lse = lc > 0.f ? m[jj] * 0.69314718055994531f + logf(lc) : (ns == 1 ? INFINITY : -INFINITY);
          if (ns == 1) {
            const int i = c / p.heads, h = c - i * p.heads;
            p.lse[(static_cast<int64_t>(cur.b) * p.heads + h) * p.s_q + i] = lse;
          } else {
            p.lse_part[slot * p.rows + c] = lse;
          }
        }
      }
      split = 0;  // later sequences of the run start with their first split
    }
    cur.advance(p);
  }
}

template <int kN>
__global__ void __launch_bounds__(384, 1) decode_narrow_fp8_kernel(const __grid_constant__ DecodeParams p) {
  using L = NarrowFp8Smem<kN>;
  constexpr int kStages = L::kStages;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw), base = (raw + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base - raw);
  const uint32_t bar_full = base + L::kBar, bar_empty = bar_full + 8 * kStages,
                 bar_sfull = bar_empty + 8 * kStages, bar_sempty = bar_sfull + 16;

  // Programmatic dependent of the metadata kernel, as the other decode kernels: no global access above.
  griddep_wait();
  griddep_launch_dependents();
  const int4 sched = reinterpret_cast<const int4*>(p.sched)[blockIdx.x];
  const int count = sched.z;
  if (count <= 0) return;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int st = 0; st < kStages; ++st) {
      mla_prefill::mbar_init(bar_full + 8 * st, 128);
      mla_prefill::mbar_init(bar_empty + 8 * st, kThreads);
    }
#pragma unroll
    for (int st = 0; st < 2; ++st) {
      mla_prefill::mbar_init(bar_sfull + 8 * st, 128);   // warpgroup 0's threads
      mla_prefill::mbar_init(bar_sempty + 8 * st, 128);  // warpgroup 1's threads
    }
    sm90::fence_mbar_init();
  }
  __syncthreads();  // the last CTA-wide barrier: from here on the roles only meet at mbarriers

  Cursor cur;
  cur.set(p, sched.x, sched.y);
  const int wg = threadIdx.x >> 7;
  if (wg == 2) {
    mla_prefill::setmaxnreg_dec<kNarrowProducerRegs<kN>>();
    fp8_producer_raw<kStages>(p, cur, count, base + L::kRaw, bar_full, bar_empty);
  } else if (wg == 0) {
    mla_prefill::setmaxnreg_inc<kNarrowScoreRegs<kN>>();
    narrow_fp8_scores<kN>(p, cur, count, base, smem);
  } else {
    mla_prefill::setmaxnreg_inc<kNarrowValueRegs<kN>>();
    narrow_fp8_values<kN>(p, cur, count, sched.w, base, smem);
  }
}

template <int kN>
void launch_narrow_fp8(const DecodeParams& p, int parts, bool programmatic, cudaStream_t stream) {
  constexpr int smem = NarrowFp8Smem<kN>::kBytes + kSmemSlack;
  auto* kernel = decode_narrow_fp8_kernel<kN>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  launch_kernel(programmatic, kernel, dim3(parts), dim3(384), smem, stream, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The pipelined e4m3 kernel runs every narrow shape unless DSV2_DECODE_FP8_PIPE=0 (A/B against the one-stage kernel).
// Read per call: cheap next to a launch.
bool fp8_pipelined() {
  const char* v = std::getenv("DSV2_DECODE_FP8_PIPE");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

}  // namespace

void launch_decode_narrow(const DecodeParams& p, bool fp8, int parts, bool programmatic, cudaStream_t stream) {
  TORCH_CHECK(p.rows >= 1 && p.rows <= kNarrowMaxRows, "decode_attention: narrow kernel needs s_q * H <= ",
              kNarrowMaxRows);
  if (p.rows <= 16) {
    if (fp8 && fp8_pipelined()) launch_narrow_fp8<16>(p, parts, programmatic, stream);
    else if (fp8) launch_narrow<true, 16>(p, parts, programmatic, stream);
    else launch_narrow<false, 16>(p, parts, programmatic, stream);
  } else {
    if (fp8 && fp8_pipelined()) launch_narrow_fp8<32>(p, parts, programmatic, stream);
    else if (fp8) launch_narrow<true, 32>(p, parts, programmatic, stream);
    else launch_narrow<false, 32>(p, parts, programmatic, stream);
  }
}

}  // namespace mla_decode
}  // namespace dsv2
