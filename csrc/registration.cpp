// The one place where mixops' C++/CUDA ops meet the dispatcher: every schema of the extension
// is defined here, next to the kernel that implements it for each dispatch key.
//
// The Python front defines its own custom ops in the same `mixops` namespace (as fragments);
// this file holds the namespace's single TORCH_LIBRARY block. The kernel ops' schemas mirror
// the Python backend contract (mixops/backend.py): `_<op>_cuda` takes the public op's inputs,
// `_<op>_cuda_backward` takes the incoming grads and a needs-gradient flag per tensor input and
// returns the grads of the flagged inputs, in schema order.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(mixops, m) {
  m.def("_cuda_version() -> int", &mixops::cuda_version);
  m.def("_cuda_arch_list() -> str", &mixops::cuda_arch_list);
  m.def("_device_arch(Tensor like) -> Tensor");

  // ATM (atm.cu): mixops.atm_sample, mixops.atm_fc
  m.def("_atm_sample_cuda(Tensor x, Tensor offset, str axis, int share) -> Tensor");
  m.def("_atm_sample_cuda_backward(Tensor[] grads, bool[] needs, Tensor x, Tensor offset, str axis, int share) -> Tensor[]");
  m.def("_atm_fc_cuda(Tensor x, Tensor offset, Tensor weight, Tensor? bias, str axis, int share) -> Tensor");
  m.def("_atm_fc_cuda_backward(Tensor[] grads, bool[] needs, Tensor x, Tensor offset, Tensor weight, Tensor? bias, str axis, int share) -> Tensor[]");

  // MorphFC (morph_fc.cu): mixops.morph_fc
  m.def("_morph_fc_cuda(Tensor x, Tensor weight, Tensor? bias, int segment_dim, str axis) -> Tensor");
  m.def("_morph_fc_cuda_backward(Tensor[] grads, bool[] needs, Tensor x, Tensor weight, Tensor? bias, int segment_dim, str axis) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mixops, CUDA, m) {
  m.impl("_device_arch", &mixops::device_arch);
  m.impl("_atm_sample_cuda", &mixops::atm_sample_cuda);
  m.impl("_atm_sample_cuda_backward", &mixops::atm_sample_backward_cuda);
  m.impl("_atm_fc_cuda", &mixops::atm_fc_cuda);
  m.impl("_atm_fc_cuda_backward", &mixops::atm_fc_backward_cuda);
  m.impl("_morph_fc_cuda", &mixops::morph_fc_cuda);
  m.impl("_morph_fc_cuda_backward", &mixops::morph_fc_backward_cuda);
}

// CPU emulations of the CUDA ops (atm_cpu.cpp, morph_fc_cpu.cpp): the kernels' per-element math
// from the shared headers in plain host loops, so the CPU tests check the GPU index rules.
TORCH_LIBRARY_IMPL(mixops, CPU, m) {
  m.impl("_atm_sample_cuda", &mixops::atm_sample_cpu);
  m.impl("_atm_sample_cuda_backward", &mixops::atm_sample_backward_cpu);
  m.impl("_atm_fc_cuda", &mixops::atm_fc_cpu);
  m.impl("_atm_fc_cuda_backward", &mixops::atm_fc_backward_cpu);
  m.impl("_morph_fc_cuda", &mixops::morph_fc_cpu);
  m.impl("_morph_fc_cuda_backward", &mixops::morph_fc_backward_cpu);
}

// `import mixops._C` loads the library and thereby runs the registrations above; the module
// itself exposes nothing (the ops live in torch.ops.mixops).
static struct PyModuleDef mixops_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mixops_c_module); }
