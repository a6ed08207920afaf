// MorphFC chunked token FC (mixops::_morph_fc_cuda / _morph_fc_cuda_backward), CUDA backend.
//
// What it computes. Every axis ("w", "h", "hs", "t") is ONE GEMM  Y_g = X_g @ W^T (+ bias)  with
// M rows and F features, X_g being x seen through the chunk index map of morph_fc_map.cuh (the
// map of kernels/morph_fc.py). The A tile is gathered from x through the map into shared
// memory and the output tile is scattered back through it in the epilogue: no permuted copy of
// x reaches HBM. The bias is indexed by the GEMM feature (p*D + s / t*D + s).
// Backward: dX = scatter(dY_g @ W) (the same kernel, W not transposed); dW = dY_g^T @ X_g and
// db = colsum(dY_g) (column_sum.cuh), each split over M into fixed row ranges by the shapes alone
// (common.cuh split_rows, the rule of the Triton kernels) whose partials [SPLIT, F, F] / [SPLIT', F]
// (accumulator type) are summed by at::sum over the split axis: deterministic, no atomics, and
// the same bits on every GPU model.
//
// Math: fp16 (sm_75+) and bf16 (sm_80+) on tensor cores through WMMA 16x16x16 with fp32
// accumulators; fp32 on TF32 WMMA 16x16x8 (sm_80+) only when torch allows TF32 for cuBLAS,
// else IEEE fp32 FMAs (SIMT, 4x8 outputs per thread). bf16 on sm_75 falls back to SIMT.
// fp64 storage runs the same SIMT path with fp64 accumulators, output tile and partials (no
// tensor cores: it is the exact-check dtype, matched against the float64 reference).
//
// FLOPs (numel = M*F = x.numel()): forward 2*numel*F; backward 2*numel*F for dX plus 2*numel*F
// for dW. Minimal HBM bytes (e = element size): forward 2*numel*e + F*F*e; backward dX
// 2*numel*e + F*F*e, dW/db 2*numel*e + F*(F+1)*e, plus (SPLIT*F*F + SPLIT'*F)*4 bytes of
// partials written and re-read (8 bytes each for fp64; db re-reads dY: + numel*e).
//
// Grids (128 threads per block, tile 64 x 64, K step 32):
//   gathered GEMM (forward, dX): (cdiv(M, 64) * cdiv(F, 64),), the F tiles of one row block
//     adjacent so its gathered rows are re-read from L2;
//   grad weight: (cdiv(F, 64) * cdiv(F, 64), SPLIT), about 256 blocks in all;
//   grad bias: (cdiv(F, 128), SPLIT'), about 256 blocks in all (column_sum.cuh).
//
// Verified only on the CPU: the index map (the CPU implementation in morph_fc_cpu.cpp runs the
// same functions). The tiling, shared-memory staging and WMMA fragments below have not run on
// a GPU yet (the Python backend is registered with auto=False).
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <limits>
#include <type_traits>

#include "column_sum.cuh"
#include "common.cuh"
#include "morph_fc_args.cuh"
#include "tensor_checks.h"
#include "tf32.h"

