// KV-side device pieces shared by the two MLA decode kernels (decode_attention.cu: 64 query rows per CTA;
// decode_attention_narrow.cu: H * s_q <= 32 rows, transposed MMAs): the run cursor over a CTA part's tiles, the paged
// row lookup, the bf16 tile and Q loads into the swizzled shared layout, the e4m3 producer warpgroups that stream raw
// rows and convert them into 16-bit stages (f16 for the 64-row kernel, bf16 for the one-stage narrow one; see
// store_fp8_row for the scale folding they rely on), and the raw-ring producer of the pipelined narrow e4m3 kernel
// (its consumers convert in registers).
#pragma once

#include "decode_common.cuh"
#include "prefill_common.cuh"  // mbarriers

namespace dsv2 {
namespace mla_decode {

// Position of the CTA in its part's run of tiles: sequence b, tile t in it, and the sequence's length and tile count.
struct Cursor {
  int b, t, len, n;
  __device__ void set(const DecodeParams& p, int b_, int t_) {
    b = b_;
    t = t_;
    len = clamp_len(__ldg(p.seqlens + b), p.max_len);
    n = ceil_div(len, kBlockN);
  }
  // Next tile of the run, skipping empty sequences (which the schedule gives no tiles).
  __device__ void advance(const DecodeParams& p) {
    if (++t < n) return;
    t = 0;
    len = 0;
    while (++b < p.batch) {
      len = clamp_len(__ldg(p.seqlens + b), p.max_len);
      if (len > 0) break;
    }
    n = ceil_div(len, kBlockN);
  }
};

// Cache row of token `tok` of sequence b. Page indices are clamped into the cache: with value checks off, a bad
// block-table entry gives a wrong answer, never an out-of-bounds read.
__device__ __forceinline__ int64_t cache_row(const DecodeParams& p, int b, int tok) {
  const int page = __ldg(p.block_table + b * p.bt_stride + tok / p.block_size);
  return static_cast<int64_t>(min(max(page, 0), p.num_blocks - 1)) * p.block_size + tok % p.block_size;
}

// One 576-column bf16 row into the swizzled shared layout (column blocks `cb_bytes` apart: 8 KB for 64-row tiles,
// N * 128 for the narrow kernel's N-row Q): 8 threads per row, one 128-byte segment per instruction, one row per
// 8-lane shared-memory phase (conflict-free).
__device__ __forceinline__ void load_rows_bf16(uint32_t dst, const uint8_t* src, bool ok, int row,
                                               int cb_bytes = kColBlockBytes) {
  const int sub = threadIdx.x & 7;
  const uint32_t d = dst + row * 128 + ((sub ^ (row & 7)) << 4);
#pragma unroll
  for (int k = 0; k < 9; ++k) cp_async_16(d + k * cb_bytes, src + (k * 8 + sub) * 16, ok);
}

// Q row r (= i * H + h, zero-filled when r >= p.rows) of sequence b into shared row `row`.
__device__ __forceinline__ void load_q_row(const DecodeParams& p, uint32_t dst, int b, int r, int row,
                                           int cb_bytes = kColBlockBytes) {
  const bool ok = r < p.rows;
  const int i = r / p.heads, h = r - i * p.heads;
  const __nv_bfloat16* src = ok ? p.q + b * p.q_sb + i * p.q_ss + h * p.q_sh : p.q;
  load_rows_bf16(dst, reinterpret_cast<const uint8_t*>(src), ok, row, cb_bytes);
}

// A [64 x 576] bf16 KV tile by 256 threads (32 rows per pass); tokens past the sequence end are zero-filled, never
// read (unused pages may hold NaN).
__device__ __forceinline__ void load_kv_bf16(const DecodeParams& p, uint32_t dst, const Cursor& c) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = (threadIdx.x >> 3) + 32 * half, tok = c.t * kBlockN + row;
    const bool ok = tok < c.len;
    const uint8_t* src = p.kv + (ok ? cache_row(p, c.b, tok) * (kKvDim * 2) : 0);
    load_rows_bf16(dst, src, ok, row);
  }
}

