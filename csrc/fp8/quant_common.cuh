// Per-token-group FP8 quantization shared by quant_per_token_group.cu and silu_mul_quant.cu (each instantiates its
// own variant), plus the e4m3 helpers quant_weight_block.cu uses.
//
// Semantics (dsv2_kernels/fp8.py, bit-exact with the PyTorch reference as it runs on the GPU): per group of G
// elements of a row, amax = max |x| in fp32, scale = max(amax, 1e-10) * fp32(1/448) (see group_scale), and
// q = e4m3_rn_satfinite(x / scale) with x / scale rounded as an IEEE fp32 division (see quotient).
//
// Work mapping. One 16-byte vector (E = 8 bf16/fp16 or 4 fp32 elements) per lane per group, so a "team" of
// TS = G / E lanes (8, 16 or 32) holds one group and reduces its amax with TS-wide xor shuffles. A warp has
// TPW = 32 / TS teams and handles one "unit": NT = U * TPW consecutive rows of one group column (team t, step u ->
// row t + TPW * u). Each lane loads its U (silu: 2U) vectors before using any, so 64-128 bytes per thread are in
// flight. Consecutive warps take consecutive group columns of the same rows, so the CTAs running at any time sweep
// a few whole rows (sequential DRAM pages) and each team writes 64-128 contiguous fp8 bytes.
// Scales: lane `sub` of team t keeps the scale of its step u == sub, so one store instruction per warp writes the
// NT scales of rows m0 .. m0 + NT - 1: contiguous (one 32-byte sector for bf16) in the column-major layout the GEMMs
// read, NT strided floats in the row-major one (merged in L2; the scales are 1/128 of the q bytes).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/ops/empty_strided.h>

#include "../common/torch_cuda.h"

namespace dsv2 {
namespace fp8_quant {

constexpr float kFp8Max = 448.f;
constexpr float kAmaxFloor = 1e-10f;  // fp32(1e-10), as the reference's clamp_min converts it

// The reference writes `amax.clamp_min(1e-10) / 448.0`; dividing a CUDA tensor by a Python scalar makes ATen multiply
// by the fp32 reciprocal instead (BinaryDivTrueKernel.cu), which differs from an exact division in the last bit for
// about half of all amax values, and then moves ~0.05% of bf16 q values by a step. We match what the GPU computes.
// max that returns NaN if either input is NaN (PTX max.NaN, one FMNMX.NAN): a NaN in a group makes its amax and
// scale NaN and so every q of the group NaN, as torch's amax and clamp_min propagate it (fmaxf would drop it).
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float group_scale(float amax) { return max_nan(amax, kAmaxFloor) * (1.0f / kFp8Max); }

// x / scale exactly as an IEEE fp32 division rounds it, without a full division per element: every element of a
// group divides by the same scale, so its correctly rounded reciprocal r is computed once and each quotient takes
// y = x * r and two residual corrections y -= r * (scale * y - x) (FMAs). After the first correction y is faithful;
// with r = RN(1 / scale) the second then returns RN(x / scale) (Markstein's theorem; the residual is exact since no
// quotient that can round to a nonzero e4m3 value brings it near underflow: scale >= 1e-10 / 448). 5 FP instructions
// instead of ~10 plus a slow-path check and branch; checked against IEEE division on 1e8 fp32/bf16 cases.
// The residual is negated (scale * y - x, not x - scale * y) so that x = -0 gives -0, as the division does. An
// infinite scale (an inf in the group) divides by 0 instead, with r = RN(1 / inf) = 0: the corrections then return
// +-0 for finite x and NaN for +-inf, as x / inf does.
struct Divisor {
  float s, r;
};
__device__ __forceinline__ Divisor make_divisor(float scale) {
  return {scale == __int_as_float(0x7F800000) ? 0.f : scale, __frcp_rn(scale)};
}
__device__ __forceinline__ float quotient(float x, Divisor d) {
  float y = __fmul_rn(x, d.r);
  y = __fmaf_rn(-__fmaf_rn(d.s, y, -x), d.r, y);
  return __fmaf_rn(-__fmaf_rn(d.s, y, -x), d.r, y);
}

// e4m3 round-to-nearest-even with saturation to +-448: the reference clamps to [-448, 448] before its RNE cast, which
// is the same thing for every non-NaN quotient.
__device__ __forceinline__ uint32_t fp8x2(float a, float b, Divisor d) {
  return __nv_cvt_float2_to_fp8x2(make_float2(quotient(a, d), quotient(b, d)), __NV_SATFINITE, __NV_E4M3);
}
__device__ __forceinline__ uint8_t fp8x1(float a, Divisor d) {
  return __nv_cvt_float_to_fp8(quotient(a, d), __NV_SATFINITE, __NV_E4M3);
}

template <typename T>
constexpr int kVecElems = 16 / sizeof(T);

// One 16-byte vector of T as floats (exact widening).
template <typename T>
__device__ __forceinline__ void to_floats(const uint4& r, float (&v)[kVecElems<T>]) {
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      v[i] = __uint_as_float(w[i]);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    } else {
      v[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xFFFFu)));
      v[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
    }
  }
}