namespace mixops {

namespace {

using morph_fc::Geometry;
using morph_fc::Part;
using morph_fc::Strides;

constexpr int kThreads = 128;  // 4 warps in a 2 x 2 grid of 32 x 32 warp tiles
constexpr int kBM = 64;        // tile rows (GEMM rows; dW rows n)
constexpr int kBN = 64;        // tile columns (GEMM features; dW columns f)
constexpr int kBK = 32;        // reduction step (features; GEMM rows for dW)
// Leading dimensions of the shared tiles, padded by 8 elements against bank conflicts while
// keeping every WMMA fragment pointer 32-byte aligned and ldm a multiple of 16 bytes.
constexpr int kLdA = kBK + 8;   // A as [kBM][kLdA] (row-major, forward / dX)
constexpr int kLdAT = kBM + 8;  // A^T as [kBK][kLdAT] (dW: A = dY_g^T is stored as dY_g)
constexpr int kLdB = kBN + 8;   // B as [kBK][kLdB]
constexpr int kLdC = kBN + 4;   // fp32 output tile [kBM][kLdC]
constexpr int kTileA = kBM * kLdA > kBK * kLdAT ? kBM * kLdA : kBK * kLdAT;

// at::Half / at::BFloat16 -> the CUDA types WMMA takes (same bits).
template <typename T>
struct DeviceType {
  using type = T;
};
template <>
struct DeviceType<at::Half> {
  using type = __half;
};
template <>
struct DeviceType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// Storage -> accumulator (the return type is Acc<T>).
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Accumulator -> storage, round to nearest.
template <typename T>
__device__ __forceinline__ T from_acc(Acc<T> v);
template <>
__device__ __forceinline__ double from_acc<double>(double v) {
  return v;
}
template <>
__device__ __forceinline__ float from_acc<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }

// Shared memory of both GEMM kernels: the operand tiles of one K step (A then B, storage
// type), reused as the output tile (accumulator type) once the K loop is done. Raw bytes,
// because the CUDA half types are not trivially constructible under torch's flags. fp64 needs
// 38,912 bytes, under the 48 KiB of static shared memory.
template <typename T>
struct GemmSmem {
  static constexpr int kBytesAB = (kTileA + kBK * kLdB) * static_cast<int>(sizeof(T));
  static constexpr int kBytesC = kBM * kLdC * static_cast<int>(sizeof(Acc<T>));
  static constexpr int kBytes = kBytesAB > kBytesC ? kBytesAB : kBytesC;
  unsigned char* raw;
  __device__ T* a() const { return reinterpret_cast<T*>(raw); }
  __device__ T* b() const { return reinterpret_cast<T*>(raw) + kTileA; }  // kTileA * sizeof(T) % 32 == 0
  __device__ Acc<T>* c() const { return reinterpret_cast<Acc<T>*>(raw); }
};

// ---------------------------------------------------------------------------------------------
// Block MMA: a 64 x 64 accumulator (Acc<T>) fed with shared tiles A (64 x 32; row-major
// [kBM][kLdA], or stored transposed as [kBK][kLdAT] when kATransposed) and B ([kBK][kLdB]).
// ---------------------------------------------------------------------------------------------

// IEEE FMAs in Acc<T> (fp32; fp64 for fp64). Thread (ty, tx) = (tid / 8, tid % 8) owns rows
// ty + 16i and columns tx + 8j: a warp reads 4 A values (broadcast) and 32 consecutive B values
// per k.
template <typename T, bool kATransposed>
struct SimtMma {
  using AccT = Acc<T>;
  AccT acc[4][8] = {};

  __device__ void step(const T* a, const T* b) {
    const int tx = threadIdx.x % 8, ty = threadIdx.x / 8;
#pragma unroll 4
    for (int k = 0; k < kBK; ++k) {
      AccT av[4], bv[8];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        av[i] = to_acc(kATransposed ? a[k * kLdAT + ty + 16 * i] : a[(ty + 16 * i) * kLdA + k]);
#pragma unroll
      for (int j = 0; j < 8; ++j) bv[j] = to_acc(b[k * kLdB + tx + 8 * j]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fma_acc(av[i], bv[j], acc[i][j]);
    }
  }

  __device__ void store(AccT* c) const {
    const int tx = threadIdx.x % 8, ty = threadIdx.x / 8;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) c[(ty + 16 * i) * kLdC + tx + 8 * j] = acc[i][j];
  }
};

// Operand fragments enter the mma as loaded, except TF32 ones: they load fp32 and must be
// rounded to TF32 first (a specialization, since the TF32 names exist only for sm_80+).
template <typename FragT>
struct RoundOperand {
  template <typename Frag>
  __device__ static void apply(Frag&) {}
};
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
template <>
struct RoundOperand<nvcuda::wmma::precision::tf32> {
  template <typename Frag>
  __device__ static void apply(Frag& f) {
#pragma unroll
    for (int t = 0; t < f.num_elements; ++t) f.x[t] = nvcuda::wmma::__float_to_tf32(f.x[t]);
  }
};
#endif

// Tensor cores: warp (wm, wn) owns the 32 x 32 sub-tile at (32 wm, 32 wn), 2 x 2 fragments of
// 16 x 16; FragT is the fragment element type (the storage type, or precision::tf32 for fp32
// storage, whose fragments load fp32 and must be rounded to TF32 before the mma).
template <typename T, typename FragT, int kK, bool kATransposed>
struct WmmaMma {
  using ALayout = std::conditional_t<kATransposed, nvcuda::wmma::col_major, nvcuda::wmma::row_major>;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kK, float> acc[2][2];

