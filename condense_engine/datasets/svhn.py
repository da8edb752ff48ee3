"""SVHN: the official cropped-digit MATLAB files train_32x32.mat / test_32x32.mat / extra_32x32.mat."""
from pathlib import Path

import numpy as np
import scipy.io
import torch

from condense_engine.datasets._files import find_file
from condense_engine.datasets.base import DatasetError, ImageDataset
from condense_engine.datasets.constants import DIGITS, NORMALIZATION


def svhn_file(root: Path, split: str) -> Path:
    """The .mat file of a split, in root or root/raw (or root itself when it is that file)."""
    if root.is_file():
        return root
    name = f"{split}_32x32.mat"
    return find_file([root, root / "raw"], [name], f"SVHN {split} file {name}")


def read_svhn(root: Path, split: str) -> ImageDataset:
    """Load one split as uint8 (N, 3, 32, 32); the file's label 10 stands for digit 0."""
    path = svhn_file(root, split)
    expected = "a MATLAB file with X (32, 32, 3, N) uint8 and y (N, 1)"
    try:
        contents = scipy.io.loadmat(path)
    except Exception as error:  # scipy raises many types for a damaged file; all mean "corrupt"
        raise DatasetError(f"{path}: unreadable .mat ({type(error).__name__}: {error}); "
                           f"expected {expected}") from error
    pixels, labels = contents.get("X"), contents.get("y")
    if pixels is None or labels is None:
        raise DatasetError(f"{path}: variables {sorted(k for k in contents if not k.startswith('__'))};"
                           f" expected {expected}")
    if pixels.ndim != 4 or pixels.shape[2] != 3:
        raise DatasetError(f"{path}: X has shape {pixels.shape}; expected {expected}")
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if len(labels) != pixels.shape[3]:
        raise DatasetError(f"{path}: {pixels.shape[3]} images but {len(labels)} labels; "
                           f"expected one label per image")
    labels[labels == 10] = 0
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{path}: labels span {labels.min()}..{labels.max()}; expected 1..10")
    images = np.ascontiguousarray(pixels.transpose(3, 2, 0, 1)).astype(np.uint8, copy=False)
    mean, std = NORMALIZATION["svhn"]
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), list(DIGITS), mean, std,
                        name="svhn", split=split, meta={"files": [str(path)]})