// A [64 x 576] bf16 KV tile by the 128 threads of one warpgroup (bf16 schedule of both kernels: warpgroup 1, idle
// during QK and the softmax, loads alone), in two steps so that the block-table lookups run a tile ahead of the
// copies: kv_rows_wg resolves this thread's 4 cache rows (kNoRow past the sequence end), load_kv_rows_wg issues the
// 36 cp.async. A row index fits 32 bits: a cache of 2^32 - 1 rows of 1,152 bytes would not fit in any GPU's memory.
constexpr uint32_t kNoRow = 0xFFFFFFFFu;
// Branch-free, so that the 4 block-table loads are in flight together (a per-row branch made them 4 serialized L2
// round trips): rows past the end look up the sequence's last token (a tile has at least one) and are then dropped.
__device__ __forceinline__ void kv_rows_wg(const DecodeParams& p, const Cursor& c, uint32_t (&rows)[4]) {
  int64_t cr[4];
#pragma unroll
  for (int qt = 0; qt < 4; ++qt) {
    const int tok = c.t * kBlockN + ((threadIdx.x & 127) >> 3) + 16 * qt;
    cr[qt] = cache_row(p, c.b, min(tok, c.len - 1));
  }
#pragma unroll
  for (int qt = 0; qt < 4; ++qt) {
    const int tok = c.t * kBlockN + ((threadIdx.x & 127) >> 3) + 16 * qt;
    rows[qt] = tok < c.len ? static_cast<uint32_t>(cr[qt]) : kNoRow;
  }
}
__device__ __forceinline__ void load_kv_rows_wg(const DecodeParams& p, uint32_t dst, const uint32_t (&rows)[4]) {
#pragma unroll
  for (int qt = 0; qt < 4; ++qt) {
    const bool ok = rows[qt] != kNoRow;
    load_rows_bf16(dst, p.kv + (ok ? static_cast<int64_t>(rows[qt]) * (kKvDim * 2) : 0), ok,
                   ((threadIdx.x & 127) >> 3) + 16 * qt);
  }
}
// The bf16 schedule of both kernels around those two steps. bf16_first_tile: tile 0 into stage 0 by all threads (one
// cp.async group with the Q loads, committed by the caller), `ld` moved past it, and warpgroup 1 resolves tile 1's
// rows. bf16_next_tile (warpgroup 1, right after the top barrier of tile k, which proves stage (k + 1) & 1 free):
// tile k + 1 into that stage from the rows resolved a tile earlier, then tile k + 2's rows, whose latency falls into
// tile k's Q K^T and softmax; one cp.async group per tile, empty past the end.
__device__ __forceinline__ void bf16_first_tile(const DecodeParams& p, uint32_t kv0, Cursor& ld, int wg, int count,
                                                uint32_t (&rows)[4]) {
  load_kv_bf16(p, kv0, ld);
  ld.advance(p);
  if (wg == 1 && count > 1) kv_rows_wg(p, ld, rows);
}
__device__ __forceinline__ void bf16_next_tile(const DecodeParams& p, uint32_t kv0, Cursor& ld, int k, int count,
                                               uint32_t (&rows)[4]) {
  if (k + 1 < count) {
    load_kv_rows_wg(p, kv0 + ((k + 1) & 1) * kTileBytes, rows);
    ld.advance(p);
    if (k + 2 < count) kv_rows_wg(p, ld, rows);
  }
  cp_async_commit();
}

// ---- e4m3 cache: producer warpgroup -------------------------------------------------------------------------------
// Per-token factors of an e4m3 tile (float2 per token, in the stage's scale slot): r = s_pe / s_c scales the k_pe
// part of a score relative to the c_kv part, f scales S and P for that token. Two stage formats (store_fp8_row):
//   * f16 (the 64-row kernel): the e4m3 codes as f16 (exact), f = s_c; its consumers run f16 MMAs with Q and P moved
//     into f16's range by power-of-two factors (decode_attention.cu);
//   * bf16 (the one-stage narrow kernel): e4m3 * 2^-112 (e4m3x4_to_bf16x4_pow2), f = s_c * 2^56, so S = (acc_c + r
//     acc_pe) f carries a factor 2^-56 (folded into the log2 scale) and O = sum P f V carries 2^-56 (folded into the
//     final 1 / l).
// Tokens past the sequence end get {0, 0}.
constexpr float kPow56 = 72057594037927936.f;  // 2^56

// One producer thread's share of a token row: 16 bytes of each 64-byte column group (9 x 16 bytes, raw e4m3), and the
// token's two scales.
struct Fp8RowPart {
  uint4 w[9];
  float2 sc;
};

__device__ __forceinline__ uint4 ld_stream_16(const uint8_t* src) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(src));
  return v;
}

