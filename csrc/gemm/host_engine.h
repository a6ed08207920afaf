// The engine's contract (gemm/operands.cuh) run on the CPU: the same operands and epilogues as a
// CUDA launch of gemm/kernel.cuh, the same tiles, row / column shares, stores and tile sums
// (gemm/tile_sums.cuh), with a plain loop in place of the pipeline and the MMAs. The CPU builds of
// the ops that use it (e.g. morph_fc_fused_cpu.cpp) thereby test on CPU tensors everything of a
// CUDA launch but the kernel's own copies and tensor-core math, which tests/test_gemm_engine.py
// checks on a GPU.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>

#include <vector>

#include "../column_term.h"
#include "operands.cuh"
#include "tile_sums.cuh"

namespace mixops::gemm {

// The tile sizes of the CPU runs: those of the fp16/bf16/TF32 engine tiles (gemm/tiles.cuh), so
// tile sums and split-K partials land as the GPU lays them out; kBK steps the split-K ranges.
struct HostTile {
  static constexpr int kBM = 128, kBN = 128, kBK = 32;
};

// One operand element, as the engine's tile loader reads it.
template <class Op>
Acc<typename Op::Element> host_element(const Op& op, int64_t r, int64_t k) {
  using AccT = Acc<typename Op::Element>;
  if constexpr (Op::kComputed) return op.value(op.row(r), op.col(k));
  else return static_cast<AccT>(op.data[op.offset(op.row(r), op.col(k))]);
}

// C = A B^T as gathered_gemm_kernel<Tile> computes it, group by group (Problem.groups) and block by
// block: the accumulators in increasing k (the GPU's order differs; the tests compare within a
// tolerance), folded per K segment, then the stores and the tile sums of each block.
template <class Tile, class OpA, class OpB, class Epi>
void run_on_host(const Problem& p, const OpA& group_a, const OpB& group_b, const Epi& group_epi) {
  using AccT = Acc<typename OpA::Element>;
  using Row = typename Epi::Row;
  using Col = typename Epi::Col;
  constexpr int kBM = Tile::kBM, kBN = Tile::kBN;
  std::vector<AccT> acc(static_cast<size_t>(kBM) * kBN);
  std::vector<Row> rows(kBM);
  std::vector<Col> cols(kBN);
  for (int group = 0; group < p.groups; ++group) {
    const OpA a = for_group(group_a, group);
    const OpB b = for_group(group_b, group);
    const Epi epi = for_group(group_epi, group);
    for (int split = 0; split < p.splits; ++split) {
      const int64_t k_begin = split * p.k_per_split;
      const int64_t k_end = std::min(p.K, k_begin + p.k_per_split);
      for (int64_t m0 = 0; m0 < p.M; m0 += kBM) {
        for (int64_t n0 = 0; n0 < p.N; n0 += kBN) {
          const int rows_valid = static_cast<int>(std::min<int64_t>(kBM, p.M - m0));
          const int cols_valid = static_cast<int>(std::min<int64_t>(kBN, p.N - n0));
          for (int c = 0; c < cols_valid; ++c) cols[c] = epi.col(n0 + c);
          for (int r = 0; r < rows_valid; ++r) {
            rows[r] = epi.row(m0 + r, split);
            for (int c = 0; c < cols_valid; ++c) {
              // K segments: each range's sum folded by the epilogue, the contributions added in order
              const int64_t length = (k_end - k_begin) / p.segments;  // (the kernel's k_per_segment)
              AccT total = 0;
              for (int seg = 0; seg < p.segments; ++seg) {
                AccT sum = 0;
                for (int64_t k = k_begin + seg * length; k < k_begin + (seg + 1) * length; ++k)
                  sum += host_element(a, m0 + r, k) * host_element(b, n0 + c, k);
                if constexpr (kHasSegments<Epi>) {
                  const AccT v = epi.fold(seg, rows[r], cols[c], sum);
                  total = seg == 0 ? v : total + v;
                } else {
                  total = sum;
                }
              }
              acc[r * kBN + c] = total;
            }
          }
          for (int r = 0; r < rows_valid; ++r)
            for (int c = 0; c < cols_valid; ++c) epi.store(rows[r], cols[c], acc[r * kBN + c]);
          if constexpr (kHasTileSums<Epi>) {
            const TileView<kBM, kBN, AccT, Row, Col> view{acc.data(), kBN, rows.data(), cols.data(),
                                                          m0, n0, rows_valid, cols_valid};
            epi.sums(view, 0, 1);
          }
        }
      }
    }
  }
}

// gemm/engine_runner.cuh's EngineRunner on the CPU: ATen storage types as they are, GEMMs by
// run_on_host on HostTile, column sums by a loop (column_sum.cuh's contract).
struct HostRunner {
  static constexpr c10::DeviceType kDevice = c10::kCPU;
  template <typename scalar_t>
  using T = scalar_t;
  template <typename scalar_t>
  static const scalar_t* in(const at::Tensor& t) {
    return t.const_data_ptr<scalar_t>();
  }
  template <typename scalar_t>
  static scalar_t* out(at::Tensor& t) {
    return t.mutable_data_ptr<scalar_t>();
  }
  static bool tf32() { return false; }
  static int guard(const at::Tensor&) { return 0; }
  template <typename scalar_t, bool kTensorCores, class Fn>
  static decltype(auto) with_tile(Fn&& fn) {
    return fn.template operator()<HostTile>();
  }
  template <class Tile, class OpA, class OpB, class Epi>
  static void launch(const Problem& p, const OpA& a, const OpB& b, const Epi& epi) {
    run_on_host<Tile>(p, a, b, epi);
  }
  template <typename T, class Map>
  static at::Tensor column_sums(const T* data, int64_t rows, int64_t cols, const Map& map,
                                const at::TensorOptions& options) {
    using AccT = Acc<T>;
    at::Tensor sums = at::zeros({cols}, options.dtype(kAccDtype<T>));
    AccT* out = sums.mutable_data_ptr<AccT>();
    for (int64_t m = 0; m < rows; ++m) {
      const auto row = map.row(m);
      for (int64_t j = 0; j < cols; ++j) out[j] += column_term<AccT>(data, map, row, map.col(j));
    }
    return sums;
  }
};

}  // namespace mixops::gemm
