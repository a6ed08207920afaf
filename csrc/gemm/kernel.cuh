// The gathered-GEMM engine: every CUDA GEMM of mixops (MorphFC's forward, dX and dW; ATM's
// fused gather-FC, its dS and dW) is this kernel with a family's operands and epilogue
// (gemm/operands.cuh). Built on CuTe: its TiledMMA atoms issue the tensor-core instructions
// (wgmma on sm_90a, mma.sync on sm_80+, FMAs for IEEE fp32/fp64) and its swizzled layouts
// address the shared tiles; the operand loads are the engine's own (gemm/tile_loader.cuh),
// because a family's index map is not an affine layout a TMA descriptor or a CuTe copy could
// describe.
//
// One block computes a kBM x kBN tile of C over its K range (the whole K, or one range of a
// split fixed by the shapes: common.cuh split_rows) in steps of kBK through a kStages-deep ring:
//
//   prologue: stages 0 .. S-2 are filled (cp.async groups, or registers stored directly)
//   step k:   wait until stage k landed (cp.async.wait_group S-2; barrier)
//             MMAs on stage k (sm_90a: issued async)
//             sm_90a: wgmma.wait_group 1 (step k-1 retired), barrier: its stage is free
//             fill stage (k+S-1) % S = (k-1) % S: cp.async, or a computed operand's gather
//             (on sm_90a while step k's wgmma runs)
//
// K tails: a step past the end of the block's K range is zero-filled, and the MMAs of its
// k-blocks wholly past the end are skipped (F = 112 at kBK = 64 runs 7 of 8 k-blocks, not 8).
// K segments (an epilogue with kSegments): the K range runs as consecutive ranges, the ring
// drained after each, whose accumulators the epilogue's fold scales into a running sum (shared
// memory on sm_90a, registers otherwise: launch runs those on the tile's NarrowM, 64 rows)
// before they are cleared for the next.
// Epilogue: the accumulators go through shared memory (the ring is free by then) so that the
// family's store map sees consecutive n on consecutive threads and evaluates its row share once
// per row (staged in shared memory) and its column share once per thread; an epilogue with tile
// sums (gemm/tile_sums.cuh) then reduces the same shared tile.
//
// Grid: (tiles_m * tiles_n, splits, groups); block b covers rows (b / tiles_n) * kBM and columns
// (b % tiles_n) * kBN, so the column tiles of one row tile are adjacent in launch order and the
// gathered rows they share are re-read from L2; grid z is the GEMM of a grouped launch
// (Problem.groups, gemm/operands.cuh for_group).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cute/tensor.hpp>

#include <limits>
#include <type_traits>

#include "mma_from_shared.cuh"
#include "operands.cuh"
#include "tile_loader.cuh"
#include "tile_sums.cuh"
#include "tiles.cuh"

