// CPU build of mixops::_partition_fc_cuda (+ _backward): the same host functions (repmlp.h),
// operands and epilogues (repmlp_operands.cuh) as the CUDA build, each GEMM run by
// gemm/host_engine.h on the engine's tiles, so tests on CPU tensors check the partition maps, the
// grouped launches, the tile-sum layout of dgate and the host reductions against the float64
// reference. Not meant to be fast.
#include <torch/library.h>

#include "gemm/host_engine.h"
#include "repmlp.h"

TORCH_LIBRARY_IMPL(mixops, CPU, m) {
  using mixops::gemm::HostRunner;
  m.impl("_partition_fc_cuda", &mixops::repmlp::partition_fc<HostRunner>);
  m.impl("_partition_fc_cuda_backward", &mixops::repmlp::partition_fc_backward<HostRunner>);
}
