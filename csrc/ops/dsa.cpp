// Schema of condense::dsa, the fused DSA chain (SPEC §3): every listed group in one pass,
// forward and backward.
//
// Parameters come packed per sample, as the Python layer (condense_engine/ops/dsa.py) builds them:
//   color   (n, 3) [brightness, saturation, contrast]          float32 (float64 for double x)
//   affine  (n, 4) [scale_x, scale_y, cos(angle), sin(angle)] same dtype as color
//   shifts  (n, 5) int64 [t_h, t_w, cutout_center_h, cutout_center_w, flip]
//   groups  bitmask: 1 color, 2 crop, 4 cutout, 8 flip, 16 scale, 32 rotate (applied in that order)
// dsa_backward is the adjoint of the chain's linear part, so it needs no saved input; the
// adjoint of dsa_backward is dsa with zero brightness.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(condense, m) {
  m.def("dsa(Tensor x, Tensor color, Tensor affine, Tensor shifts, int groups, "
        "int cutout_size, bool align_corners) -> Tensor");
  m.def("dsa_backward(Tensor grad_out, Tensor color, Tensor affine, Tensor shifts, int groups, "
        "int cutout_size, bool align_corners) -> Tensor");
}
