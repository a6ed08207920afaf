// Deterministic column sums of a [rows, cols] matrix that a family reads through its own element
// map: the bias gradients (MorphFC: colsum of dY_g through the chunk map; ATM: g summed over the
// pixels). The rows are split into fixed ranges by the shapes alone (common.cuh split_rows, about
// 256 blocks in all); block (column block, range) gives each thread one column and walks the
// range's rows in order into an accumulator; the [ranges, cols] partials are summed over the
// ranges by at::sum, whose order is fixed for <= 256 ranges. No atomics, no device property.
//
// A Map is a small value type with device functions
//   Row row(int64_t m): the row's share of the element offset (computed once per row, by one
//     thread, into shared memory: the map's divisions live there);
//   Col col(int64_t j): the column's share (once per thread);
//   int64_t offset(const Row&, const Col&): the element offset, from the two shares; or
//   value(const Row&, const Col&): the element itself, for a map that computes it (column_term).
//
// Cost: reads rows*cols elements once (plus ranges*cols*4 bytes of partials); grid
// (cdiv(cols, 128), ranges), 128 threads.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>

#include "column_term.h"
#include "common.cuh"

namespace mixops {

constexpr int kColumnSumThreads = 128;

// partial[range, j] = sum over the rows m of the range (in order) of data[map.offset(row(m), col(j))].
// Min 8 blocks per SM (<= 64 registers): enough loads in flight for this bandwidth-bound loop.
// Without a minimum, ptxas for sm_80 squeezed ATM's bf16 token means into 32 registers and
// spilled 16 bytes (ptxas -v); with it they take 52 (sm_80) and 58 (sm_90a), no spill.
template <typename T, typename AccT, typename Map>
__global__ void __launch_bounds__(kColumnSumThreads, 8)
    column_sum_partials_kernel(const T* __restrict__ data, AccT* __restrict__ partial, int64_t rows, int64_t cols,
                               int64_t rows_per_range, Map map) {
  using Row = decltype(map.row(0));
  __shared__ Row row_shares[kColumnSumThreads];
  const int tid = threadIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColumnSumThreads + tid;
  const bool column_ok = j < cols;
  const auto col = map.col(column_ok ? j : 0);
  const int64_t start = static_cast<int64_t>(blockIdx.y) * rows_per_range;
  const int64_t end = start + rows_per_range < rows ? start + rows_per_range : rows;
  AccT acc = 0;
  for (int64_t m0 = start; m0 < end; m0 += kColumnSumThreads) {
    __syncthreads();  // the previous chunk's row shares are consumed
    if (m0 + tid < end) row_shares[tid] = map.row(m0 + tid);
    __syncthreads();
    const int count = end - m0 < kColumnSumThreads ? static_cast<int>(end - m0) : kColumnSumThreads;
    if (column_ok) {
      // unrolled so that 8 independent loads are in flight before their in-order adds
#pragma unroll 8
      for (int i = 0; i < count; ++i) acc += column_term<AccT>(data, map, row_shares[i], col);
    }
  }
  if (column_ok) partial[static_cast<int64_t>(blockIdx.y) * cols + j] = acc;
}

// The column sums [cols] in the accumulator dtype (fp64 for fp64 storage T, else fp32) of the
// [rows, cols] matrix `data` seen through `map`, on the device of `options`; rows, cols > 0.
template <typename T, typename Map>
at::Tensor column_sums(const T* data, int64_t rows, int64_t cols, const Map& map, const at::TensorOptions& options) {
  using AccT = Acc<T>;
  const RowSplit split = split_rows(rows, kColumnSumThreads, cdiv(cols, kColumnSumThreads));
  at::Tensor partial = at::empty({split.count, cols}, options.dtype(kAccDtype<T>));
  const dim3 grid(static_cast<unsigned>(cdiv(cols, kColumnSumThreads)), static_cast<unsigned>(split.count));
  column_sum_partials_kernel<T, AccT, Map><<<grid, kColumnSumThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      data, partial.mutable_data_ptr<AccT>(), rows, cols, split.rows, map);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial.sum(0);
}

}  // namespace mixops
