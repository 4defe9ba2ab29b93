// fp8_grouped_gemm_contiguous, our own sm_90a kernel (the default; DSV2_FP8_GEMM_IMPL=cutlass runs CUTLASS's,
// measured in benchmarks/RESULTS.md): row r of a [R, K] times expert row_expert[r]'s weight [N, K], block-scaled e4m3
// in, bf16 out. Same inputs, outputs and unwritten rows as fp8_grouped_gemm_contiguous.cu (the segment scan is
// shared: contiguous_segments.cuh).
//
// One persistent CTA per SM, 384 threads:
//   * warp 8 is the producer. For each K block of each tile of this CTA it fills one stage of a ring of kStages: lane
//     0 issues the TMA loads of A (128 x 128 e4m3) and B (BN x 128 e4m3), both 128-byte swizzled, and all 32 lanes
//     cp.async the tile's 128 activation scales of that K block (lanes 0-3 also its up to four weight scales) into
//     the same stage. The consumers thus find their scales in shared memory once the stage is full, kStages K blocks
//     ahead of use, and never wait on a global load inside the K loop. The scales travel by cp.async rather than as a
//     third TMA box because an fp32 scale map with a 128 x 1 box raised "illegal instruction" on the H200.
//   * warpgroups 0 and 1 are the consumers, rows 0-63 and 64-127 of the 128-row tile. Per K block, four k32 e4m3
//     wgmmas into partial fp32 accumulators, then the promotion final += partial * (a_scale[row] * b_scale[k block,
//     column block]) in fp32. A warpgroup's BN columns are two halves, lo and hi (wgmma N = BN / 2, a partial
//     accumulator and a commit group each), software-pipelined across K blocks: the wgmmas of lo(k) run while
//     hi(k - 1) is promoted, those of hi(k) while lo(k) is promoted. With one N = BN group per K block (the previous
//     loop, still used by half tiles), nothing of a warpgroup was in flight during its own promotion, and the two
//     warpgroups did not take turns on the tensor core as intended: a K block took ~1080 cycles for 768 of tensor
//     work (ncu, /work/notes/gemm_v2lite_analysis.md). Each half is waited for with wait_group 0 before its
//     accumulators are read (a read after wait_group 1 with the other half's group in flight across the loop's
//     back-edge makes ptxas serialize every wgmma of the kernel), and a stage is released once both halves that read
//     it have retired.
//   * warps 9 and 10 are the store warps, one per consumer warpgroup (warp 11 exits at once). They take the epilogue's
//     global stores off the consumers, which start the next tile's K loop instead.
//
// Weight scales: b_scale has one value per 128 columns, so a BN 192 tile can straddle two scale blocks, the second
// starting at tile column 128 or 64 (n0 is a multiple of 64). The K loop is instantiated once per split point, which
// makes the block of every 8-column accumulator group a compile-time fact: the promotion is 4 FMUL + BN / 2 FFMA per
// K block, without selects.
//
// Epilogue: after its last K block, consumer warpgroup wg writes its 64 rows as bf16 into its own padded staging
// buffer, and store warp 9 + wg copies the valid rows and columns from there to global memory with 16-byte loads and
// stores. The hand-over goes through two mbarriers per staging buffer (out_full: the rows are staged; out_empty: the
// store warp has read them), and every thread arrives on them for its own accesses instead of one lane after
// __syncwarp, which racecheck does not accept as ordering the other lanes' shared-memory accesses.
//
// Tiles: expert e's valid rows [first_e, first_e + m_e) form ceil(m_e / 128) m-blocks (padding rows are never
// computed: whole padding blocks have no tile), times ceil(N / BN) n-blocks. Tile order: expert after expert; inside
// an expert n-block major, m-block minor, so the CTAs running at the same time share each B tile (read from HBM once)
// and the expert's few A blocks. CTA c takes tiles c, c + grid, ...
//
// Tail tiles (<= 64 valid rows, "half" tiles) load 64 A rows (a second A tensor map with a 64-row box) and split the
// columns instead of the rows: both warpgroups multiply the same 64 rows, warpgroup w by columns w BN / 2 .. (wgmma N
// = BN / 2) in one commit group per K block (not split into halves), so only the other warpgroup's wgmmas can hide
// a promotion.
//
// Tail pairs (the kTwoN kernel, chosen where experts average at most 2 m-blocks, e.g. V2 at 4096 tokens, whose
// ~154-row experts are one full m-block and a ~26-row tail): a half tile does half a full tile's tensor work per K
// block, runs ahead of the full tile that reads the same B tile, and the later reader misses L2 (V2 gate_up read its
// weights from DRAM twice, the kernel DRAM-bound). There, an expert's tail is computed over two n-blocks at once
// (warpgroup w: n-block nb + w, B of both in the stage), a full tile's work, and ordered right after the two n-blocks'
// full tiles: the CTAs reading one B tile start together and keep the same pace.
//
// DSV2_FP8_GEMM_CLUSTER=1 runs clusters of 2 CTAs that share a tile operand by multicast. It is off by default: on the
// H200 it measured slower than the unclustered kernel. A cluster takes "units" of two tiles. N pairs
// (DSV2_FP8_GEMM_PAIR=n): n-blocks 2j, 2j + 1 of one m-block, rank r computing n-block 2j + r; each CTA loads half of
// the A rows (64, or 32 of a <= 64-row tail) and multicasts them into both CTAs, so A costs each SM half the L2 bytes.
// With an odd n-block count the last n-block of an expert's m-blocks is paired along M instead. M pairs
// (DSV2_FP8_GEMM_PAIR=m, and the automatic choice where experts average at most 2 m-blocks): m-blocks 2i, 2i + 1 of
// one n-block, rank r the second; the two tiles share B and each CTA loads half of its rows for both. An odd m-block
// count leaves rank 1 without a tile on the last pair (it still loads its half of B for rank 0). Because either CTA's
// TMA writes the other's stage, a stage is refilled only once the consumers of BOTH CTAs released it: each consumer
// warp arrives on its own and on the peer's empty barrier (16 arrivals a phase). Every fill of a stage delivers bytes
// to both CTAs and each CTA's full barrier needs both CTAs' fills, so neither CTA can use a stage again before both
// producers saw its previous release complete: no arrival of a later use can be counted in an earlier phase. Before
// exiting, each producer waits every stage's last release (the peer's remote arrivals must land while this CTA's
// shared memory still exists).

#include <cuda.h>
#include <cuda_bf16.h>

#include <type_traits>

#include "../common/pdl.cuh"
#include "../common/sm90.cuh"
#include "contiguous_segments.cuh"
#include "gemm_common.cuh"

