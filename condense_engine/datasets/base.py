"""ImageDataset: the in-memory image set every reader returns and every method consumes."""
import hashlib
from dataclasses import dataclass, field, replace

import torch

#: Images a fingerprint reads, evenly spaced over the set (all of a smaller set).
FINGERPRINT_IMAGES = 256


class DatasetError(ValueError):
    """A data file or folder exists but does not hold what its format promises."""


@dataclass
class ImageDataset:
    """Images (N, C, H, W) with int64 labels (N,), class names and normalisation constants.

    `images` is either uint8 raw pixels (the compact storage; `normalized()` maps them to
    network space with `mean`/`std`) or float32 already in network space (e.g. after ZCA,
    in which case `zca` holds the fitted transform, used to map back for display).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list
    mean: tuple
    std: tuple
    name: str = "custom"
    split: str = "train"
    zca: object = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be ({self.images.shape[0]},), got {tuple(self.labels.shape)}")
        if self.images.dtype not in (torch.uint8, torch.float32):
            raise ValueError(f"images must be uint8 or float32, got {self.images.dtype}")
        self.labels = self.labels.long()
        channels = self.images.shape[1]
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean/std need {channels} values, got {len(self.mean)}/{len(self.std)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        shape = "×".join(str(s) for s in self.images.shape[1:])
        dtype = str(self.images.dtype).removeprefix("torch.")
        whitened = ", zca" if self.zca is not None else ""
        return (f"ImageDataset({self.name!r}, split={self.split!r}, {len(self)} images "
                f"{shape} {dtype}, {self.num_classes} classes{whitened})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple:
        return tuple(self.images.shape[2:])

    def normalized(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 images in network space (all of them, or those at `index`)."""
        images = self.images if index is None else self.images[index]
        if images.dtype == torch.float32:
            return images.clone() if index is None else images
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, device=images.device).view(shape)
        std = torch.tensor(self.std, device=images.device).view(shape)
        return (images.float() / 255.0 - mean) / std

    def pixels01(self) -> torch.Tensor:
        """Float32 images as [0, 1] pixels (undoing mean/std); not defined once ZCA-whitened."""
        if self.zca is not None:
            raise ValueError(f"{self.name} is ZCA-whitened; use dataset.zca.inverse(images)")
        if self.images.dtype == torch.uint8:
            return self.images.float() / 255.0
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, device=self.images.device).view(shape)
        std = torch.tensor(self.std, device=self.images.device).view(shape)
        return self.images * std + mean

    def fingerprint(self) -> str:
        """A short hash of the shape, statistics, labels and FINGERPRINT_IMAGES evenly spaced
        images: the same data give the same value, other data almost surely another, in
        milliseconds for any size of set. A resumed run checks it against its checkpoint's."""
        step = max(1, len(self.images) // FINGERPRINT_IMAGES)
        digest = hashlib.sha256(repr((tuple(self.images.shape), str(self.images.dtype), self.mean, self.std)).encode())
        digest.update(self.labels.cpu().numpy().tobytes())
        digest.update(self.images[::step].cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.num_classes)

    def subset(self, index: torch.Tensor) -> "ImageDataset":
        return replace(self, images=self.images[index], labels=self.labels[index])

    def to(self, device) -> "ImageDataset":
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))


def channel_stats(images: torch.Tensor) -> tuple[tuple, tuple]:
    """Per-channel mean and std of [0, 1] pixels (uint8 is divided by 255), in float64 chunks.

    Chunked so a large set never needs a float copy of itself; a constant channel gets std 1
    so normalising by it stays finite.
    """
    channels = images.shape[1]
    per_image = max(1, images[0].numel()) if len(images) else 1
    chunk = max(1, (1 << 22) // per_image)
    total = torch.zeros(channels, dtype=torch.float64, device=images.device)
    squares = torch.zeros_like(total)
    for part in images.split(chunk):
        values = part.double()
        if part.dtype == torch.uint8:
            values /= 255.0
        total += values.sum(dim=(0, 2, 3))
        squares += (values * values).sum(dim=(0, 2, 3))
    count = max(1, images.shape[0] * images.shape[2] * images.shape[3])
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple(mean.tolist()), tuple(std.tolist())
