// CPU implementation of condense::dsa / dsa_backward (schema in csrc/ops/dsa.cpp).
//
// One pass per output pixel: the inverse of the geometric chain (rotate and scale bilinear
// sampling -> flip -> cutout -> translate) gives the input pixels it reads and their weights
// (at most 16 taps), then colour is applied to those taps. Colour is affine per pixel:
//   color_c(p) = k·s·x[c,p] + (k − k·s)·mean_c x[·,p] + (1 − k)·mean(x) + b
// (b brightness, s saturation, k contrast), so the only pre-reduction is the image mean. The
// backward scatters the output gradient through the same taps, then applies colour's adjoint.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace condense {
namespace {

enum Group : int64_t { kColor = 1, kCrop = 2, kCutout = 4, kFlip = 8, kScale = 16, kRotate = 32 };

// One sample's parameters; groups that are not listed hold their identity values.
template <typename acc_t>
struct Sample {
  bool color, scale, rotate, flip;
  acc_t brightness, contrast, contrast_saturation;  // b, k, k·s
  int64_t shift_h, shift_w, cut_top, cut_left, cut_size;
  acc_t scale_x, scale_y, cos_a, sin_a;
};

template <typename acc_t>
Sample<acc_t> unpack(const acc_t* color, const acc_t* affine, const int64_t* shifts, int64_t b,
                     int64_t groups, int64_t cutout_size) {
  Sample<acc_t> s{};
  const acc_t* col = color + 3 * b;
  const acc_t* aff = affine + 4 * b;
  const int64_t* sh = shifts + 5 * b;
  s.color = groups & kColor;
  s.brightness = s.color ? col[0] : acc_t(0);
  s.contrast = s.color ? col[2] : acc_t(1);
  s.contrast_saturation = s.color ? col[2] * col[1] : acc_t(1);
  s.shift_h = (groups & kCrop) ? sh[0] : 0;
  s.shift_w = (groups & kCrop) ? sh[1] : 0;
  s.cut_size = (groups & kCutout) ? cutout_size : 0;
  s.cut_top = sh[2] - cutout_size / 2;
  s.cut_left = sh[3] - cutout_size / 2;
  s.flip = (groups & kFlip) && sh[4] != 0;
  s.scale = groups & kScale;
  s.rotate = groups & kRotate;
  s.scale_x = aff[0];
  s.scale_y = aff[1];
  s.cos_a = aff[2];
  s.sin_a = aff[3];
  return s;
}

struct Geometry {
  int64_t height, width;
  bool align_corners;
};

// Coordinate in [-1, 1] of pixel `index`, as F.affine_grid's base grid.
template <typename acc_t>
acc_t normalized(int64_t index, int64_t size, bool align_corners) {
  if (size <= 1) return acc_t(0);
  return align_corners ? acc_t(-1) + acc_t(2 * index) / acc_t(size - 1)
                       : acc_t(2 * index + 1) / acc_t(size) - acc_t(1);
}

// Pixel coordinate of a grid coordinate, as F.grid_sample unnormalises it.
template <typename acc_t>
acc_t unnormalized(acc_t coord, int64_t size, bool align_corners) {
  return align_corners ? (coord + 1) / 2 * acc_t(size - 1) : ((coord + 1) * acc_t(size) - 1) / 2;
}

// Bilinear taps (zero padding) that output pixel (i, j) reads through the sampling matrix
// [[t00, t01, 0], [t10, t11, 0]]; calls visit(row, col, weight · tap weight) for each one inside.
template <typename acc_t, typename Visit>
void bilinear_taps(acc_t t00, acc_t t01, acc_t t10, acc_t t11, int64_t i, int64_t j,
                   const Geometry& g, acc_t weight, Visit&& visit) {
  const acc_t xn = normalized<acc_t>(j, g.width, g.align_corners);
  const acc_t yn = normalized<acc_t>(i, g.height, g.align_corners);
  const acc_t ix = unnormalized<acc_t>(t00 * xn + t01 * yn, g.width, g.align_corners);
  const acc_t iy = unnormalized<acc_t>(t10 * xn + t11 * yn, g.height, g.align_corners);
  if (!(ix > acc_t(-1) && ix < acc_t(g.width) && iy > acc_t(-1) && iy < acc_t(g.height))) return;
  const int64_t x0 = static_cast<int64_t>(std::floor(ix));
  const int64_t y0 = static_cast<int64_t>(std::floor(iy));
  const acc_t fx = ix - acc_t(x0), fy = iy - acc_t(y0);
  for (int64_t dy = 0; dy < 2; ++dy) {
    const int64_t row = y0 + dy;
    if (row < 0 || row >= g.height) continue;
    const acc_t wy = dy ? fy : acc_t(1) - fy;
    for (int64_t dx = 0; dx < 2; ++dx) {
      const int64_t col = x0 + dx;
      if (col < 0 || col >= g.width) continue;
      visit(row, col, weight * wy * (dx ? fx : acc_t(1) - fx));
    }
  }
}

// Every input pixel that output pixel (i, j) reads, as visit(flat index, weight).
template <typename acc_t, typename Visit>
void trace(const Sample<acc_t>& s, const Geometry& g, int64_t i, int64_t j, Visit&& visit) {
  auto before_scale = [&](int64_t row, int64_t col, acc_t weight) {
    if (s.flip) col = g.width - 1 - col;
    if (row >= s.cut_top && row < s.cut_top + s.cut_size && col >= s.cut_left &&
        col < s.cut_left + s.cut_size)
      return;
    row += s.shift_h;
    col += s.shift_w;
    if (row < 0 || row >= g.height || col < 0 || col >= g.width) return;
    visit(row * g.width + col, weight);
  };
  auto before_rotate = [&](int64_t row, int64_t col, acc_t weight) {
    if (s.scale) {
      bilinear_taps<acc_t>(s.scale_x, acc_t(0), acc_t(0), s.scale_y, row, col, g, weight,
                           before_scale);
    } else {
      before_scale(row, col, weight);
    }
  };
  if (s.rotate) {
    bilinear_taps<acc_t>(s.cos_a, -s.sin_a, s.sin_a, s.cos_a, i, j, g, acc_t(1), before_rotate);
  } else {
    before_rotate(i, j, acc_t(1));
  }
}

constexpr int kMaxTaps = 16;

template <typename scalar_t>
void forward_kernel(const scalar_t* x, scalar_t* out, const at::opmath_type<scalar_t>* color,
                    const at::opmath_type<scalar_t>* affine, const int64_t* shifts, int64_t n,
                    int64_t channels, const Geometry& g, int64_t groups, int64_t cutout_size) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = g.height * g.width;
  std::vector<acc_t> image_mean(n, acc_t(0));
  if (groups & kColor) {
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
    int64_t tap_index[kMaxTaps];
    acc_t tap_weight[kMaxTaps];
    for (int64_t bi = begin; bi < end; ++bi) {
      const int64_t b = bi / g.height, i = bi % g.height;
      const Sample<acc_t> s = unpack(color, affine, shifts, b, groups, cutout_size);
      const scalar_t* img = x + b * channels * plane;
      scalar_t* dst = out + b * channels * plane;
      const acc_t mix = s.contrast - s.contrast_saturation;
      const acc_t offset = (acc_t(1) - s.contrast) * image_mean[b] + s.brightness;
      for (int64_t j = 0; j < g.width; ++j) {
        int taps = 0;
        trace(s, g, i, j, [&](int64_t p, acc_t w) {
          tap_index[taps] = p;
          tap_weight[taps++] = w;
        });
        acc_t shared = 0;  // the channel-independent part of color, summed over the taps
        if (s.color) {
          for (int t = 0; t < taps; ++t) {
            acc_t pixel_sum = 0;
            for (int64_t c = 0; c < channels; ++c)
              pixel_sum += static_cast<acc_t>(img[c * plane + tap_index[t]]);
            shared += tap_weight[t] * (mix * pixel_sum / acc_t(channels) + offset);
          }
        }
        for (int64_t c = 0; c < channels; ++c) {
          acc_t sum = 0;
          for (int t = 0; t < taps; ++t)
            sum += tap_weight[t] * static_cast<acc_t>(img[c * plane + tap_index[t]]);
          dst[c * plane + i * g.width + j] =
              static_cast<scalar_t>(s.contrast_saturation * sum + shared);
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad_out, scalar_t* grad_in,
                     const at::opmath_type<scalar_t>* color,
                     const at::opmath_type<scalar_t>* affine, const int64_t* shifts, int64_t n,
                     int64_t channels, const Geometry& g, int64_t groups, int64_t cutout_size) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = g.height * g.width;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scattered(channels * plane);
    for (int64_t b = begin; b < end; ++b) {
      const Sample<acc_t> s = unpack(color, affine, shifts, b, groups, cutout_size);
      const scalar_t* go = grad_out + b * channels * plane;
      std::fill(scattered.begin(), scattered.end(), acc_t(0));
      for (int64_t i = 0; i < g.height; ++i) {
        for (int64_t j = 0; j < g.width; ++j) {
          const int64_t o = i * g.width + j;
          trace(s, g, i, j, [&](int64_t p, acc_t w) {
            for (int64_t c = 0; c < channels; ++c)
              scattered[c * plane + p] += w * static_cast<acc_t>(go[c * plane + o]);
          });
        }
      }
      // Adjoint of colour: k·s·G + (k − k·s)/C · Σ_c G + (1 − k)/(C·HW) · Σ G.
      double total = 0;
      if (s.color)
        for (acc_t v : scattered) total += static_cast<double>(v);
      const acc_t mix = (s.contrast - s.contrast_saturation) / acc_t(channels);
      const acc_t image_mean = static_cast<acc_t>(total / static_cast<double>(channels * plane));
      const acc_t spread = (acc_t(1) - s.contrast) * image_mean;
      scalar_t* gi = grad_in + b * channels * plane;
      for (int64_t p = 0; p < plane; ++p) {
        acc_t pixel_sum = 0;
        if (s.color)
          for (int64_t c = 0; c < channels; ++c) pixel_sum += scattered[c * plane + p];
        for (int64_t c = 0; c < channels; ++c)
          gi[c * plane + p] = static_cast<scalar_t>(
              s.contrast_saturation * scattered[c * plane + p] + mix * pixel_sum + spread);
      }
    }
  });
}

void check_arguments(const char* name, const at::Tensor& x, const at::Tensor& color,
                     const at::Tensor& affine, const at::Tensor& shifts, int64_t cutout_size) {
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

at::Tensor dsa_forward_cpu(const at::Tensor& x, const at::Tensor& color, const at::Tensor& affine,
                           const at::Tensor& shifts, int64_t groups, int64_t cutout_size,
                           bool align_corners) {
  check_arguments("dsa", x, color, affine, shifts, cutout_size);
  auto src = x.contiguous();
  auto col = color.contiguous();
  auto aff = affine.contiguous();
  auto sh = shifts.contiguous();
  auto out = at::empty_like(src);
  const Geometry g{x.size(2), x.size(3), align_corners};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dsa", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t>(src.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                             col.data_ptr<acc_t>(), aff.data_ptr<acc_t>(), sh.data_ptr<int64_t>(),
                             x.size(0), x.size(1), g, groups, cutout_size);
  });
  return out;
}

at::Tensor dsa_backward_cpu(const at::Tensor& grad_out, const at::Tensor& color,
                            const at::Tensor& affine, const at::Tensor& shifts, int64_t groups,
                            int64_t cutout_size, bool align_corners) {
  check_arguments("dsa_backward", grad_out, color, affine, shifts, cutout_size);
  auto go = grad_out.contiguous();
  auto col = color.contiguous();
  auto aff = affine.contiguous();
  auto sh = shifts.contiguous();
  auto grad_in = at::empty_like(go);
  const Geometry g{go.size(2), go.size(3), align_corners};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "dsa_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t>(go.data_ptr<scalar_t>(), grad_in.data_ptr<scalar_t>(),
                              col.data_ptr<acc_t>(), aff.data_ptr<acc_t>(), sh.data_ptr<int64_t>(),
                              go.size(0), go.size(1), g, groups, cutout_size);
  });
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(condense, CPU, m) {
  m.impl("dsa", &dsa_forward_cpu);
  m.impl("dsa_backward", &dsa_backward_cpu);
}

}  // namespace condense
