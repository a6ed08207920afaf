// The fused MorphFC layer's internal ops on the GPU, mixops::_morph_branch_cuda and
// _reweighted_proj_cuda (+ _backward): morph_fc_fused.h's host functions with every GEMM on the
// shared gathered-GEMM engine (gemm/kernel.cuh), its epilogue's tile sums giving the token means
// and the softmax-weight gradients.
//
// FLOPs, numel = B·T·H·W·C: branch forward 2·numel·F, backward 2·numel·F per needed dX / dW;
// proj forward 2·numel·C, backward 2·numel·C each for dMix and dW. Minimal HBM bytes (e = element
// size): branch forward 2·numel·e (+ F·F·e + the mean partials, M·D·4 per column tile, about
// numel·4/L); proj forward (K + 1)·numel·e, its dMix GEMM (1 + 2K)·numel·e (dOut, the K branches
// re-read for dalpha, the K branch gradients written).
//
// Verified only on the CPU (morph_fc_fused_cpu.cpp runs the same host code, operands and
// epilogues through gemm/host_engine.h); the engine's device code is checked by compilation and
// SASS, it has not run on a GPU yet (the Python backend is registered with auto=False).
#include <torch/library.h>

#include "gemm/engine_runner.cuh"
#include "morph_fc_fused.h"

TORCH_LIBRARY_IMPL(mixops, CUDA, m) {
  using mixops::gemm::EngineRunner;
  m.impl("_morph_branch_cuda", &mixops::morph_fc::morph_branch<EngineRunner>);
  m.impl("_morph_branch_cuda_backward", &mixops::morph_fc::morph_branch_backward<EngineRunner>);
  m.impl("_reweighted_proj_cuda", &mixops::morph_fc::reweighted_proj<EngineRunner>);
  m.impl("_reweighted_proj_cuda_backward", &mixops::morph_fc::reweighted_proj_backward<EngineRunner>);
}
