// How host code that is written once for the GPU and the CPU (e.g. morph_fc_fused.h) runs on the
// GPU: a Runner whose GEMMs are launches of the engine (gemm/kernel.cuh). Its CPU twin is
// gemm/host_engine.h HostRunner; gemm/split_k.h and the families take either.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>

#include <utility>

#include "../column_sum.cuh"
#include "../tf32.h"
#include "kernel.cuh"
#include "select.cuh"

namespace mixops::gemm {

struct EngineRunner {
  static constexpr c10::DeviceType kDevice = c10::kCUDA;
  // the kernels' element type of an ATen storage type, and the pointers of that type
  template <typename scalar_t>
  using T = engine_t<scalar_t>;
  template <typename scalar_t>
  static const T<scalar_t>* in(const at::Tensor& t) {
    return engine_ptr<scalar_t>(t);
  }
  template <typename scalar_t>
  static T<scalar_t>* out(at::Tensor& t) {
    return engine_ptr<scalar_t>(t);
  }
  static bool tf32() { return tf32_allowed(); }
  // an entry point runs under its inputs' device (its current stream included)
  static c10::cuda::CUDAGuard guard(const at::Tensor& t) { return c10::cuda::CUDAGuard(t.device()); }
  // fn.operator()<Tile>() with the device's tile for (scalar_t, TF32)
  template <typename scalar_t, bool kTensorCores, class Fn>
  static decltype(auto) with_tile(Fn&& fn) {
    return gemm::with_tile<scalar_t, kTensorCores>(std::forward<Fn>(fn));
  }
  template <class Tile, class OpA, class OpB, class Epi>
  static void launch(const Problem& p, const OpA& a, const OpB& b, const Epi& epi) {
    gemm::launch<Tile>(p, a, b, epi);
  }
  template <typename T, class Map>
  static at::Tensor column_sums(const T* data, int64_t rows, int64_t cols, const Map& map,
                                const at::TensorOptions& options) {
    return mixops::column_sums(data, rows, cols, map, options);
  }
};

}  // namespace mixops::gemm
