// silu_mul_quant: x [.., M, 2N] = [gate | up] -> h = silu(gate) * up in fp32 (never rounded to bf16), quantized per
// 1 x G group: e4m3 q [.., M, N] + fp32 scales [.., M, N/G], scale = max(amax, 1e-10) * fp32(1/448) as in
// quant_per_token_group. The MoE down projection's input: gate and up are each read once, only the fp8 h is written
// (5 bytes moved per output element instead of 4 + 2 + 2 + 1 through a bf16 h).
//
// Numerics (not bit-exact with the PyTorch reference; the tests state the tolerance): silu is fp8_quant::silu
// (quant_common.cuh: ex2.approx / rcp.approx, ~1e-6 relative at most for g >= -10, torch's special values), so
// scales agree with the reference to ~1e-6 relative and q may sit one e4m3 step off where h / scale lies that close
// to a rounding midpoint (~1e-5 of elements). The bf16 kernel below also quantizes as h * RN(1 / scale) instead of
// an IEEE division (at most one fp32 ulp apart: again at most one step, at midpoints only; same signed zeros, and an
// infinite scale still gives 0 for finite h and NaN for inf, as the division does).
//
// Two kernels:
// * silu_bf16_kernel below: bf16 input, group 128 (the MoE case), any M and batch, strided rows and batches read in
//   place (a view that is not 16-byte aligned is copied first).
// * group_quant_kernel<T, G, true> (quant_common.cuh): fp16/fp32 inputs and group 64 (same silu, exact quotient).
//
// silu_bf16_kernel is a pure stream (58 MB at M=8192 N=1408: 13.8 us at the 4.2 TB/s copy ceiling), so it is built
// for memory-level parallelism with few instructions per element:
// * Loads go through shared memory by TMA bulk copies, so the bytes in flight no longer depend on registers or on
//   how far each warp's compute has got. Reads are ~3.4 of the 4.2 TB/s; at 2-3 us of loaded HBM latency that is
//   52-77 KB per SM in flight (3.4e12 B/s x latency / 132 SMs). The previous register ring (115 registers, 2 x 256
//   threads, 64-96 KB per SM, and only while every warp kept pace) measured 72.8 % of the ceiling.
// * Persistent: 2 CTAs per SM, each 8 consumer warps + 1 producer warp and a 6-stage ring of 16 KB stages (96 KB of
//   loads per CTA, 192 KB per SM, can be outstanding). A stage is a "chunk" of 32 consecutive groups of the row-major
//   (batch, row, group) order: gate halves in its first 8 KB, up halves in its second, 256 bytes per group each.
//   CTA c takes chunks c, c + grid, c + 2 grid, ..., so the whole GPU sweeps x front to back.
// * Producer warp: lane i owns group i of the chunk; a lane that starts a row segment of the chunk (lane 0, or group
//   0 of a row) issues two bulk copies (the segment's gate bytes and its up bytes, contiguous in x: any row and batch
//   strides work), with an evict-first L2 hint (read once). 2 x 4 copies per stage at N=1408.
// * Consumers: a team of 8 lanes holds one 1 x 128 group: 16 elements per lane as two 16-byte gate and two 16-byte up
//   vectors (columns sub*8 .. +7 and 64 + sub*8 .. +7 of the group), read with 4 conflict-free LDS.128; the warp
//   releases the stage right after them, then computes. Warp w's team t takes group w*4 + t of each chunk.
// * Per element: 2 bf16 unpacks, FMUL + MUFU.EX2 + FADD + MUFU.RCP + FMUL (silu), FMUL (* up), FMNMX (amax), FMUL
//   (* 1/scale), half an F2FP (packing included): 11 SASS instructions, plus a few per element of cursor and control
//   per chunk. Group amax: 3 xor shuffles in the team; q: two 8-byte stores per lane (64 contiguous bytes per team
//   each); the scale by the team's lane 0.

#include "quant_common.cuh"

