// Token dispatch: copy each token to the rows of the experts it was routed to, optionally quantized to e4m3 with
// per-1x128-group scales, in the contiguous (prefill) or masked (decode) layout of dsv2_kernels/moe.py.
//
// Row order is a function of topk_ids alone: expert e's copies in flat (token, slot) order, i.e. a copy's rank is
// the number of earlier copies of the same expert. Every count below is an integer sum (order-independent), and the
// only order-dependent step, ranking copies among their peers, runs inside one warp in flat order (match_any per 32
// copies: a stable multi-split), so the layout is deterministic and bit-reproducible without any global atomics.
//
// The copy itself is the cost (each token row read once and written k times: 3/4 (FP8) to 6/7 (bf16) of the traffic
// are writes), so the routing work is kept off the critical path: the rows' loads are in flight while it runs.
// Three paths:
//   * up to kFusedMaxCopies copies (decode, latency-bound): one kernel (dispatch_fused_kernel). Each CTA issues the
//     loads of its rows first, then counts the copies before its tokens and per expert itself (a few KB of ids from
//     L2), warp 0 ranks the CTA's own copies into token_row (and shared memory), and all threads copy.
//   * up to kCoopMaxCopies (prefill chunks of up to ~5k tokens): one cooperative kernel, dispatch_coop_kernel: a CTA per SM, each a contiguous token range,
//     its shared memory a ring of ~32 KB row tiles filled by TMA bulk loads issued at launch. While they fly, each
//     CTA ranks its own copies locally and the last CTA of each rank chunk (a few consecutive CTAs) publishes the
//     chunk's histogram; one grid barrier; each CTA adds the histograms before its chunk (and all, for the offsets),
//     then warp 0 issues one TMA bulk store per copy (a whole row, shared -> global: no registers, a few
//     instructions per row) and refills each stage as soon as its stores have read it. FP8 quantizes each tile once,
//     in place in shared memory (the first tile between the barrier's arrive and wait), 8 lanes per 128-group; those
//     8 lanes store the group's scale to the k destinations, one slot each. (The previous design, three kernels
//     count -> rank -> copy chained by programmatic launch, still started storing only after two grid completions,
//     and its register-tiled copy did not overlap reads with writes within a CTA.)
//   * beyond, and where the cooperative kernel does not fit (rows too long for two stages, no cooperative launch):
//     three kernels, each a programmatic dependent of the previous one,
//     on rank chunks of <= 4096 consecutive flat copies: dispatch_count_kernel (chunk histograms), dispatch_rank_kernel
//     (token_row, offsets / counts, row_expert; its local ranking runs before it waits on the counts) and
//     dispatch_copy_kernel (rows loaded into registers before it waits on the ranks, then 16-byte stores). FP8: the
//     copy kernel writes the scales once per token (token-major scratch; the rank kernel records each row's token)
//     and a fourth kernel, dispatch_scales_kernel (a programmatic dependent of the copy kernel), writes the
//     column-major scales in whole 32-byte sectors.
//
// FP8 matches fp8.quant_per_token_group_ref bit for bit through the quantizer's own helpers (fp8/quant_common.cuh).

#include "../common/torch_cuda.h"

#include <ATen/ops/empty_strided.h>
#include <cooperative_groups.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../common/pdl.cuh"
#include "../common/vec.cuh"
#include "../fp8/quant_common.cuh"
#include "../ops.h"

namespace dsv2 {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxExperts = 1024;
constexpr int kGroup = 128;  // FP8 quant group (columns)
constexpr int kFusedMaxCopies = 4096;
constexpr int kRankBatches = 16;   // batches of 32 copies per warp of a rank chunk: chunks of <= 4096 copies
static_assert(kMaxExperts <= 1024 && kRankBatches * 32 <= (1 << 21), "the rank kernel packs local_rank << 10 | e");
constexpr int kTargetChunks = 32;  // rank chunks aimed at (each rank CTA sums chunks * E histogram cells)
constexpr int kTileCopies = 1024;  // token_row entries of a CTA's tokens staged in shared memory
constexpr int kCopyBlocks = 4;     // copy CTAs per SM (<= 64 registers): 128 KB of token rows in flight per SM
constexpr unsigned kFull = 0xffffffffu;

struct Params {
  const __nv_bfloat16* hidden;  // [T, H], 16-byte aligned
  const int32_t* ids;           // [T, k]
  void* rows;                   // [R, H] or [E, max_m, H]: bf16 or e4m3
  float* scales;                // column-major FP8 scales, or null
  int32_t* token_row;           // [T, k]
  int32_t* row_expert;          // [R] (contiguous) or null
  int32_t* meta;                // expert_offsets [E + 1] (contiguous) or counts [E] (masked)
  int32_t* chunk_hist;          // [chunks, E] copies per expert per rank chunk
  int64_t scale_pad;            // column stride of the scales (round_up(rows per matrix, 4))
  int num_rows;                 // R (contiguous)
  int tokens, top_k, experts, hidden_size;
  int alignment;     // contiguous
  int max_m;         // masked
  int cta_tokens;    // tokens per copying CTA
  int chunk_copies;  // copies per rank chunk (a multiple of kThreads, <= kRankBatches * kThreads)
  int chunks;        // rank chunks
  // single-kernel path (dispatch_coop_kernel)
  int chunk_ctas;    // CTAs per rank chunk
  int cta_copies;    // most copies of one CTA's token range (its shared token_row slots)
  int tile_tokens;   // token rows per pipeline stage
  int stage_bytes;   // bytes per stage (a multiple of 128)
  int stages;        // pipeline stages
  // FP8 count -> rank -> copy path: the scales go through a token-major buffer and are written column-major by
  // dispatch_scales_kernel (write_scale_block)
  float* tok_scales;   // [T, groups4] group scales of each token (16-byte aligned rows)
  int32_t* row_token;  // [E * max_m] (masked) or [R]: token of each row that holds a copy (others never written)
  int groups4;         // round_up(H / 128, 4)
  int scale_tasks;     // write_scale_block tasks: blocks of 32 rows (masked: of one expert) x groups4 / 4
};

__device__ __forceinline__ int valid_expert(int e, int num_experts) { return e >= 0 && e < num_experts ? e : -1; }

// counts[e] += 1 for every lane holding an expert e >= 0 (-1: nothing to count). Integer sums: the order of the
// atomics does not matter. A warp whose lanes all hold one expert (everything routed to one expert) adds once
// instead of serializing 32 same-address atomics. Must be called by all 32 lanes.
__device__ __forceinline__ void warp_count(int* counts, int e) {
  const int e0 = __shfl_sync(kFull, e, 0);
  if (__all_sync(kFull, e == e0)) {
    if ((threadIdx.x & 31) == 0 && e0 >= 0) atomicAdd(counts + e0, 32);
  } else if (e >= 0) {
    atomicAdd(counts + e, 1);
  }
}

__device__ __forceinline__ float bf16_lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }

// Contiguous layout: s_off[e] = start of expert e's segment (the exclusive prefix of the counts padded to the
// alignment), s_off[E] = rows used. kMaxExperts / kNT consecutive experts per thread, then warps, then the CTA. All
// kNT threads call it; it ends synchronized. s_warp: kNT / 32 ints.
template <int kNT>
__device__ __forceinline__ void padded_offsets(const int* s_total, int* s_off, int* s_warp, int E, int alignment) {
  constexpr int kPer = kMaxExperts / kNT, kNW = kNT / 32;
  static_assert(kPer * kNT == kMaxExperts, "each thread takes a whole number of experts");
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int v[kPer], local = 0;
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    const int e = tid * kPer + q;
    v[q] = e < E ? static_cast<int>((static_cast<int64_t>(s_total[e]) + alignment - 1) / alignment * alignment) : 0;
    local += v[q];
  }
  int incl = local;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += n;
  }
  if (lane == 31) s_warp[warp] = incl;
  __syncthreads();
  int run = incl - local, all = 0;
