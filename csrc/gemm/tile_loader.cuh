// How the gathered-GEMM engine fills one pipeline stage of an operand tile ([kRows, kK] of A or
// B) in shared memory: gemm/operands.cuh says what an operand is.
//
// The 256 threads of a block split the tile into 16-byte chunks along the operand's contiguous
// axis (8 fp16/bf16, 4 fp32, 2 fp64 elements), consecutive threads on consecutive chunks, so a
// warp reads whole 128-byte lines of a channels-last tensor. A chunk is moved in runs of vec
// elements (the operand's host-checked contiguous run):
//   - copy operands, runs of 4, 8 or 16 bytes: cp.async (LDGSTS), zero-filled past the edges of
//     the problem, so a stage's loads stay in flight while the tensor cores work on older stages;
//   - copy operands with 2-byte runs (fp16/bf16 with no two neighbours contiguous, e.g. a
//     transposed view; no cp.async is that small): one load and store per element, in `write`;
//   - computed operands (ATM's lerp): gathered element by element straight into shared memory
//     when the stage is filled, i.e. while the wgmma of the current stage runs on sm_90a (on
//     sm_80, while the other warps' mma.sync do). Holding a stage in registers across the MMAs
//     instead (the pre-Ampere double buffer) made ptxas spill next to the 64 accumulators.
// The map's divisions run once per tile row (the fixed axis: rows for K-major operands, kept in
// registers for the whole K loop) and once per K step and chunk column.
#pragma once

#include <cute/arch/copy_sm80.hpp>
#include <cute/tensor.hpp>

#include "operands.cuh"

namespace mixops::gemm {

// global -> shared copy of kBytes (4, 8 or 16), zero-fill when !valid (src-size 0 reads nothing).
// 16-byte copies bypass L1 (.cg): the operands are streamed once per block; smaller ones must use
// .ca (PTX allows .cg for 16 bytes only).
template <int kBytes>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t dst = cute::cast_smem_ptr_to_uint(smem);
  const int src_size = valid ? kBytes : 0;
  if constexpr (kBytes == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_size));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(gmem), "n"(kBytes),
                 "r"(src_size));
#endif
}

template <class Op, int kRows, int kK, int kThreads>
class TileLoader {
 public:
  struct SharesFilled {};  // (the constructor over shares already in shared memory, below)
  using T = typename Op::Element;
  using AccT = Acc<T>;
  static constexpr bool kAlongK = Op::kMajor == Major::K;
  static constexpr int kChunk = 16 / static_cast<int>(sizeof(T));
  static constexpr int kLineLength = kAlongK ? kK : kRows;      // the contiguous axis of the tile
  static constexpr int kLines = kAlongK ? kRows : kK;           // the other one
  static constexpr int kChunksPerLine = kLineLength / kChunk;
  static constexpr int kLinesPerPass = kThreads / kChunksPerLine;
  static constexpr int kPasses = kLines / kLinesPerPass;
  static_assert(kLineLength % kChunk == 0 && kThreads % kChunksPerLine == 0 && kLines % kLinesPerPass == 0,
                "the tile must split into whole 16-byte chunks over the block's threads");

  // Rows [row0, row0 + kRows) of an operand with `rows` rows. K-major: `shares` is shared memory
  // for the kRows row shares, filled here by the whole block (the caller syncs before the first
  // write); unused (nullptr) for Rows-major operands.
  __device__ TileLoader(const Op& op, int64_t row0, int64_t rows, typename Op::Row* shares)
      : TileLoader(op, row0, rows, shares, SharesFilled{}) {
    // K-major: a row's share is the same in every K step; computed once per block into shared
    // memory (in registers, 4 of them per thread next to the 64 accumulators made ptxas spill).
    // (Rows-major operands compute theirs per step, in rows_major_shares.)
    if constexpr (kAlongK) fill_shares(op, row0, rows, shares);
  }

