// CUDA kernels of condense::dsa / dsa_backward over raw pointers; no torch headers, so `nvcc -c`
// compiles it with only the CUDA toolkit. The per-pixel math is csrc/ops/dsa_chain.h, shared
// with the CPU implementation. Forward: one thread per output pixel colours its taps, after the
// image means colour needs. Backward: scatter the output gradient through the same taps with
// atomicAdd into a float (or double) buffer G, reduce its per-image mean, then apply colour's
// adjoint per pixel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../dsa_chain.h"

namespace condense {
namespace {

// Element types, as the binding encodes them.
enum DsaDtype : int { kDsaFloat = 0, kDsaDouble = 1, kDsaHalf = 2, kDsaBFloat16 = 3 };

constexpr int kThreads = 256;

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

// Runs body(b, p, sample) for every pixel p of every image b, grid-stride.
template <typename acc_t, typename Body>
__device__ void for_each_pixel(int64_t n, int64_t plane, const dsa::PackedParams<acc_t>& params,
                               Body&& body) {
  for (int64_t index = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; index < n * plane;
       index += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = index / plane;
    body(b, index % plane, dsa::unpack(params, b));
  }
}

template <typename T>
__global__ void forward_kernel(const T* __restrict__ x, T* __restrict__ out,
                               const typename Acc<T>::type* __restrict__ image_mean,
                               dsa::PackedParams<typename Acc<T>::type> params, int64_t n,
                               int64_t channels, dsa::Geometry g) {
  using acc_t = typename Acc<T>::type;
  const int64_t plane = g.height * g.width;
  for_each_pixel(n, plane, params, [&](int64_t b, int64_t o, const dsa::Sample<acc_t>& s) {
    const T* img = x + b * channels * plane;
    dsa::apply_color(
        s, image_mean[b], dsa::Taps<acc_t>(s, g, o / g.width, o % g.width), channels,
        [&](int64_t c, int64_t p) { return load(img + c * plane + p); },
        [&](int64_t c, acc_t value) { store(out + (b * channels + c) * plane + o, value); });
  });
}

template <typename T>
__global__ void scatter_kernel(const T* __restrict__ grad_out,
                               typename Acc<T>::type* __restrict__ scattered,
                               dsa::PackedParams<typename Acc<T>::type> params, int64_t n,
                               int64_t channels, dsa::Geometry g) {
  using acc_t = typename Acc<T>::type;
  const int64_t plane = g.height * g.width;
  for_each_pixel(n, plane, params, [&](int64_t b, int64_t o, const dsa::Sample<acc_t>& s) {
    const T* go = grad_out + b * channels * plane;
    acc_t* dst = scattered + b * channels * plane;
    dsa::trace(s, g, o / g.width, o % g.width, [&](int64_t p, acc_t w) {
      for (int64_t c = 0; c < channels; ++c)
        atomicAdd(dst + c * plane + p, w * load(go + c * plane + o));
    });
  });
}

// grad_in = colour's adjoint of the scattered gradient, per pixel.
template <typename T>
__global__ void color_adjoint_kernel(const typename Acc<T>::type* __restrict__ scattered,
                                     const typename Acc<T>::type* __restrict__ scattered_mean,
                                     T* __restrict__ grad_in,
                                     dsa::PackedParams<typename Acc<T>::type> params, int64_t n,
                                     int64_t channels, int64_t plane) {
  using acc_t = typename Acc<T>::type;
  for_each_pixel(n, plane, params, [&](int64_t b, int64_t p, const dsa::Sample<acc_t>& s) {
    const acc_t* src = scattered + b * channels * plane + p;
    dsa::apply_color_adjoint(
        s, scattered_mean[b], channels, [&](int64_t c) { return src[c * plane]; },
        [&](int64_t c, acc_t value) { store(grad_in + (b * channels + c) * plane + p, value); });
  });
}

int blocks_for(int64_t total) {
  const int64_t wanted = (total + kThreads - 1) / kThreads;
  return static_cast<int>(wanted < 65535 * 8 ? wanted : 65535 * 8);
}

template <typename T>
cudaError_t forward_typed(const void* x, void* out, void* image_mean, const void* color,
                          const void* affine, const int64_t* shifts, int64_t n, int64_t channels,
                          dsa::Geometry g, int64_t groups, int64_t cutout_size,
                          cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  const int64_t plane = g.height * g.width;
  if (n * channels * plane == 0) return cudaSuccess;
  if (groups & dsa::kColor) {
    image_mean_kernel<T><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<acc_t*>(image_mean), channels * plane);
  }
  const dsa::PackedParams<acc_t> params{static_cast<const acc_t*>(color),
                                        static_cast<const acc_t*>(affine), shifts, groups,
                                        cutout_size};
  forward_kernel<T><<<blocks_for(n * plane), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<T*>(out), static_cast<const acc_t*>(image_mean), params,
      n, channels, g);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const void* grad_out, void* grad_in, void* scattered,
                           void* scattered_mean, const void* color, const void* affine,
                           const int64_t* shifts, int64_t n, int64_t channels, dsa::Geometry g,
                           int64_t groups, int64_t cutout_size, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  const int64_t plane = g.height * g.width;
  if (n * channels * plane == 0) return cudaSuccess;
  cudaError_t err = cudaMemsetAsync(scattered, 0, sizeof(acc_t) * n * channels * plane, stream);
  if (err != cudaSuccess) return err;
  const dsa::PackedParams<acc_t> params{static_cast<const acc_t*>(color),
                                        static_cast<const acc_t*>(affine), shifts, groups,
                                        cutout_size};
  scatter_kernel<T><<<blocks_for(n * plane), kThreads, 0, stream>>>(
      static_cast<const T*>(grad_out), static_cast<acc_t*>(scattered), params, n, channels, g);
  if (groups & dsa::kColor) {
    image_mean_kernel<acc_t><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
        static_cast<const acc_t*>(scattered), static_cast<acc_t*>(scattered_mean),
        channels * plane);
  }
  color_adjoint_kernel<T><<<blocks_for(n * plane), kThreads, 0, stream>>>(
      static_cast<const acc_t*>(scattered), static_cast<const acc_t*>(scattered_mean),
      static_cast<T*>(grad_in), params, n, channels, plane);
  return cudaGetLastError();
}

}  // namespace

// out = the DSA chain of x. image_mean: n elements of the parameter type (float, or double for
// double x), scratch for the colour pre-reduction. color/affine are of that type too.
cudaError_t launch_dsa_forward(const void* x, void* out, void* image_mean, const void* color,
                               const void* affine, const int64_t* shifts, int dtype, int64_t n,
                               int64_t channels, int64_t height, int64_t width, int64_t groups,
                               int64_t cutout_size, bool align_corners, cudaStream_t stream) {
  const dsa::Geometry g{height, width, align_corners};
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
  const dsa::Geometry g{height, width, align_corners};
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
