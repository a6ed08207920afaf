// RepMLP's partition map and its operands and epilogues for the gathered-GEMM engine
// (gemm/operands.cuh): the set-sharing partition FC of docs/repmlp.md sections 3.1-3.2 as one
// grouped launch, group s = share-set s.
//
// Share-set s is the GEMM Z_s = X_s W_s^T (+ b_s), M = N*R rows (R = hp*wp*Q per image), K = N_out
// = hw. Row m = n*R + (i*wp + j)*Q + q is partition (i, j) of channel q*S + s of image n; column
// p = y*w + xx is its pixel (i*h + y, j*w + xx). An element's offset is a row share plus a pixel
// share, in the input map
//     n*sN + q*S*sC + i*h*sH + j*w*sW   +   pixel(p)       (+ s*sC: the group's pointer)
// and in the output map (the official un-partition, scramble included), with rho = m % R,
//     n*oN + (rho / (hp*wp))*S*oC + ((rho / wp) % hp)*h*oH + (rho % wp)*w*oW   +   pixel(p)   (+ s*oC)
// so every tensor's group shift is s times its channel stride, and the weight's s*hw rows.
// pixel(p) = (p / pw)*sH + (p % pw)*sW, with pw = hw where a partition's pixels lie as one run of
// the W stride (pixel_run: native resolution, or one-row partitions; then vec may span it).
#pragma once

#include <ATen/core/Tensor.h>

#include "common.cuh"
#include "gemm/operands.cuh"