namespace dsv2 {
namespace fp8 {
namespace {

using sm90::cluster_ctarank;
using sm90::cluster_id_x;
using sm90::cluster_sync;
using sm90::fence_mbar_init;
using sm90::fence_regs;
using sm90::mbar_arrive;
using sm90::mbar_arrive_cluster;
using sm90::mbar_arrive_expect_tx;
using sm90::mbar_init;
using sm90::mbar_wait;
using sm90::mbar_wait_cluster;
using sm90::num_clusters_x;
using sm90::setmaxnreg_dec;
using sm90::setmaxnreg_inc;
using sm90::smem_u32;
using sm90::tma_load_2d;
using sm90::tma_load_2d_multicast;
using sm90::tma_load_3d;
using sm90::tma_load_3d_multicast;
using sm90::tma_prefetch_desc;
using sm90::wgmma_commit;
using sm90::wgmma_fence;
using sm90::wgmma_wait;

constexpr int kBM = 128;                  // rows per tile: two consumer warpgroups x 64
constexpr int kBK = kBlock;               // K per stage = the scale group: one promotion per stage
constexpr int kMaxExperts = 256;          // segments kept in shared memory (more: the CUTLASS kernel runs)
constexpr int kThreads = 384;             // consumers: threads 0..255, producer and store warps: 256..383
constexpr int kConsumerWarps = 8;         // arrivals per empty barrier phase
constexpr int kProducerRegs = 40, kConsumerRegs = 232;
static_assert(128 * kProducerRegs + 256 * kConsumerRegs <= 384 * 168, "register reallocation exceeds the budget");
constexpr int kSmemLimit = 232448;        // 227 KB opt-in per block on sm_90

// ---- FP8 wgmma shapes: D[64 x N] (+)= A[64 x 32] * B[32 x N], e4m3 inputs K-major in shared memory, fp32 D ----------
__device__ __forceinline__ void wgmma_m64n64k32_e4m3(float (&d)[32], uint64_t desc_a, uint64_t desc_b,
                                                        int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31},"
      " %32, %33, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_m64n96k32_e4m3(float (&d)[48], uint64_t desc_a, uint64_t desc_b,
                                                        int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %50, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n96k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47},"
      " %48, %49, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// N = BN / 2: one column half of a warpgroup's 64 rows of a full tile (or tail pair), or its half of the columns of
// a <= 64-row tile.
template <int N>
__device__ __forceinline__ void wgmma_fp8(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  static_assert(N == 64 || N == 96, "instantiated wgmma N: 64, 96");
  if constexpr (N == 64) wgmma_m64n64k32_e4m3(d, desc_a, desc_b, scale_d);
  else wgmma_m64n96k32_e4m3(d, desc_a, desc_b, scale_d);
}

// Shared-memory plan of one BN (offsets from a 1024-byte aligned base: the 128-byte swizzle is computed from address
// bits, so every swizzled tile starts 1024-aligned). A stage holds A at its start and B after it: after the 128 A rows
// of a full (or half) tile, or, with kTwoN, after the 64 A rows of a tail tile, followed by the second n-block's B.
// Each stage also holds the tile's activation scales and its (up to four) weight scales, written by the producer warp
// with cp.async.
template <int BN, bool kTwoN>
struct Plan {
  static constexpr int kABytes = kBM * kBK;         // 16 KB
  static constexpr int kBBytes = BN * kBK;          // 16 / 24 KB
  static constexpr int kTailB = kABytes / 2;        // B's offset in a tail tile's stage (after 64 A rows)
  static constexpr int kStageBytes =
      kTwoN && kTailB + 2 * kBBytes > kABytes + kBBytes ? kTailB + 2 * kBBytes : kABytes + kBBytes;
  static constexpr int kSfaBytes = kBM * 4;         // a_scale of each tile row
  static constexpr int kSfbBytes = 16;              // b_scale of up to four column blocks
  static constexpr int kOutPitch = BN * 2 + 16;     // staged bf16 row: +16 bytes keeps the fragment stores
                                                    // conflict-free (rows 4 banks apart) and rows 16-byte aligned
  static constexpr int kOutBytes = kBM * kOutPitch;
  static constexpr int kSegBytes = (3 * kMaxExperts + 1) * 4;  // first[E], m[E], unit prefix[E + 1]
  static constexpr int kFixed = kOutBytes + kSegBytes + 256;    // + mbarriers
  static constexpr int kPerStage = kStageBytes + kSfaBytes + kSfbBytes;
  static constexpr int kStages = (kSmemLimit - 1024 - kFixed) / kPerStage > 6 ? 6 : (kSmemLimit - 1024 - kFixed) / kPerStage;
  static constexpr int kOut = kStages * kStageBytes;  // stage s at s * kStageBytes
  static constexpr int kSfa = kOut + kOutBytes;     // [kStages][128] fp32
  static constexpr int kSfb = kSfa + kStages * kSfaBytes;  // [kStages][4] fp32
  static constexpr int kSeg = kSfb + kStages * kSfbBytes;
  static constexpr int kBar = (kSeg + kSegBytes + 7) / 8 * 8;  // full[kStages], empty[kStages], out_full[2],
                                                               // out_empty[2]
  static constexpr int kBytes = kBar + (2 * kStages + 4) * 8;
  static constexpr int kDynamic = kBytes + 1024;    // + alignment slack of the dynamic shared-memory base
  static_assert(kBBytes % 1024 == 0 && kStageBytes % 1024 == 0 && kStages >= 3, "stage plan");
  static_assert(kOutPitch % 16 == 0, "staged rows are read with 16-byte loads");
  static_assert(kDynamic <= kSmemLimit, "shared memory");
};

struct Params {
  const int2* seg;          // [E] (first row, valid rows) from the scan
  const float* sfb;         // [E, N/128, K/128] weight scales
  const float* sfa;         // activation scales, column-major: (row r, k block kb) at kb * sfa_ld + r
  int sfa_ld;
  __nv_bfloat16* out;       // [R, N]
  int num_experts, rows, n, k_blocks, n_scale_blocks, n_tiles;  // rows = R, n_tiles = ceil(N / BN)
  int pair_m;               // clusters only: units are m-block pairs sharing B (1) or n-block pairs sharing A (0)
};

// A tile's kind. kFullTile: up to 128 rows, warpgroup w rows 64 w.., all BN columns. kHalfTile: <= 64 rows (an
// expert's tail), both warpgroups on the same rows, warpgroup w columns w BN / 2... kTailPair: an expert's tail
// (<= 64 rows) over two n-blocks, warpgroup w the n-block nb + w (kTwoN kernels only).
enum TileKind { kFullTile, kHalfTile, kTailPair };

// One output tile of this CTA: expert e, rows [row0, row0 + rows) of a and out (rows <= 128 valid), columns [n0, n0 +
// BN). has_n: this CTA computes it (false only for rank 1's idle half of a cluster unit); share_a / share_b: the
// cluster's two tiles have the same A / B tile, each CTA loads half of it for both.
struct Tile {
  int e, row0, rows, n0, kind;
  bool has_n, share_a, share_b;
};

// Units of an expert with `blocks` m-blocks: one per tile without clusters; with 2-CTA clusters, n-block pairs of
// each m-block plus, for an odd n-block count, the last n-block's m-blocks two by two.
// pair_m (2-CTA clusters, Params::pair_m): every unit is a pair of m-blocks 2i, 2i + 1 of one n-block sharing the B
// tile (an odd m-block count leaves rank 1 idle on the last pair), instead of n-block pairs sharing A.
// kTwoN (no clusters): an expert whose last m-block has <= 64 rows (a tail) has its other m-blocks' tiles plus one
// tail tile per pair of n-blocks (and a kHalf tail tile for the last n-block of an odd count).
template <int kCluster, bool kTwoN>
__device__ __forceinline__ int expert_units(int m, int n_tiles, int pair_m) {
  const int blocks = (m + kBM - 1) / kBM;
  if constexpr (kTwoN) {
    const int tail = m > 0 && m - (blocks - 1) * kBM <= 64 ? 1 : 0;
    return (blocks - tail) * n_tiles + tail * ((n_tiles + 1) >> 1);
  } else if constexpr (kCluster == 1) return blocks * n_tiles;
  else if (pair_m) return n_tiles * ((blocks + 1) >> 1);
  else return blocks * (n_tiles >> 1) + ((n_tiles & 1) ? (blocks + 1) >> 1 : 0);
}

// Unit t of the order described at the top, as seen by cluster rank `rank`. s_unit[e] = units of the experts before
// e (s_unit[kMaxExperts] = all).
template <int BN, int kCluster, bool kTwoN>
__device__ __forceinline__ Tile decode_tile(int t, int rank, const int* s_first, const int* s_m, const int* s_unit,
                                            int n_tiles, int pair_m) {
  int lo = 0, hi = kMaxExperts - 1;  // first e with s_unit[e + 1] > t (experts without rows are never picked)
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (s_unit[mid + 1] > t) hi = mid;
    else lo = mid + 1;
  }
  const int blocks = (s_m[lo] + kBM - 1) / kBM;
  const int local = t - s_unit[lo];
  Tile tile;
  int mb, nb;
  tile.has_n = true;
  tile.share_a = tile.share_b = false;
  tile.kind = kFullTile;
  if constexpr (kTwoN) {
    // Per pair j of n-blocks (2j, 2j + 1): the full m-blocks of n-block 2j, those of 2j + 1, then the tail tile of
    // both; so the tiles that read one B tile are consecutive units, run by CTAs at the same time, and all of them do
    // a full tile's tensor work per K block: they stay in step, and the second reader of B finds it in L2.
    const int tail = s_m[lo] - (blocks - 1) * kBM <= 64 ? 1 : 0;
    const int full = blocks - tail;
    const int j = local / (2 * full + tail), r = local - j * (2 * full + tail);
    const int nbs = min(2, n_tiles - 2 * j);  // n-blocks in this pair (1 for the last of an odd count)
    if (r < nbs * full) {
      nb = 2 * j + r / full;
      mb = r % full;
    } else {
      nb = 2 * j;
      mb = full;
      tile.kind = nbs == 2 ? kTailPair : kHalfTile;
    }
  } else if constexpr (kCluster == 1) {
    nb = local / blocks;  // n-block major, m-block minor
    mb = local - nb * blocks;
  } else if (pair_m) {
    const int pairs = (blocks + 1) >> 1;  // n-block major, m-block pair minor
    nb = local / pairs;
    mb = 2 * (local - nb * pairs) + rank;
    tile.share_b = true;
    tile.has_n = mb < blocks;
    if (!tile.has_n) mb = blocks - 1;  // keeps the fields valid; only the shared B half is loaded
  } else {
    const int paired = blocks * (n_tiles >> 1);
    if (local < paired) {
      const int np = local / blocks;
      mb = local - np * blocks;
      nb = 2 * np + rank;
      tile.share_a = true;
    } else {
      mb = 2 * (local - paired) + rank;
      nb = n_tiles - 1;
      tile.share_b = true;
      tile.has_n = mb < blocks;
      if (!tile.has_n) mb = blocks - 1;  // keeps the fields valid; only the shared B half is loaded
    }
  }
  tile.e = lo;
  tile.row0 = s_first[lo] + mb * kBM;
  tile.rows = min(kBM, s_m[lo] - mb * kBM);
  tile.n0 = nb * BN;
  if (tile.rows <= 64 && tile.kind == kFullTile) tile.kind = kHalfTile;
  return tile;
}

// ---- helpers: cp.async of the scales, wgmma descriptors -------------------------------------------------------------
// 4-byte cp.async global -> shared (generic proxy; completion tracked by the mbarrier below, not by commit groups).
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
// One arrival on `bar` once every earlier cp.async of this thread has landed; .noinc: the arrival is one of those
// counted at the barrier's initialisation.
__device__ __forceinline__ void cp_async_arrive_noinc(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Low / high words of a K-major 128-byte-swizzled wgmma descriptor (sm90::smem_desc with LBO 16): building the
// 64-bit value from a 32-bit low word lets the +32-byte K steps be 32-bit adds (the address field cannot carry: it
// is 14 bits of a shared-memory address below 256 KB, and the steps stay inside the stage).
__device__ __forceinline__ uint32_t desc_lo(uint32_t addr) { return ((addr & 0x3FFFF) >> 4) | (1u << 16); }
__device__ __forceinline__ uint64_t desc_of(uint32_t lo) {
  return (static_cast<uint64_t>((1024 >> 4) | (1u << 30)) << 32) | lo;
}

// The GEMM kernel (roles and tile order at the top of the file). Barriers, all in shared memory:
//   * full[s]: 1 + 32 arrivals, producer lane 0's expect_tx with the stage's TMA bytes and one
//     cp.async.mbarrier.arrive.noinc per producer lane (every lane, every K block, whether it copied scales or not),
//     so the phase completes only when A, B and the scales of the stage have all landed;
//   * empty[s]: one arrival per consumer thread, once its warpgroup's wgmmas (of both column halves) have read the
//     stage and its scales are in registers (a CTA without a tile in its cluster unit releases it unread), plus with
//     clusters one per consumer warp of the peer CTA. Every thread arrives for its own scale reads: racecheck does
//     not accept one elected arrival after __syncwarp as ordering the other lanes' reads before the producer's next
//     cp.async into the stage;
//   * out_full[wg] / out_empty[wg]: the staging buffer of consumer warpgroup wg, 128 arrivals (every consumer thread
//     after its staging stores) / 32 arrivals (every store lane after its loads of the rows). The j-th use waits
//     out_empty with parity (j & 1) ^ 1 and out_full with parity j & 1, as the stage ring does. The consumers and
//     the store warp walk the same tile list and skip the same tiles (warpgroup without valid rows, or no tile for
//     this CTA), so their counts j agree.
template <int BN, int kCluster, bool kTwoN>
__global__ void __launch_bounds__(kThreads, 1)
    grouped_contiguous_kernel(const __grid_constant__ CUtensorMap tma_a, const __grid_constant__ CUtensorMap tma_a64,
                              const __grid_constant__ CUtensorMap tma_a32, const __grid_constant__ CUtensorMap tma_b,
                              const __grid_constant__ CUtensorMap tma_bh,
                              const Params p) {
  static_assert(!(kTwoN && kCluster > 1), "tail pairs run without clusters");
  using P = Plan<BN, kTwoN>;
  constexpr int kFullArrivals = 1 + 32;  // producer lane 0's expect_tx + one cp.async arrival per producer lane
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  const uint32_t base = smem_u32(smem);
  int* s_first = reinterpret_cast<int*>(smem + P::kSeg);
  int* s_m = s_first + kMaxExperts;
  int* s_unit = s_m + kMaxExperts;  // kMaxExperts + 1 entries
  auto full_bar = [&](int s) { return base + P::kBar + 8 * s; };
  auto empty_bar = [&](int s) { return base + P::kBar + 8 * (P::kStages + s); };
  auto out_full = [&](int w) { return base + P::kBar + 8 * (2 * P::kStages + w); };
  auto out_empty = [&](int w) { return base + P::kBar + 8 * (2 * P::kStages + 2 + w); };

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (tid == 256) {
    for (int s = 0; s < P::kStages; ++s) {
      mbar_init(full_bar(s), kFullArrivals);
      mbar_init(empty_bar(s), 32 * kConsumerWarps + (kCluster - 1) * kConsumerWarps);  // + the peer's warps
    }
    for (int w = 0; w < 2; ++w) {
      mbar_init(out_full(w), 128);  // every thread of the warpgroup (its own staging stores)
      mbar_init(out_empty(w), 32);  // every lane of the store warp (its own loads)
    }
    fence_mbar_init();
    tma_prefetch_desc(&tma_a);
    tma_prefetch_desc(&tma_a64);
    tma_prefetch_desc(&tma_b);
    if constexpr (kCluster > 1) {
      tma_prefetch_desc(&tma_a32);
      tma_prefetch_desc(&tma_bh);
    }
  }
  // Everything above may overlap the scan kernel (programmatic launch); its segments are read below.
  griddep_wait();
  for (int e = tid; e < kMaxExperts; e += kThreads) {
    const int2 seg = e < p.num_experts ? p.seg[e] : make_int2(0, 0);
    s_first[e] = seg.x;
    s_m[e] = seg.y;
  }
  __syncthreads();
  if (warp == 0) {  // unit prefix: lane l sums experts 8l .. 8l + 7, then a warp scan of the lane totals
    static_assert(kMaxExperts == 32 * 8, "one warp, 8 experts per lane");
    int blocks[8], sum = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      blocks[j] = expert_units<kCluster, kTwoN>(s_m[8 * lane + j], p.n_tiles, p.pair_m);
      sum += blocks[j];
    }
    int incl = sum;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += v;
    }
    int run = incl - sum;
    if (lane == 0) s_unit[0] = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      run += blocks[j];
      s_unit[8 * lane + j + 1] = run;
    }
  }
  __syncthreads();  // also publishes the barrier initialisation
  // The peer's barriers must be initialised before this CTA's multicasts or remote arrivals reach them.
  if constexpr (kCluster > 1) cluster_sync();
  const int rank = kCluster > 1 ? static_cast<int>(cluster_ctarank()) : 0;
  // The tile loops' bounds are read afresh where they are used (asm volatile / a volatile shared-memory load: not
  // merged with a read before the role split). Carried across the role split and setmaxnreg, the tile counter and
  // the unit count were kept in local memory by ptxas: an LDL at the head of every tile's decode (its critical path)
  // and LDL (+ STL) at the end of every tile, which the ncu run on main showed waiting ~580 cycles per tile
  // (long_scoreboard: L1 is mostly carved out as shared memory).
  auto num_units = [&] { return *reinterpret_cast<const volatile int*>(s_unit + kMaxExperts); };
  auto first_unit = [] {
    uint32_t r;
    if constexpr (kCluster > 1) r = cluster_id_x();
    else asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(r));
    return static_cast<int>(r);
  };
  const int unit_stride = kCluster > 1 ? static_cast<int>(num_clusters_x()) : static_cast<int>(gridDim.x);

  if (warp >= kConsumerWarps) {
    // ---- producer: warp 8 (lane 0 the TMA loads, all lanes the scales); store warps 9, 10; warp 11 leaves ----
    setmaxnreg_dec<kProducerRegs>();
    if (warp == kConsumerWarps + 1 || warp == kConsumerWarps + 2) {
      // Store warp 9 + w: the staged rows of consumer warpgroup w, tile after tile in the consumers' order, to global
      // memory: 4 chunks of 16 bytes per lane in flight (loads first, then stores). Full tile: rows 64 w .. of the
      // tile, BN columns; half tile (<= 64 rows): rows 0.. and columns w BN / 2 .. (BN / 2 of them); tail pair:
      // rows 0.. and columns w BN .. (BN of them).
      const int w = warp - (kConsumerWarps + 1);
      const uint8_t* src = smem + P::kOut + 64 * w * P::kOutPitch;
      // kChunks 16-byte chunks per staged row; `chunks` of them are inside N, `rows` rows are valid.
      auto copy_rows = [&](auto chunks_per_row, __nv_bfloat16* dst, int rows, int chunks) {
        constexpr int kChunks = decltype(chunks_per_row)::value;
        const int total = rows * kChunks;  // chunks of the rows, those past N included
        // Lane l walks chunks l, l + 32, ... of the rows: (row r, chunk c), advanced incrementally.
        int r = lane / kChunks, c = lane % kChunks;
        for (int i0 = 0; i0 < total; i0 += 4 * 32) {
          uint4 v[4];
          int off[4];
          bool ok[4];
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            ok[u] = r < rows && c < chunks;
            if (ok[u]) v[u] = *reinterpret_cast<const uint4*>(src + r * P::kOutPitch + 16 * c);
            off[u] = r * p.n + 8 * c;
            c += 32 % kChunks;
            r += 32 / kChunks;
            if (c >= kChunks) {
              c -= kChunks;
              ++r;
            }
          }
#pragma unroll
          for (int u = 0; u < 4; ++u)
            if (ok[u]) *reinterpret_cast<uint4*>(dst + off[u]) = v[u];
        }
      };
      uint32_t uses = 0;
      for (int t = first_unit(); t < num_units(); t += unit_stride) {
        const Tile tile = decode_tile<BN, kCluster, kTwoN>(t, rank, s_first, s_m, s_unit, p.n_tiles, p.pair_m);
        if (!tile.has_n) continue;  // exactly the tiles where the consumers stage nothing
        const bool half = tile.kind == kHalfTile, full = tile.kind == kFullTile;
        const int col0 = tile.n0 + (half ? w * (BN / 2) : full ? 0 : w * BN);
        const int rows = full ? min(tile.rows - 64 * w, 64) : tile.rows;
        __nv_bfloat16* dst = p.out + static_cast<int64_t>(tile.row0 + (full ? 64 * w : 0)) * p.n + col0;
        const int chunks = (p.n - col0) / 8;  // chunks inside N from col0 (N % 8 == 0; <= 0: none)
        mbar_wait(out_full(w), uses & 1);
        if (half) copy_rows(std::integral_constant<int, BN / 16>{}, dst, rows, min(BN / 16, chunks));
        else copy_rows(std::integral_constant<int, BN / 8>{}, dst, rows, min(BN / 8, chunks));
        // Every lane releases its own loads: an elected arrival after __syncwarp is not ordered for racecheck
        // (the same finding as in the decode kernels).
        mbar_arrive(out_empty(w));
        ++uses;
      }
      return;
    }
    if (warp != kConsumerWarps) return;
    int stage = 0;
    uint32_t phase = 0;
    auto advance = [&] {
      if (++stage == P::kStages) {
        stage = 0;
        phase ^= 1;
      }
    };
    for (int t = first_unit(); t < num_units(); t += unit_stride) {
      const Tile tile = decode_tile<BN, kCluster, kTwoN>(t, rank, s_first, s_m, s_unit, p.n_tiles, p.pair_m);
      // A tile whose valid rows fit in 64 loads only those 64 A rows (both consumer warpgroups read them); a tail
      // pair loads them and two n-blocks of B.
      const bool half = tile.rows <= 64, pair = tile.kind == kTailPair;
      // Bytes this CTA receives per stage (boxes count whole): its A rows, B and scales, shared halves from both
      // CTAs' multicasts; a CTA without a tile receives only the shared B.
      const uint32_t a_bytes = half ? P::kABytes / 2 : P::kABytes;
      const uint32_t tx = P::kBBytes * (pair ? 2 : 1) + (tile.has_n ? a_bytes : 0);
      constexpr uint16_t kPair = (1u << kCluster) - 1;
      // Scales of this CTA's tile: lane l copies rows l, l + 32 (and l + 64, l + 96 of a full tile) of the
      // column-major activation scales (rows past R, which are never stored, read row R - 1), lane b < 4 the weight
      // scale of the tile's column block b (clamped to a valid block past N, never stored): blocks 0 / 1 (BN 192:
      // a tile can straddle two), 0..3 for a tail pair's 2 BN columns.
      const int sb_col = tile.n0 / kBlock;
      const float* sfb_k = p.sfb + (static_cast<int64_t>(tile.e) * p.n_scale_blocks +
                                    min(sb_col + (lane & 3), p.n_scale_blocks - 1)) * p.k_blocks;
      const bool copy_sfb = tile.has_n && (lane == 0 || (BN % kBlock != 0 && lane == 1) || (pair && lane < 4));
      const int sfa_rows = half ? 2 : 4;  // x 32 rows
      int sfa_row[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) sfa_row[j] = min(tile.row0 + lane + 32 * j, p.rows - 1);
      for (int kb = 0; kb < p.k_blocks; ++kb) {
        // The consumers released this stage's previous use (with clusters: those of both CTAs, since this CTA's
        // multicast writes the peer's stage too).
        if constexpr (kCluster > 1) mbar_wait_cluster(empty_bar(stage), phase ^ 1);
        else mbar_wait(empty_bar(stage), phase ^ 1);
        const uint32_t full = full_bar(stage);
        if (lane == 0) {
          mbar_arrive_expect_tx(full, tx);
          const uint32_t a_dst = base + stage * P::kStageBytes;
          const uint32_t b_dst = a_dst + (pair ? P::kTailB : P::kABytes);
          if (tile.share_a) {
            // Rank r: rows part * r .. part * r + part - 1 of the tile into both CTAs. A box starting past R (a tail
            // of <= 32 rows at the end of a) is moved back inside: it then fills rows that are never stored.
            const int part = half ? 32 : 64;
            tma_load_2d_multicast(a_dst + rank * part * kBK, half ? &tma_a32 : &tma_a64, full, kb * kBK,
                                  min(tile.row0 + part * rank, p.rows - 1), kPair);
          } else if (tile.has_n) {
            tma_load_2d(a_dst, half ? &tma_a64 : &tma_a, full, kb * kBK, tile.row0);
          }
          if (tile.share_b) {  // rank r: B rows BN/2 * r .. of the n-block (clamped like A: columns never stored)
            tma_load_3d_multicast(b_dst + rank * (BN / 2) * kBK, &tma_bh, full, kb * kBK,
                                  min(tile.n0 + (BN / 2) * rank, p.n - 1), tile.e, kPair);
          } else {
            tma_load_3d(b_dst, &tma_b, full, kb * kBK, tile.n0, tile.e);
            if (pair) tma_load_3d(b_dst + P::kBBytes, &tma_b, full, kb * kBK, tile.n0 + BN, tile.e);
          }
        }
        if (tile.has_n) {
          const float* col = p.sfa + static_cast<int64_t>(kb) * p.sfa_ld;
          const uint32_t sfa_dst = base + P::kSfa + stage * P::kSfaBytes + 4 * lane;
#pragma unroll
          for (int j = 0; j < 4; ++j)
            if (j < sfa_rows) cp_async_4(sfa_dst + 128 * j, col + sfa_row[j]);
        }
        if (copy_sfb) cp_async_4(base + P::kSfb + stage * P::kSfbBytes + 4 * lane, sfb_k + kb);
        cp_async_arrive_noinc(full);  // every lane, every stage: the barrier counts 32 of these
        advance();
      }
    }
    if constexpr (kCluster > 1) {
      // Wait for the last release of every stage: after it no arrival (the peer's remote ones included) and no
      // multicast of this CTA is still on its way into shared memory that would no longer exist.
      for (int s = 0; s < P::kStages; ++s) {
        mbar_wait_cluster(empty_bar(stage), phase ^ 1);
        advance();
      }
    }
    return;
  }

  // ---- consumers: warpgroup wg owns rows 64 wg .. 64 wg + 63 of each tile ----
  setmaxnreg_inc<kConsumerRegs>();
  const int wg = tid / 128, wq = (tid % 128) / 32;
  const int frag_row = 64 * wg + 16 * wq + lane / 4;  // accumulator rows frag_row and frag_row + 8 (tile rows)
  uint8_t* out_stage = smem + P::kOut;
  const float* s_sfa = reinterpret_cast<const float*>(smem + P::kSfa);
  const float* s_sfb = reinterpret_cast<const float*>(smem + P::kSfb);
  int stage = 0;
  uint32_t phase = 0, out_uses = 0;
  const uint32_t peer = static_cast<uint32_t>(rank ^ 1);
  const uint32_t d_stage0 = desc_lo(base);  // descriptor low word of stage 0's start; a stage is kStageBytes further
  // The stage's operands and scales are read: this thread's arrival on this CTA's empty barrier and, with clusters,
  // one per warp on the peer's (whose producer's multicasts also write this stage).
  auto release = [&](int s) {
    mbar_arrive(empty_bar(s));
    if constexpr (kCluster > 1) {
      __syncwarp();
      if (lane == 1) mbar_arrive_cluster(empty_bar(s), peer);
    }
  };
  auto advance = [&] {
    if (++stage == P::kStages) {
      stage = 0;
      phase ^= 1;
    }
  };
  // The K loop and the epilogue of this warpgroup's part of an active tile: 64 rows x kN columns, A at byte a_off of
  // each stage (its 64 rows), B at b_off (its kN columns), `row` the first of its fragment rows among the stage's
  // activation scales, weight scales sbb and sbb + 1 of the stage's four: kFormer = 8-column groups (from the left)
  // that use sbb, the others sbb + 1. The accumulators are local to each instantiation, so a half tile's smaller ones
  // do not share registers with the full tiles'.
  auto mainloop = [&](auto n, auto former, uint32_t a_off, uint32_t b_off, int row, int sbb) {
    constexpr int kN = decltype(n)::value, kGroups = kN / 8;
    constexpr int kFormer = decltype(former)::value;
    float f[kN / 2];  // the promoted sums
    const uint32_t da_0 = d_stage0 + (a_off >> 4), db_0 = d_stage0 + (b_off >> 4);
#pragma unroll
    for (int i = 0; i < kN / 2; ++i) f[i] = 0.f;
    // This thread's promotion factors for stage s: the activation scales of its fragment rows (row, row + 8) times
    // the weight scale of the column groups below kFormer (sc[0], sc[1]) and of the others (sc[2], sc[3]).
    auto load_scales = [&](int s, float (&sc)[4]) {
      const float sa_lo = s_sfa[s * kBM + row], sa_hi = s_sfa[s * kBM + row + 8];
      const float sb0 = s_sfb[s * 4 + sbb];
      const float sb1 = kFormer < kGroups ? s_sfb[s * 4 + sbb + 1] : sb0;
      sc[0] = sa_lo * sb0;
      sc[1] = sa_hi * sb0;
      sc[2] = sa_lo * sb1;
      sc[3] = sa_hi * sb1;
    };
    // One commit group: stage s's four k32 wgmmas of the warpgroup's columns from b_col (descriptor units of 16
    // bytes past b_off), wgmma N = the columns of d (2 per accumulator register of a thread).
    auto issue = [&](auto& d, int s, uint32_t b_col) {
      constexpr int kW = 2 * static_cast<int>(std::extent_v<std::remove_reference_t<decltype(d)>>);
      const uint32_t da = da_0 + s * (P::kStageBytes >> 4), db = db_0 + b_col + s * (P::kStageBytes >> 4);
      wgmma_fence();  // d was read by the last promotion
#pragma unroll
      for (int k = 0; k < kBK / 32; ++k) wgmma_fp8<kW>(d, desc_of(da + 2 * k), desc_of(db + 2 * k), k);
      wgmma_commit();
    };
    // f's column groups g0 .. (8 columns each) += d * their factor. g0 is a compile-time constant, so whether a group
    // is before the weight-scale split is too: no selects.
    auto promote = [&](auto g0, const auto& d, const float (&sc)[4]) {
      constexpr int kG0 = decltype(g0)::value;
      constexpr int kW = 2 * static_cast<int>(std::extent_v<std::remove_reference_t<decltype(d)>>);
#pragma unroll
      for (int j = 0; j < kW / 8; ++j) {  // column group i = g0 + j: columns 8i .. 8i + 7
        const int i = kG0 + j;
        const float lo = i < kFormer ? sc[0] : sc[2], hi = i < kFormer ? sc[1] : sc[3];
        f[4 * i + 0] = fmaf(d[4 * j + 0], lo, f[4 * i + 0]);
        f[4 * i + 1] = fmaf(d[4 * j + 1], lo, f[4 * i + 1]);
        f[4 * i + 2] = fmaf(d[4 * j + 2], hi, f[4 * i + 2]);
        f[4 * i + 3] = fmaf(d[4 * j + 3], hi, f[4 * i + 3]);
      }
    };
    using G0 = std::integral_constant<int, 0>;

    if constexpr (kN == BN) {
      // Full tile or tail pair: the kN columns as two halves, lo (groups 0 .. kGroups / 2 - 1) and hi, each with its
      // own partial accumulator and commit group (wgmma N = kN / 2), software-pipelined across K blocks so that one
      // half's wgmmas are in flight while the other half is promoted. K block kb >= 1:
      //   wait full(kb), read its scales -> wait hi(kb - 1) -> issue lo(kb) -> release stage kb - 1
      //   -> promote hi(kb - 1) -> wait lo(kb) -> issue hi(kb) -> promote lo(kb).
      // (The full-barrier wait and the scale loads go first, under hi(kb - 1).) Every wait is wait_group 0 and every
      // accumulator is read only after one: reading a half retired by a wait_group 1 while the other half's group
      // crosses the loop's back-edge makes ptxas serialize every wgmma of the kernel (C7514 / C7518).
      // Stage kb - 1 is released by every thread once both halves that read it have retired (the wait for
      // hi(kb - 1)) and its scales are in registers (sc). The release now also comes after the wait for stage kb to be
      // full; that cannot deadlock, since filling stage kb needed only releases of stages <= kb - kStages. The last
      // K block (the only one when k_blocks == 1) is waited for, released and promoted after the loop: nothing is in
      // flight and no stage is held past the tile, so the epilogue, the next tile and the !has_n path see the same
      // state as with one commit group per K block.
      constexpr int kH = kN / 2;
      constexpr uint32_t kHiCol = (kH * kBK) >> 4;  // B's hi half: kH rows of 128 bytes further (1024-aligned)
      using GHi = std::integral_constant<int, kGroups / 2>;
      float dl[kH / 2], dh[kH / 2];  // partials of lo and hi
      float sc[4], sn[4];            // factors of the K block being promoted, of the next one
      mbar_wait(full_bar(stage), phase);
      load_scales(stage, sc);
      issue(dl, stage, 0);  // lo(0)
      wgmma_wait<0>();
      fence_regs(dl);
      issue(dh, stage, kHiCol);  // hi(0), in flight while lo(0) is promoted
      promote(G0{}, dl, sc);
      for (int kb = 1; kb < p.k_blocks; ++kb) {
        const int prev = stage;
        advance();
        mbar_wait(full_bar(stage), phase);
        load_scales(stage, sn);
        wgmma_wait<0>();  // hi(kb - 1): stage kb - 1 is read by both halves
        fence_regs(dh);
        fence_regs(sc);
        issue(dl, stage, 0);  // lo(kb), in flight while hi(kb - 1) is promoted
        release(prev);        // only registers of stage kb - 1 from here
        promote(GHi{}, dh, sc);
#pragma unroll
        for (int i = 0; i < 4; ++i) sc[i] = sn[i];
        wgmma_wait<0>();  // lo(kb)
        fence_regs(dl);
        issue(dh, stage, kHiCol);  // hi(kb), in flight while lo(kb) is promoted
        promote(G0{}, dl, sc);
      }
      wgmma_wait<0>();  // hi of the last K block: nothing of this tile is in flight after this
      fence_regs(dh);
      fence_regs(sc);
      release(stage);
      advance();
      promote(GHi{}, dh, sc);
    } else {
      // Half tile (kN = BN / 2, an expert's <= 64-row tail): not split (yet). One commit group per K block, then its
      // promotion; only the other warpgroup's wgmmas can run under it.
      float d[kN / 2];  // the wgmmas' partial sums
      for (int kb = 0; kb < p.k_blocks; ++kb) {
        mbar_wait(full_bar(stage), phase);
        float sc[4];
        load_scales(stage, sc);  // the multiplications are scheduled under the wgmmas
        issue(d, stage, 0);
        wgmma_wait<0>();
        fence_regs(d);
        fence_regs(sc);  // the scale reads are complete before the release below
        release(stage);  // only registers from here
        promote(G0{}, d, sc);
        advance();
      }
    }

    // ---- epilogue: bf16 into this warpgroup's 64 staged rows, handed to the store warp (which knows the tile's
    // kind, hence where the staged rows and columns go) ----
    mbar_wait(out_empty(wg), (out_uses & 1) ^ 1);  // the store warp has read the previous tile's rows
    uint8_t* r_lo = out_stage + frag_row * P::kOutPitch + 4 * (lane % 4);
    uint8_t* r_hi = r_lo + 8 * P::kOutPitch;
#pragma unroll
    for (int i = 0; i < kGroups; ++i) {
      *reinterpret_cast<__nv_bfloat162*>(r_lo + 16 * i) = __floats2bfloat162_rn(f[4 * i + 0], f[4 * i + 1]);
      *reinterpret_cast<__nv_bfloat162*>(r_hi + 16 * i) = __floats2bfloat162_rn(f[4 * i + 2], f[4 * i + 3]);
    }
    mbar_arrive(out_full(wg));  // every thread releases its own staging stores
    ++out_uses;
  };
  using std::integral_constant;
  using FullN = integral_constant<int, BN>;
  using HalfN = integral_constant<int, BN / 2>;
  const int row_wg = frag_row - 64 * wg;  // fragment row of a tile whose warpgroups share the 64 A rows

  for (int t = first_unit(); t < num_units(); t += unit_stride) {
    const Tile tile = decode_tile<BN, kCluster, kTwoN>(t, rank, s_first, s_m, s_unit, p.n_tiles, p.pair_m);
    if (!tile.has_n) {
      // This CTA has no tile in its cluster unit: release every stage unread. Waiting for it first keeps this warp's
      // arrivals in step with the stage's uses.
      for (int kb = 0; kb < p.k_blocks; ++kb) {
        mbar_wait(full_bar(stage), phase);
        release(stage);
        advance();
      }
      continue;
    }
    // The weight-scale block changes at column 128 - c % 128 of a warpgroup whose columns start at c (a multiple of
    // 64 with BN 192, of 128 with BN 128): no change inside 128 columns from a multiple of 128, else after 64.
    if (tile.kind == kHalfTile) {  // both warpgroups: A rows 0-63, warpgroup w columns w BN / 2 ..
      const uint32_t b_off = P::kABytes + wg * (BN / 2) * kBK;
      if constexpr (BN % kBlock == 0) {
        mainloop(HalfN{}, integral_constant<int, BN / 16>{}, 0, b_off, row_wg, 0);
      } else {  // BN 192: columns 0-95 / 96-191 against a split at tile column 128 or 64
        const bool at128 = tile.n0 % kBlock == 0;
        if (wg == 0) {
          if (at128) mainloop(HalfN{}, integral_constant<int, 12>{}, 0, b_off, row_wg, 0);
          else mainloop(HalfN{}, integral_constant<int, 8>{}, 0, b_off, row_wg, 0);
        } else {
          if (at128) mainloop(HalfN{}, integral_constant<int, 4>{}, 0, b_off, row_wg, 0);
          else mainloop(HalfN{}, integral_constant<int, 0>{}, 0, b_off, row_wg, 0);
        }
      }
    } else {
      // Full tile: warpgroup w rows 64 w.., B at kABytes. Tail pair: both warpgroups A rows 0-63, warpgroup w the
      // n-block at columns n0 + w BN, its B at kTailB + w kBBytes and its weight scales from block (n0 + w BN) / 128.
      const bool pair = tile.kind == kTailPair;
      const int c0 = tile.n0 + (pair ? wg * BN : 0);
      const uint32_t a_off = pair ? 0 : wg * 64 * kBK;
      const uint32_t b_off = pair ? P::kTailB + wg * P::kBBytes : P::kABytes;
      const int row = pair ? row_wg : frag_row, sbb = c0 / kBlock - tile.n0 / kBlock;
      if constexpr (BN % kBlock == 0) {
        mainloop(FullN{}, integral_constant<int, BN / 8>{}, a_off, b_off, row, sbb);
      } else {
        if (c0 % kBlock == 0) mainloop(FullN{}, integral_constant<int, 16>{}, a_off, b_off, row, sbb);
        else mainloop(FullN{}, integral_constant<int, 8>{}, a_off, b_off, row, sbb);
      }
    }
  }
}

