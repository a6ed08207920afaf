// Host-side pieces shared by the CUDA (atm.cu) and CPU (atm_cpu.cpp) implementations of the ATM
// ops: argument checks (TORCH_CHECK; the Python front already raised ValueError/TypeError, these
// guard direct torch.ops calls) and the line geometry, i.e. how a [B,H,W,C] tensor is seen as
// [B, L lines, n positions, C] through its strides for one axis.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

#include "common.cuh"
#include "tensor_checks.h"

namespace mixops::atm {

// Strides of a [B,H,W,C] tensor seen as [B, L, n, C] for one axis.
struct LineStrides {
  int64_t b, l, p, c;
};

// Dividers by the line view's sizes, for the kernels: pixel m -> (line, position q) by n, line
// -> (image b, line l) by L, channel c -> its offset group by share.
struct LineDividers {
  Divider n, L, share;
};

// Sizes of the line view: B images, L lines of n positions, C channels, G = C / share groups.
struct LineShape {
  int64_t B, L, n, C, G, share;
  bool along_w;  // axis "w": lines are rows (L = H, n = W); axis "h": columns (L = W, n = H)

  int64_t pixels() const { return B * L * n; }

  // (for a view with pixels)
  LineDividers dividers() const { return {Divider(n), Divider(L), Divider(share)}; }

  // Strides of any [B,H,W,*] tensor (x, offsets, gradients, outputs) in this view.
  LineStrides strides(const at::Tensor& t) const {
    const int64_t line_dim = along_w ? 1 : 2;
    const int64_t pos_dim = along_w ? 2 : 1;
    return {t.stride(0), t.stride(line_dim), t.stride(pos_dim), t.stride(3)};
  }
};

inline LineShape check_gather(const char* op, const at::Tensor& x, const at::Tensor& offset, std::string_view axis,
                              int64_t share) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be [B,H,W,C], got ", x.dim(), " dims");
  TORCH_CHECK(offset.dim() == 4, op, ": offset must be [B,H,W,C/share], got ", offset.dim(), " dims");
  TORCH_CHECK(axis == "h" || axis == "w", op, ": axis must be 'h' or 'w', got '", axis, "'");
  TORCH_CHECK(share >= 1, op, ": share must be >= 1, got ", share);
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  TORCH_CHECK(C % share == 0, op, ": x.shape[-1] (channels) = ", C, " must be divisible by share = ", share);
  TORCH_CHECK(offset.sizes() == at::IntArrayRef({B, H, W, C / share}), op, ": offset must have shape [",
              B, ", ", H, ", ", W, ", ", C / share, "] (x's [B,H,W] and C/share), got ", offset.sizes());
  check_like_x(op, x, {{"offset", offset}});
  const bool along_w = axis == "w";
  return {B, along_w ? H : W, along_w ? W : H, C, C / share, share, along_w};
}

inline void check_fc(const char* op, const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(3), op, ": weight must be [C_out, ", x.size(3),
              "], got ", weight.sizes());
  check_like_x(op, x, {{"weight", weight}});
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be [", weight.size(0),
                "], got ", bias->sizes());
    check_like_x(op, x, {{"bias", *bias}});
  }
}

// The backward ops get one incoming gradient (the op has one output) shaped like the output, and
// one `needs` flag per tensor input.
inline void check_grads(const char* op, at::TensorList grads, size_t n_needs, size_t n_inputs,
                        at::IntArrayRef out_shape, const at::Tensor& x) {
  TORCH_CHECK(grads.size() == 1, op, ": expected 1 incoming gradient, got ", grads.size());
  TORCH_CHECK(n_needs == n_inputs, op, ": expected ", n_inputs, " needs flags, got ", n_needs);
  TORCH_CHECK(grads[0].sizes() == out_shape, op, ": the incoming gradient must have the output's shape ",
              out_shape, ", got ", grads[0].sizes());
  check_like_x(op, x, {{"grads[0]", grads[0]}});
}

}  // namespace mixops::atm
