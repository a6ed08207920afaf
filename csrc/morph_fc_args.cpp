// Argument checks shared by the CUDA and CPU implementations of mixops::_morph_fc_cuda
// (declared in morph_fc_args.cuh). The Python op validates first (ValueError / TypeError);
// these guard direct calls of the registered ops.
#include "morph_fc_args.cuh"

#include <c10/util/Exception.h>

#include "tensor_checks.h"

namespace mixops {
namespace morph_fc {

namespace {

int axis_id(const std::string& axis) {
  if (axis == "w") return kAxisW;
  if (axis == "h") return kAxisH;
  if (axis == "hs") return kAxisHS;
  TORCH_CHECK(axis == "t", "morph_fc: axis must be one of 'w', 'h', 'hs', 't', got '", axis, "'");
  return kAxisT;
}

}  // namespace

Geometry check_forward_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            int64_t segment_dim, const std::string& axis) {
  const int id = axis_id(axis);
  TORCH_CHECK(id == kAxisT ? x.dim() == 5 : (x.dim() == 4 || x.dim() == 5), "morph_fc: x must be ",
              id == kAxisT ? "[B, T, H, W, C] for axis 't'" : "[B, H, W, C] or [B, T, H, W, C]", ", got ", x.dim(),
              " dimensions");
  TORCH_CHECK(segment_dim > 0, "morph_fc: segment_dim must be positive, got ", segment_dim);
  check_like_x("morph_fc", x, {{"weight", weight}});
  const bool video = x.dim() == 5;
  const int64_t B = x.size(0), T = video ? x.size(1) : 1, H = x.size(-3), W = x.size(-2), C = x.size(-1);
  TORCH_CHECK(C % segment_dim == 0, "morph_fc: x channels (", C, ") must be divisible by segment_dim (", segment_dim,
              ")");
  const int64_t D = C / segment_dim;
  Geometry g{id, 0, 0, T, H, W, segment_dim, D, 1};
  if (id == kAxisT) {
    g.F = T * D;
    g.M = B * H * W * segment_dim;
  } else {
    TORCH_CHECK((H * W) % segment_dim == 0, "morph_fc: x tokens per frame H*W (", H * W,
                ") must be divisible by segment_dim (", segment_dim, ")");
    g.F = C;
    g.M = B * T * H * W;
    g.NCH = H * W / segment_dim;
  }
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == g.F && weight.size(1) == g.F, "morph_fc: weight must have shape (",
              g.F, ", ", g.F, ") for axis '", axis, "', got ", weight.sizes());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_like_x("morph_fc", x, {{"bias", b}});
    TORCH_CHECK(b.dim() == 1 && b.size(0) == g.F, "morph_fc: bias must have shape (", g.F, ",), got ", b.sizes());
  }
  return with_dividers(g);
}

BackwardNeeds check_backward_args(at::TensorList grads, const c10::List<bool>& needs, const at::Tensor& x,
                                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(grads.size() == 1, "morph_fc backward: grads must hold one tensor (the output's), got ", grads.size());
  TORCH_CHECK(needs.size() == 3, "morph_fc backward: needs must hold 3 flags (x, weight, bias), got ", needs.size());
  const at::Tensor& g = grads[0];
  check_like_x("morph_fc backward", x, {{"grads[0]", g}});
  TORCH_CHECK(g.sizes() == x.sizes(), "morph_fc backward: grads[0] must have the shape of x ", x.sizes(), ", got ",
              g.sizes());
  const BackwardNeeds n{needs.get(0), needs.get(1), needs.get(2)};
  TORCH_CHECK(!n.bias || bias.has_value(), "morph_fc backward: needs[2] (bias) is set but bias is None");
  return n;
}

Strides strides5(const at::Tensor& t) {
  if (t.dim() == 5) return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
  // an image is a clip of one frame: the frame stride is never multiplied by a nonzero index
  return {t.stride(0), 0, t.stride(1), t.stride(2), t.stride(3)};
}

}  // namespace morph_fc
}  // namespace mixops
