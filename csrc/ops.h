// Declarations of the C++/CUDA op implementations; registration.cpp binds them to schemas.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace mixops {

// Diagnostics (diagnostics.cu): which CUDA runtime the extension was built against, which
// architectures its fatbinary holds, and which of them the current device actually runs.
int64_t cuda_version();
std::string cuda_arch_list();
at::Tensor device_arch(const at::Tensor& like);

// ATM (ActiveMLP): the per-channel 1-D lerp gather and the gather fused into the FC GEMM.
// atm.cu: CUDA kernels; atm_cpu.cpp: the CPU emulation of the same math (for tests).
at::Tensor atm_sample_cuda(const at::Tensor& x, const at::Tensor& offset, std::string_view axis, int64_t share);
std::vector<at::Tensor> atm_sample_backward_cuda(at::TensorList grads, const c10::List<bool>& needs,
                                                 const at::Tensor& x, const at::Tensor& offset,
                                                 std::string_view axis, int64_t share);
at::Tensor atm_fc_cuda(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, std::string_view axis, int64_t share);
std::vector<at::Tensor> atm_fc_backward_cuda(at::TensorList grads, const c10::List<bool>& needs, const at::Tensor& x,
                                             const at::Tensor& offset, const at::Tensor& weight,
                                             const std::optional<at::Tensor>& bias, std::string_view axis,
                                             int64_t share);
at::Tensor atm_sample_cpu(const at::Tensor& x, const at::Tensor& offset, std::string_view axis, int64_t share);
std::vector<at::Tensor> atm_sample_backward_cpu(at::TensorList grads, const c10::List<bool>& needs,
                                                const at::Tensor& x, const at::Tensor& offset, std::string_view axis,
                                                int64_t share);
at::Tensor atm_fc_cpu(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, std::string_view axis, int64_t share);
std::vector<at::Tensor> atm_fc_backward_cpu(at::TensorList grads, const c10::List<bool>& needs, const at::Tensor& x,
                                            const at::Tensor& offset, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias, std::string_view axis,
                                            int64_t share);

// MorphFC chunked token FC (morph_fc.cu; CPU emulation of the same index map in
// morph_fc_cpu.cpp): the schema inputs of mixops::morph_fc, the backward returning the grads of
// the tensors flagged in `needs` (x, weight, bias), in that order.
at::Tensor morph_fc_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         int64_t segment_dim, const std::string& axis);
std::vector<at::Tensor> morph_fc_backward_cuda(at::TensorList grads, const c10::List<bool>& needs, const at::Tensor& x,
                                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                               int64_t segment_dim, const std::string& axis);
at::Tensor morph_fc_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        int64_t segment_dim, const std::string& axis);
std::vector<at::Tensor> morph_fc_backward_cpu(at::TensorList grads, const c10::List<bool>& needs, const at::Tensor& x,
                                              const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                              int64_t segment_dim, const std::string& axis);

}  // namespace mixops
