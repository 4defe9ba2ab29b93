// The torch headers a kernel file needs, and no more: torch/all.h (or ATen/cuda/CUDAContext.h, which pulls in
// cuBLAS/cuSPARSE) costs about a minute of nvcc front-end time per translation unit, multiplied on CI's 2 cores.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
