// UniFormer's windowed / global attention (mixops::window_attention): the window map and the
// per-row softmax math, shared by the CUDA kernels (window_attention_kernels.cuh) and their CPU
// emulation (window_attention_cpu.cpp), so the CPU tests check the very functions the kernels
// run. docs/window_attention.md sections 2.4-2.8 (semantics) and 7 (the CUDA backend).
//
// The problem: qkv [B, T, H, W, 3C] (T = 1 for images), channel [q|k|v] x head x d. R = T*H rows
// (a video row is (t, y), two strides apart), W columns, windows of WR x WC tokens anchored at
// (0, 0) (WR = WC = ws; global attention is one window of all R x W tokens). Program p is (window,
// head) = (p / heads, p % heads), windows row-major within an image, images outermost. A window's
// real tokens are enumerated row-major, u -> (row r0 + u / cols, column c0 + u % cols): padded
// tokens are never loaded, padded query rows never computed. "bias" padding is one virtual key
// per edge window with k = b_k, v = b_v and logit scale*q.b_k + ln(n_pad) (section 2.6).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common.cuh"

namespace mixops::window_attention {

// Element strides of a [B, T, H, W, X] view.
struct Strides {
  int64_t b, t, h, w, c;
};

struct Geometry {
  int64_t B, R, W, C;  // images, rows (T*H), columns, channels per slot (q, k or v)
  Divider by_h;        // H: a row's (t, y)
  int64_t heads, d;    // heads and head dim, C = heads * d
  int64_t wr, wc;      // window rows and columns

  MIXOPS_HD int64_t windows_per_row() const { return cdiv(W, wc); }
  MIXOPS_HD int64_t windows() const { return cdiv(R, wr) * windows_per_row(); }  // per image
  MIXOPS_HD int64_t programs() const { return B * windows() * heads; }
  // the most real tokens any window has (the query and key blocks a launch needs)
  MIXOPS_HD int64_t window_tokens() const { return (wr < R ? wr : R) * (wc < W ? wc : W); }
};

// Where a token lies: frame, row and column of the [B, T, H, W, .] view.
struct Pixel {
  int64_t t, y, x;

  MIXOPS_HD int64_t offset(const Strides& s) const { return t * s.t + y * s.h + x * s.w; }
};

// One program's window and head.
struct Window {
  int64_t b, r0, c0;  // image, first row, first column
  int64_t head;
  int cols, n_real, n_pad;  // real columns, real tokens, padded tokens (ws^2 - n_real; 0 globally)

