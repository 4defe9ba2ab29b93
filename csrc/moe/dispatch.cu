// Token dispatch: copy each token to the rows of the experts it was routed to, optionally quantized to e4m3 with
// per-1x128-group scales, in the contiguous (prefill) or masked (decode) layout of dsv2_kernels/moe.py.
//
// Row order is a function of topk_ids alone: expert e's copies in flat (token, slot) order, i.e. a copy's rank is
// the number of earlier copies of the same expert. Every count below is an integer sum (order-independent), and the
// only order-dependent step, ranking copies among their peers, runs inside one warp in flat order (match_any per 32
// copies: a stable multi-split), so the layout is deterministic and bit-reproducible without any global atomics.
//
// The copy itself is the cost (each token row read once and written k times: 3/4 (FP8) to 6/7 (bf16) of the traffic
// are writes), so the routing work is kept off the copying CTAs' critical path. Two paths:
//   * up to kFusedMaxCopies copies (decode, latency-bound): one kernel (dispatch_fused_kernel). Each CTA issues the
//     loads of its rows first, then counts the copies before its tokens and per expert itself (a few KB of ids from
//     L2), warp 0 ranks the CTA's own copies into token_row (and shared memory), and all threads copy.
//   * beyond: three kernels, each a programmatic dependent of the previous one, so all three are in flight together.
//     They work on rank chunks of chunk_copies consecutive flat copies (~kTargetChunks chunks, <= 4096 copies each):
//       1. dispatch_count_kernel: the per-expert histogram of each chunk -> chunk_hist [chunks, E].
//       2. dispatch_rank_kernel, one CTA per chunk: before waiting on 1, each warp ranks its slice of the chunk
//          locally (match_any, per-warp counters); after, it adds the histograms of the chunks before its own (of all
//          of them for the offsets) and the counts of the warps before it, and writes token_row; chunk 0 writes the
//          offsets / counts, each CTA a slice of row_expert (-1 on padding and unused rows), a warp per segment.
//       3. dispatch_copy_kernel: a pure copy. Each CTA loads its token rows (8 16-byte vectors per thread, in
//          registers; FP8 quantizes them right away) before waiting on 2, so the first wave's reads (the whole input
//          at T = 4096, H = 2048) overlap the count/rank chain; then it stages its tokens' token_row in shared memory
//          and stores each row to its k destinations.
//     So a copying CTA does one L2 round trip (token_row) besides the copy. (The previous design ranked inside every
//     copying CTA: an O(chunks * E) prefix, a serial warp-0 loop and barriers before the first store, and the stores
//     re-read token_row from L2 one slot at a time.)
// Stores are 16 bytes per lane (a warp writes 512 contiguous bytes of a row). With FP8 each thread quantizes 16 values
// once per token (not per copy), 8 lanes sharing a 128-group's amax through shuffles; those 8 lanes then store the
// group's scale to the k destinations, one slot each.
//
// FP8 matches fp8.quant_per_token_group_ref bit for bit through the quantizer's own helpers (fp8/quant_common.cuh).

#include "../common/torch_cuda.h"

#include <ATen/ops/empty_strided.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../common/vec.cuh"
#include "../fp8/quant_common.cuh"
#include "../ops.h"

