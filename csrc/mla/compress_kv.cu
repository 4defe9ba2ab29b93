// MLA KV compression in one pass: c = RMSNorm(kv_a[:, :512]) * weight, k_pe = RoPE(kv_a[:, 512:]) at positions[t],
// row [c | k_pe] written to the paged latent cache at slot_mapping[t] (bf16, or e4m3 with a per-token scale for each
// part), and optionally c / k_pe returned in bf16.
//
// Memory-bound: each token's 1152-byte kv_a row is read once and its cache row (1152 bytes, or 576 + 8) written once.
// One warp per token, no shared memory: lane l holds c vectors l and l + 32 (16 bytes = 8 values each, so each warp
// access covers 512 contiguous bytes) and k_pe pair l (4 bytes) with its cos and sin. The sum of squares and the e4m3
// amaxes are warp shuffles.
//
// The e4m3 path costs ~305 warp instructions per token (bf16: ~185) against ~1.7 KB of traffic, so at full bandwidth
// it would use ~60% of the SMs' issue slots: instruction count matters as much as memory-level parallelism. Hence
// (a) k_pe spread over all 32 lanes (8 lanes holding 8 values each would cost the whole warp 4x the instructions for
// that part), (b) a grid of resident warps that stride over the tokens, loading and widening the weight once per
// warp and keeping the address setup out of the per-token path, and (c) the next token's loads issued before the
// current token is processed, so a warp always has a row in flight. kv_a is read even for a token whose slot is
// skipped: gating the loads on the slot would put a dependent memory round trip in front of every token (and
// skipped tokens are rare padding).
//
// Numerics follow compress_kv_ref in fp32: x * rsqrt(mean(x^2) + eps) * w (only the summation order differs), the
// RoPE products and sums rounded separately (bit-equal), e4m3 scales max(amax, 1e-10) * fp32(1 / 448) (what the
// reference's "/ 448" computes on CUDA) and values v / scale (correctly rounded, as IEEE division) converted with
// round-to-nearest-even and saturation (the same as the reference's clamp to +-448 then cast).

#include "../common/torch_cuda.h"

#include <cuda_fp8.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>

#include "../common/vec.cuh"
#include "../ops.h"
#include "rope_common.cuh"

namespace dsv2 {
namespace {

using namespace mla_rope;

constexpr int kKvRank = 512;
constexpr int kKvDim = kKvRank + kRopeDim;  // 576
constexpr int kWarps = 4;                   // warps per CTA: small CTAs spread mid-sized T over more SMs
constexpr int kThreads = kWarps * 32;
constexpr float kFp8Max = 448.f;
constexpr float kAmaxFloor = 1e-10f;

struct Params {
  const __nv_bfloat16* kv_a;  // [T, 576], rows kv_stride elements apart, 16-byte aligned
  int64_t kv_stride;
  const void* weight;  // [512] W, 16-byte aligned
  const void* positions;
  int64_t pos_stride;
  const void* slots;
  int64_t slot_stride;
  const float* cos_sin;  // [max_pos, 64]
  int64_t max_pos;
  uint8_t* cache;  // [num_slots, 576] bf16 or e4m3
  float* scale;    // [num_slots, 2] (e4m3 only)
  int64_t num_slots;
  __nv_bfloat16* c_out;  // [T, 512] (return_normed only)
  __nv_bfloat16* k_out;  // [T, 64]
  int64_t tokens;
  int64_t warps;                        // in the grid: each warp strides over the tokens by this much
  int64_t row_step, pos_step, slot_step;  // that stride in kv_a elements and index bytes (set at launch)
  float eps;
  bool pos64, slot64;
};

// Where a warp's next token lives: advanced by `warps` tokens per step with one add per pointer (index tensors of
// either width are walked as bytes).
struct Cursor {
  const __nv_bfloat16* row;
  const char* pos;
  const char* slot;
};

// A token's loads, raw: nothing is computed from them until the step that consumes them, so issuing them never
// stalls the warp.
struct TokenLoads {
  uint4 c0, c1;  // c vectors lane and lane + 32 (bf16 x 8 each)
  uint32_t k;    // k_pe pair `lane` (bf16 x 2)
  int64_t slot, pos;
};

// positions / slot_mapping may be int32 or int64: a runtime flag, uniform over the grid (so the branch is free and
// the template instances do not multiply).
__device__ __forceinline__ int64_t load_index(const char* p, bool is64) {
  return is64 ? static_cast<int64_t>(__ldg(reinterpret_cast<const long long*>(p)))
              : static_cast<int64_t>(__ldg(reinterpret_cast<const int*>(p)));
}

__device__ __forceinline__ TokenLoads load_token(const Params& p, const Cursor& c, int lane) {
  TokenLoads x;
  x.c0 = __ldcs(reinterpret_cast<const uint4*>(c.row) + lane);  // read once: evict first
  x.c1 = __ldcs(reinterpret_cast<const uint4*>(c.row) + 32 + lane);
  x.k = __ldcs(reinterpret_cast<const unsigned int*>(c.row + kKvRank) + lane);
  x.slot = load_index(c.slot, p.slot64);
  x.pos = load_index(c.pos, p.pos64);
  return x;
}

__device__ __forceinline__ void advance(Cursor& c, const Params& p) {
  c.row += p.row_step;
  c.pos += p.pos_step;
  c.slot += p.slot_step;
}

// 8 consecutive weights as fp32 (exact widening of any float dtype).
template <typename W>
__device__ __forceinline__ void load_weight8(const W* w, float* out) {
  constexpr int N = Vec16<W>::N;
#pragma unroll
  for (int i = 0; i < 8 / N; ++i) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(w) + i);
    const Vec16<W> v = *reinterpret_cast<const Vec16<W>*>(&raw);
#pragma unroll
    for (int j = 0; j < N; ++j) out[i * N + j] = to_float(v.v[j]);
  }
}

