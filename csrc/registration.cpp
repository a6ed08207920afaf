// Every schema of mixops' C++/CUDA ops, in the namespace's one TORCH_LIBRARY block. The
// implementations register themselves at the bottom of their own files, per dispatch key
// (TORCH_LIBRARY_IMPL(mixops, CUDA / CPU, m) in <family>.cu / <family>_cpu.cpp, as torchvision's
// csrc/ops/* do), so a new op adds its schema here and touches no other shared file.
//
// The Python front defines its own custom ops in the same `mixops` namespace (as fragments). The
// kernel ops' schemas mirror the Python backend contract (mixops/backend.py): `_<op>_cuda` takes
// the public op's inputs, `_<op>_cuda_backward` takes the incoming grads and a needs-gradient flag
// per tensor input and returns the grads of the flagged inputs, in schema order.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mixops, m) {
  // diagnostics.cu: the build and its rules, seen from Python
  m.def("_cuda_version() -> int");
  m.def("_cuda_arch_list() -> str");
  m.def("_device_arch(Tensor like) -> Tensor");
  m.def("_deterministic_split(int length, int step, int tiles) -> int");
  // gemm_check.cu: the shared GEMM engine on plain matrices (GPU tests)
  m.def("_gemm_engine(Tensor a, Tensor b, str layout) -> Tensor");

  // ATM (atm.cu, atm_cpu.cpp): mixops.atm_sample, mixops.atm_fc
  m.def("_atm_sample_cuda(Tensor x, Tensor offset, str axis, int share) -> Tensor");
  m.def("_atm_sample_cuda_backward(Tensor[] grads, bool[] needs, Tensor x, Tensor offset, str axis, int share) -> Tensor[]");
  m.def("_atm_fc_cuda(Tensor x, Tensor offset, Tensor weight, Tensor? bias, str axis, int share) -> Tensor");
  m.def("_atm_fc_cuda_backward(Tensor[] grads, bool[] needs, Tensor x, Tensor offset, Tensor weight, Tensor? bias, str axis, int share) -> Tensor[]");
  // the fused ATMLayer's internal ops (atm_layer.cu, atm_layer_cpu.cpp)
  m.def("_atm_means_cuda(Tensor x, Tensor offset_w, Tensor offset_h, int share) -> Tensor");
  m.def("_atm_means_cuda_backward(Tensor[] grads, bool[] needs, Tensor x, Tensor offset_w, Tensor offset_h, int share) -> Tensor[]");
  m.def("_atm_mix_cuda(Tensor x, Tensor offset_w, Tensor offset_h, Tensor weight_w, Tensor weight_h, Tensor weight_c, Tensor? bias_w, Tensor? bias_h, Tensor alpha, int share) -> Tensor");
  m.def("_atm_mix_cuda_backward(Tensor[] grads, bool[] needs, Tensor x, Tensor offset_w, Tensor offset_h, Tensor weight_w, Tensor weight_h, Tensor weight_c, Tensor? bias_w, Tensor? bias_h, Tensor alpha, int share) -> Tensor[]");

  // MorphFC (morph_fc.cu, morph_fc_cpu.cpp): mixops.morph_fc
  m.def("_morph_fc_cuda(Tensor x, Tensor weight, Tensor? bias, int segment_dim, str axis) -> Tensor");
  m.def("_morph_fc_cuda_backward(Tensor[] grads, bool[] needs, Tensor x, Tensor weight, Tensor? bias, int segment_dim, str axis) -> Tensor[]");
  // the fused MorphFC layer's internal ops (morph_fc_fused.cu, morph_fc_fused_cpu.cpp)
  m.def("_morph_branch_cuda(Tensor x, Tensor weight, Tensor? bias, int segment_dim, str axis) -> (Tensor, Tensor)");
  m.def("_morph_branch_cuda_backward(Tensor[] grads, bool[] needs, Tensor x, Tensor weight, Tensor? bias, int segment_dim, str axis) -> Tensor[]");
  m.def("_reweighted_proj_cuda(Tensor b0, Tensor b1, Tensor? b2, Tensor alpha, Tensor weight, Tensor? bias) -> Tensor");
  m.def("_reweighted_proj_cuda_backward(Tensor[] grads, bool[] needs, Tensor b0, Tensor b1, Tensor? b2, Tensor alpha, Tensor weight, Tensor? bias) -> Tensor[]");

  // RepMLP (repmlp.cu, repmlp_cpu.cpp): mixops.partition_fc
  m.def("_partition_fc_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor? gate, int[] partition, int num_sharesets) -> Tensor");
  m.def("_partition_fc_cuda_backward(Tensor[] grads, bool[] needs, Tensor x, Tensor weight, Tensor? bias, Tensor? gate, int[] partition, int num_sharesets) -> Tensor[]");

  // UniFormer window attention (window_attention.cu, window_attention_cpu.cpp): mixops.window_attention
  m.def("_window_attention_cuda(Tensor qkv, int num_heads, int? window_size, float scale, str padding, Tensor? qkv_bias) -> Tensor");
  m.def("_window_attention_cuda_backward(Tensor[] grads, bool[] needs, Tensor qkv, int num_heads, int? window_size, float scale, str padding, Tensor? qkv_bias) -> Tensor[]");
}

// `import mixops._C` loads the library and thereby runs the registrations; the module itself
// exposes nothing (the ops live in torch.ops.mixops).
static struct PyModuleDef mixops_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mixops_c_module); }