#pragma unroll
  for (int w = 0; w < kNW; ++w) {
    run += w < warp ? s_warp[w] : 0;
    all += s_warp[w];
  }
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    const int e = tid * kPer + q;
    if (e < E) s_off[e] = run;
    run += v[q];
  }
  if (tid == 0) s_off[E] = all;
  __syncthreads();
}

// The rank step shared by dispatch_rank_kernel and dispatch_coop_kernel, once every chunk's histogram is visible:
// adds chunk_hist cells [0, cells) (chunk-major, E per chunk) into s_total[e] and the cells below before_cells into
// s_before[e] (kBatch loads in flight per thread), then the contiguous layout's padded segment starts (s_off), and
// where write_meta the layout's offsets (contiguous) or counts (masked). All kNT threads call it; the sums and
// s_off are complete on return.
template <int kNT, int kBatch, bool kMasked>
__device__ __forceinline__ void sum_chunk_hists(const Params& p, int cells, int before_cells, bool write_meta,
                                                int* s_before, int* s_total, int* s_off, int* s_warp) {
  const int E = p.experts, tid = threadIdx.x;
  for (int c0 = tid; c0 < cells; c0 += kNT * kBatch) {
    int v[kBatch];
#pragma unroll
    for (int q = 0; q < kBatch; ++q) {
      const int c = c0 + q * kNT;
      v[q] = c < cells ? __ldcg(p.chunk_hist + c) : 0;
    }
#pragma unroll
    for (int q = 0; q < kBatch; ++q) {
      const int c = c0 + q * kNT;
      if (v[q] != 0) {  // cell c is (chunk c / E, expert c % E)
        const int e = c % E;
        if (c < before_cells) atomicAdd(s_before + e, v[q]);
        atomicAdd(s_total + e, v[q]);
      }
    }
  }
  __syncthreads();
  if constexpr (!kMasked) padded_offsets<kNT>(s_total, s_off, s_warp, E, p.alignment);
  if (write_meta) {
    if constexpr (kMasked) {
      for (int e = tid; e < E; e += kNT) p.meta[e] = s_total[e];
    } else {
      for (int e = tid; e <= E; e += kNT) p.meta[e] = s_off[e];
    }
  }
}

// 16 consecutive bf16 values (a, b) of one 128-group as e4m3, with the group's scale; the 8 lanes l ^ {1, 2, 4}
// hold the group's other values (all 32 lanes must call it). The same scale and quotients as quant_per_token_group
// (quant_common.cuh), so the fused path is bit-exact with the reference (which multiplies amax by the fp32
// reciprocal of 448, as ATen does).
__device__ __forceinline__ uint4 quantize16(const uint4& a, const uint4& b, float& scale) {
  const uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
  float x[16];
  float amax = 0.f;
#pragma unroll
  for (int h = 0; h < 8; ++h) {
    x[2 * h] = bf16_lo(w[h]);
    x[2 * h + 1] = bf16_hi(w[h]);
    amax = fp8_quant::max_nan(amax, fp8_quant::max_nan(fabsf(x[2 * h]), fabsf(x[2 * h + 1])));
  }
  amax = fp8_quant::max_nan(amax, __shfl_xor_sync(kFull, amax, 1));
  amax = fp8_quant::max_nan(amax, __shfl_xor_sync(kFull, amax, 2));
  amax = fp8_quant::max_nan(amax, __shfl_xor_sync(kFull, amax, 4));
  scale = fp8_quant::group_scale(amax);
  const fp8_quant::Divisor div = fp8_quant::make_divisor(scale);
  uint32_t packed[4];
#pragma unroll
  for (int h = 0; h < 4; ++h)
    packed[h] = fp8_quant::fp8x2(x[4 * h], x[4 * h + 1], div) |
                (fp8_quant::fp8x2(x[4 * h + 2], x[4 * h + 3], div) << 16);
  return make_uint4(packed[0], packed[1], packed[2], packed[3]);
}

// Index into p.scales of group g of destination row d (column-major scales; masked: per expert matrix).
template <bool kMasked>
__device__ __forceinline__ int64_t scale_index(const Params& p, int d, int64_t g) {
  if constexpr (kMasked) {
    const int e = d / p.max_m, m = d - e * p.max_m;
    return (static_cast<int64_t>(e) * (p.hidden_size / kGroup) + g) * p.scale_pad + m;
  } else {
    return d + g * p.scale_pad;
  }
}

// FP8, one warp, once row_token, tok_scales and row_expert (contiguous) / counts (masked) are complete and visible:
// the column-major scales of 32 consecutive output rows (masked: of one expert) and groups [4 gc, 4 gc + 4) from the
// token-major scales, one 16-byte load per row. A group's 32 scales are consecutive in the column-major layout, so
// each store is whole 32-byte sectors (one 4-byte store per copy and group from the copy kernel, the way the rows
// go, made every scale its own partial-sector L2 write: as many write requests as the e4m3 row lines). Rows that
// hold no copy (padding, the unused tail, positions >= counts[e]) are skipped: their scales are unspecified, like
// their rows.
template <bool kMasked>
__device__ __forceinline__ void write_scale_block(const Params& p, int task) {
  const int chunks = p.groups4 / 4, blk = task / chunks, gc = task - blk * chunks, lane = threadIdx.x & 31;
  int r = -1, t = -1;
  bool used = false;
  if constexpr (kMasked) {
    const int mblocks = (p.max_m - 1) / 32 + 1, e = blk / mblocks, m = (blk - e * mblocks) * 32 + lane;
    const int count = __ldcg(p.meta + e);  // warp-uniform: the whole block is skipped past the expert's copies
    if (m < p.max_m && m < count) {
      r = e * p.max_m + m;
      t = __ldcg(p.row_token + r);
      used = true;
    }
  } else {
    r = blk * 32 + lane;
    if (r < p.num_rows) {
      t = __ldcg(p.row_token + r);  // garbage where no copy landed: used only where row_expert says it is a copy
      used = __ldcg(p.row_expert + r) >= 0;
    }
  }
  if (!used) return;
  const float4 v = __ldcg(reinterpret_cast<const float4*>(p.tok_scales + static_cast<int64_t>(t) * p.groups4) + gc);
  const float vs[4] = {v.x, v.y, v.z, v.w};
  const int groups = p.hidden_size / kGroup;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int g = gc * 4 + q;
    if (g < groups) p.scales[scale_index<kMasked>(p, r, g)] = vs[q];
  }
}

// One pass of a CTA over its token rows [t0, t0 + n): each thread holds 8 16-byte vectors of hidden (128 bytes in
// flight per thread). An item is one vector (bf16) or 16 values = 2 vectors (FP8: 8 lanes per 128-group); item i is
// unit i % units of token t0 + i / units, and a pass covers items base + j * kThreads + tid, j < kItems.
// FP8 quantizes each item once (quantize), before the k stores of the token (store).
template <bool kFp8>
struct Tile {
  static constexpr int kPer = kFp8 ? 2 : 1;       // vectors per item
  static constexpr int kItems = 8 / kPer;         // items per thread per pass
  static constexpr int kPass = kItems * kThreads;  // items per pass
  static constexpr int kValues = 8 * kPer;        // values per item
  uint4 v[8];
  uint4 q[kFp8 ? kItems : 1];      // FP8: the item's 16 e4m3 values
  float scale[kFp8 ? kItems : 1];  // FP8: the item's group scale