  __device__ WmmaMma() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }

  __device__ void step(const T* a, const T* b) {
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += kK) {
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, kK, FragT, ALayout> fa[2];
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, kK, FragT, nvcuda::wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int m = 32 * wm + 16 * i;
        if constexpr (kATransposed)
          nvcuda::wmma::load_matrix_sync(fa[i], a + kk * kLdAT + m, kLdAT);
        else
          nvcuda::wmma::load_matrix_sync(fa[i], a + m * kLdA + kk, kLdA);
        RoundOperand<FragT>::apply(fa[i]);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        nvcuda::wmma::load_matrix_sync(fb[j], b + kk * kLdB + 32 * wn + 16 * j, kLdB);
        RoundOperand<FragT>::apply(fb[j]);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) nvcuda::wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }

  __device__ void store(float* c) const {
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(c + (32 * wm + 16 * i) * kLdC + 32 * wn + 16 * j, acc[i][j], kLdC,
                                        nvcuda::wmma::mem_row_major);
  }
};

// Which block MMA a (storage type, tensor cores) pair (common.cuh MIXOPS_GEMM_SWITCH) runs on the
// architecture being compiled: the tensor-core types exist only where the hardware has them
// (bf16 / tf32 WMMA need sm_80), everything else (fp64 included) is the IEEE SIMT path.
template <typename T, bool kTensorCores, bool kATransposed>
struct SelectMma {
  using type = SimtMma<T, kATransposed>;
};
template <bool kATransposed>
struct SelectMma<__half, true, kATransposed> {
  using type = WmmaMma<__half, __half, 16, kATransposed>;
};
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
template <bool kATransposed>
struct SelectMma<__nv_bfloat16, true, kATransposed> {
  using type = WmmaMma<__nv_bfloat16, __nv_bfloat16, 16, kATransposed>;
};
template <bool kATransposed>
struct SelectMma<float, true, kATransposed> {
  using type = WmmaMma<float, nvcuda::wmma::precision::tf32, 8, kATransposed>;
};
#endif

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// C_g[m, n] = sum_f A_g[m, f] * B[f, n] (+ bias[n]), A_g gathered and C_g scattered by the map.
//   a:    [B, T, H, W, C] input of the map (x forward, dY for dX), strides sa
//   b:    [F, F] matrix read as B[f, n] = b[f*sb_k + n*sb_n] (W^T forward, W for dX)
//   bias: [F] indexed by GEMM feature, stride s_bias; nullptr for none
//   out:  [B, T, H, W, C] output (y forward, dX backward), strides so; must not overlap itself
//   g:    M, F and the map's parameters (morph_fc_map.cuh)
// Block (m_tile, n_tile) = (blockIdx.x / cdiv(F, 64), blockIdx.x % cdiv(F, 64)).
template <typename T, bool kTensorCores>
__global__ void __launch_bounds__(kThreads)
    gathered_gemm_kernel(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ bias,
                         T* __restrict__ out, Geometry g, Strides sa, Strides so, int64_t sb_k, int64_t sb_n,
                         int64_t s_bias) {
  __shared__ __align__(128) unsigned char smem_raw[GemmSmem<T>::kBytes];
  const GemmSmem<T> smem{smem_raw};
  __shared__ Part rows[kBM];                         // row parts of the tile's rows
  __shared__ Part feats[kBK > kBN ? kBK : kBN];      // feature parts of the K step / of the output columns
  const int tid = threadIdx.x;
  const int64_t num_n = cdiv(g.F, kBN);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x / num_n) * kBM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x % num_n) * kBN;
  // the row-side divisions of the map, once per block
  for (int i = tid; i < kBM; i += kThreads)
    if (row0 + i < g.M) rows[i] = morph_fc::row_part(g, sa, row0 + i);
  // B is W^T (forward: contiguous along f) or W (dX: contiguous along n): walk the contiguous side
  // with consecutive threads
  const bool b_k_fastest = sb_k == 1;
  typename SelectMma<T, kTensorCores, false>::type mma;
  for (int64_t k0 = 0; k0 < g.F; k0 += kBK) {
    __syncthreads();  // the previous step is done with the tiles and the feature parts
    if (tid < kBK && k0 + tid < g.F) feats[tid] = morph_fc::feature_part(g, sa, k0 + tid);
    __syncthreads();
    // A: consecutive threads along f, i.e. along the channels of a group (contiguous in x)
    for (int e = tid; e < kBM * kBK; e += kThreads) {
      const int r = e / kBK, kk = e % kBK;
      const bool ok = row0 + r < g.M && k0 + kk < g.F;
      smem.a()[r * kLdA + kk] = ok ? a[morph_fc::combine(g, sa, rows[r], feats[kk])] : from_acc<T>(0);
    }
    for (int e = tid; e < kBK * kBN; e += kThreads) {
      const int kk = b_k_fastest ? e % kBK : e / kBN, n = b_k_fastest ? e / kBK : e % kBN;
      const bool ok = k0 + kk < g.F && col0 + n < g.F;
      smem.b()[kk * kLdB + n] = ok ? b[(k0 + kk) * sb_k + (col0 + n) * sb_n] : from_acc<T>(0);
    }
    __syncthreads();
    mma.step(smem.a(), smem.b());
  }
  __syncthreads();  // the tiles become the output tile
  mma.store(smem.c());
  for (int i = tid; i < kBM; i += kThreads)
    if (row0 + i < g.M) rows[i] = morph_fc::row_part(g, so, row0 + i);
  for (int j = tid; j < kBN; j += kThreads)
    if (col0 + j < g.F) feats[j] = morph_fc::feature_part(g, so, col0 + j);
  __syncthreads();
  for (int e = tid; e < kBM * kBN; e += kThreads) {
    const int r = e / kBN, j = e % kBN;
    if (row0 + r >= g.M || col0 + j >= g.F) continue;
    Acc<T> v = smem.c()[r * kLdC + j];
    if (bias != nullptr) v += to_acc(bias[(col0 + j) * s_bias]);
    out[morph_fc::combine(g, so, rows[r], feats[j])] = from_acc<T>(v);
  }
}

