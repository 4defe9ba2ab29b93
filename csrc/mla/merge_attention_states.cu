// merge_attention_states: the attention over the union of two disjoint key sets from the two partial results,
//   lse = logaddexp(lse_a, lse_b),  out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)   (fp32),
// where an infinite lse (+inf: "saw no key"; -inf) marks an empty part whose out is never read; both empty: out 0,
// lse +inf. The weights are computed exactly as merge_attention_states_ref does (same fp32 operations, in order), so
// results match it up to the final rounding.
//
// Memory-bound: each output row (token t, head h) of D values is handled by a group of lanes (the smallest power of
// two covering its 16-byte vectors, at most a warp), each lane moving 16 bytes per load/store; a part with weight 0
// is not loaded. Rows whose inputs are not 16-byte aligned fall back to one element per lane.

#include "../common/torch_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "../common/vec.cuh"
#include "../ops.h"

namespace dsv2 {
namespace {

constexpr int kWarps = 8;

struct MergeParams {
  const void* out_a;  // [T, H, D], element (t, h, d) at t * a_s0 + h * a_s1 + d
  const void* out_b;
  int64_t a_s0, a_s1, b_s0, b_s1;
  const float* lse_a;  // [H, T], (h, t) at h * la_s0 + t
  const float* lse_b;
  int64_t la_s0, lb_s0;
  void* out;     // [T, H, D] contiguous
  float* lse;    // [H, T] contiguous
  int tokens, heads, dim;
  int rows;      // tokens * heads
  int vecs;      // vectors per row (>= 1 so that a D = 0 row still writes its lse)
  int lanes_log2;  // lanes per row = 1 << lanes_log2 (<= 32)
};

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

template <typename T, int kVec>
__global__ void __launch_bounds__(kWarps * 32) merge_kernel(const __grid_constant__ MergeParams p) {
  const int lanes = 1 << p.lanes_log2;
  const int sub = threadIdx.x & (lanes - 1);
  const int64_t row64 = (static_cast<int64_t>(blockIdx.x) * (kWarps * 32) + threadIdx.x) >> p.lanes_log2;
  if (row64 >= p.rows) return;
  const int row = static_cast<int>(row64);
  const int t = row / p.heads, h = row - t * p.heads;

  // Weights, as the reference: +-inf -> -inf (empty part); NaN propagates like torch.maximum.
  float la = p.lse_a[h * p.la_s0 + t], lb = p.lse_b[h * p.lb_s0 + t];
  if (isinf(la)) la = -INFINITY;
  if (isinf(lb)) lb = -INFINITY;
  float m = (isnan(la) || isnan(lb)) ? NAN : fmaxf(la, lb);
  const bool both_empty = m == -INFINITY;
  if (both_empty) m = 0.f;
  float wa = expf(la - m), wb = expf(lb - m);
  const float total = wa + wb;
  const float lse = both_empty ? INFINITY : m + logf(total);
  wa = wa / total;
  wb = wb / total;
  const bool use_a = !both_empty && wa > 0.f, use_b = !both_empty && wb > 0.f;  // NaN weights compare false
  if (sub == 0) p.lse[static_cast<int64_t>(h) * p.tokens + t] = lse;

  const T* a = static_cast<const T*>(p.out_a) + t * p.a_s0 + h * p.a_s1;
  const T* b = static_cast<const T*>(p.out_b) + t * p.b_s0 + h * p.b_s1;
  T* o = static_cast<T*>(p.out) + static_cast<int64_t>(row) * p.dim;
  for (int c = sub * kVec; c < p.dim; c += lanes * kVec) {
    float acc[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] = 0.f;
    if (use_a) {
      const Vec<T, kVec> x = *reinterpret_cast<const Vec<T, kVec>*>(a + c);
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] = to_float(x.v[e]) * wa;
    }
    if (use_b) {
      const Vec<T, kVec> x = *reinterpret_cast<const Vec<T, kVec>*>(b + c);
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] += to_float(x.v[e]) * wb;
    }
    Vec<T, kVec> y;
#pragma unroll
    for (int e = 0; e < kVec; ++e) y.v[e] = from_float<T>(acc[e]);
    *reinterpret_cast<Vec<T, kVec>*>(o + c) = y;
  }
}

