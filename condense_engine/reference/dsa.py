"""Reference of ops.dsa: the DSA groups applied one after another with plain torch ops (SPEC §3).

Every group is linear (affine for colour) in the images, so the chain is differentiable w.r.t.
`x`. Half-precision inputs are computed in float32 and cast back at the end, as the fused kernels
do, so sampling coordinates keep full precision.
"""
import torch
import torch.nn.functional as F


def dsa(x: torch.Tensor, params) -> torch.Tensor:
    """Apply `params.ops` to the (n, C, H, W) batch `x` in order; `params` is a DSAParams."""
    compute_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    out = x.to(compute_dtype)
    for group in params.ops:
        out = _GROUPS[group](out, params)
    return out.to(x.dtype)


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(n,) values shaped (n, 1, 1, 1) in the dtype of `like`, for broadcasting over images."""
    return values.to(like.dtype).view(-1, 1, 1, 1)


def color(x: torch.Tensor, params) -> torch.Tensor:
    """Brightness shift, then saturation about the per-pixel channel mean, then contrast about
    the per-image mean."""
    x = x + _per_image(params.brightness, x)
    pixel_mean = x.mean(dim=1, keepdim=True)
    x = (x - pixel_mean) * _per_image(params.saturation, x) + pixel_mean
    image_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - image_mean) * _per_image(params.contrast, x) + image_mean


def crop(x: torch.Tensor, params) -> torch.Tensor:
    """Integer translation: out[i, j] = x[i + t_h, j + t_w], zero where that is outside."""
    n, _, height, width = x.shape
    shift = params.translate.to(x.device)
    rows = torch.arange(height, device=x.device).view(1, -1) + shift[:, 0:1]
    cols = torch.arange(width, device=x.device).view(1, -1) + shift[:, 1:2]
    inside = (((rows >= 0) & (rows < height))[:, :, None]
              & ((cols >= 0) & (cols < width))[:, None, :])
    batch = torch.arange(n, device=x.device).view(-1, 1, 1)
    moved = x[batch, :, rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]]
    moved = moved.permute(0, 3, 1, 2)
    return torch.where(inside[:, None], moved, torch.zeros((), dtype=x.dtype, device=x.device))


def cutout_mask(params, height: int, width: int, device) -> torch.Tensor:
    """(n, 1, H, W) bool, true inside each sample's cutout square (clipped to the image)."""
    size = params.resolved_cutout_size(height)
    first = params.cutout_center.to(device) - size // 2
    rows = torch.arange(height, device=device).view(1, -1)
    cols = torch.arange(width, device=device).view(1, -1)
    in_rows = (rows >= first[:, 0:1]) & (rows < first[:, 0:1] + size)
    in_cols = (cols >= first[:, 1:2]) & (cols < first[:, 1:2] + size)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def cutout(x: torch.Tensor, params) -> torch.Tensor:
    """Zero each sample's cutout square."""
    mask = cutout_mask(params, x.shape[2], x.shape[3], x.device)
    return torch.where(mask, torch.zeros((), dtype=x.dtype, device=x.device), x)


def flip(x: torch.Tensor, params) -> torch.Tensor:
    """Mirror the last axis of the samples whose flag is true."""
    return torch.where(params.flip.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)


def scale_theta(params, dtype) -> torch.Tensor:
    """(n, 2, 3) sampling matrices [[s_x, 0, 0], [0, s_y, 0]]."""
    s = params.scale.to(dtype)
    zero = torch.zeros_like(s[:, 0])
    return torch.stack([torch.stack([s[:, 0], zero, zero], 1),
                        torch.stack([zero, s[:, 1], zero], 1)], 1)


def rotate_theta(params, dtype) -> torch.Tensor:
    """(n, 2, 3) sampling matrices [[cos a, -sin a, 0], [sin a, cos a, 0]]."""
    angle = params.rotate.to(dtype)
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    return torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)


def resample(x: torch.Tensor, theta: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """Bilinear resampling of `x` on the affine grid `theta`, zero outside."""
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=align_corners)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=align_corners)


def scale(x: torch.Tensor, params) -> torch.Tensor:
    return resample(x, scale_theta(params, x.dtype), params.align_corners)


def rotate(x: torch.Tensor, params) -> torch.Tensor:
    return resample(x, rotate_theta(params, x.dtype), params.align_corners)


_GROUPS = {"color": color, "crop": crop, "cutout": cutout, "flip": flip, "scale": scale,
           "rotate": rotate}
