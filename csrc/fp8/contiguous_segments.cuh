// The expert segments of a contiguous MoE dispatch, found on the GPU (no host sync, CUDA-graph safe). Shared by the
// two grouped-contiguous GEMM implementations (fp8_grouped_gemm_contiguous.cu: CUTLASS; fp8_grouped_gemm_contiguous_
// sm90.cu: ours), which differ only in what they write per expert.
//
// A row starts a segment where its predecessor holds another value and ends one where its successor does; the starts
// and ends are reduced with atomicMax into a zeroed scratch (first as R - first, so that 0 means "absent") and the
// starts counted. The block that finishes last calls sink(e, first, m) for every expert: its segment is rows
// [first, first + m), trailing padding (-1) excluded; m = 0 for an absent expert and for one whose rows are not one
// contiguous segment (not the dispatch's layout: skipped entirely rather than computing rows of other experts).
#pragma once

#include <cstdint>

namespace dsv2 {
namespace fp8 {

constexpr int kScanThreads = 256;

// Scratch ints needed by find_contiguous_segments (zeroed before the launch).
inline size_t segment_scratch_ints(int num_experts) { return 3 * static_cast<size_t>(num_experts) + 1; }

// Called by every thread of a grid of kScanThreads-thread blocks (grid-stride over the rows).
template <class Sink>
__device__ __forceinline__ void find_contiguous_segments(const int* __restrict__ row_expert, int rows,
                                                         int num_experts, int* scratch, Sink&& sink) {
  int* lo = scratch;
  int* hi = scratch + num_experts;
  int* starts = scratch + 2 * num_experts;
  unsigned* done = reinterpret_cast<unsigned*>(scratch + 3 * num_experts);

  for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += gridDim.x * blockDim.x) {
    const int e = row_expert[r];
    if (e < 0 || e >= num_experts) continue;
    const int prev = r > 0 ? row_expert[r - 1] : -1;
    const int next = r + 1 < rows ? row_expert[r + 1] : -1;
    if (prev != e) {
      atomicMax(&lo[e], rows - r);
      atomicAdd(&starts[e], 1);
    }
    if (next != e) atomicMax(&hi[e], r + 1);
  }

  // The last block to finish sees every block's atomics (threadfence before the counter, L2 reads after).
  __shared__ bool is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    const int first = rows - __ldcg(&lo[e]);
    const bool one_segment = __ldcg(&starts[e]) == 1;
    const int m = one_segment ? __ldcg(&hi[e]) - first : 0;
    sink(e, m > 0 ? first : 0, m);
  }
}

}  // namespace fp8
}  // namespace dsv2
