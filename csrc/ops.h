// Declarations of every CUDA kernel entry point, one section per family. Registered in torch_bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace dsv2 {

// ---- norm (csrc/norm) ----
at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                           const at::Tensor& weight, double eps);

}  // namespace dsv2
