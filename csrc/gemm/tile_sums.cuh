// Partial sums of a GEMM's output taken in the engine's epilogue (gemm/kernel.cuh), from the
// accumulator tile it already holds in shared memory: the token means of the fused layers'
// branch outputs and the per-sample gradients of their softmax weights, with no second pass over
// an output in HBM.
//
// An epilogue opts in with
//   static constexpr bool kTileSums = true;
//   template <class View> MIXOPS_HD void sums(const View& tile, int thread, int threads) const;
// which the block's threads run together after the tile's stores. The reductions below are the
// two layouts the families need; every partial is written by one thread, which adds its terms in
// increasing row / column order, and the host adds the partials in a fixed order (at::sum): no
// atomics, the same bits on every run. They are plain host/device functions, so the CPU build
// (gemm/host_engine.h) runs the very same code.
#pragma once

#include <cstdint>

#include "../common.cuh"

namespace mixops::gemm {

template <class Epi>
inline constexpr bool kHasTileSums = requires { requires Epi::kTileSums; };

// One block's tile of C after its stores: acc(r, c) for r < rows_valid, c < cols_valid is
// C[m0 + r, n0 + c] (the accumulator, before the epilogue's bias and rounding), rows[r] / cols[c]
// the epilogue's shares of that row and column. Tiles are kRows x kCols; tile_m = m0 / kRows.
template <int kRows, int kCols, class AccT, class Row, class Col>
struct TileView {
  static constexpr int kBM = kRows, kBN = kCols;
  const AccT* acc;
  int ld;
  const Row* rows;
  const Col* cols;
  int64_t m0, n0;
  int rows_valid, cols_valid;

  MIXOPS_HD AccT operator()(int r, int c) const { return acc[r * ld + c]; }
  MIXOPS_HD int64_t tile_m() const { return m0 / kRows; }
  MIXOPS_HD int64_t tile_n() const { return n0 / kCols; }
};

// Per row, the sum over the tile's columns n with n % D == s, of term(row share, column share,
// acc) in increasing n:
//   out[(tile_n * M + m) * D + s]          out: [cdiv(N, kBN), M, D]
// (MorphFC's token maps: column n of row m is channel (m % L)·D + n % D.) A thread owns (r, s)
// pairs: kBM·D of them, each kBN / D terms.
template <class View, class AccT, class Term>
MIXOPS_HD void row_residue_sums(const View& t, AccT* out, int64_t M, int D, const Term& term, int thread,
                                int threads) {
  const int first = static_cast<int>(t.n0) % D;  // (32-bit: N < 2^31, no 64-bit division call)
  for (int i = thread; i < t.rows_valid * D; i += threads) {
    const int r = i / D, s = i - (i / D) * D;
    AccT sum = 0;
    for (int c = (s - first + D) % D; c < t.cols_valid; c += D) sum += term(t.rows[r], t.cols[c], t(r, c));
    out[(t.tile_n() * M + t.m0 + r) * D + s] = sum;
  }
}

// The slots per batch item of batch_column_sums' buffer: the row tiles one item of rows_per_item
// rows can touch.
template <int kBM>
MIXOPS_HD int64_t batch_slots(int64_t rows_per_item) {
  return cdiv(rows_per_item, kBM) + 1;
}

// Per column and batch item b (rows [b·R, (b+1)·R), R = rows_per_item), the sum over the tile's
// rows of that item, of each of `terms` terms term(j, row share, column share, acc), in
// increasing m:
//   out[((b * slots + tile_m - b·R / kBM) * N + n) * terms + j]    out: [B, slots, N, terms]
// slots = batch_slots<kBM>(R); a slot no tile reaches is left as it was (the host zeroes the
// buffer and sums over the slots). A thread owns (item, column, term) triples.
template <class View, class AccT, class Term>
MIXOPS_HD void batch_column_sums(const View& t, AccT* out, const Divider& rows_per_item, int64_t N, int terms,
                                 const Term& term, int thread, int threads) {
  const int64_t R = rows_per_item.divisor();
  const int64_t b_first = rows_per_item.div(t.m0), b_last = rows_per_item.div(t.m0 + t.rows_valid - 1);
  const int64_t slots = batch_slots<View::kBM>(R);
  const int per_item = t.cols_valid * terms;
  const int jobs = static_cast<int>(b_last - b_first + 1) * per_item;
  for (int i = thread; i < jobs; i += threads) {
    const int item = i / per_item, rest = i - item * per_item;
    const int c = rest / terms, j = rest - c * terms;
    const int64_t b = b_first + item;
    const int64_t lo = b * R - t.m0, hi = lo + R;
    const int r_begin = lo > 0 ? static_cast<int>(lo) : 0;
    const int r_end = hi < t.rows_valid ? static_cast<int>(hi) : t.rows_valid;
    AccT sum = 0;
    for (int r = r_begin; r < r_end; ++r) sum += term(j, t.rows[r], t.cols[c], t(r, c));
    const int64_t slot = t.tile_m() - b * R / View::kBM;
    out[((b * slots + slot) * N + t.n0 + c) * terms + j] = sum;
  }
}

}  // namespace mixops::gemm
