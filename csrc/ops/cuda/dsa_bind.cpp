// Torch-facing CUDA binding of condense::dsa / dsa_backward: checks, device guard, scratch
// buffers, stream; the kernels are in dsa.cu.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../dsa_arguments.h"

namespace condense {

cudaError_t launch_dsa_forward(const void* x, void* out, void* image_mean, const void* color,
                               const void* affine, const int64_t* shifts, int dtype, int64_t n,
                               int64_t channels, int64_t height, int64_t width, int64_t groups,
                               int64_t cutout_size, bool align_corners, cudaStream_t stream);
cudaError_t launch_dsa_backward(const void* grad_out, void* grad_in, void* scattered,
                                void* scattered_mean, const void* color, const void* affine,
                                const int64_t* shifts, int dtype, int64_t n, int64_t channels,
                                int64_t height, int64_t width, int64_t groups,
                                int64_t cutout_size, bool align_corners, cudaStream_t stream);

namespace {

// The element-type codes of dsa.cu.
int dtype_code(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    case at::kBFloat16: return 3;
    default: TORCH_CHECK(false, "dsa: unsupported dtype ", type);
  }
}

// Every tensor on x's CUDA device, then the checks shared with the CPU op.
void check_arguments(const char* name, const at::Tensor& x, const at::Tensor& color,
                     const at::Tensor& affine, const at::Tensor& shifts, int64_t cutout_size) {
  TORCH_CHECK(x.is_cuda() && color.device() == x.device() && affine.device() == x.device() &&
                  shifts.device() == x.device(),
              name, ": all tensors must be on the same CUDA device");
  dsa::check_arguments(name, x, color, affine, shifts, cutout_size);
}

at::Tensor dsa_cuda(const at::Tensor& x, const at::Tensor& color, const at::Tensor& affine,
                    const at::Tensor& shifts, int64_t groups, int64_t cutout_size,
                    bool align_corners) {
  check_arguments("dsa", x, color, affine, shifts, cutout_size);
  c10::cuda::CUDAGuard guard(x.device());
  const dsa::ContiguousTensors t = dsa::make_contiguous(x, color, affine, shifts);
  auto out = at::empty_like(t.input);
  auto image_mean = at::empty({x.size(0)}, t.color.options());
  auto err = launch_dsa_forward(t.input.data_ptr(), out.data_ptr(), image_mean.data_ptr(),
                                t.color.data_ptr(), t.affine.data_ptr(),
                                t.shifts.data_ptr<int64_t>(), dtype_code(x.scalar_type()),
                                x.size(0), x.size(1), x.size(2), x.size(3), groups, cutout_size,
                                align_corners, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dsa: ", cudaGetErrorString(err));
  return out;
}

at::Tensor dsa_backward_cuda(const at::Tensor& grad_out, const at::Tensor& color,
                             const at::Tensor& affine, const at::Tensor& shifts, int64_t groups,
                             int64_t cutout_size, bool align_corners) {
  check_arguments("dsa_backward", grad_out, color, affine, shifts, cutout_size);
  c10::cuda::CUDAGuard guard(grad_out.device());
  const dsa::ContiguousTensors t = dsa::make_contiguous(grad_out, color, affine, shifts);
  auto grad_in = at::empty_like(t.input);
  auto scattered = at::empty(t.input.sizes(), t.color.options());
  auto scattered_mean = at::empty({grad_out.size(0)}, t.color.options());
  auto err = launch_dsa_backward(t.input.data_ptr(), grad_in.data_ptr(), scattered.data_ptr(),
                                 scattered_mean.data_ptr(), t.color.data_ptr(),
                                 t.affine.data_ptr(), t.shifts.data_ptr<int64_t>(),
                                 dtype_code(grad_out.scalar_type()), grad_out.size(0),
                                 grad_out.size(1), grad_out.size(2), grad_out.size(3), groups,
                                 cutout_size, align_corners, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dsa_backward: ", cudaGetErrorString(err));
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(condense, CUDA, m) {
  m.impl("dsa", &dsa_cuda);
  m.impl("dsa_backward", &dsa_backward_cuda);
}

}  // namespace condense
