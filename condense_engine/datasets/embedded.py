"""The small MNIST subset shipped inside the package ("default"): 500 train / 200 test images per class.

Built by tools/make_embedded.py from the official MNIST files; its sha256 is pinned here so a
damaged install fails loudly instead of training on garbage.
"""
import hashlib
import io
from importlib import resources

import numpy as np
import torch

from condense_engine.datasets.base import DatasetError, ImageDataset
from condense_engine.datasets.constants import NORMALIZATION

EMBEDDED_FILE = "mnist_default.npz"
EMBEDDED_SHA256 = "e69004f3630c0eb9881e36754af9528f248163658d9121c85ef4dbaa36cde90c"
SPLITS = ("train", "test")


def embedded_resource():
    """The packaged file as an importlib.resources Traversable."""
    return resources.files("condense_engine.datasets").joinpath("embedded", EMBEDDED_FILE)


def embedded_bytes() -> bytes:
    resource = embedded_resource()
    if not resource.is_file():
        raise FileNotFoundError(f"{resource}: file not found; expected the packaged default data set "
                                f"(rebuild it with tools/make_embedded.py or reinstall)")
    return resource.read_bytes()


def read_default(split: str) -> ImageDataset:
    """One split of the embedded set, uint8 (N, 1, 28, 28) with MNIST normalisation."""
    data = embedded_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != EMBEDDED_SHA256:
        raise DatasetError(f"{embedded_resource()}: sha256 {digest} does not match the pinned "
                           f"{EMBEDDED_SHA256}; the installed package is corrupt, reinstall it")
    with np.load(io.BytesIO(data), allow_pickle=False) as contents:
        images = torch.from_numpy(contents[f"{split}_images"])
        labels = torch.from_numpy(contents[f"{split}_labels"]).long()
        classes = [str(c) for c in contents["classes"].tolist()]
        provenance = str(contents["provenance"])
    mean, std = NORMALIZATION["mnist"]
    return ImageDataset(images, labels, classes, mean, std, name="mnist-default", split=split,
                        meta={"provenance": provenance})
