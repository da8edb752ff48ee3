"""Reference of ops.gather_normalize: index, convert uint8 to [0, 1], normalise per channel."""
import torch


def gather_normalize(images: torch.Tensor, index: torch.Tensor, mean: torch.Tensor,
                     std: torch.Tensor) -> torch.Tensor:
    batch = images.index_select(0, index).float().div_(255.0)
    shape = (1, -1, 1, 1)
    return (batch - mean.float().view(shape)) / std.float().view(shape)
