// RMSNorm and fused residual-add + RMSNorm.
//
// Memory-bound: per row we read x (and residual) once and write out (and the new residual) once. One CTA per row;
// each thread keeps its share of the row in registers (VPT 16-byte vectors), so the row is read from DRAM exactly
// once, the sum of squares is a block reduction, and the normalized values are written from registers.
// Rows wider than VPT * 1024 * (16 / sizeof(T)) elements, or rows whose width or alignment rules out 16-byte access,
// take the generic kernel, which re-reads the row (from L2) instead of holding it.

#include "../common/torch_cuda.h"

#include "../common/checks.h"
#include "../common/vec.cuh"

namespace dsv2 {
namespace {

constexpr int kVPT = 4;  // 16-byte vectors per thread: 4 independent loads in flight per operand

template <typename T, typename W, bool kAdd>
__global__ void __launch_bounds__(1024) rms_norm_vec_kernel(T* __restrict__ out, T* __restrict__ residual_out,
                                                            const T* __restrict__ x, const T* __restrict__ residual,
                                                            const W* __restrict__ weight, int64_t x_stride,
                                                            int64_t res_stride, int hidden, float eps) {
  using V = Vec16<T>;
  constexpr int N = V::N;
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int nvec = hidden / N;
  const V* xv = reinterpret_cast<const V*>(x + row * x_stride);

  float vals[kVPT][N];
  float sumsq = 0.f;
#pragma unroll
  for (int i = 0; i < kVPT; ++i) {
    const int vi = threadIdx.x + i * blockDim.x;
    if (vi < nvec) {
      V a = xv[vi];
      if constexpr (kAdd) {
        V r = reinterpret_cast<const V*>(residual + row * res_stride)[vi];
        V s;
#pragma unroll
        for (int j = 0; j < N; ++j) s.v[j] = from_float<T>(to_float(a.v[j]) + to_float(r.v[j]));
        // The rounded sum is the residual stream; the norm below is taken of exactly these values.
        reinterpret_cast<V*>(residual_out + row * hidden)[vi] = s;
        a = s;
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        vals[i][j] = to_float(a.v[j]);
        sumsq += vals[i][j] * vals[i][j];
      }
    }
  }
  const float inv = rsqrtf(block_sum(sumsq, scratch) / hidden + eps);
  V* ov = reinterpret_cast<V*>(out + row * hidden);
#pragma unroll
  for (int i = 0; i < kVPT; ++i) {
    const int vi = threadIdx.x + i * blockDim.x;
    if (vi < nvec) {
      V o;
#pragma unroll
      for (int j = 0; j < N; ++j) o.v[j] = from_float<T>(vals[i][j] * inv * to_float(weight[vi * N + j]));
      ov[vi] = o;
    }
  }
}

// Any width, any alignment: scalar accesses, the row re-read for the second pass.
template <typename T, typename W, bool kAdd>
__global__ void __launch_bounds__(1024) rms_norm_generic_kernel(T* __restrict__ out, T* __restrict__ residual_out,
                                                                const T* __restrict__ x,
                                                                const T* __restrict__ residual,
                                                                const W* __restrict__ weight, int64_t x_stride,
                                                                int64_t res_stride, int hidden, float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * x_stride;
  T* rr = kAdd ? residual_out + row * hidden : nullptr;
  float sumsq = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = to_float(xr[i]);
    if constexpr (kAdd) {
      const T s = from_float<T>(v + to_float(residual[row * res_stride + i]));
      rr[i] = s;
      v = to_float(s);
    }
    sumsq += v * v;
  }
  const float inv = rsqrtf(block_sum(sumsq, scratch) / hidden + eps);
  // Each thread re-reads only the elements it wrote itself, so no barrier is needed before reading rr.
  const T* src = kAdd ? rr : xr;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x)
    out[row * hidden + i] = from_float<T>(to_float(src[i]) * inv * to_float(weight[i]));
}

template <typename T>
struct CudaType;
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<float> {
  using type = float;
};

