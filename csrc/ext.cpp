// Python module entry of condense_engine._C. Importing it runs the TORCH_LIBRARY registrations
// of every op in csrc/ops, which is all the module is for.
#include <torch/extension.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "condense-engine native ops (registered under torch.ops.condense)";
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