#include <algorithm>
#include <atomic>

#include "../ops.h"

namespace dsv2 {
namespace silu_bf16 {

constexpr int kConsumerWarps = 8;
constexpr int kThreads = (kConsumerWarps + 1) * 32;  // + the producer warp
constexpr int kCtasPerSm = 2;
constexpr int kGroup = 128;
constexpr int kTeamLanes = 8;                       // lanes per group: 16 elements each
constexpr int kTeams = 32 / kTeamLanes;             // groups per consumer warp per chunk
constexpr int kChunk = kConsumerWarps * kTeams;     // groups per stage (= producer lanes: one each)
constexpr int kGroupBytes = kGroup * 2;             // the gate (or up) half of one group, bf16
constexpr int kHalfBytes = kChunk * kGroupBytes;    // a stage's gate (or up) part: 8 KB
constexpr int kStageBytes = 2 * kHalfBytes;         // 16 KB
constexpr int kStages = 6;                          // 96 KB per CTA, 2 CTAs per SM
constexpr int kSmemBytes = kStages * kStageBytes + 2 * kStages * 8;  // + full and empty mbarriers
static_assert(kChunk == 32, "one producer lane per group of a chunk");

struct Params {
  const __nv_bfloat16* x;  // [B, M, 2N] rows, 16-byte aligned, strides multiples of 8 elements
  uint8_t* q;              // [B, M, N] contiguous
  float* s;                // [B, M, N/128] with strides s_sb, s_sm, s_sc
  int64_t x_sb, x_sm;      // elements
  int64_t s_sb, s_sm, s_sc;
  int32_t m, width, groups;  // rows per batch, N, N / 128
  int32_t items;             // B * M * groups
  int32_t chunks;            // ceil(items / kChunk)
  int32_t stride;            // groups per grid stride: kChunk * grid
  int32_t d_rows, d_grp;     // the same as whole rows + groups
  int64_t dx, dq, ds;        // d_rows rows of x (elements), q (bytes), s (floats)
};

// A team's current group: item = ((b * m) + row) * groups + grp, with its row's offsets into x (elements), q (bytes)
// and s (floats).
struct Cursor {
  int32_t item, b, row, grp;
  int64_t xr, qr, sr;
};

__device__ __forceinline__ void set_offsets(Cursor& c, const Params& p) {
  c.xr = c.b * p.x_sb + c.row * p.x_sm;
  c.qr = (static_cast<int64_t>(c.b) * p.m + c.row) * p.width;
  c.sr = c.b * p.s_sb + c.row * p.s_sm;
}

__device__ __forceinline__ Cursor make_cursor(int32_t item, const Params& p) {
  Cursor c;
  c.item = item;
  const uint32_t rows = static_cast<uint32_t>(item) / static_cast<uint32_t>(p.groups);
  c.grp = item - static_cast<int32_t>(rows) * p.groups;
  c.b = static_cast<int32_t>(rows / static_cast<uint32_t>(p.m));
  c.row = static_cast<int32_t>(rows) - c.b * p.m;
  set_offsets(c, p);
  return c;
}

// One grid stride ahead: adds only (the compiler drops what a cursor does not use: x offsets of the compute cursor, q
// and s offsets of the load cursor). A division only when the stride crosses into another batch (never for 2-d
// inputs until past the end); a cursor past the last item keeps counting harmlessly (load and store check
// item < items).
__device__ __forceinline__ void advance(Cursor& c, const Params& p) {
  c.item += p.stride;
  c.grp += p.d_grp;
  c.row += p.d_rows;
  c.xr += p.dx, c.qr += p.dq, c.sr += p.ds;
  if (c.grp >= p.groups) {
    c.grp -= p.groups, ++c.row;
    c.xr += p.x_sm, c.qr += p.width, c.sr += p.s_sm;
  }
  if (c.row >= p.m) {  // q rows are global (b * m + row): qr stays right across batches
    const int32_t carry = c.row / p.m;
    c.b += carry, c.row -= carry * p.m;
    c.xr = c.b * p.x_sb + c.row * p.x_sm;
    c.sr = c.b * p.s_sb + c.row * p.s_sm;
  }
}

// ---- sm_90 primitives: mbarriers and TMA bulk copies (CTA scope) -------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
// One arrival, release at CTA scope: the caller's (and, after a __syncwarp, its warp's) earlier shared-memory reads
// happen before the producer, which acquires the phase, refills the stage.
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
// One arrival that also raises the phase's expected transaction bytes (the bulk copies count them down).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
// Waits (acquire) until the phase with this parity has completed: the k-th use of a barrier waits with parity k & 1.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
  } while (!done);
}
// L2 policy for data read exactly once (the bulk-copy counterpart of __ldcs).
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}
// TMA bulk copy global -> shared of `bytes` (a multiple of 16, both addresses 16-byte aligned), counted on bar.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
          smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar)), "l"(policy)
      : "memory");
}
__device__ __forceinline__ uint4 lds128(const uint8_t* p) { return *reinterpret_cast<const uint4*>(p); }

