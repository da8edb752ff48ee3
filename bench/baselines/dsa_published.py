"""DSA written the way the published DiffAugment code does it (methods.md §1.4, ecosystem.md
"DSA"), in eager PyTorch: the yardstick bench/dsa.py times the fused kernels against.

One group after another, each with its own small parameter tensors: colour as separate
elementwise ops and means; crop as int64 index grids from `meshgrid`, a one-pixel zero pad, a
channels-last copy and an advanced-indexing gather; cutout as a mask built by index assignment
and multiplied in; flip with `torch.where`; scale and rotate by building one 2×3 matrix per
image in a Python loop, running `F.affine_grid` on the CPU and copying the whole N×H×W×2 grid
to the device before `F.grid_sample`.

The random values come from a `DSAParams` instead of the global RNG, so the result equals the
reference chain (for parameters drawn by `DSAParams.sample`) and the timings compare the same
work. The per-image matrices are built from Python floats, not from 0-d tensors as published,
which makes this baseline somewhat faster than the original, never slower. For bf16 inputs the
grid is cast to bf16, as grid_sample needs, so coordinates lose precision: a timing yardstick.
"""
import math

import torch
import torch.nn.functional as F


def published_dsa(x: torch.Tensor, params) -> torch.Tensor:
    """Apply `params.ops` (a DSAParams, ideally on the CPU as the published scale and rotate
    draws are) to the (n, C, H, W) batch `x`, one group at a time."""
    for group in params.ops:
        x = _GROUPS[group](x, params)
    return x


def _per_image(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(n,) values copied to x's device as an (n, 1, 1, 1) tensor of its dtype."""
    return values.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _color(x, params):
    x = x + _per_image(params.brightness, x)
    pixel_mean = x.mean(dim=1, keepdim=True)
    x = (x - pixel_mean) * _per_image(params.saturation, x) + pixel_mean
    image_mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - image_mean) * _per_image(params.contrast, x) + image_mean


def _crop(x, params):
    n, _, height, width = x.shape
    shift = params.translate.to(x.device).view(n, 2, 1, 1)
    batch, rows, cols = torch.meshgrid(torch.arange(n, device=x.device),
                                       torch.arange(height, device=x.device),
                                       torch.arange(width, device=x.device), indexing="ij")
    # +1 for the zero pad; indices past it clamp onto the pad, hence read zero.
    rows = torch.clamp(rows + shift[:, 0] + 1, 0, height + 1)
    cols = torch.clamp(cols + shift[:, 1] + 1, 0, width + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    return padded.permute(0, 2, 3, 1).contiguous()[batch, rows, cols].permute(0, 3, 1, 2)


def _cutout(x, params):
    n, _, height, width = x.shape
    side = params.resolved_cutout_size(height)
    centre = params.cutout_center.to(x.device).view(n, 2, 1, 1)
    batch, rows, cols = torch.meshgrid(torch.arange(n, device=x.device),
                                       torch.arange(side, device=x.device),
                                       torch.arange(side, device=x.device), indexing="ij")
    rows = torch.clamp(rows + centre[:, 0] - side // 2, 0, height - 1)
    cols = torch.clamp(cols + centre[:, 1] - side // 2, 0, width - 1)
    mask = torch.ones(n, height, width, dtype=x.dtype, device=x.device)
    mask[batch, rows, cols] = 0
    return x * mask.unsqueeze(1)


def _flip(x, params):
    return torch.where(params.flip.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)


def _resample_on_cpu_grid(x, matrices: list, align_corners: bool):
    """grid_sample on a grid that affine_grid computed on the CPU and that is then copied over."""
    theta = torch.tensor(matrices, dtype=torch.float32)
    grid = F.affine_grid(theta, list(x.shape), align_corners=align_corners).to(x.device)
    return F.grid_sample(x, grid.to(x.dtype), align_corners=align_corners)


def _scale(x, params):
    factors = params.scale.tolist()
    matrices = [[[sx, 0.0, 0.0], [0.0, sy, 0.0]] for sx, sy in factors]
    return _resample_on_cpu_grid(x, matrices, params.align_corners)


def _rotate(x, params):
    angles = params.rotate.tolist()
    matrices = [[[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]
                for a in angles]
    return _resample_on_cpu_grid(x, matrices, params.align_corners)


_GROUPS = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale,
           "rotate": _rotate}
