// MorphFC chunked token FC (mixops::_morph_fc_cuda / _morph_fc_cuda_backward), CUDA backend.
//
// What it computes. Every axis ("w", "h", "hs", "t") is ONE GEMM  Y_g = X_g @ W^T (+ bias)  with
// M rows and F features, X_g being x seen through the chunk index map of morph_fc_map.cuh (the
// map of kernels/morph_fc.py; docs/morph_fc.md). Each GEMM runs on the shared gathered-GEMM
// engine (gemm/kernel.cuh) with the map in its operand loads and its store: no permuted copy of
// x reaches HBM. The bias is indexed by the GEMM feature (p*D + s / t*D + s).
//   forward:  C[m, n] = sum_f X_g[m, f] W[n, f]        A = X_g (K-major), B = W (K-major)
//   dX:       C[m, f] = sum_n dY_g[m, n] W[n, f]       A = dY_g,          B = W^T (a K-major copy)
//   dW:       C[n, f] = sum_m dY_g[m, n] X_g[m, f]     A = dY_g^T, B = X_g^T (both Rows-major),
//             split over m into fixed ranges by the shapes alone (common.cuh split_rows, the rule
//             of the Triton kernels) whose Acc partials [SPLIT, F, F] at::sum adds in order
//   db = colsum(dY_g) (column_sum.cuh), split the same way.
// Deterministic, no atomics, the same bits on every GPU model of one architecture.
//
// Math (gemm/select.cuh): fp16/bf16 on wgmma (sm_90a) or mma.sync (sm_80+) with fp32
// accumulators; fp32 on TF32 mma.sync only when torch allows TF32 for its matmuls (tf32.h), else
// IEEE FMAs; fp64 on FMAs in fp64 (the exact-check dtype).
//
// FLOPs (numel = M*F = x.numel()): forward 2*numel*F; backward 2*numel*F for dX plus 2*numel*F
// for dW. Minimal HBM bytes (e = element size): forward 2*numel*e + F*F*e; backward dX
// 2*numel*e + F*F*e, dW/db 2*numel*e + F*(F+1)*e, plus (SPLIT*F*F + SPLIT'*F)*4 bytes of
// partials written and re-read (8 bytes each for fp64; db re-reads dY: + numel*e).
//
// Verified only on the CPU: the index map (the CPU implementation in morph_fc_cpu.cpp runs the
// same functions); the engine's device code is checked by compilation and SASS only, it has not
// run on a GPU yet (the Python backend is registered with auto=False).
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "column_sum.cuh"
#include "common.cuh"
#include "gemm/engine_runner.cuh"
#include "gemm/kernel.cuh"
#include "gemm/split_k.h"
#include "gemm/select.cuh"
#include "morph_fc_args.cuh"
#include "morph_fc_operands.cuh"
#include "tensor_checks.h"
#include "tf32.h"

