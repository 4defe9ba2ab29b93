// Shared by the FP8 block-scaled GEMM entries (csrc/fp8/fp8_gemm*.cu): element and layout types, the per-group
// argument arrays of the grouped kernel, argument checks, and the activation-scale layout fix-up.
//
// This header is light on purpose (cute layouts only, no CUTLASS collectives): the grouped entries include it to
// fill the per-group arrays on the GPU, and only fp8_gemm.cu / fp8_grouped_gemm.cu instantiate a CUTLASS kernel
// (gemm_config.cuh).
#pragma once

#include "../common/torch_cuda.h"

#include <ATen/ops/empty_strided.h>

#include <cute/layout.hpp>
#include <cutlass/detail/blockwise_scale_layout.hpp>
#include <cutlass/numeric_types.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace dsv2 {
namespace fp8 {

constexpr int kBlock = 128;  // K group of the activation scales, N x K block of the weight scales, and K tile

using ElementA = cutlass::float_e4m3_t;  // activations [M, K], K contiguous
using ElementB = cutlass::float_e4m3_t;  // weights [N, K], K contiguous (CUTLASS: column-major K x N)
using ElementD = cutlass::bfloat16_t;    // output [M, N], N contiguous
using ElementAcc = float;

// Scales: A per 1 x 128 (M-major, the TMA-friendly column-major layout), B per 128 x 128 (K-major, contiguous).
using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, kBlock, kBlock, cute::GMMA::Major::MN,
                                                              cute::GMMA::Major::K>;
// Shapes : strides of the scale layouts (see make_layout_sfa / make_layout_sfb):
//   SFA ((1, M), (128, K/128), L) : ((0, 1), (0, ld), batch)
//   SFB ((128, N/128), (128, K/128), L) : ((0, K/128), (0, 1), N/128 * K/128)
using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

// Per-group strides of the ptr-array (grouped) kernel, [rows, K or N, L]: row stride, unit column stride, no batch.
using GroupStride = cute::Stride<int64_t, cute::Int<1>, cute::Int<0>>;
using GroupShape = cute::Shape<int, int, int>;  // (M, N, K) of one group

CUTE_HOST_DEVICE LayoutSFA make_layout_sfa(int m, int k_blocks, int ld) {
  using namespace cute;
  // The batch stride only has to be a valid 16-byte multiple for the TMA descriptor of the dense kernel (L = 1).
  const int64_t batch = static_cast<int64_t>(ld) * k_blocks;
  return make_layout(make_shape(make_shape(_1{}, m), make_shape(Int<kBlock>{}, k_blocks), 1),
                     make_stride(make_stride(_0{}, _1{}), make_stride(_0{}, ld), batch <= INT_MAX ? int(batch) : 0));
}

CUTE_HOST_DEVICE LayoutSFB make_layout_sfb(int n_blocks, int k_blocks) {
  using namespace cute;
  return make_layout(make_shape(make_shape(Int<kBlock>{}, n_blocks), make_shape(Int<kBlock>{}, k_blocks), 1),
                     make_stride(make_stride(_0{}, k_blocks), make_stride(_0{}, _1{}), n_blocks * k_blocks));
}

// The grouped kernel's per-group arguments, E entries each, carved out of one device buffer and filled on the GPU.
struct GroupArrays {
  GroupShape* shape;
  const ElementA** a;
  GroupStride* stride_a;
  const ElementB** b;
  GroupStride* stride_b;
  const float** sfa;
  LayoutSFA* layout_sfa;
  const float** sfb;
  LayoutSFB* layout_sfb;
  ElementD** d;
  GroupStride* stride_d;

