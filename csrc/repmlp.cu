// RepMLP's set-sharing partition FC on the GPU, mixops::_partition_fc_cuda (+ _backward):
// repmlp.h's host functions with every GEMM one grouped launch of the shared gathered-GEMM engine
// (gemm/kernel.cuh; group = share-set), the partition map in the operand loads, bias and the
// global-perceptron gate in the store, the official un-partition in the store map, and dgate's
// partials as the dX launch's tile sums.
//
// FLOPs, numel = N*C*H*W: forward 2*numel*hw; backward 2*numel*hw each for dX and dW. Minimal HBM
// bytes (e = element size): forward 2*numel*e + S*hw*hw*e; dX 2*numel*e (+ numel*e re-reading x
// for dgate, + S*cdiv(hw, 128)*M*4 of partials); dW 2*numel*e + the split partials; db and dgate's
// bias term numel*e each (column sums).
//
// Verified only on the CPU (repmlp_cpu.cpp runs the same host code, operands and epilogues through
// gemm/host_engine.h); the engine's device code is checked by compilation and SASS, it has not
// run on a GPU yet (the Python backend is registered with auto=False).
#include <torch/library.h>

#include "gemm/engine_runner.cuh"
#include "repmlp.h"

TORCH_LIBRARY_IMPL(mixops, CUDA, m) {
  using mixops::gemm::EngineRunner;
  m.impl("_partition_fc_cuda", &mixops::repmlp::partition_fc<EngineRunner>);
  m.impl("_partition_fc_cuda_backward", &mixops::repmlp::partition_fc_backward<EngineRunner>);
}
