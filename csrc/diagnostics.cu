// Diagnostic ops of the CUDA extension, in the spirit of torchvision's _cuda_version.
//
// They exercise the whole pipeline that every later kernel relies on: nvcc compiles device code
// for the configured architectures, the library links against torch and the CUDA runtime,
// Python loads it, and the dispatcher routes a CUDA tensor to a real kernel launch. One more
// reports the split rule of the kernels' reductions (common.cuh), so a CPU test can hold it to
// the Triton side's.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <string>

#include "common.cuh"

// variadic: a build for several architectures defines __CUDA_ARCH_LIST__ as a list (750,800)
#define MIXOPS_STR2(...) #__VA_ARGS__
#define MIXOPS_STR(...) MIXOPS_STR2(__VA_ARGS__)

namespace mixops {

namespace {

// Writes the __CUDA_ARCH__ of the fatbinary entry the driver picked for this device, so a
// build that lacks the device's architecture (or embeds only PTX) is visible from Python.
__global__ void device_arch_kernel(int32_t* out) {
#ifdef __CUDA_ARCH__
  *out = __CUDA_ARCH__;
#endif
}

int64_t cuda_version() { return CUDART_VERSION; }

std::string cuda_arch_list() {
  // nvcc defines __CUDA_ARCH_LIST__ (e.g. 800,900) for every compilation unit it builds.
#ifdef __CUDA_ARCH_LIST__
  return MIXOPS_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

at::Tensor device_arch(const at::Tensor& like) {
  TORCH_CHECK(like.is_cuda(), "device_arch: `like` must be a CUDA tensor, got ", like.device());
  const c10::cuda::CUDAGuard guard(like.device());
  auto out = at::zeros({1}, like.options().dtype(at::kInt));
  device_arch_kernel<<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(out.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

}  // namespace mixops

// The ops without tensor arguments run wherever they are called.
TORCH_LIBRARY_IMPL(mixops, CompositeImplicitAutograd, m) {
  m.impl("_cuda_version", &mixops::cuda_version);
  m.impl("_cuda_arch_list", &mixops::cuda_arch_list);
  m.impl("_deterministic_split", &mixops::deterministic_split);
}

TORCH_LIBRARY_IMPL(mixops, CUDA, m) { m.impl("_device_arch", &mixops::device_arch); }
