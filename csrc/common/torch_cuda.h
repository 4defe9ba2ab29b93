// The torch headers a kernel file needs, and no more: torch/all.h (or ATen/cuda/CUDAContext.h, which pulls in
// cuBLAS/cuSPARSE) costs about a minute of nvcc front-end time per translation unit, multiplied on CI's 2 cores.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <cstdint>

#include "checks.h"

namespace dsv2 {

// SMs of `device`, queried once per device (persistent and one-wave grids size themselves by it).
inline int sm_count(int device) {
  static std::atomic<int> counts[64];
  const bool cached = device >= 0 && device < 64;
  int v = cached ? counts[device].load(std::memory_order_relaxed) : 0;
  if (v == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    if (cached) counts[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

// 16-byte vector loads/stores (and TMA) need 16-byte aligned addresses.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
inline bool aligned16(const at::Tensor& t) { return aligned16(t.data_ptr()); }

}  // namespace dsv2
