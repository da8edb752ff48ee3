"""CIFAR-10 and CIFAR-100: the official python-pickle folders or their .tar.gz archives.

The batches are unpickled with an allow-list unpickler: only the numpy array and dtype
reconstructors those files need can be named, so a hostile pickle cannot run code.
"""
import codecs
import io
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from condense_engine.datasets.base import DatasetError, ImageDataset
from condense_engine.datasets.constants import NORMALIZATION


@dataclass(frozen=True)
class _Layout:
    title: str
    folder: str
    archive: str
    batches: dict
    meta: str
    names_key: str
    labels_key: str


LAYOUTS = {
    "cifar10": _Layout("CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                       {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                       "batches.meta", "label_names", "labels"),
    "cifar100": _Layout("CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz",
                        {"train": ["train"], "test": ["test"]},
                        "meta", "fine_label_names", "fine_labels"),
}

_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
_numeric = np._core.numeric if hasattr(np, "_core") else np.core.numeric
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a CIFAR batch needs (numpy arrays); anything else is refused."""

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}") from None


def unpickle_batch(data: bytes, source: str) -> dict:
    """A CIFAR batch dict with str keys (the files are Python 2 pickles, hence latin1)."""
    try:
        batch = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as error:  # any failure while decoding untrusted bytes means a broken file
        raise DatasetError(f"{source}: broken pickle ({type(error).__name__}: {error}); expected a "
                           f"CIFAR python batch (a pickled dict of numpy arrays and lists)") from error
    if not isinstance(batch, dict):
        raise DatasetError(f"{source}: unpickled a {type(batch).__name__}; expected a dict")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value
            for key, value in batch.items()}


def locate(name: str, root: Path) -> Path:
    """The unpacked folder or the .tar.gz archive of `name` under (or at) `root`."""
    layout = LAYOUTS[name]
    if root.is_file():
        return root
    if (root / layout.meta).is_file():
        return root
    if (root / layout.folder).is_dir():
        return root / layout.folder
    if (root / layout.archive).is_file():
        return root / layout.archive
    raise FileNotFoundError(f"{root}: no {layout.title} data; expected the folder {layout.folder}/ "
                            f"(with {layout.meta} and {', '.join(layout.batches['test'])}, ...) or "
                            f"the archive {layout.archive} there")


def _read_members(source: Path, layout: _Layout, names: list) -> dict:
    """Raw bytes of the named batch files, from the folder or from inside the archive."""
    if source.is_dir():
        contents = {}
        for member in names:
            path = source / member
            if not path.is_file():
                raise FileNotFoundError(f"{path}: file not found; expected the {layout.title} "
                                        f"batch {member} in {source}")
            contents[member] = path.read_bytes()
        return contents
    try:
        with tarfile.open(source, "r:gz") as archive:
            contents = {}
            for member in names:
                inner = f"{layout.folder}/{member}"
                try:
                    handle = archive.extractfile(archive.getmember(inner))
                except KeyError:
                    raise DatasetError(f"{source}: member {inner} missing; expected the official "
                                       f"{layout.archive} layout") from None
                if handle is None:
                    raise DatasetError(f"{source}: member {inner} is not a regular file")
                contents[member] = handle.read()
            return contents
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise DatasetError(f"{source}: corrupt or truncated archive ({error}); expected the "
                           f"official {layout.archive}") from error


def read_cifar(name: str, root: Path, split: str) -> ImageDataset:
    """Load one split of CIFAR-10/100 as uint8 (N, 3, 32, 32) with the published class names."""
    layout = LAYOUTS[name]
    source = locate(name, root)
    batch_names = layout.batches[split]
    contents = _read_members(source, layout, [layout.meta, *batch_names])
    where = (lambda member: f"{source}:{layout.folder}/{member}") if source.is_file() else \
        (lambda member: str(source / member))
    meta = unpickle_batch(contents[layout.meta], where(layout.meta))
    if layout.names_key not in meta:
        raise DatasetError(f"{where(layout.meta)}: no '{layout.names_key}'; expected the class names")
    classes = [c.decode("latin1") if isinstance(c, bytes) else str(c) for c in meta[layout.names_key]]
    images, labels = [], []
    for member in batch_names:
        batch_images, batch_labels = _batch_arrays(unpickle_batch(contents[member], where(member)),
                                                   layout, len(classes), where(member))
        images.append(batch_images)
        labels.append(batch_labels)
    mean, std = NORMALIZATION[name]
    pixels = torch.from_numpy(np.concatenate(images).reshape(-1, 3, 32, 32))
    return ImageDataset(pixels, torch.from_numpy(np.concatenate(labels)), classes, mean, std,
                        name=name, split=split, meta={"files": [str(source)]})


def _batch_arrays(batch: dict, layout: _Layout, num_classes: int, source: str):
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{source}: 'data' is {found}; expected a uint8 array of shape (N, 3072)")
    if layout.labels_key not in batch:
        raise DatasetError(f"{source}: no '{layout.labels_key}'; expected one label per image")
    try:
        labels = np.asarray(batch[layout.labels_key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as error:
        raise DatasetError(f"{source}: '{layout.labels_key}' is not a list of integers") from error
    if len(labels) != len(data):
        raise DatasetError(f"{source}: {len(data)} images but {len(labels)} labels; expected one "
                           f"label per image")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{source}: labels span {labels.min()}..{labels.max()}; expected "
                           f"0..{num_classes - 1}")
    return data, labels