  // The same over row shares some earlier code of the block filled (fill_shares, then a barrier):
  // a stream of tiles (the attention kernels' key and query blocks) computes the next block's
  // shares before the barrier that publishes the current one, and two operands over the same
  // rows (K and V of one window, Q and dOut) share them.
  __device__ TileLoader(const Op& op, int64_t row0, int64_t rows, typename Op::Row* shares, SharesFilled)
      : op_(op), row0_(row0), rows_(rows), row_shares_(shares) {
    chunk_ = threadIdx.x % kChunksPerLine;
    line_ = threadIdx.x / kChunksPerLine;
  }

  // shares[i] = op.row(row0 + i) for the kRows rows (row 0's share past the operand's last row),
  // by the whole block.
  __device__ static void fill_shares(const Op& op, int64_t row0, int64_t rows, typename Op::Row* shares) {
    for (int i = threadIdx.x; i < kRows; i += kThreads) {
      const int64_t r = row0 + i;
      shares[i] = op.row(r < rows ? r : 0);
    }
  }

  // Fill `tile` (a [kRows, kK] view of one stage) with K step [k0, k_end): a computed operand's
  // values, gathered straight into shared memory; cp.async runs of a copy operand, or, when its
  // runs are 2 bytes (no cp.async that small), loads and stores of one element each.
  template <class Tile>
  __device__ void write(Tile&& tile, int64_t k0, int64_t k_end) {
    if constexpr (Op::kComputed) {
      gather(tile, k0, k_end);
    } else {
      const int bytes = vec() * static_cast<int>(sizeof(T));
      if (bytes == 16) return copy_runs<16>(tile, k0, k_end);
      if constexpr (sizeof(T) <= 8)
        if (bytes == 8) return copy_runs<8>(tile, k0, k_end);
      if constexpr (sizeof(T) <= 4)
        if (bytes == 4) return copy_runs<4>(tile, k0, k_end);
      copy_elements(tile, k0, k_end);
    }
  }

 private:
  __device__ int vec() const {
    if constexpr (Op::kComputed) return 1;
    else return op_.vec < kChunk ? op_.vec : kChunk;
  }

  // The row shares of this thread's runs of kLen elements along the rows (Rows-major operands).
  template <int kLen, class Row>
  __device__ void rows_major_shares(Row (&rows)[kChunk / kLen]) const {
#pragma unroll
    for (int j = 0; j < kChunk / kLen; ++j) {
      const int64_t r = row0_ + chunk_ * kChunk + j * kLen;
      rows[j] = op_.row(r < rows_ ? r : 0);
    }
  }

  // The (row, k) of element e of the chunk of pass p (element-wise paths).
  __device__ void element(int p, int e, int64_t k0, int64_t& r, int64_t& k) const {
    const int line = line_ + p * kLinesPerPass, along = chunk_ * kChunk + e;
    r = row0_ + (kAlongK ? line : along);
    k = k0 + (kAlongK ? along : line);
  }

  template <int kBytes, class Tile>
  __device__ void copy_runs(Tile& tile, int64_t k0, int64_t k_end) {
    constexpr int len = kBytes / static_cast<int>(sizeof(T)), runs = kChunk / len;
    typename Op::Row rows[kAlongK ? 1 : runs];
    if constexpr (!kAlongK) rows_major_shares<len>(rows);
    const auto pass = [&](int p) {
      const int line = line_ + p * kLinesPerPass;
      const typename Op::Col col_line = op_.col(kAlongK ? 0 : k0 + line);  // (Rows-major: the pass's K index)
#pragma unroll
      for (int j = 0; j < runs; ++j) {
        const int along = chunk_ * kChunk + j * len;
        const int tr = kAlongK ? line : along, tk = kAlongK ? along : line;
        const int64_t r = row0_ + tr, k = k0 + tk;
        // a run is valid whole or not at all: vec divides the contiguous extent (vector_width)
        const bool ok = r < rows_ && k < k_end;
        const int64_t offset =
            kAlongK ? op_.offset(row_shares_[line_ + p * kLinesPerPass], op_.col(k)) : op_.offset(rows[kAlongK ? 0 : j], col_line);
        const T* src = ok ? op_.data + offset : op_.data;
        cp_async<kBytes>(&smem_ref(tile, tr, tk), src, ok);
      }
    };
    for_each_pass(pass);
  }

