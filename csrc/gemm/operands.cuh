// The operands and outputs of the gathered-GEMM engine (gemm/kernel.cuh): how a family tells the
// engine where the elements of its GEMM live. The engine computes
//     C[m, n] = sum_k A[m, k] * B[n, k]        (m < M, n < N, k in the block's K range)
// and never sees a tensor: A and B are *operands*, C goes to an *epilogue*, each a small value
// type holding pointers, strides and dividers, passed to the kernel by value.
//
// Operand (A as [M, K], B as [N, K]):
//   using Element = T;                  storage type (cutlass::half_t, cutlass::bfloat16_t, float, double)
//   static constexpr Major kMajor;      the axis along which consecutive elements are contiguous
//   static constexpr bool kComputed;    false: element (r, k) is data[offset(row(r), col(k))], and
//                                       runs of `vec` elements along kMajor are contiguous and
//                                       aligned to vec elements (checked on the host: vector_width);
//                                       the engine moves them by cp.async. true: the element is a
//                                       value the operand computes (ATM's lerp of two loads),
//                                       loaded into registers one element at a time.
//   __device__ Row row(int64_t r), Col col(int64_t k):  each index's share of the element; the
//                                       divisions of a family's index map live here, computed once
//                                       per tile row / per K step, never per element.
//   copy:     const T* data; int vec;  __device__ int64_t offset(const Row&, const Col&)
//   computed: __device__ Acc<T> value(const Row&, const Col&)
// Row and Col may be any trivially copyable type (an int64_t offset, or a struct of digits).
//
// Epilogue (C as [M, N], one element at a time, after the tile's accumulators went through
// shared memory so that consecutive threads write consecutive n):
//   __device__ Row row(int64_t m, int split), Col col(int64_t n)
//   __device__ void store(const Row&, const Col&, Acc v)   (bias, dtype, scatter: the family's)
// `split` is the block's index along the split of K (0 unless the launch splits K). An epilogue
// may also reduce its tile (kTileSums, gemm/tile_sums.cuh) and fold K segments (kSegments, below). Operands and epilogues whose
// functions are MIXOPS_HD also run on the CPU (gemm/host_engine.h).
#pragma once

#include <cstdint>
#include <initializer_list>

#include "../common.cuh"

namespace mixops::gemm {

// The problem of one launch: C [M, N] over K, each block summing k in [split * k_per_split,
// min(K, (split + 1) * k_per_split)) (k_per_split = K: no split).
// segments > 1 (an epilogue with kSegments; splits must be 1): the K range is run as `segments`
// equal consecutive ranges, each folded into the result by the epilogue (below).
// groups > 1: that many GEMMs of this one shape in one launch (grid z), whose operands and epilogue
// differ by their pointers only (RepMLP's share-sets, each with its own weight block and channels):
// group g runs on for_group(x, g) of each (below).
struct Problem {
  int64_t M, N, K, k_per_split;
  int splits;
  int segments = 1;
  int64_t k_per_segment = 0;  // K / segments, set by gemm::launch (no 64-bit division on the device)
  int groups = 1;
};

// An operand or epilogue of a grouped launch has `MIXOPS_HD X for_group(int g) const`: itself with
// its pointers moved to group g. One that is the same for every group (or a launch of one group)
// has none and is used as it is.
template <class X>
MIXOPS_HD X for_group(const X& x, int g) {
  if constexpr (requires { x.for_group(g); }) return x.for_group(g);
  else return x;
}

// Whether an epilogue folds K segments: `static constexpr bool kSegments = true;` and
//   MIXOPS_HD Acc fold(int segment, const Row&, const Col&, Acc acc) const
// the segment's contribution to element (m, n) from its own accumulator; the engine adds the
// contributions in segment order and stores their sum. This is the per-sample scale of a sum of
// GEMMs, e.g. ATMLayer's  alpha_w·(S_w W_w^T + b_w) + alpha_h·(...) + alpha_c·(x W_c^T)  with
// alpha per (batch item, output channel): one launch, K = 3C in 3 segments.
template <class Epi>
inline constexpr bool kHasSegments = requires { requires Epi::kSegments; };

// Whether a computed operand's load holds so many values per element in flight (several
// branches, each with its own scale) that the 128-row mma.sync tiles spill beside it:
// `static constexpr bool kRegisterHeavy = true;` sends its launches to half the tile along its
// axis (gemm/kernel.cuh LaunchTile), as a K-segmented epilogue does along M.
template <class Op>
inline constexpr bool kRegisterHeavy = requires { requires Op::kRegisterHeavy; };

// The contiguous axis of an operand: its K axis (A = X[m, k] with k along the channels) or its
// rows (B = W[k, n] read as [N, K]: contiguous along n).
enum class Major { K, Rows };

// A strided 2-D matrix M[r, k] = data[r * stride_r + k * stride_k]: the weights, the plain
// incoming gradients. kMajor says which stride is the unit one (checked by vector_width). In a
// grouped launch, group g's matrix starts group_stride elements further per group (RepMLP's
// weight blocks W_s).
template <typename T, Major kMajorAxis>
struct Matrix {
  using Element = T;
  using Row = int64_t;
  using Col = int64_t;
  static constexpr Major kMajor = kMajorAxis;
  static constexpr bool kComputed = false;
  const T* data;
  int64_t stride_r, stride_k;
  int vec;
  int64_t group_stride = 0;