  static constexpr size_t kAlign = 64;
  static size_t align(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }
  // Bytes for E groups, plus `extra` bytes in front for the caller's own scratch.
  static size_t bytes(int e, size_t extra) {
    return align(extra) + align(sizeof(GroupShape) * e) + 5 * align(sizeof(void*) * e) +
           3 * align(sizeof(GroupStride) * e) + align(sizeof(LayoutSFA) * e) + align(sizeof(LayoutSFB) * e);
  }
  static GroupArrays carve(void* base, int e, size_t extra) {
    char* p = static_cast<char*>(base) + align(extra);
    auto take = [&](size_t n) {
      char* q = p;
      p += align(n);
      return q;
    };
    GroupArrays g;
    g.shape = reinterpret_cast<GroupShape*>(take(sizeof(GroupShape) * e));
    g.a = reinterpret_cast<const ElementA**>(take(sizeof(void*) * e));
    g.b = reinterpret_cast<const ElementB**>(take(sizeof(void*) * e));
    g.sfa = reinterpret_cast<const float**>(take(sizeof(void*) * e));
    g.sfb = reinterpret_cast<const float**>(take(sizeof(void*) * e));
    g.d = reinterpret_cast<ElementD**>(take(sizeof(void*) * e));
    g.stride_a = reinterpret_cast<GroupStride*>(take(sizeof(GroupStride) * e));
    g.stride_b = reinterpret_cast<GroupStride*>(take(sizeof(GroupStride) * e));
    g.stride_d = reinterpret_cast<GroupStride*>(take(sizeof(GroupStride) * e));
    g.layout_sfa = reinterpret_cast<LayoutSFA*>(take(sizeof(LayoutSFA) * e));
    g.layout_sfb = reinterpret_cast<LayoutSFB*>(take(sizeof(LayoutSFB) * e));
    return g;
  }
};

// What every group shares; the build kernels add each group's row count and offsets.
struct GroupCommon {
  const ElementA* a;
  const ElementB* b;  // expert 0's weight [N, K]
  const float* sfa;   // column-major activation scales (column_major_scales()), K-block stride sfa_ld
  const float* sfb;   // [E, N/128, K/128] contiguous
  ElementD* d;        // output, rows of N contiguous
  int64_t lda, ldb, b_expert_stride;
  int sfa_ld, n, k;
};

// Group e: `m` rows at element offsets a_off (into a), sfa_off (into sfa; row r of a matrix is sfa[r]) and d_off
// (into d), times expert e's weight.
__device__ inline void write_group(const GroupArrays& g, const GroupCommon& c, int e, int m, int64_t a_off,
                                   int64_t sfa_off, int64_t d_off) {
  const int kb = c.k / kBlock, nb = c.n / kBlock;
  g.shape[e] = GroupShape(m, c.n, c.k);
  g.a[e] = c.a + a_off;
  g.b[e] = c.b + static_cast<int64_t>(e) * c.b_expert_stride;
  g.sfa[e] = c.sfa + sfa_off;
  g.sfb[e] = c.sfb + static_cast<int64_t>(e) * nb * kb;
  g.d[e] = c.d + d_off;
  g.stride_a[e] = GroupStride(c.lda, cute::Int<1>{}, cute::Int<0>{});
  g.stride_b[e] = GroupStride(c.ldb, cute::Int<1>{}, cute::Int<0>{});
  g.stride_d[e] = GroupStride(static_cast<int64_t>(c.n), cute::Int<1>{}, cute::Int<0>{});
  g.layout_sfa[e] = make_layout_sfa(m, kb, c.sfa_ld);
  g.layout_sfb[e] = make_layout_sfb(nb, kb);
}

// Run the grouped kernel over `num_groups` groups whose arrays a kernel queued earlier on `stream` fills. Groups of
// 0 rows are skipped. The workspace (TMA descriptors per SM) is allocated on `like`'s device; its size depends on the
// SM count only. Two instantiations, each compiled in its own translation unit:
//   * run_grouped_gemm: 128 x 128 cooperative tiles (fp8_grouped_gemm.cu), for groups of a few hundred rows or more;
//   * run_grouped_gemm_64: 64 x 128 ping-pong tiles (fp8_grouped_gemm_masked.cu), for small groups, where a 128-row
//     tile would compute many rows that do not exist.
void run_grouped_gemm(const GroupArrays& groups, int num_groups, const at::Tensor& like, cudaStream_t stream,
                      const char* op);
void run_grouped_gemm_64(const GroupArrays& groups, int num_groups, const at::Tensor& like, cudaStream_t stream,
                         const char* op);

// Our own grouped-contiguous kernel (fp8_grouped_gemm_contiguous_sm90.cu), the default; DSV2_FP8_GEMM_IMPL=cutlass
// runs CUTLASS's instead (read at every call, so one process can compare both): a [R, K] and b [E, N, K] TMA-ready (tma_rows), sa the
// column-major scales (column_major_scales), out [R, N] bf16. Returns false, having queued nothing, where the kernel
// does not apply (more experts than it keeps in shared memory); the caller then runs the CUTLASS kernel.
inline bool use_own_grouped_gemm() {
  const char* v = std::getenv("DSV2_FP8_GEMM_IMPL");
  return v == nullptr || std::strcmp(v, "cutlass") != 0;
}
bool run_grouped_contiguous_sm90(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                 const at::Tensor& b_scales, const at::Tensor& row_expert, const at::Tensor& out,
                                 cudaStream_t stream);

// ---- host-side checks, worded like dsv2_kernels/fp8.py -----------------------------------------------------------
inline void check_device(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& a) {
  DSV2_CHECK(t.device() == a.device(), op, arg, "must be on the same device as 'a' (", a.device(),
             "): all tensors must be on one device, got ", t.device());
}

// a [..., M, K], a_scales [..., M, K/128], b [(E,) N, K], b_scales [(E,) N/128, K/128]; returns N. `a` has already
// been checked for dtype and rank by the caller.
inline int64_t check_gemm_operands(const char* op, const at::Tensor& a, const at::Tensor& a_scales,
                                   const at::Tensor& b, const at::Tensor& b_scales, bool batched_b) {
  DSV2_CHECK(a.size(-1) <= 1 || a.stride(-1) == 1, op, "a", "must have a contiguous last dimension, got strides ",
             a.strides());
  DSV2_CHECK(b.scalar_type() == at::kFloat8_e4m3fn, op, "b", "must have dtype float8_e4m3fn, got ",
             b.scalar_type());
  const int64_t b_dims = batched_b ? 3 : 2;
  DSV2_CHECK(b.dim() == b_dims, op, "b", "must have ", b_dims, " dimensions, got shape ", b.sizes());
  DSV2_CHECK(b.size(-1) <= 1 || b.stride(-1) == 1, op, "b", "must have a contiguous last dimension, got strides ",
             b.strides());
  const int64_t k = a.size(-1);
  DSV2_CHECK(k > 0 && k % kBlock == 0, op, "a", "must have K (last dimension) a positive multiple of 128, got ", k);
  const int64_t n = b.size(-2);
  DSV2_CHECK(b.size(-1) == k, op, "b", "must have K = ", k, " (that of 'a') as its last dimension, got shape ",
             b.sizes());
  DSV2_CHECK(n > 0 && n % kBlock == 0, op, "b", "must have N a positive multiple of 128, got shape ", b.sizes());

  DSV2_CHECK(a_scales.scalar_type() == at::kFloat, op, "a_scales", "must have dtype float32, got ",
             a_scales.scalar_type());
  std::vector<int64_t> want(a.sizes().begin(), a.sizes().end());
  want.back() = k / kBlock;
  DSV2_CHECK(a_scales.dim() == a.dim(), op, "a_scales", "must have ", a.dim(), " dimensions, got shape ",
             a_scales.sizes());
  DSV2_CHECK(a_scales.sizes() == at::IntArrayRef(want), op, "a_scales", "must have shape ", at::IntArrayRef(want),
             ", got ", a_scales.sizes());
  const int64_t rows = a_scales.size(-2), groups = a_scales.size(-1);
  const bool row_major = groups <= 1 || a_scales.stride(-1) == 1;
  const bool col_major = rows <= 1 || a_scales.stride(-2) == 1;
  DSV2_CHECK(row_major || col_major, op, "a_scales",
             "must be row-major (stride[-1] == 1) or column-major (stride[-2] == 1), got strides ",
             a_scales.strides());

  DSV2_CHECK(b_scales.scalar_type() == at::kFloat, op, "b_scales", "must have dtype float32, got ",
             b_scales.scalar_type());
  std::vector<int64_t> want_b;
  if (batched_b) want_b.push_back(b.size(0));
  want_b.push_back(n / kBlock);
  want_b.push_back(k / kBlock);
  DSV2_CHECK(b_scales.sizes() == at::IntArrayRef(want_b), op, "b_scales", "must have shape ",
             at::IntArrayRef(want_b), ", got ", b_scales.sizes());
  DSV2_CHECK(b_scales.is_contiguous(), op, "b_scales", "must be contiguous, got strides ", b_scales.strides(),
             " for shape ", b_scales.sizes());
  return n;
}


// Activation scales [..., M, KB] in the layout the kernels read: column-major per matrix (stride 1 along M) with a
// K-block stride `ld` that is a multiple of 4 floats and a 16-byte aligned base, so the dense kernel can load them
// with TMA. Scales that already qualify (quant_per_token_group(column_major_scales=True) output) are used in place;
// row-major ones are transposed into a fresh column-major buffer (M * K/128 floats, a few microseconds at most,
// against a GEMM of M * N * K).
inline at::Tensor column_major_scales(const at::Tensor& s) {
  const int64_t m = s.size(-2), kb = s.size(-1);
  const bool m_ok = m <= 1 || s.stride(-2) == 1;
  const bool ld_ok = kb <= 1 || (s.stride(-1) > 0 && s.stride(-1) % 4 == 0);
  if (m_ok && ld_ok && aligned16(s.data_ptr())) return s;
  const int64_t m_pad = (m + 3) / 4 * 4;
  std::vector<int64_t> strides(s.dim());
  strides[s.dim() - 2] = 1;
  strides[s.dim() - 1] = m_pad;
  int64_t batch = kb * m_pad;
  for (int64_t i = s.dim() - 3; i >= 0; --i) {
    strides[i] = batch;
    batch *= s.size(i);
  }
  at::Tensor out = at::empty_strided(s.sizes(), strides, s.options());
  out.copy_(s);
  return out;
}

// The K-block stride of scales from column_major_scales(). With a single K block it is never followed: any nonzero
// multiple of 4 keeps the TMA descriptor valid.
inline int scales_ld(const at::Tensor& s) {
  const int64_t m = s.size(-2), kb = s.size(-1);
  return static_cast<int>(kb <= 1 ? (std::max<int64_t>(m, 1) + 3) / 4 * 4 : s.stride(-1));
}

// Operands the TMA unit can read: 16-byte aligned base and row stride. Anything else is copied (never the case for
// tensors made by the quantizers; K is a multiple of 128, so a contiguous copy always qualifies).
inline at::Tensor tma_rows(const at::Tensor& t) {
  const int64_t rows = t.size(-2);
  bool ok = aligned16(t.data_ptr()) && (rows <= 1 || t.stride(-2) % 16 == 0);
  if (t.dim() == 3) ok = ok && (t.size(0) <= 1 || t.stride(0) % 16 == 0);
  // clone, not contiguous(): a contiguous tensor at a misaligned address must be copied too (contiguous() would
  // return it as it is, and TMA descriptor creation fails on its base address).
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// The shared part of the grouped entries' GroupCommon: a [.., rows, K], b [E, N, K], scales already prepared.
inline GroupCommon group_common(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                const at::Tensor& sb, const at::Tensor& out) {
  GroupCommon c;
  c.a = reinterpret_cast<const ElementA*>(a.data_ptr());
  c.b = reinterpret_cast<const ElementB*>(b.data_ptr());
  c.sfa = sa.data_ptr<float>();
  c.sfb = sb.data_ptr<float>();
  c.d = reinterpret_cast<ElementD*>(out.data_ptr());
  c.k = static_cast<int>(a.size(-1));
  c.n = static_cast<int>(b.size(1));
  c.lda = a.size(-2) > 1 ? a.stride(-2) : c.k;  // a 1-row matrix may carry any row stride; TMA wants a valid one
  c.ldb = b.stride(1);
  c.b_expert_stride = b.stride(0);
  c.sfa_ld = scales_ld(sa);
  return c;
}

}  // namespace fp8
}  // namespace dsv2