__global__ void __launch_bounds__(kScanThreads)
    segments_kernel(const int* __restrict__ row_expert, int rows, int num_experts, int* scratch, int2* seg) {
  find_contiguous_segments(row_expert, rows, num_experts, scratch,
                           [&](int e, int first, int m) { seg[e] = make_int2(first, m); });
}

// ---- host: TMA descriptors --------------------------------------------------------------------------------------
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's cuTensorMapEncodeTiled through the runtime (no link against libcuda), looked up once.
EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q;
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q);
    TORCH_CHECK(err == cudaSuccess && q == cudaDriverEntryPointSuccess && f != nullptr,
                "dsv2_kernels: cuTensorMapEncodeTiled is not available from the driver");
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

// Tensor map of `rank` dims (dims[0] innermost, strides in bytes for dims 1..), box `box`; out-of-bounds reads zero.
CUtensorMap make_map(CUtensorMapDataType type, int rank, const void* ptr, const cuuint64_t* dims,
                     const cuuint64_t* strides, const cuuint32_t* box, CUtensorMapSwizzle swizzle) {
  CUtensorMap map;
  const cuuint32_t unit[3] = {1, 1, 1};
  const CUresult r = encode_tiled()(&map, type, rank, const_cast<void*>(ptr), dims, strides, box, unit,
                                    CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "dsv2_kernels.fp8_grouped_gemm_contiguous: cuTensorMapEncodeTiled failed (", int(r),
              ")");
  return map;
}

