// combine: out[t] = sum_{j: token_row[t, j] >= 0} topk_weights[t, j] * expert_out_flat[token_row[t, j]]
// (+ shared_out[t]), accumulated in fp32 in slot order, rounded to bf16 once.
//
// A gather-reduce, memory-bound: one CTA per token (several tokens when rows are short), one thread per 16-byte
// vector (8 columns) of the output row. A thread issues the loads of up to kBatch slots' vectors together before
// accumulating, so k row reads are in flight at once; no atomics, each output element is written by one thread.
// Products and sums are separately rounded (__fmul_rn / __fadd_rn, never an FMA), the reference's operations in
// the reference's order, so the result is bit-identical to combine_ref. Skipped (negative) and out-of-range rows
// are never read.

#include "../common/torch_cuda.h"

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../common/vec.cuh"
#include "../ops.h"

namespace dsv2 {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kBatch = 8;  // slots whose row loads are issued together

struct Params {
  const uint4* expert_out;  // [rows, vecs] 16-byte vectors of 8 bf16
  const int32_t* token_row;  // [T, k]
  const float* weights;      // [T, k]
  const uint4* shared;       // [T, vecs] or null
  uint4* out;                // [T, vecs]
  int64_t rows;
  int tokens, top_k, vecs, cta_tokens;
};

__device__ __forceinline__ float bf16_lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }

__device__ __forceinline__ void accumulate(float (&acc)[8], const uint4& x, float w) {
  const uint32_t* u = reinterpret_cast<const uint32_t*>(&x);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    acc[2 * j] = __fadd_rn(acc[2 * j], __fmul_rn(w, bf16_lo(u[j])));
    acc[2 * j + 1] = __fadd_rn(acc[2 * j + 1], __fmul_rn(w, bf16_hi(u[j])));
  }
}

__global__ void __launch_bounds__(kMaxThreads) combine_kernel(const __grid_constant__ Params p) {
  const int t0 = blockIdx.x * p.cta_tokens;
  const int t1 = min(t0 + p.cta_tokens, p.tokens);
  const int items = (t1 - t0) * p.vecs;
  for (int i = threadIdx.x; i < items; i += blockDim.x) {
    const int tl = i / p.vecs, v = i - tl * p.vecs;
    const int64_t t = t0 + tl;
    const int32_t* tr = p.token_row + t * p.top_k;
    const float* tw = p.weights + t * p.top_k;
    float acc[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = 0.f;
    for (int s0 = 0; s0 < p.top_k; s0 += kBatch) {
      uint4 x[kBatch];
      float w[kBatch];
      unsigned hit = 0;
#pragma unroll
      for (int q = 0; q < kBatch; ++q) {
        const int s = s0 + q;
        const int r = s < p.top_k ? __ldg(tr + s) : -1;
        x[q] = make_uint4(0, 0, 0, 0);
        w[q] = 0.f;
        if (r >= 0 && r < p.rows) {
          hit |= 1u << q;
          w[q] = __ldg(tw + s);
          x[q] = __ldcs(p.expert_out + r * static_cast<int64_t>(p.vecs) + v);
        }
      }
#pragma unroll
      for (int q = 0; q < kBatch; ++q)
        if (hit & (1u << q)) accumulate(acc, x[q], w[q]);
    }
    if (p.shared != nullptr) {
      const uint4 sh = __ldcs(p.shared + t * p.vecs + v);
      const uint32_t* u = reinterpret_cast<const uint32_t*>(&sh);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        acc[2 * j] = __fadd_rn(acc[2 * j], bf16_lo(u[j]));
        acc[2 * j + 1] = __fadd_rn(acc[2 * j + 1], bf16_hi(u[j]));
      }
    }
    uint4 o;
    uint32_t* ou = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const __nv_bfloat162 b = __floats2bfloat162_rn(acc[2 * j], acc[2 * j + 1]);  // .x (low half) = first
      ou[j] = *reinterpret_cast<const uint32_t*>(&b);
    }
    p.out[t * p.vecs + v] = o;
  }
}

}  // namespace

