// Token dispatch: copy each token to the rows of the experts it was routed to, optionally quantized to e4m3 with
// per-1x128-group scales, in the contiguous (prefill) or masked (decode) layout of dsv2_kernels/moe.py.
//
// Row order is a function of topk_ids alone: expert e's copies in flat (token, slot) order, i.e. a copy's rank is
// the number of earlier copies of the same expert. Every count below is an integer sum (order-independent), and the
// only order-dependent step, the ranks of a CTA's own copies, runs in one warp in flat order, so the layout is
// deterministic and bit-reproducible without any global atomics.
//
// The copy kernel (dispatch_kernel) does the rest of the work too, so a dispatch is one launch, or two for large T.
// CTA j owns tokens [t0, t1). It needs, per expert, the copies before t0 (its rank base) and, for the contiguous
// layout, the total per expert (the offsets):
//   * up to kFusedMaxCopies copies (decode): every CTA counts them itself from topk_ids (a few KB from L2);
//   * beyond: a count kernel first histograms rank chunks (groups of consecutive CTAs) into chunk_hist [chunks, E];
//     CTA j sums the chunks before its own and counts the few copies between its chunk's start and t0. The chunk
//     count ~ sqrt(T*k / E) balances those two per-CTA costs. The copy kernel is launched with programmatic
//     dependent launch, so its launch and its L2 prefetch of the token rows overlap the count kernel.
// Then warp 0 ranks the CTA's own copies (match_any per 32 copies: a stable multi-split), writes token_row, and all
// threads copy the rows with 16-byte loads/stores: each token row is read once and written to its k destinations;
// with FP8 each thread quantizes 16 values, 8 lanes sharing a 128-group's amax through shuffles. The contiguous
// layout's row_expert (-1 on padding and unused rows) is filled from the offsets, each CTA a slice of the rows.
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
constexpr unsigned kFull = 0xffffffffu;

struct Params {
  const __nv_bfloat16* hidden;  // [T, H], 16-byte aligned
  const int32_t* ids;           // [T, k]
  void* rows;                   // [R, H] or [E, max_m, H]: bf16 or e4m3
  float* scales;                // column-major FP8 scales, or null
  int32_t* token_row;           // [T, k]
  int32_t* row_expert;          // [R] (contiguous) or null
  int32_t* meta;                // expert_offsets [E + 1] (contiguous) or counts [E] (masked)
  const int32_t* chunk_hist;    // [chunks, E] copies per expert per rank chunk, or null (counted in each CTA)
  int64_t scale_pad;            // column stride of the scales (round_up(rows per matrix, 4))
  int num_rows;                 // R (contiguous)
  int tokens, top_k, experts, hidden_size;
  int alignment;       // contiguous
  int max_m;           // masked
  int cta_tokens;      // tokens per CTA
  int chunk_ctas;      // CTAs per rank chunk (chunk_hist path)
  int chunks;          // rank chunks (chunk_hist path)
};

__device__ __forceinline__ void griddep_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void griddep_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;"); }
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

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

// Rank chunks: copies per expert, chunk_hist[c * E + e]. Lets the dependent copy kernel launch right away.
__global__ void __launch_bounds__(kThreads) dispatch_count_kernel(const int32_t* __restrict__ ids,
                                                                  int32_t* __restrict__ chunk_hist, int tokens,
                                                                  int top_k, int num_experts, int chunk_tokens) {
  __shared__ int hist[kMaxExperts];
  griddep_launch_dependents();
  for (int e = threadIdx.x; e < num_experts; e += kThreads) hist[e] = 0;
  __syncthreads();
  const int64_t from = static_cast<int64_t>(blockIdx.x) * chunk_tokens * top_k;
  const int64_t to = std::min<int64_t>(from + static_cast<int64_t>(chunk_tokens) * top_k,
                                       static_cast<int64_t>(tokens) * top_k);
  const int lane = threadIdx.x & 31;
  constexpr int kIdBatch = 8;  // id loads in flight per thread
  for (int64_t i0 = from + (threadIdx.x - lane); i0 < to; i0 += kThreads * kIdBatch) {  // warp-uniform
    int ev[kIdBatch];
#pragma unroll
    for (int q = 0; q < kIdBatch; ++q) {
      const int64_t i = i0 + q * kThreads + lane;
      ev[q] = i < to ? valid_expert(__ldg(ids + i), num_experts) : -1;
    }
#pragma unroll
    for (int q = 0; q < kIdBatch; ++q) warp_count(hist, ev[q]);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += kThreads)
    chunk_hist[static_cast<int64_t>(blockIdx.x) * num_experts + e] = hist[e];
}

