// ATM's tensors as operands and epilogue of the gathered-GEMM engine (gemm/operands.cuh): the
// line view [B, L, n, C] (atm_host.cuh) turned into GEMM rows and columns: host/device code
// shared by atm.cu (atm_fc) and the fused layer's host code (atm_layer.h, also its CPU build).
//   atm_fc forward   out[pixel, j] = sum_c S[pixel, c]·W[j, c]     A = GatheredS<K>,     B = W,   PixelStore
//   atm_fc dS        dS[pixel, c]  = sum_j g[pixel, j]·W[j, c]     A = LineOperand<K>,   B = W^T, PixelStore
//   atm_fc dW        dW[j, c]      = sum_pixel g[pixel, j]·S[pixel, c]
//                                                               A = LineOperand<Rows>, B = GatheredS<Rows>, partials
// S[pixel, c] = lerp0(x[b, l, :, c], q + off[b, l, q, c / share]) is never stored: GatheredS
// computes it in the engine's operand load (a computed operand, two loads and a lerp per
// element). The divisions of the maps (pixel -> line and position, line -> image, channel ->
// offset group) are Dividers (common.cuh) applied once per share: a pixel's share once per tile
// row or K step, a channel's once per K step or tile row, never per element.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "atm_host.cuh"
#include "atm_math.cuh"
#include "common.cuh"
#include "gemm/operands.cuh"

namespace mixops::atm {
// (internal linkage: the engine's instantiations on these types are named after the including
// file, e.g. _atm_cu_, as tests/cuda_sass.py extension_sass("atm") selects them)
namespace {

MIXOPS_HD int64_t pixel_offset(const LineStrides& s, int64_t b, int64_t l, int64_t q) {
  return b * s.b + l * s.l + q * s.p;
}

// Image b, line l and position q of pixel m = (b·L + l)·n + q. Every index division of the ATM
// kernels goes through precomputed Dividers (common.cuh): no 64-bit division sequence in device
// code (tests/test_atm_cuda.py reads the SASS).
struct PixelIndex {
  int64_t b, l, q;
};
MIXOPS_HD PixelIndex pixel_index(int64_t m, const Divider& n, const Divider& L) {
  int64_t q, l;
  const int64_t line = n.divmod(m, q);
  const int64_t b = L.divmod(line, l);
  return {b, l, q};
}

// A [B, L, n, K] tensor (x's view of out, g, dS) as the matrix [pixels, K]: a pixel's share is its
// element offset, a channel's its offset along the last axis. Also the db column-sum map
// (column_sum.cuh: row, col, offset).
struct PixelMatrix {
  Divider n, L;
  LineStrides s;

  MIXOPS_HD int64_t row(int64_t m) const {
    const PixelIndex p = pixel_index(m, n, L);
    return pixel_offset(s, p.b, p.l, p.q);
  }
  MIXOPS_HD int64_t col(int64_t j) const { return j * s.c; }
  MIXOPS_HD int64_t offset(int64_t r, int64_t c) const { return r + c; }
};

// A copy operand from a [B, L, n, K] tensor (g): Major::K reads it as [pixels, K] (dS's A),
// Major::Rows as [K, pixels] (dW's A); both contiguous along the channels when s.c == 1.
template <typename T, gemm::Major kMajorAxis>
struct LineOperand {
  using Element = T;
  using Row = int64_t;
  using Col = int64_t;
  static constexpr gemm::Major kMajor = kMajorAxis;
  static constexpr bool kComputed = false;
  static constexpr bool kPixelRows = kMajorAxis == gemm::Major::K;
  const T* data;
  int vec;
  PixelMatrix map;

  MIXOPS_HD int64_t row(int64_t r) const { return kPixelRows ? map.row(r) : map.col(r); }
  MIXOPS_HD int64_t col(int64_t k) const { return kPixelRows ? map.col(k) : map.row(k); }
  MIXOPS_HD int64_t offset(int64_t r, int64_t c) const { return r + c; }
};

// Where one pixel's samples come from: its line's start in x, its offset row, its position q.
struct PixelShare {
  int64_t x, off, q;
};
// Where one channel's samples come from: its offset in x, its offset group's in the offsets.
struct ChannelShare {
  int64_t x, off;
};

// The sampled features S as a computed operand: Major::K as [pixels, C] (the forward's A; the
// channel is the K axis), Major::Rows as [C, pixels] (dW's B; the pixel is the K axis).
//   x [B, L, n, C]: sx.   off [B, L, n, G]: so.   G = C / share.
template <typename T, gemm::Major kMajorAxis>
struct GatheredS {
  using Element = T;
  using AccT = Acc<T>;
  static constexpr gemm::Major kMajor = kMajorAxis;
  static constexpr bool kComputed = true;
  static constexpr bool kPixelRows = kMajorAxis == gemm::Major::K;
  using Row = std::conditional_t<kPixelRows, PixelShare, ChannelShare>;
  using Col = std::conditional_t<kPixelRows, ChannelShare, PixelShare>;
  const T* x;
  const T* off;
  Divider n, L, share;
  LineStrides sx, so;

