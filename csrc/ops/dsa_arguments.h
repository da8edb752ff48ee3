// Torch-side argument handling of condense::dsa / dsa_backward (schema in csrc/ops/dsa.cpp),
// shared by the CPU op (cpu/dsa.cpp) and the CUDA binding (cuda/dsa_bind.cpp). Not for the .cu
// kernels, which include no torch headers.
#pragma once

#include <torch/types.h>

namespace condense {
namespace dsa {

// Checks the image and the packed parameters against the schema; `name` leads each message.
inline void check_arguments(const char* name, const at::Tensor& input, const at::Tensor& color,
                            const at::Tensor& affine, const at::Tensor& shifts,
                            int64_t cutout_size) {
  TORCH_CHECK(input.dim() == 4 && at::isFloatingType(input.scalar_type()), name,
              ": expected a floating (n, C, H, W) tensor");
  const int64_t n = input.size(0);
  const auto param_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
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

// The op's tensors, contiguous for the raw-pointer kernels.
struct ContiguousTensors {
  at::Tensor input, color, affine, shifts;
};

inline ContiguousTensors make_contiguous(const at::Tensor& input, const at::Tensor& color,
                                         const at::Tensor& affine, const at::Tensor& shifts) {
  return {input.contiguous(), color.contiguous(), affine.contiguous(), shifts.contiguous()};
}

}  // namespace dsa
}  // namespace condense