__device__ __forceinline__ uint32_t pack_e4m3x2(float a, float b) {
  return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
}

// x / scale given rcp = RN(1 / scale): q = RN(x * rcp) is within an ulp of the quotient and one FMA correction makes
// it the correctly rounded quotient (Markstein), i.e. the reference's IEEE division, in 3 instructions instead of a
// division sequence. The residual is formed as q * scale - x (exact) and subtracted so that x = -0 keeps its sign
// (-0 / scale = -0: e4m3 code 0x80, as the reference). Quotients far below the e4m3 range, where the theorem's
// no-underflow premise fails, become 0 either way.
__device__ __forceinline__ float div_by_scale(float x, float scale, float rcp) {
  const float q = __fmul_rn(x, rcp);
  const float r = __fmaf_rn(q, scale, -x);
  return __fmaf_rn(-r, rcp, q);
}

__device__ __forceinline__ uint2 quantize8(const float* x, float scale, float rcp) {
  float q[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) q[i] = div_by_scale(x[i], scale, rcp);
  return make_uint2(pack_e4m3x2(q[0], q[1]) | (pack_e4m3x2(q[2], q[3]) << 16),
                    pack_e4m3x2(q[4], q[5]) | (pack_e4m3x2(q[6], q[7]) << 16));
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// One token, its loads complete (or in flight: the first use waits).
template <bool kFp8, bool kNormed>
__device__ __forceinline__ void process_token(const Params& p, const TokenLoads& x, const float (&w)[16], int64_t t,
                                              int lane) {
  const float* cs = p.cos_sin + clamp_position(x.pos, p.max_pos) * kRopeDim;
  const float cosv = __ldg(cs + lane), sinv = __ldg(cs + kHalf + lane);

  // c: RMSNorm in fp32, (x * inv) * w as the reference orders it.
  float c[16];
  unpack_bf16x8(x.c0, c);
  unpack_bf16x8(x.c1, c + 8);
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < 16; ++i) ss = fmaf(c[i], c[i], ss);
  const float inv = rsqrtf(warp_sum(ss) / kKvRank + p.eps);
#pragma unroll
  for (int i = 0; i < 16; ++i) c[i] = c[i] * inv * w[i];

  // k_pe: this lane's pair.
  float ke = __uint_as_float(x.k << 16), ko = __uint_as_float(x.k & 0xFFFF0000u);
  rotate_pair(ke, ko, cosv, sinv);

  if constexpr (kNormed) {
    uint4* co = reinterpret_cast<uint4*>(p.c_out + t * kKvRank);
    co[lane] = pack_bf16x8(c);
    co[32 + lane] = pack_bf16x8(c + 8);
    reinterpret_cast<uint32_t*>(p.k_out + t * kRopeDim)[lane] = pack_bf16x2(ke, ko);
  }
  // Slots past the cache are caller errors the value checks report; with them off, skip rather than write out of
  // bounds.
  const int64_t slot = x.slot;
  if (slot < 0 || slot >= p.num_slots) return;  // uniform across the warp
  if constexpr (!kFp8) {
    __nv_bfloat16* dst = reinterpret_cast<__nv_bfloat16*>(p.cache) + slot * kKvDim;
    reinterpret_cast<uint4*>(dst)[lane] = pack_bf16x8(c);
    reinterpret_cast<uint4*>(dst)[32 + lane] = pack_bf16x8(c + 8);
    reinterpret_cast<uint32_t*>(dst + kKvRank)[lane] = pack_bf16x2(ke, ko);
  } else {
    float amax_c = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) amax_c = fmaxf(amax_c, fabsf(c[i]));
    amax_c = warp_max(amax_c);
    const float amax_k = warp_max(fmaxf(fabsf(ke), fabsf(ko)));
    // PyTorch's CUDA division by a Python scalar multiplies by its fp32 reciprocal: do the same, bit for bit.
    const float c_scale = fmaxf(amax_c, kAmaxFloor) * (1.f / kFp8Max);
    const float k_scale = fmaxf(amax_k, kAmaxFloor) * (1.f / kFp8Max);
    const float c_rcp = __frcp_rn(c_scale), k_rcp = __frcp_rn(k_scale);
    uint8_t* dst = p.cache + slot * kKvDim;
    reinterpret_cast<uint2*>(dst)[lane] = quantize8(c, c_scale, c_rcp);
    reinterpret_cast<uint2*>(dst)[32 + lane] = quantize8(c + 8, c_scale, c_rcp);
    reinterpret_cast<uint16_t*>(dst + kKvRank)[lane] =
        static_cast<uint16_t>(pack_e4m3x2(div_by_scale(ke, k_scale, k_rcp), div_by_scale(ko, k_scale, k_rcp)));
    if (lane == 0) {
      p.scale[slot * 2] = c_scale;
      p.scale[slot * 2 + 1] = k_scale;
    }
  }
}

