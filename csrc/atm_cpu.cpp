// CPU emulation of the CUDA ATM ops (_atm_sample_cuda, _atm_fc_cuda and their backwards): plain
// host loops over the SAME per-element functions the CUDA kernels run (atm_math.cuh: positions,
// corners, zero padding, the slope rule, the owner-computes backward walk), so the CPU tests
// verify the index math of the GPU path. Simple, not fast: for tests only. Accumulates in
// Acc<scalar_t> (common.cuh: fp32 for fp16/bf16/fp32, as on the GPU; fp64 for fp64).
//
// What only the GPU path does (tiling, shared memory, the tensor-core fragments of the fused
// GEMM, the split of the weight gradient) is not exercised here.
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <vector>

#include "atm_host.cuh"
#include "atm_math.cuh"
#include "common.cuh"
#include "tensor_checks.h"

namespace mixops {

namespace {

using atm::LineShape;
using atm::LineStrides;

// Element (b, l, q, c) of a tensor seen through its line strides.
template <typename T>
struct LineView {
  T* data;
  LineStrides s;

  T& at(int64_t b, int64_t l, int64_t q, int64_t c) const { return data[b * s.b + l * s.l + q * s.p + c * s.c]; }
};

template <typename T>
LineView<T> view(const at::Tensor& t, const LineShape& shape) {
  return {static_cast<T*>(t.data_ptr()), shape.strides(t)};
}

template <typename scalar_t>
void sample_forward(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& out, const LineShape& sh) {
  using acc_t = Acc<scalar_t>;
  const auto xv = view<const scalar_t>(x, sh);
  const auto ov = view<const scalar_t>(offset, sh);
  const auto yv = view<scalar_t>(out, sh);
  const Divider group(sh.share);  // channel -> offset group, as the kernels divide
  for (int64_t b = 0; b < sh.B; ++b)
    for (int64_t l = 0; l < sh.L; ++l)
      for (int64_t q = 0; q < sh.n; ++q)
        for (int64_t c = 0; c < sh.C; ++c) {
          const auto load = [&](int64_t t) { return xv.at(b, l, t, c); };
          const acc_t o = static_cast<acc_t>(ov.at(b, l, q, group.div(c)));
          yv.at(b, l, q, c) = static_cast<scalar_t>(atm::sample<acc_t>(load, q, o, sh.n));
        }
}

// gx / goff undefined: not computed. The gX accumulator of one (line, group) is a local buffer,
// as it is a shared-memory slab in the CUDA kernel.
template <typename scalar_t, bool kNeedGx, bool kNeedGoff>
void sample_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& offset, const at::Tensor& gx,
                     const at::Tensor& goff, const LineShape& sh) {
  using acc_t = Acc<scalar_t>;
  const auto gv = view<const scalar_t>(grad, sh);
  const auto xv = view<const scalar_t>(x, sh);
  const auto ov = view<const scalar_t>(offset, sh);
  LineView<scalar_t> gxv{}, gov{};
  if constexpr (kNeedGx) gxv = view<scalar_t>(gx, sh);
  if constexpr (kNeedGoff) gov = view<scalar_t>(goff, sh);
  std::vector<acc_t> acc(kNeedGx ? sh.n * sh.share : 0);
  for (int64_t b = 0; b < sh.B; ++b)
    for (int64_t l = 0; l < sh.L; ++l)
      for (int64_t grp = 0; grp < sh.G; ++grp) {
        const int64_t c0 = grp * sh.share;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        atm::backward_line<acc_t, kNeedGx, kNeedGoff>(
            sh.n, sh.share, [&](int64_t q) { return static_cast<acc_t>(ov.at(b, l, q, grp)); },
            [&](int64_t q, int64_t s) { return static_cast<acc_t>(gv.at(b, l, q, c0 + s)); },
            [&](int64_t s) { return [&, s](int64_t t) { return xv.at(b, l, t, c0 + s); }; },
            [&](int64_t q, acc_t v) { gov.at(b, l, q, grp) = static_cast<scalar_t>(v); },
            [&](int64_t t, int64_t s, acc_t v) { acc[t * sh.share + s] += v; });
        if constexpr (kNeedGx) {
          for (int64_t t = 0; t < sh.n; ++t)
            for (int64_t s = 0; s < sh.share; ++s) gxv.at(b, l, t, c0 + s) = static_cast<scalar_t>(acc[t * sh.share + s]);
        }
      }
}

void dispatch_sample_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& offset,
                              const at::Tensor& gx, const at::Tensor& goff, const LineShape& sh) {
  if (!gx.defined() && !goff.defined()) return;
  MIXOPS_FLOAT_SWITCH(x.scalar_type(), scalar_t, [&] {
    MIXOPS_BOOL_SWITCH(gx.defined(), kNeedGx, [&] {
      MIXOPS_BOOL_SWITCH(goff.defined(), kNeedGoff, [&](auto...) {
        if constexpr (kNeedGx || kNeedGoff)
          sample_backward<scalar_t, kNeedGx, kNeedGoff>(grad, x, offset, gx, goff, sh);
      });
    });
  });
}

