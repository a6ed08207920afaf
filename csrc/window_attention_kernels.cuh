// UniFormer's windowed / global attention on the GPU (mixops::_window_attention_cuda): three
// kernels in the FlashAttention-2 plan, each block one (window, head) program and one block of
// its query or key tokens (window_attention_map.cuh: the map and the row math; docs/
// window_attention.md section 7).
//
//   forward_kernel     out and the row log-sum-exp of a query block: S = Q K^T per key block,
//                      online softmax, O += P V, then the virtual key (edge windows, "bias"
//                      padding) and the normalisation;
//   key_grad_kernel    dK, dV of a key block over every query block (P^T from the saved lse,
//                      dS^T = P^T (dP^T - delta)), into the k and v slots of dqkv;
//   query_grad_kernel  dQ of a query block over every key block (+ the virtual key's share), into
//                      the q slots; with "bias" padding also the block's partial of the virtual
//                      key's dk, dv (the qkv_bias gradient, summed by the host in a fixed order).
// Every output element has one owning block: no atomics, deterministic.
//
// Why fused: the official block pads, partitions and reverses the map (copies of [B, H, W, C],
// larger by the padded tokens) and writes and reads the [n, n] scores of every window and head;
// here HBM sees q, k, v once per query block (K/V re-read from L2 by the window's other query
// blocks) and out once, and no score matrix at all. At UniFormer-S stage 3 for ADE20K (32 x 32
// at ws 14: windows of 196, 56 and 16 real tokens) the official padded map has 42 x 42 tokens,
// 1.72x the real ones this reads.
//
// The math: the tiles of the shared GEMM engine (gemm/tiles.cuh) name the MMAs -- mma.sync
// m16n8k16 for fp16/bf16 (on sm_90a too: these GEMMs are 64 x 64 x d, too small for a warpgroup
// pipeline), TF32 mma.sync where torch allows TF32, FMAs in the accumulator type for IEEE fp32 and
// fp64 -- and gemm/mma_from_shared.cuh runs them from shared tiles, ldmatrix(.trans) reading the
// transposed views (V^T, dOut^T, Q^T, K^T) of the K-major token tiles. The token tiles come in by
// the engine's tile loader (cp.async, 16-byte chunks of a head's d channels, zero-filled past the
// window's real tokens and past d), double-buffered along the streamed blocks where shared memory
// allows (kStages).
#pragma once

#include <cute/tensor.hpp>

#include <cstddef>
#include <type_traits>

#include "gemm/mma_from_shared.cuh"
#include "gemm/tile_loader.cuh"
#include "gemm/tiles.cuh"
#include "window_attention_map.cuh"

namespace mixops::window_attention {

// One head's channels of a window's tokens as a K-major operand of the engine's tile loader
// (gemm/operands.cuh): row u is real token u (its Pixel, the shares two tensors over the same
// tokens use alike), k the channel within the head.
template <typename T>
struct HeadTokens {
  using Element = T;
  using Row = Pixel;
  using Col = int64_t;
  static constexpr gemm::Major kMajor = gemm::Major::K;
  static constexpr bool kComputed = false;
  const T* data;  // the image's first element of the head's first channel
  int vec;
  Strides s;
  Window w;
  Divider by_h;

