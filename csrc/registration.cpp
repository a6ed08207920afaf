// The one place where mixops' C++/CUDA ops meet the dispatcher: every schema of the extension
// is defined here, next to the kernel that implements it for each dispatch key.
//
// The Python front defines its own custom ops in the same `mixops` namespace (as fragments);
// this file holds the namespace's single TORCH_LIBRARY block.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(mixops, m) {
  m.def("_cuda_version() -> int", &mixops::cuda_version);
  m.def("_cuda_arch_list() -> str", &mixops::cuda_arch_list);
  m.def("_device_arch(Tensor like) -> Tensor");

  // morph_fc (morph_fc.cu, morph_fc_cpu.cpp)
  m.def("_morph_fc_cuda(Tensor x, Tensor weight, Tensor? bias, int segment_dim, str axis) -> Tensor");
  m.def(
      "_morph_fc_cuda_backward(Tensor[] grads, bool[] needs, Tensor x, Tensor weight, Tensor? bias, "
      "int segment_dim, str axis) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mixops, CUDA, m) {
  m.impl("_device_arch", &mixops::device_arch);

  // morph_fc
  m.impl("_morph_fc_cuda", &mixops::morph_fc_cuda);
  m.impl("_morph_fc_cuda_backward", &mixops::morph_fc_cuda_backward);
}

// CPU emulations of CUDA ops: the kernels' index math in host loops, for tests on CPU tensors.
TORCH_LIBRARY_IMPL(mixops, CPU, m) {
  // morph_fc
  m.impl("_morph_fc_cuda", &mixops::morph_fc_cpu);
  m.impl("_morph_fc_cuda_backward", &mixops::morph_fc_cpu_backward);
}

// `import mixops._C` loads the library and thereby runs the registrations above; the module
// itself exposes nothing (the ops live in torch.ops.mixops).
static struct PyModuleDef mixops_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mixops_c_module); }
