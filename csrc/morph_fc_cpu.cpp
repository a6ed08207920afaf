// CPU implementation of mixops::_morph_fc_cuda / _morph_fc_cuda_backward: naive host loops over
// the SAME index map the CUDA kernels use (morph_fc_map.cuh), so tests on CPU tensors verify
// the kernels' gather / scatter math against the float64 reference. Not meant to be fast:
// per GEMM row it gathers the operand row through the map, does a dense GEMV, and scatters
// the result back through the map. Accumulates in fp32 (fp64 for fp64 inputs).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "common.cuh"
#include "morph_fc_args.cuh"
#include "tensor_checks.h"

namespace mixops {

namespace {

using morph_fc::Geometry;
using morph_fc::Strides;

// v[f] = a[map(row, f)] for f < F, as the accumulation type.
template <typename scalar_t, typename acc_t>
void gather_row(const Geometry& g, const Strides& s, const scalar_t* a, int64_t row, std::vector<acc_t>& v) {
  for (int64_t f = 0; f < g.F; ++f) v[f] = static_cast<acc_t>(a[morph_fc::element_offset(g, s, row, f)]);
}

// out[map(row, n)] = sum_f A_g[row, f] * Wt[f, n] (+ bias[n]) with Wt[f, n] = w[f*swk + n*swn]:
// the forward (Wt = W^T) and the input gradient (Wt = W, no bias).
template <typename scalar_t>
void gathered_gemm(const Geometry& g, const at::Tensor& a, const at::Tensor& w, bool transpose_weight,
                   const std::optional<at::Tensor>& bias, at::Tensor& out) {
  using acc_t = Acc<scalar_t>;
  const Strides sa = morph_fc::strides5(a), so = morph_fc::strides5(out);
  const int64_t swk = transpose_weight ? w.stride(1) : w.stride(0);
  const int64_t swn = transpose_weight ? w.stride(0) : w.stride(1);
  const scalar_t* ap = a.const_data_ptr<scalar_t>();
  const scalar_t* wp = w.const_data_ptr<scalar_t>();
  const scalar_t* bp = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
  const int64_t sb = bias.has_value() ? bias->stride(0) : 0;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  std::vector<acc_t> v(g.F);
  for (int64_t row = 0; row < g.M; ++row) {
    gather_row(g, sa, ap, row, v);
    for (int64_t n = 0; n < g.F; ++n) {
      acc_t acc = bp ? static_cast<acc_t>(bp[n * sb]) : acc_t(0);
      for (int64_t f = 0; f < g.F; ++f) acc += v[f] * static_cast<acc_t>(wp[f * swk + n * swn]);
      op[morph_fc::element_offset(g, so, row, n)] = static_cast<scalar_t>(acc);
    }
  }
}

// dW[n, f] = sum_m dY_g[m, n] * X_g[m, f] and db[n] = sum_m dY_g[m, n], in row order.
template <typename scalar_t>
void grad_weight_bias(const Geometry& g, const at::Tensor& dy, const at::Tensor& x, at::Tensor* dw, at::Tensor* db) {
  using acc_t = Acc<scalar_t>;
  const Strides sy = morph_fc::strides5(dy), sx = morph_fc::strides5(x);
  std::vector<acc_t> u(g.F), v(g.F), dw_acc(dw ? g.F * g.F : 0), db_acc(db ? g.F : 0);
  for (int64_t m = 0; m < g.M; ++m) {
    gather_row(g, sy, dy.const_data_ptr<scalar_t>(), m, u);
    if (dw) gather_row(g, sx, x.const_data_ptr<scalar_t>(), m, v);
    for (int64_t n = 0; n < g.F; ++n) {
      if (db) db_acc[n] += u[n];
      if (dw)
        for (int64_t f = 0; f < g.F; ++f) dw_acc[n * g.F + f] += u[n] * v[f];
    }
  }
  if (dw) {
    scalar_t* p = dw->mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < g.F * g.F; ++i) p[i] = static_cast<scalar_t>(dw_acc[i]);
  }
  if (db) {
    scalar_t* p = db->mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < g.F; ++i) p[i] = static_cast<scalar_t>(db_acc[i]);
  }
}

at::Tensor morph_fc_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        int64_t segment_dim, const std::string& axis) {
  check_device_and_dtype("morph_fc", c10::kCPU, {{"x", x}});
  const Geometry g = morph_fc::check_forward_args(x, weight, bias, segment_dim, axis);
  at::Tensor out = at::empty(x.sizes(), x.options());
  MIXOPS_FLOAT_SWITCH(x.scalar_type(), scalar_t,
                      [&] { gathered_gemm<scalar_t>(g, x, weight, /*transpose_weight=*/true, bias, out); });
  return out;
}

std::vector<at::Tensor> morph_fc_backward_cpu(at::TensorList grads, const c10::List<bool>& needs, const at::Tensor& x,
                                              const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                              int64_t segment_dim, const std::string& axis) {
  check_device_and_dtype("morph_fc backward", c10::kCPU, {{"x", x}});
  const Geometry g = morph_fc::check_forward_args(x, weight, bias, segment_dim, axis);
  const morph_fc::BackwardNeeds need = morph_fc::check_backward_args(grads, needs, x, bias);
  const at::Tensor& dy = grads[0];
  std::vector<at::Tensor> result;
  MIXOPS_FLOAT_SWITCH(x.scalar_type(), scalar_t, [&] {
    if (need.x) {
      at::Tensor dx = at::empty(x.sizes(), x.options());
      gathered_gemm<scalar_t>(g, dy, weight, /*transpose_weight=*/false, std::nullopt, dx);
      result.push_back(dx);
    }
    if (need.weight || need.bias) {
      at::Tensor dw = need.weight ? at::empty({g.F, g.F}, weight.options()) : at::Tensor();
      at::Tensor db = need.bias ? at::empty({g.F}, bias->options()) : at::Tensor();
      grad_weight_bias<scalar_t>(g, dy, x, need.weight ? &dw : nullptr, need.bias ? &db : nullptr);
      if (need.weight) result.push_back(dw);
      if (need.bias) result.push_back(db);
    }
  });
  return result;
}

}  // namespace

}  // namespace mixops

TORCH_LIBRARY_IMPL(mixops, CPU, m) {
  m.impl("_morph_fc_cuda", &mixops::morph_fc_cpu);
  m.impl("_morph_fc_cuda_backward", &mixops::morph_fc_backward_cpu);
}