// Split-M partial of dW = dY_g^T @ X_g: dw_part[split, n, f] = sum over the split's rows m of
// dY_g[m, n] * X_g[m, f].
//   dy:      [B, T, H, W, C] incoming gradient (may be expanded), strides sy
//   x:       [B, T, H, W, C] forward input, strides sx
//   dw_part: [SPLIT, F, F] Acc<T> (fp32; fp64 for fp64), contiguous
//   rows_per_split: rows of one split (a multiple of 32); split = blockIdx.y
// Block (n_tile, f_tile) = (blockIdx.x / cdiv(F, 64), blockIdx.x % cdiv(F, 64)).
template <typename T, bool kTensorCores>
__global__ void __launch_bounds__(kThreads)
    grad_weight_kernel(const T* __restrict__ dy, const T* __restrict__ x, Acc<T>* __restrict__ dw_part, Geometry g,
                       Strides sy, Strides sx, int64_t rows_per_split) {
  __shared__ __align__(128) unsigned char smem_raw[GemmSmem<T>::kBytes];
  const GemmSmem<T> smem{smem_raw};
  __shared__ Part y_feats[kBM], x_feats[kBN];  // feature parts of the tile's n / f
  __shared__ Part y_rows[kBK], x_rows[kBK];    // row parts of the K step's rows m
  const int tid = threadIdx.x;
  const int64_t num_f = cdiv(g.F, kBN);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x / num_f) * kBM;
  const int64_t f0 = static_cast<int64_t>(blockIdx.x % num_f) * kBN;
  const int64_t start = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t end = start + rows_per_split < g.M ? start + rows_per_split : g.M;
  for (int i = tid; i < kBM; i += kThreads)
    if (n0 + i < g.F) y_feats[i] = morph_fc::feature_part(g, sy, n0 + i);
  for (int j = tid; j < kBN; j += kThreads)
    if (f0 + j < g.F) x_feats[j] = morph_fc::feature_part(g, sx, f0 + j);
  typename SelectMma<T, kTensorCores, true>::type mma;
  for (int64_t m0 = start; m0 < end; m0 += kBK) {
    __syncthreads();
    if (tid < kBK && m0 + tid < end) y_rows[tid] = morph_fc::row_part(g, sy, m0 + tid);
    if (tid >= kBK && tid < 2 * kBK && m0 + tid - kBK < end) x_rows[tid - kBK] = morph_fc::row_part(g, sx, m0 + tid - kBK);
    __syncthreads();
    // A^T[kk][i] = dY_g[m0 + kk, n0 + i] and B[kk][j] = X_g[m0 + kk, f0 + j]: consecutive threads
    // along the features (the channels of a group)
    for (int e = tid; e < kBK * kBM; e += kThreads) {
      const int kk = e / kBM, i = e % kBM;
      const bool ok = m0 + kk < end && n0 + i < g.F;
      smem.a()[kk * kLdAT + i] = ok ? dy[morph_fc::combine(g, sy, y_rows[kk], y_feats[i])] : from_acc<T>(0);
    }
    for (int e = tid; e < kBK * kBN; e += kThreads) {
      const int kk = e / kBN, j = e % kBN;
      const bool ok = m0 + kk < end && f0 + j < g.F;
      smem.b()[kk * kLdB + j] = ok ? x[morph_fc::combine(g, sx, x_rows[kk], x_feats[j])] : from_acc<T>(0);
    }
    __syncthreads();
    mma.step(smem.a(), smem.b());
  }
  __syncthreads();
  mma.store(smem.c());
  __syncthreads();
  Acc<T>* part = dw_part + static_cast<int64_t>(blockIdx.y) * g.F * g.F;
  for (int e = tid; e < kBM * kBN; e += kThreads) {
    const int i = e / kBN, j = e % kBN;
    if (n0 + i < g.F && f0 + j < g.F) part[(n0 + i) * g.F + f0 + j] = smem.c()[i * kLdC + j];
  }
}

