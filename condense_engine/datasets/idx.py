"""MNIST and Fashion-MNIST: the official IDX files, gzip-compressed or raw."""
import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from condense_engine.datasets._files import find_file
from condense_engine.datasets.base import DatasetError, ImageDataset
from condense_engine.datasets.constants import DIGITS, FASHION_MNIST_CLASSES, NORMALIZATION

_UNSIGNED_BYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
_FILE_PREFIX = {"train": "train", "test": "t10k"}
_TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_CLASSES = {"mnist": DIGITS, "fashion-mnist": FASHION_MNIST_CLASSES}


def read_idx(path: Path, dims: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file with `dims` dimensions (gzip detected by its magic bytes)."""
    raw = _read_bytes(path)
    header = 4 + 4 * dims
    expected_magic = (_UNSIGNED_BYTE << 8) | dims
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} bytes); expected at least "
                           f"{header} bytes starting with magic 0x{expected_magic:08x}")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != expected_magic:
        raise DatasetError(f"{path}: bad IDX magic 0x{magic:08x}; expected 0x{expected_magic:08x} "
                           f"(unsigned bytes, {dims} dimension{'s' if dims > 1 else ''})")
    shape = struct.unpack(f">{dims}I", raw[4:header])
    needed = int(np.prod(shape))
    present = len(raw) - header
    if present != needed:
        raise DatasetError(f"{path}: size mismatch: the header promises shape {shape} = {needed} "
                           f"data bytes but the file holds {present}; it is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as handle:
        raw = handle.read()
    if raw[:2] != _GZIP_MAGIC:
        if path.suffix == ".gz":
            raise DatasetError(f"{path}: not a gzip file (magic {raw[:2].hex() or 'empty'}); "
                               f"expected a gzip-compressed IDX file")
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise DatasetError(f"{path}: corrupt gzip stream ({error}); expected a complete "
                           f"gzip-compressed IDX file") from error


def idx_files(name: str, root: Path, split: str) -> tuple[Path, Path]:
    """The (images, labels) files of a split: official names, .gz or raw, in root or root/raw."""
    prefix = _FILE_PREFIX[split]
    directories = [root, root / "raw", root / _TORCHVISION_FOLDER[name] / "raw"]

    def locate(kind: str, dims: int) -> Path:
        base = f"{prefix}-{kind}-idx{dims}-ubyte"
        return find_file(directories, [base + ".gz", base], f"{name} {split} {kind} ({base}[.gz])")

    return locate("images", 3), locate("labels", 1)


def read_idx_dataset(name: str, root: Path, split: str) -> ImageDataset:
    """Load one split of MNIST or Fashion-MNIST as uint8 (N, 1, 28, 28)."""
    images_path, labels_path = idx_files(name, root, split)
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise DatasetError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                           f"{len(labels)} labels; expected one label per image")
    classes = _CLASSES[name]
    if len(labels) and int(labels.max()) >= len(classes):
        raise DatasetError(f"{labels_path}: label {int(labels.max())} out of range; "
                           f"expected labels 0..{len(classes) - 1}")
    mean, std = NORMALIZATION[name]
    return ImageDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long(),
                        list(classes), mean, std, name=name, split=split,
                        meta={"files": [str(images_path), str(labels_path)]})