template <typename T, typename W, bool kAdd>
void launch(at::Tensor& out, at::Tensor* residual_out, const at::Tensor& x, const at::Tensor* residual,
            const at::Tensor& weight, double eps, int64_t rows, int hidden, int64_t x_stride, int64_t res_stride) {
  if (rows == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  T* o = reinterpret_cast<T*>(out.data_ptr());
  T* ro = kAdd ? reinterpret_cast<T*>(residual_out->data_ptr()) : nullptr;
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* rp = kAdd ? reinterpret_cast<const T*>(residual->data_ptr()) : nullptr;
  const W* wp = reinterpret_cast<const W*>(weight.data_ptr());
  constexpr int N = Vec16<T>::N;
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vec_ok = hidden % N == 0 && x_stride % N == 0 && (!kAdd || res_stride % N == 0) && aligned(xp) &&
                      (!kAdd || aligned(rp)) && hidden / N <= kVPT * 1024;
  if (vec_ok) {
    const int nvec = hidden / N;
    int threads = (nvec + kVPT - 1) / kVPT;
    threads = std::max(32, (threads + 31) / 32 * 32);
    rms_norm_vec_kernel<T, W, kAdd><<<rows, threads, 0, stream>>>(o, ro, xp, rp, wp, x_stride, res_stride, hidden,
                                                                   static_cast<float>(eps));
  } else {
    const int threads = std::min(1024, std::max(32, (hidden + 31) / 32 * 32));
    rms_norm_generic_kernel<T, W, kAdd><<<rows, threads, 0, stream>>>(o, ro, xp, rp, wp, x_stride, res_stride,
                                                                       hidden, static_cast<float>(eps));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Shared by both ops: checks, views as [rows, hidden], dtype dispatch.
template <bool kAdd>
void run(const char* op, at::Tensor& out, at::Tensor* residual_out, const at::Tensor& x, const at::Tensor* residual,
         const at::Tensor& weight_in, double eps) {
  check_cuda(op, "x", x);
  check_same_device(op, "weight", weight_in, x);
  DSV2_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, "x", "must have a non-empty last dimension, got shape ", x.sizes());
  DSV2_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf || x.scalar_type() == at::kFloat, op,
             "x", "must have dtype bfloat16, float16 or float32, got ", x.scalar_type());
  DSV2_CHECK(x.size(-1) == 1 || x.stride(-1) == 1, op, "x", "must have a contiguous last dimension, got strides ",
             x.strides());
  const int64_t hidden = x.size(-1);
  DSV2_CHECK(weight_in.dim() == 1 && weight_in.size(0) == hidden, op, "weight", "must have shape (", hidden,
             ",), got ", weight_in.sizes());
  DSV2_CHECK(eps > 0, op, "eps", "must be > 0, got ", eps);
  DSV2_CHECK(hidden <= std::numeric_limits<int>::max(), op, "x", "last dimension too large: ", hidden);
  if (kAdd) {
    check_same_device(op, "residual", *residual, x);
    check_dtype(op, "residual", *residual, x.scalar_type());
    DSV2_CHECK(residual->sizes() == x.sizes(), op, "residual", "must have shape ", x.sizes(), ", got ",
               residual->sizes());
    DSV2_CHECK(hidden == 1 || residual->stride(-1) == 1, op, "residual",
               "must have a contiguous last dimension, got strides ", residual->strides());
  }
  // Rows of x may be strided (e.g. a slice of a larger activation) as long as they are evenly spaced.
  const at::Tensor x2 = x.reshape({-1, hidden});
  const at::Tensor r2 = kAdd ? residual->reshape({-1, hidden}) : at::Tensor();
  const int64_t rows = x2.size(0);
  DSV2_CHECK(rows <= std::numeric_limits<int>::max(), op, "x", "has too many rows: ", rows);
  const int64_t x_stride = rows > 1 ? x2.stride(0) : hidden;
  const int64_t res_stride = kAdd ? (rows > 1 ? r2.stride(0) : hidden) : 0;

  // The weight is tiny: hold it in the activation dtype when it already is, else in fp32 (an exact widening).
  const at::Tensor weight =
      weight_in.scalar_type() == x.scalar_type() ? weight_in.contiguous() : weight_in.to(at::kFloat).contiguous();
  const bool w_same = weight.scalar_type() == x.scalar_type();
  const c10::cuda::CUDAGuard guard(x.device());

#define DSV2_RMS_LAUNCH(AT_T)                                                                                     \
  {                                                                                                               \
    using T = CudaType<AT_T>::type;                                                                               \
    if (w_same)                                                                                                   \
      launch<T, T, kAdd>(out, residual_out, x2, kAdd ? &r2 : nullptr, weight, eps, rows, hidden, x_stride,      \
                         res_stride);                                                                             \
    else                                                                                                          \
      launch<T, float, kAdd>(out, residual_out, x2, kAdd ? &r2 : nullptr, weight, eps, rows, hidden, x_stride,  \
                             res_stride);                                                                         \
  }
  switch (x.scalar_type()) {
    case at::kBFloat16: DSV2_RMS_LAUNCH(at::BFloat16) break;
    case at::kHalf: DSV2_RMS_LAUNCH(at::Half) break;
    default: DSV2_RMS_LAUNCH(float) break;
  }
#undef DSV2_RMS_LAUNCH
}

}  // namespace

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  run<false>("rms_norm", out, nullptr, x, nullptr, weight, eps);
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                           const at::Tensor& weight, double eps) {
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor residual_out = at::empty_like(out);
  run<true>("fused_add_rms_norm", out, &residual_out, x, &residual, weight, eps);
  return {out, residual_out};
}

}  // namespace dsv2
