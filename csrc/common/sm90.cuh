// sm_90a primitives shared by the hand-written Hopper kernels (MLA decode/prefill in csrc/mla, the FP8 grouped GEMM in
// csrc/fp8/fp8_grouped_gemm_contiguous_sm90.cu): shared-memory addresses, mbarriers, named barriers, register
// reallocation, wgmma fence/commit/wait and the 128-byte-swizzle descriptor, and TMA tensor loads. Each wrapper is one
// PTX instruction (or a retry loop around one); the kernels' own headers add what only they use (wgmma shapes, cp.async).
#pragma once

#include <cuda.h>  // CUtensorMap (the TMA descriptor type; no driver library call is made from device code)

#include <cstdint>

namespace dsv2 {
namespace sm90 {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Makes this thread's completed generic-proxy shared-memory writes (cp.async, st.shared) visible to the async proxy
// (wgmma operand reads, TMA stores); a barrier must follow before another thread's wgmma reads them.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// ---- mbarriers (CTA scope) -----------------------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the mbarrier.init of this thread visible to the other threads and to the async proxy (TMA complete_tx);
// a __syncthreads must still follow before anyone else uses the barriers.
__device__ __forceinline__ void fence_mbar_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// One arrival (release semantics at CTA scope: this thread's earlier memory accesses, and the completion of its
// earlier wgmma waits, happen before whoever observes the phase flip).
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// One arrival that also raises the phase's expected transaction bytes by `bytes`: the phase completes once every
// arrival is in and the async copies that signal this barrier (complete_tx) have delivered that many bytes.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t ok;
  asm volatile(
      "{\n.reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(ok)
      : "r"(bar), "r"(parity)
      : "memory");
  return ok != 0;
}
// Waits (acquire, CTA scope) until the phase of parity `parity` has completed: the k-th use of a barrier (k = 0, 1,
// ...) waits with parity k & 1. On a freshly initialised barrier, parity 1 counts as completed (the phase "before"
// phase 0): a producer waits its empty barriers with parity (k & 1) ^ 1 and passes the first round at once.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}

// ---- clusters (sm_90 thread-block clusters; the FP8 grouped GEMM's 2-CTA A multicast) ----------------------------
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t cluster_id_x() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%clusterid.x;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t num_clusters_x() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%nclusterid.x;\n" : "=r"(r));
  return r;
}
// Every thread of every CTA of the cluster (all converged per warp): the CTAs' earlier shared-memory writes (barrier
// initialisation included) are visible cluster-wide afterwards.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// One arrival on the mbarrier at the same shared-memory offset as `bar` in CTA `rank` of the cluster, with the
// default semantics (release at CTA scope), as CUTLASS's ClusterBarrier::arrive(cta_id) and DeepGEMM use it to
// release multicast stages: what it orders are this thread's completed reads (wgmma operands after
// wgmma.wait_group). The .release.cluster form compiled to MEMBAR.ALL.CTA + MEMBAR.ALL.GPU + ERRBAR + CGAERRBAR
// before every remote arrive (one per consumer warp and K block): a GPU-scope fence that also waits for the warp's
// outstanding global stores, the likely cause of the 2-CTA mode's 2x slowdown on the H200.
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar, uint32_t rank) {
  asm volatile(
      "{\n.reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(bar),
      "r"(rank)
      : "memory");
}
// mbar_wait with cluster-scope acquire: for barriers that CTAs of the cluster arrive on remotely.
__device__ __forceinline__ void mbar_wait_cluster(uint32_t bar, uint32_t parity) {
  uint32_t ok = 0;
  while (!ok) {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(ok)
        : "r"(bar), "r"(parity)
        : "memory");
  }
}

// ---- named barriers (ids 1..15; 0 is __syncthreads) ----------------------------------------------------------------
template <int kThreads>
__device__ __forceinline__ void named_bar_sync(int id) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(kThreads) : "memory");
}
template <int kThreads>
__device__ __forceinline__ void named_bar_arrive(int id) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(kThreads) : "memory");
}

// ---- register reallocation between warpgroups (executed by every thread of a warpgroup) ---------------------------
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

// ---- wgmma ---------------------------------------------------------------------------------------------------------
// Shared-memory descriptor of a 128-byte-swizzled operand tile (rows of 128 bytes, 16-byte chunk c of row r stored at
// chunk c ^ (r % 8), 1024-byte aligned blocks). K-major: 8-row groups 1024 bytes apart (SBO), the leading offset
// unused. MN-major: 64-element column blocks `lbo_bytes` apart, 8-row groups 1024 bytes apart. A K step of 32 bytes
// inside the 128-byte row advances the start address by 32 bytes (the hardware applies the swizzle to the address).
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo_bytes >> 4) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (1ull << 62);
}

// The same K-major descriptor (LBO 16) split into its 32-bit words: desc_lo(addr) once per operand buffer, then
// desc_of(lo + (byte_offset >> 4)) per wgmma. A k step (+32 bytes) or a column block is then one 32-bit add of a
// compile-time constant instead of smem_desc's mask / shift / or / 64-bit pack from the address (which the compiler
// redoes per wgmma, in uniform registers). The add cannot carry out of the 14-bit address field: shared memory
// addresses stay below 256 KB on sm_90.
__device__ __forceinline__ uint32_t desc_lo(uint32_t addr) { return ((addr & 0x3FFFF) >> 4) | (1u << 16); }
__device__ __forceinline__ uint64_t desc_of(uint32_t lo) {
  return (static_cast<uint64_t>((1024 >> 4) | (1u << 30)) << 32) | lo;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pins accumulator registers at this point of the program: the compiler may not move their reads or writes across
// (wgmma writes them asynchronously, behind the compiler's back, until the wait).
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// ---- TMA (tensor maps built on the host with cuTensorMapEncodeTiled, passed as __grid_constant__ parameters) ------
__device__ __forceinline__ void tma_prefetch_desc(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
// Box at element coordinates (c0 innermost, c1[, c2]) -> shared memory at `dst`, completing `bytes` of the current
// phase of `bar` (the whole box counts, out-of-bounds elements included: they are written as zeros).
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::
          "r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1,
                                            int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

// tma_load_2d into the same shared-memory offset of every CTA in `cta_mask` (bit i: cluster rank i), each copy
// completing its bytes on the mbarrier at `bar`'s offset in that CTA.
__device__ __forceinline__ void tma_load_2d_multicast(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0,
                                                      int c1, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%3, %4}], [%2], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "h"(cta_mask)
      : "memory");
}

__device__ __forceinline__ void tma_load_3d_multicast(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0,
                                                      int c1, int c2, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%3, %4, %5}], [%2], %6;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "h"(cta_mask)
      : "memory");
}

}  // namespace sm90
}  // namespace dsv2
