// Programmatic dependent launch (PDL, sm_90): a kernel launched as a programmatic dependent of the previous kernel on
// its stream may start (CTAs placed, prologue run) while that kernel still runs, once every CTA of it has executed
// griddep_launch_dependents() or exited. The dependent's griddep_wait() then returns when the previous grid has
// completed and all its memory operations are visible. Both instructions are no-ops in a kernel launched normally.
//
// Rule for a dependent kernel: no global memory access before griddep_wait(), reads AND writes: the previous kernel
// may still be writing what it would read, or still reading memory (freed to the caching allocator before it ran) that
// it would overwrite. Transitivity: a kernel that triggers only after its own wait lets its dependents start only
// after everything before it has completed.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <utility>

namespace dsv2 {

__device__ __forceinline__ void griddep_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void griddep_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;"); }

// Whether a launch on `stream` may be programmatic. Outside stream capture: yes. During capture it becomes a
// programmatic graph edge, which drivers capture since CUDA 12.3; `allow_capture` false keeps ordinary edges there
// (certain to capture on any driver).
inline bool programmatic_launch_ok(cudaStream_t stream, bool allow_capture) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusActive;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (capture == cudaStreamCaptureStatusNone) return true;
  if (!allow_capture || capture != cudaStreamCaptureStatusActive) return false;
  static std::atomic<int> driver{-1};
  int v = driver.load(std::memory_order_relaxed);
  if (v < 0) {
    if (cudaDriverGetVersion(&v) != cudaSuccess) {
      (void)cudaGetLastError();
      v = 0;
    }
    driver.store(v, std::memory_order_relaxed);
  }
  return v >= 12030;
}

// Launches kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent of the previous kernel on the
// stream when `programmatic` (an ordinary launch where the runtime refuses the attribute). The caller checks errors.
template <typename Kernel, typename... Args>
void launch_kernel(bool programmatic, Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  if (programmatic) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    if (cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...) == cudaSuccess) return;
    (void)cudaGetLastError();  // not supported here: an ordinary launch below
  }
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
}

}  // namespace dsv2
