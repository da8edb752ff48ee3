"""Triton DSA: the whole augmentation chain in one pass forward and one pass backward (SPEC §3).

The maths and the parameter packing are those of the native op (csrc/ops/cpu/dsa.cpp,
`condense_engine.ops.dsa.native_arguments`): per image, color (n, 3) = brightness b,
saturation s, contrast k; affine (n, 4) = s_x, s_y, cos a, sin a; shifts (n, 5) int64 =
t_h, t_w, cutout centre row and column, flip flag; a bit mask of the listed groups (color 1,
crop 2, cutout 4, flip 8, scale 16, rotate 32); the cutout side; align_corners.

Programs run over (image, block of output pixels), all channels at once. For each output pixel
the kernel walks the geometric chain backwards (rotate and scale are bilinear, 4 taps each, so
at most 16 taps; then flip, cutout and translate move or drop a tap) and gathers those input
pixels. Colour is affine per pixel,
    color_c(p) = k·s·x_c(p) + (k − k·s)·mean_c x(p) + (1 − k)·mean(x) + b,
so it is applied to the gathered sums: the only thing not local to the taps is the image mean,
which a small pre-reduction kernel computes first (only when colour is listed).

The backward scatters the output gradient through the same taps with `tl.atomic_add` into an
fp32 buffer (plain stores when neither scale nor rotate is listed: then every input pixel feeds
at most one output pixel). Colour's adjoint
    k·s·G_c + (k − k·s)/C·Σ_c G + (1 − k)/(C·H·W)·ΣG
is folded in: the per-pixel channel mix is applied before scattering (it commutes with the
scatter), and the last, image-wide term is summed per program into an (n,) buffer with one
atomic add. A short epilogue adds that term and casts the buffer to the input dtype (it is
skipped for fp32 without colour). Maths is fp32 for fp32, bf16 and fp16 inputs.
"""
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

# Bits of the packed `groups` mask, as in csrc/ops/cpu/dsa.cpp.
COLOR, CROP, CUTOUT, FLIP, SCALE, ROTATE = 1, 2, 4, 8, 16, 32
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _image_mean_kernel(x_ptr, mean_ptr, numel, BLOCK: tl.constexpr):
    """One program per image: the mean of its C·H·W values, in fp32."""
    image = tl.program_id(0).to(tl.int64)
    x_ptr += image * numel
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, numel, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        total += tl.load(x_ptr + offsets, mask=offsets < numel, other=0.0).to(tl.float32)
    tl.store(mean_ptr + image, tl.sum(total, axis=0) / numel)


@triton.jit
def _bilinear_tap(row, col, ok, weight, t00, t01, t10, t11, height, width,
                  step_x, start_x, half_x, step_y, start_y, half_y, TAP: tl.constexpr):
    """Tap TAP (0..3: top-left, top-right, bottom-left, bottom-right) of the bilinear sample
    that pixel (row, col) of grid_sample(affine_grid([[t00, t01, 0], [t10, t11, 0]])) reads.

    Pixel ↔ grid coordinates follow affine_grid / grid_sample: grid = index·step + start and
    pixel = grid·half + (size − 1)/2. The tap's weight is multiplied into `weight`; `ok` is
    cleared where the tap falls outside the image (zero padding).
    """
    grid_x = col.to(tl.float32) * step_x + start_x
    grid_y = row.to(tl.float32) * step_y + start_y
    source_x = (t00 * grid_x + t01 * grid_y) * half_x + (width - 1) * 0.5
    source_y = (t10 * grid_x + t11 * grid_y) * half_y + (height - 1) * 0.5
    left = tl.floor(source_x)
    top = tl.floor(source_y)
    right_share = source_x - left
    bottom_share = source_y - top
    down = TAP // 2
    across = TAP % 2
    tap_row = top.to(tl.int32) + down
    tap_col = left.to(tl.int32) + across
    weight = weight * ((1 - down) + (2 * down - 1) * bottom_share)
    weight = weight * ((1 - across) + (2 * across - 1) * right_share)
    ok = ok & (tap_row >= 0) & (tap_row < height) & (tap_col >= 0) & (tap_col < width)
    return tap_row, tap_col, ok, weight


