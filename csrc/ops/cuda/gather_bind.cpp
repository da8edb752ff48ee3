// Torch-facing CUDA binding of condense::gather_normalize: checks, device guard, stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

namespace condense {

cudaError_t launch_gather_normalize(const uint8_t* images, const int64_t* index, const float* mean,
                                    const float* std, float* out, int64_t batch, int64_t channels,
                                    int64_t plane, cudaStream_t stream);

namespace {

at::Tensor gather_normalize_cuda(const at::Tensor& images, const at::Tensor& index,
                                 const at::Tensor& mean, const at::Tensor& std) {
  TORCH_CHECK(images.is_cuda() && index.is_cuda(), "gather_normalize: CUDA tensors expected");
  TORCH_CHECK(images.scalar_type() == at::kByte && images.dim() == 4,
              "gather_normalize: images must be uint8 (N, C, H, W)");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1,
              "gather_normalize: index must be int64 (B,)");
  const int64_t channels = images.size(1);
  TORCH_CHECK(mean.numel() == channels && std.numel() == channels,
              "gather_normalize: mean and std need one value per channel");
  c10::cuda::CUDAGuard guard(images.device());
  auto src = images.contiguous();
  auto idx = index.contiguous();
  auto mean_f = mean.to(images.device(), at::kFloat).contiguous();
  auto std_f = std.to(images.device(), at::kFloat).contiguous();
  auto out = at::empty({idx.size(0), channels, images.size(2), images.size(3)},
                       images.options().dtype(at::kFloat));
  auto err = launch_gather_normalize(src.data_ptr<uint8_t>(), idx.data_ptr<int64_t>(),
                                     mean_f.data_ptr<float>(), std_f.data_ptr<float>(),
                                     out.data_ptr<float>(), idx.size(0), channels,
                                     images.size(2) * images.size(3),
                                     at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "gather_normalize: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(condense, CUDA, m) {
  m.impl("gather_normalize", &gather_normalize_cuda);
}

}  // namespace condense
