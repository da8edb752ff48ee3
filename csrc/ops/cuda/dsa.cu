// CUDA kernels of condense::dsa / dsa_backward over raw pointers; no torch headers, so `nvcc -c`
// compiles it with only the CUDA toolkit. The chain is the one of csrc/ops/cpu/dsa.cpp: each
// output pixel traces its (at most 16) input taps back through rotate/scale bilinear sampling,
// flip, cutout and translate, then applies colour, which is affine per pixel:
//   color_c(p) = k·s·x[c,p] + (k − k·s)·mean_c x[·,p] + (1 − k)·mean(x) + b.
// Backward: scatter the output gradient through the same taps with atomicAdd into a float (or
// double) buffer G, reduce its per-image mean, then apply colour's adjoint per pixel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace condense {
namespace {

enum Group : int64_t { kColor = 1, kCrop = 2, kCutout = 4, kFlip = 8, kScale = 16, kRotate = 32 };
// Element types, as the binding encodes them.
enum DsaDtype : int { kDsaFloat = 0, kDsaDouble = 1, kDsaHalf = 2, kDsaBFloat16 = 3 };

constexpr int kThreads = 256;
constexpr int kMaxTaps = 16;

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ inline float load(const float* p) { return *p; }
__device__ inline double load(const double* p) { return *p; }
__device__ inline float load(const __half* p) { return __half2float(*p); }
__device__ inline float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ inline void store(float* p, float v) { *p = v; }
__device__ inline void store(double* p, double v) { *p = v; }
__device__ inline void store(__half* p, float v) { *p = __float2half(v); }
__device__ inline void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// One sample's parameters; groups that are not listed hold their identity values.
template <typename acc_t>
struct Sample {
  bool color, scale, rotate, flip;
  acc_t brightness, contrast, contrast_saturation;  // b, k, k·s
  int64_t shift_h, shift_w, cut_top, cut_left, cut_size;
  acc_t scale_x, scale_y, cos_a, sin_a;
};

template <typename acc_t>
__device__ Sample<acc_t> unpack(const acc_t* color, const acc_t* affine, const int64_t* shifts,
                                int64_t b, int64_t groups, int64_t cutout_size) {
  Sample<acc_t> s;
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
__device__ acc_t normalized(int64_t index, int64_t size, bool align_corners) {
  if (size <= 1) return acc_t(0);
  return align_corners ? acc_t(-1) + acc_t(2 * index) / acc_t(size - 1)
                       : acc_t(2 * index + 1) / acc_t(size) - acc_t(1);
}

// Pixel coordinate of a grid coordinate, as F.grid_sample unnormalises it.
template <typename acc_t>
__device__ acc_t unnormalized(acc_t coord, int64_t size, bool align_corners) {
  return align_corners ? (coord + 1) / 2 * acc_t(size - 1) : ((coord + 1) * acc_t(size) - 1) / 2;
}

// Bilinear taps (zero padding) that output pixel (i, j) reads through the sampling matrix
// [[t00, t01, 0], [t10, t11, 0]]; calls visit(row, col, weight · tap weight) for each one inside.
template <typename acc_t, typename Visit>
__device__ void bilinear_taps(acc_t t00, acc_t t01, acc_t t10, acc_t t11, int64_t i, int64_t j,
                              const Geometry& g, acc_t weight, Visit& visit) {
  const acc_t xn = normalized<acc_t>(j, g.width, g.align_corners);
  const acc_t yn = normalized<acc_t>(i, g.height, g.align_corners);
  const acc_t ix = unnormalized<acc_t>(t00 * xn + t01 * yn, g.width, g.align_corners);
  const acc_t iy = unnormalized<acc_t>(t10 * xn + t11 * yn, g.height, g.align_corners);
  if (!(ix > acc_t(-1) && ix < acc_t(g.width) && iy > acc_t(-1) && iy < acc_t(g.height))) return;
  const int64_t x0 = static_cast<int64_t>(floor(ix));
  const int64_t y0 = static_cast<int64_t>(floor(iy));
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
__device__ void trace(const Sample<acc_t>& s, const Geometry& g, int64_t i, int64_t j,
                      Visit& visit) {
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

// means[b] = mean of data's b-th block of `count` elements; one thread block per image.
template <typename T>
__global__ void image_mean_kernel(const T* __restrict__ data,
                                  typename Acc<T>::type* __restrict__ means, int64_t count) {
  using acc_t = typename Acc<T>::type;
  __shared__ acc_t partial[kThreads];
  const T* image = data + blockIdx.x * count;
  acc_t sum = 0;
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x) sum += load(image + k);
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) means[blockIdx.x] = partial[0] / acc_t(count);
}

template <typename T>
__global__ void forward_kernel(const T* __restrict__ x, T* __restrict__ out,
                               const typename Acc<T>::type* __restrict__ image_mean,
                               const typename Acc<T>::type* __restrict__ color,
                               const typename Acc<T>::type* __restrict__ affine,
                               const int64_t* __restrict__ shifts, int64_t n, int64_t channels,
                               Geometry g, int64_t groups, int64_t cutout_size) {
  using acc_t = typename Acc<T>::type;
  const int64_t plane = g.height * g.width;
  for (int64_t index = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; index < n * plane;
       index += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = index / plane, o = index % plane;
    const Sample<acc_t> s = unpack(color, affine, shifts, b, groups, cutout_size);
    int64_t tap_index[kMaxTaps];
    acc_t tap_weight[kMaxTaps];
    int taps = 0;
    auto collect = [&](int64_t p, acc_t w) {
      tap_index[taps] = p;
      tap_weight[taps++] = w;
    };
    trace(s, g, o / g.width, o % g.width, collect);
    const T* img = x + b * channels * plane;
    acc_t shared = 0;  // the channel-independent part of color, summed over the taps
    if (s.color) {
      const acc_t mix = s.contrast - s.contrast_saturation;
      const acc_t offset = (acc_t(1) - s.contrast) * image_mean[b] + s.brightness;
      for (int t = 0; t < taps; ++t) {
        acc_t pixel_sum = 0;
        for (int64_t c = 0; c < channels; ++c) pixel_sum += load(img + c * plane + tap_index[t]);
        shared += tap_weight[t] * (mix * pixel_sum / acc_t(channels) + offset);
      }
    }
    for (int64_t c = 0; c < channels; ++c) {
      acc_t sum = 0;
      for (int t = 0; t < taps; ++t) sum += tap_weight[t] * load(img + c * plane + tap_index[t]);
      store(out + (b * channels + c) * plane + o, s.contrast_saturation * sum + shared);
    }
  }
}

template <typename T>
__global__ void scatter_kernel(const T* __restrict__ grad_out,
                               typename Acc<T>::type* __restrict__ scattered,
                               const typename Acc<T>::type* __restrict__ color,
                               const typename Acc<T>::type* __restrict__ affine,
                               const int64_t* __restrict__ shifts, int64_t n, int64_t channels,
                               Geometry g, int64_t groups, int64_t cutout_size) {
  using acc_t = typename Acc<T>::type;
  const int64_t plane = g.height * g.width;
  for (int64_t index = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; index < n * plane;
       index += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = index / plane, o = index % plane;
    const Sample<acc_t> s = unpack(color, affine, shifts, b, groups, cutout_size);
    const T* go = grad_out + b * channels * plane;
    acc_t* dst = scattered + b * channels * plane;
    auto scatter = [&](int64_t p, acc_t w) {
      for (int64_t c = 0; c < channels; ++c)
        atomicAdd(dst + c * plane + p, w * load(go + c * plane + o));
    };
    trace(s, g, o / g.width, o % g.width, scatter);
  }
}

// grad_in = colour's adjoint of G: k·s·G + (k − k·s)/C · Σ_c G + (1 − k) · mean(G).
template <typename T>
__global__ void color_adjoint_kernel(const typename Acc<T>::type* __restrict__ scattered,
                                     const typename Acc<T>::type* __restrict__ scattered_mean,
                                     T* __restrict__ grad_in,
                                     const typename Acc<T>::type* __restrict__ color,
                                     const typename Acc<T>::type* __restrict__ affine,
                                     const int64_t* __restrict__ shifts, int64_t n,
                                     int64_t channels, int64_t plane, int64_t groups,
                                     int64_t cutout_size) {
  using acc_t = typename Acc<T>::type;
  for (int64_t index = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; index < n * plane;
       index += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = index / plane, p = index % plane;
    const Sample<acc_t> s = unpack(color, affine, shifts, b, groups, cutout_size);
    const acc_t* src = scattered + b * channels * plane + p;
    acc_t pixel_sum = 0, spread = 0;
    if (s.color) {
      for (int64_t c = 0; c < channels; ++c) pixel_sum += src[c * plane];
      spread = (acc_t(1) - s.contrast) * scattered_mean[b];
    }
    const acc_t mix = (s.contrast - s.contrast_saturation) / acc_t(channels);
    for (int64_t c = 0; c < channels; ++c)
      store(grad_in + (b * channels + c) * plane + p,
            s.contrast_saturation * src[c * plane] + mix * pixel_sum + spread);
  }
}

int blocks_for(int64_t total) {
  const int64_t wanted = (total + kThreads - 1) / kThreads;
  return static_cast<int>(wanted < 65535 * 8 ? wanted : 65535 * 8);
}

template <typename T>
cudaError_t forward_typed(const void* x, void* out, void* image_mean, const void* color,
                          const void* affine, const int64_t* shifts, int64_t n, int64_t channels,
                          Geometry g, int64_t groups, int64_t cutout_size, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  const int64_t plane = g.height * g.width;
  if (n * channels * plane == 0) return cudaSuccess;
  if (groups & kColor) {
    image_mean_kernel<T><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<acc_t*>(image_mean), channels * plane);
  }
  forward_kernel<T><<<blocks_for(n * plane), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<T*>(out), static_cast<const acc_t*>(image_mean),
      static_cast<const acc_t*>(color), static_cast<const acc_t*>(affine), shifts, n, channels, g,
      groups, cutout_size);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const void* grad_out, void* grad_in, void* scattered,
                           void* scattered_mean, const void* color, const void* affine,
                           const int64_t* shifts, int64_t n, int64_t channels, Geometry g,
                           int64_t groups, int64_t cutout_size, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  const int64_t plane = g.height * g.width;
  if (n * channels * plane == 0) return cudaSuccess;
  cudaError_t err = cudaMemsetAsync(scattered, 0, sizeof(acc_t) * n * channels * plane, stream);
  if (err != cudaSuccess) return err;
  scatter_kernel<T><<<blocks_for(n * plane), kThreads, 0, stream>>>(
      static_cast<const T*>(grad_out), static_cast<acc_t*>(scattered),
      static_cast<const acc_t*>(color), static_cast<const acc_t*>(affine), shifts, n, channels, g,
      groups, cutout_size);
  if (groups & kColor) {
    image_mean_kernel<acc_t><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
        static_cast<const acc_t*>(scattered), static_cast<acc_t*>(scattered_mean),
        channels * plane);
  }
  color_adjoint_kernel<T><<<blocks_for(n * plane), kThreads, 0, stream>>>(
      static_cast<const acc_t*>(scattered), static_cast<const acc_t*>(scattered_mean),
      static_cast<T*>(grad_in), static_cast<const acc_t*>(color),
      static_cast<const acc_t*>(affine), shifts, n, channels, plane, groups, cutout_size);
  return cudaGetLastError();
}

}  // namespace

