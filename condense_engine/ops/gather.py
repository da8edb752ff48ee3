"""ops.gather_normalize: the sampler's one-gather real batch (uint8 storage → normalised float)."""
import torch

from condense_engine.ops._backend import choose
from condense_engine.reference import gather as reference


def gather_normalize(images: torch.Tensor, index: torch.Tensor, mean: torch.Tensor,
                     std: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Return `(images[index] / 255 - mean) / std` as float32 (B, C, H, W).

    `images` is uint8 (N, C, H, W) on any device; `index` int64 (B,) on the same device;
    `mean`/`std` hold one value per channel.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} "
                         f"of shape {tuple(images.shape)}")
    if index.dtype != torch.int64 or index.dim() != 1:
        raise ValueError(f"index must be an int64 (B,) tensor, got {index.dtype} "
                         f"of shape {tuple(index.shape)}")
    if index.device != images.device:
        raise ValueError(f"index is on {index.device} but images are on {images.device}")
    channels = images.shape[1]
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).reshape(-1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).reshape(-1)
    if mean.numel() != channels or std.numel() != channels:
        raise ValueError(f"mean and std need {channels} values (one per channel), "
                         f"got {mean.numel()} and {std.numel()}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= images.shape[0]):
        raise ValueError(f"index values must lie in [0, {images.shape[0]}), got "
                         f"[{int(index.min())}, {int(index.max())}]")
    chosen = choose("gather_normalize", backend, images.device, ("torch", "native"))
    if chosen == "native":
        return torch.ops.condense.gather_normalize(images, index, mean, std)
    return reference.gather_normalize(images, index, mean, std)