  __device__ Pixel row(int64_t u) const { return w.pixel(by_h, static_cast<int>(u)); }
  __device__ int64_t col(int64_t k) const { return k * s.c; }
  __device__ int64_t offset(const Pixel& p, int64_t c) const { return p.offset(s) + c; }
};

template <typename T>
__device__ HeadTokens<T> head_tokens(const T* data, const Strides& s, int vec, const Geometry& g, const Window& w,
                                     int slot) {
  return {data + w.b * s.b + channel(g, slot, w.head) * s.c, vec, s, w, g.by_h};
}

// A kernel's tiles: the engine tile `Math` (MMAs, shared layouts, S2R atoms), kDP the head dim
// padded to a multiple of 32 (32, 64 or 128), kStages 2 (the streamed block's tiles double-
// buffered) or 1 (devices whose shared memory holds one).
template <class MathTile, int kDPN, int kStagesN>
struct Config {
  using Math = MathTile;
  using E = typename Math::Element;
  using SmemT = typename Math::SmemT;
  using AccT = Acc<E>;
  using TiledMma = typename Math::template TiledMma<gemm::Major::K, gemm::Major::K>;
  static constexpr int kBQ = kBlockTokens<E>, kBK = kBQ, kDP = kDPN, kStages = kStagesN, kThreads = 256;
  // the threads of one row of a [kBQ, *] tile in the row passes (consecutive lanes of one warp)
  static constexpr int kRowLanes = kThreads / kBQ;
  template <int kRows, int kCols>
  using Smem = decltype(gemm::tiles_detail::smem_layout<SmemT, gemm::Major::K, kRows, kCols, 1>());
  using Loader = gemm::TileLoader<HeadTokens<E>, kBQ, kDP, kThreads>;
};

// ---------------------------------------------------------------------------------------------
// Block helpers
// ---------------------------------------------------------------------------------------------

// A shared [kRows, kCols] tile of SmemT (one buffer of a token tile, a P or dS tile).
template <class Cfg, int kRows, int kCols>
__device__ auto smem_tile(unsigned char* base) {
  return cute::make_tensor(cute::make_smem_ptr(reinterpret_cast<typename Cfg::SmemT*>(base)),
                           typename Cfg::template Smem<kRows, kCols>{})(cute::_, cute::_, 0);
}
template <class Cfg, int kRows, int kCols>
constexpr size_t smem_tile_bytes() {
  return cute::cosize_v<typename Cfg::template Smem<kRows, kCols>> * sizeof(typename Cfg::SmemT);
}

// The transposed view [kCols, kRows] of a K-major tile: contiguous along its rows (V^T as the B
// operand of P V, Q^T of dS^T Q), read by ldmatrix.trans.
template <class Tile>
__device__ auto transposed(const Tile& t) {
  using namespace cute;
  // (composition, not select: the swizzled layouts are composed ones; view(i, j) = t(j, i))
  return make_tensor(t.data(), composition(t.layout(), make_layout(make_shape(size<1>(t), size<0>(t)), GenRowMajor{})));
}

// An [kRows, kCols] accumulator tile in shared memory (row stride kCols + 4: the MMA fragments'
// rows land in different banks), as the engine's epilogue stages its tile.
template <typename AccT, int kRows, int kCols>
__device__ auto acc_tile(unsigned char* base) {
  using namespace cute;
  return make_tensor(make_smem_ptr(reinterpret_cast<AccT*>(base)),
                     make_layout(Shape<Int<kRows>, Int<kCols>>{}, Stride<Int<kCols + 4>, _1>{}));
}

// v reduced over the kLanes consecutive lanes of a row group (xor butterfly: every lane gets it).
template <int kLanes, typename V, class Op>
__device__ __forceinline__ V row_reduce(V v, Op op) {
#pragma unroll
  for (int o = kLanes / 2; o > 0; o /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Streams `count` blocks of a window's tokens through kStages shared buffers: fill(j, stage)
// computes block j's row shares (and statistics) into the stage, issue(j, stage) starts its
// cp.async copies, body(j, stage) consumes it. With two stages block j+1 is copied while block j
// is computed. The barrier closing each step frees the stage's shares and buffers for block j+2.
template <int kStages, class Fill, class Issue, class Body>
__device__ __forceinline__ void stream_blocks(int count, const Fill& fill, const Issue& issue, const Body& body) {
  fill(0, 0);
  __syncthreads();
  issue(0, 0);
  cute::cp_async_fence();
  for (int j = 0; j < count; ++j) {
    const int stage = j % kStages;
    if constexpr (kStages == 2)
      if (j + 1 < count) fill(j + 1, (j + 1) % 2);
    cute::cp_async_wait<0>();
    __syncthreads();  // block j landed, block j+1's shares are published, block j-1 is done
    if constexpr (kStages == 2) {
      if (j + 1 < count) issue(j + 1, (j + 1) % 2);
      cute::cp_async_fence();
    }
    body(j, stage);
    __syncthreads();
    if constexpr (kStages == 1) {
      if (j + 1 < count) {
        fill(j + 1, 0);
        __syncthreads();
        issue(j + 1, 0);
        cute::cp_async_fence();
      }
    }
  }
}

// The K (which = 0) or V (1) tile of a stage of the streamed key blocks (a Plan's kK, kV).
template <class Cfg, class Plan>
__device__ auto key_tile(unsigned char* smem, int stage, int which) {
  return smem_tile<Cfg, Cfg::kBK, Cfg::kDP>(smem + (which == 0 ? Plan::kK : Plan::kV) + stage * Plan::kTokenTile);
}

// The forward's and dQ's stream: the window's key blocks, K and V over one set of row shares per
// stage, body(j, stage) per block (stream_blocks).
template <class Cfg, class Plan, class Body>
__device__ __forceinline__ void stream_key_blocks(const Args<typename Cfg::E>& a, const Window& w, unsigned char* smem,
                                                  Pixel* shares, const Body& body) {
  using Loader = typename Cfg::Loader;
  constexpr int kBK = Cfg::kBK;
  // (operands are built where they are used: held across the loop, their strides and dividers
  // took ~100 registers)
  const auto tokens = [&](int slot) { return head_tokens(a.qkv, a.sq, a.vec_q, a.g, w, slot); };
  const auto fill = [&](int j, int stage) { Loader::fill_shares(tokens(1), j * kBK, w.n_real, shares + stage * kBK); };
  const auto issue = [&](int j, int stage) {
    const typename Loader::SharesFilled filled;
    Loader(tokens(1), j * kBK, w.n_real, shares + stage * kBK, filled).write(key_tile<Cfg, Plan>(smem, stage, 0), 0, a.g.d);
    Loader(tokens(2), j * kBK, w.n_real, shares + stage * kBK, filled).write(key_tile<Cfg, Plan>(smem, stage, 1), 0, a.g.d);
  };
  stream_blocks<Cfg::kStages>(static_cast<int>(cdiv(w.n_real, kBK)), fill, issue, body);
}

// Σ_e tile(r, e) * vec[e] for row r of a [kBQ, kDP] token tile, by the row's kRowLanes lanes
// (every lane gets it): q.b_k and dOut.b_v of the virtual key.
template <class Cfg, class Tile>
__device__ typename Cfg::AccT row_dot(const Tile& tile, int r, const typename Cfg::AccT* vec, int part) {
  using AccT = typename Cfg::AccT;
  AccT sum = 0;
  for (int e = part; e < Cfg::kDP; e += Cfg::kRowLanes) sum += static_cast<AccT>(tile(r, e)) * vec[e];
  return row_reduce<Cfg::kRowLanes>(sum, [](AccT a, AccT b) { return a + b; });
}

// The virtual key's b_k and b_v of the program's head into shared [2, kDP] (zeros past d, and
// everywhere without the virtual key).
template <class Cfg>
__device__ void load_virtual_key(const Args<typename Cfg::E>& a, const Window& w, typename Cfg::AccT* bias) {
  using AccT = typename Cfg::AccT;
  for (int e = threadIdx.x; e < 2 * Cfg::kDP; e += Cfg::kThreads) {
    const int slot = 1 + e / Cfg::kDP, c = e % Cfg::kDP;
    bias[e] = a.virtual_key && c < a.g.d ? static_cast<AccT>(a.bias[(channel(a.g, slot, w.head) + c) * a.s_bias])
                                         : AccT(0);
  }
}

// The saved lse and delta of query tokens u0 .. u0 + kBQ into shared memory (0 past the window).
template <class Cfg>
__device__ void load_row_stats(const Args<typename Cfg::E>& a, const Window& w, int u0, typename Cfg::AccT* lse,
                               typename Cfg::AccT* delta) {
  for (int r = threadIdx.x; r < Cfg::kBQ; r += Cfg::kThreads) {
    const bool ok = u0 + r < w.n_real;
    lse[r] = ok ? a.lse[w.stat(a.g, u0 + r)] : typename Cfg::AccT(0);
    delta[r] = ok ? a.delta[w.stat(a.g, u0 + r)] : typename Cfg::AccT(0);
  }
}

// Writes a [kRows, kDP] accumulator tile (staged in shared memory) to channels `channel0 + e` (e <
// d) of the real tokens u0 + r of the window, value(r, e, v) applied on the way: consecutive
// threads on consecutive channels.
template <class Cfg, int kRows, class Staged, class Value>
__device__ void store_rows(const Staged& staged, typename Cfg::E* out, const Strides& s, const Geometry& g,
                           const Window& w, int u0, int64_t channel0, const Value& value) {
  static_assert(Cfg::kThreads % Cfg::kDP == 0);
  const int e = threadIdx.x % Cfg::kDP;
  if (e >= g.d) return;
  for (int r = threadIdx.x / Cfg::kDP; r < kRows && u0 + r < w.n_real; r += Cfg::kThreads / Cfg::kDP)
    out[w.token(g, u0 + r, s) + (channel0 + e) * s.c] = static_cast<typename Cfg::E>(value(r, e, staged(r, e)));
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <class Cfg>
struct ForwardSmem {
  static constexpr int kBQ = Cfg::kBQ, kBK = Cfg::kBK, kDP = Cfg::kDP;
  using AccT = typename Cfg::AccT;
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = kQ + smem_tile_bytes<Cfg, kBQ, kDP>();
  static constexpr size_t kTokenTile = smem_tile_bytes<Cfg, kBK, kDP>();
  static constexpr size_t kV = kK + Cfg::kStages * kTokenTile;
  static constexpr size_t kP = kV + Cfg::kStages * kTokenTile;
  // the scores [kBQ, kBK], and at the end the output tile [kBQ, kDP]
  static constexpr size_t kS = kP + smem_tile_bytes<Cfg, kBQ, kBK>();
  static constexpr int kStagedCols = kBK > kDP ? kBK : kDP;
  static constexpr size_t kRowStats = kS + kBQ * (kStagedCols + 4) * sizeof(AccT);
  // per query row: the running rescale, the virtual key's weight, 1 / l, scale * q.b_k
  static constexpr size_t kBias = kRowStats + 4 * kBQ * sizeof(AccT);  // b_k, b_v [2, kDP]
  static constexpr size_t kShares = kBias + 2 * kDP * sizeof(AccT);    // Q's, then K/V's per stage
  static constexpr size_t kBytes = kShares + (1 + Cfg::kStages) * kBQ * sizeof(Pixel);
};

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) forward_kernel(Args<typename Cfg::E> a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // cp.async and the tensor-core tiles: sm_80 or newer (the host checks)
#else
  using namespace cute;
  using E = typename Cfg::E;
  using AccT = typename Cfg::AccT;
  using SmemT = typename Cfg::SmemT;
  using Plan = ForwardSmem<Cfg>;
  constexpr int kBQ = Cfg::kBQ, kBK = Cfg::kBK, kDP = Cfg::kDP, kLanes = Cfg::kRowLanes;
  const Geometry& g = a.g;
  const Window w = window_of(g, blockIdx.x);
  const int q0 = static_cast<int>(blockIdx.y) * kBQ;
  if (q0 >= w.n_real) return;  // query blocks past a small edge window: nothing to do (whole block)

  extern __shared__ __align__(128) unsigned char smem[];
  const auto sQ = smem_tile<Cfg, kBQ, kDP>(smem + Plan::kQ);
  const auto sP = smem_tile<Cfg, kBQ, kBK>(smem + Plan::kP);
  const auto sS = acc_tile<AccT, kBQ, kBK>(smem + Plan::kS);
  AccT* alpha = reinterpret_cast<AccT*>(smem + Plan::kRowStats);
  AccT* p_virtual = alpha + kBQ;
  AccT* inv_l = p_virtual + kBQ;
  AccT* qb = inv_l + kBQ;
  AccT* bk = reinterpret_cast<AccT*>(smem + Plan::kBias);
  AccT* bv = bk + kDP;
  Pixel* shares_q = reinterpret_cast<Pixel*>(smem + Plan::kShares);
  Pixel* shares_k = shares_q + kBQ;

  const auto qkv_tokens = [&](int slot) { return head_tokens(a.qkv, a.sq, a.vec_q, g, w, slot); };
  using Loader = typename Cfg::Loader;
  Loader::fill_shares(qkv_tokens(0), q0, w.n_real, shares_q);
  load_virtual_key<Cfg>(a, w, bk);
  __syncthreads();
  Loader(qkv_tokens(0), q0, w.n_real, shares_q, typename Loader::SharesFilled{}).write(sQ, 0, g.d);
  // (Q joins the first key block's copy group below)

  typename Cfg::TiledMma mma;
  auto thr_mma = mma.get_slice(threadIdx.x);
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kBQ>, Int<kDP>>{});
  clear(acc_o);
  const Tensor o_coords = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBQ>, Int<kDP>>{}));
  const int row = threadIdx.x / kLanes, part = threadIdx.x % kLanes;  // this thread's row pass
  OnlineSoftmax<AccT> softmax;