template <typename T>
void launch_merge(MergeParams p, bool vec, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int v = vec ? kVec : 1;
  p.vecs = std::max(1, (p.dim + v - 1) / v);
  int lanes_log2 = 0;
  while ((1 << lanes_log2) < std::min(p.vecs, 32)) ++lanes_log2;
  p.lanes_log2 = lanes_log2;
  const int64_t threads = static_cast<int64_t>(p.rows) << lanes_log2;
  const int64_t blocks = (threads + kWarps * 32 - 1) / (kWarps * 32);
  if (vec) merge_kernel<T, kVec><<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(p);
  else merge_kernel<T, 1><<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> merge_attention_states_cuda(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                               const at::Tensor& out_b, const at::Tensor& lse_b) {
  const char* op = "merge_attention_states";
  check_cuda(op, "out_a", out_a);
  const auto dtype = out_a.scalar_type();
  DSV2_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat, op, "out_a",
             "must have dtype bfloat16, float16 or float32, got ", dtype);
  DSV2_CHECK(out_a.dim() == 3, op, "out_a", "must have 3 dimensions, got shape ", out_a.sizes());
  DSV2_CHECK(out_a.size(2) <= 1 || out_a.stride(2) == 1, op, "out_a",
             "must have a contiguous last dimension, got strides ", out_a.strides());
  const int64_t tokens = out_a.size(0), heads = out_a.size(1), dim = out_a.size(2);
  check_same_device(op, "out_b", out_b, out_a);
  check_dtype(op, "out_b", out_b, dtype);
  DSV2_CHECK(out_b.sizes() == out_a.sizes(), op, "out_b", "must have shape ", out_a.sizes(), ", got ", out_b.sizes());
  DSV2_CHECK(dim <= 1 || out_b.stride(2) == 1, op, "out_b", "must have a contiguous last dimension, got strides ",
             out_b.strides());
  const auto check_lse = [&](const char* name, const at::Tensor& t) {
    check_same_device(op, name, t, out_a);
    check_dtype(op, name, t, at::kFloat);
    DSV2_CHECK(t.dim() == 2 && t.size(0) == heads && t.size(1) == tokens, op, name, "must have shape (", heads, ", ",
               tokens, "), got ", t.sizes());
    DSV2_CHECK(tokens <= 1 || t.stride(1) == 1, op, name, "must have a contiguous last dimension, got strides ",
               t.strides());
  };
  check_lse("lse_a", lse_a);
  check_lse("lse_b", lse_b);
  DSV2_CHECK(tokens * heads <= std::numeric_limits<int>::max() && dim <= std::numeric_limits<int>::max(), op, "out_a",
             "is too large for the CUDA kernel: shape ", out_a.sizes());

  auto out = at::empty({tokens, heads, dim}, out_a.options());
  auto lse = at::empty({heads, tokens}, lse_a.options());
  if (tokens == 0 || heads == 0) return {out, lse};

  const c10::cuda::CUDAGuard guard(out_a.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MergeParams p{};
  p.out_a = out_a.data_ptr();
  p.out_b = out_b.data_ptr();
  // A dimension of size 1 is never stepped: its stride is taken as 0.
  p.a_s0 = tokens > 1 ? out_a.stride(0) : 0;
  p.a_s1 = heads > 1 ? out_a.stride(1) : 0;
  p.b_s0 = tokens > 1 ? out_b.stride(0) : 0;
  p.b_s1 = heads > 1 ? out_b.stride(1) : 0;
  p.lse_a = lse_a.data_ptr<float>();
  p.lse_b = lse_b.data_ptr<float>();
  p.la_s0 = heads > 1 ? lse_a.stride(0) : 0;
  p.lb_s0 = heads > 1 ? lse_b.stride(0) : 0;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.tokens = static_cast<int>(tokens);
  p.heads = static_cast<int>(heads);
  p.dim = static_cast<int>(dim);
  p.rows = static_cast<int>(tokens * heads);

  const int64_t vec_elems = 16 / out_a.element_size();
  const auto al = [&](const void* ptr, int64_t s0, int64_t s1) {
    return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && s0 % vec_elems == 0 && s1 % vec_elems == 0;
  };
  const bool vec = dim % vec_elems == 0 && al(p.out_a, p.a_s0, p.a_s1) && al(p.out_b, p.b_s0, p.b_s1);
  if (dtype == at::kBFloat16) launch_merge<__nv_bfloat16>(p, vec, stream);
  else if (dtype == at::kHalf) launch_merge<__half>(p, vec, stream);
  else launch_merge<float>(p, vec, stream);
  return {out, lse};
}

}  // namespace dsv2