namespace dsv2 {
namespace {

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
  const int32_t* chunk_hist;    // [chunks, E] copies per expert per rank chunk (three-kernel path)
  int64_t scale_pad;            // column stride of the scales (round_up(rows per matrix, 4))
  int num_rows;                 // R (contiguous)
  int tokens, top_k, experts, hidden_size;
  int alignment;     // contiguous
  int max_m;         // masked
  int cta_tokens;    // tokens per copying CTA
  int chunk_copies;  // copies per rank chunk (a multiple of kThreads, <= kRankBatches * kThreads)
  int chunks;        // rank chunks
};

__device__ __forceinline__ void griddep_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void griddep_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;"); }

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
// alignment), s_off[E] = rows used. 4 consecutive experts per thread, then warps, then the CTA. All threads call it;
// it ends synchronized.
__device__ __forceinline__ void padded_offsets(const int* s_total, int* s_off, int* s_warp, int E, int alignment) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int v[4], local = 0;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int e = tid * 4 + q;
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
  for (int w = 0; w < kWarps; ++w) {
    run += w < warp ? s_warp[w] : 0;
    all += s_warp[w];
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int e = tid * 4 + q;
    if (e < E) s_off[e] = run;
    run += v[q];
  }
  if (tid == 0) s_off[E] = all;
  __syncthreads();
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
      for (int j = 0; j < kItems; ++j) {
        const uint4 a = v[2 * j], b = v[2 * j + 1];
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
        // The same scale and quotients as quant_per_token_group (quant_common.cuh), so the fused path is bit-exact
        // with the reference (which multiplies amax by the fp32 reciprocal of 448, as ATen does).
        scale[j] = fp8_quant::group_scale(amax);
        const fp8_quant::Divisor div = fp8_quant::make_divisor(scale[j]);
        uint32_t packed[4];
#pragma unroll
        for (int h = 0; h < 4; ++h)
          packed[h] = fp8_quant::fp8x2(x[4 * h], x[4 * h + 1], div) |
                      (fp8_quant::fp8x2(x[4 * h + 2], x[4 * h + 3], div) << 16);
        q[j] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
      }
    }
  }

  // tr: token_row of the CTA's tokens (shared memory, or global where it does not fit).
  template <bool kMasked>
  __device__ __forceinline__ void store(const Params& p, int units, int items, int base, const int32_t* tr) const {
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
          // The group's scale, once per destination: the 8 lanes of the group take the slots in turn.
          const int64_t g = u / (kGroup / kValues);
          for (int s = threadIdx.x & 7; s < k; s += 8) {
            const int d = trt[s];
            if (d < 0) continue;
            int64_t so;
            if constexpr (kMasked) {
              const int e = d / p.max_m, m = d - e * p.max_m;
              so = static_cast<int64_t>(e) * (H / kGroup) * p.scale_pad + m;
            } else {
              so = d;
            }
            p.scales[so + g * p.scale_pad] = scale[j];
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
  constexpr int kCellBatch = 16;  // independent loads in flight per thread
  for (int c0 = tid; c0 < cells; c0 += kThreads * kCellBatch) {
    int v[kCellBatch];
#pragma unroll
    for (int q = 0; q < kCellBatch; ++q) {
      const int c = c0 + q * kThreads;
      v[q] = c < cells ? __ldcg(p.chunk_hist + c) : 0;
    }
#pragma unroll
    for (int q = 0; q < kCellBatch; ++q) {
      const int c = c0 + q * kThreads;
      if (v[q] != 0) {  // cell c is (chunk c / E, expert c % E)
        const int e = c % E;
        if (c < chunk * E) atomicAdd(s_before + e, v[q]);
        atomicAdd(s_total + e, v[q]);
      }
    }
  }
  __syncthreads();
  if constexpr (!kMasked) padded_offsets(s_total, s_off, s_warp, E, p.alignment);
  if (chunk == 0) {
    if constexpr (kMasked) {
      for (int e = tid; e < E; e += kThreads) p.meta[e] = s_total[e];
    } else {
      for (int e = tid; e <= E; e += kThreads) p.meta[e] = s_off[e];
    }
  }

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

// Pure copy of cta_tokens tokens per CTA, once token_row is known (dispatch_rank_kernel).
template <bool kMasked, bool kFp8>
__global__ void __launch_bounds__(kThreads, kCopyBlocks) dispatch_copy_kernel(const __grid_constant__ Params p) {
  __shared__ int32_t s_tr[kTileCopies];
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
      tile.template store<kMasked>(p, units, items, base, s_tr);
    else
      tile.template store<kMasked>(p, units, items, base, tr);
  }
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

  if constexpr (!kMasked) padded_offsets(s_total, s_off, s_warp, E, p.alignment);
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
      tile.template store<kMasked>(p, units, items, base, s_tr);
    else
      tile.template store<kMasked>(p, units, items, base, p.token_row + static_cast<int64_t>(t0) * k);
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

template <typename Kernel, typename... Args>
void launch_dependent(bool programmatic, Kernel kernel, unsigned grid, cudaStream_t stream, Args... args) {
  if (programmatic) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = 0;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    if (cudaLaunchKernelEx(&cfg, kernel, args...) == cudaSuccess) return;
    (void)cudaGetLastError();  // not supported here: an ordinary launch below
  }
  kernel<<<grid, kThreads, 0, stream>>>(args...);
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

  // Rank chunks: ~kTargetChunks of them, each a whole number of 32-copy batches per warp (at most kRankBatches).
  const int64_t batches = std::clamp<int64_t>((copies + kThreads * kTargetChunks - 1) / (kThreads * kTargetChunks),
                                              1, kRankBatches);
  const int64_t chunk_copies = batches * kThreads;
  const int64_t chunks = (copies + chunk_copies - 1) / chunk_copies;
  p.chunk_copies = static_cast<int>(chunk_copies);
  p.chunks = static_cast<int>(chunks);
  chunk_hist_buf = at::empty({chunks, p.experts}, hidden.options().dtype(at::kInt));
  p.chunk_hist = chunk_hist_buf.data_ptr<int32_t>();
  dispatch_count_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(
      p.ids, chunk_hist_buf.data_ptr<int32_t>(), copies, p.experts, p.chunk_copies);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Programmatic launches put the three kernels in flight together (the copy kernel's loads overlap the count and
  // rank kernels). Not while a CUDA graph is being captured: an ordinary edge there is certain to capture on every
  // driver.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusActive;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess) {
    (void)cudaGetLastError();
    capture = cudaStreamCaptureStatusActive;
  }
  const bool programmatic = capture == cudaStreamCaptureStatusNone;
  launch_dependent(programmatic, dispatch_rank_kernel<kMasked>, static_cast<unsigned>(chunks), stream, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (quant_fp8)
    launch_dependent(programmatic, dispatch_copy_kernel<kMasked, true>, grid, stream, p);
  else
    launch_dependent(programmatic, dispatch_copy_kernel<kMasked, false>, grid, stream, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