// Each warp walks tokens t0, t0 + warps, ... with the next token's loads in flight while it processes the current
// one. (Unrolling by two with ping-pong buffers would save the ~13 register moves of the hand-over, but ptxas then
// hoists more and needs ~100 registers: fewer warps per SM.)
template <typename W, bool kFp8, bool kNormed>
__global__ void __launch_bounds__(kThreads, 6) compress_kv_kernel(const __grid_constant__ Params p) {
  const int lane = threadIdx.x & 31;
  int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (t >= p.tokens) return;  // whole warps: the shuffles see all 32 lanes

  const int pos_size = p.pos64 ? 8 : 4, slot_size = p.slot64 ? 8 : 4;
  Cursor cur{p.kv_a + t * p.kv_stride, static_cast<const char*>(p.positions) + t * p.pos_stride * pos_size,
             static_cast<const char*>(p.slots) + t * p.slot_stride * slot_size};
  TokenLoads x = load_token(p, cur, lane);
  float w[16];
  load_weight8(static_cast<const W*>(p.weight) + 8 * lane, w);
  load_weight8(static_cast<const W*>(p.weight) + 256 + 8 * lane, w + 8);

  while (true) {
    advance(cur, p);
    const bool more = t + p.warps < p.tokens;
    TokenLoads next;
    if (more) next = load_token(p, cur, lane);
    process_token<kFp8, kNormed>(p, x, w, t, lane);
    if (!more) break;
    x = next;
    t += p.warps;
  }
}

int sm_count(int device) {
  static int cached[64] = {};
  if (device < 0 || device >= 64) return 132;
  if (cached[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cached[device] = n;
  }
  return cached[device];
}

template <typename W, bool kFp8, bool kNormed>
void launch_kernel(const Params& p, int device, cudaStream_t stream) {
  const auto kernel = compress_kv_kernel<W, kFp8, kNormed>;
  // At most the CTAs that fit at once (one wave; warps stride over the tokens), and no more warps than needed to
  // give every warp the same number of tokens (up to one): with 3168 resident warps and T = 8192, 2731 warps of 3
  // tokens each keep the memory system busy to the end, where 3168 warps of 2 or 3 would leave a third of the run
  // to 60% of them.
  static const int per_sm = [&] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0));
    return std::max(n, 1);
  }();
  const int64_t max_warps = static_cast<int64_t>(per_sm) * sm_count(device) * kWarps;
  const int64_t per_warp = (p.tokens + max_warps - 1) / max_warps;
  const int64_t warps = (p.tokens + per_warp - 1) / per_warp;
  const int blocks = static_cast<int>((warps + kWarps - 1) / kWarps);
  Params q = p;
  q.warps = static_cast<int64_t>(blocks) * kWarps;
  q.row_step = q.warps * p.kv_stride;
  q.pos_step = q.warps * p.pos_stride * (p.pos64 ? 8 : 4);
  q.slot_step = q.warps * p.slot_stride * (p.slot64 ? 8 : 4);
  kernel<<<blocks, kThreads, 0, stream>>>(q);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename W>
