// MLA decode attention (absorbed MLA over the paged latent cache) for sm_90a, and its C++ entry.
//
// Grid: (CTA parts of the split-KV schedule, 64-row query blocks). A CTA owns 64 query rows (s_q x heads of one
// sequence, padded) and walks its part's run of 64-token KV tiles, which may span several sequences. Per tile:
//   * bf16 cache: 16-byte cp.async into a 128-byte-swizzled shared tile (two stages), tile k + 1 issued by
//     warpgroup 1 alone while tile k is computed (see decode_kernel). Each token's row address goes through the
//     block table, so any block size works; tokens past the sequence end are zero-filled, never read (unused pages
//     may hold NaN);
//   * e4m3 cache: a third warpgroup (the producer, 104 registers after setmaxnreg) streams the raw rows into
//     registers (one tile in flight, each row's block-table entry resolved a tile earlier) and converts them into one
//     of two f16 stages while the consumers compute the previous tile (mbarriers full/empty per stage). The stage
//     holds the e4m3 codes as f16 (one cvt per pair, exact); the consumers run f16 MMAs with Q converted in place to
//     f16 (each row times a power of two, q_to_f16) and P as f16 P s_c / sigma (a power of two per tile), and apply
//     the per-token scales in fp32 (k_pe part of S scaled by s_pe / s_c, then S columns by s_c). Until the
//     fourteenth session the stage held bf16 e4m3 * 2^-112 (three more integer instructions per pair: the producer,
//     busy ~90 % of the time, set the pace; H=128 s_k=4096 452 -> 410 us);
//   * warpgroup 0 computes S = Q K^T (36 wgmma m64n64k16, Q and K from shared memory), masks the tail and the causal
//     triangle, runs the online softmax in fp32 (exp2 of log2e-scaled scores), and writes P (bf16; e4m3: f16) and
//     the per-row rescale factor to shared memory;
//   * both warpgroups rescale and accumulate O += P V for their 256 output columns (4 wgmma m64n256k16, V being the
//     same shared tile read MN-major), so the 64 x 512 fp32 accumulator takes 128 registers per thread.
// The consumers synchronize with __syncthreads (bf16 cache, 256 threads) or named barrier 1 (e4m3 cache: the producer
// runs ahead on its own). At the end of a sequence's run the CTA writes bf16 out and lse directly when the sequence
// has one split, else a normalized fp32 partial and its lse for decode_combine.cu.
// Shapes with s_q * H <= kNarrowMaxRows (32) run decode_attention_narrow.cu instead (same schedule and outputs, MMAs
// transposed so that no padded query rows are computed); DSV2_DECODE_NARROW=0 keeps them here.

#include "../common/torch_cuda.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>

#include "../ops.h"
#include "decode_common.cuh"
#include "decode_kv.cuh"      // cursor, tile loads, e4m3 producer
#include "prefill_common.cuh"  // mbarriers, named barriers, setmaxnreg
#include "rope_common.cuh"     // unpack_bf16x8

namespace dsv2 {
namespace mla_decode {
namespace {

// The e4m3 path's producer/consumer synchronization (prefill_common.cuh).
using mla_prefill::mbar_arrive;
using mla_prefill::mbar_wait;
using mla_prefill::named_bar_sync;
using mla_prefill::setmaxnreg_dec;
using mla_prefill::setmaxnreg_inc;

__device__ __forceinline__ void load_q(const DecodeParams& p, uint32_t dst, int b, int m_block) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = (threadIdx.x >> 3) + 32 * half;
    load_q_row(p, dst, b, m_block * kBlockM + row, row);
  }
}

// S[64 x 64] (+)= Q[64 x 576] K[64 x 576]^T over the 16-column k steps [kk0, kk1) by warpgroup 0 (step kk reads 16
// columns, 32 bytes into a column block); `first_zeroes`: the first step overwrites S instead of accumulating.
template <int kk0, int kk1, bool first_zeroes, bool kF16 = false>
__device__ __forceinline__ void qk_steps(float (&s)[32], uint32_t q, uint32_t kv) {
  fence_regs(s);
  wgmma_fence();
#pragma unroll
  for (int kk = kk0; kk < kk1; ++kk) {
    const uint32_t off = (kk >> 2) * kColBlockBytes + (kk & 3) * 32;
    wgmma_m64n64k16_ss<kF16>(s, smem_desc(q + off, 16), smem_desc(kv + off, 16), !(first_zeroes && kk == kk0));
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(s);
}

// S = Q K^T over all 36 k steps (bf16 cache).
__device__ __forceinline__ void qk_gemm(float (&s)[32], uint32_t q, uint32_t kv) {
#pragma unroll
  for (int i = 0; i < 32; ++i) s[i] = 0.f;
  qk_steps<0, kKvDim / 16, true>(s, q, kv);
}

// S columns times one of the stage's two per-token factors ({r, f}, see qk_gemm_fp8): register 4j + e holds column
// 8j + 2 quad + (e & 1), so one 16-byte load gives the pair of both columns.
template <bool kSecond>
__device__ __forceinline__ void scale_cols_fp8(float (&s)[32], const float* fac, int quad) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float4 rf = *reinterpret_cast<const float4*>(fac + (8 * j + 2 * quad) * 2);
    const float c0 = kSecond ? rf.y : rf.x, c1 = kSecond ? rf.w : rf.z;
    s[4 * j] *= c0;
    s[4 * j + 1] *= c1;
    s[4 * j + 2] *= c0;
    s[4 * j + 3] *= c1;
  }
}