template <typename T>
__device__ __forceinline__ float scalar_to_float(T x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(x);
  else return __half2float(x);
}

// E quantized values (E = 8 or 4) stored with one 8- or 4-byte store; dst is E-byte aligned.
template <int E>
__device__ __forceinline__ void store_fp8(uint8_t* dst, const float (&v)[E], Divisor d) {
  if constexpr (E == 8) {
    const uint2 o = make_uint2(fp8x2(v[0], v[1], d) | (fp8x2(v[2], v[3], d) << 16),
                               fp8x2(v[4], v[5], d) | (fp8x2(v[6], v[7], d) << 16));
    *reinterpret_cast<uint2*>(dst) = o;
  } else {
    static_assert(E == 4);
    *reinterpret_cast<uint32_t*>(dst) = fp8x2(v[0], v[1], d) | (fp8x2(v[2], v[3], d) << 16);
  }
}

// silu(g) = g / (1 + exp(-g)) in fp32 with the hardware approximations (what production MoE kernels use):
// exp(-g) = ex2.approx(-g * log2 e) and 1 / (1 + e) = rcp.approx: one FMUL, two MUFU, one FADD, one FMUL.
// Relative error vs the exact function ~1e-6 at most for g >= -10 (the fp32 rounding of -g * log2 e grows with |g|;
// down to g = -87 it stays < 4e-6, on values below 5e-4). Same special values as torch's F.silu, x / (1 + exp(-x)):
// +-0 -> +-0, subnormal g -> g / 2 exactly, +inf -> inf, -inf -> NaN (-inf / inf), NaN -> NaN, and g < -88.72 -> -0
// (exp overflows). Differs: -88.72 < g < -87.33, where 1 / (1 + e) is subnormal and flushed, gives -0 instead of a
// value below 1.1e-36 (visible only if up > ~1e30).
__device__ __forceinline__ float silu(float g) {
  float e, r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(g * -1.4426950408889634f));
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.0f + e));
  return g * r;
}

// ---- per-token-group kernel -----------------------------------------------------------------------------------
constexpr int kWarps = 4;  // small CTAs: small M still spreads over many SMs
constexpr int kThreads = kWarps * 32;
constexpr int kSteps = 4;  // U: rows per team per unit

template <typename T, int G>
struct Layout {
  static constexpr int E = kVecElems<T>;  // elements per lane per group
  static constexpr int TS = G / E;        // lanes per group
  static constexpr int TPW = 32 / TS;     // teams per warp
  static constexpr int U = kSteps;
  static constexpr int NT = U * TPW;      // rows per warp unit
  static_assert(TS >= 8 && TS <= 32 && TS >= U, "a team must be 8..32 lanes and hold U scales");
};

template <typename T, int G>
constexpr int rows_per_unit() {
  return Layout<T, G>::NT;
}

struct GroupQuantParams {
  const void* x;         // [B, M, *] rows of T; 16-byte aligned, strides multiples of the vector width
  uint8_t* q;            // [B, M, width] contiguous
  float* s;              // [B, M, groups] with strides s_sb, s_sm, s_sc
  int64_t x_sb, x_sm;    // elements
  int64_t s_sb, s_sm, s_sc;
  int64_t up;            // silu: elements from a row's gate to its up half (N)
  int32_t m, width;      // rows per batch; q row width (K, or N for silu)
  uint32_t groups;       // width / G
  uint32_t row_blocks;   // ceil(m / NT)
  uint32_t units;        // batches * row_blocks * groups
};