// Per device (the attribute belongs to the function in each device's context): the dynamic shared-memory opt-in,
// and for clusters how many 2-CTA clusters fit at once (GPCs with an odd SM count leave an SM out, so it can be less
// than #SMs / 2; a persistent grid larger than that would run a second wave). 0 = not configured yet.
template <int BN, int kCluster, bool kTwoN>
int configure(int device) {
  using Pl = Plan<BN, kTwoN>;
  static std::atomic<int> grid[64];  // one cache per instantiation
  const bool cached = device >= 0 && device < 64;
  int g = cached ? grid[device].load(std::memory_order_relaxed) : 0;
  if (g != 0) return g;
  C10_CUDA_CHECK(cudaFuncSetAttribute(grouped_contiguous_kernel<BN, kCluster, kTwoN>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, Pl::kDynamic));
  const int sms = sm_count(device);
  g = sms;
  if constexpr (kCluster > 1) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(sms / kCluster * kCluster);
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = Pl::kDynamic;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = kCluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, grouped_contiguous_kernel<BN, kCluster, kTwoN>, &cfg) != cudaSuccess) {
      (void)cudaGetLastError();
      clusters = 0;
    }
    g = std::min(clusters, sms / kCluster) * kCluster;  // 0: clusters unusable here, the caller runs unclustered
    if (g == 0) g = -1;
  }
  if (cached) grid[device].store(g, std::memory_order_relaxed);
  return g;
}

