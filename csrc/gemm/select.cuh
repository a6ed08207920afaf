// Which engine tile (gemm/tiles.cuh) a GEMM runs on: the storage dtype, whether fp32 may use TF32
// (common.cuh MIXOPS_GEMM_SWITCH binds both), and the architecture of the current device.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "tiles.cuh"

namespace mixops::gemm {

// The engine's element type of an ATen storage type (the same bits): CuTe's MMA atoms name
// cutlass::half_t / bfloat16_t.
template <typename T>
struct EngineType {
  using type = T;
};
template <>
struct EngineType<c10::Half> {
  using type = cutlass::half_t;
};
template <>
struct EngineType<c10::BFloat16> {
  using type = cutlass::bfloat16_t;
};
template <typename T>
using engine_t = typename EngineType<T>::type;

template <typename T>
const engine_t<T>* engine_ptr(const at::Tensor& t) {
  return reinterpret_cast<const engine_t<T>*>(t.const_data_ptr());
}
template <typename T>
engine_t<T>* engine_ptr(at::Tensor& t) {
  return reinterpret_cast<engine_t<T>*>(t.mutable_data_ptr());
}

// The architectures this translation unit is compiled for (nvcc's __CUDA_ARCH_LIST__, e.g.
// 800,900): the fp16/bf16 tiles of an architecture family are instantiated only when the build
// has code for it, so a CI build for sm_90a alone carries no mma.sync copy it would never run.
#ifdef __CUDA_ARCH_LIST__
inline constexpr int kBuiltArchs[] = {__CUDA_ARCH_LIST__};
#else
inline constexpr int kBuiltArchs[] = {800, 900};
#endif
constexpr bool built_for(int lo, int hi) {
  for (const int arch : kBuiltArchs)
    if (arch >= lo && arch < hi) return true;
  return false;
}

// Calls fn.template operator()<Tile>() with the tile of (ATen storage type T, TF32 allowed) on the
// current device: fp16/bf16 on wgmma (sm_90) or mma.sync (sm_80+ otherwise); fp32 on TF32 mma.sync when
// kTensorCores, else IEEE FMAs like fp64. Every tile pipelines with cp.async: sm_80 or newer.
template <typename T, bool kTensorCores, class Fn>
decltype(auto) with_tile(Fn&& fn) {
  const int major = at::cuda::getCurrentDeviceProperties()->major;
  TORCH_CHECK(major >= 8, "mixops: the CUDA kernels need an sm_80 or newer GPU (cp.async), this one is sm_", major,
              "x; use backend='torch' or 'triton'");
  using E = engine_t<T>;
  if constexpr (std::is_same_v<E, cutlass::half_t> || std::is_same_v<E, cutlass::bfloat16_t>) {
    if constexpr (built_for(900, 1000)) {
      if (major == 9) return fn.template operator()<Sm90Wgmma<E>>();
    }
    if constexpr (built_for(800, 900) || built_for(1000, 1 << 30)) {
      if (major != 9) return fn.template operator()<Sm80Mma<E>>();
    }
    TORCH_CHECK(false, "mixops: this build of the CUDA extension has no fp16/bf16 GEMM for sm_", major,
                "x; rebuild with that architecture in TORCH_CUDA_ARCH_LIST (e.g. 8.0 or 9.0a)");
  } else if constexpr (std::is_same_v<E, float> && kTensorCores) {
    return fn.template operator()<Tf32Mma<>>();
  } else {
    return fn.template operator()<Simt<E>>();
  }
}

}  // namespace mixops::gemm