namespace mixops::gemm {

// Shared memory of one launch: the ring of A and B stages, reused after the K loop as the
// accumulator tile [kBM][kBN + 4] followed by the epilogue's row shares.
template <class Tile, class OpA, class OpB, class Epi>
struct SmemPlan {
  using SmemA = typename Tile::template SmemLayout<OpA::kMajor, Tile::kBM>;
  using SmemB = typename Tile::template SmemLayout<OpB::kMajor, Tile::kBN>;
  static constexpr int kLdC = Tile::kBN + 4;  // +4 words: the 16x8 fragment rows land in different banks
  static constexpr size_t kRing =
      (cute::cosize_v<SmemA> + cute::cosize_v<SmemB>) * sizeof(typename Tile::SmemT);
  static constexpr size_t kAccTile = static_cast<size_t>(Tile::kBM) * kLdC * sizeof(typename Tile::AccT);
  static constexpr size_t kRowShares = (Tile::kBM * sizeof(typename Epi::Row) + 15) / 16 * 16;
  // the column shares, staged only for an epilogue's tile sums (gemm/tile_sums.cuh)
  static constexpr size_t kColShares = kHasTileSums<Epi> ? Tile::kBN * sizeof(typename Epi::Col) : 0;
  static constexpr size_t kEpilogue = kAccTile + kRowShares + kColShares;
  // after the ring / epilogue region: the K-major loaders' row shares, live for the whole kernel
  static constexpr size_t kLoaderShares = ((kRing > kEpilogue ? kRing : kEpilogue) + 15) / 16 * 16;
  static constexpr size_t kSharesA = OpA::kMajor == Major::K ? Tile::kBM * sizeof(typename OpA::Row) : 0;
  static constexpr size_t kSharesB = OpB::kMajor == Major::K ? Tile::kBN * sizeof(typename OpB::Row) : 0;
  // K segments (kHasSegments): the fold's row and column shares, live for the whole kernel, and
  // on sm_90a the running sum (wgmma's accumulators leave no registers for a second set; the
  // other tiles keep it in registers)
  static constexpr bool kSegmented = kHasSegments<Epi>;
  static constexpr size_t kSegRows = kSegmented ? (Tile::kBM * sizeof(typename Epi::Row) + 15) / 16 * 16 : 0;
  static constexpr size_t kSegCols = kSegmented ? (Tile::kBN * sizeof(typename Epi::Col) + 15) / 16 * 16 : 0;
  static constexpr size_t kSegTotal = kSegmented && Tile::kWgmma ? kAccTile : 0;
  static constexpr size_t kSegBase = (kLoaderShares + kSharesA + kSharesB + 15) / 16 * 16;
  static constexpr size_t kBytes = kSegBase + kSegRows + kSegCols + kSegTotal;
};

template <class Tile, class OpA, class OpB, class Epi>
__global__ void __launch_bounds__(Tile::kThreads, 1)
    gathered_gemm_kernel(Problem p, OpA group_a, OpB group_b, Epi group_epi) {
  using namespace cute;
  if constexpr (!Tile::kCompiledHere) {
    __trap();  // never launched: the host picks the tile of the device's architecture
  } else {
    // this block's GEMM of a grouped launch (Problem.groups; grid z), the launch's own otherwise
    const int group = static_cast<int>(blockIdx.z);
    const OpA a = for_group(group_a, group);
    const OpB b = for_group(group_b, group);
    const Epi epi = for_group(group_epi, group);
    using T = typename Tile::Element;
    using SmemT = typename Tile::SmemT;
    using AccT = typename Tile::AccT;
    using Plan = SmemPlan<Tile, OpA, OpB, Epi>;
    constexpr int kBM = Tile::kBM, kBN = Tile::kBN, kBK = Tile::kBK, kStages = Tile::kStages;
    static_assert(std::is_same_v<typename OpA::Element, T> && std::is_same_v<typename OpB::Element, T>);

    extern __shared__ __align__(128) unsigned char smem[];
    SmemT* smem_a = reinterpret_cast<SmemT*>(smem);
    Tensor sA = make_tensor(make_smem_ptr(smem_a), typename Plan::SmemA{});  // (BM, BK, S)
    Tensor sB = make_tensor(make_smem_ptr(smem_a + cosize_v<typename Plan::SmemA>), typename Plan::SmemB{});

    const int tiles_n = static_cast<int>(cdiv(p.N, kBN));
    const int64_t m0 = static_cast<int64_t>(blockIdx.x / tiles_n) * kBM;
    const int64_t n0 = static_cast<int64_t>(blockIdx.x % tiles_n) * kBN;
    const int split = static_cast<int>(blockIdx.y);
    const int64_t k_first = split * p.k_per_split;
    const int64_t k_last = k_first + p.k_per_split < p.K ? k_first + p.k_per_split : p.K;

    using Row = typename Epi::Row;
    using Col = typename Epi::Col;
    using SharesA = typename OpA::Row;
    using SharesB = typename OpB::Row;
    TileLoader<OpA, kBM, kBK, Tile::kThreads> load_a(a, m0, p.M, reinterpret_cast<SharesA*>(smem + Plan::kLoaderShares));
    TileLoader<OpB, kBN, kBK, Tile::kThreads> load_b(
        b, n0, p.N, reinterpret_cast<SharesB*>(smem + Plan::kLoaderShares + Plan::kSharesA));
    // the fold's shares (K segments), clamped into the problem: the fold runs on every element
    // of the tile and the store skips those outside
    Row* seg_rows = reinterpret_cast<Row*>(smem + Plan::kSegBase);
    Col* seg_cols = reinterpret_cast<Col*>(smem + Plan::kSegBase + Plan::kSegRows);
    if constexpr (Plan::kSegmented) {
      for (int r = threadIdx.x; r < kBM; r += Tile::kThreads) seg_rows[r] = epi.row(m0 + r < p.M ? m0 + r : p.M - 1, split);
      for (int c = threadIdx.x; c < kBN; c += Tile::kThreads) seg_cols[c] = epi.col(n0 + c < p.N ? n0 + c : p.N - 1);
    }
    __syncthreads();  // the row shares are in shared memory

    using TiledMma = typename Tile::template TiledMma<OpA::kMajor, OpB::kMajor>;
    TiledMma mma;
    ThrMMA thr_mma = mma.get_slice(threadIdx.x);
    Tensor accum = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});  // (MMA, MMA_M, MMA_N)
    clear(accum);

