"""Real data for condensation: readers, the device-resident class sampler, ZCA whitening.

    from condense_engine import datasets
    train = datasets.load("cifar10", root="data/", split="train")   # -> ImageDataset
    sampler = datasets.ClassSampler(train, device="cuda", generator=torch.Generator().manual_seed(0))
    images, labels = sampler.sample(256)                            # 256 per class, one gather

Format problems raise DatasetError (a ValueError) naming the file and what was expected; a
missing file or folder raises FileNotFoundError with its path.
"""
from condense_engine.datasets.arrays import as_dataset, from_tensors, from_torch_dataset
from condense_engine.datasets.base import DatasetError, ImageDataset, channel_stats
from condense_engine.datasets.registry import list_datasets, load, verify
from condense_engine.datasets.rows import RealImages
from condense_engine.datasets.sampler import ClassSampler
from condense_engine.datasets.zca import ZCA, whiten

__all__ = ["ImageDataset", "DatasetError", "load", "list_datasets", "verify",
           "ClassSampler", "RealImages", "ZCA", "whiten", "as_dataset", "from_tensors", "from_torch_dataset", "channel_stats"]