// Four e4m3 codes of h * r (RN, saturated to +-448: a product can only pass 448 by a rounding error).
__device__ __forceinline__ uint32_t fp8x4(const float* h, float r) {
  const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(h[0] * r, h[1] * r), __NV_SATFINITE, __NV_E4M3);
  const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(h[2] * r, h[3] * r), __NV_SATFINITE, __NV_E4M3);
  return lo | hi << 16;
}

__device__ __forceinline__ void compute(const uint4 (&v)[4], const Cursor& c, const Params& p, int sub) {
  const uint32_t gw[8] = {v[0].x, v[0].y, v[0].z, v[0].w, v[1].x, v[1].y, v[1].z, v[1].w};
  const uint32_t uw[8] = {v[2].x, v[2].y, v[2].z, v[2].w, v[3].x, v[3].y, v[3].z, v[3].w};
  float h[16];
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {  // fp32 h, never rounded to bf16; bf16 -> fp32 is exact (the high half of a word)
    h[2 * i] = fp8_quant::silu(__uint_as_float(gw[i] << 16)) * __uint_as_float(uw[i] << 16);
    h[2 * i + 1] = fp8_quant::silu(__uint_as_float(gw[i] & 0xFFFF0000u)) * __uint_as_float(uw[i] & 0xFFFF0000u);
    amax = fp8_quant::max_nan(amax, fp8_quant::max_nan(fabsf(h[2 * i]), fabsf(h[2 * i + 1])));
  }
#pragma unroll
  for (int o = kTeamLanes / 2; o > 0; o >>= 1)
    amax = fp8_quant::max_nan(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
  const float scale = fp8_quant::group_scale(amax);
  if (c.item < p.items) {
    const float r = __frcp_rn(scale);  // 1 / inf = 0: finite h -> +-0, inf -> NaN, as h / inf
    uint8_t* dst = p.q + c.qr + (c.grp * kGroup + sub * 8);
    *reinterpret_cast<uint2*>(dst) = make_uint2(fp8x4(h, r), fp8x4(h + 4, r));
    *reinterpret_cast<uint2*>(dst + 64) = make_uint2(fp8x4(h + 8, r), fp8x4(h + 12, r));
    if (sub == 0) p.s[c.sr + c.grp * p.s_sc] = scale;
  }
}

__global__ void __launch_bounds__(kThreads, kCtasPerSm) silu_bf16_kernel(const __grid_constant__ Params p) {
  extern __shared__ __align__(128) uint8_t smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kStageBytes);  // stage loaded (TMA bytes)
  uint64_t* empty = full + kStages;                                            // stage read by every consumer warp
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) mbar_init(&full[s], 1), mbar_init(&empty[s], kConsumerWarps);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");  // visible to the async proxy (TMA)
  }
  __syncthreads();
  // Chunks of this CTA (the grid never exceeds the chunks: n >= 1); block-uniform.
  const int n = (p.chunks - static_cast<int>(blockIdx.x) + static_cast<int>(gridDim.x) - 1) / gridDim.x;

  if (warp == kConsumerWarps) {  // producer: lane i loads group i of each chunk, merged into row segments
    const uint64_t policy = evict_first_policy();
    Cursor c = make_cursor(blockIdx.x * kChunk + lane, p);
    int s = 0;
    uint32_t phase = 0;
    for (int k = 0; k < n; ++k) {
      if (k >= kStages) mbar_wait(&empty[s], phase ^ 1);  // its previous use (k - kStages) was read out
      const int32_t left = p.items - c.item;             // groups from this lane's to the end of x
      if (lane == 0) mbar_arrive_expect_tx(&full[s], static_cast<uint32_t>(min(left, kChunk)) * 2 * kGroupBytes);
      __syncwarp();
      if (left > 0 && (lane == 0 || c.grp == 0)) {  // first group of a row segment of the chunk
        const uint32_t bytes = static_cast<uint32_t>(min(min(p.groups - c.grp, kChunk - lane), left)) * kGroupBytes;
        const __nv_bfloat16* g = p.x + c.xr + c.grp * kGroup;
        uint8_t* dst = smem + s * kStageBytes + lane * kGroupBytes;
        bulk_load(dst, g, bytes, &full[s], policy);
        bulk_load(dst + kHalfBytes, g + p.width, bytes, &full[s], policy);
      }
      advance(c, p);
      if (++s == kStages) s = 0, phase ^= 1;
    }
    return;  // the copies in flight complete on the barriers; the consumers wait for them
  }

  const int team = lane / kTeamLanes, sub = lane % kTeamLanes;
  const int slot = warp * kTeams + team;  // this team's group in every chunk
  Cursor c = make_cursor(blockIdx.x * kChunk + slot, p);
  int s = 0;
  uint32_t phase = 0;
  for (int k = 0; k < n; ++k) {
    mbar_wait(&full[s], phase);
    uint4 v[4] = {};  // a team past the last group (end of the last chunk) computes zeros and stores nothing
    if (c.item < p.items) {
      const uint8_t* g = smem + s * kStageBytes + slot * kGroupBytes + sub * 16;
      v[0] = lds128(g), v[1] = lds128(g + 128);                            // gate columns sub*8.., 64+sub*8..
      v[2] = lds128(g + kHalfBytes), v[3] = lds128(g + kHalfBytes + 128);  // up, the same columns
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[s]);
    compute(v, c, p, sub);
    advance(c, p);
    if (++s == kStages) s = 0, phase ^= 1;
  }
}

}  // namespace silu_bf16

