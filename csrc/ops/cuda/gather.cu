// CUDA kernel of condense::gather_normalize over raw pointers; no torch headers, so
// `nvcc -c` compiles it with only the CUDA toolkit.
#include <cuda_runtime.h>
#include <cstdint>

namespace condense {

__global__ void gather_normalize_kernel(const uint8_t* __restrict__ images,
                                        const int64_t* __restrict__ index,
                                        const float* __restrict__ mean,
                                        const float* __restrict__ std, float* __restrict__ out,
                                        int64_t batch, int64_t channels, int64_t plane) {
  const int64_t total = batch * channels * plane;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = i % plane;
    const int64_t bc = i / plane;
    const int64_t c = bc % channels, b = bc / channels;
    const float v = static_cast<float>(images[(index[b] * channels + c) * plane + p]);
    out[i] = (v * (1.0f / 255.0f) - mean[c]) / std[c];
  }
}

cudaError_t launch_gather_normalize(const uint8_t* images, const int64_t* index, const float* mean,
                                    const float* std, float* out, int64_t batch, int64_t channels,
                                    int64_t plane, cudaStream_t stream) {
  const int64_t total = batch * channels * plane;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t wanted = (total + threads - 1) / threads;
  const int blocks = static_cast<int>(wanted < 65535 * 8 ? wanted : 65535 * 8);
  gather_normalize_kernel<<<blocks, threads, 0, stream>>>(images, index, mean, std, out, batch,
                                                           channels, plane);
  return cudaGetLastError();
}

}  // namespace condense