// dY_g as the [M, F] matrix of db = colsum(dY_g), for column_sum.cuh: the row and feature parts
// of the map, added per element.
struct GradColumns {
  Geometry g;
  Strides s;
  __device__ Part row(int64_t m) const { return morph_fc::row_part(g, s, m); }
  __device__ Part col(int64_t n) const { return morph_fc::feature_part(g, s, n); }
  __device__ int64_t offset(const Part& r, const Part& c) const { return morph_fc::combine(g, s, r, c); }
};

// ---------------------------------------------------------------------------------------------
// Heuristics and host launchers
// ---------------------------------------------------------------------------------------------

// The fixed row ranges of dW: about 256 blocks over the dW tiles, whole K steps (shapes only).
RowSplit grad_weight_split(const Geometry& g) { return split_rows(g.M, kBK, cdiv(g.F, kBM) * cdiv(g.F, kBN)); }

template <typename T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

// out <- scatter(gather(a) @ (weight^T if transpose_weight else weight) (+ bias)), on tensor cores
// or not (common.cuh MIXOPS_GEMM_SWITCH).
template <typename scalar_t, bool kTensorCores>
void launch_gathered_gemm(const Geometry& g, const at::Tensor& a, const at::Tensor& weight, bool transpose_weight,
                          const std::optional<at::Tensor>& bias, at::Tensor& out) {
  using T = typename DeviceType<scalar_t>::type;
  const int64_t sb_k = transpose_weight ? weight.stride(1) : weight.stride(0);
  const int64_t sb_n = transpose_weight ? weight.stride(0) : weight.stride(1);
  const int64_t blocks = cdiv(g.M, kBM) * cdiv(g.F, kBN);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "morph_fc: x is too large for one launch (", blocks,
              " blocks of 64 x 64)");
  const auto stream = at::cuda::getCurrentCUDAStream();
  gathered_gemm_kernel<T, kTensorCores><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      ptr<T>(a), ptr<T>(weight), bias.has_value() ? ptr<T>(*bias) : nullptr,
      reinterpret_cast<T*>(out.mutable_data_ptr()), g, morph_fc::strides5(a), morph_fc::strides5(out), sb_k, sb_n,
      bias.has_value() ? bias->stride(0) : 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dW = dY_g^T @ X_g in the weight's dtype: partials over the fixed row ranges, summed in order.
