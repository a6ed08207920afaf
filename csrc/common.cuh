// Plumbing every kernel family of csrc/ shares: the host/device qualifier, ceil division, a
// divider by a per-launch constant, the shape-only split rule of reductions, the switches that
// turn runtime values (dtype, flags) into template parameters, and the accumulator type.
// Included by CUDA and by plain C++ (CPU) translation units alike.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#ifdef __CUDACC__
#define MIXOPS_HD __host__ __device__ __forceinline__
#else
#define MIXOPS_HD inline
#endif

namespace mixops {

MIXOPS_HD constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Division by a value fixed for a whole launch (a line length, a share) without the division
// instruction sequence: a 64-bit `/` compiles to a test of both high words, an inline 32-bit
// reciprocal path and a CALL to a ~70-instruction subroutine for the general case; this is a
// 64x64 high multiply, an add and two shifts (Granlund & Montgomery, "Division by invariant
// integers using multiplication", 1994, fig. 4.1), exact for every n < 2^64 and 1 <= d < 2^63.
// The host builds it; kernels take it by value.
// ---------------------------------------------------------------------------------------------
class Divider {
 public:
  Divider() = default;
  explicit Divider(int64_t d) : d_(static_cast<uint64_t>(d)) {
    TORCH_CHECK(d >= 1, "mixops: division by ", d);
    int l = 0;  // ceil(log2 d)
    while ((uint64_t{1} << l) < d_) ++l;
    using u128 = unsigned __int128;
    magic_ = static_cast<uint64_t>(((u128{1} << 64) * ((u128{1} << l) - d_)) / d_ + 1);
    shift1_ = l < 1 ? l : 1;
    shift2_ = l > 1 ? l - 1 : 0;
  }

  MIXOPS_HD int64_t div(int64_t n) const {
    const uint64_t u = static_cast<uint64_t>(n);
#ifdef __CUDA_ARCH__
    const uint64_t t = __umul64hi(magic_, u);
#else
    const uint64_t t = static_cast<uint64_t>((static_cast<unsigned __int128>(magic_) * u) >> 64);
#endif
    return static_cast<int64_t>((t + ((u - t) >> shift1_)) >> shift2_);
  }
  // n = q*d + r: returns q, writes r
  MIXOPS_HD int64_t divmod(int64_t n, int64_t& r) const {
    const int64_t q = div(n);
    r = n - q * static_cast<int64_t>(d_);
    return q;
  }
  MIXOPS_HD int64_t divisor() const { return static_cast<int64_t>(d_); }

