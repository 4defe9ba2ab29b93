// MoE gate: logits [T, E] (bf16/fp16/fp32, computed in fp32) -> topk_ids [T, k] int32, topk_weights [T, k] fp32.
//
// One warp per token, E <= 256: lane l holds experts l, l + 32, ..., l + 224 (8 slots), so each load instruction
// reads a contiguous run of the row and any E, dtype or row stride works with scalar loads. Scores (softmax or
// sigmoid), the group selection and the top-k all stay in registers; only the grouped methods stage the token's
// choice values in shared memory, so that one lane per group can scan its group.
//
// Selection = the reference's stable descending sort: repeated warp argmax over 32-bit keys that order floats
// (a monotone bit map), equal keys resolved to the lower index. Every slot key is >= 1 and a taken or absent slot
// is 0, so each round picks a distinct in-range index whatever the values (NaN included).

#include "../common/torch_cuda.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <string_view>

#include "../common/vec.cuh"
#include "../ops.h"

namespace dsv2 {
namespace {

constexpr int kWarps = 4;  // tokens per CTA
constexpr int kSlots = 8;  // 256 experts / 32 lanes
constexpr int kMaxExperts = 32 * kSlots;
constexpr int kMaxTopK = 16;
constexpr unsigned kFull = 0xffffffffu;

enum Method : int { kGreedy = 0, kGroupLimited = 1, kNoauxTc = 2 };

struct Params {
  const void* logits;  // [T, E], last dim contiguous
  int64_t row_stride;  // elements
  const float* bias;   // [E] (noaux_tc) or null
  int32_t* ids;        // [T, k]
  float* weights;      // [T, k]
  int tokens, experts, top_k, n_group, topk_group, method;
  bool sigmoid, norm;
  float scale;
};

// Monotone map float -> uint32 (larger float, larger key), clamped to >= 1 (0 marks an unavailable slot).
__device__ __forceinline__ uint32_t order_key(float v) {
  v += 0.f;  // -0 -> +0: equal floats must get equal keys
  const uint32_t u = __float_as_uint(v);
  return max((u & 0x80000000u) ? ~u : (u | 0x80000000u), 1u);
}

// The index (j * 32 + lane) of the warp's largest key, ties to the lowest index. `val` is the caller's per-slot
// value; the winner's is returned in `win_val` on every lane.
__device__ __forceinline__ int warp_argmax(const uint32_t (&key)[kSlots], const float (&val)[kSlots], int lane,
                                           float& win_val) {
  uint32_t bk = 0;
  int bj = 0;
  float bv = 0.f;
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    if (key[j] > bk) {  // strict: the first (lowest index) of equal keys stays
      bk = key[j];
      bj = j;
      bv = val[j];
    }
  }
  const uint32_t wk = __reduce_max_sync(kFull, bk);
  const uint32_t cand = bk == wk ? 0xffffu - static_cast<uint32_t>(bj * 32 + lane) : 0u;
  const int win = static_cast<int>(0xffffu - __reduce_max_sync(kFull, cand));
  win_val = __shfl_sync(kFull, bv, win & 31);
  return win;
}

__device__ __forceinline__ void take(uint32_t (&key)[kSlots], int win, int lane) {
#pragma unroll
  for (int j = 0; j < kSlots; ++j)
    if (j * 32 + lane == win) key[j] = 0;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) route_kernel(const __grid_constant__ Params p) {
  __shared__ float stage[kWarps][kMaxExperts];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int t = blockIdx.x * kWarps + warp;
  if (t >= p.tokens) return;  // whole warps only
  const int E = p.experts;
  const T* row = static_cast<const T*>(p.logits) + static_cast<int64_t>(t) * p.row_stride;

  float x[kSlots];
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    const int e = j * 32 + lane;
    x[j] = e < E ? to_float(row[e]) : -INFINITY;
  }

  // scores (the weights) and choice (the selection value)
  float score[kSlots], choice[kSlots];
  if (p.sigmoid) {
#pragma unroll
    for (int j = 0; j < kSlots; ++j) score[j] = 1.f / (1.f + expf(-x[j]));
  } else {
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < kSlots; ++j) m = fmaxf(m, x[j]);
    m = warp_max(m);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      score[j] = j * 32 + lane < E ? expf(x[j] - m) : 0.f;
      sum += score[j];
    }
    sum = warp_sum(sum);