template <typename T, int G, bool kSilu>
__global__ void __launch_bounds__(kThreads) group_quant_kernel(const __grid_constant__ GroupQuantParams p) {
  using L = Layout<T, G>;
  constexpr int E = L::E, TS = L::TS, TPW = L::TPW, U = L::U;
  const uint32_t unit = blockIdx.x * kWarps + threadIdx.x / 32;
  if (unit >= p.units) return;  // warp-uniform: the shuffles below always see the full warp
  const int lane = threadIdx.x % 32, team = lane / TS, sub = lane % TS;
  const uint32_t col = unit % p.groups, rest = unit / p.groups;
  const uint32_t b = rest / p.row_blocks;
  const int m0 = static_cast<int>(rest - b * p.row_blocks) * L::NT + team;

  const T* xg = static_cast<const T*>(p.x) + b * p.x_sb + col * G + sub * E;
  uint4 raw[U], raw_up[kSilu ? U : 1];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int m = m0 + u * TPW;
    raw[u] = make_uint4(0, 0, 0, 0);
    if constexpr (kSilu) raw_up[u] = make_uint4(0, 0, 0, 0);
    if (m < p.m) {
      const T* src = xg + m * p.x_sm;
      raw[u] = __ldcs(reinterpret_cast<const uint4*>(src));  // read once: evict first
      if constexpr (kSilu) raw_up[u] = __ldcs(reinterpret_cast<const uint4*>(src + p.up));
    }
  }

  uint8_t* qg = p.q + (static_cast<int64_t>(b) * p.m + m0) * p.width + col * G + sub * E;
  const int64_t q_step = static_cast<int64_t>(TPW) * p.width;
  float my_scale = 0.f;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    float v[E];
    to_floats<T>(raw[u], v);
    if constexpr (kSilu) {
      float up[E];
      to_floats<T>(raw_up[u], up);
#pragma unroll
      for (int j = 0; j < E; ++j) v[j] = silu(v[j]) * up[j];  // fp32 h, never rounded to the input dtype
    }
    float amax = 0.f;
#pragma unroll
    for (int j = 0; j < E; ++j) amax = max_nan(amax, fabsf(v[j]));
#pragma unroll
    for (int o = TS / 2; o > 0; o >>= 1) amax = max_nan(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
    const float scale = group_scale(amax);
    if (sub == u) my_scale = scale;
    const int m = m0 + u * TPW;
    if (m < p.m) store_fp8<E>(qg + u * q_step, v, make_divisor(scale));
  }
  const int m = m0 + sub * TPW;
  if (sub < U && m < p.m) p.s[b * p.s_sb + m * p.s_sm + col * p.s_sc] = my_scale;
}

template <typename T, bool kSilu>
void launch_group_quant(int64_t group_size, unsigned blocks, cudaStream_t stream, const GroupQuantParams& p) {
  if (group_size == 128)
    group_quant_kernel<T, 128, kSilu><<<blocks, kThreads, 0, stream>>>(p);
  else
    group_quant_kernel<T, 64, kSilu><<<blocks, kThreads, 0, stream>>>(p);
}

// Checks (same wording as dsv2_kernels/fp8.py), outputs laid out exactly as the fake impl, and the launch.
// kSilu: x is [.., M, 2N] (gate | up) and the output is [.., M, N].
// The outputs of a per-token-group quantization of x [(B,) M, *] into `groups` groups of `width` values per row,
// exactly as the fake impls lay them out: q contiguous; scales row-major contiguous, or column-major with
// M_pad = round_up(M, 4) (per batch for a 3-d input); with the scales' batch, row and group strides.
struct QuantOutputs {
  at::Tensor q, s;
  int64_t s_sb, s_sm, s_sc;
};
inline QuantOutputs quant_outputs(const at::Tensor& x, int64_t width, int64_t groups, bool column_major) {
  const bool batched = x.dim() == 3;
  const int64_t m = x.size(-2);
  std::vector<int64_t> q_sizes(x.sizes().begin(), x.sizes().end());
  q_sizes.back() = width;
  QuantOutputs o;
  o.q = at::empty(q_sizes, x.options().dtype(at::kFloat8_e4m3fn));
  std::vector<int64_t> s_sizes = q_sizes;
  s_sizes.back() = groups;
  if (column_major) {
    const int64_t m_pad = (m + 3) / 4 * 4;
    o.s_sb = groups * m_pad, o.s_sm = 1, o.s_sc = m_pad;
    std::vector<int64_t> strides = {1, m_pad};
    if (batched) strides.insert(strides.begin(), o.s_sb);
    o.s = at::empty_strided(s_sizes, strides, x.options().dtype(at::kFloat));
  } else {
    o.s_sb = m * groups, o.s_sm = groups, o.s_sc = 1;
    o.s = at::empty(s_sizes, x.options().dtype(at::kFloat));
  }
  return o;
}