// e4m3 cache (f16 Q and tile: Q rows times 2^e_r, the tile's e4m3 codes; `fac` the stage's {r, f = s_c} per token):
// the k_pe part first (4 k steps), scaled per column by r in fp32, then the c_kv part (32 steps) accumulated on top,
// then every column scaled by f. S then carries each row's 2^e_r (folded into its log2 scale). Exact apart from fp32
// rounding (the old dequantization to bf16 rounded each k_pe and c_kv value).
__device__ __forceinline__ void qk_gemm_fp8(float (&s)[32], uint32_t q, uint32_t kv, const float* fac, int quad) {
#pragma unroll
  for (int i = 0; i < 32; ++i) s[i] = 0.f;
  qk_steps<kVDim / 16, kKvDim / 16, true, true>(s, q, kv);  // k_pe
  scale_cols_fp8<false>(s, fac, quad);
  qk_steps<0, kVDim / 16, false, true>(s, q, kv);  // c_kv, accumulated on top
  scale_cols_fp8<true>(s, fac, quad);
}

// O[64 x 256] += P[64 x 64] V[64 x 256]: V's 256 columns are 4 column blocks of the tile (8 KB apart), 16 tokens are
// two 8-row groups (2 KB per k step).
// With `restart`, O = P V instead (whatever O held, even NaN, is discarded). kF16: f16 P and V (e4m3 cache).
template <bool kF16>
__device__ __forceinline__ void pv_gemm(float (&o)[128], uint32_t sp, uint32_t v, bool restart) {
  fence_regs(o);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk)
    wgmma_m64n256k16_ss_tb<kF16>(o, smem_desc(sp + kk * 32, 16), smem_desc(v + kk * 2048, kColBlockBytes),
                           kk > 0 || !restart);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(o);
}

