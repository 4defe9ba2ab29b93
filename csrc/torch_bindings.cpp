// The one place where every dsv2_kernels op is defined and its CUDA kernels are registered.
//
// The schemas come from dsv2_kernels/_library.py (SCHEMAS), which the build writes into op_schemas.inc, so Python
// (for a pure-Python install) and C++ define each op from the same text. Ops without a kernel here run their
// PyTorch reference, registered from Python as the CompositeExplicitAutograd kernel.

#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(dsv2_kernels, m) {
#include "op_schemas.inc"
}

TORCH_LIBRARY_IMPL(dsv2_kernels, CUDA, m) {
  m.impl("rms_norm", &dsv2::rms_norm_cuda);
  m.impl("fused_add_rms_norm", &dsv2::fused_add_rms_norm_cuda);
  m.impl("decode_attention", &dsv2::decode_attention_cuda);
  m.impl("prefill_attention", &dsv2::prefill_attention_cuda);
  m.impl("merge_attention_states", &dsv2::merge_attention_states_cuda);
  m.impl("fp8_gemm", &dsv2::fp8_gemm_cuda);
  m.impl("fp8_grouped_gemm_contiguous", &dsv2::fp8_grouped_gemm_contiguous_cuda);
  m.impl("fp8_grouped_gemm_masked", &dsv2::fp8_grouped_gemm_masked_cuda);
  m.impl("compress_kv", &dsv2::compress_kv_cuda);
  m.impl("rope_q", &dsv2::rope_q_cuda);
  m.impl("route", &dsv2::route_cuda);
  m.impl("dispatch_contiguous", &dsv2::dispatch_contiguous_cuda);
  m.impl("dispatch_masked", &dsv2::dispatch_masked_cuda);
  m.impl("combine", &dsv2::combine_cuda);
  m.impl("quant_per_token_group", &dsv2::quant_per_token_group_cuda);
  m.impl("silu_mul_quant", &dsv2::silu_mul_quant_cuda);
  m.impl("quant_weight_block", &dsv2::quant_weight_block_cuda);
}

// `import dsv2_kernels._C` runs the registrations above; the module itself holds nothing.
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