// 4 threads per token row (64 contiguous bytes per row and instruction: whole sectors); cache row cr (kNoRow: a token
// past the sequence end, zeros).
__device__ __forceinline__ void load_fp8_row(const DecodeParams& p, Fp8RowPart& h, uint32_t cr, int sub) {
  if (cr != kNoRow) {
    const uint8_t* src = p.kv + static_cast<int64_t>(cr) * kKvDim + sub * 16;
#pragma unroll
    for (int k = 0; k < 9; ++k) h.w[k] = ld_stream_16(src + k * 64);
    h.sc = __ldg(reinterpret_cast<const float2*>(p.kv_scale) + cr);
  } else {
#pragma unroll
    for (int k = 0; k < 9; ++k) h.w[k] = make_uint4(0, 0, 0, 0);
    h.sc = make_float2(0.f, 0.f);
  }
}

// A thread's converted part of a row into the swizzled 16-bit stage (f16 codes with kF16, else bf16 e4m3 * 2^-112; see
// above): 16 raw bytes (columns 64k + 16 sub ..) become chunks 2 sub and 2 sub + 1 of column block k. A warp covers 8
// consecutive rows: each 8-lane phase writes two rows x 4 even (or odd) chunks, 8 distinct 16-byte bank groups after
// the swizzle.
template <bool kF16>
__device__ __forceinline__ void store_fp8_row(const Fp8RowPart& h, uint32_t dst, uint32_t dst_scale, int row, int sub) {
  const uint32_t r = dst + row * 128;
  const int x = row & 7;
  auto cvt = [](uint32_t w) { return kF16 ? e4m3x4_to_f16x4(w) : e4m3x4_to_bf16x4_pow2(w); };
#pragma unroll
  for (int k = 0; k < 9; ++k) {
    const uint2 a = cvt(h.w[k].x), b = cvt(h.w[k].y);
    const uint2 c = cvt(h.w[k].z), d = cvt(h.w[k].w);
    st_shared_v4(r + k * kColBlockBytes + (((2 * sub) ^ x) << 4), a.x, a.y, b.x, b.y);
    st_shared_v4(r + k * kColBlockBytes + (((2 * sub + 1) ^ x) << 4), c.x, c.y, d.x, d.y);
  }
  if (sub == 0) {
    // Scales are positive by construction (amax floored); a zero c_kv scale (not a cache the writer produces)
    // gives r = 0 rather than inf.
    const float rr = h.sc.x > 0.f ? h.sc.y / h.sc.x : 0.f;
    asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(dst_scale + row * 8), "f"(rr),
                 "f"(kF16 ? h.sc.x : h.sc.x * kPow56)
                 : "memory");
  }
}