// out[b,l,q,n] = sum_c S[b,l,q,c]·W[n,c] (+ bias[n]), S the gather, rounded to the storage dtype
// before the product as the CUDA kernel's tensor-core operands are.
template <typename scalar_t>
void fc_forward(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias, const at::Tensor& out, const LineShape& sh) {
  using acc_t = Acc<scalar_t>;
  const auto xv = view<const scalar_t>(x, sh);
  const auto ov = view<const scalar_t>(offset, sh);
  const auto yv = view<scalar_t>(out, sh);
  const auto w = weight.accessor<scalar_t, 2>();
  const int64_t c_out = weight.size(0);
  const Divider group(sh.share);
  std::vector<scalar_t> s(sh.C);
  for (int64_t b = 0; b < sh.B; ++b)
    for (int64_t l = 0; l < sh.L; ++l)
      for (int64_t q = 0; q < sh.n; ++q) {
        for (int64_t c = 0; c < sh.C; ++c) {
          const auto load = [&](int64_t t) { return xv.at(b, l, t, c); };
          s[c] = static_cast<scalar_t>(
              atm::sample<acc_t>(load, q, static_cast<acc_t>(ov.at(b, l, q, group.div(c))), sh.n));
        }
        for (int64_t j = 0; j < c_out; ++j) {
          acc_t acc = bias.has_value() ? static_cast<acc_t>(bias->data_ptr<scalar_t>()[j * bias->stride(0)]) : 0;
          for (int64_t c = 0; c < sh.C; ++c) acc += static_cast<acc_t>(s[c]) * static_cast<acc_t>(w[j][c]);
          yv.at(b, l, q, j) = static_cast<scalar_t>(acc);
        }
      }
}

at::Tensor atm_sample_cpu(const at::Tensor& x, const at::Tensor& offset, std::string_view axis, int64_t share) {
  const char* op = "_atm_sample_cuda";
  check_device_and_dtype(op, c10::kCPU, {{"x", x}, {"offset", offset}});
  const LineShape sh = atm::check_gather(op, x, offset, axis, share);
  auto out = at::empty(x.sizes(), x.options());
  MIXOPS_FLOAT_SWITCH(x.scalar_type(), scalar_t, [&] { sample_forward<scalar_t>(x, offset, out, sh); });
  return out;
}

std::vector<at::Tensor> atm_sample_backward_cpu(at::TensorList grads, const c10::List<bool>& needs,
                                                const at::Tensor& x, const at::Tensor& offset, std::string_view axis,
                                                int64_t share) {
  const char* op = "_atm_sample_cuda_backward";
  check_device_and_dtype(op, c10::kCPU, {{"x", x}, {"offset", offset}});
  const LineShape sh = atm::check_gather(op, x, offset, axis, share);
  atm::check_grads(op, grads, needs.size(), 2, x.sizes(), x);
  const at::Tensor gx = needs.get(0) ? at::empty(x.sizes(), x.options()) : at::Tensor();
  const at::Tensor goff = needs.get(1) ? at::empty(offset.sizes(), offset.options()) : at::Tensor();
  dispatch_sample_backward(grads[0], x, offset, gx, goff, sh);
  std::vector<at::Tensor> result;
  for (const auto& t : {gx, goff})
    if (t.defined()) result.push_back(t);
  return result;
}

at::Tensor atm_fc_cpu(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, std::string_view axis, int64_t share) {
  const char* op = "_atm_fc_cuda";
  check_device_and_dtype(op, c10::kCPU, {{"x", x}, {"offset", offset}, {"weight", weight}});
  const LineShape sh = atm::check_gather(op, x, offset, axis, share);
  atm::check_fc(op, x, weight, bias);
  auto out = at::empty({x.size(0), x.size(1), x.size(2), weight.size(0)}, x.options());
  MIXOPS_FLOAT_SWITCH(x.scalar_type(), scalar_t, [&] { fc_forward<scalar_t>(x, offset, weight, bias, out, sh); });
  return out;
}

std::vector<at::Tensor> atm_fc_backward_cpu(at::TensorList grads, const c10::List<bool>& needs, const at::Tensor& x,
                                            const at::Tensor& offset, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias, std::string_view axis,
                                            int64_t share) {
  const char* op = "_atm_fc_cuda_backward";
  check_device_and_dtype(op, c10::kCPU, {{"x", x}, {"offset", offset}, {"weight", weight}});
  const LineShape sh = atm::check_gather(op, x, offset, axis, share);
  atm::check_fc(op, x, weight, bias);
  atm::check_grads(op, grads, needs.size(), 4, {x.size(0), x.size(1), x.size(2), weight.size(0)}, x);
  const at::Tensor& g = grads[0];
  std::vector<at::Tensor> result;
  // the same decomposition as the CUDA path: dS = g @ W, then the gather backward; dW = g^T @ S
  // with S recomputed; db = g summed over the pixels (each in the accumulation dtype)
  const c10::ScalarType acc =
      MIXOPS_FLOAT_SWITCH(x.scalar_type(), scalar_t, [] { return kAccDtype<scalar_t>; });
  if (needs.get(0) || needs.get(1)) {
    const at::Tensor ds = at::matmul(g.to(acc), weight.to(acc)).to(x.scalar_type());
    for (const auto& t : atm_sample_backward_cpu({ds}, c10::List<bool>({needs.get(0), needs.get(1)}), x, offset, axis, share))
      result.push_back(t);
  }
  if (needs.get(2)) {
    const at::Tensor s = atm_sample_cpu(x, offset, axis, share).to(acc).reshape({-1, sh.C});
    result.push_back(at::matmul(g.to(acc).reshape({-1, weight.size(0)}).t(), s).to(weight.scalar_type()));
  }
  if (needs.get(3)) {
    result.push_back(g.to(acc).sum({0, 1, 2}).to(x.scalar_type()));
  }
  return result;
}

}  // namespace

}  // namespace mixops

TORCH_LIBRARY_IMPL(mixops, CPU, m) {
  m.impl("_atm_sample_cuda", &mixops::atm_sample_cpu);
  m.impl("_atm_sample_cuda_backward", &mixops::atm_sample_backward_cpu);
  m.impl("_atm_fc_cuda", &mixops::atm_fc_cpu);
  m.impl("_atm_fc_cuda_backward", &mixops::atm_fc_backward_cpu);
}
