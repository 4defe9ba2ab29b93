// Argument checks for the C++ entry points. The Python wrappers check the same things first with the same wording;
// these keep a direct torch.ops call from ever reaching a kernel with arguments it would mishandle.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

// DSV2_CHECK(cond, "op", "arg", streamable message...): error text "dsv2_kernels.op: argument 'arg' <message>".
#define DSV2_CHECK(cond, op, arg, ...) \
  TORCH_CHECK_VALUE((cond), "dsv2_kernels.", op, ": argument '", arg, "' ", __VA_ARGS__)

namespace dsv2 {

inline void check_cuda(const char* op, const char* arg, const at::Tensor& t) {
  DSV2_CHECK(t.is_cuda(), op, arg, "must be a CUDA tensor for the CUDA kernel, got device ", t.device());
}

inline void check_dtype(const char* op, const char* arg, const at::Tensor& t, at::ScalarType want) {
  DSV2_CHECK(t.scalar_type() == want, op, arg, "must have dtype ", want, ", got ", t.scalar_type());
}

inline void check_same_device(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref) {
  DSV2_CHECK(t.device() == ref.device(), op, arg, "must be on ", ref.device(), ", got ", t.device());
}

}  // namespace dsv2
