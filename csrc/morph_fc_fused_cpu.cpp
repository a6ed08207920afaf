// CPU build of mixops::_morph_branch_cuda / _reweighted_proj_cuda (+ _backward): the same host
// functions (morph_fc_fused.h), operands and epilogues (morph_fc_fused_operands.cuh) as the CUDA
// build, each GEMM run by gemm/host_engine.h on the engine's tiles, so tests on CPU tensors check
// the index maps, the tile-sum layouts and the host reductions against the float64 reference.
// Not meant to be fast.
#include <torch/library.h>

#include "gemm/host_engine.h"
#include "morph_fc_fused.h"

TORCH_LIBRARY_IMPL(mixops, CPU, m) {
  using mixops::gemm::HostRunner;
  m.impl("_morph_branch_cuda", &mixops::morph_fc::morph_branch<HostRunner>);
  m.impl("_morph_branch_cuda_backward", &mixops::morph_fc::morph_branch_backward<HostRunner>);
  m.impl("_reweighted_proj_cuda", &mixops::morph_fc::reweighted_proj<HostRunner>);
  m.impl("_reweighted_proj_cuda_backward", &mixops::morph_fc::reweighted_proj_backward<HostRunner>);
}