@triton.jit
def _trace_tap(row, col, in_image, shifts_ptr, affine_ptr, height, width, cutout_size,
               step_x, start_x, half_x, step_y, start_y, half_y,
               CROP: tl.constexpr, CUTOUT: tl.constexpr, FLIP: tl.constexpr,
               SCALE_TAPS: tl.constexpr, ROTATE_TAPS: tl.constexpr, ROTATE_TAP: tl.constexpr,
               SCALE_TAP: tl.constexpr):
    """Input pixel index (row·W + col), validity and weight of one tap of output pixels
    (row, col): rotate's bilinear tap ROTATE_TAP, then scale's SCALE_TAP (a group that is not
    listed has 1 tap instead of 4), then flip, cutout and translate, undone in that order."""
    weight = tl.full(row.shape, 1.0, tl.float32)
    ok = in_image
    if ROTATE_TAPS == 4:
        cos_a = tl.load(affine_ptr + 2)
        sin_a = tl.load(affine_ptr + 3)
        row, col, ok, weight = _bilinear_tap(row, col, ok, weight, cos_a, -sin_a, sin_a, cos_a,
                                             height, width, step_x, start_x, half_x,
                                             step_y, start_y, half_y, ROTATE_TAP)
    if SCALE_TAPS == 4:
        scale_x = tl.load(affine_ptr)
        scale_y = tl.load(affine_ptr + 1)
        row, col, ok, weight = _bilinear_tap(row, col, ok, weight, scale_x, 0.0, 0.0, scale_y,
                                             height, width, step_x, start_x, half_x,
                                             step_y, start_y, half_y, SCALE_TAP)
    if FLIP:
        col = tl.where(tl.load(shifts_ptr + 4) != 0, width - 1 - col, col)
    if CUTOUT:
        top = tl.load(shifts_ptr + 2).to(tl.int32) - cutout_size // 2
        left = tl.load(shifts_ptr + 3).to(tl.int32) - cutout_size // 2
        inside = (row >= top) & (row < top + cutout_size) & (col >= left) & (
            col < left + cutout_size)
        ok = ok & ~inside
    if CROP:
        row += tl.load(shifts_ptr).to(tl.int32)
        col += tl.load(shifts_ptr + 1).to(tl.int32)
        ok = ok & (row >= 0) & (row < height) & (col >= 0) & (col < width)
    return row * width + col, ok, tl.where(ok, weight, 0.0)


