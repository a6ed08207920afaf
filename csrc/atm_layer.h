// The host side of the fused ATMLayer's internal ops, mixops::_atm_means_cuda and _atm_mix_cuda
// (+ _backward), written once for both builds over a Runner (gemm/engine_runner.cuh on the GPU,
// gemm/host_engine.h HostRunner on the CPU, whose tests thereby run these functions, maps and
// epilogues: atm_layer_operands.cuh). The contract is mixops/ops/atm_layer.py's; docs/atm.md
// section 6 gives the two-pass scheme.
//
//   _atm_means(x, off_w, off_h, share) -> [B, 3, C]: token means of S_w, S_h and x (accumulator
//     dtype), one deterministic column-sum pass computing the samples on the fly. Backward: the
//     mean's gradient g/(H·W) reaches every token; the atm_sample backward op on it, expanded.
//   _atm_mix(x, off_w, off_h, W_w, W_h, W_c, b_w, b_h, alpha, share) -> y = Σ_k alpha_k·(S_k W_k^T
//     + b_k): ONE engine GEMM, K = 3C in three segments, S_w / S_h lerped in the operand load, the
//     per-(image, channel) alpha folded in per segment. Backward, per branch k: dS_k = (alpha_k·g)
//     W_k (then the atm_sample backward op for x and the offsets), dW_k = (alpha_k·g)^T S_k
//     (split-K, S_k re-gathered in the operand load), dalpha_k from the tile sums of the recomputed
//     S_k W_k^T (g·(y_k + b_k), never stored), db_k = Σ_b alpha_k·(per-image sums of g).
// Every sum is a fixed-order sum of partials laid out by the shapes alone: deterministic.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <optional>
#include <string_view>
#include <vector>

#include "atm_host.cuh"
#include "atm_layer_operands.cuh"
#include "gemm/split_k.h"
#include "tensor_checks.h"

