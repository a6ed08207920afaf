// The deterministic split-K GEMM of the weight gradients (docs/gemm_engine.md section 1), once for
// every family: C [M, N] = A·B^T over a long K (the tokens or pixels), K split into fixed ranges of
// whole K steps by the shapes alone (common.cuh split_rows, about 256 blocks in all), each block
// writing its fp32 (fp64 for fp64) partial [splits, M, N], which at::sum adds in a fixed order
// (<= 256 of them: no device-dependent split of its own). No atomics: the same bits on every run
// and every GPU of one architecture.
//
// Runner: how a GEMM runs, Runner::launch<Tile>(problem, A, B, epilogue): the CUDA engine
// (gemm/engine_runner.cuh) or its CPU run (gemm/host_engine.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>

#include "../common.cuh"
#include "operands.cuh"

namespace mixops::gemm {

// C in `dtype`; `like` gives the device (and the partials take the accumulator dtype). With
// groups > 1 (a grouped launch: operands with for_group) C is the [groups * M, N] stack of the
// groups' results, split by the same rule over all groups' tiles.
template <class Runner, class Tile, class OpA, class OpB>
at::Tensor split_k(int64_t M, int64_t N, int64_t K, const OpA& a, const OpB& b, const at::Tensor& like,
                   c10::ScalarType dtype, int groups = 1) {
  using AccT = Acc<typename OpA::Element>;
  const RowSplit split = split_rows(K, Tile::kBK, cdiv(M, Tile::kBM) * cdiv(N, Tile::kBN) * groups);
  at::Tensor part = at::empty({split.count, groups * M, N}, like.options().dtype(kAccDtype<typename OpA::Element>));
  MatrixStore<AccT> store = partials(part.mutable_data_ptr<AccT>(), groups * M, N);
  store.group_stride = M * N;
  Problem problem{M, N, K, split.rows, static_cast<int>(split.count)};
  problem.groups = groups;
  Runner::template launch<Tile>(problem, a, b, store);
  return part.sum(0).to(dtype);
}

}  // namespace mixops::gemm