namespace mixops {

namespace {

using morph_fc::ChunkOperand;
using morph_fc::ChunkStore;
using morph_fc::Geometry;
using morph_fc::Part;
using morph_fc::Strides;

// out <- scatter(gather(a) @ b^T (+ bias)) for b [F, F] (the weight forward, its transpose for
// dX), on the engine tile of (scalar_t, TF32).
template <typename scalar_t, bool kTensorCores>
void gathered_gemm(const Geometry& g, const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                   at::Tensor& out) {
  using T = gemm::engine_t<scalar_t>;
  const ChunkStore<T> store{gemm::engine_ptr<scalar_t>(out),
                            bias.has_value() ? gemm::engine_ptr<scalar_t>(*bias) : nullptr,
                            bias.has_value() ? bias->stride(0) : 0, g, morph_fc::strides5(out)};
  gemm::with_tile<scalar_t, kTensorCores>([&]<class Tile>() {
    gemm::launch<Tile>(gemm::Problem{g.M, g.F, g.F, g.F, 1}, morph_fc::chunk_operand(gemm::engine_ptr<scalar_t>(a), a, g),
                       morph_fc::weight_matrix(gemm::engine_ptr<scalar_t>(b), b), store);
  });
}

// dW = dY_g^T @ X_g in the weight's dtype: the engine's deterministic split-K (gemm/split_k.h).
template <typename scalar_t, bool kTensorCores>
at::Tensor grad_weight(const Geometry& g, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight) {
  const auto A = morph_fc::chunk_operand<true>(gemm::engine_ptr<scalar_t>(dy), dy, g);
  const auto B = morph_fc::chunk_operand<true>(gemm::engine_ptr<scalar_t>(x), x, g);
  return gemm::with_tile<scalar_t, kTensorCores>([&]<class Tile>() {
    return gemm::split_k<gemm::EngineRunner, Tile>(g.F, g.F, g.M, A, B, x, weight.scalar_type());
  });
}

// db = colsum(dY_g) in the bias's dtype.
template <typename scalar_t>
at::Tensor grad_bias(const Geometry& g, const at::Tensor& dy, const at::Tensor& bias) {
  return column_sums(dy.const_data_ptr<scalar_t>(), g.M, g.F, morph_fc::ChunkColumns{g, morph_fc::strides5(dy)}, dy.options())
      .to(bias.scalar_type());
}

// Every entry point runs under x's device (its current stream included), whatever device is
// current: the checks have put every tensor there.
at::Tensor morph_fc_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         int64_t segment_dim, const std::string& axis) {
  check_device_and_dtype("morph_fc", c10::kCUDA, {{"x", x}});
  const Geometry g = morph_fc::check_forward_args(x, weight, bias, segment_dim, axis);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (g.M == 0 || g.F == 0) return out;
  MIXOPS_GEMM_SWITCH(x.scalar_type(), tf32_allowed(), scalar_t, kTensorCores, [&] {
    gathered_gemm<scalar_t, kTensorCores>(g, x, weight, bias, out);
  });
  return out;
}

std::vector<at::Tensor> morph_fc_backward_cuda(at::TensorList grads, const c10::List<bool>& needs, const at::Tensor& x,
                                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                               int64_t segment_dim, const std::string& axis) {
  check_device_and_dtype("morph_fc backward", c10::kCUDA, {{"x", x}});
  const Geometry g = morph_fc::check_forward_args(x, weight, bias, segment_dim, axis);
  const morph_fc::BackwardNeeds need = morph_fc::check_backward_args(grads, needs, x, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor& dy = grads[0];
  const bool empty = g.M == 0 || g.F == 0;
  std::vector<at::Tensor> result;
  if (need.x) {
    at::Tensor dx = at::empty(x.sizes(), x.options());
    if (!empty)
      MIXOPS_GEMM_SWITCH(x.scalar_type(), tf32_allowed(), scalar_t, kTensorCores, [&] {
        // W^T as a contiguous [F, F] copy (F <= ~800: a few hundred KB), so that dX runs the
        // forward's kernel with K-major operands instead of a second instantiation
        gathered_gemm<scalar_t, kTensorCores>(g, dy, weight.t().contiguous(), std::nullopt, dx);
      });
    result.push_back(dx);
  }
  if (need.weight)
    result.push_back(empty ? at::zeros({g.F, g.F}, weight.options())
                           : MIXOPS_GEMM_SWITCH(x.scalar_type(), tf32_allowed(), scalar_t, kTensorCores, [&] {
                               return grad_weight<scalar_t, kTensorCores>(g, dy, x, weight);
                             }));
  if (need.bias)
    result.push_back(empty ? at::zeros({g.F}, bias->options()) : MIXOPS_FLOAT_SWITCH(x.scalar_type(), scalar_t, [&] {
      return grad_bias<scalar_t>(g, dy, *bias);
    }));
  return result;
}

}  // namespace

}  // namespace mixops

TORCH_LIBRARY_IMPL(mixops, CUDA, m) {
  m.impl("_morph_fc_cuda", &mixops::morph_fc_cuda);
  m.impl("_morph_fc_cuda_backward", &mixops::morph_fc_backward_cuda);
}