  MIXOPS_HD Matrix for_group(int g) const { return {data + g * group_stride, stride_r, stride_k, vec, group_stride}; }
  MIXOPS_HD int64_t row(int64_t r) const { return r * stride_r; }
  MIXOPS_HD int64_t col(int64_t k) const { return k * stride_k; }
  MIXOPS_HD int64_t offset(int64_t r, int64_t c) const { return r + c; }
};

// C[m, n] into a strided 2-D matrix: out[(split * split_rows + m) * stride_m + n * stride_n], in
// T (the storage type, or the accumulator type for partials). split_rows = 0 for one output;
// = M for the split-K partials [splits, M, N] of the weight gradients (gemm::partials), which the
// caller adds in a fixed order (at::sum over the split axis).
template <typename T>
struct MatrixStore {
  using Row = int64_t;
  using Col = int64_t;
  T* out;
  int64_t stride_m, stride_n, split_rows;
  int64_t group_stride = 0;  // a grouped launch: group g's output starts g * group_stride further

  MIXOPS_HD MatrixStore for_group(int g) const { return {out + g * group_stride, stride_m, stride_n, split_rows, group_stride}; }
  MIXOPS_HD int64_t row(int64_t m, int split) const { return (split * split_rows + m) * stride_m; }
  MIXOPS_HD int64_t col(int64_t n) const { return n * stride_n; }
  MIXOPS_HD void store(int64_t r, int64_t c, Acc<T> v) const { out[r + c] = static_cast<T>(v); }
};

// The split-K partials [splits, M, N] (contiguous, accumulator type) of an [M, N] result.
template <typename AccT>
MatrixStore<AccT> partials(AccT* partial, int64_t M, int64_t N) {
  return {partial, N, 1, M};
}

// The widest run (in elements, a power of two of at most 16 bytes) in which an operand's elements
// are contiguous and aligned: `extent` elements along the contiguous axis (the run must divide
// it), every stride of the other axes a multiple of it, the base pointer aligned to it. 1 when
// the contiguous stride is not 1.
inline int vector_width(const void* data, int64_t element_size, int64_t unit_stride, int64_t extent,
                        std::initializer_list<int64_t> other_strides) {
  if (unit_stride != 1) return 1;
  int vec = static_cast<int>(16 / element_size);
  const auto fits = [&](int v) {
    if (extent % v != 0 || reinterpret_cast<uintptr_t>(data) % (v * element_size) != 0) return false;
    for (const int64_t s : other_strides)
      if (s % v != 0) return false;
    return true;
  };
  while (vec > 1 && !fits(vec)) vec /= 2;
  return vec;
}

}  // namespace mixops::gemm
