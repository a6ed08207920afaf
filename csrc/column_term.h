// One element of a column sum (column_sum.cuh on the GPU, gemm/host_engine.h HostRunner on the
// CPU): data[map.offset(row, col)], or map.value(row, col) for a map that computes its elements
// (ATM's token means of the sampled features; data unused); and the map of a plain matrix.
#pragma once

#include "common.cuh"

namespace mixops {

template <typename AccT, typename T, typename Map, typename Row, typename Col>
MIXOPS_HD AccT column_term(const T* data, const Map& map, const Row& row, const Col& col) {
  if constexpr (requires { map.value(row, col); }) return static_cast<AccT>(map.value(row, col));
  else return static_cast<AccT>(data[map.offset(row, col)]);
}

// A contiguous [rows, cols] matrix as a column-sum map: the partials a kernel wrote (the window
// attention's virtual-key gradients, one row per window).
struct DenseColumns {
  int64_t cols;

  MIXOPS_HD int64_t row(int64_t m) const { return m * cols; }
  MIXOPS_HD int64_t col(int64_t j) const { return j; }
  MIXOPS_HD int64_t offset(int64_t r, int64_t c) const { return r + c; }
};

}  // namespace mixops