// The e4m3 stage mbarriers, kStages of each kind 8 bytes apart: full[s] (the producer's 128 threads arrive: stage s
// converted), empty[s] (all kThreads consumer threads arrive: stage s read). Initialized by thread 0 and published by
// the last CTA-wide barrier of the kernel: the consumers then sync among themselves (named barrier 1) while the
// producer runs ahead.
template <int kStages>
__device__ __forceinline__ void init_fp8_stage_barriers(uint32_t bar_full, uint32_t bar_empty) {
  if (threadIdx.x == 0) {
#pragma unroll
    for (int st = 0; st < kStages; ++st) {
      mla_prefill::mbar_init(bar_full + 8 * st, 128);
      mla_prefill::mbar_init(bar_empty + 8 * st, kThreads);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
}

// One thread's part of row `row` of every tile of a run, for the 64-row kernel's producer (f16 stages): the part of
// tile j + 1 is loaded into registers as soon as tile j's is stored, and its cache row was resolved one tile earlier
// still, so that no block-table round trip sits between a conversion and the next load. (The profile showed ~6 % of
// the producer's stall samples on those lookups; this alone measured no change, 452 us at H=128 s_k=4096.) The
// producer's two streams advance identical cursors: a shared cursor would save one advance per tile, not measured.
struct Fp8RowStream {
  Fp8RowPart h;
  uint32_t next_row;  // cache row of the tile after the one in h
  Cursor ld;          // that tile
  int row, sub;
  __device__ __forceinline__ uint32_t lookup(const DecodeParams& p) const {
    const int tok = ld.t * kBlockN + row;
    return tok < ld.len ? static_cast<uint32_t>(cache_row(p, ld.b, tok)) : kNoRow;
  }
  // Tile 0 of the run at c (count >= 1) into h.
  __device__ __forceinline__ void start(const DecodeParams& p, const Cursor& c, int count, int row_, int sub_) {
    row = row_;
    sub = sub_;
    ld = c;
    load_fp8_row(p, h, lookup(p), sub);
    ld.advance(p);
    next_row = count > 1 ? lookup(p) : kNoRow;
  }
  // Tile j (in h) converted into an f16 stage; then tile j + 1 into h and tile j + 2's row resolved.
  __device__ __forceinline__ void store_and_advance(const DecodeParams& p, int j, int count, uint32_t dst,
                                                    uint32_t dst_scale) {
    store_fp8_row<true>(h, dst, dst_scale, row, sub);
    if (j + 1 < count) {
      load_fp8_row(p, h, next_row, sub);
      ld.advance(p);
      if (j + 2 < count) next_row = lookup(p);
    }
  }
};

// The 64-row kernel's producer loop (its 128 threads; `ld` at the run's first tile): tile j of the run -> f16 stage
// j & 1 (at kv0 + (j & 1) * kTileBytes, scales at scale0 + (j & 1) * kScaleTileBytes), once the consumers released
// tile j - 2 there (mbarrier empty[j & 1], then full[j & 1] from all 128 threads). A thread streams rows t / 4 and
// t / 4 + 32 (16-byte chunk t % 4 of each 64-byte group), so one tile stays in flight while the consumers work on the
// previous ones.
__device__ __forceinline__ void fp8_producer(const DecodeParams& p, const Cursor& ld, int count, uint32_t kv0,
                                             uint32_t scale0, uint32_t bar_full, uint32_t bar_empty) {
  using mla_prefill::mbar_arrive;
  using mla_prefill::mbar_wait;
  const int t = threadIdx.x & 127;
  Fp8RowStream r0, r1;
  r0.start(p, ld, count, t >> 2, t & 3);
  r1.start(p, ld, count, (t >> 2) + 32, t & 3);
  for (int j = 0; j < count; ++j) {
    const int st = j & 1;
    if (j >= 2) mbar_wait(bar_empty + 8 * st, ((j >> 1) - 1) & 1);
    const uint32_t dst = kv0 + st * kTileBytes, dst_scale = scale0 + st * kScaleTileBytes;
    r0.store_and_advance(p, j, count, dst, dst_scale);
    r1.store_and_advance(p, j, count, dst, dst_scale);
    fence_proxy_async();  // the stores, visible to the consumers' wgmma
    mbar_arrive(bar_full + 8 * st);
  }
}


// ---- e4m3 cache: producer with a raw shared-memory ring (narrow kernel) -------------------------------------------
// A raw stage: the tile's 64 e4m3 rows as stored (576 B each, row-major) and its 64 {s_c, s_pe} scale pairs.
constexpr int kRawRowsBytes = kBlockN * kKvDim;                      // 36,864
constexpr int kRawStageBytes = kRawRowsBytes + kBlockN * 2 * 4;      // + 512 B of scales
static_assert(kRawStageBytes % 128 == 0, "raw stages stay 128-byte aligned");

// Issues this thread's share of the tile at cursor c into a raw stage: rows `row` and `row + 32`, 16-byte chunk `sub`
// of each 64-byte group (the same bytes load_fp8_row would load, so the thread later converts only what it copied
// itself), plus the row's scales (sub 0). Tokens past the sequence end are zero-filled without a read (the old path's
// zero rows and {0, 0} scales). Bank-conflict free: an 8-lane phase writes two rows x 64 contiguous bytes, 576 B
// apart (= 64 mod 128).
__device__ __forceinline__ void issue_fp8_raw(const DecodeParams& p, const Cursor& c, uint32_t raw, int row, int sub) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = row + 32 * half, tok = c.t * kBlockN + r;
    const bool ok = tok < c.len;
    const int64_t cr = ok ? cache_row(p, c.b, tok) : 0;
    const uint8_t* src = p.kv + cr * kKvDim + sub * 16;
    const uint32_t dst = raw + r * kKvDim + sub * 16;
#pragma unroll
    for (int k = 0; k < 9; ++k) cp_async_16(dst + k * 64, src + k * 64, ok);
    if (sub == 0) cp_async_8(raw + kRawRowsBytes + r * 8, p.kv_scale + 2 * cr, ok);
  }
}