at::Tensor combine_cuda(const at::Tensor& expert_out_in, const at::Tensor& token_row, const at::Tensor& topk_weights,
                        const std::optional<at::Tensor>& shared_out) {
  const char* op = "combine";
  check_cuda(op, "expert_out", expert_out_in);
  check_dtype(op, "expert_out", expert_out_in, at::kBFloat16);
  DSV2_CHECK(expert_out_in.is_contiguous(), op, "expert_out", "must be contiguous, got strides ",
             expert_out_in.strides(), " for shape ", expert_out_in.sizes());
  DSV2_CHECK(expert_out_in.dim() == 2 || expert_out_in.dim() == 3, op, "expert_out",
             "must be [R, N] or [E, max_m, N], got shape ", expert_out_in.sizes());
  const int64_t n = expert_out_in.size(-1);
  DSV2_CHECK(n > 0 && n % 8 == 0, op, "expert_out", "must have N a positive multiple of 8, got ", n);
  DSV2_CHECK(n <= (1 << 24), op, "expert_out", "has N too large for the CUDA kernel: ", n);
  check_same_device(op, "token_row", token_row, expert_out_in);
  check_dtype(op, "token_row", token_row, at::kInt);
  DSV2_CHECK(token_row.dim() == 2, op, "token_row", "must have 2 dimensions, got shape ", token_row.sizes());
  DSV2_CHECK(token_row.is_contiguous(), op, "token_row", "must be contiguous, got strides ", token_row.strides(),
             " for shape ", token_row.sizes());
  const int64_t T = token_row.size(0), k = token_row.size(1);
  DSV2_CHECK(k >= 1, op, "token_row", "must have shape (T, top_k) with top_k >= 1, got ", token_row.sizes());
  check_same_device(op, "topk_weights", topk_weights, expert_out_in);
  check_dtype(op, "topk_weights", topk_weights, at::kFloat);
  DSV2_CHECK(topk_weights.dim() == 2 && topk_weights.size(0) == T && topk_weights.size(1) == k, op, "topk_weights",
             "must have shape (", T, ", ", k, "), got ", topk_weights.sizes());
  DSV2_CHECK(topk_weights.is_contiguous(), op, "topk_weights", "must be contiguous, got strides ",
             topk_weights.strides(), " for shape ", topk_weights.sizes());
  if (shared_out.has_value()) {
    const at::Tensor& s = *shared_out;
    check_same_device(op, "shared_out", s, expert_out_in);
    check_dtype(op, "shared_out", s, at::kBFloat16);
    DSV2_CHECK(s.dim() == 2 && s.size(0) == T && s.size(1) == n, op, "shared_out", "must have shape (", T, ", ", n,
               "), got ", s.sizes());
    DSV2_CHECK(s.is_contiguous(), op, "shared_out", "must be contiguous, got strides ", s.strides(), " for shape ",
               s.sizes());
  }
  DSV2_CHECK(T * k <= std::numeric_limits<int>::max() && T <= std::numeric_limits<int>::max(), op, "token_row",
             "has too many entries for the CUDA kernel: ", token_row.sizes());

  at::Tensor out = at::empty({T, n}, expert_out_in.options());
  if (T == 0) return out;
  // 16-byte vectors need 16-byte aligned rows; a misaligned view gets an aligned copy.
  const at::Tensor expert_out = aligned16(expert_out_in) ? expert_out_in : expert_out_in.clone();
  at::Tensor shared;
  if (shared_out.has_value()) shared = aligned16(*shared_out) ? *shared_out : shared_out->clone();

  Params p;
  p.expert_out = reinterpret_cast<const uint4*>(expert_out.data_ptr());
  p.token_row = token_row.data_ptr<int32_t>();
  p.weights = topk_weights.data_ptr<float>();
  p.shared = shared.defined() ? reinterpret_cast<const uint4*>(shared.data_ptr()) : nullptr;
  p.out = reinterpret_cast<uint4*>(out.data_ptr());
  p.rows = expert_out.numel() / n;
  p.tokens = static_cast<int>(T);
  p.top_k = static_cast<int>(k);
  p.vecs = static_cast<int>(n / 8);
  // One token per CTA with its vectors spread evenly over <= 512 threads; short rows pack several tokens per CTA.
  int threads, cta_tokens;
  if (p.vecs >= 128) {
    const int per_thread = (p.vecs + kMaxThreads - 1) / kMaxThreads;
    threads = ((p.vecs + per_thread - 1) / per_thread + 31) / 32 * 32;
    cta_tokens = 1;
  } else {
    threads = 128;
    cta_tokens = 128 / p.vecs;
  }
  p.cta_tokens = cta_tokens;
  const unsigned blocks = static_cast<unsigned>((T + cta_tokens - 1) / cta_tokens);

  const c10::cuda::CUDAGuard guard(expert_out.device());
  combine_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace dsv2