#pragma unroll
    for (int j = 0; j < kSlots; ++j) score[j] = score[j] / sum;
  }
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    const int e = j * 32 + lane;
    choice[j] = p.method == kNoauxTc && e < E ? score[j] + __ldg(p.bias + e) : score[j];
  }

  if (p.method != kGreedy && p.topk_group < p.n_group) {
    // Group scores: lane g % 32 scans group g (consecutive experts) in shared memory.
    const int gs = E / p.n_group;
    float* st = stage[warp];
#pragma unroll
    for (int j = 0; j < kSlots; ++j)
      if (j * 32 + lane < E) st[j * 32 + lane] = choice[j];
    __syncwarp();
    uint32_t gkey[kSlots];
    float unused[kSlots];
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      const int g = j * 32 + lane;
      gkey[j] = 0;
      unused[j] = 0.f;
      if (g < p.n_group) {
        const float* v = st + g * gs;
        float a = -INFINITY, b = -INFINITY;  // the largest two (noaux_tc), or the max
        for (int i = 0; i < gs; ++i) {
          const float c = v[i];
          if (c > a) {
            b = a;
            a = c;
          } else if (c > b) {
            b = c;
          }
        }
        gkey[j] = order_key(p.method == kNoauxTc ? a + b : a);
      }
    }
    int grp[kSlots];
    bool kept[kSlots];
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      grp[j] = (j * 32 + lane) / gs;
      kept[j] = false;
    }
    for (int r = 0; r < p.topk_group; ++r) {
      float dummy;
      const int g = warp_argmax(gkey, unused, lane, dummy);
      take(gkey, g, lane);
#pragma unroll
      for (int j = 0; j < kSlots; ++j) kept[j] = kept[j] || grp[j] == g;
    }
#pragma unroll
    for (int j = 0; j < kSlots; ++j)
      if (!kept[j]) choice[j] = -INFINITY;  // never picked while a kept expert is left
  }

  uint32_t key[kSlots];