  const auto body = [&](int j, int stage) {
    if (j == 0) qb[row] = a.scale * row_dot<Cfg>(sQ, row, bk, part);  // (every lane of the row writes it)
    const auto sK = key_tile<Cfg, Plan>(smem, stage, 0);
    const auto sV = key_tile<Cfg, Plan>(smem, stage, 1);
    // S = Q K^T, through shared memory for the row passes
    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBQ>, Int<kBK>>{});
    clear(acc_s);
    gemm::mma_from_shared<typename Cfg::Math, gemm::Major::K, gemm::Major::K>(mma, sQ, sK, acc_s, static_cast<int>(g.d));
    copy(acc_s, thr_mma.partition_C(sS));
    __syncthreads();
    // the row's running max and sum; P = exp(S - m) into the P tile (0 for padded keys)
    const int k0 = j * kBK;
    AccT block_max = negative_infinity<AccT>();
    for (int c = part; c < kBK; c += kLanes)
      if (k0 + c < w.n_real) block_max = max(block_max, a.scale * sS(row, c));
    block_max = row_reduce<kLanes>(block_max, [](AccT x, AccT y) { return max(x, y); });
    const AccT rescale = softmax.rescale(block_max);
    AccT sum = 0;
    for (int c = part; c < kBK; c += kLanes) {
      const AccT p = k0 + c < w.n_real ? softmax.weight(a.scale * sS(row, c)) : AccT(0);
      sP(row, c) = static_cast<SmemT>(p);
      sum += p;
    }
    softmax.l += row_reduce<kLanes>(sum, [](AccT x, AccT y) { return x + y; });
    if (part == 0) alpha[row] = rescale;
    __syncthreads();
    // O = O * rescale + P V
    CUTE_UNROLL
    for (int i = 0; i < size(acc_o); ++i) acc_o(i) *= alpha[get<0>(o_coords(i))];
    gemm::mma_from_shared<typename Cfg::Math, gemm::Major::K, gemm::Major::Rows>(mma, sP, transposed(sV), acc_o, kBK);
  };
  stream_key_blocks<Cfg, Plan>(a, w, smem, shares_k, body);

  // the virtual key (edge windows, "bias" padding): one more key of logit scale*q.b_k + ln(n_pad)
  // and value b_v; then out = O / l and lse = m + ln(l)
  const AccT s_v = virtual_logit(qb[row], w.n_pad, a.virtual_key);
  const AccT rescale = softmax.rescale(s_v);
  const AccT p_v = softmax.weight(s_v);
  softmax.l += p_v;
  if (part == 0) {
    alpha[row] = rescale;
    p_virtual[row] = p_v;
    inv_l[row] = AccT(1) / softmax.l;
    if (q0 + row < w.n_real) a.lse[w.stat(g, q0 + row)] = softmax.lse();
  }
  const auto sO = acc_tile<AccT, kBQ, kDP>(smem + Plan::kS);
  copy(acc_o, thr_mma.partition_C(sO));
  __syncthreads();
  store_rows<Cfg, kBQ>(sO, a.out, a.so, g, w, q0, w.head * g.d, [&](int r, int e, AccT o) {
    return (o * alpha[r] + p_virtual[r] * bv[e]) * inv_l[r];
  });
