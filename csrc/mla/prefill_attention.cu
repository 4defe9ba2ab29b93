// MLA prefill attention (varlen flash attention, qk dim 192, v dim 128, bf16) for sm_90a, and its C++ entry.
//
// Work items: (sequence, head, block of 128 query rows); an item walks the 128-key tiles its rows may see. The grid is
// persistent (one CTA per SM): a CTA takes its first item by blockIdx.x and each further one from an atomic counter
// (zeroed by a memset node before the launch: no host sync, CUDA-graph safe), so an SM that finishes a short item
// starts the next at once instead of waiting for a new CTA, and no CTA is spent on the empty blocks of shorter
// sequences. Items are numbered sequence by sequence, head by head, and within a head last block first, so the
// longest (causal) items of a head start first and the CTAs running together mostly share a few heads' K/V in L2.
// The producer keeps loading across items (the K/V stages and their barrier phases run on a CTA-wide tile counter)
// and loads the next item's Q under the current item's last tile and epilogue, so per-item prologue/epilogue costs
// (Q load, the first tile's latency, output and LSE stores) mostly overlap the neighbouring items' work.
//
// Warp roles (384 threads, warp-specialized, 1 CTA per SM):
//   * warpgroup 2, the producer (56 registers after setmaxnreg): its thread 0 fetches the next work item and
//     publishes it in a two-slot ring in shared memory (item full/empty mbarriers; every warp reads each item).
//     16-byte cp.async of Q (per item, in two 64-row halves, each reloaded once its consumer warpgroup's last Q K^T
//     of the previous item landed), then of each K tile (128 x 192) and V tile (128 x 128) into 128-byte-swizzled
//     shared tiles, two stages of each. Rows past the sequence are zero-filled, never read. Each thread's completion
//     arrives on the stage's "full" mbarrier (cp.async.mbarrier.arrive.noinc); the producer reuses a stage once both
//     consumers arrived on its "empty" one.
//   * warpgroups 0 and 1, the consumers (224 registers): 64 query rows each. Per KV tile j:
//       S_j = Q K_j^T         12 wgmma m64n128k16, both operands from shared memory (K-major);
//       O  += P_{j-1} V_{j-1}  8 wgmma m64n128k16, P from registers (bf16, the accumulator layout of S is the
//                              register-A fragment layout), V read MN-major (trans-b) from shared memory;
//     both issued back to back, then the online softmax of S_j (fp32, exp2 of log2e-scaled scores, masks only on
//     the tiles that need them) runs while P_{j-1} V_{j-1} is still in flight (intra-warpgroup overlap); O is
//     rescaled once that product has landed, and P_j is packed to bf16 registers for the next step.
//     With ping-pong on (the default), two named barriers make the warpgroups take turns issuing their GEMMs, so one
//     warpgroup's softmax runs under the other's GEMMs (DSV2_PREFILL_PINGPONG=0 turns it off, for comparison).
//     After each full-barrier wait a consumer runs fence.proxy.async: the tiles were written through the generic
//     proxy (cp.async) and wgmma reads them through the async proxy.
// Rows that see no key (lq > lk, or lk = 0) get out 0 and lse +inf, as the reference.
// Shared memory: Q 48 KB + 2 x K 48 KB + 2 x V 32 KB = 208 KB (+ mbarriers, + 1 KB alignment slack).
// Registers: O 64 + S 64 + P 32 per consumer thread; the consumer code uses 204 of its 224, the producer 54 of its
// 56 (the item cursor costs more than 40), no spills (ptxas -v reports the launch's 168). 214,176 bytes of dynamic
// shared memory per CTA.
//
// Expected performance (written before the first GPU run): per CTA tile (128 rows x 128 keys) the tensor cores need
// 2 x 20 wgmma m64n128k16 = 2,560 cycles at peak; softmax costs ~600-900 issue cycles per warpgroup and overlaps the
// other warpgroup's GEMMs. Expected 450-530 TFLOP/s (60-70% of the 744 TFLOP/s bf16 GEMM ceiling) at H = 128 and a
// causal total length >= 4096 in one sequence; ragged batches of shorter sequences 400-470 (more diagonal tiles, more
// pipeline fills); H = 16 at 4096 tokens ~350-420 (only 512 CTAs: 3.9 waves with causal imbalance).
// Measured: 557 TFLOP/s on one 8192-token sequence, 356 on the ragged 8 x ~1k batch: each of its 8,832 CTAs (plus
// 4,480 that exited at once) paid ~3 us of unhidden prologue/epilogue on ~5 tiles of work. Expected with the
// persistent work list (before its first GPU run): ragged 8192 ~440-460, one 8192 sequence ~570-590.

