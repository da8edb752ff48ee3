// CPU implementation of condense::gather_normalize (at::parallel_for over gathered images).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

namespace condense {
namespace {

at::Tensor gather_normalize_cpu(const at::Tensor& images, const at::Tensor& index,
                                const at::Tensor& mean, const at::Tensor& std) {
  TORCH_CHECK(images.scalar_type() == at::kByte && images.dim() == 4,
              "gather_normalize: images must be uint8 (N, C, H, W)");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1,
              "gather_normalize: index must be int64 (B,)");
  const int64_t n = images.size(0), channels = images.size(1);
  const int64_t plane = images.size(2) * images.size(3);
  TORCH_CHECK(mean.numel() == channels && std.numel() == channels,
              "gather_normalize: mean and std need one value per channel");
  auto src = images.contiguous();
  auto idx = index.contiguous();
  auto mean_f = mean.to(at::kFloat).contiguous();
  auto std_f = std.to(at::kFloat).contiguous();
  auto out = at::empty({idx.size(0), channels, images.size(2), images.size(3)},
                       images.options().dtype(at::kFloat));
  const uint8_t* src_p = src.data_ptr<uint8_t>();
  const int64_t* idx_p = idx.data_ptr<int64_t>();
  const float* mean_p = mean_f.data_ptr<float>();
  const float* std_p = std_f.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  for (int64_t b = 0; b < idx.size(0); ++b) {
    TORCH_CHECK(idx_p[b] >= 0 && idx_p[b] < n, "gather_normalize: index ", idx_p[b],
                " out of range for ", n, " images");
  }
  at::parallel_for(0, idx.size(0) * channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / channels, c = bc % channels;
      const float scale = 1.0f / (255.0f * std_p[c]);
      const float shift = -mean_p[c] / std_p[c];
      const uint8_t* in = src_p + (idx_p[b] * channels + c) * plane;
      float* o = out_p + bc * plane;
      for (int64_t p = 0; p < plane; ++p) o[p] = static_cast<float>(in[p]) * scale + shift;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(condense, CPU, m) {
  m.impl("gather_normalize", &gather_normalize_cpu);
}

}  // namespace condense
