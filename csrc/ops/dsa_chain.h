// The per-pixel math of condense::dsa / dsa_backward (schema in csrc/ops/dsa.cpp), shared by the
// CPU implementation (cpu/dsa.cpp) and the CUDA kernels (cuda/dsa.cu). Standard headers only, no
// torch, so that `nvcc -c` compiles the kernels with nothing but the CUDA toolkit.
//
// Each output pixel reads at most 16 input pixels ("taps"), found by tracing it back through the
// inverse of the geometric chain: rotate and scale bilinear sampling -> flip -> cutout ->
// translate. Colour is then applied to those taps; it is affine per pixel:
//   color_c(p) = k·s·x[c,p] + (k − k·s)·mean_c x[·,p] + (1 − k)·mean(x) + b
// (b brightness, s saturation, k contrast), so its only pre-reduction is the image mean. The
// backward scatters the output gradient through the same taps, then applies colour's adjoint.
#pragma once

#include <cmath>
#include <cstdint>

// Compiles a function for both host and device under nvcc, and as a plain inline one elsewhere.
#ifdef __CUDACC__
#define CONDENSE_HOST_DEVICE __host__ __device__ inline
#else
#define CONDENSE_HOST_DEVICE inline
#endif

namespace condense {
namespace dsa {

// Bits of the `groups` mask.
enum Group : int64_t { kColor = 1, kCrop = 2, kCutout = 4, kFlip = 8, kScale = 16, kRotate = 32 };

constexpr int kMaxTaps = 16;

// The per-sample parameter arrays as csrc/ops/dsa.cpp packs them (color (n, 3), affine (n, 4),
// shifts (n, 5)), with the op's groups mask and cutout side.
template <typename acc_t>
struct PackedParams {
  const acc_t* color;
  const acc_t* affine;
  const int64_t* shifts;
  int64_t groups, cutout_size;
};

// One sample's parameters; groups that are not listed hold their identity values.
template <typename acc_t>
struct Sample {
  bool color, scale, rotate, flip;
  acc_t brightness, contrast, contrast_saturation;  // b, k, k·s
  int64_t shift_h, shift_w, cut_top, cut_left, cut_size;
  acc_t scale_x, scale_y, cos_a, sin_a;
};

template <typename acc_t>
CONDENSE_HOST_DEVICE Sample<acc_t> unpack(const PackedParams<acc_t>& params, int64_t b) {
  Sample<acc_t> s{};
  const acc_t* col = params.color + 3 * b;
  const acc_t* aff = params.affine + 4 * b;
  const int64_t* sh = params.shifts + 5 * b;
  const int64_t groups = params.groups, cutout_size = params.cutout_size;
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
CONDENSE_HOST_DEVICE acc_t normalized(int64_t index, int64_t size, bool align_corners) {
  if (size <= 1) return acc_t(0);
  return align_corners ? acc_t(-1) + acc_t(2 * index) / acc_t(size - 1)
                       : acc_t(2 * index + 1) / acc_t(size) - acc_t(1);
}

// Pixel coordinate of a grid coordinate, as F.grid_sample unnormalises it.
template <typename acc_t>
CONDENSE_HOST_DEVICE acc_t unnormalized(acc_t coord, int64_t size, bool align_corners) {
  return align_corners ? (coord + 1) / 2 * acc_t(size - 1) : ((coord + 1) * acc_t(size) - 1) / 2;
}

// Bilinear taps (zero padding) that output pixel (i, j) reads through the sampling matrix
// [[t00, t01, 0], [t10, t11, 0]]; calls visit(row, col, weight · tap weight) for each one inside.
template <typename acc_t, typename Visit>
CONDENSE_HOST_DEVICE void bilinear_taps(acc_t t00, acc_t t01, acc_t t10, acc_t t11, int64_t i,
                                        int64_t j, const Geometry& g, acc_t weight,
                                        Visit&& visit) {
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
CONDENSE_HOST_DEVICE void trace(const Sample<acc_t>& s, const Geometry& g, int64_t i, int64_t j,
                                Visit&& visit) {
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

// The taps of output pixel (i, j): flat input indices and their weights. Filled in place by the
// constructor, so the arrays are never copied.
template <typename acc_t>
struct Taps {
  int count;
  int64_t index[kMaxTaps];
  acc_t weight[kMaxTaps];

  CONDENSE_HOST_DEVICE Taps(const Sample<acc_t>& s, const Geometry& g, int64_t i, int64_t j) {
    int collected = 0;  // a local, not the member, so that it can stay in a register
    trace(s, g, i, j, [&](int64_t p, acc_t w) {
      index[collected] = p;
      weight[collected++] = w;
    });
    count = collected;
  }
};

// Colour of one output pixel from its taps: write(c, value) for each channel c, where
// load(c, p) reads input x[c, p] as acc_t. image_mean (the mean of the whole input image) is
// read only when colour is on.
template <typename acc_t, typename Load, typename Write>
CONDENSE_HOST_DEVICE void apply_color(const Sample<acc_t>& s, const acc_t& image_mean,
                                      const Taps<acc_t>& taps, int64_t channels, Load&& load,
                                      Write&& write) {
  acc_t shared = 0;  // the channel-independent part of color, summed over the taps
  if (s.color) {
    const acc_t mix = s.contrast - s.contrast_saturation;
    const acc_t offset = (acc_t(1) - s.contrast) * image_mean + s.brightness;
    for (int t = 0; t < taps.count; ++t) {
      acc_t pixel_sum = 0;
      for (int64_t c = 0; c < channels; ++c) pixel_sum += load(c, taps.index[t]);
      shared += taps.weight[t] * (mix * pixel_sum / acc_t(channels) + offset);
    }
  }
  for (int64_t c = 0; c < channels; ++c) {
    acc_t sum = 0;
    for (int t = 0; t < taps.count; ++t) sum += taps.weight[t] * load(c, taps.index[t]);
    write(c, s.contrast_saturation * sum + shared);
  }
}

// Colour's adjoint at one pixel of the scattered gradient G:
//   write(c, k·s·G[c] + (k − k·s)/C · Σ_c G[c] + (1 − k) · mean(G)),
// where load(c) reads G[c] at that pixel. scattered_mean (mean(G) over the whole image) is read
// only when colour is on.
template <typename acc_t, typename Load, typename Write>
CONDENSE_HOST_DEVICE void apply_color_adjoint(const Sample<acc_t>& s, const acc_t& scattered_mean,
                                              int64_t channels, Load&& load, Write&& write) {
  acc_t pixel_sum = 0, spread = 0;
  if (s.color) {
    for (int64_t c = 0; c < channels; ++c) pixel_sum += load(c);
    spread = (acc_t(1) - s.contrast) * scattered_mean;
  }
  const acc_t mix = (s.contrast - s.contrast_saturation) / acc_t(channels);
  for (int64_t c = 0; c < channels; ++c)
    write(c, s.contrast_saturation * load(c) + mix * pixel_sum + spread);
}

}  // namespace dsa
}  // namespace condense
