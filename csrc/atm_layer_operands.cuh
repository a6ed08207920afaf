// The fused ATMLayer's maps for the gathered-GEMM engine and the column sums (docs/atm.md
// section 6): the internal ops mixops::_atm_means and _atm_mix (atm_layer.h).
//
//   means           [B, 3, C] token means of S_w, S_h, x          column sums of MeanColumns (computed)
//   mix             y = Σ_k alpha_k·(S_k W_k^T + b_k), K = 3C     A StackedS, B [W_w | W_h | W_c], MixStore
//                   in 3 K segments folded by alpha (gemm/operands.cuh kSegments)
//   mix dalpha_k    Σ_tokens g·(S_k W_k^T + b_k), per item        A S_k, B W_k, AlphaGradSums (tile sums only)
//   per-image sums  [B, C_out] of g                               column sums of ImageColumns
// (the mix's dS_k and dW_k are atm_fc's GEMMs: atm_operands.cuh.) Pixels are in the canonical
// order m = (b·H + h)·W + w, which is the W view's; a pixel's H-view share is built from (b, h, w).
#pragma once

#include "atm_operands.cuh"
#include "gemm/tile_sums.cuh"

namespace mixops::atm {
namespace {

// Both sampled views and x at one pixel and channel: gw is the W view (lines = rows), gh the H
// view (lines = columns); x is read through gw's strides (l = h, p = w).
template <typename T>
struct SampledPair {
  GatheredS<T, gemm::Major::K> gw, gh;

  struct Pixel {
    PixelShare w, h;
    int64_t x;
  };
  MIXOPS_HD Pixel pixel(int64_t b, int64_t h, int64_t w) const {
    return {gw.pixel_at(b, h, w), gh.pixel_at(b, w, h), b * gw.sx.b + h * gw.sx.l + w * gw.sx.p};
  }
  // branch k = 0 (S_w), 1 (S_h), 2 (x) at channel share c
  MIXOPS_HD Acc<T> at(int k, const Pixel& p, const ChannelShare& c) const {
    if (k == 0) return gw.sampled(p.w, c);
    if (k == 1) return gh.sampled(p.h, c);
    return static_cast<Acc<T>>(gw.x[p.x + c.x]);
  }
};

// The [H·W, B·3·C] matrix whose column sums are the token sums of S_w, S_h and x: row = pixel
// (h, w) of an image, column = (b, k, c). Computed (column_term).
template <typename T>
struct MeanColumns {
  struct Col {
    int64_t b;
    int k;
    ChannelShare ch;
  };
  SampledPair<T> s;
  Divider W, H, C, three_c;

  MIXOPS_HD PixelIndex row(int64_t hw) const { return pixel_index(hw, W, H); }  // (b = 0, l = h, q = w)
  MIXOPS_HD Col col(int64_t j) const {
    int64_t kc, c;
    const int64_t b = three_c.divmod(j, kc);
    const int k = static_cast<int>(C.divmod(kc, c));
    return {b, k, s.gw.channel(c)};
  }
  MIXOPS_HD Acc<T> value(const PixelIndex& r, const Col& c) const { return s.at(c.k, s.pixel(c.b, r.l, r.q), c.ch); }
};

// [S_w | S_h | x] as the mix's A operand [pixels, 3C]: column kk is branch kk / C, channel kk % C.
// K-major, computed; a K step never spans two branches (the engine runs each K segment alone).
template <typename T>
struct StackedS {
  using Element = T;
  using Row = typename SampledPair<T>::Pixel;
  struct Col {
    int k;
    ChannelShare ch;
  };
  static constexpr gemm::Major kMajor = gemm::Major::K;
  static constexpr bool kComputed = true;
  SampledPair<T> s;
  Divider W, H, C;

