// Schema of condense::gather_normalize: the class-indexed real-batch gather of the sampler.
// out[b, c] = (images[index[b], c] / 255 - mean[c]) / std[c], uint8 storage in, float32 out.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(condense, m) {
  m.def("gather_normalize(Tensor images, Tensor index, Tensor mean, Tensor std) -> Tensor");
}