#endif
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// The softmax backward on a block's fragments, in two passes so that only one [kBQ, kBK]
// fragment is live at a time (holding S and dP together, the key-gradient kernel spilled on
// sm_90a): P (or P^T) = exp(scale S - lse) from the score fragment into the shared tile p_tile,
// then dS = P (dP - delta) from the dP fragment and the thread's own P elements into ds_tile
// (which may be p_tile: each element is read and rewritten by the one thread that owns it).
// query_of(coord) / key_of(coord) say which index of the fragment's (row, col) is which.
template <class Cfg, class Frag, class Coords, class Stats, class Tile, class QueryOf, class KeyOf>
__device__ void probabilities(const Frag& s, const Coords& coords, const Stats& lse, const Tile& p_tile, const Window& w,
                              int q0, int k0, typename Cfg::AccT scale, const QueryOf& query_of, const KeyOf& key_of) {
  CUTE_UNROLL
  for (int i = 0; i < cute::size(s); ++i) {
    const int q = query_of(coords(i)), k = key_of(coords(i));
    p_tile(cute::get<0>(coords(i)), cute::get<1>(coords(i))) = static_cast<typename Cfg::SmemT>(
        probability(scale * s(i), lse[q], q0 + q < w.n_real && k0 + k < w.n_real));
  }
}

