// CPU build of mixops::_atm_means_cuda / _atm_mix_cuda (+ _backward): the same host functions
// (atm_layer.h) and maps (atm_layer_operands.cuh, atm_operands.cuh) as the CUDA build, each GEMM
// run by gemm/host_engine.h on the engine's tiles (K segments and tile sums included), so tests
// on CPU tensors check them against the float64 reference. Not meant to be fast.
#include <torch/library.h>

#include "atm_layer.h"
#include "gemm/host_engine.h"

TORCH_LIBRARY_IMPL(mixops, CPU, m) {
  using mixops::gemm::HostRunner;
  m.impl("_atm_means_cuda", &mixops::atm::atm_means<HostRunner>);
  m.impl("_atm_means_cuda_backward", &mixops::atm::atm_means_backward<HostRunner>);
  m.impl("_atm_mix_cuda", &mixops::atm::atm_mix<HostRunner>);
  m.impl("_atm_mix_cuda_backward", &mixops::atm::atm_mix_backward<HostRunner>);
}