  __device__ __forceinline__ void load(const Params& p, int t0, int units, int items, int base) {
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int i = base + j * kThreads + static_cast<int>(threadIdx.x);
      if (i < items) {
        const int tl = i / units, u = i - tl * units;
        const uint4* src =
            reinterpret_cast<const uint4*>(p.hidden + static_cast<int64_t>(t0 + tl) * p.hidden_size) + u * kPer;
#pragma unroll
        for (int h = 0; h < kPer; ++h) v[j * kPer + h] = __ldcs(src + h);  // read once: evict first
      } else {
#pragma unroll
        for (int h = 0; h < kPer; ++h) v[j * kPer + h] = make_uint4(0, 0, 0, 0);
      }
    }
  }

  // All 32 lanes of every warp (shuffles); items past the end hold zeros and are never stored.
  __device__ __forceinline__ void quantize() {
    if constexpr (kFp8) {
#pragma unroll
      for (int j = 0; j < kItems; ++j) q[j] = quantize16(v[2 * j], v[2 * j + 1], scale[j]);
    }
  }

  // tr: token_row of the CTA's tokens [t0, ...) (shared memory, or global where it does not fit). FP8: kTokScales
  // writes each group's scale once per token to p.tok_scales (dispatch_scales_kernel writes the column-major ones),
  // else once per destination straight into p.scales.
  template <bool kMasked, bool kTokScales>
  __device__ __forceinline__ void store(const Params& p, int t0, int units, int items, int base,
                                        const int32_t* tr) const {
    const int k = p.top_k, H = p.hidden_size;
    const int64_t row_bytes = static_cast<int64_t>(H) * (kFp8 ? 1 : 2);
    char* out = static_cast<char*>(p.rows);
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int i = base + j * kThreads + static_cast<int>(threadIdx.x);
      if (i < items) {
        const int tl = i / units, u = i - tl * units;
        uint4 val;
        if constexpr (kFp8) val = q[j]; else val = v[j];
        const int32_t* trt = tr + tl * k;
#pragma unroll 4
        for (int s = 0; s < k; ++s) {
          const int d = trt[s];
          if (d >= 0) *reinterpret_cast<uint4*>(out + d * row_bytes + u * 16) = val;
        }
        if constexpr (kFp8) {
          const int64_t g = u / (kGroup / kValues);
          if constexpr (kTokScales) {  // the first lane of the group's 8 (a warp: 4 consecutive groups, 16 bytes)
            if ((threadIdx.x & 7) == 0) p.tok_scales[static_cast<int64_t>(t0 + tl) * p.groups4 + g] = scale[j];
          } else {  // once per destination: the 8 lanes of the group take the slots in turn
            for (int s = threadIdx.x & 7; s < k; s += 8) {
              const int d = trt[s];
              if (d < 0) continue;
              p.scales[scale_index<kMasked>(p, d, g)] = scale[j];
            }
          }
        }
      }
    }
  }
};

// Rank chunks: copies per expert of copies [c * chunk_copies, (c + 1) * chunk_copies), chunk_hist[c * E + e].
__global__ void __launch_bounds__(kThreads) dispatch_count_kernel(const int32_t* __restrict__ ids,
                                                                  int32_t* __restrict__ chunk_hist, int64_t copies,
                                                                  int num_experts, int chunk_copies) {
  __shared__ int hist[kMaxExperts];
  griddep_launch_dependents();
  const int64_t from = static_cast<int64_t>(blockIdx.x) * chunk_copies;
  const int64_t to = std::min<int64_t>(from + chunk_copies, copies);
  int ev[kRankBatches];  // all of this thread's ids in flight at once
#pragma unroll
  for (int b = 0; b < kRankBatches; ++b) {
    const int64_t i = from + b * kThreads + threadIdx.x;
    ev[b] = i < to ? valid_expert(__ldg(ids + i), num_experts) : -1;
  }
  for (int e = threadIdx.x; e < num_experts; e += kThreads) hist[e] = 0;
  __syncthreads();
#pragma unroll
  for (int b = 0; b < kRankBatches; ++b)
    if (from + b * kThreads < to) warp_count(hist, ev[b]);  // CTA-uniform
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += kThreads)
    chunk_hist[static_cast<int64_t>(blockIdx.x) * num_experts + e] = hist[e];
}

// One CTA per rank chunk: token_row of its copies, the offsets / counts (chunk 0), a slice of row_expert.
// <= 64 registers: an SM running a rank CTA still takes 3 copy CTAs.
template <bool kMasked>
__global__ void __launch_bounds__(kThreads, kCopyBlocks) dispatch_rank_kernel(const __grid_constant__ Params p) {
  __shared__ int s_cnt[kWarps * kMaxExperts];  // [warp][e]: copies in the warp's slice, then in the slices before it
  __shared__ int s_before[kMaxExperts];        // copies of each expert in the chunks before this one
  __shared__ int s_total[kMaxExperts];         // copies of each expert overall (contiguous; masked: chunk 0 only)
  __shared__ int s_off[kMaxExperts + 1];       // contiguous: each expert's segment start
  __shared__ int s_warp[kWarps];
  griddep_launch_dependents();  // the copy kernel launches now and loads its rows while this one works

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int E = p.experts, chunk = blockIdx.x;
  const int batches = p.chunk_copies / kThreads;  // per warp
  const int64_t n = static_cast<int64_t>(p.tokens) * p.top_k;
  const int64_t slice = static_cast<int64_t>(chunk) * p.chunk_copies + static_cast<int64_t>(warp) * batches * 32;

  // Local ranks (within the warp's slice) need only the ids: done before waiting on the count kernel.
  int ev[kRankBatches];
#pragma unroll
  for (int b = 0; b < kRankBatches; ++b) {
    const int64_t i = slice + b * 32 + lane;
    ev[b] = b < batches && i < n ? valid_expert(__ldg(p.ids + i), E) : -1;
  }
  for (int c = tid; c < kWarps * E; c += kThreads) s_cnt[c] = 0;
  for (int e = tid; e < E; e += kThreads) s_before[e] = s_total[e] = 0;
  __syncthreads();
  int* cnt = s_cnt + warp * E;
#pragma unroll
  for (int b = 0; b < kRankBatches; ++b) {
    if (b < batches) {  // warp-uniform
      // A copy's local rank: the peers (same expert) in earlier batches plus those in lower lanes; the lowest peer
      // then advances the warp's counter. Kept with the expert in one register: local_rank << 10 | e.
      const int e = ev[b];
      const unsigned peers = __match_any_sync(kFull, e);
      const unsigned lower = peers & ((1u << lane) - 1u);
      if (e >= 0) ev[b] = (cnt[e] + __popc(lower)) << 10 | e;
      __syncwarp();
      if (e >= 0 && lower == 0) cnt[e] += __popc(peers);
      __syncwarp();
    }
  }
  __syncthreads();
  for (int e = tid; e < E; e += kThreads) {  // exclusive prefix over the warps
    int run = 0;
    for (int w = 0; w < kWarps; ++w) {
      const int c = s_cnt[w * E + e];
      s_cnt[w * E + e] = run;
      run += c;
    }
  }

  griddep_wait();  // chunk_hist is complete and visible (a no-op without a programmatic dependency)
  const bool need_total = !kMasked || chunk == 0;
  const int cells = (need_total ? p.chunks : chunk) * E;
  sum_chunk_hists<kThreads, 16, kMasked>(p, cells, chunk * E, chunk == 0, s_before, s_total, s_off, s_warp);

#pragma unroll
  for (int b = 0; b < kRankBatches; ++b) {
    const int64_t i = slice + b * 32 + lane;
    if (b < batches && i < n) {
      int dest = -1;
      if (ev[b] >= 0) {
        const int e = ev[b] & 1023;
        const int rank = s_before[e] + cnt[e] + (ev[b] >> 10);
        if constexpr (kMasked)
          dest = rank < p.max_m ? e * p.max_m + rank : -1;
        else
          dest = s_off[e] + rank;
      }
      p.token_row[i] = dest;
      if (p.row_token != nullptr && dest >= 0) p.row_token[dest] = static_cast<int>(i) / p.top_k;  // FP8
    }
  }

  if constexpr (!kMasked) {
    // This CTA's slice of row_expert, segment by segment (a warp per expert; e == E: the unused tail).
    const int64_t per = (static_cast<int64_t>(p.num_rows) + gridDim.x - 1) / gridDim.x;
    const int lo = static_cast<int>(std::min<int64_t>(chunk * per, p.num_rows));
    const int hi = static_cast<int>(std::min<int64_t>(lo + per, p.num_rows));
    for (int e = warp; e <= E; e += kWarps) {
      const int seg_lo = max(lo, s_off[e]);
      const int seg_hi = min(hi, e < E ? s_off[e + 1] : p.num_rows);
      const int used = e < E ? s_off[e] + s_total[e] : 0;  // rows below hold copies, the rest is padding
      for (int r = seg_lo + lane; r < seg_hi; r += 32) p.row_expert[r] = r < used ? e : -1;
    }
  }
}

