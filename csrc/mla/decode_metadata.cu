// Split-KV schedule of the MLA decode kernel, computed on the GPU from cache_seqlens (no host sync: a decode step with
// it can be captured in a CUDA graph; the workspace size depends on the batch size and the SM count only).
//
// Every query-row block of every sequence needs the same KV work, so the schedule splits the KV work once into
// `parts` CTA parts (the grid is parts x row blocks, about one CTA per SM). Sequence b costs n_b = ceil(L_b / 64)
// tiles plus a fixed overhead (kSplitOverhead tiles, its overhead first); laying all sequences end to end, part p gets
// the cost interval [p * payload, (p + 1) * payload) with payload = ceil(total / parts). Mapped back to tiles, part p
// processes the global tiles [G_p, G_p+1) (G is non-decreasing), a contiguous run that may cross sequence boundaries.
// A part boundary that falls inside a sequence splits it; its splits are the parts that intersect it, numbered in
// order. Sequences with a single split are written directly by the main kernel; the others get fp32 partial slots
// (at most 2 * (parts - 1) in all, as each interior boundary adds one split) that the combine kernel merges.

#include "../common/torch_cuda.h"

#include <algorithm>

#include "decode_common.cuh"

namespace dsv2 {
namespace mla_decode {
namespace {

constexpr int kMetaMaxThreads = 1024;

// Exclusive prefix sum over the block; `total` gets the block's sum. warp_sums holds 32 values.
template <typename T>
__device__ T block_exclusive_scan(T v, T& total, T* warp_sums) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  T x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    T w = lane < warps ? warp_sums[lane] : T(0);
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const T y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    warp_sums[lane] = w;
  }
  __syncthreads();
  const T before = warp > 0 ? warp_sums[warp - 1] : T(0);
  total = warp_sums[warps - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return before + x - v;
}

// The largest i in [0, n) with a[i] <= x, for a non-decreasing a[0..n] with a[0] <= x < a[n].
__device__ int last_le(const int* a, int n, int x) {
  int lo = 0, hi = n;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (a[mid] <= x) lo = mid;
    else hi = mid;
  }
  return lo;
}

// Scratch ints of the kernel (tile and cost prefixes): in shared memory when they fit the default 48 KB of dynamic
// shared memory (batch up to ~6000), else in the workspace (same layout). From L2, each of the binary searches below
// is ~8 dependent ~0.6 us round trips.
constexpr int kMetaSmemBytes = 48 * 1024;
__host__ __device__ inline int64_t meta_scratch_ints(int batch) { return 2 * (int64_t(batch) + 1); }

// Part start G(x) of cost position x (see the top of the file): the first tile at or after x in tile order, with
// x inside a sequence's overhead mapped to its first tile. Also returns the (non-empty) sequence b holding x.
__device__ __forceinline__ int part_start(const int* tile_pre, const int* cost_pre, int batch, int total_tiles,
                                          int total_cost, long long x, int& b) {
  b = 0;
  if (x >= total_cost) return total_tiles;
  b = last_le(cost_pre, batch, static_cast<int>(x));  // cost_pre[b] <= x < cost_pre[b + 1]
  return tile_pre[b] + max(0, static_cast<int>(x) - cost_pre[b] - kSplitOverhead);
}

// One CTA of blockDim.x threads (a multiple of 32, <= 1024). Work per thread: O(batch / blockDim) sequences and
// O(parts / blockDim) parts, each O(1) apart from two binary searches in shared memory per part; two block scans.
// Plain pointers, no __restrict__: the scratch arrays are written and re-read across the barrier, which orders shared
// and global memory within the block; generic addressing lets the same code run on either.
__global__ void __launch_bounds__(kMetaMaxThreads) decode_metadata_kernel(const int* seqlens, int batch, int max_len,
                                                                          int parts, int* ws, bool scratch_in_smem) {
  __shared__ long long warp_sums[32];
  __shared__ int warp_sums_i[32];
  extern __shared__ int scratch[];
  // No global access before this (see common/pdl.cuh; a no-op unless launched as a programmatic dependent): the
  // lengths may come from the previous kernel, and the workspace may be memory it still reads.
  griddep_wait();
  // The main kernel may be placed now: its CTAs set up and wait for this grid's completion (griddep_wait).
  griddep_launch_dependents();
  const SchedLayout lay(batch, parts);
  int* sched = ws + lay.sched;
  int* nsplit = ws + lay.nsplit;
  int* cu_partial = ws + lay.cu_partial;
  // Same relative layout as the workspace's scratch regions (tile_prefix, cost_prefix are consecutive there).
  int* tile_pre = scratch_in_smem ? scratch : ws + lay.tile_prefix;
  int* cost_pre = tile_pre + (lay.cost_prefix - lay.tile_prefix);

  // 1. Prefix sums of tiles and of cost per sequence, in one scan: cost in the low 32 bits, tiles in the high ones
  //    (both totals are < 2^31, checked by the host: the low half never carries).
  long long carry = 0;
  for (int base = 0; base < batch; base += blockDim.x) {
    const int b = base + threadIdx.x;
    const int n = b < batch ? ceil_div(clamp_len(__ldg(seqlens + b), max_len), kBlockN) : 0;
    const int c = n > 0 ? n + kSplitOverhead : 0;  // empty sequences cost nothing: the combine kernel writes them
    long long tot;
    const long long ex = carry + block_exclusive_scan((static_cast<long long>(n) << 32) | c, tot, warp_sums);
    if (b < batch) {
      tile_pre[b] = static_cast<int>(ex >> 32);
      cost_pre[b] = static_cast<int>(ex & 0xffffffffll);
    }
    carry += tot;
  }
  const int total_tiles = static_cast<int>(carry >> 32), total_cost = static_cast<int>(carry & 0xffffffffll);
  if (threadIdx.x == 0) {
    tile_pre[batch] = total_tiles;
    cost_pre[batch] = total_cost;
  }
  __syncthreads();

  // Part p covers the cost interval [p * payload, (p + 1) * payload), i.e. the global tiles [G_p, G_p+1). G is
  // non-decreasing, and G_p <= g for a tile g of sequence b exactly when p * payload <= x_g, the cost position of g
  // (cost_pre[b] + kSplitOverhead + g - tile_pre[b]): the part holding tile g is x_g / payload, no search.
  const int payload = max(1, ceil_div(total_cost, parts));

  // 2. Per part: its first sequence (the one holding cost position p * payload, which also holds tile G_p), the
  //    tile there, the tile count, and which split of that sequence the part is.
  for (int p = threadIdx.x; p < parts; p += blockDim.x) {
    int b, b_end;
    const long long x = static_cast<long long>(p) * payload;
    const int gs = part_start(tile_pre, cost_pre, batch, total_tiles, total_cost, x, b);
    const int ge = part_start(tile_pre, cost_pre, batch, total_tiles, total_cost, x + payload, b_end);
    int4 e = make_int4(0, 0, 0, 0);
    if (gs < ge) e = make_int4(b, gs - tile_pre[b], ge - gs, p - (cost_pre[b] + kSplitOverhead) / payload);
    reinterpret_cast<int4*>(sched)[p] = e;
  }

  // 3. Per sequence: its splits (the parts holding its first and last tile, and all between: none is empty), and
  //    the partial slots of those with >= 2 splits.
  int carry_s = 0;
  for (int base = 0; base < batch; base += blockDim.x) {
    const int b = base + threadIdx.x;
    int ns = 0;
    if (b < batch) {
      const int n = tile_pre[b + 1] - tile_pre[b];
      if (n > 0) {
        const int x0 = cost_pre[b] + kSplitOverhead;  // cost position of the first tile
        ns = (x0 + n - 1) / payload - x0 / payload + 1;
      }
      nsplit[b] = ns;
    }
    int tot;
    const int ex = block_exclusive_scan(ns >= 2 ? ns : 0, tot, warp_sums_i);
    if (b < batch) cu_partial[b] = carry_s + ex;
    carry_s += tot;
  }
  if (threadIdx.x == 0) cu_partial[batch] = carry_s;
}

}  // namespace

void launch_decode_metadata(const int* seqlens, int batch, int max_len, int parts, int* ws, cudaStream_t stream) {
  const int64_t scratch_bytes = meta_scratch_ints(batch) * int64_t(sizeof(int));
  const bool in_smem = scratch_bytes <= kMetaSmemBytes;
  // One thread per sequence and per part where that fits one CTA (a single pass of each loop).
  const int threads = std::min(kMetaMaxThreads, ceil_div(std::max(std::max(batch, parts), 32), 32) * 32);
  // An ordinary launch: the kernels before it are not ours to trust with an early trigger, and they normally write
  // the lengths it reads first.
  decode_metadata_kernel<<<1, threads, in_smem ? scratch_bytes : 0, stream>>>(seqlens, batch, max_len, parts, ws,
                                                                              in_smem);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mla_decode
}  // namespace dsv2