#include "../common/torch_cuda.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <tuple>

#include "../ops.h"
#include "prefill_common.cuh"

namespace dsv2 {
namespace mla_prefill {
namespace {

constexpr int kHeadDim = 192;  // q/k head dim (128 nope + 64 rope)
constexpr int kVDim = 128;     // v head dim
constexpr int kBlockM = 128;   // query rows per CTA (2 consumer warpgroups x 64)
constexpr int kBlockN = 128;   // keys per tile
constexpr int kThreads = 384;  // consumers: threads 0-255, producer: 256-383
constexpr int kProducerRegs = 56, kConsumerRegs = 224;  // 128 x 56 + 256 x 224 = 384 x 168 (the launch's budget)
static_assert(128 * kProducerRegs + 256 * kConsumerRegs <= 384 * 168, "register reallocation exceeds the budget");

// A 128-row x 64-column bf16 block: row r at r * 128 bytes, its 16-byte chunk c at chunk c ^ (r % 8).
constexpr int kColBlock = 128 * 128;
constexpr int kQBytes = 3 * kColBlock, kKBytes = 3 * kColBlock, kVBytes = 2 * kColBlock;
struct Smem {
  static constexpr int kQ = 0, kK = kQBytes, kV = kK + 2 * kKBytes, kBar = kV + 2 * kVBytes;
  // mbarriers: full_K[2], full_V[2], empty_K[2], empty_V[2], Q empty[2], Q full[2] (one per consumer warpgroup's
  // 64 rows), item full[2], item empty[2]; then two 16-byte work-item slots.
  static constexpr int kItem = kBar + 128;
  static constexpr int kBytes = kItem + 2 * 16;
};
constexpr int kSmemSlack = 1024;
static_assert(Smem::kBytes + kSmemSlack <= 232448, "the H100/H200 per-block shared memory limit is 227 KB");
static_assert(Smem::kK % 1024 == 0 && Smem::kV % 1024 == 0, "swizzled tiles must be 1024-byte aligned");
constexpr uint32_t kFullCount = 128;  // producer threads (one cp.async-completion arrival each)
constexpr uint32_t kEmptyCount = 8;   // consumer warps (one arrival each)
constexpr uint32_t kQEmptyCount = 4;  // the warps of the consumer warpgroup that reads those Q rows
// Every thread reads each work item, and every thread arrives on the slot's "empty" barrier after its own read: an
// arrival by one lane per warp would release only that lane's read (a __syncwarp in between compiles to nothing and
// orders no shared-memory access), which racecheck reports as a write-after-read race with the producer's refill.
constexpr uint32_t kItemReaders = 384;

struct PrefillParams {
  const __nv_bfloat16* q;  // token t, head h at q + t * q_s0 + h * q_s1 (192 contiguous values)
  const __nv_bfloat16* k;
  const __nv_bfloat16* v;
  int64_t q_s0, q_s1, k_s0, k_s1, v_s0, v_s1;
  const int* cu_q;  // [batch + 1]
  const int* cu_k;
  __nv_bfloat16* out;  // [tq, heads, 128] contiguous
  float* lse;          // [heads, tq] contiguous
  unsigned* next_item;  // zeroed before the launch: items taken past the first gridDim.x
  int tq, tk, heads, batch;
  int causal;
  float scale_log2;  // softmax_scale * log2(e)
};

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// A sequence's [start, start + len) from cu_seqlens, clamped into [0, total]: with value checks off, bad offsets give
// wrong answers, never out-of-bounds accesses.
__device__ __forceinline__ void seq_range(const int* cu, int b, int total, int& start, int& len) {
  const int s = min(max(__ldg(cu + b), 0), total);
  const int e = min(max(__ldg(cu + b + 1), s), total);
  start = s;
  len = e - s;
}

// One work item's sequence ranges and the number of key tiles it reads. The producer and both consumer warpgroups
// derive the tile count from this one function: the pipeline's barrier phases rely on them agreeing exactly.
struct ItemRange {
  int q0, lq, k0, lk;
  int n_tiles;
};
__device__ __forceinline__ ItemRange item_range(const PrefillParams& p, int b, int row0) {
  ItemRange r;
  seq_range(p.cu_q, b, p.tq, r.q0, r.lq);
  seq_range(p.cu_k, b, p.tk, r.k0, r.lk);
  // The block's last row sees the most keys (causal: aligned at the end of the sequence).
  const int key_end = p.causal ? min(r.lk, r.lk - r.lq + min(r.lq, row0 + kBlockM)) : r.lk;
  r.n_tiles = key_end > 0 ? ceil_div(key_end, kBlockN) : 0;
  return r;
}

// Rows [first, first + 128) of one head (row r at src + r * stride, kBlocks * 64 contiguous values) into the swizzled
// tile at dst; rows >= valid are zero-filled. 8 threads per row (one 128-byte segment per instruction and row, 16
// rows per pass); t = producer thread 0..127. Passes [kPass0, kPass0 + kPasses) only: passes 0-3 are rows 0-63.
template <int kBlocks, int kPass0 = 0, int kPasses = 8>
__device__ __forceinline__ void load_tile(uint32_t dst, const __nv_bfloat16* src, int64_t stride, int first,
                                          int valid, int t) {
  const int sub = t & 7, r0 = t >> 3;
  const uint32_t d0 = dst + r0 * 128 + ((sub ^ (r0 & 7)) << 4);  // r % 8 == r0 % 8 for every pass
#pragma unroll
  for (int pass = kPass0; pass < kPass0 + kPasses; ++pass) {
    const int r = r0 + 16 * pass, row = first + r;
    const bool ok = row < valid;
    const __nv_bfloat16* s = src + (ok ? static_cast<int64_t>(row) * stride : 0) + sub * 8;
#pragma unroll
    for (int blk = 0; blk < kBlocks; ++blk) cp_async_16(d0 + pass * 16 * 128 + blk * kColBlock, s + blk * 64, ok);
  }
}

// Accumulator layout of wgmma m64nN (per warpgroup thread): register i holds row 16 * warp + lane / 4 + 8 * ((i >> 1)
// & 1) and column 8 * (i >> 2) + 2 * (lane & 3) + (i & 1). "lo" rows are r, "hi" rows r + 8.
template <bool kPingPong>
__global__ void __launch_bounds__(kThreads, 1) prefill_kernel(const __grid_constant__ PrefillParams p) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw), base = (raw + 1023u) & ~1023u;