// Pure copy of cta_tokens tokens per CTA, once token_row is known (dispatch_rank_kernel). FP8: the scales once per
// token into p.tok_scales; dispatch_scales_kernel (its programmatic dependent) writes the column-major ones.
template <bool kMasked, bool kFp8>
__global__ void __launch_bounds__(kThreads, kCopyBlocks) dispatch_copy_kernel(const __grid_constant__ Params p) {
  __shared__ int32_t s_tr[kTileCopies];
  // dispatch_scales_kernel launches as the last wave starts (its CTAs take the SM slots this kernel frees); it
  // touches nothing before its griddep_wait, which returns once this kernel has completed.
  if constexpr (kFp8) griddep_launch_dependents();
  const int k = p.top_k;
  const int t0 = blockIdx.x * p.cta_tokens;
  const int t1 = min(t0 + p.cta_tokens, p.tokens);
  const int units = p.hidden_size / Tile<kFp8>::kValues, items = (t1 - t0) * units;
  const int tile_copies = (t1 - t0) * k;
  const int32_t* tr = p.token_row + static_cast<int64_t>(t0) * k;
  Tile<kFp8> tile;
  for (int base = 0; base < items; base += Tile<kFp8>::kPass) {  // one pass unless H > 16384
    tile.load(p, t0, units, items, base);
    tile.quantize();
    if (base == 0) {
      griddep_wait();  // token_row is complete (a no-op without a programmatic dependency)
      if (tile_copies <= kTileCopies)
        for (int c = threadIdx.x; c < tile_copies; c += kThreads) s_tr[c] = __ldcg(tr + c);
      __syncthreads();
    }
    if (tile_copies <= kTileCopies)
      tile.template store<kMasked, true>(p, t0, units, items, base, s_tr);
    else
      tile.template store<kMasked, true>(p, t0, units, items, base, tr);
  }
}

// FP8 after dispatch_copy_kernel (a programmatic dependent): the column-major scales, a warp per write_scale_block
// task. Its griddep_wait covers the copy kernel (tok_scales) and, transitively, the rank kernel (row_token,
// row_expert, counts): every copy CTA waits on the rank kernel before it can finish.
template <bool kMasked>
__global__ void __launch_bounds__(kThreads) dispatch_scales_kernel(const __grid_constant__ Params p) {
  griddep_wait();
  const int warp = threadIdx.x >> 5;
  for (int task = blockIdx.x * kWarps + warp; task < p.scale_tasks; task += gridDim.x * kWarps)
    write_scale_block<kMasked>(p, task);
}

