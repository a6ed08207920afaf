// The device and dtype checks of the op entry points, CUDA kernels and CPU emulations alike, with
// the families' shape checks (atm_host.cuh, morph_fc_args.cpp) between them. TORCH_CHECKs: the
// Python front already raised ValueError/TypeError, these guard direct torch.ops calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <initializer_list>

namespace mixops {

struct NamedTensor {
  const char* name;
  const at::Tensor& tensor;
};

// The first check of an entry point: each tensor is on the implementation's device type and of a
// storage dtype the kernels take (the four of MIXOPS_FLOAT_SWITCH, common.cuh).
inline void check_device_and_dtype(const char* op, c10::DeviceType device, std::initializer_list<NamedTensor> tensors) {
  for (const NamedTensor& arg : tensors) {
    TORCH_CHECK(arg.tensor.device().type() == device, op, ": ", arg.name, " must be a ", c10::DeviceTypeName(device),
                " tensor, got one on ", arg.tensor.device());
    const c10::ScalarType d = arg.tensor.scalar_type();
    TORCH_CHECK(d == c10::kFloat || d == c10::kHalf || d == c10::kBFloat16 || d == c10::kDouble, op, ": ", arg.name,
                " must be float32, float16, bfloat16 or float64, got ", d);
  }
}

// Each tensor (weight, bias, offset, the incoming gradient) has x's device and dtype.
inline void check_like_x(const char* op, const at::Tensor& x, std::initializer_list<NamedTensor> tensors) {
  for (const NamedTensor& arg : tensors) {
    TORCH_CHECK(arg.tensor.device() == x.device(), op, ": ", arg.name, " must be on the device of x (", x.device(),
                "), got ", arg.tensor.device());
    TORCH_CHECK(arg.tensor.scalar_type() == x.scalar_type(), op, ": ", arg.name, " must have the dtype of x (",
                x.scalar_type(), "), got ", arg.tensor.scalar_type());
  }
}

// The accumulator dtype of x's storage dtype at run time (common.cuh Acc<T>): fp64 for fp64, else fp32.
inline c10::ScalarType accumulate_dtype(const at::Tensor& x) {
  return x.scalar_type() == c10::kDouble ? c10::kDouble : c10::kFloat;
}

// Each tensor (the fused layers' softmax weights, a mean's gradient) is on x's device in x's
// accumulator dtype.
inline void check_accumulator_like_x(const char* op, const at::Tensor& x, std::initializer_list<NamedTensor> tensors) {
  for (const NamedTensor& arg : tensors) {
    TORCH_CHECK(arg.tensor.device() == x.device(), op, ": ", arg.name, " must be on the device of x (", x.device(),
                "), got ", arg.tensor.device());
    TORCH_CHECK(arg.tensor.scalar_type() == accumulate_dtype(x), op, ": ", arg.name, " must be ",
                accumulate_dtype(x), " for ", x.scalar_type(), " x, got ", arg.tensor.scalar_type());
  }
}

// Each tensor is on x's device in x's dtype or in x's accumulator dtype (ATMLayer's softmax
// weights: the module's softmax gives x's dtype, a caller may pass fp32).
inline void check_like_x_or_accumulator(const char* op, const at::Tensor& x,
                                        std::initializer_list<NamedTensor> tensors) {
  for (const NamedTensor& arg : tensors) {
    const c10::ScalarType d = arg.tensor.scalar_type();
    TORCH_CHECK(arg.tensor.device() == x.device(), op, ": ", arg.name, " must be on the device of x (", x.device(),
                "), got ", arg.tensor.device());
    TORCH_CHECK(d == x.scalar_type() || d == accumulate_dtype(x), op, ": ", arg.name, " must be ", x.scalar_type(),
                " or ", accumulate_dtype(x), ", got ", d);
  }
}

}  // namespace mixops