template <typename scalar_t, bool kTensorCores>
at::Tensor grad_weight(const Geometry& g, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight) {
  using T = typename DeviceType<scalar_t>::type;
  const RowSplit split = grad_weight_split(g);
  at::Tensor part = at::empty({split.count, g.F, g.F}, x.options().dtype(kAccDtype<T>));
  const dim3 grid(static_cast<unsigned>(cdiv(g.F, kBM) * cdiv(g.F, kBN)), static_cast<unsigned>(split.count));
  grad_weight_kernel<T, kTensorCores><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      ptr<T>(dy), ptr<T>(x), part.mutable_data_ptr<Acc<T>>(), g, morph_fc::strides5(dy), morph_fc::strides5(x),
      split.rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // at::sum over the split axis adds the partials in a fixed order: deterministic
  return part.sum(0).to(weight.scalar_type());
}

// db = colsum(dY_g) in the bias's dtype.
template <typename scalar_t>
at::Tensor grad_bias(const Geometry& g, const at::Tensor& dy, const at::Tensor& bias) {
  using T = typename DeviceType<scalar_t>::type;
  return column_sums(ptr<T>(dy), g.M, g.F, GradColumns{g, morph_fc::strides5(dy)}, dy.options())
      .to(bias.scalar_type());
}

// Every entry point runs under x's device (its current stream included), whatever device is
// current: the checks have put every tensor there.
at::Tensor morph_fc_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         int64_t segment_dim, const std::string& axis) {
  check_device_and_dtype("morph_fc", c10::kCUDA, {{"x", x}});
  const Geometry g = morph_fc::check_forward_args(x, weight, bias, segment_dim, axis);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (g.M == 0 || g.F == 0) return out;
  MIXOPS_GEMM_SWITCH(x.scalar_type(), tf32_allowed(), scalar_t, kTensorCores, [&] {
    launch_gathered_gemm<scalar_t, kTensorCores>(g, x, weight, /*transpose_weight=*/true, bias, out);
  });
  return out;
}

std::vector<at::Tensor> morph_fc_backward_cuda(at::TensorList grads, const c10::List<bool>& needs, const at::Tensor& x,
                                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                               int64_t segment_dim, const std::string& axis) {
  check_device_and_dtype("morph_fc backward", c10::kCUDA, {{"x", x}});
  const Geometry g = morph_fc::check_forward_args(x, weight, bias, segment_dim, axis);
  const morph_fc::BackwardNeeds need = morph_fc::check_backward_args(grads, needs, x, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor& dy = grads[0];
  const bool empty = g.M == 0 || g.F == 0;
  std::vector<at::Tensor> result;
  if (need.x) {
    at::Tensor dx = at::empty(x.sizes(), x.options());
    if (!empty)
      MIXOPS_GEMM_SWITCH(x.scalar_type(), tf32_allowed(), scalar_t, kTensorCores, [&] {
        launch_gathered_gemm<scalar_t, kTensorCores>(g, dy, weight, /*transpose_weight=*/false, std::nullopt, dx);
      });
    result.push_back(dx);
  }
  if (need.weight)
    result.push_back(empty ? at::zeros({g.F, g.F}, weight.options())
                           : MIXOPS_GEMM_SWITCH(x.scalar_type(), tf32_allowed(), scalar_t, kTensorCores, [&] {
                               return grad_weight<scalar_t, kTensorCores>(g, dy, x, weight);
                             }));
  if (need.bias)
    result.push_back(empty ? at::zeros({g.F}, bias->options()) : MIXOPS_FLOAT_SWITCH(x.scalar_type(), scalar_t, [&] {
      return grad_bias<scalar_t>(g, dy, *bias);
    }));
  return result;
}

}  // namespace

}  // namespace mixops

TORCH_LIBRARY_IMPL(mixops, CUDA, m) {
  m.impl("_morph_fc_cuda", &mixops::morph_fc_cuda);
  m.impl("_morph_fc_cuda_backward", &mixops::morph_fc_backward_cuda);
}
