// The host side of the fused MorphFC layer's internal ops, mixops::_morph_branch_cuda and
// _reweighted_proj_cuda (+ _backward), written once for both builds: `Runner` is the CUDA engine
// (morph_fc_fused.cu) or its CPU run (morph_fc_fused_cpu.cpp, gemm/host_engine.h), so the CPU tests
// exercise these very functions, operands and epilogues (morph_fc_fused_operands.cuh).
//
// What they compute (the contract of mixops/ops/morph_fc_fused.py; docs/morph_fc.md):
//   _morph_branch(x, W, b, segment_dim, axis) -> (y, mean): y = morph_fc (axis "c": the channel FC)
//     and mean [B, C] = y's token means in the accumulator dtype, from the GEMM epilogue's tile sums.
//     Backward: gm = dmean / tokens reaches every token, added to dY in the operand load of the dX
//     and dW GEMMs; db = colsum(dY_g) + the closed form of gm's share (below).
//   _reweighted_proj(b0, b1, b2, alpha, W, bias) -> proj((b0·a0 + b1·a1) + b2·a2), the weighted sum
//     formed in the operand load. Backward: one dMix = dOut·W GEMM whose epilogue writes every
//     branch gradient alpha_k·dMix and the partials of dalpha = sum over tokens of dMix·b_k; dW over
//     the recomputed Mix (split-K); db = colsum(dOut).
// Every reduction is a fixed-order sum of partials laid out by the shapes alone: deterministic.
//
// Runner: kDevice; T<scalar_t> (the kernels' element type) and in / out (its pointers); tf32();
// guard(t) (the device guard); with_tile<scalar_t, kTensorCores>(fn) calls fn.operator()<Tile>();
// launch<Tile>(problem, A, B, epilogue); column_sums(data, rows, cols, map, options).
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "gemm/split_k.h"
#include "morph_fc_args.cuh"
#include "morph_fc_fused_operands.cuh"
#include "tensor_checks.h"

