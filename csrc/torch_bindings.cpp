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
}

// `import dsv2_kernels._C` runs the registrations above; the module itself holds nothing.
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
