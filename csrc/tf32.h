// Whether the kernels may run fp32 GEMMs on TF32 tensor cores: exactly where torch's own fp32
// matmuls may, so a drop-in matches the official fp32 op under the same settings. This is the
// test ATen's cuBLAS calls make. The legacy allowTF32CuBLAS() throws once the fp32_precision API
// and the legacy flags disagree (e.g. torch.backends.cuda.matmul.fp32_precision = "tf32" alone),
// and it ignores NoTF32Guard.
#pragma once

#include <ATen/Context.h>

namespace mixops {

inline bool tf32_allowed() {
  return !at::NoTF32Guard::should_disable_tf32() &&
         at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
             at::Float32Precision::TF32;
}

}  // namespace mixops