template <bool kSilu>
std::tuple<at::Tensor, at::Tensor> group_quant(const char* op, const at::Tensor& x_in, int64_t group_size,
                                               bool column_major) {
  check_cuda(op, "x", x_in);
  const at::ScalarType dt = x_in.scalar_type();
  DSV2_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat, op, "x",
             "must have dtype bfloat16 or float16 or float32, got ", dt);
  DSV2_CHECK(x_in.dim() == 0 || x_in.size(-1) <= 1 || x_in.stride(-1) == 1, op, "x",
             "must have a contiguous last dimension, got strides ", x_in.strides());
  DSV2_CHECK(x_in.dim() == 2 || x_in.dim() == 3, op, "x",
             "must have 2 or 3 dimensions ([M, K] or [B, M, K]), got shape ", x_in.sizes());
  DSV2_CHECK(group_size == 64 || group_size == 128, op, "group_size", "must be one of (64, 128), got ", group_size);
  const int64_t in_width = x_in.size(-1);
  if constexpr (kSilu) {
    DSV2_CHECK(in_width > 0 && in_width % (2 * group_size) == 0, op, "x",
               "must have a last dimension 2*N with N a positive multiple of group_size=", group_size, ", got ",
               in_width);
  } else {
    DSV2_CHECK(in_width > 0 && in_width % group_size == 0, op, "x",
               "must have a last dimension that is a positive multiple of group_size=", group_size, ", got ",
               in_width);
  }
  const bool batched = x_in.dim() == 3;
  const int64_t batches = batched ? x_in.size(0) : 1, m = x_in.size(-2);
  const int64_t width = kSilu ? in_width / 2 : in_width, groups = width / group_size;

  auto [q, s, s_sb, s_sm, s_sc] = quant_outputs(x_in, width, groups, column_major);
  if (batches == 0 || m == 0) return {q, s};

  const int e = dt == at::kFloat ? 4 : 8;
  const int nt = dt == at::kFloat ? (group_size == 128 ? rows_per_unit<float, 128>() : rows_per_unit<float, 64>())
                                  : (group_size == 128 ? rows_per_unit<__nv_bfloat16, 128>()
                                                       : rows_per_unit<__nv_bfloat16, 64>());
  const int64_t row_blocks = (m + nt - 1) / nt;
  const int64_t units = batches * row_blocks * groups;
  DSV2_CHECK(m < std::numeric_limits<int32_t>::max() - 64 && width <= std::numeric_limits<int32_t>::max() &&
                 units <= std::numeric_limits<int32_t>::max() - kThreads,
             op, "x", "is too large for the CUDA kernel: shape ", x_in.sizes());

  // 16-byte vectors need 16-byte aligned rows; anything else (a rare view) gets an aligned contiguous copy.
  // Strides of size-1 dimensions are never used, whatever they are.
  at::Tensor x = x_in;
  int64_t x_sb = batched && batches > 1 ? x.stride(0) : 0, x_sm = m > 1 ? x.stride(-2) : 0;
  if (!aligned16(x.data_ptr()) || x_sb % e != 0 || x_sm % e != 0) {
    x = x_in.clone(at::MemoryFormat::Contiguous);  // a fresh allocation: aligned even where x_in is contiguous
    x_sb = m * in_width, x_sm = in_width;
  }

  GroupQuantParams p;
  p.x = x.data_ptr();
  p.q = reinterpret_cast<uint8_t*>(q.data_ptr());
  p.s = s.data_ptr<float>();
  p.x_sb = x_sb, p.x_sm = x_sm;
  p.s_sb = s_sb, p.s_sm = s_sm, p.s_sc = s_sc;
  p.up = kSilu ? width : 0;
  p.m = static_cast<int32_t>(m), p.width = static_cast<int32_t>(width);
  p.groups = static_cast<uint32_t>(groups);
  p.row_blocks = static_cast<uint32_t>(row_blocks);
  p.units = static_cast<uint32_t>(units);

  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>((units + kWarps - 1) / kWarps);
  if (dt == at::kBFloat16)
    launch_group_quant<__nv_bfloat16, kSilu>(group_size, blocks, stream, p);
  else if (dt == at::kHalf)
    launch_group_quant<__half, kSilu>(group_size, blocks, stream, p);
  else
    launch_group_quant<float, kSilu>(group_size, blocks, stream, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, s};
}

}  // namespace fp8_quant
}  // namespace dsv2
