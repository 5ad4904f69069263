// The one place where fastconv's operators are declared. Kernels register per backend in
// csrc/cpu/*.cpp and csrc/cuda/*.cu, every op's autograd in csrc/autograd.cpp; fake kernels live
// in fastconv/_registrations.py.
#include <Python.h>
#include <torch/library.h>

#include <string>

TORCH_LIBRARY(fastconv, m) {
  m.def(
      "conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, str algo='auto') -> Tensor");
  m.def(
      "_conv2d_grad_input(Tensor grad_output, Tensor weight, SymInt[] input_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, str algo='auto') -> Tensor");
  m.def(
      "_conv2d_grad_weight(Tensor grad_output, Tensor input, SymInt[] weight_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, str algo='auto') -> Tensor");

  m.def(
      "depthwise_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "_depthwise_conv2d_grad_input(Tensor grad_output, Tensor weight, SymInt[] input_size, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "_depthwise_conv2d_grad_weight(Tensor grad_output, Tensor input, SymInt[] weight_size, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");

  // grad_input, grad_weight and, when bias_grad, grad_bias of depthwise_conv2d in one call
  // (the CPU kernels read grad_output once for both).
  m.def(
      "_depthwise_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
      "int[2] padding, int[2] dilation, bool bias_grad=False) -> Tensor[]");

  // indices: "none" (an empty int64 tensor is returned), "full" (torch's int64 flat index
  // h * W + w per plane) or "compact" (window-local tap index kh_i * kW + kw_i as uint8 when
  // the window has at most 256 taps, else the "full" format). _max_pool2d_backward accepts
  // both formats and tells them apart by dtype.
  m.def(
      "max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, bool ceil_mode=False, str indices='full') -> (Tensor, Tensor)");
  m.def(
      "_max_pool2d_backward(Tensor grad_output, Tensor input, Tensor indices, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode=False) -> Tensor");
}

// A plain Python module so that `import fastconv._C` loads the library and runs the
// registrations above. It says whether CUDA kernels were compiled in; the rest of the build facts are written
// by setup.py to fastconv/_build_info.py.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
#ifdef FASTCONV_WITH_CUDA
  PyModule_AddIntConstant(mod, "with_cuda", 1);
#else
  PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
#ifdef _OPENMP
  PyModule_AddIntConstant(mod, "with_openmp", 1);  // at::parallel_for really runs in parallel
#else
  PyModule_AddIntConstant(mod, "with_openmp", 0);
#endif
  PyModule_AddStringConstant(mod, "compiler", __VERSION__);
  return mod;
}
}