  MIXOPS_HD PixelShare pixel(int64_t m) const {
    const PixelIndex p = pixel_index(m, n, L);
    return pixel_at(p.b, p.l, p.q);
  }
  // the share of the pixel at image b, line l, position q of this view
  MIXOPS_HD PixelShare pixel_at(int64_t b, int64_t l, int64_t q) const {
    return {b * sx.b + l * sx.l, pixel_offset(so, b, l, q), q};
  }
  MIXOPS_HD ChannelShare channel(int64_t c) const { return {c * sx.c, share.div(c) * so.c}; }

  MIXOPS_HD Row row(int64_t r) const {
    if constexpr (kPixelRows) return pixel(r);
    else return channel(r);
  }
  MIXOPS_HD Col col(int64_t k) const {
    if constexpr (kPixelRows) return channel(k);
    else return pixel(k);
  }
  MIXOPS_HD AccT value(const Row& r, const Col& k) const {
    if constexpr (kPixelRows) return sampled(r, k);
    else return sampled(k, r);
  }
  // S at one pixel and channel, from their shares
  MIXOPS_HD AccT sampled(const PixelShare& p, const ChannelShare& c) const {
    const T* line = x + p.x + c.x;
    const auto load = [&](int64_t t) { return line[t * sx.p]; };
    return atm::sample<AccT>(load, p.q, static_cast<AccT>(off[p.off + c.off]), n.divisor());
  }
};

// The engine's epilogue onto a [B, L, n, K] output (out, dS): element (pixel, j) goes to the
// pixel's row at j·stride, plus bias[j] when there is one, rounded to the storage type once.
template <typename T>
struct PixelStore {
  using AccT = Acc<T>;
  using Row = int64_t;
  struct Col {
    int64_t offset;
    AccT bias;
  };
  T* out;
  const T* bias;  // nullptr: none
  int64_t bias_stride;
  PixelMatrix map;

  MIXOPS_HD int64_t row(int64_t m, int) const { return map.row(m); }
  MIXOPS_HD Col col(int64_t j) const {
    return {map.col(j), bias != nullptr ? static_cast<AccT>(bias[j * bias_stride]) : AccT(0)};
  }
  MIXOPS_HD void store(int64_t r, const Col& c, AccT v) const {
    out[r + c.offset] = static_cast<T>(bias != nullptr ? v + c.bias : v);
  }
};

// ---------------------------------------------------------------------------------------------
// Builders from ATen tensors (host code). scalar_t: the ATen storage type; Runner (gemm/
// engine_runner.cuh or gemm/host_engine.h) gives the kernels' element type and pointers.
// ---------------------------------------------------------------------------------------------

inline PixelMatrix pixel_matrix(const LineShape& sh, const at::Tensor& t) {
  return {Divider(sh.n), Divider(sh.L), sh.strides(t)};
}

template <class Runner, typename scalar_t, gemm::Major kMajor>
LineOperand<typename Runner::template T<scalar_t>, kMajor> line_operand(const at::Tensor& t, const LineShape& sh) {
  const LineStrides s = sh.strides(t);
  // runs along the channels; every pixel stride must keep them aligned
  return {Runner::template in<scalar_t>(t),
          gemm::vector_width(t.const_data_ptr(), t.element_size(), s.c, t.size(3), {s.b, s.l, s.p}),
          pixel_matrix(sh, t)};
}

// W [C_out, C] as the forward's B (Major::K: W[j, c], rows j, K = c) or dS's B (Major::Rows:
// W^T[c, j], rows c, K = j); contiguous along c in both when weight.stride(1) == 1.
template <class Runner, typename scalar_t, gemm::Major kMajor>
gemm::Matrix<typename Runner::template T<scalar_t>, kMajor> weight_operand(const at::Tensor& weight) {
  const auto* data = Runner::template in<scalar_t>(weight);
  const int64_t s_out = weight.stride(0), s_in = weight.stride(1);
  const int vec = gemm::vector_width(weight.const_data_ptr(), weight.element_size(), s_in, weight.size(1), {s_out});
  if constexpr (kMajor == gemm::Major::K) return {data, s_out, s_in, vec};
  else return {data, s_in, s_out, vec};
}

template <class Runner, typename scalar_t, gemm::Major kMajor>
GatheredS<typename Runner::template T<scalar_t>, kMajor> gathered_s(const at::Tensor& x, const at::Tensor& offset,
                                                                    const LineShape& sh) {
  return {Runner::template in<scalar_t>(x), Runner::template in<scalar_t>(offset), Divider(sh.n), Divider(sh.L),
          Divider(sh.share), sh.strides(x), sh.strides(offset)};
}

template <class Runner, typename scalar_t>
PixelStore<typename Runner::template T<scalar_t>> pixel_store(at::Tensor& out, const std::optional<at::Tensor>& bias,
                                                              const LineShape& sh) {
  return {Runner::template out<scalar_t>(out), bias.has_value() ? Runner::template in<scalar_t>(*bias) : nullptr,
          bias.has_value() ? bias->stride(0) : 0, pixel_matrix(sh, out)};
}

}  // namespace
}  // namespace mixops::atm
