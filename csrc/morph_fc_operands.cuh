// MorphFC's operands and store map for the gathered-GEMM engine (gemm/operands.cuh): x, dY and
// y/dX seen through the chunk map of morph_fc_map.cuh as the [M, F] matrix X_g of one axis.
#pragma once

#include <ATen/core/Tensor.h>

#include "gemm/operands.cuh"
#include "morph_fc_args.cuh"
#include "morph_fc_map.cuh"

namespace mixops::morph_fc {

// X_g[m, f] (kTransposed: X_g^T, as [F, M], the dW operand dY_g^T) of a [B, T, H, W, C] tensor.
// Features are contiguous in runs of the channels of a group (D, when the channel stride is 1):
// K-major as X_g, Rows-major as X_g^T.
template <typename T, bool kTransposed>
struct ChunkOperand {
  using Element = T;
  using Row = Part;
  using Col = Part;
  static constexpr gemm::Major kMajor = kTransposed ? gemm::Major::Rows : gemm::Major::K;
  static constexpr bool kComputed = false;
  const T* data;
  Geometry g;
  Strides s;
  int vec;

  MIXOPS_HD Part row(int64_t r) const { return kTransposed ? feature_part(g, s, r) : row_part(g, s, r); }
  MIXOPS_HD Part col(int64_t k) const { return kTransposed ? row_part(g, s, k) : feature_part(g, s, k); }
  MIXOPS_HD int64_t offset(const Part& r, const Part& c) const {
    return kTransposed ? combine(g, s, c, r) : combine(g, s, r, c);
  }
};

// The contiguous run of X_g's features in a tensor with strides s (gemm::vector_width).
inline int feature_run(const void* data, int64_t element_size, const Geometry& g, const Strides& s) {
  return gemm::vector_width(data, element_size, s.c, g.D, {s.b, s.t, s.h, s.w});
}

// X_g (kTransposed: X_g^T) of tensor t, whose data the caller passes as the kernels' element type.
template <bool kTransposed = false, typename T>
ChunkOperand<T, kTransposed> chunk_operand(const T* data, const at::Tensor& t, const Geometry& g) {
  const Strides s = strides5(t);
  return {data, g, s, feature_run(t.const_data_ptr(), t.element_size(), g, s)};
}

// W [F, F] as a K-major operand (rows n, K = f): the forward's B, or dX's from W^T.
template <typename T>
gemm::Matrix<T, gemm::Major::K> weight_matrix(const T* data, const at::Tensor& w) {
  return {data, w.stride(0), w.stride(1),
          gemm::vector_width(w.const_data_ptr(), w.element_size(), w.stride(1), w.size(1), {w.stride(0)})};
}

// X_g as the [M, F] matrix of a column sum (column_sum.cuh): db = colsum(dY_g).
struct ChunkColumns {
  Geometry g;
  Strides s;
  MIXOPS_HD Part row(int64_t m) const { return row_part(g, s, m); }
  MIXOPS_HD Part col(int64_t n) const { return feature_part(g, s, n); }
  MIXOPS_HD int64_t offset(const Part& r, const Part& c) const { return combine(g, s, r, c); }
};

// out[scatter(m, n)] = v + bias[n] in the storage type: y (forward; bias nullptr adds 0) and dX.
// A thread stores one column n: its share carries the bias value, read once.
template <typename T>
struct ChunkStore {
  struct Col {
    Part part;
    Acc<T> bias;
  };
  using Row = Part;
  T* out;
  const T* bias;  // nullptr: none
  int64_t bias_stride;
  Geometry g;
  Strides s;

  MIXOPS_HD Part row(int64_t m, int) const { return row_part(g, s, m); }
  MIXOPS_HD Col col(int64_t n) const {
    return {feature_part(g, s, n), bias != nullptr ? static_cast<Acc<T>>(bias[n * bias_stride]) : Acc<T>(0)};
  }
  MIXOPS_HD void store(const Part& r, const Col& c, Acc<T> v) const {
    out[combine(g, s, r, c.part)] = static_cast<T>(v + c.bias);
  }
};

}  // namespace mixops::morph_fc
