// The MorphFC chunk index map, shared by the CUDA kernels (morph_fc.cu) and the CPU
// implementation (morph_fc_cpu.cpp) so the CPU tests verify the exact index math the GPU runs.
//
// Every axis of mixops.morph_fc is one GEMM with M rows and F features whose element
// (row, feature) lives at x[b, t, h, w, c] of a strided [B, T, H, W, C] tensor (an image
// [B, H, W, C] is T = 1). The map is the one kernels/morph_fc.py writes in `_row_part`,
// `_feat_part` and `_combine` (tests/test_morph_fc_maps.py holds the two to identical results):
//   spatial axes "w" / "h" / "hs" (L = segment_dim, D = C/L, NCH = H*W/L, F = C, M = B*T*H*W):
//       row = ((b*T + t)*NCH + k)*L + g, feature = p*D + s, c = g*D + s, and the token of
//       (chunk k, position p) is
//           "w":  n = k*L + p on the row-major sequence n = h*W + w
//           "h":  m = k*L + p on the column-major sequence m = w*H + h
//           "hs": n = p*NCH + k (strided chunks) on the row-major sequence
//   temporal axis "t" (G = segment_dim, D = C/G, F = T*D, M = B*H*W*G):
//       row = ((b*H + h)*W + w)*G + g, feature = t*D + s, c = g*D + s.
//
// The offset is split into a row part and a feature part, each computed once per tile row /
// column (the divisions live there), and an element only adds the two: the sequence index is
// seq_row + seq_feat, and each side is already split into the (outer, inner) digits of the
// sequence radix R (W row-major, H column-major), so the sum needs one carry at most.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace mixops {
namespace morph_fc {

enum Axis : int { kAxisW = 0, kAxisH = 1, kAxisHS = 2, kAxisT = 3 };

// Division by each size the map divides by, without the 64-bit division sequence (its CALL in a
// GEMM mainloop makes ptxas save the accumulators around it): common.cuh Divider.
struct Dividers {
  Divider L, W, H, NCH, T, D, R;  // R: the sequence radix (radix() below)
};

// The integer parameters of one call's map; the same for every tensor the call touches.
struct Geometry {
  int axis;
  int64_t M;    // GEMM rows
  int64_t F;    // GEMM features (= the FC width)
  int64_t T, H, W;
  int64_t L;    // chunk length (spatial) or channel-group count G ("t")
  int64_t D;    // channels per group
  int64_t NCH;  // chunks per frame H*W/L (spatial); 1 for "t"
  Dividers div;  // by the sizes above (with_dividers)
};

// Strides (in elements) of one [B, T, H, W, C] tensor.
struct Strides {
  int64_t b, t, h, w, c;
};

// One side of an element offset: `off` is its share of the offset, `inner` its inner digit of
// the sequence (0 on the temporal axis, which has no sequence).
struct Part {
  int64_t off;
  int32_t inner;  // < the radix R (H or W): 32 bits, one register less per share the GEMMs keep
};

// The sequence radix and the strides of its outer / inner digit: the row-major sequence
// h*W + w for "w" and "hs", the column-major w*H + h for "h".
MIXOPS_HD int64_t radix(const Geometry& g) { return g.axis == kAxisH ? g.H : g.W; }
MIXOPS_HD int64_t outer_stride(const Geometry& g, const Strides& s) { return g.axis == kAxisH ? s.w : s.h; }
MIXOPS_HD int64_t inner_stride(const Geometry& g, const Strides& s) { return g.axis == kAxisH ? s.h : s.w; }

// g with its dividers set (after the sizes are).
// (a zero size, e.g. an empty frame, divides nothing: M = 0)
inline Geometry with_dividers(Geometry g) {
  const auto by = [](int64_t d) { return Divider(d > 1 ? d : 1); };
  g.div = {by(g.L), by(g.W), by(g.H), by(g.NCH), by(g.T), by(g.D), by(radix(g))};
  return g;
}

MIXOPS_HD Part row_part(const Geometry& g, const Strides& s, int64_t row) {
  int64_t grp, k, t, w, h, inner;
  int64_t r = g.div.L.divmod(row, grp);
  if (g.axis == kAxisT) {
    r = g.div.W.divmod(r, w);
    const int64_t b = g.div.H.divmod(r, h);
    return {b * s.b + h * s.h + w * s.w + grp * g.D * s.c, 0};
  }
  r = g.div.NCH.divmod(r, k);
  const int64_t b = g.div.T.divmod(r, t);
  const int64_t seq = g.axis == kAxisHS ? k : k * g.L;
  const int64_t outer = g.div.R.divmod(seq, inner);
  return {b * s.b + t * s.t + grp * g.D * s.c + outer * outer_stride(g, s) + inner * inner_stride(g, s),
          static_cast<int32_t>(inner)};
}

MIXOPS_HD Part feature_part(const Geometry& g, const Strides& s, int64_t feature) {
  int64_t ch, inner;
  const int64_t q = g.div.D.divmod(feature, ch);  // position p in the chunk, or frame t
  if (g.axis == kAxisT) return {q * s.t + ch * s.c, 0};
  const int64_t seq = g.axis == kAxisHS ? q * g.NCH : q;
  const int64_t outer = g.div.R.divmod(seq, inner);
  return {outer * outer_stride(g, s) + inner * inner_stride(g, s) + ch * s.c, static_cast<int32_t>(inner)};
}

// The inner digits sum to < 2R: a carry is one outer step forward and R inner steps back.
MIXOPS_HD int64_t combine(const Geometry& g, const Strides& s, Part row, Part feature) {
  const int64_t off = row.off + feature.off;
  if (g.axis == kAxisT) return off;
  const int64_t R = radix(g);
  return row.inner + feature.inner >= R ? off + outer_stride(g, s) - R * inner_stride(g, s) : off;
}

MIXOPS_HD int64_t element_offset(const Geometry& g, const Strides& s, int64_t row, int64_t feature) {
  return combine(g, s, row_part(g, s, row), feature_part(g, s, feature));
}

}  // namespace morph_fc
}  // namespace mixops
