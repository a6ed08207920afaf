// The block tiles of the gathered-GEMM engine: one per (math, architecture), each naming its tile
// shape, pipeline depth, shared-memory layouts and CuTe TiledMMA. gemm/kernel.cuh runs them all
// with one mainloop; only the step that feeds the tensor cores differs (kWgmma).
//
//   Sm90Wgmma<T>  fp16/bf16 on sm_90a: 128x128x64, 3 stages, 2 warpgroups each issuing async
//                 wgmma.m64n128k16 straight from the swizzled shared tiles.
//   Sm80Mma<T>    fp16/bf16 on every other architecture from sm_80: 128x128x32, 4 stages, 8 warps
//                 of mma.sync.m16n8k16 fed by ldmatrix (.trans for operands contiguous along their
//                 rows); 64x128 or 128x64 for register-heavy launches (NarrowM, NarrowN).
//   Tf32Mma<>     fp32 where torch allows TF32 (tf32.h), every architecture from sm_80:
//                 128x128x16, 4 stages, mma.sync.m16n8k8 (wgmma's TF32 form takes K-major operands
//                 only; the dX and dW operands are contiguous along their rows). Operands rounded
//                 to TF32 (cvt.rna) as cuBLAS does. 64x128 or 128x64 for register-heavy launches.
// The mma.sync tiles keep their ring at 64 KB (the accumulator tile the epilogue stages is 66 KB):
// sm_86, sm_89 and sm_120 give a block at most 99 KB of shared memory, where 3 stages of K = 64
// (96 KB) plus the row shares did not fit.
//   Simt<T>       IEEE fp32 and fp64 (the exact-check dtype): 64x64x16, 3 stages, 256 threads of
//                 FMAs in the accumulator type; the same cp.async pipeline feeds it.
// Shared memory: every layout is a CuTe swizzle atom (GMMA's 128/64/32-byte ones, which ldmatrix
// and plain loads read without bank conflicts as well) tiled over [rows, K, stages].
#pragma once

#include <cute/tensor.hpp>  // first: the atom headers below rely on its declarations

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/mma_sm80.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/copy_traits_sm75.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm80.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/bfloat16.h>
#include <cutlass/half.h>
#include <cutlass/tfloat32.h>

#include <type_traits>

#include "operands.cuh"

namespace mixops::gemm {

namespace tiles_detail {
using namespace cute;

// A shared tile [kRows, kK, kStages] of element type T, contiguous along kMajor: the widest
// swizzle atom the contiguous extent fills.
template <typename T, Major kMajor, int kRows, int kK, int kStages>
auto smem_layout() {
  constexpr int kBytes = (kMajor == Major::K ? kK : kRows) * static_cast<int>(sizeof(T));
  static_assert(kBytes % 32 == 0, "the contiguous extent of a shared tile must be a multiple of 32 bytes");
  const auto shape = make_shape(Int<kRows>{}, Int<kK>{}, Int<kStages>{});
  if constexpr (kMajor == Major::K) {
    if constexpr (kBytes % 128 == 0) return tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, shape);
    else if constexpr (kBytes % 64 == 0) return tile_to_shape(GMMA::Layout_K_SW64_Atom<T>{}, shape);
    else return tile_to_shape(GMMA::Layout_K_SW32_Atom<T>{}, shape);
  } else {
    if constexpr (kBytes % 128 == 0) return tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{}, shape);
    else if constexpr (kBytes % 64 == 0) return tile_to_shape(GMMA::Layout_MN_SW64_Atom<T>{}, shape);
    else return tile_to_shape(GMMA::Layout_MN_SW32_Atom<T>{}, shape);
  }
}

constexpr GMMA::Major gmma_major(Major m) { return m == Major::K ? GMMA::Major::K : GMMA::Major::MN; }

}  // namespace tiles_detail

// What every tile names (kernel.cuh reads these):
//   Element (the operands' storage type), SmemT (how the shared tiles hold it), AccT,
//   kBM, kBN, kBK, kStages, kThreads, kAtomK (the K of one MMA instruction),
//   SmemLayout<Major, kRows> (a [kRows, kBK, kStages] layout), TiledMma<MajorA, MajorB>,
//   S2RAtom<Major> (sm_80 paths: shared -> register copy), kWgmma, kCompiledHere (whether this
//   compilation pass has the tile's instructions; the kernel traps where it has not, and the
//   host never launches it there), NarrowM / NarrowN (the tiles of a register-heavy launch,
//   kernel.cuh launch: a K-segmented epilogue's running sum or a heavy operand load beside the
//   accumulators; half the rows or half the columns).
template <typename T, int BM, int BN, int BK, int kStagesN, typename SmemType, int kAtomKN>
struct TileBase {
  using Element = T;
  using SmemT = SmemType;
  using AccT = Acc<T>;
  static constexpr int kBM = BM, kBN = BN, kBK = BK, kStages = kStagesN, kThreads = 256, kAtomK = kAtomKN;
  template <Major kMajor, int kRows>
  using SmemLayout = decltype(tiles_detail::smem_layout<SmemT, kMajor, kRows, BK, kStagesN>());
};

