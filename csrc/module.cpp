// Python module entry of kandinsky_kernels._C.
//
// Every kernel file registers its own operators in the `kandinsky_kernels_C` namespace with
// TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL, so files stay independent and the ops are reachable
// as torch.ops.kandinsky_kernels_C.<name> once this module is imported. The module itself only
// reports what was compiled in.
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {
int omp_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kandinsky_kernels compiled kernels (ops live in torch.ops.kandinsky_kernels_C)";
  m.def("omp_threads", &omp_threads, "OpenMP threads available to the CPU kernels");
}
