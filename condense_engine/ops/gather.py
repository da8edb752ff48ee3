"""ops.gather_normalize: the sampler's one-gather real batch (uint8 storage → normalised float),
and `host_to_device`, the sync-free way the sampler and DSA move their small CPU-drawn tensors."""
import torch

from condense_engine.ops._backend import choose
from condense_engine.reference import gather as reference


def gather_normalize(images: torch.Tensor, index: torch.Tensor, mean: torch.Tensor,
                     std: torch.Tensor, *, backend: str | None = None,
                     check_bounds: bool = True) -> torch.Tensor:
    """Return `(images[index] / 255 - mean) / std` as float32 (B, C, H, W).

    `images` is uint8 (N, C, H, W) on any device; `index` int64 (B,) on the same device;
    `mean`/`std` hold one value per channel. `check_bounds` raises ValueError for an index
    outside [0, N); reading index.min()/max() costs a host sync on an accelerator, so callers
    whose indices are in range by construction (ClassSampler) pass False.
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
    if check_bounds and index.numel() and (int(index.min()) < 0 or int(index.max()) >= images.shape[0]):
        raise ValueError(f"index values must lie in [0, {images.shape[0]}), got "
                         f"[{int(index.min())}, {int(index.max())}]")
    chosen = choose("gather_normalize", backend, images.device, ("torch", "native"))
    if chosen == "native":
        return torch.ops.condense.gather_normalize(images, index, mean, std)
    return reference.gather_normalize(images, index, mean, std)


def host_to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """`tensor` (on the CPU) on `device`, without making the host wait for the device.

    A plain CUDA copy from pageable memory synchronises the stream; staging through pinned
    memory with non_blocking does not (PyTorch keeps the pinned block alive until the copy has
    run). Other devices, and `device` None or the CPU, get a plain `.to`.
    """
    if device is None:
        return tensor
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
