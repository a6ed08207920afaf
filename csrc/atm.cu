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
// - atm_fc: three GEMMs of the gathered-GEMM engine (gemm/kernel.cuh; operands and epilogue in
//   atm_operands.cuh), 128x128x64 tiles in a 3-stage ring (wgmma on sm_90a, mma.sync on sm_80-sm_89
//   for fp16/bf16; 128x128x32 TF32 mma.sync for fp32 where torch allows TF32 for its matmuls;
//   64x64x16 IEEE FMAs for other fp32 and fp64), 256 threads; grid (tiles_m·tiles_n, splits),
//   the column tiles of one row tile adjacent so the rows they share are re-read from L2.
//   Forward out = S·W^T (+ bias): 2·M·C·C_out FLOP; minimal traffic (M·C·(1 + 1/share) +
//   C·C_out + M·C_out)·e: S is lerped in the A-operand load (a computed operand: two x loads, one
//   offset load and a lerp per element, through registers), so it never reaches HBM; W comes by
//   cp.async; the bias is added in the epilogue.
// - atm_fc backward, 4·M·C·C_out FLOP: dS = g·W (g and W by cp.async) into a [B,H,W,C] buffer
//   (M·C·e written and re-read), then the atm_sample backward; dW = g^T·S with S re-gathered in
//   the B-operand load, K = the pixels split into fixed ranges by the shapes and the tile
//   (common.cuh split_rows) into fp32 (fp64) partials added in order by at::sum; db = g summed
//   over fixed pixel ranges (column_sum.cuh). No cuBLAS: every split is the shapes' alone.
//
// Verified by compilation only, never run on a GPU (registered auto=False): registers and
// spills from ptxas -v, the instructions from the SASS (tests/test_atm_cuda.py); the CPU tests
// cover atm_math.cuh, the per-element rules the computed operand calls.
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "atm_operands.cuh"
#include "atm_host.cuh"
#include "atm_math.cuh"
#include "column_sum.cuh"
#include "common.cuh"
#include "gemm/engine_runner.cuh"
#include "gemm/kernel.cuh"
#include "gemm/select.cuh"
#include "gemm/split_k.h"
#include "tensor_checks.h"
#include "tf32.h"

namespace mixops {

namespace {

using atm::LineDividers;
using atm::LineShape;
using atm::LineStrides;
using atm::pixel_index;
using atm::pixel_offset;
using atm::PixelIndex;

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
  const PixelIndex p = pixel_index(m, d.n, d.L);
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
// atm_fc: three GEMMs of the gathered-GEMM engine (gemm/kernel.cuh); operands in atm_operands.cuh
// ---------------------------------------------------------------------------------------------

// Calls fn.template operator()<scalar_t, Tile>() with the ATen storage type of `dtype` and the
// engine tile of its GEMM math: fp16/bf16 on tensor cores, fp32 on TF32 ones only where torch
// allows TF32 for its own fp32 matmuls (so the drop-in matches the official fp32 op under the
// same settings), else IEEE FMAs like fp64 (common.cuh MIXOPS_GEMM_SWITCH, gemm/select.cuh).
template <class Fn>
decltype(auto) with_gemm_tile(c10::ScalarType dtype, Fn&& fn) {
  return MIXOPS_GEMM_SWITCH(dtype, tf32_allowed(), scalar_t, kTensorCores, [&] {
    return gemm::with_tile<scalar_t, kTensorCores>(
        [&]<class Tile>() { return fn.template operator()<scalar_t, Tile>(); });
  });
}

// out[pixel, j] = sum_c S[pixel, c]·W[j, c] (+ bias[j]): M = pixels, N = C_out, K = C, with S
// lerped in the A-operand load (never stored) and the bias added in the epilogue.
void launch_fc_forward(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, at::Tensor& out, const LineShape& sh) {
  if (sh.pixels() == 0 || weight.size(0) == 0) return;  // (an empty line view has no Dividers)
  with_gemm_tile(x.scalar_type(), [&]<typename scalar_t, class Tile>() {
    const int64_t c_out = weight.size(0);
    gemm::launch<Tile>({sh.pixels(), c_out, sh.C, sh.C, 1}, atm::gathered_s<gemm::EngineRunner, scalar_t, gemm::Major::K>(x, offset, sh),
                       atm::weight_operand<gemm::EngineRunner, scalar_t, gemm::Major::K>(weight),
                       atm::pixel_store<gemm::EngineRunner, scalar_t>(out, bias, sh));
  });
}

// dS[pixel, c] = sum_j g[pixel, j]·W[j, c]: M = pixels, N = C, K = C_out, into a fresh
// [B,H,W,C] tensor of x's dtype for the atm_sample backward (the engine's shape-only tiling
// replaces a cuBLAS call whose kernel, and split of K, depend on the GPU model).
at::Tensor fc_sample_grad(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, const LineShape& sh) {
  at::Tensor ds = at::empty(x.sizes(), x.options());
  if (sh.pixels() == 0 || sh.C == 0) return ds;  // (an empty line view has no Dividers)
  with_gemm_tile(x.scalar_type(), [&]<typename scalar_t, class Tile>() {
    const int64_t c_out = weight.size(0);
    gemm::launch<Tile>({sh.pixels(), sh.C, c_out, c_out, 1}, atm::line_operand<gemm::EngineRunner, scalar_t, gemm::Major::K>(g, sh),
                       atm::weight_operand<gemm::EngineRunner, scalar_t, gemm::Major::Rows>(weight),
                       atm::pixel_store<gemm::EngineRunner, scalar_t>(ds, std::nullopt, sh));
  });
  return ds;
}

// dW[j, c] = sum over the pixels of g[pixel, j]·S[pixel, c]: M = C_out, N = C, K = pixels, with S
// re-gathered in the B-operand load; the engine's deterministic split-K over fixed pixel ranges
// (gemm/split_k.h).
at::Tensor fc_weight_grad(const at::Tensor& g, const at::Tensor& x, const at::Tensor& offset,
                          const at::Tensor& weight, const LineShape& sh) {
  const int64_t c_out = weight.size(0), pixels = sh.pixels();
  if (pixels == 0 || c_out == 0 || sh.C == 0) return at::zeros(weight.sizes(), weight.options());
  return with_gemm_tile(x.scalar_type(), [&]<typename scalar_t, class Tile>() {
    return gemm::split_k<gemm::EngineRunner, Tile>(c_out, sh.C, pixels, atm::line_operand<gemm::EngineRunner, scalar_t, gemm::Major::Rows>(g, sh),
                                                   atm::gathered_s<gemm::EngineRunner, scalar_t, gemm::Major::Rows>(x, offset, sh), x,
                                                   weight.scalar_type());
  });
}

// db = g summed over the pixels, by fixed pixel ranges (at::sum over all pixels would split them
// across blocks by the device's SM count: ATen's setReduceConfig).
at::Tensor fc_bias_grad(const at::Tensor& g, const at::Tensor& x, const LineShape& sh) {
  const int64_t c_out = g.size(3);
  if (sh.pixels() == 0 || c_out == 0) return at::zeros({c_out}, x.options());
  return MIXOPS_FLOAT_SWITCH(x.scalar_type(), scalar_t, [&] {
           return column_sums(g.const_data_ptr<scalar_t>(), sh.pixels(), c_out, atm::pixel_matrix(sh, g), g.options());
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
    const at::Tensor ds = fc_sample_grad(g, x, weight, sh);
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
