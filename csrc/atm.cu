// CUDA backend of mixops.atm_sample (ActiveMLP's per-channel 1-D zero-padded lerp gather) and
// mixops.atm_fc (that gather fused into the following FC GEMM, the official ATMOp); see
// docs/atm.md sections 3-5 and 12. The per-element rules (positions in fp32, corners,
// zero padding, the right-hand slope at integers, the owner-computes walk) live in
// atm_math.cuh, shared with the CPU emulation (atm_cpu.cpp) that the CPU tests check.
//
// On channels-last x [B,H,W,C] with compact offsets [B,H,W,G], G = C / share (channel c uses
// offset c / share), a *line* is a row (axis "w") or a column (axis "h"): every kernel sees
// [B, L lines, n positions, C] through strides. Storage fp32, fp16, bf16 (positions, weights
// and sums in fp32) or fp64 (all in fp64, for float64 comparisons; its GEMMs take the FMA path).
//
// Cost, N = B·H·W·C elements of e bytes, M = B·H·W pixels:
// - atm_sample forward: ~8 FLOP per element; minimal HBM traffic (2 + 1/share)·N·e (read x and
//   the offsets once, write out; the corners of a line are re-read from L1/L2).
//   Grid (cdiv(M, pixels per block), cdiv(C, channel lanes)): lanes over channels, so NHWC
//   loads and stores coalesce.
// - atm_sample backward (deterministic, no atomics; docs/atm.md section 12.6 option 1): ~8 FLOP per element;
//   minimal traffic (3 + 2/share)·N·e (read g, x, offsets; write gX, gOffset). One thread owns
//   one (line, offset group) and walks the line in order, accumulating gX in a private fp32
//   shared-memory slab (lanes over groups: conflict-free banks) and summing the group's offset
//   gradient in registers. Grid (cdiv(B·L, lines per block), cdiv(G, group lanes)).
// - atm_fc forward: 2·M·C·C_out FLOP; minimal traffic (M·C·(1 + 1/share) + C·C_out +
//   M·C_out)·e: the gather is the A-operand load of a 64x64x32 tiled GEMM (WMMA fp16/bf16 with
//   fp32 accumulation, TF32 WMMA for fp32 when torch allows TF32 for its matmuls, else fp32
//   FMA), so the sampled tensor never reaches HBM; bias in the epilogue. Grid (cdiv(M, 64) ·
//   cdiv(C_out, 64),), the column tiles of one row tile adjacent so its gathers hit L2.
// - atm_fc backward: dS = g @ W (cuBLAS), then the atm_sample backward; dW = g^T @ S with S
//   re-gathered in the B-operand load of the same tiled GEMM, over a split of the pixels fixed by
//   the shapes (common.cuh split_rows) into fp32 partials summed in order (grid (cdiv(C_out, 64) ·
//   cdiv(C, 64), splits)); db = g summed over fixed pixel ranges (column_sum.cuh).
//   4·M·C·C_out FLOP.
//
// Not yet run on a GPU (registered auto=False): the tiling, shared-memory layouts and tensor-
// core fragments are verified only by compilation; the CPU tests cover atm_math.cuh.
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "atm_host.cuh"
#include "atm_math.cuh"
#include "column_sum.cuh"
#include "common.cuh"
#include "tensor_checks.h"
#include "tf32.h"

