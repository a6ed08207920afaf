// Per-element math of ActiveMLP's ATM gather (docs/atm.md sections 3-4), shared by
// the CUDA kernels (atm.cu) and the CPU emulation (atm_cpu.cpp), so the position, corner, zero-
// padding and gradient rules that the GPU runs are the ones the CPU tests verify. They are the
// Triton kernel's rules (kernels/atm.py: sample_position, _corner_values, the backward walk).
//
// A *line* is one row (axis "w") or one column (axis "h") of one image, n positions long; the
// sample at position q with offset o is  lerp0(v, q + o),  lerp0(v, p) = (1-f)·V(k) + f·V(k+1),
// k = floor(p), f = p - k, V(t) = v[t] for 0 <= t < n and 0 outside (zero padding).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace mixops::atm {

// The two corners of a sample: V(k) weighs 1-f, V(k+1) weighs f.
template <typename acc_t>
struct Corners {
  int64_t k;
  acc_t f;
};

// Corners of position p on a line of n. Outside [-2, n] both corners are out of range whatever
// the clamp does, and the clamp keeps the integer conversion defined for huge (or inf) offsets.
// fmin/fmax return the number when given a NaN, so a NaN offset samples at -2, i.e. gives 0,
// as the Triton kernel's minimum/maximum do.
template <typename acc_t>
MIXOPS_HD Corners<acc_t> corners(acc_t p, int64_t n) {
  acc_t kf;
  if constexpr (std::is_same_v<acc_t, float>) {
    p = fminf(fmaxf(p, -2.f), static_cast<float>(n));
    kf = floorf(p);
  } else {
    p = fmin(fmax(p, acc_t(-2)), static_cast<acc_t>(n));
    kf = floor(p);
  }
  return {static_cast<int64_t>(kf), p - kf};
}

// Corners of the sample at position q of its line, offset o (both in the compute type: positions
// are fp32 even for fp16/bf16 storage, whose resolution is ~1/32 px at p ~ 32-64).
template <typename acc_t>
MIXOPS_HD Corners<acc_t> sample_corners(int64_t q, acc_t o, int64_t n) {
  return corners<acc_t>(static_cast<acc_t>(q) + o, n);
}

MIXOPS_HD bool on_line(int64_t t, int64_t n) { return t >= 0 && t < n; }

// V(t): the line's value at t, or 0 outside. `load(t)` is only called for 0 <= t < n.
template <typename acc_t, typename Load>
MIXOPS_HD acc_t value_at(const Load& load, int64_t t, int64_t n) {
  return on_line(t, n) ? static_cast<acc_t>(load(t)) : acc_t(0);
}

// The forward value. An exact integer position (f = 0) returns V(k) exactly.
template <typename acc_t>
MIXOPS_HD acc_t lerp(acc_t v0, acc_t v1, acc_t f) {
  return (acc_t(1) - f) * v0 + f * v1;
}

// lerp0(line, q + o).
template <typename acc_t, typename Load>
MIXOPS_HD acc_t sample(const Load& load, int64_t q, acc_t o, int64_t n) {
  const Corners<acc_t> s = sample_corners<acc_t>(q, o, n);
  return lerp(value_at<acc_t>(load, s.k, n), value_at<acc_t>(load, s.k + 1, n), s.f);
}

// d lerp0 / dp = V(k+1) - V(k), floor-based (torchvision's get_coordinate_weight): the right-hand
// slope at integers, x[0] at p = -1, and 0 for p < -1 and p >= n (both corners outside).
template <typename acc_t, typename Load>
MIXOPS_HD acc_t slope(const Load& load, const Corners<acc_t>& s, int64_t n) {
  return value_at<acc_t>(load, s.k + 1, n) - value_at<acc_t>(load, s.k, n);
}

// Owner-computes backward of one line for one offset group of `share` channels (docs/atm.md section 12.6
// option 1): walks the positions q = 0..n-1 in this fixed order, so the result is bit-identical
// run to run, with no atomics:
//   goff(q) = sum over the group's channels s = 0..share-1 (in order) of g(q,s)·slope, and
//   gX(t, s) += g·(1-f) at t = k and g·f at t = k+1, for in-range targets only.
// Every contribution stays on its own line and group, so the caller's accumulator `add_gx(t, s,
// value)` is private to it. Callables:
//   offset(q) -> acc_t;  grad(q, s) -> acc_t;  x(s) -> a Load for channel s: load(t) -> value;
//   store_goff(q, acc_t);  add_gx(t, s, acc_t).
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename acc_t, bool kNeedGx, bool kNeedGoff, typename Offset, typename Grad, typename X,
          typename StoreGoff, typename AddGx>
MIXOPS_HD void backward_line(int64_t n, int64_t share, const Offset& offset, const Grad& grad, const X& x,
                             const StoreGoff& store_goff, const AddGx& add_gx) {
  for (int64_t q = 0; q < n; ++q) {
    const Corners<acc_t> s = sample_corners<acc_t>(q, offset(q), n);
    acc_t gsum = 0;
    for (int64_t c = 0; c < share; ++c) {
      const acc_t g = grad(q, c);
      if constexpr (kNeedGoff) {
        gsum += g * slope<acc_t>(x(c), s, n);
      }
      if constexpr (kNeedGx) {
        if (on_line(s.k, n)) add_gx(s.k, c, g * (acc_t(1) - s.f));
        if (on_line(s.k + 1, n)) add_gx(s.k + 1, c, g * s.f);
      }
    }
    if constexpr (kNeedGoff) {
      store_goff(q, gsum);
    }
  }
}

}  // namespace mixops::atm