namespace silu_bf16 {
// CTAs of silu_bf16_kernel resident per SM of `device` (kCtasPerSm on an H100/H200; 0 if the kernel cannot run
// there), set up and queried once per device: the shared-memory limit and carveout are per-context attributes.
static int resident_ctas(int device) {
  static std::atomic<int> cached[64];  // 0: not yet queried; else resident + 1
  const bool cache = device >= 0 && device < 64;
  int v = cache ? cached[device].load(std::memory_order_relaxed) : 0;
  if (v == 0) {
    int n = 0;
    if (cudaFuncSetAttribute(silu_bf16_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes) !=
            cudaSuccess ||
        cudaFuncSetAttribute(silu_bf16_kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                             cudaSharedmemCarveoutMaxShared) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, silu_bf16_kernel, kThreads, kSmemBytes) != cudaSuccess) {
      (void)cudaGetLastError();  // not sticky: fall back to the generic kernel
      n = 0;
    }
    v = std::min(n, kCtasPerSm) + 1;
    if (cache) cached[device].store(v, std::memory_order_relaxed);
  }
  return v - 1;
}
}  // namespace silu_bf16

std::tuple<at::Tensor, at::Tensor> silu_mul_quant_cuda(const at::Tensor& x_in, int64_t group_size,
                                                       bool column_major_scales) {
  using namespace silu_bf16;
  // The bf16 kernel takes inputs that pass every check of group_quant and are not empty; everything else
  // (including every error and the empty outputs) goes through the generic path.
  const bool shape_ok = x_in.is_cuda() && x_in.scalar_type() == at::kBFloat16 && group_size == kGroup &&
                        (x_in.dim() == 2 || x_in.dim() == 3) && x_in.size(-1) > 0 &&
                        x_in.size(-1) % (2 * kGroup) == 0 && x_in.stride(-1) == 1 && x_in.size(-2) > 0 &&
                        (x_in.dim() == 2 || x_in.size(0) > 0);
  if (!shape_ok) return fp8_quant::group_quant<true>("silu_mul_quant", x_in, group_size, column_major_scales);
  const bool batched = x_in.dim() == 3;
  const int64_t batches = batched ? x_in.size(0) : 1, m = x_in.size(-2);
  const int64_t in_width = x_in.size(-1), width = in_width / 2, groups = width / kGroup;
  const int64_t items = batches * m * groups;
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int resident = resident_ctas(x_in.get_device());
  if (resident < 1) return fp8_quant::group_quant<true>("silu_mul_quant", x_in, group_size, column_major_scales);
  const int64_t chunks = (items + kChunk - 1) / kChunk;
  const int64_t grid = std::min<int64_t>(static_cast<int64_t>(sm_count(x_in.get_device())) * resident, chunks);
  const int64_t stride = grid * kChunk;  // groups per grid stride
  // 32-bit item and row arithmetic with a few strides of headroom (beyond that: the generic kernel, 2^31 groups
  // = 1 TB of input, never in practice).
  if (items > std::numeric_limits<int32_t>::max() - 4 * stride || m > std::numeric_limits<int32_t>::max() / 2 - stride)
    return fp8_quant::group_quant<true>("silu_mul_quant", x_in, group_size, column_major_scales);

  // 16-byte vectors need 16-byte aligned rows: a rare misaligned view is copied (strides of size-1 dims unused).
  at::Tensor x = x_in;
  int64_t x_sb = batched && batches > 1 ? x.stride(0) : 0, x_sm = m > 1 ? x.stride(-2) : 0;
  if (!aligned16(x.data_ptr()) || x_sb % 8 != 0 || x_sm % 8 != 0) {
    x = x_in.clone(at::MemoryFormat::Contiguous);
    x_sb = m * in_width, x_sm = in_width;
  }

  // Outputs exactly as group_quant (and the fake impl) lays them out.
  auto [q, s, s_sb, s_sm, s_sc] = fp8_quant::quant_outputs(x, width, groups, column_major_scales);

  Params p;
  p.x = reinterpret_cast<const __nv_bfloat16*>(x.data_ptr());
  p.q = reinterpret_cast<uint8_t*>(q.data_ptr());
  p.s = s.data_ptr<float>();
  p.x_sb = x_sb, p.x_sm = x_sm;
  p.s_sb = s_sb, p.s_sm = s_sm, p.s_sc = s_sc;
  p.m = static_cast<int32_t>(m), p.width = static_cast<int32_t>(width), p.groups = static_cast<int32_t>(groups);
  p.items = static_cast<int32_t>(items);
  p.chunks = static_cast<int32_t>(chunks);
  p.stride = static_cast<int32_t>(stride);
  p.d_rows = static_cast<int32_t>(stride / groups), p.d_grp = static_cast<int32_t>(stride % groups);
  p.dx = p.d_rows * x_sm, p.dq = p.d_rows * width, p.ds = p.d_rows * s_sm;

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  silu_bf16_kernel<<<static_cast<unsigned>(grid), kThreads, kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, s};
}

}  // namespace dsv2
