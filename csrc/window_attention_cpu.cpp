// CPU build of mixops::_window_attention_cuda (+ _backward): the same host functions
// (window_attention.h), window map and row math (window_attention_map.cuh) as the CUDA build, with
// each kernel's blocks (window, head, query or key block, in the launch's grid) run as plain loops:
// the online softmax over the key blocks of kBlockTokens tokens, the virtual key, the saved lse,
// the dK/dV and dQ formulas and the virtual key's partials laid out as the query-gradient kernel
// writes them. What it does not run is the kernels' copies and MMAs (P is not rounded to the
// storage type before P V, as the GPU's tiles do: the tests compare within the dtype's tolerance).
// Not meant to be fast.
#include <torch/library.h>

#include <vector>

#include "gemm/host_engine.h"
#include "window_attention.h"

namespace mixops::window_attention {
namespace {

struct HostAttention : gemm::HostRunner {
  // One program's (window's, head's) tokens of one slot as accumulator-typed rows [n_real, d].
  template <typename T>
  static std::vector<Acc<T>> rows(const T* data, const Strides& s, const Geometry& g, const Window& w, int slot) {
    std::vector<Acc<T>> r(static_cast<size_t>(w.n_real) * g.d);
    for (int u = 0; u < w.n_real; ++u)
      for (int64_t e = 0; e < g.d; ++e)
        r[u * g.d + e] = static_cast<Acc<T>>(data[w.token(g, u, s) + (channel(g, slot, w.head) + e) * s.c]);
    return r;
  }
  template <typename AccT>
  static AccT dot(const AccT* x, const AccT* y, int64_t d) {
    AccT sum = 0;
    for (int64_t e = 0; e < d; ++e) sum += x[e] * y[e];
    return sum;
  }
  template <typename T>
  static std::vector<Acc<T>> bias_slot(const Args<T>& a, const Window& w, int slot) {
    std::vector<Acc<T>> b(a.g.d, 0);
    if (a.virtual_key)
      for (int64_t e = 0; e < a.g.d; ++e) b[e] = static_cast<Acc<T>>(a.bias[(channel(a.g, slot, w.head) + e) * a.s_bias]);
    return b;
  }

  template <bool, typename T>
  static void forward(const Args<T>& a) {
    using AccT = Acc<T>;
    const Geometry& g = a.g;
    constexpr int kBK = kBlockTokens<T>;
    for (int64_t p = 0; p < g.programs(); ++p) {
      const Window w = window_of(g, p);
      const auto q = rows(a.qkv, a.sq, g, w, 0), k = rows(a.qkv, a.sq, g, w, 1), v = rows(a.qkv, a.sq, g, w, 2);
      const auto bk = bias_slot(a, w, 1), bv = bias_slot(a, w, 2);
      for (int u = 0; u < w.n_real; ++u) {
        const AccT* qu = &q[u * g.d];
        OnlineSoftmax<AccT> softmax;
        std::vector<AccT> o(g.d, 0);
        for (int k0 = 0; k0 < w.n_real; k0 += kBK) {  // the kernel's key blocks
          const int k1 = std::min(k0 + kBK, w.n_real);
          AccT block_max = negative_infinity<AccT>();
          for (int j = k0; j < k1; ++j) block_max = std::max(block_max, a.scale * dot(qu, &k[j * g.d], g.d));
          const AccT rescale = softmax.rescale(block_max);
          for (auto& x : o) x *= rescale;
          for (int j = k0; j < k1; ++j) {
            const AccT pj = softmax.weight(a.scale * dot(qu, &k[j * g.d], g.d));
            softmax.l += pj;
            for (int64_t e = 0; e < g.d; ++e) o[e] += pj * v[j * g.d + e];
          }
        }
        const AccT s_v = virtual_logit(a.scale * dot(qu, bk.data(), g.d), w.n_pad, a.virtual_key);
        const AccT rescale = softmax.rescale(s_v);
        const AccT p_v = softmax.weight(s_v);
        softmax.l += p_v;
        const int64_t at = w.token(g, u, a.so) + channel(g, 0, w.head) * a.so.c;
        for (int64_t e = 0; e < g.d; ++e) a.out[at + e * a.so.c] = static_cast<T>((o[e] * rescale + p_v * bv[e]) / softmax.l);
        a.lse[w.stat(g, u)] = softmax.lse();
      }
    }
  }

