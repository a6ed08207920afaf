// Host-only argument checks of mixops::_morph_fc_cuda(_backward), shared by the CUDA and the
// CPU implementation: they turn the schema inputs into the map's Geometry and Strides
// (morph_fc_map.cuh), or fail with a TORCH_CHECK naming the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>

#include <optional>
#include <string>

#include "morph_fc_map.cuh"

namespace mixops {
namespace morph_fc {

// Checks weight and bias (x's device and dtype, shapes), x's rank and shape, segment_dim and axis,
// and returns the map. x's own device type and dtype are the entry point's first check
// (tensor_checks.h).
Geometry check_forward_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            int64_t segment_dim, const std::string& axis);

// The backward's own inputs: one incoming grad of x's shape, dtype and device (any strides,
// expanded included) and three flags (x, weight, bias); a bias flag needs a bias.
struct BackwardNeeds {
  bool x, weight, bias;
};
BackwardNeeds check_backward_args(at::TensorList grads, const c10::List<bool>& needs, const at::Tensor& x,
                                  const std::optional<at::Tensor>& bias);

// The strides of a [B, T, H, W, C] or [B, H, W, C] (T = 1) tensor.
Strides strides5(const at::Tensor& t);

}  // namespace morph_fc
}  // namespace mixops
