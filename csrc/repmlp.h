// The host side of mixops::_partition_fc_cuda (+ _backward), written once for both builds:
// `Runner` is the CUDA engine (repmlp.cu) or its CPU run (repmlp_cpu.cpp, gemm/host_engine.h), so
// the CPU tests exercise these very functions, operands and epilogues (repmlp_operands.cuh).
//
// What they compute (the contract of mixops/ops/repmlp.py; docs/repmlp.md sections 3 and 11):
//   partition_fc(x, W, b, gate, (h, w), S) -> out [N, C, H, W]: per share-set s the GEMM
//     Z_s = X_s W_s^T + b_s through the partition map, stored through the official un-partition and
//     multiplied by gate[n, c_o]: ONE grouped launch (group = share-set).
//   Backward, dZ_s = gate * dOut through the output map:
//     dX_s = dZ_s W_s: one grouped launch whose epilogue also gives dgate's partials (tile sums of
//       acc * x, before the gate scale), plus the bias term sum(dOut * b) as a column sum;
//     dW_s = dZ_s^T X_s: one grouped deterministic split-K launch (the gate scales dZ in its
//       computed operand load); db = colsum(dZ_s) as a column sum.
// Every reduction is a fixed-order sum of partials laid out by the shapes alone: deterministic.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <optional>
#include <vector>

#include "gemm/split_k.h"
#include "repmlp_operands.cuh"
#include "tensor_checks.h"

namespace mixops::repmlp {

// The shape checks of mixops.partition_fc (the Python front raised ValueError/TypeError already;
// these guard direct torch.ops calls) and the map.
inline Geometry check_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& gate,
                           at::IntArrayRef partition, int64_t S) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(partition.size() == 2 && partition[0] >= 1 && partition[1] >= 1, op,
              ": partition must be two positive ints (h, w), got ", partition);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), ph = partition[0], pw = partition[1];
  TORCH_CHECK(S >= 1 && C % S == 0 && H % ph == 0 && W % pw == 0, op, ": x ", x.sizes(), " does not split into ", S,
              " share-sets of ", ph, " x ", pw, " partitions");
  const int64_t hw = ph * pw;
  check_like_x(op, x, {{"weight", weight}});
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == S * hw && weight.size(1) == hw && weight.size(2) == 1 &&
                  weight.size(3) == 1,
              op, ": weight must be [", S * hw, ", ", hw, ", 1, 1], got ", weight.sizes());
  if (bias.has_value()) {
    check_like_x(op, x, {{"bias", *bias}});
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == S * hw, op, ": bias must be [", S * hw, "], got ", bias->sizes());
  }
  if (gate.has_value()) {
    check_like_x(op, x, {{"gate", *gate}});
    TORCH_CHECK(gate->dim() == 2 && gate->size(0) == N && gate->size(1) == C, op, ": gate must be [", N, ", ", C,
                "], got ", gate->sizes());
  }
  return geometry(N, C, H, W, ph, pw, S);
}

// W_s as the engine's B: the forward's [hw (q), hw (p)] = W[s*hw + q, p] (K-major along p), or
// dX's transposed view [hw (p), hw (q)] (Rows-major along p); group s starts s*hw rows further.
template <gemm::Major kMajor, typename T>
gemm::Matrix<T, kMajor> weight_block(const T* data, const at::Tensor& w, int64_t hw) {
  const bool forward = kMajor == gemm::Major::K;
  const int64_t stride_r = forward ? w.stride(0) : w.stride(1), stride_k = forward ? w.stride(1) : w.stride(0);
  return {data, stride_r, stride_k,
          gemm::vector_width(w.const_data_ptr(), w.element_size(), w.stride(1), hw, {w.stride(0)}), hw * w.stride(0)};
}

template <typename T>
const T* optional_in(const std::optional<at::Tensor>& t) {
  return t.has_value() ? reinterpret_cast<const T*>(t->const_data_ptr()) : nullptr;
}