// e4m3 cache: the landed bf16 Q tile -> f16 in place, each row r times 2^e_r (f16_row_exponent: its max |q| 2^e_r in
// [2^14, 2^15)), by warpgroup 0 at a sequence's first tile. bf16 -> f16 after the power-of-two scale is exact for every
// value within 2^31 of the row max (f16 keeps bf16's 8 significant bits down to 2^-17); smaller ones round to a
// multiple of 2^-24, an absolute error below 2^-39 of the row max. A thread converts its accumulator rows r_lo, r_hi
// with the other 3 lanes of its quad (lane q: chunks q and q + 4 of each column block): one pass for the max, one
// for the conversion. Returns 2^-e_r of both rows (for their log2 softmax scales).
__device__ __forceinline__ float2 q_to_f16(uint32_t sq, int r_lo, int r_hi, int quad) {
  float inv[2];
#pragma unroll
  for (int hs = 0; hs < 2; ++hs) {
    const int r = hs ? r_hi : r_lo;
    auto chunk = [&](int i) {  // i = 2 k + h: chunk quad + 4 h of column block k
      return sq + (i >> 1) * kColBlockBytes + r * 128 + (((quad + 4 * (i & 1)) ^ (r & 7)) << 4);
    };
    float mx = 0.f, x[8];
#pragma unroll
    for (int i = 0; i < 18; ++i) {
      mla_rope::unpack_bf16x8(ld_shared_v4(chunk(i)), x);
#pragma unroll
      for (int e = 0; e < 8; ++e) mx = fmaxf(mx, fabsf(x[e]));
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const int e = f16_row_exponent(mx);
    const float up = pow2f(e);
#pragma unroll
    for (int i = 0; i < 18; ++i) {
      mla_rope::unpack_bf16x8(ld_shared_v4(chunk(i)), x);
      st_shared_v4(chunk(i), pack_f16x2(x[0] * up, x[1] * up), pack_f16x2(x[2] * up, x[3] * up),
                   pack_f16x2(x[4] * up, x[5] * up), pack_f16x2(x[6] * up, x[7] * up));
    }
    inv[hs] = pow2f(-e);
  }
  return make_float2(inv[0], inv[1]);
}

// Accumulator layout of wgmma m64nN (per warpgroup thread): register i holds row 16 * warp + lane / 4 + 8 * ((i >> 1)
// & 1) and column 8 * (i >> 2) + 2 * (lane & 3) + (i & 1). "lo" rows are r, "hi" rows r + 8.
//
// bf16 cache: tile k + 1 is issued by warpgroup 1 alone right after the top barrier of tile k (that barrier proves
// both warpgroups finished PV(k - 1), so its stage is free), rather than by all threads after a third barrier at the
// bottom of tile k - 1 (measured slower everywhere): same prefetch window, one CTA barrier less, and warpgroup 0 has
// no block-table load or cp.async on its path. O *= alpha (both caches) is skipped when it would multiply by exactly 1
// (the warp's rows kept their max; e4m3 also its sigma) or the tile restarts O: for e4m3 since the fifteenth session,
// -1 to -2 % at H=64 and 128.
template <bool kFp8>
__global__ void __launch_bounds__(kCtaThreads<kFp8>, 1) decode_kernel(const __grid_constant__ DecodeParams p) {
  using L = Smem<kFp8>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw), base = (raw + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base - raw);
  float* s_alpha = reinterpret_cast<float*>(smem + L::kRow);
  float* s_l = s_alpha + kBlockM;
  float* s_m = s_l + kBlockM;
  float* s_sig = reinterpret_cast<float*>(smem + L::kSig);  // e4m3: sigma of a sequence's last tile, for the output
  // e4m3 path: full[s] (the producer's 128 threads arrive: stage s converted), empty[s] (all 256 consumer threads
  // arrive: stage s read).
  const uint32_t bar_full = base + L::kBar, bar_empty = bar_full + 16;

  // Programmatic dependent of the metadata kernel (common/pdl.cuh): no global access above. After the wait the
  // schedule, and everything the kernels before the metadata kernel wrote (cache, lengths, q), is visible. The
  // combine kernel may then be queued: its CTAs fit only on SMs this grid has left, and wait for its completion.
  griddep_wait();
  griddep_launch_dependents();
  const int4 sched = reinterpret_cast<const int4*>(p.sched)[blockIdx.x];
  const int count = sched.z;
  if (count <= 0) return;
  const int m_block = blockIdx.y;
  const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, quad = lane & 3;
  const int r_lo = warp * 16 + (lane >> 2), r_hi = r_lo + 8;

  Cursor cur, ld;
  cur.set(p, sched.x, sched.y);
  ld = cur;
  int split = sched.w;

  if constexpr (kFp8) {
    init_fp8_stage_barriers<2>(bar_full, bar_empty);
    if (wg == 2) {  // producer: see fp8_producer (decode_kv.cuh)
      setmaxnreg_dec<kProducerRegs>();
      fp8_producer(p, ld, count, base + L::kKV, base + L::kScale, bar_full, bar_empty);
      return;
    }
    setmaxnreg_inc<kConsumerRegs>();
  }

  // cp.async groups (bf16 cache): {Q, tile 0} by all threads, then per tile k: {tile k + 1} (warpgroup 1, after the
  // top barrier), [{Q of the next sequence}]; at the top of step k everything outstanding is needed (wait 0). e4m3
  // cache: the consumers' only cp.async are the Q loads.
  load_q(p, base + L::kQ, cur.b, m_block);
  uint32_t next_rows[4] = {kNoRow, kNoRow, kNoRow, kNoRow};  // bf16, warpgroup 1: the cache rows of tile `ld`
  if constexpr (!kFp8) {
    bf16_first_tile(p, base + L::kKV, ld, wg, count, next_rows);
  }
  cp_async_commit();

  // Log2 softmax scale of rows r_lo and r_hi (warpgroup 0); e4m3: times the rows' 2^-e_r, set at each sequence's
  // first tile (q_to_f16).
  float scl_lo = p.scale_log2, scl_hi = p.scale_log2;
  // e4m3: E of the last tile's sigma = 2^(E - 14), the power-of-two unit that O is held in (see the softmax).
  int sig_e = 0;

  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f, a_lo = 0.f, a_hi = 0.f;

  for (int k = 0; k < count; ++k) {
    const bool first = k == 0 || cur.t == 0;
    const bool last = k == count - 1 || cur.t == cur.n - 1;
    if constexpr (kFp8) {
      cp_async_wait<0>();  // this thread's part of Q
      fence_proxy_async();
      mbar_wait(bar_full + 8 * (k & 1), (k >> 1) & 1);
      named_bar_sync<kThreads>(1);  // Q ready; P and alpha of the previous tile consumed
    } else {
      cp_async_wait<0>();
      fence_proxy_async();
      __syncthreads();  // tile k (and Q) ready for wgmma; P, alpha and stage (k + 1) & 1 (tile k - 1) are free
      if (wg == 1) bf16_next_tile(p, base + L::kKV, ld, k, count, next_rows);
    }
    if (first) {  // O restarts through the PV wgmma's scale-d = 0 (no register writes here)
      m_lo = m_hi = -INFINITY;
      l_lo = l_hi = 0.f;
    }
    const uint32_t kv = base + L::kKV + (k & 1) * kTileBytes;
    const float* fac = reinterpret_cast<const float*>(smem + L::kScale + (k & 1) * kScaleTileBytes);

    if constexpr (kFp8) {
      if (first) {  // a new sequence's Q landed (bf16): to f16 in place by warpgroup 0
        if (wg == 0) {
          const float2 inv = q_to_f16(base + L::kQ, r_lo, r_hi, quad);
          scl_lo = p.scale_log2 * inv.x;
          scl_hi = p.scale_log2 * inv.y;
          fence_proxy_async();  // f16 Q, for the wgmma
        }
        // Every warp's rows converted. Both warpgroups pass it (barrier 1, as every consumer barrier here): with a
        // warpgroup-0-only barrier 2 instead, racecheck reported hazards on s_alpha that we could not explain.
        named_bar_sync<kThreads>(1);
      }
    }
    if (wg == 0) {
      float s[32];
      if constexpr (kFp8) qk_gemm_fp8(s, base + L::kQ, kv, fac, quad);
      else qk_gemm(s, base + L::kQ, kv);
      // Row i of the s_q queries sees tokens j < len - s_q + 1 + i when causal, else j < len.
      const int tok0 = cur.t * kBlockN;
      const int vis0 = p.causal ? cur.len - p.s_q + 1 : cur.len;
      if (tok0 + kBlockN > vis0) {
        const int g_lo = m_block * kBlockM + r_lo, g_hi = g_lo + 8;
        const int e_lo = p.causal ? min(cur.len, vis0 + g_lo / p.heads) : cur.len;
        const int e_hi = p.causal ? min(cur.len, vis0 + g_hi / p.heads) : cur.len;
#pragma unroll
        for (int i = 0; i < 32; ++i) {
          const int tok = tok0 + 8 * (i >> 2) + 2 * quad + (i & 1);
          if (tok >= ((i & 2) ? e_hi : e_lo)) s[i] = -INFINITY;
        }
      }
      float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        if (i & 2) mx_hi = fmaxf(mx_hi, s[i]);
        else mx_lo = fmaxf(mx_lo, s[i]);
      }
#pragma unroll
      for (int off = 1; off < 4; off <<= 1) {
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
      }
      // Running max in the log2 domain; a row that has seen no key yet keeps -inf and subtracts 0 instead.
      const float n_lo = fmaxf(m_lo, mx_lo * scl_lo), n_hi = fmaxf(m_hi, mx_hi * scl_hi);
      const float u_lo = n_lo == -INFINITY ? 0.f : n_lo, u_hi = n_hi == -INFINITY ? 0.f : n_hi;
      a_lo = fast_exp2(m_lo - u_lo);
      a_hi = fast_exp2(m_hi - u_hi);
      m_lo = n_lo;
      m_hi = n_hi;
      float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        if (i & 2) {
          s[i] = fast_exp2(fmaf(s[i], scl_hi, -u_hi));
          sum_hi += s[i];
        } else {
          s[i] = fast_exp2(fmaf(s[i], scl_lo, -u_lo));
          sum_lo += s[i];
        }
      }
      l_lo = l_lo * a_lo + sum_lo;
      l_hi = l_hi * a_hi + sum_hi;
      // e4m3: P enters the PV product as f16 P s_c / sigma, sigma = 2^(E - 14) with E = floor(log2 max s_c) over the
      // tile's 64 tokens (this thread's 16 columns and its quad's), so that it stays below 2^15 (P <= 1); tokens
      // whose s_c lies more than 2^28 below the tile's largest become f16 subnormals (absolute error under 2^-25
      // sigma |v|). O is held in units of the last tile's sigma: alpha' = alpha sigma_{k-1} / sigma_k (a power of
      // two, exact; a tile that restarts O ignores it), the output is O sigma / l.
      float g_sig = 1.f;  // 1 / sigma
      if constexpr (kFp8) {
        float smax = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float4 rf = *reinterpret_cast<const float4*>(fac + (8 * j + 2 * quad) * 2);
          smax = fmaxf(smax, fmaxf(rf.y, rf.w));
        }
        smax = fmaxf(smax, __shfl_xor_sync(0xffffffffu, smax, 1));
        smax = fmaxf(smax, __shfl_xor_sync(0xffffffffu, smax, 2));
        // Scales are >= 0: E from the exponent field, clamped so that sigma and 1 / sigma stay normal fp32.
        const int e = sigma_exponent(smax);
        g_sig = pow2f(14 - e);
        const float ratio = pow2f(sigma_shift(sig_e, e));
        sig_e = e;
        a_lo *= ratio;
        a_hi *= ratio;
      }
      // P (bf16; e4m3: f16 P s_c / sigma, the V tile holding the unscaled codes) in the K-major swizzled layout that
      // the PV wgmma reads as its A operand.
      const uint32_t sp = base + L::kP;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if constexpr (kFp8) {
          const float4 rf = *reinterpret_cast<const float4*>(fac + (8 * j + 2 * quad) * 2);
          const float g0 = rf.y * g_sig, g1 = rf.w * g_sig;
          s[4 * j] *= g0;
          s[4 * j + 1] *= g1;
          s[4 * j + 2] *= g0;
          s[4 * j + 3] *= g1;
        }
        auto pack = [](float x, float y) { return kFp8 ? pack_f16x2(x, y) : pack_bf16x2(x, y); };
        const uint32_t col = ((j ^ (r_lo & 7)) << 4) + quad * 4;  // r_hi & 7 == r_lo & 7
        st_shared_b32(sp + r_lo * 128 + col, pack(s[4 * j], s[4 * j + 1]));
        st_shared_b32(sp + r_hi * 128 + col, pack(s[4 * j + 2], s[4 * j + 3]));
      }
      if (quad == 0) {
        s_alpha[r_lo] = a_lo;
        s_alpha[r_hi] = a_hi;
      }
      if (last) {
        float t_lo = l_lo, t_hi = l_hi;
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
          t_lo += __shfl_xor_sync(0xffffffffu, t_lo, off);
          t_hi += __shfl_xor_sync(0xffffffffu, t_hi, off);
        }
        if (quad == 0) {
          s_l[r_lo] = t_lo;
          s_l[r_hi] = t_hi;
          s_m[r_lo] = m_lo;
          s_m[r_hi] = m_hi;
        }
        if (kFp8 && threadIdx.x == 0) s_sig[0] = pow2f(sig_e - 14);
      }
      fence_proxy_async();
    }
    // P and alpha written; S done, so Q is free
    if constexpr (kFp8) named_bar_sync<kThreads>(1);
    else __syncthreads();

    Cursor next = cur;
    next.advance(p);
    if (last && k + 1 < count) {
      load_q(p, base + L::kQ, next.b, m_block);
      cp_async_commit();
    }
    if (wg == 1) {
      a_lo = s_alpha[r_lo];
      a_hi = s_alpha[r_hi];
    }
    // A warp-uniform skip (multiplying by exactly 1 changes nothing; a restart discards O). e4m3: alpha includes the
    // sigma ratio, 1 while the tile's largest scale stays in the same binade.
    if (!first && !__all_sync(0xffffffffu, a_lo == 1.f && a_hi == 1.f)) {
#pragma unroll
      for (int i = 0; i < 128; ++i) o[i] *= (i & 2) ? a_hi : a_lo;
    }
    pv_gemm<kFp8>(o, base + L::kP, kv + wg * 4 * kColBlockBytes, first);

    if constexpr (kFp8) {
      // Stage k & 1 fully read (S and the scale slot before the middle barrier, V just now): the producer may refill
      // it. Every thread arrives for its own reads: WG0's threads read the scale slot with plain loads, and an
      // arrive releases only the arriving thread's accesses (one elected lane per warp would rely on the named
      // barrier to carry the other lanes' reads to it, which compute-sanitizer racecheck does not follow; the
      // __syncwarp such code needs compiles to nothing). P, alpha and the row state: the next top barrier.
      mbar_arrive(bar_empty + 8 * (k & 1));
    }

    if (last) {
      const int ns = __ldg(p.nsplit + cur.b);
      const float out_scale = kFp8 ? s_sig[0] : 1.f;
#pragma unroll
      for (int hs = 0; hs < 2; ++hs) {
        const int r = hs ? r_hi : r_lo, g = m_block * kBlockM + r;
        if (g >= p.rows) continue;
        const float l = s_l[r], m = s_m[r];
        const float inv = l > 0.f ? out_scale / l : 0.f;
        const float lse = l > 0.f ? m * 0.69314718055994531f + logf(l) : (ns == 1 ? INFINITY : -INFINITY);
        const int col0 = wg * 256 + 2 * quad;
        if (ns == 1) {
          __nv_bfloat16* dst = p.out + (static_cast<int64_t>(cur.b) * p.rows + g) * kVDim + col0;
#pragma unroll
          for (int j = 0; j < 32; ++j)
            *reinterpret_cast<uint32_t*>(dst + 8 * j) =
                pack_bf16x2(o[4 * j + 2 * hs] * inv, o[4 * j + 2 * hs + 1] * inv);
          if (wg == 0 && quad == 0) {
            const int i = g / p.heads, h = g - i * p.heads;
            p.lse[(static_cast<int64_t>(cur.b) * p.heads + h) * p.s_q + i] = lse;
          }
        } else {
          const int64_t slot = __ldg(p.cu_partial + cur.b) + split;
          float* dst = p.o_part + (slot * p.rows + g) * kVDim + col0;
#pragma unroll
          for (int j = 0; j < 32; ++j)
            *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[4 * j + 2 * hs] * inv, o[4 * j + 2 * hs + 1] * inv);
          if (wg == 0 && quad == 0) p.lse_part[slot * p.rows + g] = lse;
        }
      }
      split = 0;  // later sequences of the run start with their first split
    }
    cur = next;
  }
  cp_async_wait<0>();
}