namespace mixops::atm {
namespace {

// mixops::_atm_sample_cuda_backward through the dispatcher: the GPU kernel or the CPU build,
// whichever x's device picks; [gx if need_x][, goff if need_off].
inline std::vector<at::Tensor> sample_backward(const at::Tensor& g, bool need_x, bool need_off, const at::Tensor& x,
                                               const at::Tensor& offset, std::string_view axis, int64_t share) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mixops::_atm_sample_cuda_backward", "")
          .typed<std::vector<at::Tensor>(at::TensorList, const c10::List<bool>&, const at::Tensor&, const at::Tensor&,
                                         std::string_view, int64_t)>();
  return op.call({g}, c10::List<bool>({need_x, need_off}), x, offset, axis, share);
}

// The checked views of the layer: the W and H line shapes of x with their offsets.
struct LayerShapes {
  LineShape w, h;
  int64_t B, H, W, C, pixels;
};

inline LayerShapes check_layer(const char* op, c10::DeviceType device, const at::Tensor& x, const at::Tensor& offset_w,
                               const at::Tensor& offset_h, int64_t share) {
  check_device_and_dtype(op, device, {{"x", x}, {"offset_w", offset_w}, {"offset_h", offset_h}});
  const LineShape w = check_gather(op, x, offset_w, "w", share);
  const LineShape h = check_gather(op, x, offset_h, "h", share);
  return {w, h, x.size(0), x.size(1), x.size(2), x.size(3), x.size(0) * x.size(1) * x.size(2)};
}

template <class Runner, typename scalar_t>
SampledPair<typename Runner::template T<scalar_t>> sampled_pair(const at::Tensor& x, const at::Tensor& offset_w,
                                                                const at::Tensor& offset_h, const LayerShapes& s) {
  return {gathered_s<Runner, scalar_t, gemm::Major::K>(x, offset_w, s.w),
          gathered_s<Runner, scalar_t, gemm::Major::K>(x, offset_h, s.h)};
}

// ---------------------------------------------------------------------------------------------
// _atm_means
// ---------------------------------------------------------------------------------------------

template <class Runner>
at::Tensor atm_means(const at::Tensor& x, const at::Tensor& offset_w, const at::Tensor& offset_h, int64_t share) {
  const LayerShapes s = check_layer("_atm_means", Runner::kDevice, x, offset_w, offset_h, share);
  const auto guard = Runner::guard(x);
  const at::TensorOptions acc = x.options().dtype(accumulate_dtype(x));
  if (s.pixels == 0 || s.C == 0) return at::zeros({s.B, 3, s.C}, acc);
  return MIXOPS_FLOAT_SWITCH(x.scalar_type(), scalar_t, [&] {
    using T = typename Runner::template T<scalar_t>;
    const MeanColumns<T> map{sampled_pair<Runner, scalar_t>(x, offset_w, offset_h, s), Divider(s.W), Divider(s.H),
                             Divider(s.C), Divider(3 * s.C)};
    return Runner::column_sums(static_cast<const T*>(nullptr), s.H * s.W, s.B * 3 * s.C, map, acc)
        .div(static_cast<double>(s.H * s.W))
        .view({s.B, 3, s.C});
  });
}

template <class Runner>
std::vector<at::Tensor> atm_means_backward(at::TensorList grads, const c10::List<bool>& needs, const at::Tensor& x,
                                           const at::Tensor& offset_w, const at::Tensor& offset_h, int64_t share) {
  const char* op = "_atm_means backward";
  const LayerShapes s = check_layer(op, Runner::kDevice, x, offset_w, offset_h, share);
  TORCH_CHECK(grads.size() == 1 && grads[0].sizes() == at::IntArrayRef({s.B, 3, s.C}), op,
              ": grads must hold one [B, 3, C] tensor");
  TORCH_CHECK(needs.size() == 3, op, ": needs must hold 3 flags (x, offset_w, offset_h), got ", needs.size());
  const bool need_x = needs.get(0);
  const auto guard = Runner::guard(x);
  // the mean's gradient reaches every token: g / (H·W), expanded (zero strides) over [B, H, W, C]
  const at::Tensor g = grads[0].to(accumulate_dtype(x)).div(static_cast<double>(std::max<int64_t>(s.H * s.W, 1)));
  const auto every_token = [&](const at::Tensor& t, int k) { return t.select(1, k).view({s.B, 1, 1, s.C}).expand(x.sizes()); };
  // (the sample backward op takes x's dtype)
  const at::Tensor g_storage = g.to(x.scalar_type());
  at::Tensor gx = need_x ? every_token(g, 2).contiguous() : at::Tensor();
  std::vector<at::Tensor> goffs;
  const at::Tensor* offsets[2] = {&offset_w, &offset_h};
  for (int k = 0; k < 2; ++k) {
    const bool need_off = needs.get(1 + k);
    if (!need_x && !need_off) continue;
    std::vector<at::Tensor> got = sample_backward(every_token(g_storage, k), need_x, need_off, x, *offsets[k], k == 0 ? "w" : "h", share);
    if (need_x) gx.add_(got[0]);
    if (need_off) goffs.push_back(got.back());
  }
  std::vector<at::Tensor> result;
  if (need_x) result.push_back(gx.to(x.scalar_type()));
  for (at::Tensor& t : goffs) result.push_back(t);
  return result;
}

// ---------------------------------------------------------------------------------------------
// _atm_mix
// ---------------------------------------------------------------------------------------------

struct MixArgs {
  LayerShapes s;
  int64_t c_out;
  at::Tensor alpha;  // in the accumulator dtype, contiguous
};

inline MixArgs check_mix(const char* op, c10::DeviceType device, const at::Tensor& x, const at::Tensor& offset_w,
                         const at::Tensor& offset_h, const at::Tensor& weight_w, const at::Tensor& weight_h,
                         const at::Tensor& weight_c, const std::optional<at::Tensor>& bias_w,
                         const std::optional<at::Tensor>& bias_h, const at::Tensor& alpha, int64_t share) {
  const LayerShapes s = check_layer(op, device, x, offset_w, offset_h, share);
  check_fc(op, x, weight_w, bias_w);
  check_fc(op, x, weight_h, bias_h);
  check_fc(op, x, weight_c, std::nullopt);
  const int64_t c_out = weight_w.size(0);
  TORCH_CHECK(weight_h.size(0) == c_out && weight_c.size(0) == c_out, op, ": the three weights must be [", c_out,
              ", ", s.C, "]");
  // alpha comes in x's dtype (the module's softmax) or the accumulator dtype; the kernels read the latter
  check_like_x_or_accumulator(op, x, {{"alpha", alpha}});
  TORCH_CHECK(alpha.sizes() == at::IntArrayRef({s.B, c_out, 3}), op, ": alpha must be [", s.B, ", ", c_out,
              ", 3], got ", alpha.sizes());
  return {s, c_out, alpha.to(accumulate_dtype(x)).contiguous()};
}

template <class Runner>
at::Tensor atm_mix(const at::Tensor& x, const at::Tensor& offset_w, const at::Tensor& offset_h,
                   const at::Tensor& weight_w, const at::Tensor& weight_h, const at::Tensor& weight_c,
                   const std::optional<at::Tensor>& bias_w, const std::optional<at::Tensor>& bias_h,
                   const at::Tensor& alpha, int64_t share) {
  const MixArgs a = check_mix("_atm_mix", Runner::kDevice, x, offset_w, offset_h, weight_w, weight_h, weight_c, bias_w,
                              bias_h, alpha, share);
  const LayerShapes& s = a.s;
  const auto guard = Runner::guard(x);
  at::Tensor out = at::empty({s.B, s.H, s.W, a.c_out}, x.options());
  if (s.pixels == 0 || a.c_out == 0) return out;
  // the three weights side by side, [C_out, 3C] (the B operand of the K = 3C GEMM)
  const at::Tensor weights = at::cat({weight_w, weight_h, weight_c}, 1);
  MIXOPS_GEMM_SWITCH(x.scalar_type(), Runner::tf32(), scalar_t, kTensorCores, [&] {
    using T = typename Runner::template T<scalar_t>;
    // (C = 0: K = 0, and every branch is its bias, scaled)
    const StackedS<T> A{sampled_pair<Runner, scalar_t>(x, offset_w, offset_h, s), Divider(s.W), Divider(s.H),
                        Divider(std::max<int64_t>(s.C, 1))};
    const MixStore<T> store{Runner::template out<scalar_t>(out),
                            bias_w.has_value() ? Runner::template in<scalar_t>(*bias_w) : nullptr,
                            bias_h.has_value() ? Runner::template in<scalar_t>(*bias_h) : nullptr,
                            bias_w.has_value() ? bias_w->stride(0) : 0,
                            bias_h.has_value() ? bias_h->stride(0) : 0,
                            a.alpha.const_data_ptr<Acc<T>>(),
                            pixel_matrix(s.w, out),
                            Divider(s.H * s.W),
                            a.c_out};
    Runner::template with_tile<scalar_t, kTensorCores>([&]<class Tile>() {
      Runner::template launch<Tile>(gemm::Problem{s.pixels, a.c_out, 3 * s.C, 3 * s.C, 1, 3}, A,
                                    weight_operand<Runner, scalar_t, gemm::Major::K>(weights), store);
    });
  });
  return out;
}

template <class Runner>
std::vector<at::Tensor> atm_mix_backward(at::TensorList grads, const c10::List<bool>& needs, const at::Tensor& x,
                                         const at::Tensor& offset_w, const at::Tensor& offset_h,
                                         const at::Tensor& weight_w, const at::Tensor& weight_h,
                                         const at::Tensor& weight_c, const std::optional<at::Tensor>& bias_w,
                                         const std::optional<at::Tensor>& bias_h, const at::Tensor& alpha,
                                         int64_t share) {
  const char* op = "_atm_mix backward";
  const MixArgs a = check_mix(op, Runner::kDevice, x, offset_w, offset_h, weight_w, weight_h, weight_c, bias_w,
                              bias_h, alpha, share);
  const LayerShapes& s = a.s;
  check_grads(op, grads, needs.size(), 9, {s.B, s.H, s.W, a.c_out}, x);
  const bool need_x = needs.get(0), need_alpha = needs.get(8);
  TORCH_CHECK(!needs.get(6) || bias_w.has_value(), op, ": needs[6] (bias_w) is set but bias_w is None");
  TORCH_CHECK(!needs.get(7) || bias_h.has_value(), op, ": needs[7] (bias_h) is set but bias_h is None");
  const auto guard = Runner::guard(x);
  const c10::ScalarType acc_dtype = accumulate_dtype(x);
  const at::TensorOptions acc = x.options().dtype(acc_dtype);
  const at::Tensor& g = grads[0];

  // the branches: (axis, its view, offsets, weight, bias, need offsets, need weight, need bias)
  struct Branch {
    const char* axis;
    const LineShape* view;
    const at::Tensor* offset;
    const at::Tensor* weight;
    const std::optional<at::Tensor>* bias;
    bool need_off, need_w, need_b;
  };
  const std::optional<at::Tensor> no_bias;
  const Branch branches[3] = {
      {"w", &s.w, &offset_w, &weight_w, &bias_w, needs.get(1), needs.get(3), needs.get(6)},
      {"h", &s.h, &offset_h, &weight_h, &bias_h, needs.get(2), needs.get(4), needs.get(7)},
      {"c", &s.w, nullptr, &weight_c, &no_bias, false, needs.get(5), false},
  };
  at::Tensor gx = need_x ? at::zeros(x.sizes(), acc) : at::Tensor();
  at::Tensor goff[2], dw[3], db[2], dalpha[3];
  const bool empty = s.pixels == 0 || s.C == 0 || a.c_out == 0;
  // per-image column sums of g, [B, C_out] (the bias gradients)
  at::Tensor gsum;
  if (!empty && (needs.get(6) || needs.get(7)))
    gsum = MIXOPS_FLOAT_SWITCH(x.scalar_type(), scalar_t, [&] {
             const ImageColumns map{s.w.strides(g), Divider(s.W), Divider(a.c_out)};
             return Runner::column_sums(g.const_data_ptr<scalar_t>(), s.H * s.W, s.B * a.c_out, map, acc);
           }).view({s.B, a.c_out});
  for (int k = 0; k < 3; ++k) {
    const Branch& br = branches[k];
    const at::Tensor a_k = a.alpha.select(2, k);  // [B, C_out]
    const bool need_s = need_x || br.need_off;
    if (empty) {
      if (br.need_off) goff[k] = at::zeros(br.offset->sizes(), br.offset->options());
      if (br.need_w) dw[k] = at::zeros(br.weight->sizes(), br.weight->options());
      if (br.need_b) db[k] = at::zeros((*br.bias)->sizes(), (*br.bias)->options());
      if (need_alpha) dalpha[k] = at::zeros({s.B, a.c_out}, acc);
      continue;
    }
    if (br.need_b) db[k] = gsum.mul(a_k).sum(0).to((*br.bias)->scalar_type());
    MIXOPS_GEMM_SWITCH(x.scalar_type(), Runner::tf32(), scalar_t, kTensorCores, [&] {
      using T = typename Runner::template T<scalar_t>;
      using AccT = Acc<T>;
      // alpha_k·g in the storage dtype, the GEMMs' operand
      const at::Tensor ga = (need_s || br.need_w) ? g.to(acc_dtype).mul(a_k.view({s.B, 1, 1, a.c_out})).to(x.scalar_type())
                                                   : at::Tensor();
      Runner::template with_tile<scalar_t, kTensorCores>([&]<class Tile>() {
        // S_k of the branch in its view: the gathered samples, or x itself (channel branch)
        const auto with_s = [&]<gemm::Major kMajor>(auto&& fn) {
          if (k == 2) return fn(line_operand<Runner, scalar_t, kMajor>(x, *br.view));
          return fn(gathered_s<Runner, scalar_t, kMajor>(x, *br.offset, *br.view));
        };
        if (need_s) {
          at::Tensor ds = at::empty(x.sizes(), x.options());
          Runner::template launch<Tile>(gemm::Problem{s.pixels, s.C, a.c_out, a.c_out, 1},
                                        line_operand<Runner, scalar_t, gemm::Major::K>(ga, s.w),
                                        weight_operand<Runner, scalar_t, gemm::Major::Rows>(*br.weight),
                                        pixel_store<Runner, scalar_t>(ds, std::nullopt, s.w));
          if (k == 2) {
            if (need_x) gx.add_(ds);
          } else {
            std::vector<at::Tensor> got = sample_backward(ds, need_x, br.need_off, x, *br.offset, br.axis, share);
            if (need_x) gx.add_(got[0]);
            if (br.need_off) goff[k] = got.back();
          }
        }
        if (br.need_w)
          dw[k] = with_s.template operator()<gemm::Major::Rows>([&](const auto& S) {
            return gemm::split_k<Runner, Tile>(a.c_out, s.C, s.pixels,
                                               line_operand<Runner, scalar_t, gemm::Major::Rows>(ga, *br.view), S, x,
                                               br.weight->scalar_type());
          });
        if (need_alpha) {
          at::Tensor part = at::zeros({s.B, gemm::batch_slots<Tile::kBM>(s.H * s.W), a.c_out, 1}, acc);
          const AlphaGradSums<T> epi{Runner::template in<scalar_t>(g),
                                     br.bias->has_value() ? Runner::template in<scalar_t>(**br.bias) : nullptr,
                                     br.bias->has_value() ? (*br.bias)->stride(0) : 0,
                                     pixel_matrix(*br.view, g),
                                     Divider(s.H * s.W),
                                     a.c_out,
                                     part.mutable_data_ptr<AccT>()};
          with_s.template operator()<gemm::Major::K>([&](const auto& S) {
            Runner::template launch<Tile>(gemm::Problem{s.pixels, a.c_out, s.C, s.C, 1}, S,
                                          weight_operand<Runner, scalar_t, gemm::Major::K>(*br.weight), epi);
            return 0;
          });
          dalpha[k] = part.sum({1, 3});
        }
      });
    });
  }
  std::vector<at::Tensor> result;
  if (need_x) result.push_back(gx.to(x.scalar_type()));
  for (int k = 0; k < 2; ++k)
    if (branches[k].need_off) result.push_back(goff[k]);
  for (int k = 0; k < 3; ++k)
    if (branches[k].need_w) result.push_back(dw[k]);
  for (int k = 0; k < 2; ++k)
    if (branches[k].need_b) result.push_back(db[k]);
  if (need_alpha) result.push_back(at::stack({dalpha[0], dalpha[1], dalpha[2]}, 2).to(alpha.scalar_type()));
  return result;
}

}  // namespace
}  // namespace mixops::atm