// Launches the kernel as a programmatic dependent of the scan; with clusters the cluster dimension is a launch
// attribute. Returns false (nothing queued) where a clustered launch is refused.
template <int BN, int kCluster, bool kTwoN = false>
bool launch(const CUtensorMap& ma, const CUtensorMap& ma64, const CUtensorMap& ma32, const CUtensorMap& mb,
            const CUtensorMap& mbh, const Params& p, int device, cudaStream_t stream) {
  using Pl = Plan<BN, kTwoN>;
  const int grid = configure<BN, kCluster, kTwoN>(device);
  if (grid <= 0) return false;
  if constexpr (kCluster == 1) {
    launch_kernel(programmatic_launch_ok(stream, true), grouped_contiguous_kernel<BN, 1, kTwoN>, dim3(grid), dim3(kThreads),
                  Pl::kDynamic, stream, ma, ma64, ma32, mb, mbh, p);
    return true;
  } else {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = Pl::kDynamic;
    cfg.stream = stream;
    cudaLaunchAttribute attr[2];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = kCluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[1].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    // PDL where allowed; if the runtime refuses the pair of attributes, the cluster alone.
    for (int n = programmatic_launch_ok(stream, true) ? 2 : 1; n >= 1; --n) {
      cfg.numAttrs = n;
      if (cudaLaunchKernelEx(&cfg, grouped_contiguous_kernel<BN, kCluster, kTwoN>, ma, ma64, ma32, mb, mbh, p) == cudaSuccess)
        return true;
      (void)cudaGetLastError();
    }
    return false;
  }
}

