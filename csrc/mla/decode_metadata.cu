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

#include "decode_common.cuh"

namespace dsv2 {
namespace mla_decode {
namespace {

constexpr int kMetaThreads = 1024;

// Exclusive prefix sum over the block; `total` gets the block's sum. warp_sums holds 32 ints.
__device__ int block_exclusive_scan(int v, int& total, int* warp_sums) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int w = lane < warps ? warp_sums[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    warp_sums[lane] = w;
  }
  __syncthreads();
  const int before = warp > 0 ? warp_sums[warp - 1] : 0;
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

// Scratch ints of the kernel (tile / cost prefixes, part starts, first parts): in shared memory when they fit the
// default 48 KB of dynamic shared memory (batch up to ~4000), else in the workspace. Why shared: phases 2-4 are
// binary searches, ~8 dependent loads each; from L2 (~0.6 us a round trip under the barriers) they made this one-CTA
// kernel ~8 us on the H200 (ncu), ~20 % of a decode call at s_k = 1024.
constexpr int kMetaSmemBytes = 48 * 1024;
__host__ __device__ inline int64_t meta_scratch_ints(int batch, int parts) { return 3 * int64_t(batch) + parts + 3; }

// One CTA. Plain pointers, no __restrict__: the arrays are written and re-read across the barriers, which order
// shared and global memory within the block; generic addressing lets the same code run on either.
__global__ void __launch_bounds__(kMetaThreads) decode_metadata_kernel(const int* seqlens, int batch, int max_len,
                                                                       int parts, int* ws, bool scratch_in_smem) {
  __shared__ int warp_sums[32];
  extern __shared__ int scratch[];
  const SchedLayout lay(batch, parts);
  int* sched = ws + lay.sched;
  int* nsplit = ws + lay.nsplit;
  int* cu_partial = ws + lay.cu_partial;
  // Same relative layout as the workspace's scratch regions (tile_prefix .. first_part are consecutive there).
  int* tile_pre = scratch_in_smem ? scratch : ws + lay.tile_prefix;
  int* cost_pre = tile_pre + (lay.cost_prefix - lay.tile_prefix);
  int* part_start = tile_pre + (lay.part_start - lay.tile_prefix);
  int* first_part = tile_pre + (lay.first_part - lay.tile_prefix);

  // 1. Prefix sums of tiles and of cost per sequence.
  int carry_t = 0, carry_c = 0;
  for (int base = 0; base < batch; base += blockDim.x) {
    const int b = base + threadIdx.x;
    const int n = b < batch ? ceil_div(clamp_len(seqlens[b], max_len), kBlockN) : 0;
    const int c = n > 0 ? n + kSplitOverhead : 0;  // empty sequences cost nothing: the combine kernel writes them
    int tot_n, tot_c;
    const int ex_n = block_exclusive_scan(n, tot_n, warp_sums);
    const int ex_c = block_exclusive_scan(c, tot_c, warp_sums);
    if (b < batch) {
      tile_pre[b] = carry_t + ex_n;
      cost_pre[b] = carry_c + ex_c;
    }
    carry_t += tot_n;
    carry_c += tot_c;
  }
  if (threadIdx.x == 0) {
    tile_pre[batch] = carry_t;
    cost_pre[batch] = carry_c;
  }
  __syncthreads();
  const int total_tiles = carry_t, total_cost = carry_c;

  // 2. Part starts G_p (p = 0..parts). A cost position inside sequence b's overhead maps to its first tile, so G is
  //    non-decreasing and a part can only be empty where boundaries crowd into one overhead.
  const int payload = max(1, ceil_div(total_cost, parts));
  for (int p = threadIdx.x; p <= parts; p += blockDim.x) {
    const long long x = static_cast<long long>(p) * payload;
    int g = total_tiles;
    if (x < total_cost) {
      const int b = last_le(cost_pre, batch, static_cast<int>(x));  // cost_pre[b] <= x < cost_pre[b + 1]
      g = tile_pre[b] + max(0, static_cast<int>(x) - cost_pre[b] - kSplitOverhead);
    }
    part_start[p] = g;
  }
  __syncthreads();

  // 3. Splits per sequence: the parts holding its first and last tile, and everything between (all non-empty).
  int carry_s = 0;
  for (int base = 0; base < batch; base += blockDim.x) {
    const int b = base + threadIdx.x;
    int ns = 0, pf = 0;
    if (b < batch) {
      const int n = tile_pre[b + 1] - tile_pre[b];
      if (n > 0) {
        pf = last_le(part_start, parts, tile_pre[b]);
        ns = last_le(part_start, parts, tile_pre[b] + n - 1) - pf + 1;
      }
      nsplit[b] = ns;
      first_part[b] = pf;
    }
    int tot;
    const int ex = block_exclusive_scan(ns >= 2 ? ns : 0, tot, warp_sums);
    if (b < batch) cu_partial[b] = carry_s + ex;
    carry_s += tot;
  }
  if (threadIdx.x == 0) cu_partial[batch] = carry_s;
  __syncthreads();

  // 4. Per part: where it starts, how many tiles, and which split of its first sequence it is.
  for (int p = threadIdx.x; p < parts; p += blockDim.x) {
    const int gs = part_start[p], ge = part_start[p + 1];
    int4 e = make_int4(0, 0, 0, 0);
    if (gs < ge) {
      const int b = last_le(tile_pre, batch, gs);  // the (non-empty) sequence holding global tile gs
      e = make_int4(b, gs - tile_pre[b], ge - gs, p - first_part[b]);
    }
    reinterpret_cast<int4*>(sched)[p] = e;
  }
}

}  // namespace

void launch_decode_metadata(const int* seqlens, int batch, int max_len, int parts, int* ws, cudaStream_t stream) {
  const int64_t scratch_bytes = meta_scratch_ints(batch, parts) * int64_t(sizeof(int));
  const bool in_smem = scratch_bytes <= kMetaSmemBytes;
  decode_metadata_kernel<<<1, kMetaThreads, in_smem ? scratch_bytes : 0, stream>>>(seqlens, batch, max_len, parts, ws,
                                                                                   in_smem);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mla_decode
}  // namespace dsv2