    // One K range [k_begin, k_end) through the ring into accum, drained at the end.
    const auto mainloop = [&](const int64_t k_begin, const int64_t k_end) {
      const int steps = static_cast<int>(cdiv(k_end - k_begin, kBK));
      const auto fill = [&](int step, int stage) {
        const int64_t k0 = k_begin + static_cast<int64_t>(step) * kBK;
        load_a.write(sA(_, _, stage), k0, k_end);
        load_b.write(sB(_, _, stage), k0, k_end);
        cp_async_fence();
      };

      CUTE_UNROLL
      for (int s = 0; s < kStages - 1; ++s) fill(s, s);

      // The MMAs of one stage, k-blocks past the end of the K range skipped.
      const auto compute = [&](int step, int stage) {
        const int64_t k_valid = k_end - (k_begin + static_cast<int64_t>(step) * kBK);
        if constexpr (Tile::kWgmma) {
          Tensor tCsA = thr_mma.partition_A(sA);  // (MMA, MMA_M, MMA_K, S)
          Tensor tCsB = thr_mma.partition_B(sB);
          Tensor tCrA = thr_mma.make_fragment_A(tCsA);  // smem descriptors
          Tensor tCrB = thr_mma.make_fragment_B(tCsB);
          warpgroup_fence_operand(accum);
          warpgroup_arrive();
          // (a branch between two wgmmas makes ptxas serialize them: the K tail has its own loop)
          if (k_valid >= kBK) {
            CUTE_UNROLL
            for (int kb = 0; kb < size<2>(tCrA); ++kb) cute::gemm(mma, tCrA(_, _, kb, stage), tCrB(_, _, kb, stage), accum);
          } else {
            for (int kb = 0; kb * Tile::kAtomK < k_valid; ++kb)
              cute::gemm(mma, tCrA(_, _, kb, stage), tCrB(_, _, kb, stage), accum);
          }
          warpgroup_commit_batch();
          warpgroup_fence_operand(accum);
        } else {
          mma_from_shared<Tile, OpA::kMajor, OpB::kMajor>(mma, sA(_, _, stage), sB(_, _, stage), accum,
                                                          static_cast<int>(k_valid < kBK ? k_valid : kBK));
        }
      };

      for (int step = 0; step < steps; ++step) {
        const int stage = step % kStages;
        cp_async_wait<kStages - 2>();
        // wgmma reads shared memory through the async proxy: the writes of this thread (cp.async
        // and st.shared, generic proxy) are made visible to it before the barrier publishes them
        if constexpr (Tile::kWgmma) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();  // stage `step` is in shared memory for every thread
        compute(step, stage);
        if constexpr (Tile::kWgmma) warpgroup_wait<1>();  // step - 1 retired: its stage may be refilled
        __syncthreads();
        const int next = step + kStages - 1;
        fill(next, next % kStages);
      }
      if constexpr (Tile::kWgmma) warpgroup_wait<0>();
      cp_async_wait<0>();
      __syncthreads();  // the ring is free
    };

    const auto tile_layout = make_layout(Shape<Int<kBM>, Int<kBN>>{}, Stride<Int<Plan::kLdC>, _1>{});
    // K segments: the running sum of the fold's contributions, in shared memory on sm_90a
    Tensor total = make_fragment_like(accum);
    Tensor sTotal = make_tensor(make_smem_ptr(reinterpret_cast<AccT*>(smem + Plan::kSegBase + Plan::kSegRows +
                                                                       Plan::kSegCols)),
                                tile_layout);
    if constexpr (Plan::kSegmented) {
      const int64_t length = p.k_per_segment;
      Tensor coords = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
      Tensor tTotal = thr_mma.partition_C(sTotal);
      for (int seg = 0; seg < p.segments; ++seg) {
        mainloop(k_first + seg * length, k_first + (seg + 1) * length);
        CUTE_UNROLL
        for (int i = 0; i < size(accum); ++i) {
          const AccT v = epi.fold(seg, seg_rows[get<0>(coords(i))], seg_cols[get<1>(coords(i))], accum(i));
          if constexpr (Tile::kWgmma) tTotal(i) = seg == 0 ? v : tTotal(i) + v;
          else total(i) = seg == 0 ? v : total(i) + v;
        }
        clear(accum);
      }
    } else {
      mainloop(k_first, k_last);
    }