template <typename T>
struct Sm90Wgmma : TileBase<T, 128, 128, 64, 3, T, 16> {
  static_assert(std::is_same_v<T, cutlass::half_t> || std::is_same_v<T, cutlass::bfloat16_t>);
  static constexpr bool kWgmma = true;
  // the accumulators are wgmma's; a running sum is in shared memory
  using NarrowM = Sm90Wgmma;
  using NarrowN = Sm90Wgmma;
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static constexpr bool kCompiledHere = false;
#else
  static constexpr bool kCompiledHere = true;
#endif
  template <Major kA, Major kB>
  using TiledMma = decltype(cute::make_tiled_mma(
      cute::SM90::GMMA::ss_op_selector<T, T, float, cute::Shape<cute::_128, cute::_128, cute::_64>,
                                       tiles_detail::gmma_major(kA), tiles_detail::gmma_major(kB)>(),
      cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>{}));
};

// The mma.sync tiles hold 64 accumulators per thread at 128 x 128. Beside a K-segmented
// epilogue's running sum (64 more) ptxas spills on sm_80 (254 registers and 8 bytes of local
// memory for ATM's mix), and beside MorphFC's three-branch mixed operand as well (255
// registers, 200-400 bytes): those launches take half the tile (32 accumulators), along the
// heavy operand's axis (NarrowM: 64 rows, NarrowN: 64 columns).
template <typename T, int BM = 128, int BN = 128>
struct Sm80Mma : TileBase<T, BM, BN, 32, 4, T, 16> {
  static constexpr bool kWgmma = false;
  using NarrowM = Sm80Mma<T, 64, 128>;
  using NarrowN = Sm80Mma<T, 128, 64>;
  // sm_90a runs fp16/bf16 on Sm90Wgmma: no mma.sync copy of them there (a plain compute_90 PTX,
  // which later GPUs JIT, keeps one)
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 800 || defined(__CUDA_ARCH_FEAT_SM90_ALL))
  static constexpr bool kCompiledHere = false;
#else
  static constexpr bool kCompiledHere = true;
#endif
  using Atom = std::conditional_t<std::is_same_v<T, cutlass::half_t>, cute::SM80_16x8x16_F32F16F16F32_TN,
                                  cute::SM80_16x8x16_F32BF16BF16F32_TN>;
  template <Major, Major>
  using TiledMma = decltype(cute::make_tiled_mma(Atom{}, cute::Layout<cute::Shape<cute::_4, cute::_2, cute::_1>>{},
                                                 cute::Tile<cute::_64, cute::_32, cute::_16>{}));
  template <Major kMajor>
  using S2RAtom = cute::Copy_Atom<std::conditional_t<kMajor == Major::K, cute::SM75_U32x4_LDSM_N,
                                                     cute::SM75_U16x8_LDSM_T>,
                                  T>;
};

template <int BM = 128, int BN = 128>
struct Tf32Mma : TileBase<float, BM, BN, 16, 4, cutlass::tfloat32_t, 8> {
  static constexpr bool kWgmma = false;
  using NarrowM = Tf32Mma<64, 128>;  // as Sm80Mma's
  using NarrowN = Tf32Mma<128, 64>;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  static constexpr bool kCompiledHere = false;
#else
  static constexpr bool kCompiledHere = true;
#endif
  template <Major, Major>
  using TiledMma = decltype(cute::make_tiled_mma(cute::SM80_16x8x8_F32TF32TF32F32_TN{},
                                                 cute::Layout<cute::Shape<cute::_4, cute::_2, cute::_1>>{},
                                                 cute::Tile<cute::_64, cute::_32, cute::_8>{}));
  template <Major>
  using S2RAtom = cute::Copy_Atom<cute::DefaultCopy, cutlass::tfloat32_t>;
};

template <typename T>
struct Simt : TileBase<T, 64, 64, 16, 3, T, 1> {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  static constexpr bool kWgmma = false;
  // 16 accumulators per thread: room for either
  using NarrowM = Simt;
  using NarrowN = Simt;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  static constexpr bool kCompiledHere = false;  // the ring is filled by cp.async
#else
  static constexpr bool kCompiledHere = true;
#endif
  template <Major, Major>
  using TiledMma = decltype(cute::make_tiled_mma(cute::UniversalFMA<T, T, T, T>{},
                                                 cute::Layout<cute::Shape<cute::_16, cute::_16, cute::_1>>{}));
  template <Major>
  using S2RAtom = cute::Copy_Atom<cute::DefaultCopy, T>;
};

}  // namespace mixops::gemm