template <class Runner>
at::Tensor partition_fc(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& gate, at::IntArrayRef partition, int64_t num_sharesets) {
  const char* op = "_partition_fc";
  check_device_and_dtype(op, Runner::kDevice, {{"x", x}});
  const Geometry g = check_args(op, x, weight, bias, gate, partition, num_sharesets);
  const auto guard = Runner::guard(x);
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (g.M == 0) return out;
  MIXOPS_GEMM_SWITCH(x.scalar_type(), Runner::tf32(), scalar_t, kTensorCores, [&] {
    using T = typename Runner::template T<scalar_t>;
    const Strides so = strides4(out);
    const ForwardStore<T> store{Runner::template out<scalar_t>(out),
                                optional_in<T>(bias),
                                optional_in<T>(gate),
                                bias.has_value() ? bias->stride(0) : 0,
                                gate.has_value() ? gate->stride(0) : 0,
                                gate.has_value() ? gate->stride(1) : 0,
                                g,
                                so,
                                pixels(g, so)};
    Runner::template with_tile<scalar_t, kTensorCores>([&]<class Tile>() {
      gemm::Problem p{g.M, g.hw, g.hw, g.hw, 1};
      p.groups = static_cast<int>(g.S);
      Runner::template launch<Tile>(p, partition_operand<false>(Runner::template in<scalar_t>(x), x, g),
                                    weight_block<gemm::Major::K>(Runner::template in<scalar_t>(weight), weight, g.hw),
                                    store);
    });
  });
  return out;
}