  // What both backward kernels read of a program: q, k, v, dOut rows, lse and delta per token.
  template <typename T>
  struct Saved {
    std::vector<Acc<T>> q, k, v, dout, lse, delta;
    Saved(const Args<T>& a, const Window& w)
        : q(rows(a.qkv, a.sq, a.g, w, 0)), k(rows(a.qkv, a.sq, a.g, w, 1)), v(rows(a.qkv, a.sq, a.g, w, 2)),
          dout(rows(a.dout, a.sd, a.g, w, 0)), lse(w.n_real), delta(w.n_real) {
      for (int u = 0; u < w.n_real; ++u) {
        lse[u] = a.lse[w.stat(a.g, u)];
        delta[u] = a.delta[w.stat(a.g, u)];
      }
    }
    // P and dS of query u and key j
    void softmax_grad(const Args<T>& a, int u, int j, Acc<T>& p, Acc<T>& ds) const {
      const int64_t d = a.g.d;
      p = probability(a.scale * dot(&q[u * d], &k[j * d], d), lse[u], true);
      ds = p * (dot(&dout[u * d], &v[j * d], d) - delta[u]);
    }
  };

  template <bool, typename T>
  static void key_grad(const Args<T>& a) {
    using AccT = Acc<T>;
    const Geometry& g = a.g;
    for (int64_t p = 0; p < g.programs(); ++p) {
      const Window w = window_of(g, p);
      const Saved<T> s(a, w);
      for (int j = 0; j < w.n_real; ++j) {
        std::vector<AccT> dk(g.d, 0), dv(g.d, 0);
        for (int u = 0; u < w.n_real; ++u) {
          AccT pr, ds;
          s.softmax_grad(a, u, j, pr, ds);
          for (int64_t e = 0; e < g.d; ++e) {
            dv[e] += pr * s.dout[u * g.d + e];
            dk[e] += ds * s.q[u * g.d + e];
          }
        }
        const int64_t at = w.token(g, j, a.sg);
        for (int64_t e = 0; e < g.d; ++e) {
          a.dqkv[at + (channel(g, 1, w.head) + e) * a.sg.c] = static_cast<T>(dk[e] * a.scale);
          a.dqkv[at + (channel(g, 2, w.head) + e) * a.sg.c] = static_cast<T>(dv[e]);
        }
      }
    }
  }

  template <bool, typename T>
  static void query_grad(const Args<T>& a) {
    using AccT = Acc<T>;
    const Geometry& g = a.g;
    constexpr int kBQ = kBlockTokens<T>;
    const int64_t blocks = query_blocks<T>(g);
    for (int64_t p = 0; p < g.programs(); ++p) {
      const Window w = window_of(g, p);
      const Saved<T> s(a, w);
      const auto bk = bias_slot(a, w, 1), bv = bias_slot(a, w, 2);
      for (int q0 = 0; q0 < w.n_real; q0 += kBQ) {  // the kernel's query blocks
        std::vector<AccT> part(2 * g.d, 0);
        for (int u = q0; u < std::min(q0 + kBQ, w.n_real); ++u) {
          std::vector<AccT> dq(g.d, 0);
          for (int j = 0; j < w.n_real; ++j) {
            AccT pr, ds;
            s.softmax_grad(a, u, j, pr, ds);
            for (int64_t e = 0; e < g.d; ++e) dq[e] += ds * s.k[j * g.d + e];
          }
          const AccT s_v = virtual_logit(a.scale * dot(&s.q[u * g.d], bk.data(), g.d), w.n_pad, a.virtual_key);
          const AccT p_v = probability(s_v, s.lse[u], a.virtual_key);
          const AccT ds_v = p_v * (dot(&s.dout[u * g.d], bv.data(), g.d) - s.delta[u]);
          for (int64_t e = 0; e < g.d; ++e) {
            part[e] += ds_v * s.q[u * g.d + e];
            part[g.d + e] += p_v * s.dout[u * g.d + e];
          }
          if (a.dqkv != nullptr) {
            const int64_t at = w.token(g, u, a.sg) + channel(g, 0, w.head) * a.sg.c;
            for (int64_t e = 0; e < g.d; ++e) a.dqkv[at + e * a.sg.c] = static_cast<T>((dq[e] + ds_v * bk[e]) * a.scale);
          }
        }
        if (a.virtual_grads != nullptr && w.n_pad > 0) {
          AccT* out = a.virtual_grads + (p * blocks + q0 / kBQ) * 2 * g.d;
          for (int64_t e = 0; e < g.d; ++e) {
            out[e] = part[e] * a.scale;
            out[g.d + e] = part[g.d + e];
          }
        }
      }
    }
  }
};

}  // namespace
}  // namespace mixops::window_attention

TORCH_LIBRARY_IMPL(mixops, CPU, m) {
  using mixops::window_attention::HostAttention;
  m.impl("_window_attention_cuda", &mixops::window_attention::window_attention<HostAttention>);
  m.impl("_window_attention_cuda_backward", &mixops::window_attention::window_attention_backward<HostAttention>);
}