@triton.jit
def _program_tile(channels, height, width, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The tile of the forward and backward programs: image = axis 0, BLOCK_P output pixels
    from axis 1 (their row, column and in-image mask), every channel (mask and plane offsets)."""
    image = tl.program_id(0).to(tl.int64)
    plane = height * width
    pixels = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    channel = tl.arange(0, BLOCK_C)
    return (image, plane, pixels, pixels < plane, pixels // width, pixels % width,
            channel < channels, channel[:, None] * plane)


@triton.jit
def _dsa_forward_kernel(x_ptr, out_ptr, color_ptr, affine_ptr, shifts_ptr, mean_ptr,
                        channels, height, width, cutout_size,
                        step_x, start_x, half_x, step_y, start_y, half_y,
                        COLOR: tl.constexpr, CROP: tl.constexpr, CUTOUT: tl.constexpr,
                        FLIP: tl.constexpr, SCALE_TAPS: tl.constexpr, ROTATE_TAPS: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program: every channel of BLOCK_P output pixels of one image."""
    image, plane, pixels, in_image, row, col, channel_ok, channel_offsets = _program_tile(
        channels, height, width, BLOCK_C, BLOCK_P)
    x_ptr += image * channels * plane
    shifts_ptr += image * 5
    affine_ptr += image * 4
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    weight_sum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for rotate_tap in tl.static_range(ROTATE_TAPS):
        for scale_tap in tl.static_range(SCALE_TAPS):
            index, ok, weight = _trace_tap(
                row, col, in_image, shifts_ptr, affine_ptr, height, width, cutout_size,
                step_x, start_x, half_x, step_y, start_y, half_y, CROP, CUTOUT, FLIP,
                SCALE_TAPS, ROTATE_TAPS, rotate_tap, scale_tap)
            values = tl.load(x_ptr + channel_offsets + index[None, :],
                             mask=channel_ok[:, None] & ok[None, :], other=0.0)
            acc += weight[None, :] * values.to(tl.float32)
            weight_sum += weight
    if COLOR:
        brightness = tl.load(color_ptr + image * 3)
        saturation = tl.load(color_ptr + image * 3 + 1)
        contrast = tl.load(color_ptr + image * 3 + 2)
        contrast_saturation = contrast * saturation
        mix = (contrast - contrast_saturation) / channels
        offset = (1.0 - contrast) * tl.load(mean_ptr + image) + brightness
        shared = mix * tl.sum(acc, axis=0) + offset * weight_sum
        acc = contrast_saturation * acc + shared[None, :]
    out_ptr += image * channels * plane
    tl.store(out_ptr + channel_offsets + pixels[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=channel_ok[:, None] & in_image[None, :])


@triton.jit
def _dsa_backward_kernel(grad_out_ptr, grad_in_ptr, color_ptr, affine_ptr, shifts_ptr,
                         spread_ptr, channels, height, width, cutout_size,
                         step_x, start_x, half_x, step_y, start_y, half_y,
                         COLOR: tl.constexpr, CROP: tl.constexpr, CUTOUT: tl.constexpr,
                         FLIP: tl.constexpr, SCALE_TAPS: tl.constexpr,
                         ROTATE_TAPS: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_P: tl.constexpr):
    """One program: scatter the gradient of BLOCK_P output pixels of one image (all channels)
    into the fp32 `grad_in` buffer, and add its share of colour's image-wide term to spread."""
    image, plane, pixels, in_image, row, col, channel_ok, channel_offsets = _program_tile(
        channels, height, width, BLOCK_C, BLOCK_P)
    grad_out_ptr += image * channels * plane
    grad_in_ptr += image * channels * plane
    shifts_ptr += image * 5
    affine_ptr += image * 4
    grad = tl.load(grad_out_ptr + channel_offsets + pixels[None, :],
                   mask=channel_ok[:, None] & in_image[None, :], other=0.0).to(tl.float32)
    if COLOR:
        saturation = tl.load(color_ptr + image * 3 + 1)
        contrast = tl.load(color_ptr + image * 3 + 2)
        contrast_saturation = contrast * saturation
        channel_sum = tl.sum(grad, axis=0)
        mixed = contrast_saturation * grad + ((contrast - contrast_saturation) / channels
                                              * channel_sum)[None, :]
    else:
        mixed = grad
    weight_sum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for rotate_tap in tl.static_range(ROTATE_TAPS):
        for scale_tap in tl.static_range(SCALE_TAPS):
            index, ok, weight = _trace_tap(
                row, col, in_image, shifts_ptr, affine_ptr, height, width, cutout_size,
                step_x, start_x, half_x, step_y, start_y, half_y, CROP, CUTOUT, FLIP,
                SCALE_TAPS, ROTATE_TAPS, rotate_tap, scale_tap)
            targets = grad_in_ptr + channel_offsets + index[None, :]
            mask = channel_ok[:, None] & ok[None, :]
            if ROTATE_TAPS * SCALE_TAPS == 1:
                # Without resampling every input pixel feeds at most one output pixel.
                tl.store(targets, weight[None, :] * mixed, mask=mask)
            else:
                tl.atomic_add(targets, weight[None, :] * mixed, mask=mask)
            weight_sum += weight
    if COLOR:
        share = (1.0 - contrast) / (channels * plane) * tl.sum(weight_sum * channel_sum, axis=0)
        tl.atomic_add(spread_ptr + image, share)


@triton.jit
def _finish_backward_kernel(buffer_ptr, spread_ptr, grad_in_ptr, numel, BLOCK: tl.constexpr):
    """grad_in = buffer + spread[image], cast to grad_in's dtype."""
    image = tl.program_id(0).to(tl.int64)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    values = tl.load(buffer_ptr + image * numel + offsets, mask=mask) + tl.load(spread_ptr + image)
    tl.store(grad_in_ptr + image * numel + offsets, values.to(grad_in_ptr.dtype.element_ty),
             mask=mask)


@dataclass(frozen=True)
class Packed:
    """The packed parameters of one call (see the module docstring); fp32 color and affine."""
    color: torch.Tensor
    affine: torch.Tensor
    shifts: torch.Tensor
    groups: int
    cutout_size: int
    align_corners: bool

    def without_brightness(self) -> "Packed":
        """The linear part of the chain (brightness zero): the adjoint of the backward."""
        if not self.groups & COLOR:
            return self
        color = self.color.clone()
        color[:, 0] = 0
        return replace(self, color=color)


def _axis_geometry(size: int, align_corners: bool) -> tuple[float, float, float]:
    """(step, start, half) of one axis: grid = index·step + start, as affine_grid's base grid,
    and pixel = grid·half + (size − 1)/2, as grid_sample unnormalises."""
    if align_corners:
        if size == 1:
            return 0.0, 0.0, 0.0
        return 2.0 / (size - 1), -1.0, (size - 1) / 2.0
    return 2.0 / size, 1.0 / size - 1.0, size / 2.0


def _launch_settings(x: torch.Tensor, packed: Packed, block: int | None) -> dict:
    """Keyword arguments shared by the forward and backward launches, plus their grid."""
    n, channels, height, width = x.shape
    block_c = triton.next_power_of_2(channels)
    if block is None:
        block = min(max(16, 1024 // block_c), triton.next_power_of_2(height * width))
    step_x, start_x, half_x = _axis_geometry(width, packed.align_corners)
    step_y, start_y, half_y = _axis_geometry(height, packed.align_corners)
    groups = packed.groups
    return dict(
        grid=(n, triton.cdiv(height * width, block)),
        arguments=dict(channels=channels, height=height, width=width,
                       cutout_size=packed.cutout_size, step_x=step_x, start_x=start_x,
                       half_x=half_x, step_y=step_y, start_y=start_y, half_y=half_y,
                       COLOR=bool(groups & COLOR), CROP=bool(groups & CROP),
                       CUTOUT=bool(groups & CUTOUT), FLIP=bool(groups & FLIP),
                       SCALE_TAPS=4 if groups & SCALE else 1,
                       ROTATE_TAPS=4 if groups & ROTATE else 1,
                       BLOCK_C=block_c, BLOCK_P=block,
                       num_warps=4 if x.is_cuda else 1))


def _elementwise_block(numel: int) -> int:
    """Values per program of the per-image mean and the backward's epilogue."""
    return min(1024, triton.next_power_of_2(numel))


def _forward(x: torch.Tensor, packed: Packed, block: int | None) -> torch.Tensor:
    """The augmented batch, same dtype as `x` (contiguous)."""
    settings = _launch_settings(x, packed, block)
    n = x.shape[0]
    numel = x[0].numel()
    if packed.groups & COLOR:
        image_mean = torch.empty(n, dtype=torch.float32, device=x.device)
        _image_mean_kernel[(n,)](x, image_mean, numel, BLOCK=_elementwise_block(numel))
    else:
        image_mean = torch.empty(1, dtype=torch.float32, device=x.device)  # not read
    out = torch.empty_like(x)
    _dsa_forward_kernel[settings["grid"]](x, out, packed.color, packed.affine, packed.shifts,
                                          image_mean, **settings["arguments"])
    return out


def _backward(grad_out: torch.Tensor, packed: Packed, block: int | None) -> torch.Tensor:
    """The gradient w.r.t. the input of the forward, from `grad_out` (contiguous)."""
    settings = _launch_settings(grad_out, packed, block)
    n = grad_out.shape[0]
    numel = grad_out[0].numel()
    buffer = torch.zeros(grad_out.shape, dtype=torch.float32, device=grad_out.device)
    spread = torch.zeros(n, dtype=torch.float32, device=grad_out.device)
    _dsa_backward_kernel[settings["grid"]](grad_out, buffer, packed.color, packed.affine,
                                           packed.shifts, spread, **settings["arguments"])
    is_fp32 = grad_out.dtype == torch.float32
    if is_fp32 and not packed.groups & COLOR:
        return buffer
    grad_in = buffer if is_fp32 else torch.empty_like(grad_out)
    block_size = _elementwise_block(numel)
    _finish_backward_kernel[(n, triton.cdiv(numel, block_size))](buffer, spread, grad_in, numel,
                                                                 BLOCK=block_size)
    return grad_in


class FusedDSA(torch.autograd.Function):
    """The chain on x; its backward is FusedDSABackward, so it is differentiable twice."""

    @staticmethod
    def forward(ctx, x, packed: Packed, block: int | None):
        ctx.packed, ctx.block = packed, block
        return _forward(x, packed, block)

    @staticmethod
    def backward(ctx, grad_out):
        return FusedDSABackward.apply(grad_out.contiguous(), ctx.packed, ctx.block), None, None


class FusedDSABackward(torch.autograd.Function):
    """The chain's adjoint on an output gradient. The chain is affine in x, so the adjoint of
    this one is the chain without brightness."""

    @staticmethod
    def forward(ctx, grad_out, packed: Packed, block: int | None):
        ctx.packed, ctx.block = packed, block
        return _backward(grad_out, packed, block)

    @staticmethod
    def backward(ctx, grad_grad_in):
        linear = ctx.packed.without_brightness()
        return FusedDSA.apply(grad_grad_in.contiguous(), linear, ctx.block), None, None


def dsa(x: torch.Tensor, color: torch.Tensor, affine: torch.Tensor, shifts: torch.Tensor,
        groups: int, cutout_size: int, align_corners: bool, *,
        block: int | None = None) -> torch.Tensor:
    """The DSA chain on the (n, C, H, W) batch `x` (fp32, bf16 or fp16), differentiable twice.

    The parameters are packed as for torch.ops.condense.dsa (module docstring); `block`
    overrides the number of output pixels per program (tests use small ones).
    """
    if x.dtype not in DTYPES:
        raise ValueError(f"the Triton DSA kernels take {DTYPES}, got {x.dtype}")
    if x[0].numel() >= 2**31:
        raise ValueError(f"each image must hold fewer than 2**31 values, got {x[0].numel()}")
    packed = Packed(color.float().contiguous(), affine.float().contiguous(),
                    shifts.contiguous(), int(groups), int(cutout_size), bool(align_corners))
    return FusedDSA.apply(x.contiguous(), packed, block)
