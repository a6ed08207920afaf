// mixops::_gemm_engine: the shared GEMM engine (gemm/kernel.cuh) on plain strided matrices, for
// the GPU tests (tests/test_gemm_engine.py): C = A B^T for A [M, K] and B [N, K] of any strides,
// on the engine tile torch's settings pick (fp16/bf16 tensor cores, TF32 when allowed, FMAs),
// with one of the three operand layouts the families instantiate:
//   "kk"  A and B contiguous along K (MorphFC / ATM forward)     -> C through a strided store
//   "kr"  A along K, B along its rows (ATM dS: g and W^T)         -> C through a strided store
//   "rr"  A and B along their rows (the dW GEMMs), K split into fixed ranges by the shapes,
//         the fp32 (fp64) partials summed in order                -> C in A's dtype
// A run's width (vec) follows the actual strides and alignment, so offset views test the 8-,
// 4-byte and element paths of the loads. Not part of the public API.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include "common.cuh"
#include "gemm/engine_runner.cuh"
#include "gemm/kernel.cuh"
#include "gemm/select.cuh"
#include "gemm/split_k.h"
#include "tensor_checks.h"
#include "tf32.h"

namespace mixops {

namespace {

template <typename scalar_t, gemm::Major kMajor>
gemm::Matrix<gemm::engine_t<scalar_t>, kMajor> matrix(const at::Tensor& t) {
  const int64_t unit = kMajor == gemm::Major::K ? t.stride(1) : t.stride(0);
  const int64_t other = kMajor == gemm::Major::K ? t.stride(0) : t.stride(1);
  const int64_t extent = t.size(kMajor == gemm::Major::K ? 1 : 0);
  return {gemm::engine_ptr<scalar_t>(t), t.stride(0), t.stride(1),
          gemm::vector_width(t.const_data_ptr(), t.element_size(), unit, extent, {other})};
}

template <typename scalar_t, bool kTensorCores>
at::Tensor run(const at::Tensor& a, const at::Tensor& b, const std::string& layout) {
  using T = gemm::engine_t<scalar_t>;
  using gemm::Major;
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  if (layout == "rr")
    return gemm::with_tile<scalar_t, kTensorCores>([&]<class Tile>() {
      return gemm::split_k<gemm::EngineRunner, Tile>(M, N, K, matrix<scalar_t, Major::Rows>(a),
                                                     matrix<scalar_t, Major::Rows>(b), a, a.scalar_type());
    });
  at::Tensor out = at::empty({M, N}, a.options());
  const gemm::MatrixStore<T> store{gemm::engine_ptr<scalar_t>(out), out.stride(0), out.stride(1), 0};
  const gemm::Problem p{M, N, K, K, 1};
  gemm::with_tile<scalar_t, kTensorCores>([&]<class Tile>() {
    if (layout == "kk")
      gemm::launch<Tile>(p, matrix<scalar_t, Major::K>(a), matrix<scalar_t, Major::K>(b), store);
    else
      gemm::launch<Tile>(p, matrix<scalar_t, Major::K>(a), matrix<scalar_t, Major::Rows>(b), store);
  });
  return out;
}

at::Tensor gemm_engine(const at::Tensor& a, const at::Tensor& b, const std::string& layout) {
  const char* op = "_gemm_engine";
  check_device_and_dtype(op, c10::kCUDA, {{"a", a}});
  check_like_x(op, a, {{"b", b}});
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1), op, ": a [M, K] and b [N, K] expected, got ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(layout == "kk" || layout == "kr" || layout == "rr", op, ": layout must be 'kk', 'kr' or 'rr', got '",
              layout, "'");
  const c10::cuda::CUDAGuard guard(a.device());
  if (a.size(0) == 0 || b.size(0) == 0 || a.size(1) == 0) return at::zeros({a.size(0), b.size(0)}, a.options());
  return MIXOPS_GEMM_SWITCH(a.scalar_type(), tf32_allowed(), scalar_t, kTensorCores,
                            [&] { return run<scalar_t, kTensorCores>(a, b, layout); });
}

}  // namespace

}  // namespace mixops

TORCH_LIBRARY_IMPL(mixops, CUDA, m) { m.impl("_gemm_engine", &mixops::gemm_engine); }
