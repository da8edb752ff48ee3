"""Small class-structured data sets shared by the method tests."""
import torch

from condense_engine.datasets import from_tensors


def toy_dataset(classes=3, per_class=24, size=12, channels=1):
    """Class-dependent blobs so there is a distribution to match."""
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = torch.rand(len(labels), channels, size, size, generator=g) * 80
    for c in range(classes):
        images[labels == c, :, c * 3:c * 3 + 4, :] += 150
    return from_tensors(images.clamp(0, 255).to(torch.uint8), labels)


FAST = dict(batch_real=8, model="ConvNetW32", dsa=True)