// ---- one cooperative kernel (more than kFusedMaxCopies copies) ---------------------------------------------------
constexpr int kCoopThreads = 512;  // one CTA per SM: its shared memory is the row pipeline
constexpr int kCoopWarps = kCoopThreads / 32;
constexpr int kMaxStages = 8;
constexpr int kStageTarget = 32 * 1024;  // bf16 row bytes per pipeline stage aimed at
constexpr int kCoopMaxItems = 4;         // fp8: 16-value items per thread per stage
constexpr int kChunkCopies = 4096;       // flat copies per rank chunk aimed at
// Copies up to which the cooperative kernel runs (beyond: the count -> rank -> copy kernels). Measured on the H200
// (bench_moe): at T = 4096 x top-6 it beats the three kernels (V2 bf16 79.9 vs 74.2 % of copy, fp8 60.8 vs ~55 %),
// at T = 16384 it loses (V2 bf16 76.5 vs 84.8 %, fp8 42.7 vs 61 %: one 512-thread CTA per SM with a single shared
// ring keeps fewer bytes in flight than 3+ copy CTAs per SM once each CTA has hundreds of rows to move).
constexpr int64_t kCoopMaxCopies = 32768;
constexpr int kMaxCtaCopies = 8192;      // copies of one CTA's token range (its token_row in shared memory)
static_assert(kMaxCtaCopies < (1 << 21), "rank codes pack local_rank << 10 | e");

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
}
// TMA bulk copy global -> shared of `bytes` (a multiple of 16), completing the current phase of bar.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}
// TMA bulk copy shared -> global with an L2 cache policy (vec.cuh), in the calling thread's current bulk group.
__device__ __forceinline__ void bulk_store(void* dst, const void* src, uint32_t bytes, uint64_t policy) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group.L2::cache_hint [%0], [%1], %2, %3;" ::"l"(dst),
               "r"(smem_addr(src)), "r"(bytes), "l"(policy)
               : "memory");
}
__device__ __forceinline__ void st_global_hint(float* dst, float v, uint64_t policy) {
  asm volatile("st.global.L2::cache_hint.f32 [%0], %1, %2;" ::"l"(dst), "f"(v), "l"(policy) : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// All but the newest N bulk groups of this thread have finished reading shared memory.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

// FP8, all threads: quantize the n bf16 rows of a stage in place, each row's e4m3 values to the front of the stage
// (row r at r * H bytes), ready for bulk stores; sc[j] keeps the scale of item j * kCoopThreads + tid (16 values of
// one row, the 8 lanes tid ^ {1..7} & 7 sharing a 128-group). Ends synchronized.
__device__ __forceinline__ void quantize_stage(uint8_t* st, int n, int H, float (&sc)[kCoopMaxItems]) {
  const int units = H / 16, items = n * units;
  uint4 q[kCoopMaxItems];
#pragma unroll
  for (int j = 0; j < kCoopMaxItems; ++j) {
    if (j * kCoopThreads < items) {  // CTA-uniform: every lane takes part in the group's shuffles
      const int i = j * kCoopThreads + static_cast<int>(threadIdx.x);
      uint4 a = make_uint4(0, 0, 0, 0), b = a;
      if (i < items) {
        const int r = i / units, u = i - r * units;
        const uint4* src = reinterpret_cast<const uint4*>(st + static_cast<int64_t>(r) * H * 2) + u * 2;
        a = src[0];
        b = src[1];
      }
      q[j] = quantize16(a, b, sc[j]);
    }
  }
  __syncthreads();  // every bf16 value is read before the e4m3 rows overwrite the front of the stage
#pragma unroll
  for (int j = 0; j < kCoopMaxItems; ++j) {
    const int i = j * kCoopThreads + static_cast<int>(threadIdx.x);
    if (i < items) {
      const int r = i / units, u = i - r * units;
      reinterpret_cast<uint4*>(st + static_cast<int64_t>(r) * H)[u] = q[j];
    }
  }
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // visible to the bulk stores (async proxy)
  __syncthreads();
}

// One CTA per SM (cooperative launch: all resident), CTA b owning tokens [b T / G, (b + 1) T / G), processed in
// tiles of tile_tokens rows through a ring of `stages` shared-memory stages.
//   1. TMA loads of the first tiles are issued at once; while they fly, the CTA counts the copies per expert of its
//      rank chunk (chunk_ctas consecutive CTAs) before its own range, and ranks its own copies in flat order (each
//      warp a slice: match_any per 32 copies, per-warp counters, then an exclusive prefix over the warps). The last
//      CTA of a chunk publishes the chunk's histogram.
//   2. One grid barrier (split: fp8 quantizes its first tile between arrive and wait). Each CTA then adds the
//      histograms of the chunks before its own (and of all, for the offsets): token_row of its copies, a slice of
//      row_expert, offsets / counts (CTA 0).
//   3. Warp 0 issues one bulk store per copy (a whole row, shared -> global) and refills a stage with the next tile
//      as soon as the stores of its previous tile have read it; fp8 quantizes each tile once in place first.
template <bool kMasked, bool kFp8>
__global__ void __launch_bounds__(kCoopThreads, 1) dispatch_coop_kernel(const __grid_constant__ Params p) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ __align__(8) uint64_t s_full[kMaxStages];
  __shared__ int s_warp[kCoopWarps];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int E = p.experts, k = p.top_k, H = p.hidden_size, G = gridDim.x, b = blockIdx.x;
  int* s_before = reinterpret_cast<int*>(smem + static_cast<int64_t>(p.stages) * p.stage_bytes);  // [E]
  int* s_total = s_before + E;                                                                      // [E]
  int* s_off = s_total + E;                                                                         // [E + 1]
  int* s_cnt = s_off + E + 1;         // [warp][e]: own copies in the warp's slice, then in the slices before it
  int* s_tr = s_cnt + kCoopWarps * E;  // own copies: rank codes (local_rank << 10 | e, or -1), then token_row

  const auto range_start = [&](int c) { return static_cast<int>(static_cast<int64_t>(c) * p.tokens / G); };
  const int ta = range_start(b), n_tok = range_start(b + 1) - ta;
  const int chunk = b / p.chunk_ctas, first = chunk * p.chunk_ctas, last = min(first + p.chunk_ctas, G) - 1;
  const int cs = range_start(first) * k, os = ta * k, n_own = n_tok * k;
  const int per_w = (n_own + kCoopThreads - 1) / kCoopThreads * 32;  // own copies per warp slice (32 per lane)
  const int ws = os + warp * per_w, we = min(ws + per_w, os + n_own);
  const int n_tiles = (n_tok + p.tile_tokens - 1) / p.tile_tokens;
  const uint32_t row_out = static_cast<uint32_t>(H) * (kFp8 ? 1 : 2);
  const auto stage = [&](int i) { return smem + (i % p.stages) * p.stage_bytes; };
  const auto tile_rows = [&](int i) { return min(p.tile_tokens, n_tok - i * p.tile_tokens); };
  const auto load_tile = [&](int i) {
    bulk_load(stage(i), p.hidden + static_cast<int64_t>(ta + i * p.tile_tokens) * H,
              static_cast<uint32_t>(tile_rows(i)) * H * 2, &s_full[i % p.stages]);
  };

  // The ids of the own copies first: the ranking waits on them, the rows only later.
  constexpr int kIdBatch = 8;
  int rv[kIdBatch];
  const auto load_rank_ids = [&](int i0) {
#pragma unroll
    for (int q = 0; q < kIdBatch; ++q) {
      const int i = i0 + q * 32 + lane;
      rv[q] = i < we ? valid_expert(__ldg(p.ids + i), E) : -1;
    }
  };
  load_rank_ids(ws);
  if (tid == 0) {
    for (int s = 0; s < p.stages; ++s)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(&s_full[s])) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  }
  for (int e = tid; e < E; e += kCoopThreads) s_before[e] = s_total[e] = 0;
  for (int c = tid; c < kCoopWarps * E; c += kCoopThreads) s_cnt[c] = 0;
  __syncthreads();
  if (tid == 0)
    for (int i = 0; i < min(p.stages, n_tiles); ++i) load_tile(i);

  // Copies per expert of the chunk before the own range (integer sums: order-independent).
  for (int i0 = cs; i0 < os; i0 += kCoopThreads * kIdBatch) {
    int ev[kIdBatch];
#pragma unroll
    for (int q = 0; q < kIdBatch; ++q) {
      const int i = i0 + q * kCoopThreads + tid;
      ev[q] = i < os ? valid_expert(__ldg(p.ids + i), E) : -1;
    }
#pragma unroll
    for (int q = 0; q < kIdBatch; ++q) warp_count(s_before, ev[q]);
  }
  // Local ranks of the own copies, 32 at a time in flat order within the warp's slice: a copy's local rank is the
  // warp's count of its expert so far plus its peers (same expert) in lower lanes; the lowest peer advances it.
  int* cnt = s_cnt + warp * E;
  for (int i0 = ws; i0 < we; i0 += 32 * kIdBatch) {  // warp-uniform
    if (i0 > ws) load_rank_ids(i0);
#pragma unroll
    for (int q = 0; q < kIdBatch; ++q) {
      if (i0 + q * 32 >= we) break;  // warp-uniform
      const int i = i0 + q * 32 + lane, e = rv[q];
      const unsigned peers = __match_any_sync(kFull, e);
      const unsigned lower = peers & ((1u << lane) - 1u);
      const int code = e >= 0 ? (cnt[e] + __popc(lower)) << 10 | e : -1;
      __syncwarp();
      if (e >= 0 && lower == 0) cnt[e] += __popc(peers);
      __syncwarp();
      if (i < we) s_tr[i - os] = code;
    }
  }
  __syncthreads();
  for (int e = tid; e < E; e += kCoopThreads) {  // exclusive prefix over the warps
    int run = 0;
    for (int w = 0; w < kCoopWarps; ++w) {
      const int c = s_cnt[w * E + e];
      s_cnt[w * E + e] = run;
      run += c;
    }
    if (b == last) p.chunk_hist[static_cast<int64_t>(chunk) * E + e] = s_before[e] + run;  // the whole chunk
  }

  cg::grid_group grid = cg::this_grid();
  auto arrived = grid.barrier_arrive();  // publishes chunk_hist (release)
  float sc[kFp8 ? kCoopMaxItems : 1];
  if constexpr (kFp8) {  // the first tile does not depend on the routing: quantize it while the others arrive
    mbar_wait(&s_full[0], 0);
    quantize_stage(stage(0), tile_rows(0), H, sc);
  }
  grid.barrier_wait(std::move(arrived));

  sum_chunk_hists<kCoopThreads, kIdBatch, kMasked>(p, p.chunks * E, chunk * E, b == 0, s_before, s_total, s_off,
                                                   s_warp);
  for (int c = tid; c < n_own; c += kCoopThreads) {
    const int code = s_tr[c];
    int dest = -1;
    if (code >= 0) {
      const int e = code & 1023, rank = s_before[e] + s_cnt[(c / per_w) * E + e] + (code >> 10);
      if constexpr (kMasked)
        dest = rank < p.max_m ? e * p.max_m + rank : -1;
      else
        dest = s_off[e] + rank;
    }
    s_tr[c] = dest;
    p.token_row[os + c] = dest;
  }
  __syncthreads();

  if constexpr (!kMasked) {
    if (warp > 0) {  // warp 0 starts storing; the others write this CTA's slice of row_expert, a warp per segment
      const int64_t per = (static_cast<int64_t>(p.num_rows) + G - 1) / G;
      const int lo = static_cast<int>(std::min<int64_t>(b * per, p.num_rows));
      const int hi = static_cast<int>(std::min<int64_t>(lo + per, p.num_rows));
      for (int e = warp - 1; e <= E; e += kCoopWarps - 1) {  // e == E: the unused tail
        const int seg_lo = max(lo, s_off[e]);
        const int seg_hi = min(hi, e < E ? s_off[e + 1] : p.num_rows);
        const int used = e < E ? s_off[e] + s_total[e] : 0;  // rows below hold copies, the rest is padding
        for (int r = seg_lo + lane; r < seg_hi; r += 32) p.row_expert[r] = r < used ? e : -1;
      }
    }
  }

  char* out = static_cast<char*>(p.rows);
  // L2 policies: the rows stream through (written once, never read here) as evict-first; the FP8 scales as
  // evict-last, since each 32-byte sector collects its 8 rows' 4-byte scales from several CTAs over the whole store
  // phase. Measured at T = 4096 (bench_moe, same run): V2 FP8 67.2 -> 64.6 us, V2-Lite unchanged (33.9 us), so
  // evictions of partly written sectors are only a small part of what the scale stores cost.
  const uint64_t pol_rows = l2_evict_first_policy(), pol_scales = l2_evict_last_policy();
  // Warp 0: the k bulk stores of each row of tile i (a lane per copy), then the stage of tile i - 1, whose stores
  // have read it, takes tile i - 1 + stages.
  const auto store_tile = [&](int i) {
    const uint8_t* src = stage(i);
    const int copies = tile_rows(i) * k;
    const int32_t* tr = s_tr + i * p.tile_tokens * k;
    for (int c = lane; c < copies; c += 32) {
      const int d = tr[c];
      if (d >= 0) bulk_store(out + static_cast<int64_t>(d) * row_out, src + (c / k) * row_out, row_out, pol_rows);
    }
    bulk_commit();
    if (i >= 1 && i - 1 + p.stages < n_tiles) {
      bulk_wait_read<1>();
      __syncwarp();
      if (lane == 0) load_tile(i - 1 + p.stages);
    }
  };
  if constexpr (kFp8) {
    for (int i = 0; i < n_tiles; ++i) {
      const int n = tile_rows(i);
      if (i > 0) {
        mbar_wait(&s_full[i % p.stages], (i / p.stages) & 1);
        quantize_stage(stage(i), n, H, sc);
      }
      // Each 128-group's scale, once per destination: the 8 lanes of the group take the slots in turn.
      const int units = H / 16, items = n * units;
      const int32_t* tr = s_tr + i * p.tile_tokens * k;
#pragma unroll
      for (int j = 0; j < kCoopMaxItems; ++j) {
        const int it = j * kCoopThreads + tid;
        if (it < items) {
          const int r = it / units, g = (it - r * units) / 8;
          for (int s = tid & 7; s < k; s += 8) {
            const int d = tr[r * k + s];
            if (d >= 0) st_global_hint(p.scales + scale_index<kMasked>(p, d, g), sc[j], pol_scales);
          }
        }
      }
      if (warp == 0) store_tile(i);
    }
  } else if (warp == 0) {
    for (int i = 0; i < n_tiles; ++i) {
      mbar_wait(&s_full[i % p.stages], (i / p.stages) & 1);
      store_tile(i);
    }
  }
  if (warp == 0) bulk_wait_all();  // the shared memory is read (and the rows written) before the CTA exits
}