template <class Cfg, class Frag, class Coords, class Stats, class PTile, class Tile, class QueryOf>
__device__ void score_grads(const Frag& dp, const Coords& coords, const Stats& delta, const PTile& p_tile,
                            const Tile& ds_tile, const QueryOf& query_of) {
  using AccT = typename Cfg::AccT;
  CUTE_UNROLL
  for (int i = 0; i < cute::size(dp); ++i) {
    const int r = cute::get<0>(coords(i)), c = cute::get<1>(coords(i));
    const AccT p = static_cast<AccT>(p_tile(r, c));
    ds_tile(r, c) = static_cast<typename Cfg::SmemT>(p * (dp(i) - delta[query_of(coords(i))]));
  }
}

template <class Cfg>
struct KeyGradSmem {
  static constexpr int kBQ = Cfg::kBQ, kBK = Cfg::kBK, kDP = Cfg::kDP;
  using AccT = typename Cfg::AccT;
  static constexpr size_t kK = 0;
  static constexpr size_t kV = kK + smem_tile_bytes<Cfg, kBK, kDP>();
  static constexpr size_t kTokenTile = smem_tile_bytes<Cfg, kBQ, kDP>();
  static constexpr size_t kQ = kV + smem_tile_bytes<Cfg, kBK, kDP>();
  static constexpr size_t kDO = kQ + Cfg::kStages * kTokenTile;
  // after the loop: the dK and dV tiles [kBK, kDP] on their way out, over the Q and dO buffers
  static constexpr size_t kStaged = kBK * (kDP + 4) * sizeof(AccT);
  static constexpr size_t kP = kQ + (2 * Cfg::kStages * kTokenTile > kStaged ? 2 * Cfg::kStages * kTokenTile : kStaged);
  static constexpr size_t kDS = kP + smem_tile_bytes<Cfg, kBK, kBQ>();       // P^T, dS^T [kBK, kBQ]
  static constexpr size_t kStats = kDS + smem_tile_bytes<Cfg, kBK, kBQ>();  // lse, delta per stage
  static constexpr size_t kShares = kStats + 2 * Cfg::kStages * kBQ * sizeof(AccT);
  static constexpr size_t kBytes = kShares + (1 + Cfg::kStages) * kBQ * sizeof(Pixel);
};

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) key_grad_kernel(Args<typename Cfg::E> a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  using namespace cute;
  using E = typename Cfg::E;
  using AccT = typename Cfg::AccT;
  using Plan = KeyGradSmem<Cfg>;
  using Loader = typename Cfg::Loader;
  constexpr int kBQ = Cfg::kBQ, kBK = Cfg::kBK, kDP = Cfg::kDP;
  const Geometry& g = a.g;
  const Window w = window_of(g, blockIdx.x);
  const int k0 = static_cast<int>(blockIdx.y) * kBK;
  if (k0 >= w.n_real) return;

  extern __shared__ __align__(128) unsigned char smem[];
  const auto sK = smem_tile<Cfg, kBK, kDP>(smem + Plan::kK);
  const auto sV = smem_tile<Cfg, kBK, kDP>(smem + Plan::kV);
  const auto sP = smem_tile<Cfg, kBK, kBQ>(smem + Plan::kP);
  const auto sDS = smem_tile<Cfg, kBK, kBQ>(smem + Plan::kDS);
  AccT* stats = reinterpret_cast<AccT*>(smem + Plan::kStats);  // [stage][lse | delta][kBQ]
  Pixel* shares_k = reinterpret_cast<Pixel*>(smem + Plan::kShares);
  Pixel* shares_q = shares_k + kBK;

  const auto qkv_tokens = [&](int slot) { return head_tokens(a.qkv, a.sq, a.vec_q, g, w, slot); };
  const auto dout_tokens = [&] { return head_tokens(a.dout, a.sd, a.vec_d, g, w, 0); };
  Loader::fill_shares(qkv_tokens(1), k0, w.n_real, shares_k);
  __syncthreads();
  {
    const typename Loader::SharesFilled filled;
    Loader(qkv_tokens(1), k0, w.n_real, shares_k, filled).write(sK, 0, g.d);
    Loader(qkv_tokens(2), k0, w.n_real, shares_k, filled).write(sV, 0, g.d);
  }

  typename Cfg::TiledMma mma;
  auto thr_mma = mma.get_slice(threadIdx.x);
  Tensor acc_dk = partition_fragment_C(mma, Shape<Int<kBK>, Int<kDP>>{});
  Tensor acc_dv = partition_fragment_C(mma, Shape<Int<kBK>, Int<kDP>>{});
  clear(acc_dk);
  clear(acc_dv);
  const Tensor coords = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBK>, Int<kBQ>>{}));

  const auto tile_q = [&](int stage) { return smem_tile<Cfg, kBQ, kDP>(smem + Plan::kQ + stage * Plan::kTokenTile); };
  const auto tile_do = [&](int stage) { return smem_tile<Cfg, kBQ, kDP>(smem + Plan::kDO + stage * Plan::kTokenTile); };
  const auto fill = [&](int j, int stage) {
    const int u0 = j * kBQ;
    Loader::fill_shares(qkv_tokens(0), u0, w.n_real, shares_q + stage * kBQ);
    load_row_stats<Cfg>(a, w, u0, stats + stage * 2 * kBQ, stats + stage * 2 * kBQ + kBQ);
  };
  const auto issue = [&](int j, int stage) {
    const typename Loader::SharesFilled filled;
    Loader(qkv_tokens(0), j * kBQ, w.n_real, shares_q + stage * kBQ, filled).write(tile_q(stage), 0, g.d);
    Loader(dout_tokens(), j * kBQ, w.n_real, shares_q + stage * kBQ, filled).write(tile_do(stage), 0, g.d);
  };
  const auto body = [&](int j, int stage) {
    const auto sQ = tile_q(stage);
    const auto sDO = tile_do(stage);
    const AccT* lse = stats + stage * 2 * kBQ;
    // S^T = K Q^T -> P^T, then dP^T = V dOut^T -> dS^T: [kBK keys, kBQ queries]
    const auto query_of = [](const auto& c) { return static_cast<int>(get<1>(c)); };
    const auto key_of = [](const auto& c) { return static_cast<int>(get<0>(c)); };
    Tensor acc = partition_fragment_C(mma, Shape<Int<kBK>, Int<kBQ>>{});
    clear(acc);
    gemm::mma_from_shared<typename Cfg::Math, gemm::Major::K, gemm::Major::K>(mma, sK, sQ, acc, static_cast<int>(g.d));
    probabilities<Cfg>(acc, coords, lse, sP, w, j * kBQ, k0, a.scale, query_of, key_of);
    clear(acc);
    gemm::mma_from_shared<typename Cfg::Math, gemm::Major::K, gemm::Major::K>(mma, sV, sDO, acc, static_cast<int>(g.d));
    score_grads<Cfg>(acc, coords, lse + kBQ, sP, sDS, query_of);
    __syncthreads();
    // dV += P^T dOut, dK += dS^T Q
    gemm::mma_from_shared<typename Cfg::Math, gemm::Major::K, gemm::Major::Rows>(mma, sP, transposed(sDO), acc_dv, kBQ);
    gemm::mma_from_shared<typename Cfg::Math, gemm::Major::K, gemm::Major::Rows>(mma, sDS, transposed(sQ), acc_dk, kBQ);
  };
  stream_blocks<Cfg::kStages>(static_cast<int>(cdiv(w.n_real, kBQ)), fill, issue, body);

  // (the stream's last barrier: the Q and dO buffers are free)
  const auto staged = acc_tile<AccT, kBK, kDP>(smem + Plan::kQ);
  copy(acc_dk, thr_mma.partition_C(staged));
  __syncthreads();
  store_rows<Cfg, kBK>(staged, a.dqkv, a.sg, g, w, k0, channel(g, 1, w.head),
                       [&](int, int, AccT v) { return v * a.scale; });
  __syncthreads();
  copy(acc_dv, thr_mma.partition_C(staged));
  __syncthreads();
  store_rows<Cfg, kBK>(staged, a.dqkv, a.sg, g, w, k0, channel(g, 2, w.head), [](int, int, AccT v) { return v; });
