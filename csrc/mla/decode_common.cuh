// Shared pieces of the MLA decode kernels (decode_metadata.cu, decode_attention.cu, decode_combine.cu): the
// parameter block, the split-KV schedule layout, the shared-memory plan, and the sm_90a primitives the main kernel is
// built from (cp.async, wgmma and its shared-memory descriptors).
//
// Shared-memory tile format (Q, bf16 KV tiles, P): a [64 rows x D] bf16 tile is stored as D/64 column blocks of 8 KB;
// in a block, row r occupies 128 bytes at r * 128 and its 16-byte chunk c sits at chunk c ^ (r % 8) (the 128-byte
// swizzle of wgmma, which makes both the K-major and the MN-major reading of the tile bank-conflict free). Blocks are
// 1024-byte aligned, as the swizzle pattern is computed from absolute address bits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "../common/pdl.cuh"
#include "../common/sm90.cuh"

namespace dsv2 {
namespace mla_decode {

constexpr int kKvDim = 576;     // one latent-cache row: c_kv (512) | k_pe (64)
constexpr int kVDim = 512;      // values: the first 512 columns
constexpr int kBlockM = 64;     // query rows (s_q x heads of one sequence, padded) per CTA: one wgmma M
constexpr int kBlockN = 64;     // KV tokens per tile
constexpr int kThreads = 256;   // two (consumer) warpgroups; each owns 256 of the 512 output columns
// e4m3 cache: a third warpgroup (the producer) streams and converts the KV tiles.
template <bool kFp8>
constexpr int kCtaThreads = kFp8 ? 384 : 256;
// Register split after setmaxnreg: the producer holds one e4m3 tile in flight (72 registers; it spills at 88), the
// consumers the 64 x 256 fp32 accumulator and S (no spill down to 192). 128 x 104 + 256 x 200 = 384 x 168 (what a
// 384-thread launch is allocated).
constexpr int kProducerRegs = 104, kConsumerRegs = 200;
static_assert(128 * kProducerRegs + 256 * kConsumerRegs <= 384 * 168, "register reallocation exceeds the budget");
constexpr int kColBlockBytes = 64 * 128;                   // 64 rows x 64 bf16
constexpr int kTileBytes = kBlockN * kKvDim * 2;           // 73,728: a bf16 Q or KV tile (9 column blocks)
constexpr int kScaleTileBytes = kBlockN * 2 * 4;           // 512: per-token scale factors of an e4m3 tile
// Fixed cost of one split, in KV tiles (loading Q, writing the fp32 partial, combining it): the scheduler charges it
// per sequence so that many short sequences are not spread thinner than they are worth.
constexpr int kSplitOverhead = 4;
constexpr int kSchedInts = 4;  // per CTA part: {first batch, first tile in it, tile count, split index of the first}

// Shared memory plan (byte offsets from a 1024-aligned base; 1 KB of slack is requested for the alignment): Q, two
// bf16 KV stages, P, per-row softmax state. The e4m3 cache adds per-token scale factors for each stage, the output's
// power-of-two factor sigma (kSig) and four mbarriers (full[2], empty[2]) between the producer and the consumers; its
// Q, KV stages and P hold f16 (see decode_attention.cu).
template <bool kFp8>
struct Smem;
template <>
struct Smem<false> {
  static constexpr int kQ = 0, kKV = kTileBytes, kP = 3 * kTileBytes, kRow = kP + kColBlockBytes;
  static constexpr int kScale = 0, kSig = 0, kBar = 0;  // unused
  static constexpr int kBytes = kRow + 3 * kBlockM * 4;
};
template <>
struct Smem<true> {
  static constexpr int kQ = 0, kKV = kTileBytes, kP = 3 * kTileBytes, kScale = kP + kColBlockBytes,
                       kRow = kScale + 2 * kScaleTileBytes, kSig = kRow + 3 * kBlockM * 4, kBar = kSig + 16;
  static constexpr int kBytes = kBar + 4 * 8;
};
constexpr int kSmemSlack = 1024;
static_assert(Smem<false>::kBytes + kSmemSlack <= 232448 && Smem<true>::kBytes + kSmemSlack <= 232448,
              "the H100/H200 per-block shared memory limit is 227 KB");

struct DecodeParams {
  const __nv_bfloat16* q;  // [B, s_q, H, 576]; row r = i * H + h of batch b at q + b*q_sb + i*q_ss + h*q_sh
  int64_t q_sb, q_ss, q_sh;
  const uint8_t* kv;       // [num_blocks * block_size, 576] bf16 or e4m3
  const float* kv_scale;   // [num_blocks * block_size, 2] (e4m3 only)
  const int* block_table;  // [B, bt_stride...]
  int64_t bt_stride;
  const int* seqlens;      // [B]
  __nv_bfloat16* out;      // [B, s_q * H, 512]
  float* lse;              // [B, H, s_q]
  float* o_part;           // [partial slots, s_q * H, 512]: per-split normalized outputs
  float* lse_part;         // [partial slots, s_q * H]: per-split lse, -inf when the split saw no key
  const int* sched;        // [parts, kSchedInts]
  const int* nsplit;       // [B]: splits of each sequence (0: empty sequence)
  const int* cu_partial;   // [B + 1]: first partial slot of each sequence with >= 2 splits
  int batch, s_q, heads, rows, block_size, num_blocks;
  int max_len;             // lengths are clamped to [0, max_len] (max_len = table width * block_size, or 0)
  int causal;
  float scale_log2;        // softmax_scale * log2(e)
};

// The int32 workspace written by the scheduler: offsets (in ints) of its arrays. tile_prefix and cost_prefix are its
// scratch where they do not fit its shared memory (large batches).
struct SchedLayout {
  int64_t sched, nsplit, cu_partial, tile_prefix, cost_prefix, total;
  __host__ __device__ SchedLayout(int batch, int parts) {
    sched = 0;
    nsplit = sched + int64_t(parts) * kSchedInts;
    cu_partial = nsplit + batch;
    tile_prefix = cu_partial + batch + 1;
    cost_prefix = tile_prefix + batch + 1;
    total = cost_prefix + batch + 1;
  }
};

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// A sequence's length as the kernels use it: clamped, so that no input value can make them read past the block table.
__device__ __forceinline__ int clamp_len(int len, int max_len) { return min(max(len, 0), max_len); }

// ---- host launchers of the helper kernels (decode_metadata.cu, decode_combine.cu) ----
void launch_decode_metadata(const int* seqlens, int batch, int max_len, int parts, int* ws, cudaStream_t stream);
// Combine: `programmatic` launches it as a programmatic dependent of the main kernel (common/pdl.cuh).
void launch_decode_combine(const DecodeParams& p, bool programmatic, cudaStream_t stream);
// The narrow main kernel (decode_attention_narrow.cu) for s_q * H <= kNarrowMaxRows: grid = `parts` CTAs, one row
// block; same schedule, outputs and partials as the 64-row kernel; `programmatic` as for the 64-row kernel.
constexpr int kNarrowMaxRows = 32;
void launch_decode_narrow(const DecodeParams& p, bool fp8, int parts, bool programmatic, cudaStream_t stream);

// ---- sm_90a primitives -------------------------------------------------------------------------------------------
// The generic ones live in common/sm90.cuh. smem_desc: Q, K and P are read K-major, V MN-major ([tokens x dims],
// 64-column blocks `lbo` bytes apart).
using sm90::fence_proxy_async;
using sm90::fence_regs;
using sm90::smem_desc;
using sm90::smem_u32;
using sm90::wgmma_commit;
using sm90::wgmma_fence;
using sm90::wgmma_wait;

// 16-byte global->shared copy; with ok == false nothing is read and the destination is zero-filled.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_8(uint32_t dst, const void* src, bool ok) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 8 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void st_shared_b32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ void st_shared_b16(uint32_t addr, __nv_bfloat16 v) {
  asm volatile("st.shared.b16 [%0], %1;\n" ::"r"(addr), "h"(__bfloat16_as_ushort(v)) : "memory");
}
__device__ __forceinline__ void st_shared_b16(uint32_t addr, __half v) {
  asm volatile("st.shared.b16 [%0], %1;\n" ::"r"(addr), "h"(__half_as_ushort(v)) : "memory");
}
__device__ __forceinline__ void st_shared_v4(uint32_t addr, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}

__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr)
               : "memory");
  return v;
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t pack_f16x2(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// 2^e as an fp32 bit pattern (exact; e in [-126, 127]): the e4m3 kernels' power-of-two factors.
__device__ __forceinline__ float pow2f(int e) { return __int_as_float((127 + e) << 23); }
// E = floor(log2 smax) of a tile's largest per-token scale (>= 0: the exponent field), clamped to [-100, 127] so that
// the e4m3 kernels' per-tile sigma = 2^(E + const) and its inverse stay normal fp32 (zero scales give -100).
__device__ __forceinline__ int sigma_exponent(float smax) {
  return min(max(((__float_as_int(smax) >> 23) & 0xFF) - 127, -100), 127);
}
// log2 of sigma_prev / sigma (clamped to pow2f's range): pow2f of it moves O from the previous tile's sigma units to
// this one's.
__device__ __forceinline__ int sigma_shift(int e_prev, int e) { return min(max(e_prev - e, -126), 127); }

// The power of two 2^e that moves a query row whose max |q| is mx into f16's range for the e4m3 kernels' f16 MMAs: mx
// 2^e in [2^14, 2^15). e <= 100 keeps 2^-e (and its product with the softmax scale) a normal fp32, for rows whose max
// is below 2^-86 (they then just use less of f16's range). Zero and infinite rows keep e = 0.
__device__ __forceinline__ int f16_row_exponent(float mx) {
  if (!(mx > 0.f && mx <= 3.4028234663852886e38f)) return 0;
  // floor(log2 mx) from the exponent field (subnormal maxima scaled into the normal range first).
  const int fl = mx >= 1.17549435e-38f ? ((__float_as_int(mx) >> 23) & 0xFF) - 127
                                       : ((__float_as_int(mx * 18446744073709551616.f) >> 23) & 0xFF) - 191;
  return min(14 - fl, 100);
}

// Four e4m3 values (little-endian in w) -> four f16 (two f16x2, low value in the low half), exactly: e4m3 is a subset
// of f16 (every finite e4m3 value, subnormals included, is a normal f16 or zero), one cvt per pair.
__device__ __forceinline__ uint2 e4m3x4_to_f16x4(uint32_t w) {
  uint32_t lo, hi;
  asm("{\n.reg .b16 l, h;\n"
      "mov.b32 {l, h}, %2;\n"
      "cvt.rn.f16x2.e4m3x2 %0, l;\n"
      "cvt.rn.f16x2.e4m3x2 %1, h;\n}\n"
      : "=r"(lo), "=r"(hi)
      : "r"(w));
  return make_uint2(lo, hi);
}

// Four e4m3 values -> four bf16 equal to the e4m3 values times 2^-112, exactly: through f16 (above), then moving the
// f16 exponent field (bias 15) and mantissa unchanged into the bf16 fields (bias 127) is exact too and divides by
// 2^112 (no rounding, no multiply; callers fold 2^112 into their fp32 scales).
// The e4m3 NaN code becomes a finite value: the cache writer saturates, so it never stores one.
__device__ __forceinline__ uint2 e4m3x4_to_bf16x4_pow2(uint32_t w) {
  uint2 v = e4m3x4_to_f16x4(w);
  v.x = ((v.x & 0x7FF87FF8u) >> 3) | (v.x & 0x80008000u);
  v.y = ((v.y & 0x7FF87FF8u) >> 3) | (v.y & 0x80008000u);
  return v;
}

// D[64 x 64] (+)= A[64 x 16] * B[16 x 64], A and B K-major in shared memory; scale_d == 0 overwrites D. Operands bf16
// or (kF16) f16.
#define DSV2_WGMMA_M64N64K16_SS(T) \
  asm volatile( \
      "{\n.reg .pred p;\n" \
      "setp.ne.b32 p, %34, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." T "." T " {" \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31" \
      "}, %32, %33, p, 1, 1, 0, 0;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d))