#pragma unroll
  for (int j = 0; j < kSlots; ++j) key[j] = j * 32 + lane < E ? order_key(choice[j]) : 0u;
  int my_id = 0;
  float my_w = 0.f;
  for (int r = 0; r < p.top_k; ++r) {
    float w;
    const int e = warp_argmax(key, score, lane, w);
    take(key, e, lane);
    if (lane == r) {
      my_id = min(e, E - 1);  // in range even if the keys ran out (impossible for top_k <= available)
      my_w = w;
    }
  }
  if (p.norm) {
    const float sum = warp_sum(lane < p.top_k ? my_w : 0.f);
    my_w = my_w / (sum + 1e-20f);
  }
  my_w = my_w * p.scale;
  if (lane < p.top_k) {
    const int64_t o = static_cast<int64_t>(t) * p.top_k + lane;
    p.ids[o] = my_id;
    p.weights[o] = my_w;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> route_cuda(const at::Tensor& logits, int64_t top_k, std::string_view scoring,
                                              std::string_view method, int64_t n_group, int64_t topk_group,
                                              bool norm_topk_prob, double routed_scaling_factor,
                                              const std::optional<at::Tensor>& correction_bias) {
  const char* op = "route";
  check_cuda(op, "logits", logits);
  const auto dt = logits.scalar_type();
  DSV2_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat, op, "logits",
             "must have dtype bfloat16 or float16 or float32, got ", dt);
  DSV2_CHECK(logits.dim() == 2, op, "logits", "must have 2 dimensions, got shape ", logits.sizes());
  DSV2_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1, op, "logits",
             "must have a contiguous last dimension, got strides ", logits.strides());
  const int64_t E = logits.size(1), T = logits.size(0);
  DSV2_CHECK(E >= 1 && E <= kMaxExperts, op, "logits", "must have between 1 and ", kMaxExperts,
             " experts (columns), got shape ", logits.sizes());
  DSV2_CHECK(scoring == "softmax" || scoring == "sigmoid", op, "scoring",
             "must be one of ('softmax', 'sigmoid'), got '", scoring, "'");
  const int m = method == "greedy" ? kGreedy : method == "group_limited_greedy" ? kGroupLimited
                : method == "noaux_tc"                                        ? kNoauxTc
                                                                              : -1;
  DSV2_CHECK(m >= 0, op, "method", "must be one of ('greedy', 'group_limited_greedy', 'noaux_tc'), got '", method,
             "'");
  DSV2_CHECK(top_k >= 1 && top_k <= std::min<int64_t>(kMaxTopK, E), op, "top_k", "must be in [1, min(", kMaxTopK,
             ", num_experts=", E, ")], got ", top_k);
  if (m != kGreedy) {
    DSV2_CHECK(n_group >= 1 && E % n_group == 0, op, "n_group", "must be >= 1 and divide the number of experts ", E,
               ", got ", n_group);
    DSV2_CHECK(topk_group >= 1 && topk_group <= n_group, op, "topk_group", "must be in [1, n_group=", n_group,
               "], got ", topk_group);
    const int64_t available = topk_group * (E / n_group);
    DSV2_CHECK(top_k <= available, op, "top_k", "must be <= the ", available, " experts of the topk_group=",
               topk_group, " kept groups, got ", top_k);
    if (m == kNoauxTc) {
      DSV2_CHECK(E / n_group >= 2, op, "n_group",
                 "must leave >= 2 experts per group (noaux_tc scores a group by its top-2), got ", E / n_group);
    }
  }
  DSV2_CHECK(std::isfinite(routed_scaling_factor) && routed_scaling_factor > 0, op, "routed_scaling_factor",
             "must be finite and > 0, got ", routed_scaling_factor);
  const float* bias = nullptr;
  if (m == kNoauxTc) {
    DSV2_CHECK(correction_bias.has_value(), op, "correction_bias", "is required by method='noaux_tc'");
    const at::Tensor& b = *correction_bias;
    check_same_device(op, "correction_bias", b, logits);
    check_dtype(op, "correction_bias", b, at::kFloat);
    DSV2_CHECK(b.dim() == 1 && b.size(0) == E, op, "correction_bias", "must have shape (", E, ",), got ",
               b.sizes());
    DSV2_CHECK(b.is_contiguous(), op, "correction_bias", "must be contiguous, got strides ", b.strides());
    bias = b.data_ptr<float>();
  } else {
    DSV2_CHECK(!correction_bias.has_value(), op, "correction_bias",
               "is only used by method='noaux_tc'; pass None with method='", method, "'");
  }
  DSV2_CHECK(T <= std::numeric_limits<int>::max() - kWarps, op, "logits", "has too many rows: ", T);

  at::Tensor ids = at::empty({T, top_k}, logits.options().dtype(at::kInt));
  at::Tensor weights = at::empty({T, top_k}, logits.options().dtype(at::kFloat));
  if (T == 0) return {ids, weights};

  Params p;
  p.logits = logits.data_ptr();
  p.row_stride = T > 1 ? logits.stride(0) : E;
  p.bias = bias;
  p.ids = ids.data_ptr<int32_t>();
  p.weights = weights.data_ptr<float>();
  p.tokens = static_cast<int>(T);
  p.experts = static_cast<int>(E);
  p.top_k = static_cast<int>(top_k);
  p.n_group = m == kGreedy ? 1 : static_cast<int>(n_group);
  p.topk_group = m == kGreedy ? 1 : static_cast<int>(topk_group);
  p.method = m;
  p.sigmoid = scoring == "sigmoid";
  p.norm = norm_topk_prob;
  p.scale = static_cast<float>(routed_scaling_factor);

  const c10::cuda::CUDAGuard guard(logits.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>((T + kWarps - 1) / kWarps);
  switch (dt) {
    case at::kBFloat16: route_kernel<__nv_bfloat16><<<blocks, kWarps * 32, 0, stream>>>(p); break;
    case at::kHalf: route_kernel<__half><<<blocks, kWarps * 32, 0, stream>>>(p); break;
    default: route_kernel<float><<<blocks, kWarps * 32, 0, stream>>>(p); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {ids, weights};
}

}  // namespace dsv2