  // pass(0 .. kPasses-1): unrolled for K-major copies (an offset and a cp.async per run); one
  // pass at a time along the rows, where each pass computes its own K share, and for computed
  // operands, whose elements each compute a column share and hold their loads: unrolled, ptxas
  // keeps all of them live with the in-flight wgmma's accumulators and spills (ptxas -v; the
  // fused MorphFC ops' K-major operands spilled 19-38 registers).
  template <class Pass>
  __device__ static void for_each_pass(const Pass& pass) {
    if constexpr (kAlongK && !Op::kComputed) {
#pragma unroll
      for (int p = 0; p < kPasses; ++p) pass(p);
    } else {
#pragma unroll 1
      for (int p = 0; p < kPasses; ++p) pass(p);
    }
  }

  // A computed operand's elements, each from clamped (in-range) shares and zeroed after the fact
  // when out of range: no branch per element, so the loads of a pass issue back to back.
  template <class Tile>
  __device__ void gather(Tile& tile, int64_t k0, int64_t k_end) {
    if (k0 >= k_end) {  // a prologue stage past the end of a short K range: zeros, no loads
      for_each_pass([&](int p) {
#pragma unroll
        for (int e = 0; e < kChunk; ++e) {
          int64_t r, k;
          element(p, e, k0, r, k);
          smem_ref(tile, r - row0_, k - k0) = T(0);
        }
      });
      return;
    }
    typename Op::Row rows[kAlongK ? 1 : kChunk];
    if constexpr (!kAlongK) rows_major_shares<1>(rows);
    for_each_pass([&](int p) {
#pragma unroll
      for (int e = 0; e < kChunk; ++e) {
        int64_t r, k;
        element(p, e, k0, r, k);
        const bool ok = r < rows_ && k < k_end;
        const typename Op::Row& row = kAlongK ? row_shares_[line_ + p * kLinesPerPass] : rows[kAlongK ? 0 : e];
        const AccT v = op_.value(row, op_.col(k < k_end ? k : k_end - 1));
        smem_ref(tile, r - row0_, k - k0) = static_cast<T>(ok ? v : AccT(0));
      }
    });
  }

  template <class Tile>
  __device__ void copy_elements(Tile& tile, int64_t k0, int64_t k_end) {
    typename Op::Row rows[kAlongK ? 1 : kChunk];
    if constexpr (!kAlongK) rows_major_shares<1>(rows);
    const auto pass = [&](int p) {
      const int line = line_ + p * kLinesPerPass;
      // Rows-major: the pass's one K index, its share once
      const typename Op::Col col_line = op_.col(kAlongK ? 0 : k0 + line);
#pragma unroll
      for (int e = 0; e < kChunk; ++e) {
        int64_t r, k;
        element(p, e, k0, r, k);
        const bool ok = r < rows_ && k < k_end;
        const T* src = op_.data + (kAlongK ? op_.offset(row_shares_[line_ + p * kLinesPerPass], op_.col(k)) : op_.offset(rows[kAlongK ? 0 : e], col_line));
        smem_ref(tile, r - row0_, k - k0) = ok ? *src : T(0);
      }
    };
    for_each_pass(pass);
  }

  template <class Tile>
  __device__ static T& smem_ref(Tile& tile, int64_t r, int64_t k) {
    return reinterpret_cast<T&>(tile(static_cast<int>(r), static_cast<int>(k)));
  }

  Op op_;
  int64_t row0_, rows_;
  typename Op::Row* row_shares_;
  int chunk_, line_;  // (K-major only)
};

}  // namespace mixops::gemm