  MIXOPS_HD Row row(int64_t m) const {
    const PixelIndex p = pixel_index(m, W, H);  // the W view's order: (b, l = h, q = w)
    return s.pixel(p.b, p.l, p.q);
  }
  MIXOPS_HD Col col(int64_t kk) const {
    int64_t c;
    const int k = static_cast<int>(C.divmod(kk, c));
    return {k, s.gw.channel(c)};
  }
  MIXOPS_HD Acc<T> value(const Row& r, const Col& c) const { return s.at(c.k, r, c.ch); }
};

// The mix's epilogue: segment k's accumulators become alpha[b, n, k]·(acc + b_k[n]) (b_c = 0), the
// three summed in branch order (the engine's fold), stored once in the storage type.
template <typename T>
struct MixStore {
  using AccT = Acc<T>;
  struct Row {
    int64_t out, alpha;  // the pixel's offset in out, b·C_out·3
  };
  struct Col {
    int64_t out, alpha;  // n·stride, n·3
    AccT bias_w, bias_h;
  };
  static constexpr bool kSegments = true;
  T* out;
  const T* bias_w;  // nullptr: none
  const T* bias_h;
  int64_t bias_w_stride, bias_h_stride;
  const AccT* alpha;  // [B, C_out, 3], contiguous
  PixelMatrix map;    // out's canonical (W) view
  Divider pixels_per_image;
  int64_t channels;   // C_out

  MIXOPS_HD Row row(int64_t m, int) const { return {map.row(m), pixels_per_image.div(m) * channels * 3}; }
  MIXOPS_HD Col col(int64_t n) const {
    return {map.col(n), n * 3, bias_w != nullptr ? static_cast<AccT>(bias_w[n * bias_w_stride]) : AccT(0),
            bias_h != nullptr ? static_cast<AccT>(bias_h[n * bias_h_stride]) : AccT(0)};
  }
  MIXOPS_HD AccT fold(int k, const Row& r, const Col& c, AccT v) const {
    const AccT bias = k == 0 ? c.bias_w : k == 1 ? c.bias_h : AccT(0);
    return alpha[r.alpha + c.alpha + k] * (v + bias);
  }
  MIXOPS_HD void store(const Row& r, const Col& c, AccT v) const { out[r.out + c.out] = static_cast<T>(v); }
};

// The epilogue of dalpha_k: nothing stored; per batch item and output channel n, the sum over its
// pixels of g[pixel, n]·(acc + b_k[n]) (gemm/tile_sums.cuh batch_column_sums, [B, slots, C_out, 1]).
// Rows are pixels of S_k's view; g is read through the same view.
template <typename T>
struct AlphaGradSums {
  using AccT = Acc<T>;
  using Row = int64_t;  // the pixel's offset in g
  struct Col {
    int64_t g;
    AccT bias;
  };
  static constexpr bool kTileSums = true;
  const T* g;
  const T* bias;  // nullptr: none
  int64_t bias_stride;
  PixelMatrix map;  // g in S_k's view
  Divider pixels_per_image;
  int64_t channels;  // C_out
  AccT* partials;

  MIXOPS_HD Row row(int64_t m, int) const { return map.row(m); }
  MIXOPS_HD Col col(int64_t n) const {
    return {map.col(n), bias != nullptr ? static_cast<AccT>(bias[n * bias_stride]) : AccT(0)};
  }
  MIXOPS_HD void store(const Row&, const Col&, AccT) const {}
  template <class View>
  MIXOPS_HD void sums(const View& t, int thread, int threads) const {
    gemm::batch_column_sums(
        t, partials, pixels_per_image, channels, 1,
        [this](int, const Row& r, const Col& c, AccT v) { return (v + c.bias) * static_cast<AccT>(g[r + c.g]); },
        thread, threads);
  }
};

// g [B, H, W, C_out] as the [H·W, B·C_out] matrix of its per-image column sums.
struct ImageColumns {
  LineStrides s;  // the W view: l = h, p = w
  Divider W, channels;

  MIXOPS_HD int64_t row(int64_t hw) const {
    int64_t w;
    const int64_t h = W.divmod(hw, w);
    return h * s.l + w * s.p;
  }
  MIXOPS_HD int64_t col(int64_t j) const {
    int64_t n;
    const int64_t b = channels.divmod(j, n);
    return b * s.b + n * s.c;
  }
  MIXOPS_HD int64_t offset(int64_t r, int64_t c) const { return r + c; }
};

}  // namespace
}  // namespace mixops::atm