namespace mixops {

namespace {

using atm::LineDividers;
using atm::LineShape;
using atm::LineStrides;
namespace wmma = nvcuda::wmma;

__device__ __forceinline__ int64_t pixel_offset(const LineStrides& s, int64_t b, int64_t l, int64_t q) {
  return b * s.b + l * s.l + q * s.p;
}

// Image b, line l and position q of pixel m = (b·L + l)·n + q. Every index division of the kernels
// goes through the precomputed Dividers (common.cuh): no 64-bit division sequence in device code
// (tests/test_atm_cuda.py reads the SASS).
struct PixelIndex {
  int64_t b, l, q;
};
__device__ __forceinline__ PixelIndex pixel_index(int64_t m, const LineDividers& d) {
  int64_t q, l;
  const int64_t line = d.n.divmod(m, q);
  const int64_t b = d.L.divmod(line, l);
  return {b, l, q};
}

// ---------------------------------------------------------------------------------------------
// atm_sample forward
// ---------------------------------------------------------------------------------------------

// out[b,l,q,c] = lerp0(x[b,l,:,c], q + off[b,l,q,c / share]).
//   x   [B, L, n, C]: strides sx (batch, line, position, channel).
//   off [B, L, n, G]: strides so (channel = offset group).
//   out [B, L, n, C]: strides sy.
// M = B·L·n pixels, d: the view's dividers. Block (channel lanes, pixels): threadIdx.x -> channel,
// threadIdx.y -> pixel.
template <typename scalar_t>
__global__ void atm_sample_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ off,
                                      scalar_t* __restrict__ out, int64_t M, int64_t C, LineDividers d,
                                      LineStrides sx, LineStrides so, LineStrides sy) {
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (m >= M || c >= C) return;
  const PixelIndex p = pixel_index(m, d);
  const scalar_t* x_line = x + p.b * sx.b + p.l * sx.l + c * sx.c;
  const auto load = [&](int64_t t) { return x_line[t * sx.p]; };
  using acc_t = Acc<scalar_t>;
  const acc_t o = static_cast<acc_t>(off[pixel_offset(so, p.b, p.l, p.q) + d.share.div(c) * so.c]);
  out[pixel_offset(sy, p.b, p.l, p.q) + c * sy.c] =
      static_cast<scalar_t>(atm::sample<acc_t>(load, p.q, o, d.n.divisor()));
}

// Up to 64 channel lanes (a bf16 pixel of C = 64 is one 128-byte line) and 256 threads.
dim3 forward_block(int64_t C) {
  const unsigned lanes = static_cast<unsigned>(std::min<int64_t>(64, std::max<int64_t>(1, C)));
  return dim3(lanes, std::max(1u, 256u / lanes));
}

void launch_sample_forward(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& out,
                           const LineShape& sh) {
  const int64_t M = sh.pixels();
  if (M == 0 || sh.C == 0) return;
  const dim3 block = forward_block(sh.C);
  const int64_t grid_c = cdiv(sh.C, block.x);
  TORCH_CHECK(grid_c <= 65535, "_atm_sample_cuda: too many channels (", sh.C, ")");
  const dim3 grid(static_cast<unsigned>(cdiv(M, block.y)), static_cast<unsigned>(grid_c));
  MIXOPS_FLOAT_SWITCH(x.scalar_type(), scalar_t, [&] {
    atm_sample_fwd_kernel<scalar_t><<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), M, sh.C,
        sh.dividers(), sh.strides(x), sh.strides(offset), sh.strides(out));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------
// atm_sample backward (owner-computes, deterministic)
// ---------------------------------------------------------------------------------------------

// gX and gOffset of one line for one offset group per thread (atm::backward_line).
//   g    [B, L, n, C] incoming gradient, any strides (zero strides included): sg.
//   x    [B, L, n, C]: sx.       off  [B, L, n, G]: so.
//   gx   [B, L, n, C] (written when kNeedGx): sgx.   goff [B, L, n, G] (when kNeedGoff): sgo.
// lines = B·L. Block (group lanes, lines): threadIdx.x -> group, threadIdx.y -> line.
// Dynamic shared memory: the gX slabs (fp32; fp64 for fp64), [blockDim.y][n][share][blockDim.x]; a thread touches
// only its own column, so no synchronisation is needed and banks never conflict.
template <typename scalar_t, bool kNeedGx, bool kNeedGoff>
__global__ void atm_sample_bwd_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                      const scalar_t* __restrict__ off, scalar_t* __restrict__ gx,
                                      scalar_t* __restrict__ goff, int64_t lines, Divider L, int64_t n, int64_t G,
                                      int64_t share, LineStrides sg, LineStrides sx, LineStrides so,
                                      LineStrides sgx, LineStrides sgo) {
  using acc_t = Acc<scalar_t>;
  extern __shared__ __align__(16) unsigned char slab_bytes[];
  acc_t* gx_slab = reinterpret_cast<acc_t*>(slab_bytes);
  const int64_t grp = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t line = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (grp >= G || line >= lines) return;
  int64_t l;
  const int64_t b = L.divmod(line, l), c0 = grp * share;
  const int64_t lanes = blockDim.x;
  acc_t* acc = gx_slab + threadIdx.y * n * share * lanes + threadIdx.x;  // (t, s) at (t·share + s)·lanes
  if constexpr (kNeedGx) {
    for (int64_t i = 0; i < n * share; ++i) acc[i * lanes] = 0;
  }
  const scalar_t* g_line = g + b * sg.b + l * sg.l + c0 * sg.c;
  const scalar_t* x_line = x + b * sx.b + l * sx.l + c0 * sx.c;
  const scalar_t* o_line = off + b * so.b + l * so.l + grp * so.c;
  atm::backward_line<acc_t, kNeedGx, kNeedGoff>(
      n, share, [&](int64_t q) { return static_cast<acc_t>(o_line[q * so.p]); },
      [&](int64_t q, int64_t s) { return static_cast<acc_t>(g_line[q * sg.p + s * sg.c]); },
      [&](int64_t s) { return [&, s](int64_t t) { return x_line[t * sx.p + s * sx.c]; }; },
      [&](int64_t q, acc_t v) { goff[pixel_offset(sgo, b, l, q) + grp * sgo.c] = static_cast<scalar_t>(v); },
      [&](int64_t t, int64_t s, acc_t v) { acc[(t * share + s) * lanes] += v; });
  if constexpr (kNeedGx) {
    for (int64_t t = 0; t < n; ++t)
      for (int64_t s = 0; s < share; ++s)
        gx[pixel_offset(sgx, b, l, t) + (c0 + s) * sgx.c] = static_cast<scalar_t>(acc[(t * share + s) * lanes]);
  }
}

struct BackwardConfig {
  dim3 block;
  size_t smem;
};

// Up to 32 group lanes and 128 threads; the lines per block, then the lanes, halve until the gX
// slabs fit the default 48 KB of shared memory. A line too long for even one slab of 48 KB takes
// the device's opt-in maximum (227 KB on H100: lines of ~7000 positions at share 8).
BackwardConfig backward_config(int64_t n, int64_t G, int64_t share, size_t acc_bytes, bool need_gx) {
  unsigned lanes = static_cast<unsigned>(std::min<int64_t>(32, std::max<int64_t>(1, G)));
  unsigned lines = std::max(1u, 128u / lanes);
  const auto bytes = [&] { return need_gx ? static_cast<size_t>(lines) * lanes * n * share * acc_bytes : 0; };
  constexpr size_t kDefault = 48 * 1024;
  while (bytes() > kDefault && lines > 1) lines /= 2;
  while (bytes() > kDefault && lanes > 1) lanes /= 2;
  return {dim3(lanes, lines), bytes()};
}

template <typename scalar_t, bool kNeedGx, bool kNeedGoff>
void launch_sample_backward_t(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& offset,
                              const at::Tensor& gx, const at::Tensor& goff, const LineShape& sh) {
  const BackwardConfig cfg = backward_config(sh.n, sh.G, sh.share, sizeof(Acc<scalar_t>), kNeedGx);
  const auto kernel = atm_sample_bwd_kernel<scalar_t, kNeedGx, kNeedGoff>;
  if (cfg.smem > 48 * 1024) {
    const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    TORCH_CHECK(cfg.smem <= limit, "_atm_sample_cuda_backward: a line of ", sh.n, " positions x share ", sh.share,
                " needs ", cfg.smem, " bytes of shared memory for its gradient, the device has ", limit);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(cfg.smem)));
  }
  const int64_t lines = sh.B * sh.L;
  const int64_t grid_g = cdiv(sh.G, cfg.block.x);
  TORCH_CHECK(grid_g <= 65535, "_atm_sample_cuda_backward: too many offset groups (", sh.G, ")");
  const dim3 grid(static_cast<unsigned>(cdiv(lines, cfg.block.y)), static_cast<unsigned>(grid_g));
  // an output that is not computed is never touched (its branch is compiled out): pass x's
  const at::Tensor& gx_t = kNeedGx ? gx : x;
  const at::Tensor& go_t = kNeedGoff ? goff : offset;
  kernel<<<grid, cfg.block, cfg.smem, at::cuda::getCurrentCUDAStream()>>>(
      grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(),
      kNeedGx ? gx.mutable_data_ptr<scalar_t>() : nullptr, kNeedGoff ? goff.mutable_data_ptr<scalar_t>() : nullptr,
      lines, Divider(sh.L), sh.n, sh.G, sh.share, sh.strides(grad), sh.strides(x), sh.strides(offset),
      sh.strides(gx_t), sh.strides(go_t));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// gx / goff undefined: not computed.