  // Real token u (< n_real). 32-bit division: u and cols are window-sized.
  MIXOPS_HD Pixel pixel(const Divider& by_h, int u) const {
    Pixel p;
    p.t = by_h.divmod(r0 + u / cols, p.y);
    p.x = c0 + u % cols;
    return p;
  }
  // Element offset of real token u in a [B, T, H, W, .] view of strides s.
  MIXOPS_HD int64_t token(const Geometry& g, int u, const Strides& s) const {
    return b * s.b + pixel(g.by_h, u).offset(s);
  }
  // Index of real token u's statistic (row lse, delta) in a contiguous [B, R, W, heads] tensor.
  MIXOPS_HD int64_t stat(const Geometry& g, int u) const {
    return ((b * g.R + r0 + u / cols) * g.W + c0 + u % cols) * g.heads + head;
  }
};

MIXOPS_HD Window window_of(const Geometry& g, int64_t program) {
  const int64_t win = program / g.heads, per_image = g.windows(), n_wc = g.windows_per_row();
  const int64_t in_image = win % per_image;
  Window w;
  w.b = win / per_image;
  w.head = program % g.heads;
  w.r0 = in_image / n_wc * g.wr;
  w.c0 = in_image % n_wc * g.wc;
  const int64_t rows = g.R - w.r0 < g.wr ? g.R - w.r0 : g.wr;
  const int64_t cols = g.W - w.c0 < g.wc ? g.W - w.c0 : g.wc;
  w.cols = static_cast<int>(cols);
  w.n_real = static_cast<int>(rows * cols);
  w.n_pad = static_cast<int>(g.wr * g.wc - rows * cols);
  return w;
}

// The channel offset (within 3C) of slot 0 (q), 1 (k) or 2 (v) of a head.
MIXOPS_HD int64_t channel(const Geometry& g, int slot, int64_t head) { return slot * g.C + head * g.d; }

// What every kernel reads and writes (T: the storage type, AccT its accumulator type). Views are
// [B, T, H, W, X] of any strides; statistics [B, R, W, heads] contiguous.
template <typename T>
struct Args {
  using AccT = Acc<T>;
  Geometry g;
  const T* qkv;  // [.., 3C]: q, k, v of head h at channels h*d, C + h*d, 2C + h*d
  Strides sq;
  int vec_q;         // the cp.async run of qkv's head channels (gemm::vector_width)
  const T* bias;     // [3C] qkv_bias (stride s_bias), read when virtual_key
  int64_t s_bias;
  bool virtual_key;  // "bias" padding of a windowed op: edge windows get the virtual key
  AccT scale;
  T* out;  // forward: [.., C]
  Strides so;
  AccT* lse;  // forward writes it, the backward kernels read it
  const T* dout;  // backward: [.., C] dOut
  Strides sd;
  int vec_d;
  const AccT* delta;  // rowsum(dOut * out)
  T* dqkv;            // [.., 3C]; nullptr: dQ not stored (only the bias gradient is needed)
  Strides sg;
  AccT* virtual_grads;  // [programs, query blocks, 2, d] zero-filled: the virtual key's dk, dv; nullptr: not needed
};

// ---------------------------------------------------------------------------------------------
// Row math (AccT: float, or double for fp64 storage)
// ---------------------------------------------------------------------------------------------

template <typename AccT>
MIXOPS_HD AccT negative_infinity() {
  return -std::numeric_limits<AccT>::infinity();
}

// The virtual key's logit: scale * q.b_k + ln(n_pad); -inf (no key) without padding or when
// padded keys are masked.
template <typename AccT>
MIXOPS_HD AccT virtual_logit(AccT scaled_q_dot_bk, int n_pad, bool virtual_key) {
  return virtual_key && n_pad > 0 ? scaled_q_dot_bk + std::log(static_cast<AccT>(n_pad)) : negative_infinity<AccT>();
}

// A query row's online softmax (FlashAttention's running max m and sum l over the key blocks).
// Every key block holds at least one real key (blocks start below n_real), so m is finite after
// the first block and exp(m - m_new) never sees -inf - (-inf).
template <typename AccT>
struct OnlineSoftmax {
  AccT m = negative_infinity<AccT>(), l = 0;

  // Moves the running max to include `block_max`; returns the factor the row's running output
  // and sum are scaled by.
  MIXOPS_HD AccT rescale(AccT block_max) {
    const AccT m_new = m > block_max ? m : block_max;
    const AccT alpha = std::exp(m - m_new);
    m = m_new;
    l *= alpha;
    return alpha;
  }
  // The weight of one logit under the current max (added to l by the caller's block sum).
  MIXOPS_HD AccT weight(AccT logit) const { return std::exp(logit - m); }
  MIXOPS_HD AccT lse() const { return m + std::log(l); }
};

// The softmax backward of one logit s with probability p = exp(s - lse): dS = p * (dP - delta),
// delta = rowsum(dOut * out). Padded keys and query rows have p = 0.
template <typename AccT>
MIXOPS_HD AccT probability(AccT logit, AccT lse, bool valid) {
  return valid ? std::exp(logit - lse) : AccT(0);
}

// The query and key blocks of the kernels for a storage dtype (window_attention_kernels.cuh
// AttentionTile): 64 tokens, 32 for fp64 (its 8-byte tiles). The CPU emulation blocks the same
// way, so the virtual key's partials are laid out alike.
template <typename T>
inline constexpr int kBlockTokens = sizeof(T) == 8 ? 32 : 64;

}  // namespace mixops::window_attention