namespace mixops::repmlp {

struct Strides {
  int64_t n, c, h, w;
};

inline Strides strides4(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// The map of one call: x [N, C, H, W], partition (ph, pw), S share-sets.
struct Geometry {
  int64_t N, C, S, Q, HP, WP, PH, PW, hw, R, M;
  Divider by_R, by_Q, by_WP, by_HP;
};

// (An empty map, HP or WP 0, has M = 0 and launches nothing; its dividers stay valid.)
inline Geometry geometry(int64_t N, int64_t C, int64_t H, int64_t W, int64_t ph, int64_t pw, int64_t S) {
  const int64_t Q = C / S, HP = H / ph, WP = W / pw, R = HP * WP * Q;
  return {N,          C, S, Q, HP, WP, ph, pw, ph * pw, R, N * R, Divider(std::max<int64_t>(R, 1)), Divider(Q),
          Divider(std::max<int64_t>(WP, 1)), Divider(std::max<int64_t>(HP, 1))};
}

// How pixel p of a partition of tensor t is addressed: p = y*run + xx over the strides, run = hw
// when the partition's rows follow each other (then p*sW), else the partition width.
struct Pixels {
  Divider run;
  int64_t h, w;
  MIXOPS_HD int64_t operator()(int64_t p) const {
    int64_t xx;
    const int64_t y = run.divmod(p, xx);
    return y * h + xx * w;
  }
};

inline bool pixel_run(const Geometry& g, const Strides& s) { return g.PH == 1 || s.h == g.PW * s.w; }

inline Pixels pixels(const Geometry& g, const Strides& s) {
  return {Divider(pixel_run(g, s) ? g.hw : g.PW), s.h, s.w};
}

// The widest aligned run of pixels of t (gemm::vector_width): along a partition row, or its whole
// hw where the rows follow each other.
inline int pixel_vec(const at::Tensor& t, const Geometry& g, const Strides& s) {
  if (pixel_run(g, s)) return gemm::vector_width(t.const_data_ptr(), t.element_size(), s.w, g.hw, {s.n, s.c, g.PH * s.h, g.PW * s.w});
  return gemm::vector_width(t.const_data_ptr(), t.element_size(), s.w, g.PW, {s.n, s.c, g.PH * s.h, g.PW * s.w, s.h});
}

// Row m's share in the input map (share-set 0; the group moves the pointer).
MIXOPS_HD int64_t input_row(const Geometry& g, const Strides& s, int64_t m) {
  int64_t rho, q, j;
  const int64_t n = g.by_R.divmod(m, rho);
  const int64_t part = g.by_Q.divmod(rho, q);
  const int64_t i = g.by_WP.divmod(part, j);
  return n * s.n + q * g.S * s.c + i * g.PH * s.h + j * g.PW * s.w;
}

// Row m in the output map: its image n, output channel group c' (channel c'*S + s) and share.
struct OutputRow {
  int64_t n, channel, offset;
};

MIXOPS_HD OutputRow output_row(const Geometry& g, const Strides& s, int64_t m) {
  int64_t rho, i, j;
  const int64_t n = g.by_R.divmod(m, rho);
  // rho = (channel * hp + i) * wp + j: channel rho / (hp*wp), partition ((rho / wp) % hp, rho % wp)
  const int64_t channel = g.by_HP.divmod(g.by_WP.divmod(rho, j), i);
  return {n, channel, n * s.n + channel * g.S * s.c + i * g.PH * s.h + j * g.PW * s.w};
}

// X_s in a map (kOutput: the un-partition, for dOut) as the engine's A [M, hw] (K-major over the
// pixels) or, kTransposed, X_s^T as [hw, M] (Rows-major: the dW GEMM's B).
template <typename T, bool kOutput, bool kTransposed>
struct PartitionOperand {
  using Element = T;
  using Row = int64_t;
  using Col = int64_t;
  static constexpr gemm::Major kMajor = kTransposed ? gemm::Major::Rows : gemm::Major::K;
  static constexpr bool kComputed = false;
  const T* data;
  Geometry g;
  Strides s;
  Pixels pix;
  int vec;

  MIXOPS_HD PartitionOperand for_group(int group) const {
    PartitionOperand o = *this;
    o.data += group * s.c;
    return o;
  }
  MIXOPS_HD int64_t rows_share(int64_t m) const { return kOutput ? output_row(g, s, m).offset : input_row(g, s, m); }
  MIXOPS_HD int64_t row(int64_t r) const { return kTransposed ? pix(r) : rows_share(r); }
  MIXOPS_HD int64_t col(int64_t k) const { return kTransposed ? rows_share(k) : pix(k); }
  MIXOPS_HD int64_t offset(int64_t r, int64_t c) const { return r + c; }
};

template <bool kOutput, bool kTransposed = false, typename T>
PartitionOperand<T, kOutput, kTransposed> partition_operand(const T* data, const at::Tensor& t, const Geometry& g) {
  const Strides s = strides4(t);
  return {data, g, s, pixels(g, s), pixel_vec(t, g, s)};
}

// dZ_s^T = (gate * dOut through the output map)^T as [hw, M]: the dW GEMM's A. The gate is
// constant along a row m (one output channel), so its value rides in the K share; the element is
// computed (a load and a multiply), which the engine gathers into the stage.
template <typename T>
struct GatedGradOperand {
  using Element = T;
  struct Col {
    int64_t offset;
    Acc<T> gate;
  };
  using Row = int64_t;
  static constexpr gemm::Major kMajor = gemm::Major::Rows;
  static constexpr bool kComputed = true;
  const T* data;
  const T* gate;
  int64_t gate_n, gate_c;
  Geometry g;
  Strides s;
  Pixels pix;

  MIXOPS_HD GatedGradOperand for_group(int group) const {
    GatedGradOperand o = *this;
    o.data += group * s.c;
    o.gate += group * gate_c;
    return o;
  }
  MIXOPS_HD int64_t row(int64_t q) const { return pix(q); }
  MIXOPS_HD Col col(int64_t m) const {
    const OutputRow r = output_row(g, s, m);
    return {r.offset, static_cast<Acc<T>>(gate[r.n * gate_n + r.channel * g.S * gate_c])};
  }
  MIXOPS_HD Acc<T> value(int64_t row, const Col& col) const {
    return static_cast<Acc<T>>(data[row + col.offset]) * col.gate;
  }
};

// The forward's store: out[output map] = (v + b_s[n]) * gate[n, c_o]; bias and gate optional.
template <typename T>
struct ForwardStore {
  struct Row {
    int64_t offset;
    Acc<T> gate;
  };
  struct Col {
    int64_t pixel;
    Acc<T> bias;
  };
  T* out;
  const T* bias;  // nullptr: none
  const T* gate;  // nullptr: none
  int64_t bias_stride, gate_n, gate_c;
  Geometry g;
  Strides s;
  Pixels pix;

  MIXOPS_HD ForwardStore for_group(int group) const {
    ForwardStore o = *this;
    o.out += group * s.c;
    if (bias != nullptr) o.bias += group * g.hw * bias_stride;
    if (gate != nullptr) o.gate += group * gate_c;
    return o;
  }
  MIXOPS_HD Row row(int64_t m, int) const {
    const OutputRow r = output_row(g, s, m);
    return {r.offset, gate != nullptr ? static_cast<Acc<T>>(gate[r.n * gate_n + r.channel * g.S * gate_c]) : Acc<T>(1)};
  }
  MIXOPS_HD Col col(int64_t n) const {
    return {pix(n), bias != nullptr ? static_cast<Acc<T>>(bias[n * bias_stride]) : Acc<T>(0)};
  }
  MIXOPS_HD void store(const Row& r, const Col& c, Acc<T> v) const {
    out[r.offset + c.pixel] = static_cast<T>((v + c.bias) * r.gate);
  }
};

// dX's store: dx[input map] = v * gate[n, c_o], v = (dOut W_s)[m, p] through the output map's rows;
// with kGateGrad its tile sums give dgate's partials: per row, the sum over the tile's columns of
// v * x[input map] (= x_row . W_s^T dOut_row, the gate's gradient before the bias term), into
//     part[(s * tiles_n + tile_n) * M + m]          part: [S, tiles_n, M]
template <typename T, bool kGateGrad>
struct InputGradStore {
  static constexpr bool kTileSums = kGateGrad;
  struct Row {
    int64_t dx, x;
    Acc<T> gate;
  };
  struct Col {
    int64_t dx, x;
  };
  T* dx;  // nullptr: only the dgate partials are wanted
  const T* x;
  const T* gate;  // nullptr: none
  Acc<T>* part;
  int64_t gate_n, gate_c, part_group;
  Geometry g;
  Strides s_dx, s_x;
  Pixels pix_dx, pix_x;

  MIXOPS_HD InputGradStore for_group(int group) const {
    InputGradStore o = *this;
    if (dx != nullptr) o.dx += group * s_dx.c;
    o.x += group * s_x.c;
    if (gate != nullptr) o.gate += group * gate_c;
    if (part != nullptr) o.part += group * part_group;
    return o;
  }
  MIXOPS_HD Row row(int64_t m, int) const {
    Acc<T> gv = Acc<T>(1);
    if (gate != nullptr) {
      const OutputRow r = output_row(g, s_x, m);  // (its image and output channel: the gate's index)
      gv = static_cast<Acc<T>>(gate[r.n * gate_n + r.channel * g.S * gate_c]);
    }
    return {input_row(g, s_dx, m), input_row(g, s_x, m), gv};
  }
  MIXOPS_HD Col col(int64_t n) const { return {pix_dx(n), pix_x(n)}; }
  MIXOPS_HD void store(const Row& r, const Col& c, Acc<T> v) const {
    if (dx != nullptr) dx[r.dx + c.dx] = static_cast<T>(v * r.gate);
  }
  template <class View>
  MIXOPS_HD void sums(const View& tile, int thread, int threads) const {
    const auto term = [&](const Row& r, const Col& c, Acc<T> v) { return v * static_cast<Acc<T>>(x[r.x + c.x]); };
    gemm::row_residue_sums(tile, part, g.M, 1, term, thread, threads);
  }
};

// The bias term of dgate, sum over the output pixels of channel c_o of dOut * b_s at the pixel's
// position in its partition, as a column sum (column_sum.cuh) over rows = the H*W pixels and
// columns = the N*C (image, channel) pairs.
template <typename T>
struct GateBiasTerm {
  struct Row {
    int64_t offset, position;
  };
  struct Col {
    int64_t offset, bias_row;
  };
  const T* grad;
  const T* bias;
  int64_t bias_stride;
  Divider W, C, S, PH, PW;
  Strides s;
  int64_t hw;

  MIXOPS_HD Row row(int64_t pixel) const {
    int64_t x;
    const int64_t y = W.divmod(pixel, x);
    int64_t yy, xx;
    PH.divmod(y, yy);
    PW.divmod(x, xx);
    return {y * s.h + x * s.w, yy * PW.divisor() + xx};
  }
  MIXOPS_HD Col col(int64_t j) const {
    int64_t c, share;
    const int64_t n = C.divmod(j, c);
    S.divmod(c, share);
    return {n * s.n + c * s.c, share * hw};
  }
  MIXOPS_HD Acc<T> value(const Row& r, const Col& c) const {
    return static_cast<Acc<T>>(grad[r.offset + c.offset]) * static_cast<Acc<T>>(bias[(c.bias_row + r.position) * bias_stride]);
  }
};

// db = sum over the rows m of every share-set of gate * dOut through the output map, as a column
// sum over rows m < M and columns j = s*hw + q (share-set s, pixel q); gate nullptr: none. The
// shares carry the gate's offset too, so an element costs two loads and a multiply (in the 64
// registers of column_sum.cuh's loop: computing the gate's index per element spilled in bf16).
template <typename T>
struct BiasGradColumns {
  struct Row {
    int64_t offset, gate;
  };
  struct Col {
    int64_t offset, gate;
  };
  const T* grad;
  const T* gate;
  int64_t gate_n, gate_c;
  Geometry g;
  Strides s;
  Pixels pix;
  Divider hw;

  MIXOPS_HD Row row(int64_t m) const {
    const OutputRow r = output_row(g, s, m);
    return {r.offset, r.n * gate_n + r.channel * g.S * gate_c};
  }
  MIXOPS_HD Col col(int64_t j) const {
    int64_t q;
    const int64_t share = hw.divmod(j, q);
    return {share * s.c + pix(q), share * gate_c};
  }
  MIXOPS_HD Acc<T> value(const Row& r, const Col& c) const {
    const Acc<T> v = static_cast<Acc<T>>(grad[r.offset + c.offset]);
    return gate == nullptr ? v : v * static_cast<Acc<T>>(gate[r.gate + c.gate]);
  }
};

}  // namespace mixops::repmlp