    // Epilogue: accumulators (or the segments' sum) -> shared [kBM][kLdC] -> the family's store map.
    AccT* acc_tile = reinterpret_cast<AccT*>(smem);
    Tensor sC = make_tensor(make_smem_ptr(acc_tile), tile_layout);
    if constexpr (!Plan::kSegmented) copy(accum, thr_mma.partition_C(sC));
    else if constexpr (Tile::kWgmma) copy(thr_mma.partition_C(sTotal), thr_mma.partition_C(sC));
    else copy(total, thr_mma.partition_C(sC));
    Row* row_shares = reinterpret_cast<Row*>(smem + Plan::kAccTile);
    Col* col_shares = reinterpret_cast<Col*>(smem + Plan::kAccTile + Plan::kRowShares);
    for (int r = threadIdx.x; r < kBM; r += Tile::kThreads)
      if (m0 + r < p.M) row_shares[r] = epi.row(m0 + r, split);
    if constexpr (kHasTileSums<Epi>)
      for (int c = threadIdx.x; c < kBN; c += Tile::kThreads)
        if (n0 + c < p.N) col_shares[c] = epi.col(n0 + c);
    __syncthreads();
    constexpr int kLanes = kBN < Tile::kThreads ? kBN : Tile::kThreads;
    const int c = threadIdx.x % kLanes;
    if (n0 + c < p.N && threadIdx.x / kLanes < Tile::kThreads / kLanes) {
      const typename Epi::Col col = epi.col(n0 + c);
      for (int r = threadIdx.x / kLanes; r < kBM; r += Tile::kThreads / kLanes) {
        if (m0 + r >= p.M) break;
        epi.store(row_shares[r], col, acc_tile[r * Plan::kLdC + c]);
      }
    }
    if constexpr (kHasTileSums<Epi>) {
      // (no barrier: the stores only read the tile and the shares)
      const auto valid = [](int64_t end, int64_t start, int size) {
        return static_cast<int>(end - start < size ? end - start : size);
      };
      const TileView<kBM, kBN, AccT, Row, Col> view{
          acc_tile, Plan::kLdC, row_shares, col_shares, m0, n0, valid(p.M, m0, kBM), valid(p.N, n0, kBN)};
      epi.sums(view, threadIdx.x, Tile::kThreads);
    }
  }
}

// The tile a launch runs on (gemm/tiles.cuh): the caller's pick, or half of it when the launch
// is register-heavy -- 64 columns when only B's load is heavy, else 64 rows (a K-segmented
// epilogue, a heavy A).
template <class Tile, class OpA, class OpB, class Epi>
using LaunchTile = std::conditional_t<
    kRegisterHeavy<OpB> && !kRegisterHeavy<OpA> && !kHasSegments<Epi>, typename Tile::NarrowN,
    std::conditional_t<kRegisterHeavy<OpA> || kHasSegments<Epi>, typename Tile::NarrowM, Tile>>;

// Launches the engine for C = A B^T on LaunchTile<PickedTile, ...> (the caller picked it:
// select.cuh).
template <class PickedTile, class OpA, class OpB, class Epi>
void launch(Problem p, const OpA& a, const OpB& b, const Epi& epi) {
  using Tile = LaunchTile<PickedTile, OpA, OpB, Epi>;
  // the caller sized nothing by the tile it picked: a narrowed launch has no tile sums
  static_assert(std::is_same_v<Tile, PickedTile> || !kHasTileSums<Epi>, "a narrowed launch with tile sums");
  if (p.M == 0 || p.N == 0) return;
  using Plan = SmemPlan<Tile, OpA, OpB, Epi>;
  const int64_t tiles = cdiv(p.M, Tile::kBM) * cdiv(p.N, Tile::kBN);
  TORCH_CHECK(tiles <= std::numeric_limits<int32_t>::max() && p.splits <= 65535 && p.groups >= 1 && p.groups <= 65535,
              "mixops: GEMM too large for one launch (", tiles, " tiles x ", p.splits, " splits x ", p.groups,
              " groups)");
  TORCH_CHECK(p.segments == 1 || (kHasSegments<Epi> && p.splits == 1 && p.segments > 0 && p.K % p.segments == 0),
              "mixops: ", p.segments, " K segments need a folding epilogue, no split and K (", p.K,
              ") divisible by them");
  p.k_per_segment = p.K / p.segments;
  const int limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(Plan::kBytes <= static_cast<size_t>(limit), "mixops: the GEMM tile needs ", Plan::kBytes,
              " bytes of shared memory per block, this GPU allows ", limit);
  const auto kernel = gathered_gemm_kernel<Tile, OpA, OpB, Epi>;
  // the rings are over the 48 KB of static shared memory: opt in (per device, so on every launch)
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(Plan::kBytes)));
  kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(p.splits), static_cast<unsigned>(p.groups)),
           Tile::kThreads, Plan::kBytes,
           at::cuda::getCurrentCUDAStream()>>>(p, a, b, epi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mixops::gemm
