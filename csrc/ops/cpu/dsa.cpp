// CPU implementation of condense::dsa / dsa_backward (schema in csrc/ops/dsa.cpp); the per-pixel
// math is in csrc/ops/dsa_chain.h. Forward: one pass per output row, each pixel colouring its
// taps, after the image means colour needs. Backward: one pass per image, scattering the output
// gradient through the taps into a buffer, then colour's adjoint of that buffer.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

#include "../dsa_arguments.h"
#include "../dsa_chain.h"

namespace condense {
namespace {

template <typename scalar_t>
void forward_kernel(const scalar_t* x, scalar_t* out,
                    const dsa::PackedParams<at::opmath_type<scalar_t>>& params, int64_t n,
                    int64_t channels, const dsa::Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = g.height * g.width;
  std::vector<acc_t> image_mean(n, acc_t(0));
  if (params.groups & dsa::kColor) {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        double sum = 0;
        const scalar_t* img = x + b * channels * plane;
        for (int64_t k = 0; k < channels * plane; ++k) sum += static_cast<double>(img[k]);
        image_mean[b] = static_cast<acc_t>(sum / static_cast<double>(channels * plane));
      }
    });
  }
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.width * channels));
  at::parallel_for(0, n * g.height, grain, [&](int64_t begin, int64_t end) {
    for (int64_t bi = begin; bi < end; ++bi) {
      const int64_t b = bi / g.height, i = bi % g.height;
      const dsa::Sample<acc_t> s = dsa::unpack(params, b);
      const scalar_t* img = x + b * channels * plane;
      scalar_t* dst = out + b * channels * plane + i * g.width;
      for (int64_t j = 0; j < g.width; ++j) {
        dsa::apply_color(
            s, image_mean[b], dsa::Taps<acc_t>(s, g, i, j), channels,
            [&](int64_t c, int64_t p) { return static_cast<acc_t>(img[c * plane + p]); },
            [&](int64_t c, acc_t value) { dst[c * plane + j] = static_cast<scalar_t>(value); });
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad_out, scalar_t* grad_in,
                     const dsa::PackedParams<at::opmath_type<scalar_t>>& params, int64_t n,
                     int64_t channels, const dsa::Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = g.height * g.width;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scattered(channels * plane);
    for (int64_t b = begin; b < end; ++b) {
      const dsa::Sample<acc_t> s = dsa::unpack(params, b);
      const scalar_t* go = grad_out + b * channels * plane;
      std::fill(scattered.begin(), scattered.end(), acc_t(0));
      for (int64_t i = 0; i < g.height; ++i) {
        for (int64_t j = 0; j < g.width; ++j) {
          const int64_t o = i * g.width + j;
          dsa::trace(s, g, i, j, [&](int64_t p, acc_t w) {
            for (int64_t c = 0; c < channels; ++c)
              scattered[c * plane + p] += w * static_cast<acc_t>(go[c * plane + o]);
          });
        }
      }
      double total = 0;
      if (s.color)
        for (acc_t v : scattered) total += static_cast<double>(v);
      const acc_t scattered_mean =
          static_cast<acc_t>(total / static_cast<double>(channels * plane));
      scalar_t* gi = grad_in + b * channels * plane;
      for (int64_t p = 0; p < plane; ++p) {
        dsa::apply_color_adjoint(
            s, scattered_mean, channels, [&](int64_t c) { return scattered[c * plane + p]; },
            [&](int64_t c, acc_t value) { gi[c * plane + p] = static_cast<scalar_t>(value); });
      }
    }
  });
}

// Both ops: check the arguments, then run the forward or the backward kernel (they share a
// signature) over contiguous tensors into a fresh one shaped as `input`.
template <bool kBackward>
at::Tensor dsa_cpu(const at::Tensor& input, const at::Tensor& color, const at::Tensor& affine,
                   const at::Tensor& shifts, int64_t groups, int64_t cutout_size,
                   bool align_corners) {
  constexpr const char* name = kBackward ? "dsa_backward" : "dsa";
  dsa::check_arguments(name, input, color, affine, shifts, cutout_size);
  const dsa::ContiguousTensors t = dsa::make_contiguous(input, color, affine, shifts);
  auto out = at::empty_like(t.input);
  const dsa::Geometry g{input.size(2), input.size(3), align_corners};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), name, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dsa::PackedParams<acc_t> params{t.color.data_ptr<acc_t>(), t.affine.data_ptr<acc_t>(),
                                          t.shifts.data_ptr<int64_t>(), groups, cutout_size};
    const auto kernel = kBackward ? backward_kernel<scalar_t> : forward_kernel<scalar_t>;
    kernel(t.input.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), params, input.size(0),
           input.size(1), g);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(condense, CPU, m) {
  m.impl("dsa", &dsa_cpu</*kBackward=*/false>);
  m.impl("dsa_backward", &dsa_cpu</*kBackward=*/true>);
}

}  // namespace condense