void launch_sample_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& offset,
                            const at::Tensor& gx, const at::Tensor& goff, const LineShape& sh) {
  if (sh.pixels() == 0 || sh.C == 0 || !(gx.defined() || goff.defined())) return;
  MIXOPS_FLOAT_SWITCH(x.scalar_type(), scalar_t, [&] {
    MIXOPS_BOOL_SWITCH(gx.defined(), kNeedGx, [&] {
      // (generic, so that the kernel without outputs is never instantiated)
      MIXOPS_BOOL_SWITCH(goff.defined(), kNeedGoff, [&](auto...) {
        if constexpr (kNeedGx || kNeedGoff)
          launch_sample_backward_t<scalar_t, kNeedGx, kNeedGoff>(grad, x, offset, gx, goff, sh);
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Tiled GEMM pieces shared by the fused forward and the weight gradient
// ---------------------------------------------------------------------------------------------
//
// A block computes a kTileM x kTileN fp32 tile of sum_k A[m,k]·B[k,n] with 4 warps, kTileK of
// the reduction per step. Shared memory holds A as As[m][k] and B as Bs[n][k] (both k-fastest,
// row pitch Tile::kLd), so a loader writes either with lanes along its contiguous dimension;
// the tile's math reads them and finally stores the accumulators to Cs[m][n] (pitch kLdC) for
// the epilogue. The operands are rounded to the storage dtype first, as tensor cores see them.

constexpr int kTileM = 64, kTileN = 64, kTileK = 32, kThreads = 128;
constexpr int kLdC = kTileN + 4;  // multiple of 4 floats (WMMA), rows 16 apart stay 32-B aligned

// FMA in acc_t (fp32, or fp64 for fp64): thread t owns rows t/16 + 8i (i < 8) and columns
// t%16 + 16j (j < 4). Pitch kTileK+1: the 16 column owners of a warp read 16 different banks.
template <typename AccT>
struct SimtTile {
  using acc_t = AccT;
  using smem_t = acc_t;
  static constexpr int kLd = kTileK + 1;
  acc_t acc[8][4];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0;
  }
  __device__ void step(const smem_t* As, const smem_t* Bs) {
    const int r = threadIdx.x / 16, c = threadIdx.x % 16;
#pragma unroll 4
    for (int k = 0; k < kTileK; ++k) {
      acc_t a[8], b[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = As[(r + 8 * i) * kLd + k];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[(c + 16 * j) * kLd + k];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }
  }
  __device__ void store(acc_t* Cs) const {
    const int r = threadIdx.x / 16, c = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) Cs[(r + 8 * i) * kLdC + c + 16 * j] = acc[i][j];
  }
};

// bf16 and TF32 WMMA exist on sm_80+ only. (mma.h's own __CUDA_AMPERE_MMA__ cannot serve as the
// guard: the header #undefs it at its end.)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define MIXOPS_ATM_AMPERE_WMMA 1
#endif

// TF32 fragments are loaded from fp32 and rounded in place (the conversion exists on sm_80+ only;
// older device passes never instantiate a TF32 tile).
template <typename Frag>
__device__ __forceinline__ void round_to_tf32(Frag& frag) {
#ifdef MIXOPS_ATM_AMPERE_WMMA
  for (int e = 0; e < frag.num_elements; ++e) frag.x[e] = wmma::__float_to_tf32(frag.x[e]);
#endif
}

// WMMA: warp w owns the 32x32 quadrant (w / 2, w % 2) as 2x2 fragments of 16x16x kK.
// frag_t: the fragment element type (__half, __nv_bfloat16, wmma::precision::tf32); smem_t: how
// shared memory stores the operands (c10::Half / c10::BFloat16, layout-identical to the CUDA
// types, or float for TF32, converted fragment by fragment).
template <typename frag_t, typename smem_type, typename load_t, int kK>
struct WmmaTile {
  using acc_t = float;
  using smem_t = smem_type;
  static constexpr int kLd = kTileK + 8;  // multiple of 8 (16-bit) / 4 (fp32); 16 rows stay 32-B aligned
  wmma::fragment<wmma::accumulator, 16, 16, kK, float> acc[2][2];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }
  __device__ void step(const smem_t* As, const smem_t* Bs) {
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
    const load_t* A = reinterpret_cast<const load_t*>(As);
    const load_t* B = reinterpret_cast<const load_t*>(Bs);
#pragma unroll
    for (int k = 0; k < kTileK; k += kK) {
      wmma::fragment<wmma::matrix_a, 16, 16, kK, frag_t, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, kK, frag_t, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(a[i], A + (wm * 32 + i * 16) * kLd + k, kLd);
        wmma::load_matrix_sync(b[i], B + (wn * 32 + i * 16) * kLd + k, kLd);
        if constexpr (std::is_same_v<load_t, float>) {
          round_to_tf32(a[i]);
          round_to_tf32(b[i]);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
  __device__ void store(float* Cs) const {
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * kLdC + wn * 32 + j * 16, acc[i][j], kLdC,
                                wmma::mem_row_major);
  }
};

// The operand tiles As, Bs and, once the reduction is done, the accumulator tile Cs share one
// buffer: 34 KB at most (fp64), so every variant fits the 48 KB of static shared memory.
template <typename Tile>
struct TileSmem {
  static constexpr size_t kOperands = (kTileM + kTileN) * Tile::kLd * sizeof(typename Tile::smem_t);
  static constexpr size_t kAcc = kTileM * kLdC * sizeof(typename Tile::acc_t);
  static constexpr size_t kBytes = kOperands > kAcc ? kOperands : kAcc;
};

// The tile of a (storage type, tensor cores) pair (common.cuh MIXOPS_GEMM_SWITCH: fp16 and bf16
// on tensor cores, fp32 on TF32 ones only where torch allows TF32 for its own fp32 matmuls, so the
// drop-in matches the official fp32 op under the same settings).
template <typename scalar_t, bool kTensorCores>
struct TileFor {
  using type = SimtTile<Acc<scalar_t>>;  // fp32 IEEE, fp64, and bf16 / TF32 before sm_80
};
template <>
struct TileFor<c10::Half, true> {
  using type = WmmaTile<__half, c10::Half, __half, 16>;  // sm_70+
};
#ifdef MIXOPS_ATM_AMPERE_WMMA
template <>
struct TileFor<c10::BFloat16, true> {
  using type = WmmaTile<__nv_bfloat16, c10::BFloat16, __nv_bfloat16, 16>;
};
template <>
struct TileFor<float, true> {
  using type = WmmaTile<wmma::precision::tf32, float, float, 8>;
};
#endif
// Before sm_80, bf16 and TF32 fall back to the FMA tile (the device pass of an older architecture
// has no such tensor cores, so the choice is made where the code is compiled). The host pass reads
// no tile (the kernels' signatures use Acc<scalar_t>, not Tile::acc_t).

// A gathered operand value, rounded to the storage dtype and stored as the tile's smem_t.
template <typename scalar_t, typename smem_t, typename acc_t>
__device__ __forceinline__ smem_t operand(acc_t v) {
  return static_cast<smem_t>(static_cast<scalar_t>(v));
}

// Where one pixel of the GEMM lives: its line's start in x, its offset row, its row in the other
// [B,H,W,*] operand (out or g), and its position q on the line (-1: past the last pixel).
struct PixelRow {
  int64_t x, off, other;
  int64_t q;
};

__device__ __forceinline__ PixelRow pixel_row(int64_t m, int64_t M, const LineDividers& d, const LineStrides& sx,
                                              const LineStrides& so, const LineStrides& s_other) {
  if (m >= M) return {0, 0, 0, -1};
  const PixelIndex p = pixel_index(m, d);
  return {p.b * sx.b + p.l * sx.l, pixel_offset(so, p.b, p.l, p.q), pixel_offset(s_other, p.b, p.l, p.q), p.q};
}

// The sampled feature S[pixel, c] (0 past the last pixel or channel).
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t gathered(const scalar_t* __restrict__ x, const scalar_t* __restrict__ off,
                                          const PixelRow& row, int64_t c, int64_t C, const LineDividers& d,
                                          const LineStrides& sx, const LineStrides& so) {
  if (row.q < 0 || c >= C) return 0;
  const scalar_t* x_line = x + row.x + c * sx.c;
  const auto load = [&](int64_t t) { return x_line[t * sx.p]; };
  return atm::sample<acc_t>(load, row.q, static_cast<acc_t>(off[row.off + d.share.div(c) * so.c]), d.n.divisor());
}

// ---------------------------------------------------------------------------------------------
// atm_fc forward: the gather in the GEMM's A-operand load
// ---------------------------------------------------------------------------------------------

// out[pixel, j] = sum_c S[pixel, c]·W[j, c] (+ bias[j]), S gathered into shared memory per tile.
//   x    [B, L, n, C]: sx.   off [B, L, n, G]: so.   out [B, L, n, C_out]: sy.
//   w    [C_out, C]: W[j, c] at j·sw_n + c·sw_k.   bias [C_out]: stride s_bias (nullptr: none).
// M = B·L·n pixels, d: the view's dividers. Block pid -> row tile pid / tiles_n, column tile
// pid % tiles_n.
template <typename scalar_t, bool kTensorCores>
__global__ void __launch_bounds__(kThreads)
    atm_fc_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ off,
                      const scalar_t* __restrict__ w, const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
                      int64_t M, int64_t C, int64_t C_out, LineDividers d, LineStrides sx, LineStrides so,
                      LineStrides sy, int64_t sw_n, int64_t sw_k, int64_t s_bias) {
  using Tile = typename TileFor<scalar_t, kTensorCores>::type;
  using smem_t = typename Tile::smem_t;
  using acc_t = typename Tile::acc_t;
  constexpr int kLd = Tile::kLd;
  __shared__ __align__(32) unsigned char smem[TileSmem<Tile>::kBytes];
  smem_t* As = reinterpret_cast<smem_t*>(smem);
  smem_t* Bs = As + kTileM * kLd;
  acc_t* Cs = reinterpret_cast<acc_t*>(smem);  // after the last step only
  __shared__ PixelRow rows[kTileM];

  // 32-bit: the launch checked that the tiles fit the grid
  const unsigned tiles_n = static_cast<unsigned>(cdiv(C_out, kTileN));
  const int64_t m0 = static_cast<int64_t>(blockIdx.x / tiles_n) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x % tiles_n) * kTileN;
  const int tid = threadIdx.x;
  if (tid < kTileM) rows[tid] = pixel_row(m0 + tid, M, d, sx, so, sy);
  Tile tile;
  tile.zero();
  __syncthreads();

  // loads: lanes along k (channels: contiguous in NHWC x and in W's rows)
  // (trip counts fixed at compile time: a loop from a runtime start would need remainder code)
  const int kk = tid % kTileK, r0 = tid / kTileK;
  constexpr int kRowStep = kThreads / kTileK;
  for (int64_t k0 = 0; k0 < C; k0 += kTileK) {
    const int64_t c = k0 + kk;
#pragma unroll 4
    for (int i = 0; i < kTileM / kRowStep; ++i) {
      const int r = r0 + i * kRowStep;
      As[r * kLd + kk] = operand<scalar_t, smem_t>(gathered<acc_t>(x, off, rows[r], c, C, d, sx, so));
    }
#pragma unroll 4
    for (int i = 0; i < kTileN / kRowStep; ++i) {
      const int r = r0 + i * kRowStep;
      const int64_t j = n0 + r;
      const acc_t v = (j < C_out && c < C) ? static_cast<acc_t>(w[j * sw_n + c * sw_k]) : acc_t(0);
      Bs[r * kLd + kk] = operand<scalar_t, smem_t>(v);
    }
    __syncthreads();
    tile.step(As, Bs);
    __syncthreads();
  }
  tile.store(Cs);
  __syncthreads();

  // epilogue: bias, storage dtype, lanes along the output channels
  for (int e = tid; e < kTileM * kTileN; e += kThreads) {
    const int r = e / kTileN, jj = e % kTileN;
    const int64_t j = n0 + jj;
    if (rows[r].q < 0 || j >= C_out) continue;
    acc_t v = Cs[r * kLdC + jj];
    if (bias != nullptr) v += static_cast<acc_t>(bias[j * s_bias]);
    out[rows[r].other + j * sy.c] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, bool kTensorCores>
void launch_fc_forward_t(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& out, const LineShape& sh) {
  const int64_t M = sh.pixels(), c_out = weight.size(0);
  const int64_t tiles = cdiv(M, kTileM) * cdiv(c_out, kTileN);
  TORCH_CHECK(tiles <= INT32_MAX, "_atm_fc_cuda: too many output tiles (", tiles, ")");
  atm_fc_fwd_kernel<scalar_t, kTensorCores>
      <<<static_cast<unsigned>(tiles), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
          bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(), M, sh.C,
          c_out, sh.dividers(), sh.strides(x), sh.strides(offset), sh.strides(out), weight.stride(0),
          weight.stride(1), bias.has_value() ? bias->stride(0) : 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_fc_forward(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& out, const LineShape& sh) {
  if (sh.pixels() == 0 || weight.size(0) == 0) return;
  MIXOPS_GEMM_SWITCH(x.scalar_type(), tf32_allowed(), scalar_t, kTensorCores, [&] {
    launch_fc_forward_t<scalar_t, kTensorCores>(x, offset, weight, bias, out, sh);
  });
}

// ---------------------------------------------------------------------------------------------
// atm_fc weight gradient: dW = g^T @ S, S re-gathered in the B-operand load
// ---------------------------------------------------------------------------------------------

// partial[z, j, c] = sum over the pixels of split z of g[pixel, j]·S[pixel, c] (in acc_t).
//   g   [B, L, n, C_out] incoming gradient, any strides: sg.
//   x   [B, L, n, C]: sx.   off [B, L, n, G]: so.
//   partial [splits, C_out, C] acc_t (fp32; fp64 for fp64), contiguous.
// Block (blockIdx.x -> (row tile of C_out, column tile of C), blockIdx.y -> split z); split z
// covers pixels [z·chunk, min(M, (z+1)·chunk)). The order of every sum is fixed by the shapes.
template <typename scalar_t, bool kTensorCores>
__global__ void __launch_bounds__(kThreads)
    atm_fc_dw_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                     const scalar_t* __restrict__ off, Acc<scalar_t>* __restrict__ partial, int64_t M,
                     int64_t C, int64_t C_out, int64_t chunk, LineDividers d, LineStrides sg, LineStrides sx,
                     LineStrides so) {
  using Tile = typename TileFor<scalar_t, kTensorCores>::type;
  using smem_t = typename Tile::smem_t;
  using acc_t = typename Tile::acc_t;
  static_assert(std::is_same_v<acc_t, Acc<scalar_t>>, "partial holds the tile's accumulators");
  constexpr int kLd = Tile::kLd;
  __shared__ __align__(32) unsigned char smem[TileSmem<Tile>::kBytes];
  smem_t* As = reinterpret_cast<smem_t*>(smem);
  smem_t* Bs = As + kTileM * kLd;
  acc_t* Cs = reinterpret_cast<acc_t*>(smem);  // after the last step only
  __shared__ PixelRow pixels[kTileK];

  // 32-bit: the launch checked that the tiles fit the grid
  const unsigned tiles_c = static_cast<unsigned>(cdiv(C, kTileN));
  const int64_t j0 = static_cast<int64_t>(blockIdx.x / tiles_c) * kTileM;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x % tiles_c) * kTileN;
  const int64_t p_begin = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t p_end = M < p_begin + chunk ? M : p_begin + chunk;
  const int tid = threadIdx.x;
  Tile tile;
  tile.zero();

  // loads: lanes along the 64 rows (output channels of g, input channels of S: both contiguous
  // in NHWC), two pixels per pass
  const int lane = tid % kTileM, k_first = tid / kTileM;
  constexpr int kKStep = kThreads / kTileM;
  for (int64_t p0 = p_begin; p0 < p_end; p0 += kTileK) {
    if (tid < kTileK) pixels[tid] = pixel_row(p0 + tid < p_end ? p0 + tid : M, M, d, sx, so, sg);
    __syncthreads();
    const int64_t j = j0 + lane, c = c0 + lane;
#pragma unroll 2  // 4 makes ptxas spill the FMA-tile variants on sm_90a
    for (int i = 0; i < kTileK / kKStep; ++i) {
      const int k = k_first + i * kKStep;
      const PixelRow& px = pixels[k];
      const acc_t gv = (px.q >= 0 && j < C_out) ? static_cast<acc_t>(g[px.other + j * sg.c]) : acc_t(0);
      As[lane * kLd + k] = operand<scalar_t, smem_t>(gv);
      Bs[lane * kLd + k] = operand<scalar_t, smem_t>(gathered<acc_t>(x, off, px, c, C, d, sx, so));
    }
    __syncthreads();
    tile.step(As, Bs);
    __syncthreads();
  }
  tile.store(Cs);
  __syncthreads();
  acc_t* part = partial + static_cast<int64_t>(blockIdx.y) * C_out * C;
  for (int e = tid; e < kTileM * kTileN; e += kThreads) {
    const int r = e / kTileN, cc = e % kTileN;
    if (j0 + r < C_out && c0 + cc < C) part[(j0 + r) * C + c0 + cc] = Cs[r * kLdC + cc];
  }
}

template <typename scalar_t, bool kTensorCores>
at::Tensor fc_weight_grad_t(const at::Tensor& g, const at::Tensor& x, const at::Tensor& offset, int64_t c_out,
                            const LineShape& sh) {
  const int64_t M = sh.pixels();
  const int64_t tiles = cdiv(c_out, kTileM) * cdiv(sh.C, kTileN);
  // fixed pixel ranges of whole K steps, about 256 blocks in all: the shapes alone decide
  const RowSplit split = split_rows(M, kTileK, tiles);
  TORCH_CHECK(tiles <= INT32_MAX, "_atm_fc_cuda_backward: weight too large for the grid");
  using acc_t = Acc<scalar_t>;  // the tile's accumulator type
  auto partial = at::empty({split.count, c_out, sh.C}, x.options().dtype(kAccDtype<scalar_t>));
  atm_fc_dw_kernel<scalar_t, kTensorCores>
      <<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(split.count)), kThreads, 0,
         at::cuda::getCurrentCUDAStream()>>>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                             offset.const_data_ptr<scalar_t>(), partial.template mutable_data_ptr<acc_t>(),
                                             M, sh.C, c_out, split.rows, sh.dividers(), sh.strides(g), sh.strides(x),
                                             sh.strides(offset));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial.sum(0);  // ordered reduction over the splits (no atomics)
}

at::Tensor fc_weight_grad(const at::Tensor& g, const at::Tensor& x, const at::Tensor& offset,
                          const at::Tensor& weight, const LineShape& sh) {
  const int64_t c_out = weight.size(0);
  if (sh.pixels() == 0 || c_out == 0 || sh.C == 0) return at::zeros(weight.sizes(), weight.options());
  return MIXOPS_GEMM_SWITCH(x.scalar_type(), tf32_allowed(), scalar_t, kTensorCores, [&] {
           return fc_weight_grad_t<scalar_t, kTensorCores>(g, x, offset, c_out, sh);
         })
      .to(weight.scalar_type());
}

// g [B, L, n, C_out] as the [pixels, C_out] matrix of db, for column_sum.cuh.
struct GradColumns {
  LineDividers d;
  LineStrides s;
  __device__ int64_t row(int64_t m) const {
    const PixelIndex p = pixel_index(m, d);
    return pixel_offset(s, p.b, p.l, p.q);
  }
  __device__ int64_t col(int64_t j) const { return j * s.c; }
  __device__ int64_t offset(int64_t r, int64_t c) const { return r + c; }
};

// db = g summed over the pixels, by fixed pixel ranges (at::sum over all pixels would split them
// across blocks by the device's SM count: ATen's setReduceConfig).
at::Tensor fc_bias_grad(const at::Tensor& g, const at::Tensor& x, const LineShape& sh) {
  const int64_t c_out = g.size(3);
  if (sh.pixels() == 0 || c_out == 0) return at::zeros({c_out}, x.options());
  return MIXOPS_FLOAT_SWITCH(x.scalar_type(), scalar_t, [&] {
           const GradColumns columns{sh.dividers(), sh.strides(g)};
           return column_sums(g.const_data_ptr<scalar_t>(), sh.pixels(), c_out, columns, g.options());
         })
      .to(x.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// Op entry points (registration.cpp)
// ---------------------------------------------------------------------------------------------

// Every entry point runs under x's device (its current stream included), whatever device is
// current: the checks have put every tensor there.
at::Tensor atm_sample_cuda(const at::Tensor& x, const at::Tensor& offset, std::string_view axis, int64_t share) {
  const char* op = "_atm_sample_cuda";
  check_device_and_dtype(op, c10::kCUDA, {{"x", x}, {"offset", offset}});
  const LineShape sh = atm::check_gather(op, x, offset, axis, share);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty(x.sizes(), x.options());
  launch_sample_forward(x, offset, out, sh);
  return out;
}

std::vector<at::Tensor> atm_sample_backward_cuda(at::TensorList grads, const c10::List<bool>& needs,
                                                 const at::Tensor& x, const at::Tensor& offset,
                                                 std::string_view axis, int64_t share) {
  const char* op = "_atm_sample_cuda_backward";
  check_device_and_dtype(op, c10::kCUDA, {{"x", x}, {"offset", offset}});
  const LineShape sh = atm::check_gather(op, x, offset, axis, share);
  atm::check_grads(op, grads, needs.size(), 2, x.sizes(), x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor gx = needs.get(0) ? at::empty(x.sizes(), x.options()) : at::Tensor();
  const at::Tensor goff = needs.get(1) ? at::empty(offset.sizes(), offset.options()) : at::Tensor();
  launch_sample_backward(grads[0], x, offset, gx, goff, sh);
  std::vector<at::Tensor> result;
  for (const auto& t : {gx, goff})
    if (t.defined()) result.push_back(t);
  return result;
}

at::Tensor atm_fc_cuda(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, std::string_view axis, int64_t share) {
  const char* op = "_atm_fc_cuda";
  check_device_and_dtype(op, c10::kCUDA, {{"x", x}, {"offset", offset}, {"weight", weight}});
  const LineShape sh = atm::check_gather(op, x, offset, axis, share);
  atm::check_fc(op, x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({x.size(0), x.size(1), x.size(2), weight.size(0)}, x.options());
  launch_fc_forward(x, offset, weight, bias, out, sh);
  return out;
}

std::vector<at::Tensor> atm_fc_backward_cuda(at::TensorList grads, const c10::List<bool>& needs, const at::Tensor& x,
                                             const at::Tensor& offset, const at::Tensor& weight,
                                             const std::optional<at::Tensor>& bias, std::string_view axis,
                                             int64_t share) {
  const char* op = "_atm_fc_cuda_backward";
  check_device_and_dtype(op, c10::kCUDA, {{"x", x}, {"offset", offset}, {"weight", weight}});
  const LineShape sh = atm::check_gather(op, x, offset, axis, share);
  atm::check_fc(op, x, weight, bias);
  atm::check_grads(op, grads, needs.size(), 4, {x.size(0), x.size(1), x.size(2), weight.size(0)}, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor& g = grads[0];
  std::vector<at::Tensor> result;
  if (needs.get(0) || needs.get(1)) {
    const at::Tensor ds = at::matmul(g, weight);  // [B,H,W,C], cuBLAS (deterministic, no split-K atomics)
    const at::Tensor gx = needs.get(0) ? at::empty(x.sizes(), x.options()) : at::Tensor();
    const at::Tensor goff = needs.get(1) ? at::empty(offset.sizes(), offset.options()) : at::Tensor();
    launch_sample_backward(ds, x, offset, gx, goff, sh);
    for (const auto& t : {gx, goff})
      if (t.defined()) result.push_back(t);
  }
  if (needs.get(2)) result.push_back(fc_weight_grad(g, x, offset, weight, sh));
  if (needs.get(3)) result.push_back(fc_bias_grad(g, x, sh));
  return result;
}

}  // namespace

}  // namespace mixops

TORCH_LIBRARY_IMPL(mixops, CUDA, m) {
  m.impl("_atm_sample_cuda", &mixops::atm_sample_cuda);
  m.impl("_atm_sample_cuda_backward", &mixops::atm_sample_backward_cuda);
  m.impl("_atm_fc_cuda", &mixops::atm_fc_cuda);
  m.impl("_atm_fc_cuda_backward", &mixops::atm_fc_backward_cuda);
}