// Small T: everything in one kernel. Each CTA counts the copies before its tokens (and per expert, for the offsets)
// itself, warp 0 ranks its own copies, then all threads copy.
template <bool kMasked, bool kFp8>
__global__ void __launch_bounds__(kThreads) dispatch_fused_kernel(const __grid_constant__ Params p) {
  __shared__ int s_before[kMaxExperts];  // copies of each expert before the next own copy (the rank base)
  __shared__ int s_total[kMaxExperts];   // copies of each expert overall (contiguous; masked: CTA 0 only)
  __shared__ int s_off[kMaxExperts + 1]; // contiguous: each expert's segment start
  __shared__ int s_warp[kWarps];
  __shared__ int32_t s_tr[kTileCopies];  // token_row of the own tokens

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int E = p.experts, k = p.top_k;
  const int t0 = blockIdx.x * p.cta_tokens;
  const int t1 = min(t0 + p.cta_tokens, p.tokens);
  const int units = p.hidden_size / Tile<kFp8>::kValues, items = (t1 - t0) * units;
  const bool tr_smem = (t1 - t0) * k <= kTileCopies;

  // The token rows do not depend on the routing: their loads are in flight during the counting.
  Tile<kFp8> tile;
  tile.load(p, t0, units, items, 0);

  const bool need_total = !kMasked || blockIdx.x == 0;
  for (int e = tid; e < E; e += kThreads) s_before[e] = s_total[e] = 0;
  __syncthreads();

  // Warp-uniform loop over flat copies: s_before over [0, t0 * k), s_total over [0, T * k) (<= kFusedMaxCopies).
  const int count_to = t0 * k, total_to = need_total ? p.tokens * k : 0;
  const int scan_to = max(count_to, total_to);
  constexpr int kIdBatch = 8;  // id loads in flight per thread before the counting
  for (int i0 = warp * 32; i0 < scan_to; i0 += kThreads * kIdBatch) {
    int ev[kIdBatch];
#pragma unroll
    for (int q = 0; q < kIdBatch; ++q) {
      const int i = i0 + q * kThreads + lane;
      ev[q] = i < scan_to ? valid_expert(__ldg(p.ids + i), E) : -1;
    }
#pragma unroll
    for (int q = 0; q < kIdBatch; ++q) {
      const int i = i0 + q * kThreads + lane;
      warp_count(s_before, i < count_to ? ev[q] : -1);
      if (total_to > 0) warp_count(s_total, ev[q]);  // ev is -1 past T*k = total_to
    }
  }
  __syncthreads();

  if constexpr (!kMasked) padded_offsets<kThreads>(s_total, s_off, s_warp, E, p.alignment);
  if (blockIdx.x == 0) {
    if constexpr (kMasked) {
      for (int e = tid; e < E; e += kThreads) p.meta[e] = s_total[e];
    } else {
      for (int e = tid; e <= E; e += kThreads) p.meta[e] = s_off[e];
    }
  }

  if (warp == 0) {
    // Ranks of the own copies, 32 at a time in flat order: a copy's rank is s_before[e] plus its peers (same
    // expert) in lower lanes; the lowest peer then advances s_before[e] for the next batch.
    const int end = t1 * k;
    for (int i0 = t0 * k; i0 < end; i0 += 32) {
      const int i = i0 + lane;
      const int e = i < end ? valid_expert(p.ids[i], E) : -1;
      const unsigned peers = __match_any_sync(kFull, e);
      const unsigned lower = peers & ((1u << lane) - 1u);
      const int rank = e >= 0 ? s_before[e] + __popc(lower) : 0;
      __syncwarp();
      if (e >= 0 && lower == 0) s_before[e] += __popc(peers);
      __syncwarp();
      if (i < end) {
        int dest = -1;
        if (e >= 0) {
          if constexpr (kMasked)
            dest = rank < p.max_m ? e * p.max_m + rank : -1;
          else
            dest = s_off[e] + rank;
        }
        p.token_row[i] = dest;
        if (tr_smem) s_tr[i - t0 * k] = dest;
      }
    }
  } else if constexpr (!kMasked) {
    // This CTA's slice of row_expert: the expert whose segment holds the row, -1 past its copies.
    const int64_t per = (static_cast<int64_t>(p.num_rows) + gridDim.x - 1) / gridDim.x;
    const int lo = static_cast<int>(std::min<int64_t>(blockIdx.x * per, p.num_rows));
    const int hi = static_cast<int>(std::min<int64_t>(lo + per, p.num_rows));
    for (int r = lo + tid - 32; r < hi; r += kThreads - 32) {
      int a = 0, b = E;  // s_off[a] <= r; find the last such expert
      while (b - a > 1) {
        const int mid = (a + b) >> 1;
        if (s_off[mid] <= r) a = mid; else b = mid;
      }
      p.row_expert[r] = r - s_off[a] < s_total[a] ? a : -1;
    }
  }
  __syncthreads();  // token_row of the own tokens is written (s_tr, or global: read back with coherent loads)

  for (int base = 0; base < items; base += Tile<kFp8>::kPass) {  // one pass unless H > 16384
    if (base > 0) tile.load(p, t0, units, items, base);
    tile.quantize();
    if (tr_smem)
      tile.template store<kMasked, false>(p, t0, units, items, base, s_tr);
    else
      tile.template store<kMasked, false>(p, t0, units, items, base, p.token_row + static_cast<int64_t>(t0) * k);
  }
}