 private:
  uint64_t d_ = 1, magic_ = 1;
  int shift1_ = 0, shift2_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Splits of reductions: shapes only, never the device
// ---------------------------------------------------------------------------------------------

// Blocks a split reduction aims for in all (about two per SM on an H100; the same target as
// kernels/_common.py SPLIT_TARGET_PROGRAMS).
constexpr int64_t kSplitTargetBlocks = 256;

// How many fixed ranges a reduction over `length` rows, consumed `step` rows at a time, is split
// into when `tiles` blocks already cover its output: kernels/_common.py deterministic_split, so
// the partials (and the bits of their fixed-order sum) are the same on every GPU. At most 256
// ranges, which also keeps at::sum over the split axis free of its own device-dependent
// cross-block split (ATen's setReduceConfig splits across blocks only from 256 values per
// thread, after at least 4 warps share a column).
inline int64_t deterministic_split(int64_t length, int64_t step, int64_t tiles) {
  const int64_t per_tile = kSplitTargetBlocks / std::max<int64_t>(tiles, 1);
  return std::max<int64_t>(1, std::min<int64_t>({per_tile, cdiv(std::max<int64_t>(length, 1), step), 1024}));
}

// `count` consecutive ranges of `rows` rows (a multiple of `step`; the last range may be
// shorter, none is empty) covering `length` rows.
struct RowSplit {
  int64_t count, rows;
};
inline RowSplit split_rows(int64_t length, int64_t step, int64_t tiles) {
  const int64_t target = deterministic_split(length, step, tiles);
  const int64_t rows = cdiv(cdiv(std::max<int64_t>(length, 1), target), step) * step;
  return {cdiv(std::max<int64_t>(length, 1), rows), rows};
}

// ---------------------------------------------------------------------------------------------
// Runtime value -> template parameter (the idiom of flash-attention's static_switch.h). Each
// switch runs the lambda given last with NAME bound at compile time to the case of the runtime
// value, and returns what the lambda returns:
//   MIXOPS_BOOL_SWITCH(gx.defined(), kNeedGx, [&] { launch<kNeedGx>(...); });
// ---------------------------------------------------------------------------------------------

#define MIXOPS_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                     \
    if (COND) {                             \
      static constexpr bool NAME = true;    \
      return __VA_ARGS__();                 \
    }                                       \
    static constexpr bool NAME = false;     \
    return __VA_ARGS__();                   \
  }()

// The storage dtypes of every kernel: fp32, fp16, bf16 (accumulated in fp32) and fp64 (the exact-
// check dtype, accumulated in fp64; Acc below). NAME is the ATen type (double, float, at::Half,
// at::BFloat16).
#define MIXOPS_FLOAT_SWITCH(DTYPE, NAME, ...)                                                        \
  [&] {                                                                                              \
    const ::c10::ScalarType mixops_dtype_ = (DTYPE);                                                 \
    if (mixops_dtype_ == ::c10::kDouble) {                                                           \
      using NAME = double;                                                                           \
      return __VA_ARGS__();                                                                          \
    }                                                                                                \
    if (mixops_dtype_ == ::c10::kFloat) {                                                            \
      using NAME = float;                                                                            \
      return __VA_ARGS__();                                                                          \
    }                                                                                                \
    if (mixops_dtype_ == ::c10::kHalf) {                                                             \
      using NAME = ::c10::Half;                                                                      \
      return __VA_ARGS__();                                                                          \
    }                                                                                                \
    TORCH_CHECK(mixops_dtype_ == ::c10::kBFloat16,                                                   \
                "mixops: expected float32, float16, bfloat16 or float64, got ", mixops_dtype_);      \
    using NAME = ::c10::BFloat16;                                                                    \
    return __VA_ARGS__();                                                                            \
  }()

// The accumulator type of a storage type T (the ATen type or its CUDA twin, __half or
// __nv_bfloat16): fp64 for fp64, fp32 for the others, as at::acc_type<T, /*is_cuda=*/true>. The one
// spelling of it in csrc/, for the kernels, the CPU emulations and the partial buffers alike.
template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Acc as a dtype, for the tensors that hold accumulators (split partials, the CPU emulation's).
template <typename T>
inline constexpr ::c10::ScalarType kAccDtype = ::c10::CppTypeToScalarType<Acc<T>>::value;

// The GEMM math of a storage dtype: fp16 and bf16 on tensor cores, fp32 on TF32 tensor cores only
// when TF32 (a bool: torch allows TF32 for its own fp32 matmuls, tf32.h), fp64 never (IEEE FMAs).
// Binds NAME as in MIXOPS_FLOAT_SWITCH and TENSOR_CORES to the choice; only these five pairs are
// instantiated (the generic lambda makes the `if constexpr` discard the other branch). A kernel
// compiled for an architecture without the tensor-core type falls back to FMAs itself.
#define MIXOPS_GEMM_SWITCH(DTYPE, TF32, NAME, TENSOR_CORES, ...)                                     \
  MIXOPS_FLOAT_SWITCH(DTYPE, NAME, [&](auto...) {                                                    \
    if constexpr (std::is_same_v<NAME, float>) {                                                     \
      return MIXOPS_BOOL_SWITCH(TF32, TENSOR_CORES, __VA_ARGS__);                                    \
    } else {                                                                                         \
      static constexpr bool TENSOR_CORES = !std::is_same_v<NAME, double>;                            \
      return __VA_ARGS__();                                                                          \
    }                                                                                                \
  })

}  // namespace mixops
