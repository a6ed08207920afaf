// The host side of mixops::_window_attention_cuda (+ _backward), written once for both builds:
// `Backend` is the CUDA launcher (window_attention.cu: the kernels of window_attention_kernels.cuh)
// or its CPU emulation (window_attention_cpu.cpp: the same blocks as plain loops over the same map
// and row math), so the CPU tests exercise these very functions.
//
// What they compute (the contract of mixops/ops/window_attention.py; docs/window_attention.md
// sections 2.6, 2.7 and 7):
//   forward: out [B, (T,) H, W, C] and the row lse [B, R, W, heads] (one launch);
//   backward: the forward again (the op saves only its inputs), delta = rowsum(dOut * out), then
//     dK/dV (key_grad) and dQ (query_grad) into one [B, (T,) H, W, 3C] gradient, and with "bias"
//     padding d qkv_bias: zero for q (padded queries are cropped), for k and v the virtual key's
//     dk, dv per (window, head, query block), added over the windows and blocks in a fixed order.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <optional>
#include <string_view>
#include <vector>

#include "column_term.h"
#include "gemm/operands.cuh"
#include "tensor_checks.h"
#include "window_attention_map.cuh"

namespace mixops::window_attention {

// Strides of the [B, T, H, W, X] view of an image [B, H, W, X] (T = 1) or video tensor.
inline Strides strides5(const at::Tensor& t) {
  if (t.dim() == 4) return {t.stride(0), 0, t.stride(1), t.stride(2), t.stride(3)};
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

// The checks of mixops.window_attention (the Python front raised ValueError/TypeError already;
// these guard direct torch.ops calls) and the problem's geometry.
inline Geometry check_args(const char* op, const at::Tensor& qkv, int64_t heads, std::optional<int64_t> window_size,
                           double scale, std::string_view padding, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(qkv.dim() == 4 || qkv.dim() == 5, op, ": qkv must be [B, H, W, 3C] or [B, T, H, W, 3C], got ",
              qkv.sizes());
  const int64_t C3 = qkv.size(-1);
  TORCH_CHECK(C3 % 3 == 0 && heads >= 1 && (C3 / 3) % heads == 0 && C3 > 0, op, ": qkv's last axis (", C3,
              ") must be 3C with C divisible by num_heads (", heads, ")");
  TORCH_CHECK(!window_size.has_value() || (*window_size >= 1 && qkv.dim() == 4), op,
              ": window_size must be None or >= 1, and None for video input; got ",
              window_size.has_value() ? std::to_string(*window_size) : "None", " for qkv ", qkv.sizes());
  TORCH_CHECK(padding == "bias" || padding == "mask", op, ": padding must be 'bias' or 'mask', got '", padding, "'");
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  if (bias.has_value()) {
    check_like_x(op, qkv, {{"qkv_bias", *bias}});
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C3, op, ": qkv_bias must be [", C3, "], got ", bias->sizes());
  }
  const int64_t B = qkv.size(0), T = qkv.dim() == 5 ? qkv.size(1) : 1, H = qkv.size(-3), W = qkv.size(-2);
  Geometry g;
  g.B = B;
  g.R = T * H;
  g.W = W;
  g.C = C3 / 3;
  g.by_h = Divider(H > 0 ? H : 1);
  g.heads = heads;
  g.d = g.C / heads;
  g.wr = window_size.has_value() ? *window_size : g.R;
  g.wc = window_size.has_value() ? *window_size : W;
  return g;
}

// The cp.async run of a tensor's head channels (gemm::vector_width over d channels; the heads and
// slots start at multiples of d).
inline int head_vector_width(const at::Tensor& t, const Strides& s, int64_t d) {
  return gemm::vector_width(t.const_data_ptr(), t.element_size(), s.c, d, {s.b, s.t, s.h, s.w});
}

// The query blocks of a launch (the grid's y extent, and the virtual key partials' second axis).
template <typename T>
int64_t query_blocks(const Geometry& g) {
  return cdiv(g.window_tokens(), kBlockTokens<T>);
}

// Args of the forward (the backward adds its own); T the backend's element type.
template <class Backend, typename scalar_t, typename T = typename Backend::template T<scalar_t>>
Args<T> forward_args(const Geometry& g, const at::Tensor& qkv, const at::Tensor& bias, bool virtual_key, double scale,
                     at::Tensor& out, at::Tensor& lse) {
  Args<T> a{};
  a.g = g;
  a.qkv = Backend::template in<scalar_t>(qkv);
  a.sq = strides5(qkv);
  a.vec_q = head_vector_width(qkv, a.sq, g.d);
  a.bias = Backend::template in<scalar_t>(bias);
  a.s_bias = bias.stride(0);
  a.virtual_key = virtual_key;
  a.scale = static_cast<Acc<T>>(scale);
  a.out = Backend::template out<scalar_t>(out);
  a.so = strides5(out);
  a.lse = lse.template mutable_data_ptr<Acc<T>>();
  return a;
}

template <class Backend>
at::Tensor window_attention(const at::Tensor& qkv, int64_t num_heads, std::optional<int64_t> window_size, double scale,
                            std::string_view padding, const std::optional<at::Tensor>& qkv_bias) {
  const char* op = "_window_attention";
  check_device_and_dtype(op, Backend::kDevice, {{"qkv", qkv}});
  const Geometry g = check_args(op, qkv, num_heads, window_size, scale, padding, qkv_bias);
  const auto guard = Backend::guard(qkv);
  std::vector<int64_t> shape(qkv.sizes().begin(), qkv.sizes().end());
  shape.back() = g.C;
  at::Tensor out = at::empty(shape, qkv.options());
  if (out.numel() == 0) return out;
  const bool virtual_key = window_size.has_value() && padding == "bias";
  const at::Tensor bias = qkv_bias.has_value() ? *qkv_bias : at::zeros({3 * g.C}, qkv.options());
  at::Tensor lse = at::empty({g.B, g.R, g.W, g.heads}, qkv.options().dtype(accumulate_dtype(qkv)));
  MIXOPS_GEMM_SWITCH(qkv.scalar_type(), Backend::tf32(), scalar_t, kTensorCores, [&] {
    Backend::template forward<kTensorCores>(forward_args<Backend, scalar_t>(g, qkv, bias, virtual_key, scale, out, lse));
  });
  return out;
}

template <class Backend>
std::vector<at::Tensor> window_attention_backward(at::TensorList grads, const c10::List<bool>& needs,
                                                  const at::Tensor& qkv, int64_t num_heads,
                                                  std::optional<int64_t> window_size, double scale,
                                                  std::string_view padding, const std::optional<at::Tensor>& qkv_bias) {
  const char* op = "_window_attention backward";
  check_device_and_dtype(op, Backend::kDevice, {{"qkv", qkv}});
  const Geometry g = check_args(op, qkv, num_heads, window_size, scale, padding, qkv_bias);
  TORCH_CHECK(grads.size() == 1, op, ": grads must hold one tensor, got ", grads.size());
  TORCH_CHECK(needs.size() == 2, op, ": needs must hold 2 flags (qkv, qkv_bias), got ", needs.size());
  const at::Tensor& dout = grads[0];
  check_like_x(op, qkv, {{"grads[0]", dout}});
  std::vector<int64_t> shape(qkv.sizes().begin(), qkv.sizes().end());
  shape.back() = g.C;
  TORCH_CHECK(dout.sizes() == at::IntArrayRef(shape), op, ": grads[0] must be ", at::IntArrayRef(shape), ", got ",
              dout.sizes());
  const bool need_qkv = needs.get(0), need_bias = needs.get(1);
  TORCH_CHECK(!need_bias || qkv_bias.has_value(), op, ": needs[1] (qkv_bias) is set but qkv_bias is None");
  const bool virtual_key = window_size.has_value() && padding == "bias";
  const auto guard = Backend::guard(qkv);
  const at::TensorOptions acc = qkv.options().dtype(accumulate_dtype(qkv));
  std::vector<at::Tensor> result;
  at::Tensor dqkv = need_qkv ? at::empty(qkv.sizes(), qkv.options()) : at::Tensor();
  at::Tensor dbias = need_bias ? at::zeros({3, g.C}, acc) : at::Tensor();
  if (dout.numel() > 0 && (need_qkv || (need_bias && virtual_key))) {
    const at::Tensor bias = qkv_bias.has_value() ? *qkv_bias : at::zeros({3 * g.C}, qkv.options());
    at::Tensor out = at::empty(shape, qkv.options());
    at::Tensor lse = at::empty({g.B, g.R, g.W, g.heads}, acc);
    MIXOPS_GEMM_SWITCH(qkv.scalar_type(), Backend::tf32(), scalar_t, kTensorCores, [&] {
      using T = typename Backend::template T<scalar_t>;
      Args<T> a = forward_args<Backend, scalar_t>(g, qkv, bias, virtual_key, scale, out, lse);
      Backend::template forward<kTensorCores>(a);
      // delta = rowsum(dOut * out) per (token, head), in the accumulator dtype
      const at::Tensor delta =
          at::mul(dout.to(acc.dtype()), out.to(acc.dtype())).reshape({g.B, g.R, g.W, g.heads, g.d}).sum(-1).contiguous();
      a.dout = Backend::template in<scalar_t>(dout);
      a.sd = strides5(dout);
      a.vec_d = head_vector_width(dout, a.sd, g.d);
      a.delta = delta.template const_data_ptr<Acc<T>>();
      if (need_qkv) {
        a.dqkv = Backend::template out<scalar_t>(dqkv);
        a.sg = strides5(dqkv);
        Backend::template key_grad<kTensorCores>(a);
      }
      const int64_t blocks = query_blocks<T>(g);
      const bool virtual_grads = need_bias && virtual_key;
      const at::Tensor part = virtual_grads ? at::zeros({g.programs(), blocks, 2, g.d}, acc) : at::Tensor();
      a.virtual_grads = virtual_grads ? part.template mutable_data_ptr<Acc<T>>() : nullptr;
      Backend::template query_grad<kTensorCores>(a);
      if (virtual_grads) {
        // partial (window, head, block, slot, e) summed over the windows (rows, in order) and then
        // the blocks: [heads, blocks, 2, d] -> the k and v rows of d qkv_bias
        const int64_t cols = g.heads * blocks * 2 * g.d;
        const at::Tensor sums =
            Backend::column_sums(a.virtual_grads, g.B * g.windows(), cols, DenseColumns{cols}, acc);
        dbias.narrow(0, 1, 2).copy_(sums.view({g.heads, blocks, 2, g.d}).sum(1).permute({1, 0, 2}).reshape({2, g.C}));
      }
    });
  } else if (need_qkv) {
    dqkv.zero_();
  }
  if (need_qkv) result.push_back(dqkv);
  if (need_bias) result.push_back(dbias.reshape({3 * g.C}).to(qkv_bias->scalar_type()));
  return result;
}

}  // namespace mixops::window_attention