template <bool kMasked, bool kFp8>
__global__ void __launch_bounds__(kThreads) dispatch_kernel(const __grid_constant__ Params p) {
  __shared__ int s_before[kMaxExperts];  // copies of each expert before the next own copy (the rank base)
  __shared__ int s_total[kMaxExperts];   // copies of each expert overall (contiguous; masked: CTA 0 only)
  __shared__ int s_off[kMaxExperts + 1]; // contiguous: each expert's segment start
  __shared__ int s_warp[kWarps];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int E = p.experts, k = p.top_k, H = p.hidden_size;
  const int t0 = blockIdx.x * p.cta_tokens;
  const int t1 = min(t0 + p.cta_tokens, p.tokens);

  // The token rows do not depend on the routing: start pulling them into L2 while the ranks are worked out.
  {
    const char* base = reinterpret_cast<const char*>(p.hidden + static_cast<int64_t>(t0) * H);
    const int64_t bytes = static_cast<int64_t>(t1 - t0) * H * 2;
    for (int64_t o = static_cast<int64_t>(tid) * 128; o < bytes; o += kThreads * 128) prefetch_l2(base + o);
  }
  griddep_wait();  // chunk_hist is complete and visible (a no-op without a programmatic dependency)

  const bool need_total = !kMasked || blockIdx.x == 0;
  for (int e = tid; e < E; e += kThreads) s_before[e] = s_total[e] = 0;
  __syncthreads();

  int64_t count_from = 0, count_to = static_cast<int64_t>(t0) * k;  // copies to count into s_before
  int64_t total_to = need_total ? static_cast<int64_t>(p.tokens) * k : 0;
  if (p.chunk_hist != nullptr) {
    const int chunk = blockIdx.x / p.chunk_ctas;
    count_from = static_cast<int64_t>(chunk) * p.chunk_ctas * p.cta_tokens * k;
    total_to = 0;
    const int cells = (need_total ? p.chunks : chunk) * E;
    constexpr int kBatch = 8;  // independent loads in flight per thread
    for (int c0 = tid; c0 < cells; c0 += kThreads * kBatch) {
      int v[kBatch];
#pragma unroll
      for (int q = 0; q < kBatch; ++q) {
        const int c = c0 + q * kThreads;
        v[q] = c < cells ? __ldg(p.chunk_hist + c) : 0;
      }
#pragma unroll
      for (int q = 0; q < kBatch; ++q) {
        const int c = c0 + q * kThreads;
        if (v[q] != 0) {  // cell c is (chunk c / E, expert c % E)
          const int e = c % E;
          if (c < chunk * E) atomicAdd(s_before + e, v[q]);
          atomicAdd(s_total + e, v[q]);
        }
      }
    }
  }
  // Warp-uniform loop over flat copies: s_before over [count_from, count_to), s_total over [0, total_to).
  const int64_t scan_to = std::max(count_to, total_to);
  constexpr int kIdBatch = 8;  // id loads in flight per thread before the counting
  for (int64_t i0 = (total_to > 0 ? 0 : count_from) + warp * 32; i0 < scan_to; i0 += kThreads * kIdBatch) {
    int ev[kIdBatch];
#pragma unroll
    for (int q = 0; q < kIdBatch; ++q) {
      const int64_t i = i0 + q * kThreads + lane;
      ev[q] = i < scan_to ? valid_expert(__ldg(p.ids + i), E) : -1;
    }
#pragma unroll
    for (int q = 0; q < kIdBatch; ++q) {
      const int64_t i = i0 + q * kThreads + lane;
      warp_count(s_before, i >= count_from && i < count_to ? ev[q] : -1);
      if (total_to > 0) warp_count(s_total, ev[q]);  // ev is -1 past T*k = total_to
    }
  }
  __syncthreads();

  if constexpr (!kMasked) {
    // Exclusive scan of the padded counts: 4 consecutive experts per thread, then warps, then the CTA.
    int v[4], local = 0;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int e = tid * 4 + q;
      v[q] = e < E ? static_cast<int>((static_cast<int64_t>(s_total[e]) + p.alignment - 1) / p.alignment *
                                      p.alignment)
                   : 0;
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
  __syncthreads();  // token_row of the own tokens is written (read back below with coherent loads)

  const int32_t* token_row = p.token_row;
  if constexpr (!kFp8) {
    const int U = H / 8;  // 16-byte vectors per row
    const int items = (t1 - t0) * U;
    constexpr int kUnroll = 4;
    __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.rows);
    for (int i0 = tid; i0 < items; i0 += kThreads * kUnroll) {
      uint4 v[kUnroll];
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        const int i = i0 + q * kThreads;
        if (i < items) {
          const int tl = i / U, u = i - tl * U;
          v[q] = __ldcs(reinterpret_cast<const uint4*>(p.hidden + static_cast<int64_t>(t0 + tl) * H) + u);
        }
      }
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        const int i = i0 + q * kThreads;
        if (i < items) {
          const int tl = i / U, u = i - tl * U;
          const int32_t* tr = token_row + static_cast<int64_t>(t0 + tl) * k;
          for (int s = 0; s < k; ++s) {
            const int d = tr[s];
            if (d >= 0) reinterpret_cast<uint4*>(out + static_cast<int64_t>(d) * H)[u] = v[q];
          }
        }
      }
    }
  } else {
    const int U = H / 16;  // 16 values per thread: two 16-byte loads, one 16-byte store; 8 threads per group
    const int items = (t1 - t0) * U;
    constexpr int kUnroll = 2;
    uint8_t* out = static_cast<uint8_t*>(p.rows);
    // Warp-uniform trip count (the shuffles need all lanes); U % 8 == 0 keeps each 8-lane group in one token.
    for (int w0 = warp * 32; w0 < items; w0 += kThreads * kUnroll) {
      uint4 v[kUnroll][2];
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        const int i = w0 + lane + q * kThreads;
        if (i < items) {
          const int tl = i / U, u = i - tl * U;
          const uint4* src = reinterpret_cast<const uint4*>(p.hidden + static_cast<int64_t>(t0 + tl) * H) + 2 * u;
          v[q][0] = __ldcs(src);
          v[q][1] = __ldcs(src + 1);
        } else {
          v[q][0] = v[q][1] = make_uint4(0, 0, 0, 0);
        }
      }
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        const int i = w0 + lane + q * kThreads;
        float x[16];
        const uint32_t* w = reinterpret_cast<const uint32_t*>(v[q]);
        float amax = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          x[2 * j] = bf16_lo(w[j]);
          x[2 * j + 1] = bf16_hi(w[j]);
          amax = fp8_quant::max_nan(amax, fp8_quant::max_nan(fabsf(x[2 * j]), fabsf(x[2 * j + 1])));
        }
        amax = fp8_quant::max_nan(amax, __shfl_xor_sync(kFull, amax, 1));
        amax = fp8_quant::max_nan(amax, __shfl_xor_sync(kFull, amax, 2));
        amax = fp8_quant::max_nan(amax, __shfl_xor_sync(kFull, amax, 4));
        // The same scale and quotients as quant_per_token_group (quant_common.cuh), so the fused path is bit-exact
        // with the reference (which multiplies amax by the fp32 reciprocal of 448, as ATen does).
        const float scale = fp8_quant::group_scale(amax);
        const fp8_quant::Divisor div = fp8_quant::make_divisor(scale);
        uint32_t packed[4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
          packed[j] = fp8_quant::fp8x2(x[4 * j], x[4 * j + 1], div) | (fp8_quant::fp8x2(x[4 * j + 2], x[4 * j + 3], div) << 16);
        const uint4 o = make_uint4(packed[0], packed[1], packed[2], packed[3]);
        if (i < items) {
          const int tl = i / U, u = i - tl * U, g = u / (kGroup / 16);
          const int32_t* tr = token_row + static_cast<int64_t>(t0 + tl) * k;
          for (int s = 0; s < k; ++s) {
            const int d = tr[s];
            if (d < 0) continue;
            reinterpret_cast<uint4*>(out + static_cast<int64_t>(d) * H)[u] = o;
            if ((lane & 7) == 0) {
              int64_t so;
              if constexpr (kMasked) {
                const int e = d / p.max_m, m = d - e * p.max_m;
                so = static_cast<int64_t>(e) * (H / kGroup) * p.scale_pad + m;
              } else {
                so = d;
              }
              p.scales[so + g * p.scale_pad] = scale;
            }
          }
        }
      }
    }
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

