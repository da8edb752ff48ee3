"""Triton GroupNorm → activation → 2×2 average pool epilogue, forward and backward.

x (n, C, H, W) is viewed as n·G "rows", one per (sample, group); a row's C/G channel planes are
contiguous. A program owns ROWS whole rows, so every reduction stays inside the program:

Forward, per row: pass 1 reads the group once for its mean and variance (sums of x − x₀, with
x₀ the group's first element, so a large mean does not cancel the variance away); pass 2 reads
it again, applies z = x̂·w + b and the activation in registers and writes only the pooled
output (each output averages its 2×2 taps; odd H or W drop the last row or column, as
AvgPool2d does). The full-resolution normalised activation never reaches memory. mean and rstd
are saved for the backward.

Backward, per row, with dz = act′(z)·g/4 spread from each pooled gradient g to its 4 taps (0
for a dropped row or column) and dx̂ = w·dz: pass 1 recomputes x̂ and z from x, mean and rstd
and sums dz and dz·x̂ per channel (written per sample, for the weight and bias gradients) and
dx̂, dx̂·x̂ per group; pass 2 writes dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) for every input
element.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

ACTIVATION_IDS = {"relu": 0, "leakyrelu": 1, "sigmoid": 2, "swish": 3}
RELU = tl.constexpr(0)
LEAKY_RELU = tl.constexpr(1)
SIGMOID = tl.constexpr(2)
# Largest block along a channel plane, and the element count a program's tile aims for.
MAX_BLOCK = 1024
TILE_ELEMENTS = 2048


@triton.jit
def _activate(z, slope, ACT: tl.constexpr):
    """act(z) for relu, leaky relu (negative slope `slope`), sigmoid or swish (z·sigmoid(z)); a
    NaN stays NaN, as in torch (tl.maximum's NaN handling is left to the hardware)."""
    if ACT == RELU:
        y = tl.where(z < 0.0, 0.0, z)
    elif ACT == LEAKY_RELU:
        y = tl.where(z > 0.0, z, z * slope)
    elif ACT == SIGMOID:
        y = tl.sigmoid(z)
    else:
        y = z * tl.sigmoid(z)
    return y


@triton.jit
def _activation_derivative(z, slope, ACT: tl.constexpr):
    """d act / dz, with the subgradient at 0 that torch uses (0 for relu, slope for leaky)."""
    if ACT == RELU:
        d = tl.where(z <= 0.0, 0.0, 1.0)
    elif ACT == LEAKY_RELU:
        d = tl.where(z > 0.0, 1.0, slope)
    elif ACT == SIGMOID:
        s = tl.sigmoid(z)
        d = s * (1.0 - s)
    else:
        s = tl.sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    return d


@triton.jit
def _epilogue_forward_kernel(x_ptr, weight_ptr, bias_ptr, out_ptr, mean_ptr, rstd_ptr,
                             row_count, groups, channels_per_group, height, width, out_height,
                             out_width, eps, slope, ROWS: tl.constexpr, BLOCK_IN: tl.constexpr,
                             BLOCK_OUT: tl.constexpr, ACT: tl.constexpr, POOL: tl.constexpr):
    """Statistics, then normalise + affine + activation + pool for ROWS (sample, group) rows."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_valid = rows < row_count
    plane = height * width
    group_size = channels_per_group * plane
    row_start = rows.to(tl.int64) * group_size

    shift = tl.load(x_ptr + row_start, mask=row_valid, other=0.0).to(tl.float32)
    total = tl.zeros((ROWS,), dtype=tl.float32)
    total_sq = tl.zeros((ROWS,), dtype=tl.float32)
    offsets = tl.arange(0, BLOCK_IN)
    for start in range(0, group_size, BLOCK_IN):
        position = start + offsets
        mask = row_valid[:, None] & (position[None, :] < group_size)
        values = tl.load(x_ptr + row_start[:, None] + position[None, :], mask=mask, other=0.0)
        centred = tl.where(mask, values.to(tl.float32) - shift[:, None], 0.0)
        total += tl.sum(centred, axis=1)
        total_sq += tl.sum(centred * centred, axis=1)
    shifted_mean = total / group_size
    variance = tl.maximum(total_sq / group_size - shifted_mean * shifted_mean, 0.0)
    mean = shift + shifted_mean
    rstd = 1.0 / tl.sqrt(variance + eps)
    tl.store(mean_ptr + rows, mean, mask=row_valid)
    tl.store(rstd_ptr + rows, rstd, mask=row_valid)

    out_plane = out_height * out_width
    out_start = rows.to(tl.int64) * (channels_per_group * out_plane)
    first_channel = (rows % groups) * channels_per_group
    out_offsets = tl.arange(0, BLOCK_OUT)
    for c in range(0, channels_per_group):
        w = tl.load(weight_ptr + first_channel + c, mask=row_valid, other=0.0).to(tl.float32)
        b = tl.load(bias_ptr + first_channel + c, mask=row_valid, other=0.0).to(tl.float32)
        scale = (w * rstd)[:, None]
        plane_start = (row_start + c * plane)[:, None]
        for start in range(0, out_plane, BLOCK_OUT):
            position = start + out_offsets
            mask = row_valid[:, None] & (position[None, :] < out_plane)
            if POOL:
                top_left = (2 * (position // out_width)) * width + 2 * (position % out_width)
                result = tl.zeros((ROWS, BLOCK_OUT), dtype=tl.float32)
                for tap in tl.static_range(4):
                    tap_offset = top_left + (tap // 2) * width + (tap % 2)
                    values = tl.load(x_ptr + plane_start + tap_offset[None, :], mask=mask,
                                     other=0.0)
                    z = (values.to(tl.float32) - mean[:, None]) * scale + b[:, None]
                    result += _activate(z, slope, ACT)
                result = result * 0.25
            else:
                values = tl.load(x_ptr + plane_start + position[None, :], mask=mask, other=0.0)
                z = (values.to(tl.float32) - mean[:, None]) * scale + b[:, None]
                result = _activate(z, slope, ACT)
            out_ptrs = out_ptr + (out_start + c * out_plane)[:, None] + position[None, :]
            tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tap_gradient(grad_out_ptr, out_plane_start, position, mask, width, out_height, out_width,
                  POOL: tl.constexpr):
    """The gradient reaching each input element from the output: ¼ of its pooled output's
    gradient (0 outside the pooled area), or the output gradient itself without pooling."""
    if POOL:
        h = position // width
        w = position % width
        inside = (h < 2 * out_height) & (w < 2 * out_width)
        pooled = (h // 2) * out_width + w // 2
        g = tl.load(grad_out_ptr + out_plane_start + pooled[None, :], mask=mask & inside[None, :],
                    other=0.0)
        g = g.to(tl.float32) * 0.25
    else:
        g = tl.load(grad_out_ptr + out_plane_start + position[None, :], mask=mask, other=0.0)
        g = g.to(tl.float32)
    return g


@triton.jit
def _normalized_and_dz(x_ptr, plane_start, grad_out_ptr, out_plane_start, position, mask, mean, rstd,
                       w, b, width, out_height, out_width, slope, ACT: tl.constexpr, POOL: tl.constexpr):
    """For one block of a channel's plane: x̂ (the normalised input) and dz, the gradient at the
    activation's input z = x̂·w + b. Both backward passes recompute them instead of storing them."""
    values = tl.load(x_ptr + plane_start + position[None, :], mask=mask, other=0.0)
    xhat = (values.to(tl.float32) - mean) * rstd
    z = xhat * w[:, None] + b[:, None]
    g = _tap_gradient(grad_out_ptr, out_plane_start, position, mask, width, out_height, out_width, POOL)
    return xhat, g * _activation_derivative(z, slope, ACT)


@triton.jit
def _epilogue_backward_kernel(x_ptr, weight_ptr, bias_ptr, grad_out_ptr, mean_ptr, rstd_ptr,
                              grad_x_ptr, channel_dz_ptr, channel_dz_xhat_ptr, row_count, groups,
                              channels_per_group, height, width, out_height, out_width, slope,
                              ROWS: tl.constexpr, BLOCK_IN: tl.constexpr, ACT: tl.constexpr,
                              POOL: tl.constexpr):
    """Gradients for ROWS (sample, group) rows: the per-channel and per-group sums, then dx."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_valid = rows < row_count
    plane = height * width
    group_size = channels_per_group * plane
    row_start = rows.to(tl.int64) * group_size
    out_plane = out_height * out_width
    out_start = rows.to(tl.int64) * (channels_per_group * out_plane)
    first_channel = (rows % groups) * channels_per_group
    mean = tl.load(mean_ptr + rows, mask=row_valid, other=0.0)[:, None]
    rstd = tl.load(rstd_ptr + rows, mask=row_valid, other=0.0)[:, None]
    offsets = tl.arange(0, BLOCK_IN)

    group_dxhat = tl.zeros((ROWS,), dtype=tl.float32)
    group_dxhat_xhat = tl.zeros((ROWS,), dtype=tl.float32)
    for c in range(0, channels_per_group):
        w = tl.load(weight_ptr + first_channel + c, mask=row_valid, other=0.0).to(tl.float32)
        b = tl.load(bias_ptr + first_channel + c, mask=row_valid, other=0.0).to(tl.float32)
        plane_start = (row_start + c * plane)[:, None]
        out_plane_start = (out_start + c * out_plane)[:, None]
        sum_dz = tl.zeros((ROWS,), dtype=tl.float32)
        sum_dz_xhat = tl.zeros((ROWS,), dtype=tl.float32)
        for start in range(0, plane, BLOCK_IN):
            position = start + offsets
            mask = row_valid[:, None] & (position[None, :] < plane)
            xhat, dz = _normalized_and_dz(x_ptr, plane_start, grad_out_ptr, out_plane_start, position, mask,
                                          mean, rstd, w, b, width, out_height, out_width, slope, ACT, POOL)
            sum_dz += tl.sum(dz, axis=1)
            sum_dz_xhat += tl.sum(dz * xhat, axis=1)
        tl.store(channel_dz_ptr + rows * channels_per_group + c, sum_dz, mask=row_valid)
        tl.store(channel_dz_xhat_ptr + rows * channels_per_group + c, sum_dz_xhat,
                 mask=row_valid)
        group_dxhat += w * sum_dz
        group_dxhat_xhat += w * sum_dz_xhat
    mean_dxhat = (group_dxhat / group_size)[:, None]
    mean_dxhat_xhat = (group_dxhat_xhat / group_size)[:, None]

    for c in range(0, channels_per_group):
        w = tl.load(weight_ptr + first_channel + c, mask=row_valid, other=0.0).to(tl.float32)
        b = tl.load(bias_ptr + first_channel + c, mask=row_valid, other=0.0).to(tl.float32)
        plane_start = (row_start + c * plane)[:, None]
        out_plane_start = (out_start + c * out_plane)[:, None]
        for start in range(0, plane, BLOCK_IN):
            position = start + offsets
            mask = row_valid[:, None] & (position[None, :] < plane)
            xhat, dz = _normalized_and_dz(x_ptr, plane_start, grad_out_ptr, out_plane_start, position, mask,
                                          mean, rstd, w, b, width, out_height, out_width, slope, ACT, POOL)
            dxhat = dz * w[:, None]
            grad_x = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
            tl.store(grad_x_ptr + plane_start + position[None, :],
                     grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class EpilogueSpec:
    """The epilogue's options: groups, eps, activation (id and leaky slope), pooling, and the
    launch shape (rows per program, block sizes along the input and output planes, warps)."""
    groups: int
    eps: float
    act: int
    slope: float
    pool: bool
    rows: int
    block_in: int
    block_out: int
    num_warps: int


def epilogue_spec(shape: torch.Size, device: torch.device, *, groups: int, eps: float, act: str,
                  slope: float, pool: bool) -> EpilogueSpec:
    """Block sizes for x of `shape`: a plane (or its pooled plane) per block up to MAX_BLOCK,
    and as many rows per program as fill TILE_ELEMENTS."""
    n, _, height, width = shape
    out_plane = (height // 2) * (width // 2) if pool else height * width
    block_in = min(MAX_BLOCK, triton.next_power_of_2(height * width))
    block_out = min(MAX_BLOCK, triton.next_power_of_2(out_plane))
    rows = max(1, min(TILE_ELEMENTS // block_in, triton.next_power_of_2(n * groups)))
    num_warps = 4 if device.type == "cuda" else 1
    return EpilogueSpec(groups, float(eps), ACTIVATION_IDS[act], float(slope), pool, rows,
                        block_in, block_out, num_warps)


class FusedEpilogue(torch.autograd.Function):
    """GroupNorm + activation + pool of x (n, C, H, W); gradients w.r.t. x, weight and bias."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec: EpilogueSpec):
        n, channels, height, width = x.shape
        out_height, out_width = (height // 2, width // 2) if spec.pool else (height, width)
        row_count = n * spec.groups
        out = torch.empty((n, channels, out_height, out_width), dtype=x.dtype, device=x.device)
        mean = torch.empty(row_count, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        _epilogue_forward_kernel[(triton.cdiv(row_count, spec.rows),)](
            x, weight, bias, out, mean, rstd, row_count, spec.groups, channels // spec.groups,
            height, width, out_height, out_width, spec.eps, spec.slope,
            ROWS=spec.rows, BLOCK_IN=spec.block_in, BLOCK_OUT=spec.block_out, ACT=spec.act,
            POOL=spec.pool, num_warps=spec.num_warps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.spec = spec
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        spec = ctx.spec
        n, channels, height, width = x.shape
        out_height, out_width = grad_out.shape[-2:]
        row_count = n * spec.groups
        grad_x = torch.empty_like(x)
        channel_dz = torch.empty((n, channels), dtype=torch.float32, device=x.device)
        channel_dz_xhat = torch.empty_like(channel_dz)
        _epilogue_backward_kernel[(triton.cdiv(row_count, spec.rows),)](
            x, weight, bias, grad_out.contiguous(), mean, rstd, grad_x, channel_dz,
            channel_dz_xhat, row_count, spec.groups, channels // spec.groups, height, width,
            out_height, out_width, spec.slope,
            ROWS=spec.rows, BLOCK_IN=spec.block_in, ACT=spec.act, POOL=spec.pool,
            num_warps=spec.num_warps)
        grad_weight = channel_dz_xhat.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = channel_dz.sum(0).to(bias.dtype) if ctx.needs_input_grad[2] else None
        return (grad_x if ctx.needs_input_grad[0] else None), grad_weight, grad_bias, None


def embed_epilogue(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, groups: int,
                   eps: float, act: str, slope: float, pool: bool) -> torch.Tensor:
    """The fused epilogue for valid inputs (see ops.embed_epilogue); differentiable."""
    n, channels, height, width = x.shape
    if channels // groups * height * width >= 2**31 or n * channels >= 2**31:
        raise ValueError(f"x of shape {tuple(x.shape)} with {groups} groups exceeds the Triton "
                         "kernels' 32-bit group sizes and channel counts")
    spec = epilogue_spec(x.shape, x.device, groups=groups, eps=eps, act=act, slope=slope,
                         pool=pool)
    return FusedEpilogue.apply(x.contiguous(), weight.contiguous(), bias.contiguous(), spec)