// s_q * H <= kNarrowMaxRows goes to the narrow kernel (decode_attention_narrow.cu) unless DSV2_DECODE_NARROW=0 (A/B
// comparisons, and tests of the 64-row kernel on narrow shapes). Read per call: cheap next to a launch.
bool narrow_enabled() {
  const char* v = std::getenv("DSV2_DECODE_NARROW");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

template <bool kFp8>
void launch_decode(const DecodeParams& p, dim3 grid, bool programmatic, cudaStream_t stream) {
  constexpr int smem = Smem<kFp8>::kBytes + kSmemSlack;
  auto* kernel = decode_kernel<kFp8>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  launch_kernel(programmatic, kernel, grid, dim3(kCtaThreads<kFp8>), smem, stream, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace mla_decode

std::tuple<at::Tensor, at::Tensor> decode_attention_cuda(const at::Tensor& q_in, const at::Tensor& kv_cache,
                                                         const std::optional<at::Tensor>& kv_scale,
                                                         const at::Tensor& block_table,
                                                         const at::Tensor& cache_seqlens, double softmax_scale,
                                                         bool causal) {
  using namespace mla_decode;
  const char* op = "decode_attention";
  check_cuda(op, "q", q_in);
  check_dtype(op, "q", q_in, at::kBFloat16);
  DSV2_CHECK(q_in.dim() == 4 && q_in.size(3) == kKvDim, op, "q", "must have shape ('*', '*', '*', 576), got ",
             q_in.sizes());
  DSV2_CHECK(q_in.stride(3) == 1, op, "q", "must have a contiguous last dimension, got strides ", q_in.strides());
  const int64_t batch = q_in.size(0), s_q = q_in.size(1), heads = q_in.size(2);

  const bool fp8 = kv_cache.scalar_type() == at::kFloat8_e4m3fn;
  check_same_device(op, "kv_cache", kv_cache, q_in);
  DSV2_CHECK(kv_cache.scalar_type() == at::kBFloat16 || fp8, op, "kv_cache",
             "must have dtype bfloat16 or float8_e4m3fn, got ", kv_cache.scalar_type());
  DSV2_CHECK(kv_cache.dim() == 3 && kv_cache.size(2) == kKvDim, op, "kv_cache",
             "must have shape ('*', '*', 576), got ", kv_cache.sizes());
  DSV2_CHECK(kv_cache.is_contiguous(), op, "kv_cache", "must be contiguous, got strides ", kv_cache.strides());
  DSV2_CHECK(reinterpret_cast<uintptr_t>(kv_cache.data_ptr()) % 16 == 0, op, "kv_cache",
             "must be 16-byte aligned for the CUDA kernel");
  const int64_t num_blocks = kv_cache.size(0), block_size = kv_cache.size(1);
  if (fp8) {
    DSV2_CHECK(kv_scale.has_value(), op, "kv_scale", "is required with a float8_e4m3fn kv_cache");
    check_same_device(op, "kv_scale", *kv_scale, q_in);
    check_dtype(op, "kv_scale", *kv_scale, at::kFloat);
    DSV2_CHECK(kv_scale->dim() == 3 && kv_scale->size(0) == num_blocks && kv_scale->size(1) == block_size &&
                   kv_scale->size(2) == 2,
               op, "kv_scale", "must have shape (", num_blocks, ", ", block_size, ", 2), got ", kv_scale->sizes());
    DSV2_CHECK(kv_scale->is_contiguous(), op, "kv_scale", "must be contiguous, got strides ", kv_scale->strides());
    DSV2_CHECK(reinterpret_cast<uintptr_t>(kv_scale->data_ptr()) % 8 == 0, op, "kv_scale",
               "must be 8-byte aligned for the CUDA kernel");
  } else {
    DSV2_CHECK(!kv_scale.has_value(), op, "kv_scale", "must be None with a bfloat16 kv_cache");
  }
  check_same_device(op, "block_table", block_table, q_in);
  check_dtype(op, "block_table", block_table, at::kInt);
  DSV2_CHECK(block_table.dim() == 2 && block_table.size(0) == batch, op, "block_table", "must have shape (", batch,
             ", '*'), got ", block_table.sizes());
  DSV2_CHECK(block_table.size(1) <= 1 || block_table.stride(1) == 1, op, "block_table",
             "must have a contiguous last dimension, got strides ", block_table.strides());
  check_same_device(op, "cache_seqlens", cache_seqlens, q_in);
  check_dtype(op, "cache_seqlens", cache_seqlens, at::kInt);
  DSV2_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == batch, op, "cache_seqlens", "must have shape (",
             batch, ",), got ", cache_seqlens.sizes());
  DSV2_CHECK(cache_seqlens.is_contiguous(), op, "cache_seqlens", "must be contiguous, got strides ",
             cache_seqlens.strides());
  DSV2_CHECK(softmax_scale > 0 && std::isfinite(softmax_scale), op, "softmax_scale", "must be finite and > 0, got ",
             softmax_scale);

  const int64_t rows = s_q * heads;
  const int64_t max_blocks = block_table.size(1);
  // Limits of the CUDA kernel (int32 indexing, grid dimensions); far beyond DeepSeek-V2 decode shapes.
  DSV2_CHECK(rows <= 65536, op, "q", "s_q * heads must be <= 65536 for the CUDA kernel, got ", rows);
  DSV2_CHECK(batch <= (1 << 24), op, "q", "batch must be <= 2^24 for the CUDA kernel, got ", batch);
  DSV2_CHECK(max_blocks * block_size <= (1 << 26), op, "block_table",
             "covers more than 2^26 tokens per sequence (max_blocks * block_size), unsupported by the CUDA kernel");
  DSV2_CHECK(batch * (max_blocks * block_size / kBlockN + kSplitOverhead + 1) < (int64_t(1) << 31), op,
             "block_table", "batch * tokens per sequence is too large for the CUDA kernel");

  auto out = at::empty({batch, s_q, heads, kVDim}, q_in.options());
  auto lse = at::empty({batch, heads, s_q}, q_in.options().dtype(at::kFloat));
  if (batch == 0 || rows == 0) return {out, lse};

  const c10::cuda::CUDAGuard guard(q_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // 16-byte cp.async of Q rows needs 16-byte aligned rows; anything else gets an aligned copy.
  const auto al16 = [](int64_t s) { return s % 8 == 0; };
  at::Tensor q = q_in;
  if (reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 != 0 || !al16(q.stride(0)) || !al16(q.stride(1)) ||
      !al16(q.stride(2)))
    q = q_in.clone(at::MemoryFormat::Contiguous);

  const int m_blocks = static_cast<int>(ceil_div(static_cast<int>(rows), kBlockM));
  const int parts = std::max(1, sm_count(q.get_device()) / m_blocks);
  const int slots = 2 * (parts - 1);  // partial outputs: each interior part boundary adds one split
  const SchedLayout lay(static_cast<int>(batch), parts);
  auto ws = at::empty({lay.total}, q.options().dtype(at::kInt));
  auto o_part = at::empty({slots, rows, kVDim}, q.options().dtype(at::kFloat));
  auto lse_part = at::empty({slots, rows}, q.options().dtype(at::kFloat));

  DecodeParams p{};
  p.q = reinterpret_cast<const __nv_bfloat16*>(q.data_ptr());
  p.q_sb = q.stride(0);
  p.q_ss = q.stride(1);
  p.q_sh = q.stride(2);
  p.kv = reinterpret_cast<const uint8_t*>(kv_cache.data_ptr());
  p.kv_scale = fp8 ? kv_scale->data_ptr<float>() : nullptr;
  p.block_table = block_table.data_ptr<int>();
  p.bt_stride = block_table.stride(0);
  p.seqlens = cache_seqlens.data_ptr<int>();
  p.out = reinterpret_cast<__nv_bfloat16*>(out.data_ptr());
  p.lse = lse.data_ptr<float>();
  p.o_part = o_part.data_ptr<float>();
  p.lse_part = lse_part.data_ptr<float>();
  int* wsp = ws.data_ptr<int>();
  p.sched = wsp + lay.sched;
  p.nsplit = wsp + lay.nsplit;
  p.cu_partial = wsp + lay.cu_partial;
  p.batch = static_cast<int>(batch);
  p.s_q = static_cast<int>(s_q);
  p.heads = static_cast<int>(heads);
  p.rows = static_cast<int>(rows);
  p.block_size = static_cast<int>(block_size);
  p.num_blocks = static_cast<int>(std::min<int64_t>(num_blocks, std::numeric_limits<int>::max()));
  // An empty cache (or empty pages) holds no token: every sequence is then treated as empty.
  p.max_len = (num_blocks > 0 && block_size > 0) ? static_cast<int>(max_blocks * block_size) : 0;
  p.causal = causal ? 1 : 0;
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);

  // metadata -> main -> combine, the last two as programmatic dependents (also under CUDA-graph capture): each
  // starts while its predecessor finishes. A kernel launched with `pdl` must griddep_wait() before any global access.
  const bool pdl = programmatic_launch_ok(stream, /*allow_capture=*/true);
  launch_decode_metadata(p.seqlens, p.batch, p.max_len, parts, wsp, stream);
  if (rows <= kNarrowMaxRows && narrow_enabled()) {
    launch_decode_narrow(p, fp8, parts, pdl, stream);  // m_blocks == 1
  } else {
    const dim3 grid(parts, m_blocks);
    if (fp8) launch_decode<true>(p, grid, pdl, stream);
    else launch_decode<false>(p, grid, pdl, stream);
  }
  launch_decode_combine(p, pdl, stream);
  return {out, lse};
}

}  // namespace dsv2
