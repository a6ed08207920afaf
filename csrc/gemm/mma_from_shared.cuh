// One block-wide GEMM step on the mma.sync and FMA tiles (gemm/tiles.cuh): acc += A B^T for an A
// tile [M, K] and a B tile [N, K] that are already in shared memory, k-blocks at or past `k_valid`
// skipped. The engine's mainloop (gemm/kernel.cuh) runs it on each pipeline stage; the attention
// kernels (window_attention_kernels.cuh) on their Q, K, V, P and dO tiles, including transposed
// views of them (an operand is K-major or Rows-major by its layout; S2RAtom picks ldmatrix or
// ldmatrix.trans for it).
#pragma once

#include <cute/tensor.hpp>

#include <type_traits>

#include <cutlass/tfloat32.h>

#include "operands.cuh"

namespace mixops::gemm {

// Round the fp32 bits of a TF32 operand fragment to nearest (ties away), as cuBLAS does; the
// tensor cores would truncate the low 13 bits.
template <class Fragment>
__device__ __forceinline__ void round_to_tf32(Fragment&& frag) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  CUTE_UNROLL
  for (int i = 0; i < cute::size(frag); ++i) {
    // (through the storage member: a reference cast of a fragment element sends it to local memory)
    uint32_t rounded;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(rounded) : "f"(__uint_as_float(frag(i).storage)));
    frag(i).storage = rounded;
  }
#endif
}

// acc (a TiledMma C fragment of [M, N]) += sA [M, K] * sB [N, K]^T, both CuTe shared-memory
// tensors of Tile::SmemT; kMajorA / kMajorB say which of their axes is contiguous.
template <class Tile, Major kMajorA, Major kMajorB, class TiledMma, class TensorA, class TensorB, class Accum>
__device__ __forceinline__ void mma_from_shared(const TiledMma& mma, const TensorA& sA, const TensorB& sB, Accum& acc,
                                                int k_valid) {
  using namespace cute;
  auto s2r_a = make_tiled_copy_A(typename Tile::template S2RAtom<kMajorA>{}, mma);
  auto s2r_b = make_tiled_copy_B(typename Tile::template S2RAtom<kMajorB>{}, mma);
  auto thr_mma = mma.get_slice(threadIdx.x);
  auto thr_a = s2r_a.get_slice(threadIdx.x);
  auto thr_b = s2r_b.get_slice(threadIdx.x);
  Tensor tXsA = thr_a.partition_S(sA);  // (CPY, MMA_M, MMA_K)
  Tensor tXsB = thr_b.partition_S(sB);
  Tensor tCrA = thr_mma.partition_fragment_A(sA);  // (MMA, MMA_M, MMA_K)
  Tensor tCrB = thr_mma.partition_fragment_B(sB);
  Tensor tXrA = thr_a.retile_D(tCrA);
  Tensor tXrB = thr_b.retile_D(tCrB);
  // every k-block goes through the registers of k-block 0 (the others are never touched, so they
  // take no registers): MMA_K sets at once would be 64 more registers next to the engine's 64
  // accumulators, and ptxas spilled the fp16/bf16 tiles on sm_80. At most 16 k-blocks unrolled:
  // the FMA tiles' k-blocks are single k, and the attention's K = 64 unrolled whole let ptxas hoist
  // every k's shared loads ahead of the FMAs (255 registers and 260 bytes of spills for fp32).
  constexpr int kUnroll = Tile::kAtomK == 1 ? 4 : 16;
#pragma unroll(kUnroll)
  for (int kb = 0; kb < size<2>(tCrA); ++kb) {
    if (kb * Tile::kAtomK >= k_valid) break;
    copy(s2r_a, tXsA(_, _, kb), tXrA(_, _, 0));
    copy(s2r_b, tXsB(_, _, kb), tXrB(_, _, 0));
    if constexpr (std::is_same_v<typename Tile::SmemT, cutlass::tfloat32_t>) {
      round_to_tf32(tCrA(_, _, 0));
      round_to_tf32(tCrB(_, _, 0));
    }
    cute::gemm(mma, tCrA(_, _, 0), tCrB(_, _, 0), acc);
  }
}

}  // namespace mixops::gemm