template <bool kF16 = false>
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  if constexpr (kF16) DSV2_WGMMA_M64N64K16_SS("f16");
  else DSV2_WGMMA_M64N64K16_SS("bf16");
}
#undef DSV2_WGMMA_M64N64K16_SS

// D[64 x 256] (+)= A[64 x 16] * B[16 x 256], A K-major, B MN-major (trans-b) in shared memory; bf16 or (kF16) f16.
#define DSV2_WGMMA_M64N256K16_SS_TB(T) \
  asm volatile( \
      "{\n.reg .pred p;\n" \
      "setp.ne.b32 p, %130, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." T "." T " {" \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127" \
      "}, %128, %129, p, 1, 1, 0, 1;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127]) \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d))
template <bool kF16 = false>
__device__ __forceinline__ void wgmma_m64n256k16_ss_tb(float (&d)[128], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  if constexpr (kF16) DSV2_WGMMA_M64N256K16_SS_TB("f16");
  else DSV2_WGMMA_M64N256K16_SS_TB("bf16");
}
#undef DSV2_WGMMA_M64N256K16_SS_TB

// D[64 x N] (+)= A[64 x 16] * B[16 x N] for the narrow decode kernels (N = 16 or 32 query rows), bf16, both operands
// in shared memory, B K-major; A K-major (kTransA = 0: the K tile for S^T = K Q^T) or MN-major (kTransA = 1: the V
// tile read as V^T for O^T = V^T P^T); fp32 accumulation.
template <int kTransA>
__device__ __forceinline__ void wgmma_m64n16k16_ss(float (&d)[8], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7"
      "}, %8, %9, p, 1, 1, %11, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA));
}
template <int kTransA>
__device__ __forceinline__ void wgmma_m64n32k16_ss(float (&d)[16], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
      "}, %16, %17, p, 1, 1, %19, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA));
}
template <int kN, int kTransA>
__device__ __forceinline__ void wgmma_m64nNk16_ss(float (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  static_assert(kN == 16 || kN == 32, "narrow wgmma: N = 16 or 32");
  if constexpr (kN == 16) wgmma_m64n16k16_ss<kTransA>(d, desc_a, desc_b, scale_d);
  else wgmma_m64n32k16_ss<kTransA>(d, desc_a, desc_b, scale_d);
}

// D[64 x N] (+)= A[64 x 16] * B[16 x N] (N = 16 or 32), f16 in, fp32 accumulation; A from registers (four f16x2
// per thread in the fragment layout a0 = (row r, k 2q..2q+1), a1 = (r + 8, same k), a2 = (r, k + 8), a3 = (r + 8,
// k + 8), r = 16 warp + lane / 4, q = lane % 4), B K-major in shared memory. The pipelined e4m3 kernel: its fragments
// are e4m3 codes converted in registers (exact in f16).
__device__ __forceinline__ void wgmma_m64n16k16_rs_f16(float (&d)[8], const uint32_t (&a)[4], uint64_t desc_b,
                                                       int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %13, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7"
      "}, {%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
}
__device__ __forceinline__ void wgmma_m64n32k16_rs_f16(float (&d)[16], const uint32_t (&a)[4], uint64_t desc_b,
                                                       int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %21, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
      "}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
}
// Per-warp MMA (no warpgroup coupling): D[16 x 8] += A[16 x 16] * B[16 x 8], f16 in, fp32 accumulation. A has the
// same per-warp fragment layout as the m64nNk16 wgmma's register A (rows g, g + 8 with g = lane / 4); B: b0 = (k 2q,
// 2q + 1; n g), b1 = (k 2q + 8, 2q + 9; n g); D: d0, d1 = (row g, n 2q, 2q + 1), d2, d3 = (row g + 8, same n), i.e.
// the wgmma accumulator's registers 4 nb .. 4 nb + 3 of n-block nb.
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Four 8 x 8 b16 matrices from shared memory: lane l gives the address of row l % 8 of matrix l / 8; register i of
// lane (g, q) receives elements 2q, 2q + 1 of row g of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
template <int kN>
__device__ __forceinline__ void wgmma_m64nNk16_rs_f16(float (&d)[kN / 2], const uint32_t (&a)[4], uint64_t desc_b,
                                                      int scale_d) {
  static_assert(kN == 16 || kN == 32, "narrow wgmma: N = 16 or 32");
  if constexpr (kN == 16) wgmma_m64n16k16_rs_f16(d, a, desc_b, scale_d);
  else wgmma_m64n32k16_rs_f16(d, a, desc_b, scale_d);
}

}  // namespace mla_decode
}  // namespace dsv2
