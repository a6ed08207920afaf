// The fused MorphFC layer's operands and epilogues for the gathered-GEMM engine
// (gemm/operands.cuh): the GEMMs of mixops::_morph_branch and mixops::_reweighted_proj
// (morph_fc_fused.h; docs/morph_fc.md, "The fused layer").
//
//   branch forward  Y_g = X_g W^T + b, and y's token means   A ChunkOperand      B W        BranchStore (tile sums)
//   branch dX       dX_g = (dY + gm)_g W                    A ChunkPlusMean     B W^T      ChunkStore
//   branch dW       (dY + gm)_g^T X_g                       A ChunkPlusMean^T   B X_g^T    split-K partials
//   proj forward    out = Mix W^T + b                       A MixedBranches     B W        ChunkStore
//   proj dMix       dMix = dOut W -> dBranch_k, dalpha      A ChunkOperand      B W^T      ProjGradStore (tile sums)
//   proj dW         dOut^T Mix                              A ChunkOperand^T    B Mix^T    split-K partials
//
// gm = grad_mean / tokens [B, C] (the gradient of the branch's token mean, reaching every token),
// Mix = sum_k alpha_k·branch_k with alpha [B, C, K]: both per (batch item, channel), added or
// applied in the operand load, so neither a broadcast gradient nor the weighted sum reaches HBM.
// The channel FC (axis "c") and proj use the map of axis "w" with chunk length 1: one token per
// chunk, rows = tokens, features = the C channels.
#pragma once

#include "common.cuh"
#include "gemm/tile_sums.cuh"
#include "morph_fc_operands.cuh"

namespace mixops::morph_fc {

// Where GEMM element (m, f) sits in a [B, C] per-channel tensor: batch item m / R (R = M / B rows
// per item), channel (m % L)·D + f % D; as a row share b·C + (m % L)·D and a feature share f % D.
struct ChannelIndex {
  Divider rows_per_item;

  MIXOPS_HD int64_t row(const Geometry& g, int64_t m) const {
    int64_t grp;
    g.div.L.divmod(m, grp);
    return rows_per_item.div(m) * g.L * g.D + grp * g.D;
  }
  MIXOPS_HD int64_t col(const Geometry& g, int64_t f) const {
    int64_t s;
    g.div.D.divmod(f, s);
    return s;
  }
};

// A share of a chunk-map element plus its share of an index into a per-(item, channel) tensor.
struct IndexedPart {
  Part part;
  int64_t index;
};

// (dY + gm)_g: a [B, T, H, W, C] gradient through the chunk map plus gm[b, c] of its batch item
// and channel (kTransposed: as [F, M], the dW operand). Computed: one load of each per element.
template <typename T, bool kTransposed>
struct ChunkPlusMean {
  using Element = T;
  using AccT = Acc<T>;
  using Row = IndexedPart;
  using Col = IndexedPart;
  static constexpr gemm::Major kMajor = kTransposed ? gemm::Major::Rows : gemm::Major::K;
  static constexpr bool kComputed = true;
  const T* data;
  const AccT* mean;  // gm [B, C], contiguous
  Geometry g;
  Strides s;
  ChannelIndex index;

  MIXOPS_HD IndexedPart gemm_row(int64_t m) const { return {row_part(g, s, m), index.row(g, m)}; }
  MIXOPS_HD IndexedPart feature(int64_t f) const { return {feature_part(g, s, f), index.col(g, f)}; }
  MIXOPS_HD Row row(int64_t r) const { return kTransposed ? feature(r) : gemm_row(r); }
  MIXOPS_HD Col col(int64_t k) const { return kTransposed ? gemm_row(k) : feature(k); }
  MIXOPS_HD AccT value(const Row& r, const Col& k) const {
    const IndexedPart& m = kTransposed ? k : r;
    const IndexedPart& f = kTransposed ? r : k;
    return static_cast<AccT>(data[combine(g, s, m.part, f.part)]) + mean[m.index + f.index];
  }
};

// The K = 2 or 3 branches of _reweighted_proj (one memory layout, s) and their weights alpha
// [B, C, K] (contiguous): a token's share of alpha is b·C·K, a channel's c·K.
template <typename T>
struct Branches {
  const T* data[3];  // data[2] == nullptr: two branches
  const Acc<T>* alpha;
  Geometry g;  // the channel map (axis "w", L = 1)
  Strides s;
  Divider rows_per_item;
  int64_t channels;
  int count;