// DSV2_FP8_GEMM_CLUSTER=1: 2-CTA clusters sharing A by multicast (read at every call, so one process can A/B).
bool use_cluster() {
  const char* v = std::getenv("DSV2_FP8_GEMM_CLUSTER");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// Cluster pairing: DSV2_FP8_GEMM_PAIR=m (m-block pairs share the B tile) | n (n-block pairs share the A tile);
// otherwise m where the experts average at most 2 m-blocks (R / E <= 256 padded rows, V2 at 4096 tokens: the B tile
// is 24 of the 40 KB a 128 x 192 stage loads, and an expert's full and tail m-blocks pair up with nothing idle),
// else n (V2-Lite: 3 m-blocks per expert would leave one rank in 4 idle).
int pick_pair_m(int64_t rows, int64_t experts) {
  if (const char* v = std::getenv("DSV2_FP8_GEMM_PAIR")) {
    if (std::strcmp(v, "m") == 0) return 1;
    if (std::strcmp(v, "n") == 0) return 0;
  }
  return rows <= 256 * experts ? 1 : 0;
}

// Tail pairs (kTwoN): where the experts average at most 2 m-blocks (R <= 256 E padded rows: V2 at 4096 tokens),
// most experts end in a <= 64-row tail. Alone, a tail tile does half a full tile's tensor work per K block, so its
// CTA runs ahead of the CTAs that read the same B tile for the expert's full m-block, and the second reader misses L2:
// on V2 gate_up at 4096 tokens the weights came from DRAM about twice (4.75 GB read for 2.5 GB of weights, DRAM 79 %
// busy, the limit). A tail tile over two n-blocks does a full tile's work and is scheduled next to the two full
// tiles it shares B with. DSV2_FP8_GEMM_TWON=0|1 forces it off / on (for measurements and tests).
bool use_two_n(int64_t rows, int64_t experts) {
  if (const char* v = std::getenv("DSV2_FP8_GEMM_TWON")) {
    if (std::strcmp(v, "0") == 0) return false;
    if (std::strcmp(v, "1") == 0) return true;
  }
  return rows <= 256 * experts;
}

// N tile: DSV2_FP8_GEMM_BN=128|192 forces one (for measurements); otherwise 192, the larger tile (fewer L2 bytes per
// FLOP: (16 + 24) KB per 128 x 192 x 128 block against (16 + 16) KB per 128 x 128 x 128), unless 128 wastes less
// on a partial last n-block.
int pick_block_n(int64_t n) {
  if (const char* v = std::getenv("DSV2_FP8_GEMM_BN")) {
    if (std::strcmp(v, "128") == 0) return 128;
    if (std::strcmp(v, "192") == 0) return 192;
  }
  const int64_t waste192 = (n + 191) / 192 * 192 - n;
  return waste192 * 16 <= n ? 192 : 128;  // <= 1/16 of the columns computed for nothing
}

}  // namespace