void check_dispatch(const char* op, const at::Tensor& hidden, const at::Tensor& topk_ids, int64_t num_experts,
                    bool quant_fp8) {
  check_cuda(op, "hidden", hidden);
  check_dtype(op, "hidden", hidden, at::kBFloat16);
  DSV2_CHECK(hidden.dim() == 2, op, "hidden", "must have 2 dimensions, got shape ", hidden.sizes());
  DSV2_CHECK(hidden.is_contiguous(), op, "hidden", "must be contiguous, got strides ", hidden.strides(),
             " for shape ", hidden.sizes());
  const int64_t h = hidden.size(1);
  if (quant_fp8) {
    DSV2_CHECK(h > 0 && h % kGroup == 0, op, "hidden",
               "must have a hidden size that is a positive multiple of 128 with quant_fp8, got ", h);
  } else {
    DSV2_CHECK(h > 0 && h % 8 == 0, op, "hidden", "must have a hidden size that is a positive multiple of 8, got ",
               h);
  }
  DSV2_CHECK(h <= (1 << 24), op, "hidden", "has a hidden size too large for the CUDA kernel: ", h);
  check_same_device(op, "topk_ids", topk_ids, hidden);
  check_dtype(op, "topk_ids", topk_ids, at::kInt);
  DSV2_CHECK(topk_ids.dim() == 2, op, "topk_ids", "must have 2 dimensions, got shape ", topk_ids.sizes());
  DSV2_CHECK(topk_ids.is_contiguous(), op, "topk_ids", "must be contiguous, got strides ", topk_ids.strides(),
             " for shape ", topk_ids.sizes());
  DSV2_CHECK(topk_ids.size(0) == hidden.size(0) && topk_ids.size(1) >= 1, op, "topk_ids", "must have shape (",
             hidden.size(0), ", top_k) with top_k >= 1 (one row per token of 'hidden'), got ", topk_ids.sizes());
  DSV2_CHECK(num_experts >= 1 && num_experts <= kMaxExperts, op, "num_experts", "must be in [1, ", kMaxExperts,
             "], got ", num_experts);
  DSV2_CHECK(topk_ids.numel() <= std::numeric_limits<int>::max() - 32, op, "topk_ids",
             "has too many entries for the CUDA kernel: ", topk_ids.numel());
}

// The count -> rank -> copy path's one int32 scratch buffer (kept alive by the caller until the kernels are
// enqueued): FP8 token scales [T, groups4] first (16-byte aligned rows), row_token, then hist_cells rank-chunk
// histogram cells. Sets p's pointers to it.
at::Tensor alloc_scratch(Params& p, bool fp8, bool masked, int64_t tokens, int64_t hist_cells,
                         const at::Tensor& hidden) {
  const int64_t groups4 = fp8 ? (p.hidden_size / kGroup + 3) / 4 * 4 : 0;
  const int64_t out_rows = fp8 ? (masked ? int64_t{p.experts} * p.max_m : int64_t{p.num_rows}) : 0;
  const int64_t blocks = masked ? int64_t{p.experts} * ((p.max_m - 1) / 32 + 1) : (out_rows + 31) / 32;
  at::Tensor buf = at::empty({tokens * groups4 + out_rows + hist_cells}, hidden.options().dtype(at::kInt));
  int32_t* base = buf.data_ptr<int32_t>();
  p.tok_scales = fp8 ? reinterpret_cast<float*>(base) : nullptr;
  p.row_token = fp8 ? base + tokens * groups4 : nullptr;
  p.groups4 = static_cast<int>(groups4);
  // fewer tasks than the scales tensor has 512-byte blocks: within int
  p.scale_tasks = fp8 ? static_cast<int>(blocks * (groups4 / 4)) : 0;
  p.chunk_hist = base + tokens * groups4 + out_rows;
  return buf;
}

template <typename Kernel, typename... Args>
void launch_dependent(bool programmatic, Kernel kernel, unsigned grid, cudaStream_t stream, Args... args) {
  launch_kernel(programmatic, kernel, dim3(grid), dim3(kThreads), 0, stream, args...);
}

// Sizes dispatch_coop_kernel for p and launches it cooperatively on `stream`; false (nothing launched) where it does
// not apply: no cooperative launch, a CTA's token range or a stage does not fit in shared memory.
template <bool kMasked, bool kFp8>
bool launch_coop(Params& p, int64_t tokens, at::Tensor& chunk_hist_buf, const at::Tensor& hidden,
                 cudaStream_t stream) {
  const int device = hidden.get_device();
  int coop = 0, optin = 0;
  if (cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (!coop) return false;
  const int64_t ctas = std::min<int64_t>(sm_count(device), tokens);
  const int64_t range_tokens = (tokens + ctas - 1) / ctas;  // the most tokens of one CTA
  const int64_t cta_copies = range_tokens * p.top_k;
  if (cta_copies > kMaxCtaCopies) return false;
  const int64_t row_in = int64_t{2} * p.hidden_size;
  const int64_t tile_tokens = std::clamp<int64_t>(kStageTarget / row_in, 1, range_tokens);
  if (kFp8 && tile_tokens * (p.hidden_size / 16) > kCoopMaxItems * kCoopThreads) return false;
  const int64_t stage_bytes = (tile_tokens * row_in + 127) / 128 * 128;
  const int64_t meta_bytes = ((3 + kCoopWarps) * int64_t{p.experts} + 1 + cta_copies) * 4;
  const int64_t avail = optin - meta_bytes - 512;  // the static shared memory (mbarriers, s_warp)
  const int64_t tiles = (range_tokens + tile_tokens - 1) / tile_tokens;
  const int64_t stages = std::min<int64_t>({kMaxStages, avail / stage_bytes, tiles});
  if (stages < std::min<int64_t>(2, tiles)) return false;  // the ring needs a stage to refill while one is stored
  const int64_t smem = stages * stage_bytes + meta_bytes;
  auto* kernel = dispatch_coop_kernel<kMasked, kFp8>;
  int per_sm = 0;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) !=
          cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kCoopThreads, static_cast<size_t>(smem)) !=
          cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (per_sm < 1) return false;
  const int64_t chunk_ctas = std::clamp<int64_t>(kChunkCopies / cta_copies, 1, ctas);
  const int64_t chunks = (ctas + chunk_ctas - 1) / chunk_ctas;
  chunk_hist_buf = at::empty({chunks, p.experts}, hidden.options().dtype(at::kInt));
  p.chunk_hist = chunk_hist_buf.data_ptr<int32_t>();
  p.chunks = static_cast<int>(chunks);
  p.chunk_ctas = static_cast<int>(chunk_ctas);
  p.cta_copies = static_cast<int>(cta_copies);
  p.tile_tokens = static_cast<int>(tile_tokens);
  p.stage_bytes = static_cast<int>(stage_bytes);
  p.stages = static_cast<int>(stages);

  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(ctas));
  cfg.blockDim = dim3(kCoopThreads);
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;  // all CTAs resident: the grid barrier cannot deadlock
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  if (cudaLaunchKernelEx(&cfg, kernel, p) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return true;
}