  const uint32_t bar = base + Smem::kBar;
  const auto full_k = [&](int s) { return bar + 8 * s; };
  const auto full_v = [&](int s) { return bar + 16 + 8 * s; };
  const auto empty_k = [&](int s) { return bar + 32 + 8 * s; };
  const auto empty_v = [&](int s) { return bar + 48 + 8 * s; };
  const auto q_empty = [&](int w) { return bar + 64 + 8 * w; };
  const auto q_full = [&](int w) { return bar + 80 + 8 * w; };
  const auto item_full = [&](int s) { return bar + 96 + 8 * s; };
  const auto item_empty = [&](int s) { return bar + 112 + 8 * s; };
  const auto item_slot = [&](int s) { return base + Smem::kItem + 16 * s; };
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      mbar_init(full_k(s), kFullCount);
      mbar_init(full_v(s), kFullCount);
      mbar_init(empty_k(s), kEmptyCount);
      mbar_init(empty_v(s), kEmptyCount);
      mbar_init(q_empty(s), kQEmptyCount);
      mbar_init(q_full(s), kFullCount);
      mbar_init(item_full(s), 1);
      mbar_init(item_empty(s), kItemReaders);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the async arrivals too
  }
  __syncthreads();  // the last CTA-wide barrier: the roles below synchronize through mbarriers only

  const int wg = threadIdx.x >> 7, lane = threadIdx.x & 31;
  // The it-th work item of this CTA, as published by the producer's thread 0: every thread waits for the slot, reads
  // it, and its warp hands the slot back (the producer refills it two items later).
  const auto take_item = [&](int it) {
    const int slot = it & 1;
    mbar_wait(item_full(slot), (it >> 1) & 1);
    int4 item;
    asm volatile("ld.shared.v4.s32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(item.x), "=r"(item.y), "=r"(item.z), "=r"(item.w)
                 : "r"(item_slot(slot))
                 : "memory");
    mbar_arrive(item_empty(slot));
    return item;
  };