// out = the DSA chain of x. image_mean: n elements of the parameter type (float, or double for
// double x), scratch for the colour pre-reduction. color/affine are of that type too.
cudaError_t launch_dsa_forward(const void* x, void* out, void* image_mean, const void* color,
                               const void* affine, const int64_t* shifts, int dtype, int64_t n,
                               int64_t channels, int64_t height, int64_t width, int64_t groups,
                               int64_t cutout_size, bool align_corners, cudaStream_t stream) {
  const Geometry g{height, width, align_corners};
  switch (dtype) {
    case kDsaFloat:
      return forward_typed<float>(x, out, image_mean, color, affine, shifts, n, channels, g,
                                  groups, cutout_size, stream);
    case kDsaDouble:
      return forward_typed<double>(x, out, image_mean, color, affine, shifts, n, channels, g,
                                   groups, cutout_size, stream);
    case kDsaHalf:
      return forward_typed<__half>(x, out, image_mean, color, affine, shifts, n, channels, g,
                                   groups, cutout_size, stream);
    case kDsaBFloat16:
      return forward_typed<__nv_bfloat16>(x, out, image_mean, color, affine, shifts, n, channels,
                                          g, groups, cutout_size, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// grad_in = the adjoint of the chain applied to grad_out. scattered: n·C·H·W elements and
// scattered_mean: n elements, both of the parameter type, are scratch.
cudaError_t launch_dsa_backward(const void* grad_out, void* grad_in, void* scattered,
                                void* scattered_mean, const void* color, const void* affine,
                                const int64_t* shifts, int dtype, int64_t n, int64_t channels,
                                int64_t height, int64_t width, int64_t groups,
                                int64_t cutout_size, bool align_corners, cudaStream_t stream) {
  const Geometry g{height, width, align_corners};
  switch (dtype) {
    case kDsaFloat:
      return backward_typed<float>(grad_out, grad_in, scattered, scattered_mean, color, affine,
                                   shifts, n, channels, g, groups, cutout_size, stream);
    case kDsaDouble:
      return backward_typed<double>(grad_out, grad_in, scattered, scattered_mean, color, affine,
                                    shifts, n, channels, g, groups, cutout_size, stream);
    case kDsaHalf:
      return backward_typed<__half>(grad_out, grad_in, scattered, scattered_mean, color, affine,
                                    shifts, n, channels, g, groups, cutout_size, stream);
    case kDsaBFloat16:
      return backward_typed<__nv_bfloat16>(grad_out, grad_in, scattered, scattered_mean, color,
                                           affine, shifts, n, channels, g, groups, cutout_size,
                                           stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace condense
