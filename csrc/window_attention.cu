// UniFormer's windowed / global attention on the GPU, mixops::_window_attention_cuda (+ _backward):
// window_attention.h's host functions launching the kernels of window_attention_kernels.cuh.
//
// FLOPs per (window, head) of n real tokens, head dim d: forward 4*n^2*d; backward 10*n^2*d (the
// forward again, S and dP twice, dV, dK, dQ). Minimal HBM bytes (e = element size, N tokens):
// forward 4*N*C*e (qkv in, out); backward 10*N*C*e (qkv, dOut, out and dqkv) + the statistics.
//
// Verified only on the CPU (window_attention_cpu.cpp runs the same host code, map and row math
// with loops for the MMAs); the kernels are checked by compilation and SASS, they have not run on
// a GPU yet (the Python backend is registered with auto=False).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <type_traits>

#include "gemm/engine_runner.cuh"
#include "window_attention.h"
#include "window_attention_kernels.cuh"

namespace mixops::window_attention {
namespace {

// The engine tile whose MMAs a dtype's kernels use (gemm/tiles.cuh): mma.sync for fp16/bf16 (on
// sm_90a as well), TF32 mma.sync where torch allows TF32, FMAs otherwise.
template <typename E, bool kTensorCores>
using MathTile = std::conditional_t<
    std::is_same_v<E, cutlass::half_t> || std::is_same_v<E, cutlass::bfloat16_t>, gemm::Sm80Mma<E>,
    std::conditional_t<std::is_same_v<E, float> && kTensorCores, gemm::Tf32Mma<>, gemm::Simt<E>>>;

// The smallest opt-in shared memory of the sm_80+ GPUs (sm_86, sm_89, sm_120: 99 KB): a kernel
// double-buffers its streamed tiles where that still fits, else streams them through one buffer.
constexpr size_t kPortableSharedBytes = 99 * 1024;

template <class Math, int kDP, template <class> class Plan>
using ConfigFor = std::conditional_t<Plan<Config<Math, kDP, 2>>::kBytes <= kPortableSharedBytes,
                                     Config<Math, kDP, 2>, Config<Math, kDP, 1>>;

// fn.template operator()<Cfg>() with the config of the head dim: d <= 64 on 64 padded channels (d
// = 32 skips the empty k-blocks of Q K^T), else 128.
template <class Math, template <class> class Plan, class Fn>
void with_config(const Geometry& g, Fn&& fn) {
  TORCH_CHECK(g.d <= 128, "_window_attention: the cuda backend takes head dims up to 128, got ", g.d,
              "; use backend='triton' or 'torch'");
  if (g.d <= 64) fn.template operator()<ConfigFor<Math, 64, Plan>>();
  else fn.template operator()<ConfigFor<Math, 128, Plan>>();
}

template <class Plan, class Kernel, typename T>
void launch_kernel(Kernel kernel, const Args<T>& a, int64_t blocks) {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(props->major >= 8, "_window_attention: the cuda backend needs an sm_80 or newer GPU, this one is sm_",
              props->major, props->minor, "; use backend='triton' or 'torch'");
  TORCH_CHECK(Plan::kBytes <= static_cast<size_t>(props->sharedMemPerBlockOptin), "_window_attention: the kernel needs ",
              Plan::kBytes, " bytes of shared memory per block, this GPU allows ", props->sharedMemPerBlockOptin,
              "; use backend='triton'");
  TORCH_CHECK(a.g.programs() <= std::numeric_limits<int32_t>::max() && blocks <= 65535,
              "_window_attention: too many windows for one launch");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(Plan::kBytes)));
  kernel<<<dim3(static_cast<unsigned>(a.g.programs()), static_cast<unsigned>(blocks)), 256, Plan::kBytes,
           at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct CudaAttention : gemm::EngineRunner {
  template <bool kTensorCores, typename E>
  static void forward(const Args<E>& a) {
    with_config<MathTile<E, kTensorCores>, ForwardSmem>(a.g, [&]<class Cfg>() {
      launch_kernel<ForwardSmem<Cfg>>(forward_kernel<Cfg>, a, cdiv(a.g.window_tokens(), Cfg::kBQ));
    });
  }
  template <bool kTensorCores, typename E>
  static void key_grad(const Args<E>& a) {
    with_config<MathTile<E, kTensorCores>, KeyGradSmem>(a.g, [&]<class Cfg>() {
      launch_kernel<KeyGradSmem<Cfg>>(key_grad_kernel<Cfg>, a, cdiv(a.g.window_tokens(), Cfg::kBK));
    });
  }
  template <bool kTensorCores, typename E>
  static void query_grad(const Args<E>& a) {
    with_config<MathTile<E, kTensorCores>, QueryGradSmem>(a.g, [&]<class Cfg>() {
      launch_kernel<QueryGradSmem<Cfg>>(query_grad_kernel<Cfg>, a, cdiv(a.g.window_tokens(), Cfg::kBQ));
    });
  }
};

}  // namespace
}  // namespace mixops::window_attention

TORCH_LIBRARY_IMPL(mixops, CUDA, m) {
  using mixops::window_attention::CudaAttention;
  m.impl("_window_attention_cuda", &mixops::window_attention::window_attention<CudaAttention>);
  m.impl("_window_attention_cuda_backward", &mixops::window_attention::window_attention_backward<CudaAttention>);
}