namespace mixops::morph_fc {

// The map of a branch: a token axis's, or for the channel FC "c" (and proj) the map of "w" with
// chunk length 1.
inline Geometry branch_geometry(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                int64_t segment_dim, const std::string& axis) {
  return axis == "c" ? check_forward_args(x, weight, bias, 1, "w") : check_forward_args(x, weight, bias, segment_dim, axis);
}

// ---------------------------------------------------------------------------------------------
// _morph_branch
// ---------------------------------------------------------------------------------------------

template <class Runner>
std::tuple<at::Tensor, at::Tensor> morph_branch(const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, int64_t segment_dim,
                                                const std::string& axis) {
  check_device_and_dtype("_morph_branch", Runner::kDevice, {{"x", x}});
  const Geometry g = branch_geometry(x, weight, bias, segment_dim, axis);
  const auto guard = Runner::guard(x);
  const int64_t B = x.size(0), C = x.size(-1);
  const at::TensorOptions acc = x.options().dtype(accumulate_dtype(x));
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (g.M == 0 || g.F == 0) return {y, at::zeros({B, C}, acc)};
  const int64_t rows_per_item = g.M / B, tokens = x.numel() / (B * C);
  // the token maps sum per row and residue; the channel FC (L = 1) per column and batch item
  const bool per_row = !(g.L == 1 && g.axis != kAxisT);
  at::Tensor mean = MIXOPS_GEMM_SWITCH(x.scalar_type(), Runner::tf32(), scalar_t, kTensorCores, [&] {
    using T = typename Runner::template T<scalar_t>;
    using AccT = Acc<T>;
    const ChunkStore<T> store{Runner::template out<scalar_t>(y),
                              bias.has_value() ? Runner::template in<scalar_t>(*bias) : nullptr,
                              bias.has_value() ? bias->stride(0) : 0, g, strides5(y)};
    return Runner::template with_tile<scalar_t, kTensorCores>([&]<class Tile>() {
      at::Tensor part = per_row ? at::empty({cdiv(g.F, Tile::kBN), g.M, g.D}, acc)
                                : at::zeros({B, gemm::batch_slots<Tile::kBM>(rows_per_item), g.F}, acc);
      const BranchStore<T> epi{store, part.mutable_data_ptr<AccT>(), per_row, Divider(rows_per_item)};
      Runner::template launch<Tile>(gemm::Problem{g.M, g.F, g.F, g.F, 1},
                                    chunk_operand(Runner::template in<scalar_t>(x), x, g),
                                    weight_matrix(Runner::template in<scalar_t>(weight), weight), epi);
      // [tiles_n, B, rows_per_item / L, L, D] summed over the column tiles and the rows of a group
      const at::Tensor sums = per_row ? part.view({part.size(0), B, rows_per_item / g.L, g.L * g.D}).sum({0, 2})
                                      : part.sum(1);
      return sums.div(static_cast<double>(tokens));
    });
  });
  return {y, mean};
}

template <class Runner>
std::vector<at::Tensor> morph_branch_backward(at::TensorList grads, const c10::List<bool>& needs, const at::Tensor& x,
                                              const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                              int64_t segment_dim, const std::string& axis) {
  const char* op = "_morph_branch backward";
  check_device_and_dtype(op, Runner::kDevice, {{"x", x}});
  const Geometry g = branch_geometry(x, weight, bias, segment_dim, axis);
  TORCH_CHECK(grads.size() == 2, op, ": grads must hold two tensors (y's and mean's), got ", grads.size());
  TORCH_CHECK(needs.size() == 3, op, ": needs must hold 3 flags (x, weight, bias), got ", needs.size());
  check_like_x(op, x, {{"grads[0]", grads[0]}});
  const int64_t B = x.size(0), C = x.size(-1);
  TORCH_CHECK(grads[0].sizes() == x.sizes(), op, ": grads[0] must have the shape of x ", x.sizes(), ", got ",
              grads[0].sizes());
  check_accumulator_like_x(op, x, {{"grads[1]", grads[1]}});
  TORCH_CHECK(grads[1].dim() == 2 && grads[1].size(0) == B && grads[1].size(1) == C, op, ": grads[1] must be [", B,
              ", ", C, "], got ", grads[1].sizes());
  const bool need_x = needs.get(0), need_w = needs.get(1), need_b = needs.get(2);
  TORCH_CHECK(!need_b || bias.has_value(), op, ": needs[2] (bias) is set but bias is None");
  const auto guard = Runner::guard(x);
  const at::TensorOptions acc = x.options().dtype(accumulate_dtype(x));
  std::vector<at::Tensor> result;
  const bool empty = g.M == 0 || g.F == 0;
  if (empty) {
    if (need_x) result.push_back(at::zeros(x.sizes(), x.options()));
    if (need_w) result.push_back(at::zeros({g.F, g.F}, weight.options()));
    if (need_b) result.push_back(at::zeros({g.F}, bias->options()));
    return result;
  }
  const at::Tensor& dy = grads[0];
  const int64_t rows_per_item = g.M / B, tokens = x.numel() / (B * C);
  const at::Tensor gm = grads[1].to(accumulate_dtype(x)).div(static_cast<double>(tokens)).contiguous();
  MIXOPS_GEMM_SWITCH(x.scalar_type(), Runner::tf32(), scalar_t, kTensorCores, [&] {
    using T = typename Runner::template T<scalar_t>;
    const Strides sy = strides5(dy);
    const ChannelIndex index{Divider(rows_per_item)};
    const Acc<T>* gm_data = gm.const_data_ptr<Acc<T>>();
    Runner::template with_tile<scalar_t, kTensorCores>([&]<class Tile>() {
      if (need_x) {
        at::Tensor dx = at::empty(x.sizes(), x.options());
        // W^T as a contiguous copy (F <= ~800): the forward's K-major weight operand
        const at::Tensor wt = weight.t().contiguous();
        const ChunkStore<T> store{Runner::template out<scalar_t>(dx), nullptr, 0, g, strides5(dx)};
        Runner::template launch<Tile>(gemm::Problem{g.M, g.F, g.F, g.F, 1},
                                      ChunkPlusMean<T, false>{Runner::template in<scalar_t>(dy), gm_data, g, sy, index},
                                      weight_matrix(Runner::template in<scalar_t>(wt), wt), store);
        result.push_back(dx);
      }
      if (need_w)
        result.push_back(gemm::split_k<Runner, Tile>(
            g.F, g.F, g.M, ChunkPlusMean<T, true>{Runner::template in<scalar_t>(dy), gm_data, g, sy, index},
            chunk_operand<true>(Runner::template in<scalar_t>(x), x, g), x, weight.scalar_type()));
    });
    if (need_b) {
      // colsum((dY + gm)_g)[f] = colsum(dY_g)[f] + (R / L)·sum_{b, grp} gm[b, grp·D + f % D]: every
      // item has R / L rows of each group, and each row holds every feature once
      const at::Tensor dy_sums = Runner::column_sums(dy.const_data_ptr<scalar_t>(), g.M, g.F, ChunkColumns{g, sy}, acc);
      const at::Tensor gm_share = gm.view({B * g.L, g.D}).sum(0).mul(static_cast<double>(rows_per_item / g.L));
      result.push_back(dy_sums.add(gm_share.repeat({g.F / g.D})).to(bias->scalar_type()));
    }
  });
  return result;
}

// ---------------------------------------------------------------------------------------------
// _reweighted_proj
// ---------------------------------------------------------------------------------------------

// The checked inputs of _reweighted_proj: the branches and alpha contiguous (one layout for every
// branch and branch gradient).
struct ProjArgs {
  std::vector<at::Tensor> branches;
  at::Tensor alpha;
  Geometry g;
  int64_t B, C, rows_per_item;
};

inline ProjArgs check_proj_args(const char* op, c10::DeviceType device, const at::Tensor& b0, const at::Tensor& b1,
                                const std::optional<at::Tensor>& b2, const at::Tensor& alpha,
                                const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_device_and_dtype(op, device, {{"b0", b0}});
  check_like_x(op, b0, {{"b1", b1}});
  TORCH_CHECK(b1.sizes() == b0.sizes(), op, ": b1 must have the shape of b0 ", b0.sizes(), ", got ", b1.sizes());
  std::vector<at::Tensor> branches{b0, b1};
  if (b2.has_value()) {
    check_like_x(op, b0, {{"b2", *b2}});
    TORCH_CHECK(b2->sizes() == b0.sizes(), op, ": b2 must have the shape of b0 ", b0.sizes(), ", got ", b2->sizes());
    branches.push_back(*b2);
  }
  // (the layer's branches are fresh outputs: contiguous, no copy)
  for (at::Tensor& b : branches) b = b.contiguous();
  const Geometry g = check_forward_args(branches[0], weight, bias, 1, "w");
  const int64_t B = b0.size(0), C = b0.size(-1), K = static_cast<int64_t>(branches.size());
  check_accumulator_like_x(op, b0, {{"alpha", alpha}});
  TORCH_CHECK(alpha.dim() == 3 && alpha.size(0) == B && alpha.size(1) == C && alpha.size(2) == K, op,
              ": alpha must be [", B, ", ", C, ", ", K, "], got ", alpha.sizes());
  return {branches, alpha.contiguous(), g, B, C, B > 0 ? g.M / B : 0};
}

template <typename T, class Runner, typename scalar_t>
Branches<T> branches_view(const ProjArgs& a) {
  const int count = static_cast<int>(a.branches.size());
  return {{Runner::template in<scalar_t>(a.branches[0]), Runner::template in<scalar_t>(a.branches[1]),
           count == 3 ? Runner::template in<scalar_t>(a.branches[2]) : nullptr},
          a.alpha.const_data_ptr<Acc<T>>(),
          a.g,
          strides5(a.branches[0]),
          Divider(a.rows_per_item > 0 ? a.rows_per_item : 1),
          a.C,
          count};
}

template <class Runner>
at::Tensor reweighted_proj(const at::Tensor& b0, const at::Tensor& b1, const std::optional<at::Tensor>& b2,
                           const at::Tensor& alpha, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const ProjArgs a = check_proj_args("_reweighted_proj", Runner::kDevice, b0, b1, b2, alpha, weight, bias);
  const auto guard = Runner::guard(b0);
  at::Tensor out = at::empty(b0.sizes(), b0.options());
  if (a.g.M == 0 || a.g.F == 0) return out;
  MIXOPS_GEMM_SWITCH(b0.scalar_type(), Runner::tf32(), scalar_t, kTensorCores, [&] {
    using T = typename Runner::template T<scalar_t>;
    const ChunkStore<T> store{Runner::template out<scalar_t>(out),
                              bias.has_value() ? Runner::template in<scalar_t>(*bias) : nullptr,
                              bias.has_value() ? bias->stride(0) : 0, a.g, strides5(out)};
    Runner::template with_tile<scalar_t, kTensorCores>([&]<class Tile>() {
      Runner::template launch<Tile>(gemm::Problem{a.g.M, a.C, a.C, a.C, 1},
                                    MixedBranches<T, false>{branches_view<T, Runner, scalar_t>(a)},
                                    weight_matrix(Runner::template in<scalar_t>(weight), weight), store);
    });
  });
  return out;
}

template <class Runner>
std::vector<at::Tensor> reweighted_proj_backward(at::TensorList grads, const c10::List<bool>& needs,
                                                 const at::Tensor& b0, const at::Tensor& b1,
                                                 const std::optional<at::Tensor>& b2, const at::Tensor& alpha,
                                                 const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "_reweighted_proj backward";
  const ProjArgs a = check_proj_args(op, Runner::kDevice, b0, b1, b2, alpha, weight, bias);
  TORCH_CHECK(grads.size() == 1, op, ": grads must hold one tensor (the output's), got ", grads.size());
  TORCH_CHECK(needs.size() == 6, op, ": needs must hold 6 flags (b0, b1, b2, alpha, weight, bias), got ",
              needs.size());
  check_like_x(op, b0, {{"grads[0]", grads[0]}});
  TORCH_CHECK(grads[0].sizes() == b0.sizes(), op, ": grads[0] must have the shape of b0 ", b0.sizes(), ", got ",
              grads[0].sizes());
  const int K = static_cast<int>(a.branches.size());
  const bool need_branch[3] = {needs.get(0), needs.get(1), K == 3 && needs.get(2)};
  const bool need_alpha = needs.get(3), need_w = needs.get(4), need_b = needs.get(5);
  TORCH_CHECK(!needs.get(2) || K == 3, op, ": needs[2] (b2) is set but b2 is None");
  TORCH_CHECK(!need_b || bias.has_value(), op, ": needs[5] (bias) is set but bias is None");
  const auto guard = Runner::guard(b0);
  const at::TensorOptions acc = b0.options().dtype(accumulate_dtype(b0));
  const at::Tensor& dout = grads[0];
  const Geometry& g = a.g;
  const bool empty = g.M == 0 || g.F == 0;
  std::vector<at::Tensor> dbranch;
  at::Tensor dalpha, dw, db;
  const bool need_mix_grad = need_alpha || need_branch[0] || need_branch[1] || need_branch[2];
  if (empty) {
    for (int k = 0; k < K; ++k) dbranch.push_back(at::zeros(b0.sizes(), b0.options()));
    dalpha = at::zeros(alpha.sizes(), alpha.options());
    dw = at::zeros(weight.sizes(), weight.options());
    if (bias.has_value()) db = at::zeros(bias->sizes(), bias->options());
  } else {
    MIXOPS_GEMM_SWITCH(b0.scalar_type(), Runner::tf32(), scalar_t, kTensorCores, [&] {
      using T = typename Runner::template T<scalar_t>;
      using AccT = Acc<T>;
      const Branches<T> br = branches_view<T, Runner, scalar_t>(a);
      Runner::template with_tile<scalar_t, kTensorCores>([&]<class Tile>() {
        if (need_mix_grad) {
          for (int k = 0; k < K; ++k) dbranch.push_back(at::empty(b0.sizes(), b0.options()));
          at::Tensor part = at::zeros({a.B, gemm::batch_slots<Tile::kBM>(a.rows_per_item), a.C, K}, acc);
          const at::Tensor wt = weight.t().contiguous();
          const ProjGradStore<T> epi{br,
                                     {Runner::template out<scalar_t>(dbranch[0]), Runner::template out<scalar_t>(dbranch[1]),
                                      K == 3 ? Runner::template out<scalar_t>(dbranch[2]) : nullptr},
                                     part.mutable_data_ptr<AccT>()};
          Runner::template launch<Tile>(gemm::Problem{g.M, a.C, a.C, a.C, 1},
                                        chunk_operand(Runner::template in<scalar_t>(dout), dout, g),
                                        weight_matrix(Runner::template in<scalar_t>(wt), wt), epi);
          dalpha = part.sum(1);
        }
        if (need_w)
          dw = gemm::split_k<Runner, Tile>(g.F, g.F, g.M, chunk_operand<true>(Runner::template in<scalar_t>(dout), dout, g),
                                           MixedBranches<T, true>{br}, b0, weight.scalar_type());
      });
      if (need_b)
        db = Runner::column_sums(dout.const_data_ptr<scalar_t>(), g.M, g.F, ChunkColumns{g, strides5(dout)}, acc)
                 .to(bias->scalar_type());
    });
  }
  std::vector<at::Tensor> result;
  for (int k = 0; k < K; ++k)
    if (need_branch[k]) result.push_back(dbranch[k]);
  if (need_alpha) result.push_back(dalpha.to(alpha.scalar_type()));
  if (need_w) result.push_back(dw);
  if (need_b) result.push_back(db);
  return result;
}

}  // namespace mixops::morph_fc