void launch(const Params& p, bool fp8, int device, cudaStream_t stream) {
  const bool normed = p.c_out != nullptr;
  if (fp8)
    normed ? launch_kernel<W, true, true>(p, device, stream) : launch_kernel<W, true, false>(p, device, stream);
  else
    normed ? launch_kernel<W, false, true>(p, device, stream) : launch_kernel<W, false, false>(p, device, stream);
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

void check_index_tensor(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref, int64_t n) {
  check_same_device(op, arg, t, ref);
  DSV2_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, arg,
             "must have dtype int32 or int64, got ", t.scalar_type());
  DSV2_CHECK(t.dim() == 1 && t.size(0) == n, op, arg, "must have shape (", n, ",), got ", t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> compress_kv_cuda(const at::Tensor& kv_a_in, const at::Tensor& norm_weight,
                                                    double eps, const at::Tensor& positions,
                                                    const at::Tensor& cos_sin_cache, const at::Tensor& slot_mapping,
                                                    at::Tensor& kv_cache, const std::optional<at::Tensor>& kv_scale,
                                                    bool return_normed) {
  const char* op = "compress_kv";
  check_cuda(op, "kv_a", kv_a_in);
  check_dtype(op, "kv_a", kv_a_in, at::kBFloat16);
  DSV2_CHECK(kv_a_in.dim() == 2 && kv_a_in.size(1) == kKvDim, op, "kv_a", "must have shape ('*', 576), got ",
             kv_a_in.sizes());
  DSV2_CHECK(kv_a_in.stride(1) == 1, op, "kv_a", "must have a contiguous last dimension, got strides ",
             kv_a_in.strides());
  const int64_t tokens = kv_a_in.size(0);
  DSV2_CHECK(tokens <= std::numeric_limits<int32_t>::max(), op, "kv_a", "has too many rows: ", tokens);

  check_same_device(op, "norm_weight", norm_weight, kv_a_in);
  const auto wt = norm_weight.scalar_type();
  DSV2_CHECK(wt == at::kBFloat16 || wt == at::kHalf || wt == at::kFloat, op, "norm_weight",
             "must have dtype bfloat16 or float16 or float32, got ", wt);
  DSV2_CHECK(norm_weight.dim() == 1 && norm_weight.size(0) == kKvRank, op, "norm_weight",
             "must have shape (512,), got ", norm_weight.sizes());
  DSV2_CHECK(norm_weight.is_contiguous(), op, "norm_weight", "must be contiguous, got strides ",
             norm_weight.strides());
  DSV2_CHECK(eps > 0, op, "eps", "must be > 0, got ", eps);

  check_index_tensor(op, "positions", positions, kv_a_in, tokens);
  check_same_device(op, "cos_sin_cache", cos_sin_cache, kv_a_in);
  check_dtype(op, "cos_sin_cache", cos_sin_cache, at::kFloat);
  DSV2_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == kRopeDim, op, "cos_sin_cache",
             "must have shape ('*', 64), got ", cos_sin_cache.sizes());
  DSV2_CHECK(cos_sin_cache.is_contiguous(), op, "cos_sin_cache", "must be contiguous, got strides ",
             cos_sin_cache.strides());
  // With no row every position is out of range; the kernel (which clamps positions) needs at least one.
  DSV2_CHECK(tokens == 0 || cos_sin_cache.size(0) > 0, op, "cos_sin_cache", "has no rows, but there are ", tokens,
             " positions to look up");
  check_index_tensor(op, "slot_mapping", slot_mapping, kv_a_in, tokens);

  check_same_device(op, "kv_cache", kv_cache, kv_a_in);
  const bool fp8 = kv_cache.scalar_type() == at::kFloat8_e4m3fn;
  DSV2_CHECK(kv_cache.scalar_type() == at::kBFloat16 || fp8, op, "kv_cache",
             "must have dtype bfloat16 or float8_e4m3fn, got ", kv_cache.scalar_type());
  DSV2_CHECK(kv_cache.dim() == 3 && kv_cache.size(2) == kKvDim, op, "kv_cache", "must have shape ('*', '*', 576), got ",
             kv_cache.sizes());
  DSV2_CHECK(kv_cache.is_contiguous(), op, "kv_cache", "must be contiguous, got strides ", kv_cache.strides());
  DSV2_CHECK(aligned16(kv_cache), op, "kv_cache", "must be 16-byte aligned for the CUDA kernel");
  const int64_t num_blocks = kv_cache.size(0), block_size = kv_cache.size(1);
  if (fp8) {
    DSV2_CHECK(kv_scale.has_value(), op, "kv_scale", "is required with a float8_e4m3fn kv_cache");
    check_same_device(op, "kv_scale", *kv_scale, kv_a_in);
    check_dtype(op, "kv_scale", *kv_scale, at::kFloat);
    DSV2_CHECK(kv_scale->dim() == 3 && kv_scale->size(0) == num_blocks && kv_scale->size(1) == block_size &&
                   kv_scale->size(2) == 2,
               op, "kv_scale", "must have shape (", num_blocks, ", ", block_size, ", 2), got ", kv_scale->sizes());
    DSV2_CHECK(kv_scale->is_contiguous(), op, "kv_scale", "must be contiguous, got strides ", kv_scale->strides());
  } else {
    DSV2_CHECK(!kv_scale.has_value(), op, "kv_scale", "must be None with a bfloat16 kv_cache");
  }

  // Same shapes/dtypes/strides as the fake impl.
  const auto opts = kv_a_in.options();
  at::Tensor c_out = return_normed ? at::empty({tokens, kKvRank}, opts) : at::empty({0}, opts);
  at::Tensor k_out = return_normed ? at::empty({tokens, kRopeDim}, opts) : at::empty({0}, opts);
  if (tokens == 0) return {c_out, k_out};

  const c10::cuda::CUDAGuard guard(kv_a_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // 16-byte vector access needs 16-byte aligned rows; anything else (a rare view) gets an aligned copy.
  at::Tensor kv_a = kv_a_in;
  if (!aligned16(kv_a) || (tokens > 1 && kv_a.stride(0) % 8 != 0)) kv_a = kv_a_in.clone(at::MemoryFormat::Contiguous);
  const at::Tensor weight = aligned16(norm_weight) ? norm_weight : norm_weight.clone();
  const at::Tensor cos_sin = aligned16(cos_sin_cache) ? cos_sin_cache : cos_sin_cache.clone();

  Params p;
  p.kv_a = reinterpret_cast<const __nv_bfloat16*>(kv_a.data_ptr());
  p.kv_stride = tokens > 1 ? kv_a.stride(0) : kKvDim;
  p.weight = weight.data_ptr();
  p.positions = positions.data_ptr();
  p.pos_stride = positions.stride(0);
  p.pos64 = positions.scalar_type() == at::kLong;
  p.slots = slot_mapping.data_ptr();
  p.slot_stride = slot_mapping.stride(0);
  p.slot64 = slot_mapping.scalar_type() == at::kLong;
  p.cos_sin = cos_sin.data_ptr<float>();
  p.max_pos = cos_sin.size(0);
  p.cache = reinterpret_cast<uint8_t*>(kv_cache.data_ptr());
  p.scale = fp8 ? kv_scale->data_ptr<float>() : nullptr;
  p.num_slots = num_blocks * block_size;
  p.c_out = return_normed ? reinterpret_cast<__nv_bfloat16*>(c_out.data_ptr()) : nullptr;
  p.k_out = return_normed ? reinterpret_cast<__nv_bfloat16*>(k_out.data_ptr()) : nullptr;
  p.tokens = tokens;
  p.eps = static_cast<float>(eps);

  const int device = kv_a.get_device();
  switch (wt) {
    case at::kBFloat16: launch<__nv_bfloat16>(p, fp8, device, stream); break;
    case at::kHalf: launch<__half>(p, fp8, device, stream); break;
    default: launch<float>(p, fp8, device, stream); break;
  }
  return {c_out, k_out};
}

}  // namespace dsv2