// Fills the geometry of p (tokens per CTA, rank chunks) and launches the count kernel (if needed) and the copy
// kernel on the current stream.
template <bool kMasked>
void launch(Params& p, bool quant_fp8, int64_t tokens, at::Tensor& chunk_hist_buf, const at::Tensor& hidden) {
  const int64_t copies = tokens * p.top_k;
  // Tokens per CTA: about 4 row vectors per thread, but at least ~256 CTAs when T allows it.
  const int64_t units = quant_fp8 ? p.hidden_size / 16 : p.hidden_size / 8;
  int64_t cta_tokens = std::max<int64_t>(1, (4 * kThreads + units - 1) / units);
  cta_tokens = std::max<int64_t>(1, std::min<int64_t>({cta_tokens, tokens / 256, 64}));
  const int64_t ctas = (tokens + cta_tokens - 1) / cta_tokens;
  p.cta_tokens = static_cast<int>(cta_tokens);
  p.chunk_ctas = 1;
  p.chunks = 1;
  p.chunk_hist = nullptr;

  const c10::cuda::CUDAGuard guard(hidden.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  bool programmatic = false;
  if (copies > kFusedMaxCopies) {
    const double target = std::sqrt(static_cast<double>(copies) / p.experts);
    const int64_t chunk_ctas = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(ctas / std::max(target, 1.0))));
    const int64_t chunks = (ctas + chunk_ctas - 1) / chunk_ctas;
    p.chunk_ctas = static_cast<int>(chunk_ctas);
    p.chunks = static_cast<int>(chunks);
    chunk_hist_buf = at::empty({chunks, p.experts}, hidden.options().dtype(at::kInt));
    p.chunk_hist = chunk_hist_buf.data_ptr<int32_t>();
    dispatch_count_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(
        p.ids, chunk_hist_buf.data_ptr<int32_t>(), p.tokens, p.top_k, p.experts,
        static_cast<int>(chunk_ctas * cta_tokens));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Programmatic launch overlaps the copy kernel's launch with the count kernel. Not while a CUDA graph is being
    // captured: an ordinary edge there is certain to capture on every driver.
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusActive;
    if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess) {
      (void)cudaGetLastError();
      capture = cudaStreamCaptureStatusActive;
    }
    programmatic = capture == cudaStreamCaptureStatusNone;
  }
  const unsigned grid = static_cast<unsigned>(ctas);
  if (quant_fp8)
    launch_dependent(programmatic, dispatch_kernel<kMasked, true>, grid, stream, p);
  else
    launch_dependent(programmatic, dispatch_kernel<kMasked, false>, grid, stream, p);
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
