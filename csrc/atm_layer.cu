// The fused ATMLayer's internal ops on the GPU, mixops::_atm_means_cuda and _atm_mix_cuda
// (+ _backward): atm_layer.h's host functions with the GEMMs on the shared gathered-GEMM engine
// (gemm/kernel.cuh) and the means on column_sum.cuh.
//
// FLOPs, N = B·H·W·C, C_out output channels: mix forward 6·N·C_out (three branch GEMMs in one
// launch) + the two lerps per element per output tile column; backward per branch 2·N·C_out for
// dS_k, 2·N·C_out for dW_k and 2·N·C_out for dalpha_k. Minimal HBM bytes (e = element size,
// S = share): means (1 + 2/S)·N·e; mix forward (1 + 2/S)·N·e + 3·C·C_out·e + B·H·W·C_out·e.
//
// Verified only on the CPU (atm_layer_cpu.cpp runs the same host code and maps through
// gemm/host_engine.h); the device code is checked by compilation and SASS, it has not run on a
// GPU yet (the Python backend is registered with auto=False).
#include <torch/library.h>

#include "column_sum.cuh"
#include "gemm/engine_runner.cuh"
#include "atm_layer.h"

TORCH_LIBRARY_IMPL(mixops, CUDA, m) {
  using mixops::gemm::EngineRunner;
  m.impl("_atm_means_cuda", &mixops::atm::atm_means<EngineRunner>);
  m.impl("_atm_means_cuda_backward", &mixops::atm::atm_means_backward<EngineRunner>);
  m.impl("_atm_mix_cuda", &mixops::atm::atm_mix<EngineRunner>);
  m.impl("_atm_mix_cuda_backward", &mixops::atm::atm_mix_backward<EngineRunner>);
}