#endif
}

template <class Cfg>
struct QueryGradSmem {
  static constexpr int kBQ = Cfg::kBQ, kBK = Cfg::kBK, kDP = Cfg::kDP;
  using AccT = typename Cfg::AccT;
  static constexpr size_t kQ = 0;
  static constexpr size_t kDO = kQ + smem_tile_bytes<Cfg, kBQ, kDP>();
  static constexpr size_t kTokenTile = smem_tile_bytes<Cfg, kBK, kDP>();
  static constexpr size_t kK = kDO + smem_tile_bytes<Cfg, kBQ, kDP>();
  static constexpr size_t kV = kK + Cfg::kStages * kTokenTile;
  // after the loop: the dQ tile [kBQ, kDP] on its way out, over the K and V buffers
  static constexpr size_t kStaged = kBQ * (kDP + 4) * sizeof(AccT);
  static constexpr size_t kDS = kK + (2 * Cfg::kStages * kTokenTile > kStaged ? 2 * Cfg::kStages * kTokenTile : kStaged);
  static constexpr size_t kRowStats = kDS + smem_tile_bytes<Cfg, kBQ, kBK>();  // lse, delta, p_v, ds_v
  static constexpr size_t kBias = kRowStats + 4 * kBQ * sizeof(AccT);
  static constexpr size_t kShares = kBias + 2 * kDP * sizeof(AccT);
  static constexpr size_t kBytes = kShares + (1 + Cfg::kStages) * kBQ * sizeof(Pixel);
};

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) query_grad_kernel(Args<typename Cfg::E> a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  using namespace cute;
  using E = typename Cfg::E;
  using AccT = typename Cfg::AccT;
  using Plan = QueryGradSmem<Cfg>;
  using Loader = typename Cfg::Loader;
  constexpr int kBQ = Cfg::kBQ, kBK = Cfg::kBK, kDP = Cfg::kDP, kLanes = Cfg::kRowLanes;
  const Geometry& g = a.g;
  const Window w = window_of(g, blockIdx.x);
  const int q0 = static_cast<int>(blockIdx.y) * kBQ;
  if (q0 >= w.n_real) return;

  extern __shared__ __align__(128) unsigned char smem[];
  const auto sQ = smem_tile<Cfg, kBQ, kDP>(smem + Plan::kQ);
  const auto sDO = smem_tile<Cfg, kBQ, kDP>(smem + Plan::kDO);
  const auto sDS = smem_tile<Cfg, kBQ, kBK>(smem + Plan::kDS);
  AccT* lse = reinterpret_cast<AccT*>(smem + Plan::kRowStats);
  AccT* delta = lse + kBQ;
  AccT* p_virtual = delta + kBQ;
  AccT* ds_virtual = p_virtual + kBQ;
  AccT* bk = reinterpret_cast<AccT*>(smem + Plan::kBias);
  AccT* bv = bk + kDP;
  Pixel* shares_q = reinterpret_cast<Pixel*>(smem + Plan::kShares);
  Pixel* shares_k = shares_q + kBQ;

  const auto qkv_tokens = [&](int slot) { return head_tokens(a.qkv, a.sq, a.vec_q, g, w, slot); };
  Loader::fill_shares(qkv_tokens(0), q0, w.n_real, shares_q);
  load_row_stats<Cfg>(a, w, q0, lse, delta);
  load_virtual_key<Cfg>(a, w, bk);
  __syncthreads();
  {
    const typename Loader::SharesFilled filled;
    Loader(qkv_tokens(0), q0, w.n_real, shares_q, filled).write(sQ, 0, g.d);
    Loader(head_tokens(a.dout, a.sd, a.vec_d, g, w, 0), q0, w.n_real, shares_q, filled).write(sDO, 0, g.d);
  }

  typename Cfg::TiledMma mma;
  auto thr_mma = mma.get_slice(threadIdx.x);
  Tensor acc_dq = partition_fragment_C(mma, Shape<Int<kBQ>, Int<kDP>>{});
  clear(acc_dq);
  const Tensor coords = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBQ>, Int<kBK>>{}));

  const auto body = [&](int j, int stage) {
    const auto sK = key_tile<Cfg, Plan>(smem, stage, 0);
    // S = Q K^T -> P, then dP = dOut V^T -> dS (over P in the same tile): [kBQ queries, kBK keys]
    const auto query_of = [](const auto& c) { return static_cast<int>(get<0>(c)); };
    const auto key_of = [](const auto& c) { return static_cast<int>(get<1>(c)); };
    Tensor acc = partition_fragment_C(mma, Shape<Int<kBQ>, Int<kBK>>{});
    clear(acc);
    gemm::mma_from_shared<typename Cfg::Math, gemm::Major::K, gemm::Major::K>(mma, sQ, sK, acc, static_cast<int>(g.d));
    probabilities<Cfg>(acc, coords, lse, sDS, w, q0, j * kBK, a.scale, query_of, key_of);
    clear(acc);
    gemm::mma_from_shared<typename Cfg::Math, gemm::Major::K, gemm::Major::K>(mma, sDO, key_tile<Cfg, Plan>(smem, stage, 1),
                                                                              acc, static_cast<int>(g.d));
    score_grads<Cfg>(acc, coords, delta, sDS, sDS, query_of);
    __syncthreads();
    // dQ += dS K
    gemm::mma_from_shared<typename Cfg::Math, gemm::Major::K, gemm::Major::Rows>(mma, sDS, transposed(sK), acc_dq, kBK);
  };
  stream_key_blocks<Cfg, Plan>(a, w, smem, shares_k, body);

  // the virtual key: p_v = exp(scale*q.b_k + ln(n_pad) - lse), dS_v = p_v (dOut.b_v - delta);
  // dQ += dS_v b_k, and this block's share of the key's own dk = scale Σ dS_v q, dv = Σ p_v dOut
  const int row = threadIdx.x / kLanes, part = threadIdx.x % kLanes;
  const AccT s_v = virtual_logit(a.scale * row_dot<Cfg>(sQ, row, bk, part), w.n_pad, a.virtual_key);
  const AccT do_bv = row_dot<Cfg>(sDO, row, bv, part);
  if (part == 0) {
    const AccT p = probability(s_v, lse[row], a.virtual_key && q0 + row < w.n_real);
    p_virtual[row] = p;
    ds_virtual[row] = p * (do_bv - delta[row]);
  }
  const auto staged = acc_tile<AccT, kBQ, kDP>(smem + Plan::kK);
  copy(acc_dq, thr_mma.partition_C(staged));
  __syncthreads();
  if (a.dqkv != nullptr)
    store_rows<Cfg, kBQ>(staged, a.dqkv, a.sg, g, w, q0, channel(g, 0, w.head),
                         [&](int r, int e, AccT v) { return (v + ds_virtual[r] * bk[e]) * a.scale; });
  if (a.virtual_grads != nullptr && w.n_pad > 0) {
    // one thread per (slot, channel), its rows in order: the partial is the same bits every run
    AccT* part_out = a.virtual_grads + (static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y) * 2 * g.d;
    for (int i = threadIdx.x; i < 2 * g.d; i += Cfg::kThreads) {
      const int slot = i / static_cast<int>(g.d), e = i % static_cast<int>(g.d);
      AccT sum = 0;
      for (int r = 0; r < kBQ && q0 + r < w.n_real; ++r)
        sum += slot == 0 ? ds_virtual[r] * static_cast<AccT>(sQ(r, e)) : p_virtual[r] * static_cast<AccT>(sDO(r, e));
      part_out[i] = slot == 0 ? sum * a.scale : sum;
    }
  }
#endif
}

}  // namespace mixops::window_attention
