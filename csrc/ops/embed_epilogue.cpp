// Schema of condense::embed_epilogue, the ConvNet block's GroupNorm → activation → 2×2 average
// pool in one pass (ops.embed_epilogue), and of its backward.
//
//   embed_epilogue(x, weight, bias, groups, eps, act, slope, pool) -> (out, mean, rstd)
//     x (n, C, H, W); weight, bias (C,); act "relu" | "leakyrelu" (negative slope `slope`) |
//     "sigmoid" | "swish"; pool: 2×2 stride-2 average (odd H or W drop the last row or column).
//     mean, rstd (n·groups,) in the accumulation type: what the backward recomputes x̂ from.
//   embed_epilogue_backward(grad_out, x, weight, bias, mean, rstd, groups, act, slope, pool)
//     -> (grad_x, grad_weight, grad_bias), each shaped and typed as its input.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(condense, m) {
  m.def("embed_epilogue(Tensor x, Tensor weight, Tensor bias, int groups, float eps, str act, "
        "float slope, bool pool) -> (Tensor, Tensor, Tensor)");
  m.def("embed_epilogue_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bias, "
        "Tensor mean, Tensor rstd, int groups, str act, float slope, bool pool) "
        "-> (Tensor, Tensor, Tensor)");
}