template <class Runner>
std::vector<at::Tensor> partition_fc_backward(at::TensorList grads, const c10::List<bool>& needs, const at::Tensor& x,
                                              const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& gate, at::IntArrayRef partition,
                                              int64_t num_sharesets) {
  const char* op = "_partition_fc backward";
  check_device_and_dtype(op, Runner::kDevice, {{"x", x}});
  const Geometry g = check_args(op, x, weight, bias, gate, partition, num_sharesets);
  TORCH_CHECK(grads.size() == 1, op, ": grads must hold one tensor, got ", grads.size());
  TORCH_CHECK(needs.size() == 4, op, ": needs must hold 4 flags (x, weight, bias, gate), got ", needs.size());
  const at::Tensor& dout = grads[0];
  check_like_x(op, x, {{"grads[0]", dout}});
  TORCH_CHECK(dout.sizes() == x.sizes(), op, ": grads[0] must have the shape of x ", x.sizes(), ", got ", dout.sizes());
  const bool need_x = needs.get(0), need_w = needs.get(1), need_b = needs.get(2), need_gate = needs.get(3);
  TORCH_CHECK(!need_b || bias.has_value(), op, ": needs[2] (bias) is set but bias is None");
  TORCH_CHECK(!need_gate || gate.has_value(), op, ": needs[3] (gate) is set but gate is None");
  const auto guard = Runner::guard(x);
  std::vector<at::Tensor> result;
  if (g.M == 0) {  // an empty batch or map: every gradient is zero
    if (need_x) result.push_back(at::zeros(x.sizes(), x.options()));
    if (need_w) result.push_back(at::zeros(weight.sizes(), weight.options()));
    if (need_b) result.push_back(at::zeros(bias->sizes(), bias->options()));
    if (need_gate) result.push_back(at::zeros(gate->sizes(), gate->options()));
    return result;
  }
  const at::TensorOptions acc = x.options().dtype(accumulate_dtype(x));
  const Strides sg = strides4(dout);
  at::Tensor dx, dw, db, dgate;
  MIXOPS_GEMM_SWITCH(x.scalar_type(), Runner::tf32(), scalar_t, kTensorCores, [&] {
    using T = typename Runner::template T<scalar_t>;
    using AccT = Acc<T>;
    const T* grad = Runner::template in<scalar_t>(dout);
    const T* gate_data = optional_in<T>(gate);
    const int64_t gate_n = gate.has_value() ? gate->stride(0) : 0, gate_c = gate.has_value() ? gate->stride(1) : 0;
    Runner::template with_tile<scalar_t, kTensorCores>([&]<class Tile>() {
      if (need_x || need_gate) {
        if (need_x) dx = at::empty(x.sizes(), x.options());
        const Strides sx = strides4(x), sdx = need_x ? strides4(dx) : sx;
        const int64_t tiles_n = cdiv(g.hw, Tile::kBN);
        const at::Tensor part = need_gate ? at::empty({g.S, tiles_n, g.M}, acc) : at::Tensor();
        gemm::Problem p{g.M, g.hw, g.hw, g.hw, 1};
        p.groups = static_cast<int>(g.S);
        const auto launch = [&]<bool kGateGrad>() {
          const InputGradStore<T, kGateGrad> store{need_x ? Runner::template out<scalar_t>(dx) : nullptr,
                                                   Runner::template in<scalar_t>(x),
                                                   gate_data,
                                                   kGateGrad ? part.template mutable_data_ptr<AccT>() : nullptr,
                                                   gate_n,
                                                   gate_c,
                                                   tiles_n * g.M,
                                                   g,
                                                   sdx,
                                                   sx,
                                                   pixels(g, sdx),
                                                   pixels(g, sx)};
          Runner::template launch<Tile>(
              p, partition_operand<true>(grad, dout, g),
              weight_block<gemm::Major::Rows>(Runner::template in<scalar_t>(weight), weight, g.hw), store);
        };
        if (need_gate) launch.template operator()<true>();
        else launch.template operator()<false>();
        if (need_gate) {
          // row m = n*R + c'*(hp*wp) + r of share-set s: output channel c'*S + s, partition r
          dgate = part.view({g.S, tiles_n, g.N, g.Q, g.HP * g.WP}).sum({1, 4}).permute({1, 2, 0}).reshape({g.N, g.C});
          if (bias.has_value()) {
            const GateBiasTerm<T> term{grad,         optional_in<T>(bias), bias->stride(0), Divider(x.size(3)),
                                       Divider(g.C), Divider(g.S),         Divider(g.PH),   Divider(g.PW),
                                       sg,           g.hw};
            dgate = dgate.add(Runner::column_sums(grad, x.size(2) * x.size(3), g.N * g.C, term, acc).view({g.N, g.C}));
          }
          dgate = dgate.to(gate->scalar_type());
        }
      }
      if (need_w) {
        // one split-K launch over every share-set: [S*hw, hw], group s's rows s*hw ..
        const auto xt = partition_operand<false, true>(Runner::template in<scalar_t>(x), x, g);
        const int groups = static_cast<int>(g.S);
        dw = gate.has_value()
                 ? gemm::split_k<Runner, Tile>(g.hw, g.hw, g.M,
                                               GatedGradOperand<T>{grad, gate_data, gate_n, gate_c, g, sg, pixels(g, sg)},
                                               xt, x, weight.scalar_type(), groups)
                 : gemm::split_k<Runner, Tile>(g.hw, g.hw, g.M, partition_operand<true, true>(grad, dout, g), xt, x,
                                               weight.scalar_type(), groups);
        dw = dw.view(weight.sizes());
      }
    });
    if (need_b) {
      const BiasGradColumns<T> map{grad, gate_data, gate_n, gate_c, g, sg, pixels(g, sg), Divider(g.hw)};
      db = Runner::column_sums(grad, g.M, g.S * g.hw, map, acc).to(bias->scalar_type());
    }
  });
  for (const auto& [need, t] : {std::pair{need_x, dx}, std::pair{need_w, dw}, std::pair{need_b, db},
                                std::pair{need_gate, dgate}})
    if (need) result.push_back(t);
  return result;
}

}  // namespace mixops::repmlp
