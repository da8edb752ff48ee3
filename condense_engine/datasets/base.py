"""ImageDataset: the in-memory image set every reader returns and every method consumes."""
from dataclasses import dataclass, field, replace

import torch


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

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.num_classes)

    def subset(self, index: torch.Tensor) -> "ImageDataset":
        return replace(self, images=self.images[index], labels=self.labels[index])

    def to(self, device) -> "ImageDataset":
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))
