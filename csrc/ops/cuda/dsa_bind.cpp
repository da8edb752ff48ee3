// Torch-facing CUDA binding of condense::dsa / dsa_backward: checks, device guard, scratch
// buffers, stream; the kernels are in dsa.cu.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

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

void check_arguments(const char* name, const at::Tensor& x, const at::Tensor& color,
                     const at::Tensor& affine, const at::Tensor& shifts, int64_t cutout_size) {
  TORCH_CHECK(x.is_cuda() && color.device() == x.device() && affine.device() == x.device() &&
                  shifts.device() == x.device(),
              name, ": all tensors must be on the same CUDA device");
  TORCH_CHECK(x.dim() == 4 && at::isFloatingType(x.scalar_type()), name,
              ": expected a floating (n, C, H, W) tensor");
  const int64_t n = x.size(0);
  const auto param_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(color.scalar_type() == param_type && color.dim() == 2 && color.size(0) == n &&
                  color.size(1) == 3,
              name, ": color must be (n, 3) of ", param_type);
  TORCH_CHECK(affine.scalar_type() == param_type && affine.dim() == 2 && affine.size(0) == n &&
                  affine.size(1) == 4,
              name, ": affine must be (n, 4) of ", param_type);
  TORCH_CHECK(shifts.scalar_type() == at::kLong && shifts.dim() == 2 && shifts.size(0) == n &&
                  shifts.size(1) == 5,
              name, ": shifts must be int64 (n, 5)");
  TORCH_CHECK(cutout_size >= 0, name, ": cutout_size must be non-negative");
}

at::Tensor dsa_cuda(const at::Tensor& x, const at::Tensor& color, const at::Tensor& affine,
                    const at::Tensor& shifts, int64_t groups, int64_t cutout_size,
                    bool align_corners) {
  check_arguments("dsa", x, color, affine, shifts, cutout_size);
  c10::cuda::CUDAGuard guard(x.device());
  auto src = x.contiguous();
  auto col = color.contiguous();
  auto aff = affine.contiguous();
  auto sh = shifts.contiguous();
  auto out = at::empty_like(src);
  auto image_mean = at::empty({x.size(0)}, col.options());
  auto err = launch_dsa_forward(src.data_ptr(), out.data_ptr(), image_mean.data_ptr(),
                                col.data_ptr(), aff.data_ptr(), sh.data_ptr<int64_t>(),
                                dtype_code(x.scalar_type()), x.size(0), x.size(1), x.size(2),
                                x.size(3), groups, cutout_size, align_corners,
                                at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dsa: ", cudaGetErrorString(err));
  return out;
}

at::Tensor dsa_backward_cuda(const at::Tensor& grad_out, const at::Tensor& color,
                             const at::Tensor& affine, const at::Tensor& shifts, int64_t groups,
                             int64_t cutout_size, bool align_corners) {
  check_arguments("dsa_backward", grad_out, color, affine, shifts, cutout_size);
  c10::cuda::CUDAGuard guard(grad_out.device());
  auto go = grad_out.contiguous();
  auto col = color.contiguous();
  auto aff = affine.contiguous();
  auto sh = shifts.contiguous();
  auto grad_in = at::empty_like(go);
  auto scattered = at::empty(go.sizes(), col.options());
  auto scattered_mean = at::empty({go.size(0)}, col.options());
  auto err = launch_dsa_backward(go.data_ptr(), grad_in.data_ptr(), scattered.data_ptr(),
                                 scattered_mean.data_ptr(), col.data_ptr(), aff.data_ptr(),
                                 sh.data_ptr<int64_t>(), dtype_code(go.scalar_type()), go.size(0),
                                 go.size(1), go.size(2), go.size(3), groups, cutout_size,
                                 align_corners, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dsa_backward: ", cudaGetErrorString(err));
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(condense, CUDA, m) {
  m.impl("dsa", &dsa_cuda);
  m.impl("dsa_backward", &dsa_backward_cuda);
}

}  // namespace condense