  MIXOPS_HD IndexedPart token(int64_t m) const { return {row_part(g, s, m), rows_per_item.div(m) * channels * count}; }
  MIXOPS_HD IndexedPart channel(int64_t c) const { return {feature_part(g, s, c), c * count}; }
  MIXOPS_HD int64_t offset(const IndexedPart& t, const IndexedPart& c) const { return combine(g, s, t.part, c.part); }
  MIXOPS_HD const Acc<T>* weights(const IndexedPart& t, const IndexedPart& c) const {
    return alpha + t.index + c.index;
  }
};

// Mix = (b0·a0 + b1·a1) + b2·a2 at (token, channel), the reference's order; kTransposed: as
// [C, M], the dW operand. Computed: K + K loads per element, register-heavy (gemm/operands.cuh:
// its launches spilled 200-400 bytes on sm_80's 128-row tile).
template <typename T, bool kTransposed>
struct MixedBranches {
  using Element = T;
  using AccT = Acc<T>;
  using Row = IndexedPart;
  using Col = IndexedPart;
  static constexpr gemm::Major kMajor = kTransposed ? gemm::Major::Rows : gemm::Major::K;
  static constexpr bool kComputed = true;
  static constexpr bool kRegisterHeavy = true;
  Branches<T> br;

  MIXOPS_HD Row row(int64_t r) const { return kTransposed ? br.channel(r) : br.token(r); }
  MIXOPS_HD Col col(int64_t k) const { return kTransposed ? br.token(k) : br.channel(k); }
  MIXOPS_HD AccT value(const Row& r, const Col& k) const {
    const IndexedPart& t = kTransposed ? k : r;
    const IndexedPart& c = kTransposed ? r : k;
    const int64_t off = br.offset(t, c);
    const AccT* a = br.weights(t, c);
    AccT v = static_cast<AccT>(br.data[0][off]) * a[0] + static_cast<AccT>(br.data[1][off]) * a[1];
    if (br.data[2] != nullptr) v += static_cast<AccT>(br.data[2][off]) * a[2];
    return v;
  }
};

// The branch forward's epilogue: y through ChunkStore, and the partial sums of y (bias included)
// for its token means: per row and residue n % D for the token maps (mean[b, (m % L)·D + s] adds
// them over the rows of item b and group m % L), per column and batch item for the channel FC
// (L = 1: a residue per channel would be as large as y). Layouts: gemm/tile_sums.cuh.
template <typename T>
struct BranchStore {
  using AccT = Acc<T>;
  using Row = Part;
  using Col = typename ChunkStore<T>::Col;
  static constexpr bool kTileSums = true;
  ChunkStore<T> out;
  AccT* partials;
  bool per_row;  // row_residue_sums, else batch_column_sums
  Divider rows_per_item;

  MIXOPS_HD Row row(int64_t m, int split) const { return out.row(m, split); }
  MIXOPS_HD Col col(int64_t n) const { return out.col(n); }
  MIXOPS_HD void store(const Row& r, const Col& c, AccT v) const { out.store(r, c, v); }
  template <class View>
  MIXOPS_HD void sums(const View& t, int thread, int threads) const {
    if (per_row)
      gemm::row_residue_sums(
          t, partials, out.g.M, static_cast<int>(out.g.D), [](const Row&, const Col& c, AccT v) { return v + c.bias; },
          thread, threads);
    else
      gemm::batch_column_sums(
          t, partials, rows_per_item, out.g.F, 1, [](int, const Row&, const Col& c, AccT v) { return v + c.bias; },
          thread, threads);
  }
};

// proj's dMix epilogue: dBranch_k = alpha_k·dMix in the branches' layout and dtype, and the
// partials of dalpha[b, c, k] = sum over item b's tokens of dMix·branch_k
// ([B, slots, C, K]: gemm/tile_sums.cuh batch_column_sums).
template <typename T>
struct ProjGradStore {
  using AccT = Acc<T>;
  using Row = IndexedPart;
  using Col = IndexedPart;
  static constexpr bool kTileSums = true;
  Branches<T> br;
  T* grads[3];  // grads[2] == nullptr: two branches
  AccT* partials;

  MIXOPS_HD Row row(int64_t m, int) const { return br.token(m); }
  MIXOPS_HD Col col(int64_t c) const { return br.channel(c); }
  MIXOPS_HD void store(const Row& r, const Col& c, AccT v) const {
    const int64_t off = br.offset(r, c);
    const AccT* a = br.weights(r, c);
    // (constant indices: a runtime index into a kernel parameter's array would copy it to local memory)
    grads[0][off] = static_cast<T>(v * a[0]);
    grads[1][off] = static_cast<T>(v * a[1]);
    if (grads[2] != nullptr) grads[2][off] = static_cast<T>(v * a[2]);
  }
  template <class View>
  MIXOPS_HD void sums(const View& t, int thread, int threads) const {
    gemm::batch_column_sums(
        t, partials, br.rows_per_item, br.channels, br.count,
        [this](int k, const Row& r, const Col& c, AccT v) {
          const T* branch = k == 0 ? br.data[0] : k == 1 ? br.data[1] : br.data[2];
          return v * static_cast<AccT>(branch[br.offset(r, c)]);
        },
        thread, threads);
  }
};

}  // namespace mixops::morph_fc