// Fills the geometry of p (tokens per CTA, rank chunks) and launches the fused kernel, or the count, rank and copy
// kernels, on the current stream.
template <bool kMasked>
void launch(Params& p, bool quant_fp8, int64_t tokens, at::Tensor& chunk_hist_buf, const at::Tensor& hidden) {
  const int64_t copies = tokens * p.top_k;
  // Tokens per CTA: one pass of Tile (8 vectors = 32 KB of rows per CTA), their token_row in shared memory, and at
  // least ~256 CTAs when T allows it.
  const int64_t units = quant_fp8 ? p.hidden_size / Tile<true>::kValues : p.hidden_size / Tile<false>::kValues;
  const int64_t pass = quant_fp8 ? Tile<true>::kPass : Tile<false>::kPass;
  int64_t cta_tokens = std::max<int64_t>(1, pass / units);
  cta_tokens = std::max<int64_t>(1, std::min<int64_t>({cta_tokens, kTileCopies / p.top_k, tokens / 256}));
  const int64_t ctas = (tokens + cta_tokens - 1) / cta_tokens;
  p.cta_tokens = static_cast<int>(cta_tokens);
  p.chunk_copies = kThreads;
  p.chunks = 1;
  p.chunk_hist = nullptr;

  const c10::cuda::CUDAGuard guard(hidden.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned grid = static_cast<unsigned>(ctas);
  if (copies <= kFusedMaxCopies) {
    if (quant_fp8)
      dispatch_fused_kernel<kMasked, true><<<grid, kThreads, 0, stream>>>(p);
    else
      dispatch_fused_kernel<kMasked, false><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  const bool coop = copies <= kCoopMaxCopies &&
                    (quant_fp8 ? launch_coop<kMasked, true>(p, tokens, chunk_hist_buf, hidden, stream)
                             : launch_coop<kMasked, false>(p, tokens, chunk_hist_buf, hidden, stream));
  if (coop) {
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  // Rank chunks: ~kTargetChunks of them, each a whole number of 32-copy batches per warp (at most kRankBatches).
  const int64_t batches = std::clamp<int64_t>((copies + kThreads * kTargetChunks - 1) / (kThreads * kTargetChunks),
                                              1, kRankBatches);
  const int64_t chunk_copies = batches * kThreads;
  const int64_t chunks = (copies + chunk_copies - 1) / chunk_copies;
  p.chunk_copies = static_cast<int>(chunk_copies);
  p.chunks = static_cast<int>(chunks);
  chunk_hist_buf = alloc_scratch(p, quant_fp8, kMasked, tokens, chunks * p.experts, hidden);
  dispatch_count_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(p.ids, p.chunk_hist, copies,
                                                                               p.experts, p.chunk_copies);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Programmatic launches put the three kernels in flight together (the copy kernel's loads overlap the count and
  // rank kernels). Not while a CUDA graph is being captured: an ordinary edge there is certain to capture on every
  // driver.
  const bool programmatic = programmatic_launch_ok(stream, /*allow_capture=*/false);
  launch_dependent(programmatic, dispatch_rank_kernel<kMasked>, static_cast<unsigned>(chunks), stream, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (quant_fp8)
    launch_dependent(programmatic, dispatch_copy_kernel<kMasked, true>, grid, stream, p);
  else
    launch_dependent(programmatic, dispatch_copy_kernel<kMasked, false>, grid, stream, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (quant_fp8) {  // the column-major scales from the copy kernel's token-major ones: up to 8 CTAs per SM
    const int64_t ctas_max = int64_t{sm_count(hidden.get_device())} * 8;
    const int64_t scale_ctas = std::clamp<int64_t>((p.scale_tasks + kWarps - 1) / kWarps, 1, ctas_max);
    launch_dependent(programmatic, dispatch_scales_kernel<kMasked>, static_cast<unsigned>(scale_ctas), stream, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

const at::Tensor aligned_hidden(const at::Tensor& hidden) {
  return reinterpret_cast<uintptr_t>(hidden.data_ptr()) % 16 == 0 ? hidden : hidden.clone();
}

void fill_common(Params& p, const at::Tensor& hidden, const at::Tensor& topk_ids, int64_t num_experts,
                 const at::Tensor& rows, const at::Tensor& scales, bool quant_fp8, const at::Tensor& token_row) {
  p.hidden = reinterpret_cast<const __nv_bfloat16*>(hidden.data_ptr());
  p.ids = topk_ids.data_ptr<int32_t>();
  p.rows = rows.data_ptr();
  p.scales = quant_fp8 ? scales.data_ptr<float>() : nullptr;
  p.token_row = token_row.data_ptr<int32_t>();
  p.tokens = static_cast<int>(hidden.size(0));
  p.top_k = static_cast<int>(topk_ids.size(1));
  p.experts = static_cast<int>(num_experts);
  p.hidden_size = static_cast<int>(hidden.size(1));
  p.row_expert = nullptr;
  p.alignment = 1;
  p.max_m = 1;
  p.num_rows = 0;
  p.scale_pad = 0;
  p.tok_scales = nullptr;
  p.row_token = nullptr;
  p.groups4 = 0;
  p.scale_tasks = 0;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_contiguous_cuda(
    const at::Tensor& hidden_in, const at::Tensor& topk_ids, int64_t num_experts, int64_t alignment,
    bool quant_fp8) {
  const char* op = "dispatch_contiguous";
  check_dispatch(op, hidden_in, topk_ids, num_experts, quant_fp8);
  DSV2_CHECK(alignment >= 1, op, "alignment", "must be >= 1, got ", alignment);
  const int64_t T = hidden_in.size(0), H = hidden_in.size(1), k = topk_ids.size(1), E = num_experts;
  // contiguous_rows_bound: the most rows any routing of the T * k copies can use
  const int64_t n = T * k;
  DSV2_CHECK(alignment <= std::numeric_limits<int>::max(), op, "alignment", "is too large: ", alignment);
  const int64_t R = (n + std::min(n, E) * (alignment - 1)) / alignment * alignment;
  DSV2_CHECK(R < std::numeric_limits<int>::max(), op, "alignment", "gives ", R,
             " rows, more than int32 row indices address");
  const auto opts = hidden_in.options();
  at::Tensor rows = at::empty({R, H}, opts.dtype(quant_fp8 ? at::kFloat8_e4m3fn : at::kBFloat16));
  const int64_t r_pad = (R + 3) / 4 * 4;
  at::Tensor scales = quant_fp8 ? at::empty_strided({R, H / kGroup}, {1, r_pad}, opts.dtype(at::kFloat))
                                : at::empty({0}, opts.dtype(at::kFloat));
  at::Tensor offsets = at::empty({E + 1}, opts.dtype(at::kInt));
  at::Tensor row_expert = at::empty({R}, opts.dtype(at::kInt));
  at::Tensor token_row = at::empty({T, k}, opts.dtype(at::kInt));
  if (T == 0) {
    offsets.zero_();  // no copies: every segment empty (R == 0, nothing else to write)
    return {rows, scales, offsets, row_expert, token_row};
  }
  const at::Tensor hidden = aligned_hidden(hidden_in);
  Params p;
  fill_common(p, hidden, topk_ids, E, rows, scales, quant_fp8, token_row);
  p.row_expert = row_expert.data_ptr<int32_t>();
  p.meta = offsets.data_ptr<int32_t>();
  p.alignment = static_cast<int>(alignment);
  p.num_rows = static_cast<int>(R);
  p.scale_pad = r_pad;
  at::Tensor chunk_hist;
  launch<false>(p, quant_fp8, T, chunk_hist, hidden);
  return {rows, scales, offsets, row_expert, token_row};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_masked_cuda(const at::Tensor& hidden_in,
                                                                                const at::Tensor& topk_ids,
                                                                                int64_t num_experts, int64_t max_m,
                                                                                bool quant_fp8) {
  const char* op = "dispatch_masked";
  check_dispatch(op, hidden_in, topk_ids, num_experts, quant_fp8);
  DSV2_CHECK(max_m >= 1 && num_experts * max_m < (int64_t{1} << 31), op, "max_m",
             "must be >= 1 with num_experts * max_m < 2**31 (int32 rows), got ", max_m);
  const int64_t T = hidden_in.size(0), H = hidden_in.size(1), k = topk_ids.size(1), E = num_experts;
  const auto opts = hidden_in.options();
  at::Tensor rows = at::empty({E, max_m, H}, opts.dtype(quant_fp8 ? at::kFloat8_e4m3fn : at::kBFloat16));
  const int64_t m_pad = (max_m + 3) / 4 * 4, groups = H / kGroup;
  at::Tensor scales = quant_fp8 ? at::empty_strided({E, max_m, groups}, {groups * m_pad, 1, m_pad},
                                                    opts.dtype(at::kFloat))
                                : at::empty({0}, opts.dtype(at::kFloat));
  at::Tensor counts = at::empty({E}, opts.dtype(at::kInt));
  at::Tensor token_row = at::empty({T, k}, opts.dtype(at::kInt));
  if (T == 0) {
    counts.zero_();
    return {rows, scales, counts, token_row};
  }
  const at::Tensor hidden = aligned_hidden(hidden_in);
  Params p;
  fill_common(p, hidden, topk_ids, E, rows, scales, quant_fp8, token_row);
  p.meta = counts.data_ptr<int32_t>();
  p.max_m = static_cast<int>(max_m);
  p.scale_pad = m_pad;
  at::Tensor chunk_hist;
  launch<true>(p, quant_fp8, T, chunk_hist, hidden);
  return {rows, scales, counts, token_row};
}

}  // namespace dsv2