  if (wg == 2) {
    // ---------------------------------------------- producer ------------------------------------------------------
    setmaxnreg_dec<kProducerRegs>();
    const int t = threadIdx.x - 256;
    // Thread 0's cursor into the work list: items [cbase, cbase + heads * m_blocks(cb)) belong to sequence cb. Each
    // CTA's item indices only grow, so the cursor only moves forward (O(batch) reads of cu_seqlens_q per CTA).
    int cb = 0, cm = -1;
    int64_t cbase = 0;
    uint32_t g = 0;  // key tiles loaded so far (all items): stage g & 1, use g >> 1 of that stage
    int qn = 0;      // Q loads so far
    for (int it = 0;; ++it) {
      if (t == 0) {
        const int64_t w = it == 0 ? static_cast<int64_t>(blockIdx.x)
                                  : static_cast<int64_t>(gridDim.x) + atomicAdd(p.next_item, 1u);
        int4 item = make_int4(-1, 0, 0, 0);
        while (cb < p.batch) {
          if (cm < 0) {
            int s0, len;
            seq_range(p.cu_q, cb, p.tq, s0, len);
            cm = ceil_div(len, kBlockM);
          }
          const int64_t n = static_cast<int64_t>(cm) * p.heads;
          if (w < cbase + n) {
            const int r = static_cast<int>(w - cbase);
            // (head, block from the end): a head's blocks are consecutive, longest (last rows) first.
            item = make_int4(cb, r / cm, (cm - 1 - r % cm) * kBlockM, 0);
            break;
          }
          cbase += n;
          ++cb;
          cm = -1;
        }
        if (it >= 2) mbar_wait(item_empty(it & 1), ((it >> 1) - 1) & 1);
        asm volatile("st.shared.v4.s32 [%0], {%1, %2, %3, %4};\n" ::"r"(item_slot(it & 1)), "r"(item.x),
                     "r"(item.y), "r"(item.z), "r"(item.w)
                     : "memory");
        mbar_arrive(item_full(it & 1));
      }
      const int4 item = take_item(it);
      if (item.x < 0) break;
      const int b = item.x, h = item.y, row0 = item.z;
      const ItemRange r = item_range(p, b, row0);
      const int q0 = r.q0, k0 = r.k0, lq = r.lq, lk = r.lk, n_tiles = r.n_tiles;
      if (n_tiles == 0) continue;  // rows that see no key: the consumers write them without Q or K

      const __nv_bfloat16* qb = p.q + static_cast<int64_t>(q0) * p.q_s0 + static_cast<int64_t>(h) * p.q_s1;
      const __nv_bfloat16* kb = p.k + static_cast<int64_t>(k0) * p.k_s0 + static_cast<int64_t>(h) * p.k_s1;
      const __nv_bfloat16* vb = p.v + static_cast<int64_t>(k0) * p.v_s0 + static_cast<int64_t>(h) * p.v_s1;
      // Q is single-buffered, in two halves of 64 rows, one per consumer warpgroup: a half is overwritten once its
      // warpgroup's last Q K^T of the previous item landed, so the load runs under that warpgroup's last softmax,
      // last P V and epilogue. Order: Q rows 0-63, K_0, Q rows 64-127 (warpgroup 1 runs half a step behind), V_0.
      const uint32_t q_released = (qn - 1) & 1;
      if (qn > 0) mbar_wait(q_empty(0), q_released);
      load_tile<3, 0, 4>(base + Smem::kQ, qb, p.q_s0, row0, lq, t);
      cp_async_mbar_arrive(q_full(0));
      for (int j = 0; j < n_tiles; ++j, ++g) {
        const int st = g & 1;
        const uint32_t released = ((g >> 1) - 1) & 1;  // parity of the release of tile g - 2 (same stage)
        if (g >= 2) mbar_wait(empty_k(st), released);
        load_tile<3>(base + Smem::kK + st * kKBytes, kb, p.k_s0, j * kBlockN, lk, t);
        cp_async_mbar_arrive(full_k(st));
        if (j == 0) {
          if (qn > 0) mbar_wait(q_empty(1), q_released);
          load_tile<3, 4, 4>(base + Smem::kQ, qb, p.q_s0, row0, lq, t);
          cp_async_mbar_arrive(q_full(1));
          ++qn;
        }
        if (g >= 2) mbar_wait(empty_v(st), released);
        load_tile<2>(base + Smem::kV + st * kVBytes, vb, p.v_s0, j * kBlockN, lk, t);
        cp_async_mbar_arrive(full_v(st));
      }
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    return;
  }

  // ------------------------------------------------ consumers -------------------------------------------------------
  setmaxnreg_inc<kConsumerRegs>();
  const int warp = (threadIdx.x >> 5) & 3, quad = lane & 3;
  const float scale_log2 = p.scale_log2;
  const uint32_t q_smem = base + Smem::kQ + wg * 64 * 128;  // this warpgroup's 64 rows of each column block

  float o[64], s[64];
  uint32_t pa[8][4];  // P_{j-1} as bf16 register-A fragments, one per 16-key step
#pragma unroll
  for (int i = 0; i < 64; ++i) s[i] = 0.f;
#pragma unroll
  for (int kk = 0; kk < 8; ++kk)
#pragma unroll
    for (int u = 0; u < 4; ++u) pa[kk][u] = 0u;
  float m_lo, m_hi, l_lo, l_hi;
  int lim_lo, lim_hi, mask_from;

  // O += P V_tile: 16 keys per step are two 8-row groups (2 KB); V's 128 columns are two column blocks 16 KB apart.
  const auto pv_gemm = [&](uint32_t vt) {
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) wgmma_m64n128k16_rs_tb(o, pa[kk], smem_desc(vt + kk * 2048, kColBlock), 1);
  };
  const auto fence_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) fence_regs_u32(pa[kk]);
  };

  // Online softmax of S_j in place (s becomes P_j in fp32): masks the tile when it holds keys some row may not see,
  // updates the running max (log2 domain) and sums; returns O's rescale factors through a_lo / a_hi.
  float a_lo = 1.f, a_hi = 1.f;
  const auto softmax = [&](int j) {
    if (j >= mask_from) {
      const int c0 = j * kBlockN + 2 * quad;
      const int e_lo = lim_lo - c0, e_hi = lim_hi - c0;
#pragma unroll
      for (int i = 0; i < 64; ++i) {
        const int c = 8 * (i >> 2) + (i & 1);
        if (c >= ((i & 2) ? e_hi : e_lo)) s[i] = -INFINITY;
      }
    }
    float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      if (i & 2) mx_hi = fmaxf(mx_hi, s[i]);
      else mx_lo = fmaxf(mx_lo, s[i]);
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
    }
    // A row that has seen no key yet keeps max -inf and subtracts 0 instead (its P is 0, its rescale factor 0).
    const float n_lo = fmaxf(m_lo, mx_lo * scale_log2), n_hi = fmaxf(m_hi, mx_hi * scale_log2);
    const float u_lo = n_lo == -INFINITY ? 0.f : n_lo, u_hi = n_hi == -INFINITY ? 0.f : n_hi;
    a_lo = fast_exp2(m_lo - u_lo);
    a_hi = fast_exp2(m_hi - u_hi);
    m_lo = n_lo;
    m_hi = n_hi;
    float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      if (i & 2) {
        s[i] = fast_exp2(fmaf(s[i], scale_log2, -u_hi));
        sum_hi += s[i];
      } else {
        s[i] = fast_exp2(fmaf(s[i], scale_log2, -u_lo));
        sum_lo += s[i];
      }
    }
    l_lo = l_lo * a_lo + sum_lo;
    l_hi = l_hi * a_hi + sum_hi;
  };
  const auto rescale_and_pack = [&]() {
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] *= (i & 2) ? a_hi : a_lo;
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
#pragma unroll
      for (int u = 0; u < 4; ++u) pa[kk][u] = pack_bf16x2(s[8 * kk + 2 * u], s[8 * kk + 2 * u + 1]);
  };
  // S = Q K_tile^T: 12 k-steps of 16 columns (32 bytes into a column block; a column block every 4 steps).
  const auto qk_gemm = [&](int st) {
    const uint32_t kt = base + Smem::kK + st * kKBytes;
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      const uint32_t off = (kk >> 2) * kColBlock + (kk & 3) * 32;
      wgmma_m64n128k16_ss(s, smem_desc(q_smem + off, 16), smem_desc(kt + off, 16), kk > 0);
    }
  };
  const auto release = [&](uint32_t empty_bar) {  // after this warp's wgmma wait: one arrival per consumer warp
    __syncwarp();
    if (lane == 0) mbar_arrive(empty_bar);
  };

  // Ping-pong: warpgroup w issues each GEMM batch after bar.sync(1 + w) and then lets the other one go with
  // bar.arrive(2 - w). Both warpgroups issue the same batches (they share every item), so the turns continue across
  // items; warpgroup 1 opens with one arrive, and warpgroup 0 takes that last arrive back with a final sync.
  if (kPingPong && wg == 1) named_bar_arrive<256>(1);  // warpgroup 0 issues first
  uint32_t g = 0;  // key tiles consumed so far (all items), as the producer counts them
  uint32_t qn = 0;  // Q loads consumed so far
  for (int it = 0;; ++it) {
    const int4 item = take_item(it);
    if (item.x < 0) break;
    const int b = item.x, h = item.y, row0 = item.z;
    const ItemRange r = item_range(p, b, row0);
    const int q0 = r.q0, lq = r.lq, lk = r.lk, n_tiles = r.n_tiles;

    // Query i sees keys j < lim(i) = causal ? min(lk, lk - lq + i + 1) : lk. The block's last row sees the most
    // keys; tiles from mask_from on hold a key that some row of the block (its first row sees the fewest) may not see.
    const int first_lim = p.causal ? min(lk, lk - lq + row0 + 1) : lk;
    mask_from = max(first_lim, 0) / kBlockN;
    const int i_lo = row0 + wg * 64 + warp * 16 + (lane >> 2), i_hi = i_lo + 8;  // rows in the sequence
    lim_lo = p.causal ? min(lk, lk - lq + i_lo + 1) : lk;
    lim_hi = p.causal ? min(lk, lk - lq + i_hi + 1) : lk;
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;
    m_lo = m_hi = -INFINITY;
    l_lo = l_hi = 0.f;

    // Pipeline (tile j of n): [S_j = Q K_j^T, O += P_{j-1} V_{j-1}] issued together, softmax of S_j under the P V.
    // Tile 0 is peeled off so that every wgmma batch in the loop is straight-line code (no wgmma under a branch).
    // The last Q K^T of the item hands this warpgroup's Q rows back to the producer (q_empty), which loads the next
    // item's rows meanwhile.
    if (n_tiles > 0) {
      // ---- tile 0 ----
      const int st0 = g & 1;
      mbar_wait(q_full(wg), qn & 1);
      ++qn;
      mbar_wait(full_k(st0), (g >> 1) & 1);
      fence_proxy_async();  // the tiles were written through the generic proxy (cp.async); wgmma reads via async
      if (kPingPong) named_bar_sync<256>(1 + wg);
      fence_regs(s);
      wgmma_fence();
      qk_gemm(st0);
      wgmma_commit();
      if (kPingPong) named_bar_arrive<256>(2 - wg);
      wgmma_wait<0>();
      fence_regs(s);
      release(empty_k(st0));
      if (n_tiles == 1) release(q_empty(wg));
      softmax(0);
      rescale_and_pack();
      // ---- tiles 1 .. n-1 ----
      for (int j = 1; j < n_tiles; ++j) {
        const uint32_t gj = g + j;
        const int st = gj & 1;
        mbar_wait(full_k(st), (gj >> 1) & 1);
        mbar_wait(full_v(st ^ 1), ((gj - 1) >> 1) & 1);
        fence_proxy_async();
        if (kPingPong) named_bar_sync<256>(1 + wg);
        fence_regs(s);
        fence_regs(o);
        fence_p();
        wgmma_fence();
        qk_gemm(st);
        wgmma_commit();
        pv_gemm(base + Smem::kV + (st ^ 1) * kVBytes);
        wgmma_commit();
        if (kPingPong) named_bar_arrive<256>(2 - wg);  // the other's turn
        wgmma_wait<1>();  // S_j landed; P_{j-1} V_{j-1} may still run
        fence_regs(s);
        release(empty_k(st));
        if (j == n_tiles - 1) release(q_empty(wg));
        softmax(j);
        wgmma_wait<0>();
        fence_regs(o);
        fence_p();
        release(empty_v(st ^ 1));
        rescale_and_pack();
      }
      // ---- the last tile's P V ----
      const uint32_t gl = g + n_tiles - 1;
      mbar_wait(full_v(gl & 1), (gl >> 1) & 1);
      fence_proxy_async();
      fence_regs(o);
      fence_p();
      wgmma_fence();
      pv_gemm(base + Smem::kV + (gl & 1) * kVBytes);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(o);
      release(empty_v(gl & 1));
      g += n_tiles;
    }

    // ---- epilogue: out = O / l (bf16), lse = ln(l) + m ln 2; a row that saw no key gets 0 and +inf ----
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
      l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
    }