bool run_grouped_contiguous_sm90(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                 const at::Tensor& b_scales, const at::Tensor& row_expert, const at::Tensor& out,
                                 cudaStream_t stream) {
  const int64_t rows = a.size(0), k = a.size(1), n = b.size(1), num_experts = b.size(0);
  if (num_experts > kMaxExperts) return false;
  // The store warps' 16-byte row stores need 16-byte aligned rows and row lengths (N is a multiple of 128 wherever
  // the weight scales are [E, N/128, K/128]; checked anyway, nothing is queued before this point).
  if (n % 8 != 0 || reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 != 0) return false;
  const int bn = pick_block_n(n);
  // Tiles are counted in int on the device: at most (R / 128 + E) m-blocks times ceil(N / BN) n-blocks.
  if ((rows / kBM + num_experts) * ((n + bn - 1) / bn) >= INT_MAX) return false;
  const int e = static_cast<int>(num_experts), r = static_cast<int>(rows);

  // Scratch of the segment scan (zeroed), then the segments [E] (int2).
  const size_t scratch_bytes = (sizeof(int) * segment_scratch_ints(e) + 15) / 16 * 16;
  at::Tensor meta = at::empty({static_cast<int64_t>(scratch_bytes + sizeof(int2) * e)}, a.options().dtype(at::kByte));
  int* scratch = static_cast<int*>(meta.data_ptr());
  int2* seg = reinterpret_cast<int2*>(static_cast<char*>(meta.data_ptr()) + scratch_bytes);
  C10_CUDA_CHECK(cudaMemsetAsync(scratch, 0, scratch_bytes, stream));
  const int sms = sm_count(a.get_device());
  const int scan_blocks = std::min((r + kScanThreads - 1) / kScanThreads, 2 * sms);
  segments_kernel<<<scan_blocks, kScanThreads, 0, stream>>>(row_expert.data_ptr<int>(), r, e, scratch, seg);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t lda = rows > 1 ? a.stride(0) : k;
  const int64_t ldb = b.stride(1);
  const int64_t b_expert = num_experts > 1 ? b.stride(0) : n * ldb;
  const int kbs = static_cast<int>(k / kBlock);
  const cuuint64_t a_dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(rows)};
  const cuuint64_t a_strides[1] = {static_cast<cuuint64_t>(lda)};
  const cuuint32_t a_box[2] = {kBK, kBM}, a_box64[2] = {kBK, kBM / 2}, a_box32[2] = {kBK, kBM / 4};
  const cuuint64_t b_dims[3] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(n),
                                static_cast<cuuint64_t>(num_experts)};
  const cuuint64_t b_strides[2] = {static_cast<cuuint64_t>(ldb), static_cast<cuuint64_t>(b_expert)};
  const cuuint32_t b_box[3] = {kBK, static_cast<cuuint32_t>(bn), 1}, bh_box[3] = {kBK, static_cast<cuuint32_t>(bn / 2), 1};
  const CUtensorMap ma = make_map(CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, a.data_ptr(), a_dims, a_strides, a_box,
                                  CU_TENSOR_MAP_SWIZZLE_128B);
  const CUtensorMap ma64 = make_map(CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, a.data_ptr(), a_dims, a_strides, a_box64,
                                    CU_TENSOR_MAP_SWIZZLE_128B);
  const CUtensorMap mb = make_map(CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, b.data_ptr(), b_dims, b_strides, b_box,
                                  CU_TENSOR_MAP_SWIZZLE_128B);
  // Half boxes of the cluster kernel (A: 32 rows, B: BN / 2 rows; the 64-row A box serves both): encoded only there.
  const bool cluster = use_cluster();
  const CUtensorMap ma32 = cluster ? make_map(CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, a.data_ptr(), a_dims, a_strides,
                                              a_box32, CU_TENSOR_MAP_SWIZZLE_128B)
                                   : ma64;
  const CUtensorMap mbh = cluster ? make_map(CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, b.data_ptr(), b_dims, b_strides, bh_box,
                                             CU_TENSOR_MAP_SWIZZLE_128B)
                                  : mb;

  Params p;
  p.seg = seg;
  p.sfb = b_scales.data_ptr<float>();
  p.sfa = sa.data_ptr<float>();
  p.sfa_ld = scales_ld(sa);
  p.out = reinterpret_cast<__nv_bfloat16*>(out.data_ptr());
  p.num_experts = e;
  p.rows = r;
  p.n = static_cast<int>(n);
  p.k_blocks = kbs;
  p.n_scale_blocks = static_cast<int>(n / kBlock);
  p.n_tiles = static_cast<int>((n + bn - 1) / bn);
  p.pair_m = cluster ? pick_pair_m(rows, num_experts) : 0;
  const int device = a.get_device();
  bool done = false;
  if (cluster)
    done = bn == 192 ? launch<192, 2>(ma, ma64, ma32, mb, mbh, p, device, stream)
                     : launch<128, 2>(ma, ma64, ma32, mb, mbh, p, device, stream);
  if (!done) {
    const bool two_n = use_two_n(rows, num_experts);
    if (bn == 192) {
      if (two_n) launch<192, 1, true>(ma, ma64, ma32, mb, mbh, p, device, stream);
      else launch<192, 1>(ma, ma64, ma32, mb, mbh, p, device, stream);
    } else {
      if (two_n) launch<128, 1, true>(ma, ma64, ma32, mb, mbh, p, device, stream);
      else launch<128, 1>(ma, ma64, ma32, mb, mbh, p, device, stream);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

}  // namespace fp8
}  // namespace dsv2