// This thread's part of a row of a landed raw stage into registers (the Fp8RowPart that store_fp8_row converts).
__device__ __forceinline__ void load_fp8_raw(Fp8RowPart& h, uint32_t raw, int row, int sub) {
  const uint32_t src = raw + row * kKvDim + sub * 16;
#pragma unroll
  for (int k = 0; k < 9; ++k) h.w[k] = ld_shared_v4(src + k * 64);
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(h.sc.x), "=f"(h.sc.y) : "r"(raw + kRawRowsBytes + row * 8)
               : "memory");
}

// The narrow kernel's producer loop with kRaw raw stages at raw0 (kRawStageBytes apart) and ONE bf16 stage at kv0
// (scales at scale0): tiles j + 1 .. j + kRaw stay in flight (cp.async) while tile j waits for the consumers, instead
// of one tile in registers. Tile j: wait for its cp.async group (own copies only) -> registers -> named barrier 3 of
// the 128 producer threads (their shared loads performed before the copy of tile j + kRaw overwrites the slot) ->
// issue tile j + kRaw -> wait empty (consumers done with tile j - 1: phase j - 1) -> convert into the bf16 stage ->
// arrive full (phase j). Every iteration commits exactly one group (empty past the run's end), so wait_group<kRaw-1>
// always means "tile j has landed".
template <int kRaw>
__device__ __forceinline__ void fp8_producer_ring(const DecodeParams& p, Cursor ld, int count, uint32_t raw0,
                                                  uint32_t kv0, uint32_t scale0, uint32_t bar_full,
                                                  uint32_t bar_empty) {
  using mla_prefill::mbar_arrive;
  using mla_prefill::mbar_wait;
  using mla_prefill::named_bar_sync;
  const int t = threadIdx.x & 127, sub = t & 3, row = t >> 2;
#pragma unroll
  for (int i = 0; i < kRaw; ++i) {
    if (i < count) {
      issue_fp8_raw(p, ld, raw0 + i * kRawStageBytes, row, sub);
      ld.advance(p);  // ld: tile i + 1
    }
    cp_async_commit();
  }
  // ld is now at tile kRaw (when count > kRaw), the next one to issue.
  Fp8RowPart h0, h1;
  for (int j = 0; j < count; ++j) {
    const uint32_t raw = raw0 + (j % kRaw) * kRawStageBytes;
    cp_async_wait<kRaw - 1>();
    load_fp8_raw(h0, raw, row, sub);
    load_fp8_raw(h1, raw, row + 32, sub);
    named_bar_sync<128>(3);
    if (j + kRaw < count) {
      issue_fp8_raw(p, ld, raw, row, sub);
      ld.advance(p);
    }
    cp_async_commit();
    if (j >= 1) mbar_wait(bar_empty, (j - 1) & 1);
    store_fp8_row<false>(h0, kv0, scale0, row, sub);
    store_fp8_row<false>(h1, kv0, scale0, row + 32, sub);
    fence_proxy_async();  // the stores, visible to the consumers' wgmma
    mbar_arrive(bar_full);
  }
  cp_async_wait<0>();  // only empty groups can be left; keeps the exit free of pending copies
}

// ---- e4m3 cache: raw ring of the pipelined narrow kernel (decode_narrow_fp8_kernel) -----------------------------
// Its consumers read the e4m3 codes straight from shared memory into wgmma register fragments (no converted copy), so
// a stage is one raw tile laid out for their loads: c_kv [64 tokens x 512 B] with each token's 16-byte chunks
// permuted inside their 128-byte group (raw_ckv_offset), k_pe [64 x 64 B] row-major, the 64 {s_c, s_pe} pairs.
constexpr int kRawPeOff = kBlockN * kVDim;                  // 32,768
constexpr int kRawScaleOff = kRawPeOff + kBlockN * 64;      // + 4,096
constexpr int kRawTileBytes = kRawScaleOff + kBlockN * 8;   // + 512 = 37,376
static_assert(kRawTileBytes % 128 == 0, "raw tiles stay 128-byte aligned (the bank analysis below assumes it)");