#pragma unroll
    for (int hs = 0; hs < 2; ++hs) {
      const int i = hs ? i_hi : i_lo;
      if (i >= lq) continue;
      const float l = hs ? l_hi : l_lo, m = hs ? m_hi : m_lo;
      const float inv = l > 0.f ? 1.f / l : 0.f;
      __nv_bfloat16* dst = p.out + (static_cast<int64_t>(q0 + i) * p.heads + h) * kVDim + 2 * quad;
#pragma unroll
      for (int jj = 0; jj < 16; ++jj)
        *reinterpret_cast<uint32_t*>(dst + 8 * jj) =
            pack_bf16x2(o[4 * jj + 2 * hs] * inv, o[4 * jj + 2 * hs + 1] * inv);
      if (quad == 0)
        p.lse[static_cast<int64_t>(h) * p.tq + q0 + i] = l > 0.f ? m * 0.69314718055994531f + logf(l) : INFINITY;
    }
  }
  if (kPingPong && wg == 0) named_bar_sync<256>(1);  // warpgroup 1's last arrive
}

template <bool kPingPong>
void launch_prefill(const PrefillParams& p, dim3 grid, cudaStream_t stream) {
  constexpr int smem = Smem::kBytes + kSmemSlack;
  C10_CUDA_CHECK(cudaFuncSetAttribute(prefill_kernel<kPingPong>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  prefill_kernel<kPingPong><<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// DSV2_PREFILL_PINGPONG=0 turns the warpgroup ping-pong off (read on every call, so a benchmark can compare).
bool pingpong_enabled() {
  const char* e = std::getenv("DSV2_PREFILL_PINGPONG");
  return !(e != nullptr && e[0] == '0');
}

}  // namespace
}  // namespace mla_prefill

std::tuple<at::Tensor, at::Tensor> prefill_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                          const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
                                                          const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                          int64_t max_seqlen_k, double softmax_scale, bool causal) {
  using namespace mla_prefill;
  const char* op = "prefill_attention";
  const char* only = " for the CUDA kernel (which supports bfloat16 with qk head dim 192 and v head dim 128; run "
                     "other cases on the reference: dsv2_kernels.kernels('none'))";
  check_cuda(op, "q", q_in);
  DSV2_CHECK(q_in.scalar_type() == at::kBFloat16, op, "q", "must have dtype bfloat16", only, ", got ",
             q_in.scalar_type());
  DSV2_CHECK(q_in.dim() == 3, op, "q", "must have 3 dimensions, got shape ", q_in.sizes());
  DSV2_CHECK(q_in.size(2) == kHeadDim, op, "q", "must have shape ('*', '*', 192)", only, ", got ", q_in.sizes());
  DSV2_CHECK(q_in.stride(2) == 1, op, "q", "must have a contiguous last dimension, got strides ", q_in.strides());
  const int64_t tq = q_in.size(0), heads = q_in.size(1);

  check_same_device(op, "k", k_in, q_in);
  check_dtype(op, "k", k_in, at::kBFloat16);
  DSV2_CHECK(k_in.dim() == 3 && k_in.size(1) == heads && k_in.size(2) == kHeadDim, op, "k", "must have shape ('*', ",
             heads, ", 192), got ", k_in.sizes());
  DSV2_CHECK(k_in.stride(2) == 1, op, "k", "must have a contiguous last dimension, got strides ", k_in.strides());
  const int64_t tk = k_in.size(0);

  check_same_device(op, "v", v_in, q_in);
  check_dtype(op, "v", v_in, at::kBFloat16);
  DSV2_CHECK(v_in.dim() == 3 && v_in.size(0) == tk && v_in.size(1) == heads, op, "v", "must have shape (", tk, ", ",
             heads, ", '*'), got ", v_in.sizes());
  DSV2_CHECK(v_in.size(2) == kVDim, op, "v", "must have shape (", tk, ", ", heads, ", 128)", only, ", got ",
             v_in.sizes());
  DSV2_CHECK(v_in.stride(2) == 1, op, "v", "must have a contiguous last dimension, got strides ", v_in.strides());

  check_same_device(op, "cu_seqlens_q", cu_seqlens_q, q_in);
  check_dtype(op, "cu_seqlens_q", cu_seqlens_q, at::kInt);
  DSV2_CHECK(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) >= 1, op, "cu_seqlens_q",
             "must have shape (batch + 1,) with at least one entry (the leading 0), got ", cu_seqlens_q.sizes());
  DSV2_CHECK(cu_seqlens_q.is_contiguous(), op, "cu_seqlens_q", "must be contiguous, got strides ",
             cu_seqlens_q.strides());
  check_same_device(op, "cu_seqlens_k", cu_seqlens_k, q_in);
  check_dtype(op, "cu_seqlens_k", cu_seqlens_k, at::kInt);
  DSV2_CHECK(cu_seqlens_k.sizes() == cu_seqlens_q.sizes(), op, "cu_seqlens_k", "must have shape ",
             cu_seqlens_q.sizes(), " (that of cu_seqlens_q), got ", cu_seqlens_k.sizes());
  DSV2_CHECK(cu_seqlens_k.is_contiguous(), op, "cu_seqlens_k", "must be contiguous, got strides ",
             cu_seqlens_k.strides());
  DSV2_CHECK(max_seqlen_q >= 0, op, "max_seqlen_q", "must be >= 0, got ", max_seqlen_q);
  DSV2_CHECK(max_seqlen_k >= 0, op, "max_seqlen_k", "must be >= 0, got ", max_seqlen_k);
  DSV2_CHECK(softmax_scale > 0 && std::isfinite(softmax_scale), op, "softmax_scale", "must be finite and > 0, got ",
             softmax_scale);

  const int64_t batch = cu_seqlens_q.size(0) - 1;
  // Limits of the CUDA kernel (int32 token indices, grid dimensions).
  constexpr int64_t kMaxTokens = std::numeric_limits<int>::max() - 2 * kBlockN;
  DSV2_CHECK(tq <= kMaxTokens, op, "q", "has too many tokens for the CUDA kernel: ", tq);
  DSV2_CHECK(tk <= kMaxTokens, op, "k", "has too many tokens for the CUDA kernel: ", tk);
  DSV2_CHECK(heads <= 65535, op, "q", "has more than 65535 heads, unsupported by the CUDA kernel: ", heads);
  DSV2_CHECK(batch <= 65535, op, "cu_seqlens_q", "holds more than 65535 sequences, unsupported by the CUDA kernel: ",
             batch);

  auto out = at::empty({tq, heads, kVDim}, q_in.options());
  auto lse = at::empty({heads, tq}, q_in.options().dtype(at::kFloat));
  // No sequence can be longer than the token count: a larger max_seqlen_q only adds CTAs that exit at once.
  const int64_t max_q = std::min(max_seqlen_q, tq);
  if (tq == 0 || heads == 0 || batch == 0 || max_q == 0) return {out, lse};

  const c10::cuda::CUDAGuard guard(q_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // 16-byte cp.async needs 16-byte aligned rows: a misaligned base or stride gets a contiguous copy (a dimension of
  // size 1 is never stepped, so its stride does not matter).
  const auto aligned = [](const at::Tensor& t) {
    if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
    for (int d = 0; d < 2; ++d)
      if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
    return true;
  };
  const at::Tensor q = aligned(q_in) ? q_in : q_in.contiguous();
  const at::Tensor k = aligned(k_in) ? k_in : k_in.contiguous();
  const at::Tensor v = aligned(v_in) ? v_in : v_in.contiguous();

  PrefillParams p{};
  p.q = reinterpret_cast<const __nv_bfloat16*>(q.data_ptr());
  p.k = reinterpret_cast<const __nv_bfloat16*>(k.data_ptr());
  p.v = reinterpret_cast<const __nv_bfloat16*>(v.data_ptr());
  p.q_s0 = q.stride(0);
  p.q_s1 = q.stride(1);
  p.k_s0 = k.stride(0);
  p.k_s1 = k.stride(1);
  p.v_s0 = v.stride(0);
  p.v_s1 = v.stride(1);
  p.cu_q = cu_seqlens_q.data_ptr<int>();
  p.cu_k = cu_seqlens_k.data_ptr<int>();
  p.out = reinterpret_cast<__nv_bfloat16*>(out.data_ptr());
  p.lse = lse.data_ptr<float>();
  p.tq = static_cast<int>(tq);
  p.tk = static_cast<int>(tk);
  p.heads = static_cast<int>(heads);
  p.causal = causal ? 1 : 0;
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.batch = static_cast<int>(batch);

  // Persistent grid: one CTA per SM (at most one per work item, by max_seqlen_q's count), taking items from a counter
  // in global memory that a memset node zeroes first (stream-ordered and CUDA-graph safe, no host sync). The item
  // count itself is never needed on the host: the kernel walks cu_seqlens_q to find the end.
  const int64_t max_items = heads * batch * ((max_q + kBlockM - 1) / kBlockM);
  const int64_t ctas = std::min<int64_t>(sm_count(q_in.get_device()), max_items);
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, ctas)));
  auto next_item = at::empty({1}, q_in.options().dtype(at::kInt));
  C10_CUDA_CHECK(cudaMemsetAsync(next_item.data_ptr(), 0, sizeof(int), stream));
  p.next_item = reinterpret_cast<unsigned*>(next_item.data_ptr<int>());
  if (pingpong_enabled()) launch_prefill<true>(p, grid, stream);
  else launch_prefill<false>(p, grid, stream);
  return {out, lse};
}

}  // namespace dsv2
