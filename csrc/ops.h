// Declarations of the C++/CUDA op implementations; registration.cpp binds them to schemas.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace mixops {

// Diagnostics (diagnostics.cu): which CUDA runtime the extension was built against, which
// architectures its fatbinary holds, and which of them the current device actually runs.
int64_t cuda_version();
std::string cuda_arch_list();
at::Tensor device_arch(const at::Tensor& like);

}  // namespace mixops