// Byte offset of c_kv chunk c (dims 16 c ..) of token t in a raw tile. Inside each 128-byte group (8 chunks, one per
// 16-byte bank group) the chunk position is XORed with h(t, c / 8), chosen so that each 8-lane shared-memory phase of
// the three access patterns touches 8 distinct bank groups: the producer's copies (8 lanes = the 8 chunks of one
// group of one token: any XOR works), the scores warpgroup's K loads (tokens t, t + 1 with t even x the 4 groups, same
// chunk position: h covers t & 1 and the group) and the value warpgroup's V loads (4 tokens of one parity, 2 apart x
// 2 adjacent chunks of one group: h covers bits 1-2 of t).
__device__ __forceinline__ uint32_t raw_ckv_offset(int t, int c) {
  const int h = ((((c >> 3) ^ (t >> 1)) & 3) << 1) | (t & 1);
  return t * kVDim + (((c & ~7) | ((c & 7) ^ h)) << 4);
}

// The pipelined narrow kernel's producer (its 128 threads; `ld` at the run's first tile): tile j of the run into raw
// stage j % kStages (kRawTileBytes apart from raw0) once the consumers released tile j - kStages there (empty[s]: all
// 256 consumer threads; the parity trick lets each stage's first use pass at once), then every thread's
// cp.async.mbarrier.arrive.noinc on full[s] (128 arrivals): the phase completes when all copies of the tile landed.
// Quarter-warp qw = t / 8 copies tokens 4 qw .. 4 qw + 3: lane l = t % 8 chunk l of each 128-byte c_kv group (one
// group of one token per instruction: 128 contiguous bytes in global and shared memory), 2 of the 16 k_pe chunks
// (two adjacent tokens x 4 chunks per instruction), and (l < 4) the scales of token 4 qw + l, whose cache row lane l
// resolved a tile ahead (one block-table load per token; the quarter-warp shares the 4 rows by shuffles). Tokens past
// the sequence end are zero-filled without a read (scales {0, 0}).
template <int kStages>
__device__ __forceinline__ void fp8_producer_raw(const DecodeParams& p, Cursor ld, int count, uint32_t raw0,
                                                 uint32_t bar_full, uint32_t bar_empty) {
  using mla_prefill::cp_async_mbar_arrive;
  using mla_prefill::mbar_wait;
  const int t = threadIdx.x & 127, qw = t >> 3, l = t & 7, lane = threadIdx.x & 31;
  // Branch-free: rows past the end look up the sequence's last token (a tile has at least one), then are dropped.
  auto lookup = [&](const Cursor& c) {
    const int tok = c.t * kBlockN + 4 * qw + (l & 3);
    const int64_t cr = cache_row(p, c.b, min(tok, c.len - 1));
    return tok < c.len ? static_cast<uint32_t>(cr) : kNoRow;
  };
  uint32_t crow = lookup(ld);
  int st = 0, ph = 0;
  for (int j = 0; j < count; ++j) {
    mbar_wait(bar_empty + 8 * st, ph ^ 1);
    const uint32_t raw = raw0 + st * kRawTileBytes;
    uint32_t rows[4];
#pragma unroll
    for (int m = 0; m < 4; ++m) rows[m] = __shfl_sync(0xffffffffu, crow, (lane & 24) + m);
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const bool ok = rows[m] != kNoRow;
      const uint8_t* src = p.kv + (ok ? static_cast<int64_t>(rows[m]) * kKvDim : 0);
#pragma unroll
      for (int u = 0; u < 4; ++u) cp_async_16(raw + raw_ckv_offset(4 * qw + m, 8 * u + l), src + (8 * u + l) * 16, ok);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int m = 2 * i + (l >> 2);
      const uint32_t r = (l >> 2) ? rows[2 * i + 1] : rows[2 * i];
      const bool ok = r != kNoRow;
      const uint8_t* src = p.kv + (ok ? static_cast<int64_t>(r) * kKvDim : 0) + kVDim + (l & 3) * 16;
      cp_async_16(raw + kRawPeOff + (4 * qw + m) * 64 + (l & 3) * 16, src, ok);
    }
    if (l < 4) {
      const bool ok = crow != kNoRow;
      cp_async_8(raw + kRawScaleOff + (4 * qw + l) * 8, p.kv_scale + (ok ? 2 * static_cast<int64_t>(crow) : 0), ok);
    }
    cp_async_mbar_arrive(bar_full + 8 * st);
    ld.advance(p);
    if (j + 1 < count) crow = lookup(ld);  // its latency falls into the next empty wait
    if (++st == kStages) {
      st = 0;
      ph ^= 1;
    }
  }
  cp_async_commit();
  cp_async_wait<0>();  // no copy left in flight at exit
}

}  // namespace mla_decode
}  // namespace dsv2
