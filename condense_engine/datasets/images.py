"""Image-file data sets: TinyImageNet (tiny-imagenet-200 tree) and generic ImageFolder trees.

Files are decoded with PIL in a thread pool (the decoders release the GIL). TinyImageNet's
decoded arrays (and an ImageFolder tree's) are cached as an .npy that later loads map rather
than read: they skip the decodes (100k JPEGs for TinyImageNet), and the ranks of one machine
share one copy of the images in memory.
"""
import hashlib
import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from condense_engine.datasets._files import (cache_dir, cache_lock, load_npy_shared, require_dir,
                                             save_npy_atomic, save_text_atomic)
from condense_engine.datasets.base import DatasetError, ImageDataset, channel_stats
from condense_engine.datasets.constants import NORMALIZATION

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
TINY_SIZE = (64, 64)


def decode_images(paths: list, *, mode: str | None = None, size: tuple | None = None) -> list:
    """Decode files to uint8 arrays (H, W) for grey or (H, W, 3) for colour, in parallel.

    `mode` "RGB"/"L" forces one; None keeps grey sources grey and makes the rest RGB.
    `size` (H, W) resizes bilinearly. An unreadable file raises DatasetError naming it.
    """
    workers = min(16, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda path: _decode(path, mode, size), paths, chunksize=64))


def _decode(path: Path, mode: str | None, size: tuple | None) -> np.ndarray:
    try:
        with Image.open(path) as image:
            target = mode or ("L" if image.mode in _GRAY_MODES else "RGB")
            converted = image.convert(target)
        if size is not None and converted.size != (size[1], size[0]):
            converted = converted.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return np.asarray(converted, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DatasetError(f"{path}: unreadable image ({error}); expected an image file PIL can "
                           f"decode") from error


def stack_images(arrays: list, paths: list) -> torch.Tensor:
    """Stack decoded arrays into uint8 (N, C, H, W); grey images join colour ones as 3 equal channels."""
    if any(array.ndim == 3 for array in arrays):
        arrays = [np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a for a in arrays]
    first = arrays[0].shape[:2]
    for array, path in zip(arrays, paths):
        if array.shape[:2] != first:
            raise DatasetError(f"{path}: image is {array.shape[0]}×{array.shape[1]} (H×W) but "
                               f"{paths[0]} is {first[0]}×{first[1]}; all images must share one "
                               f"size, or pass size=(H, W) to resize them")
    stacked = np.stack(arrays)
    if stacked.ndim == 3:
        stacked = stacked[:, :, :, None]
    return torch.from_numpy(np.ascontiguousarray(stacked.transpose(0, 3, 1, 2)))


def _image_files(folder: Path) -> list:
    """(path, stat) of the image files under `folder`, sorted by path; each file is stat'ed once
    (the cache stamp reuses it), which matters on a million-file tree on a network file system."""
    found = []
    for path in folder.rglob("*"):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            try:
                status = path.stat()
            except (FileNotFoundError, NotADirectoryError):  # a dangling link or a file gone meanwhile
                continue
            if stat.S_ISREG(status.st_mode):
                found.append((path, status))
    return sorted(found, key=lambda entry: entry[0])


def read_imagefolder(root: Path, split: str, size: tuple | None = None, cache: bool = True) -> ImageDataset:
    """Load root/<split>/<class>/* (or root/<class>/* when there is no split folder).

    With `cache`, the decoded images are kept as for TinyImageNet, one cache per tree and `size`,
    stamped with every file's path, size and modification time (an edited tree is decoded afresh).
    """
    require_dir(root, "an image folder: <root>/<split>/<class>/<images> or <root>/<class>/<images>")
    base = root / split
    if not base.is_dir():
        split_folders = sorted(p.name for p in root.iterdir()
                               if p.is_dir() and p.name in {"train", "test", "val", "valid"})
        if split_folders:
            raise FileNotFoundError(f"{base}: folder not found; {root} has split folders "
                                    f"{split_folders}, expected one named {split!r}")
        base = root
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{base}: no class folders; expected {base}/<class>/<image files>")
    paths, identities, labels = [], [], []
    for label, name in enumerate(classes):
        files = _image_files(base / name)
        if not files:
            raise DatasetError(f"{base / name}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
                               f"; expected at least one image per class folder")
        paths += [path for path, _ in files]
        identities += [_file_identity(path, status, base) for path, status in files]
        labels += [label] * len(files)
    size = tuple(size) if size is not None else None
    shape = (len(paths), None, *(size or (None, None)))
    images = cached_images("imagefolder", [base.resolve(), size], [*classes, *identities],
                           shape, cache, lambda: stack_images(decode_images(paths, size=size), paths))
    mean, std = channel_stats(images)
    return ImageDataset(images, torch.tensor(labels, dtype=torch.int64), classes, mean, std,
                        name="imagefolder", split=split, meta={"root": str(base)})


def _file_identity(path: Path, status: os.stat_result, base: Path) -> str:
    """A file's path under `base`, size and modification time: what a cache built from it depends on."""
    return f"{path.relative_to(base)}\0{status.st_size}\0{status.st_mtime_ns}"


def tiny_imagenet_root(root: Path) -> Path:
    """The tiny-imagenet-200 folder: `root` itself or its child of that name."""
    for candidate in (root, root / "tiny-imagenet-200"):
        if (candidate / "train").is_dir():
            return candidate
    raise FileNotFoundError(f"{root}: no tiny-imagenet-200 tree; expected train/<wnid>/images/*.JPEG "
                            f"and val/val_annotations.txt under it (or under "
                            f"{root / 'tiny-imagenet-200'})")


def tiny_imagenet_listing(base: Path, split: str) -> tuple[list, list, list]:
    """(paths, labels, classes) of a split; classes are the sorted train/ folder names."""
    classes = sorted(p.name for p in (base / "train").iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{base / 'train'}: no class folders; expected train/<wnid>/images/")
    paths, labels = [], []
    if split == "train":
        for label, wnid in enumerate(classes):
            folder = require_dir(base / "train" / wnid / "images", f"the JPEGs of class {wnid}")
            files = _image_files(folder)
            if not files:
                raise DatasetError(f"{folder}: no images; expected {wnid}_<n>.JPEG files")
            paths += [path for path, _ in files]
            labels += [label] * len(files)
        return paths, labels, classes
    annotations = base / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise FileNotFoundError(f"{annotations}: file not found; expected the val labels "
                                f"(<file>\\t<wnid>\\t<box> per line) next to val/images/")
    index = {wnid: label for label, wnid in enumerate(classes)}
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DatasetError(f"{annotations}:{number}: {line!r}; expected <file>\\t<wnid>... with a "
                               f"wnid that is one of the {len(classes)} train/ folders")
        path = base / "val" / "images" / fields[0]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: file not found; listed in {annotations}:{number}")
        paths.append(path)
        labels.append(index[fields[1]])
    if not paths:
        raise DatasetError(f"{annotations}: no entries; expected one line per val image")
    return paths, labels, classes


def read_tiny_imagenet(root: Path, split: str, cache: bool = True) -> ImageDataset:
    """Load TinyImageNet train or test (= val/) as uint8 (N, 3, 64, 64), cached after the first decode
    (stamped with the file count and classes only: the official files do not change)."""
    base = tiny_imagenet_root(root)
    paths, labels, classes = tiny_imagenet_listing(base, split)

    def decode() -> torch.Tensor:
        arrays = decode_images(paths, mode="RGB")
        for array, path in zip(arrays, paths):
            if array.shape[:2] != TINY_SIZE:
                raise DatasetError(f"{path}: image is {array.shape[0]}×{array.shape[1]}; expected "
                                   f"{TINY_SIZE[0]}×{TINY_SIZE[1]}")
        return stack_images(arrays, paths)

    images = cached_images(f"tinyimagenet-{split}", [base.resolve()], [len(paths), *classes],
                           (len(paths), 3, *TINY_SIZE), cache, decode)
    mean, std = NORMALIZATION["tinyimagenet"]
    return ImageDataset(images, torch.tensor(labels, dtype=torch.int64), classes, mean, std,
                        name="tinyimagenet", split=split, meta={"root": str(base)})


#: Part of every decode cache's contents stamp: raise it when decoding changes what a file gives.
CACHE_FORMAT = "1"


def cached_images(stem: str, place: list, contents: list, shape: tuple, cache: bool, decode) -> torch.Tensor:
    """uint8 (N, C, H, W) images: `decode()`'s, or with `cache` the decode cache's.

    The cache file is `<cache_dir>/<stem>-<digest of place>.npy` (place: which tree and variant),
    with a stamp of `contents` (what was decoded) beside it in `.npy.source`; a changed tree
    replaces the file instead of adding one. A hit is a map of the file (`load_npy_shared`): no
    decode, and the ranks of one machine share one copy in memory. Processes loading the same set
    at once take turns on a lock, so one decodes and the rest map its file. `shape` is the
    expected shape, None for an axis not known before decoding; a damaged or mismatched cache is
    ignored with a warning and rebuilt.
    """
    if not cache:
        return decode()
    path = cache_dir() / f"{stem}-{_digest(place)[:24]}.npy"
    stamp = path.with_name(path.name + ".source")
    source = _digest([CACHE_FORMAT, *contents])
    with cache_lock(path):
        current = stamp.is_file() and stamp.read_text() == source
        mapped = _read_cache(path, shape) if current else None
        if mapped is not None:
            return mapped
        images = decode()
        if _write_cache(path, stamp, source, images):
            mapped = _read_cache(path, tuple(images.shape))
        return mapped if mapped is not None else images


def _digest(parts: list) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(str(part).encode() + b"\0")
    return digest.hexdigest()


def _read_cache(path: Path, shape: tuple) -> torch.Tensor | None:
    """The mapped cache when the file is intact and matches `shape`; None means decode afresh."""
    if not path.is_file():
        return None
    try:
        images = load_npy_shared(path)
    except Exception as error:  # a damaged cache is rebuilt, never trusted
        warnings.warn(f"ignoring unreadable cache {path} ({error}); decoding again")
        return None
    matches = images.ndim == len(shape) and all(want is None or want == got for want, got in zip(shape, images.shape))
    if images.dtype != np.uint8 or not matches:
        expected = tuple("?" if axis is None else axis for axis in shape)
        warnings.warn(f"ignoring cache {path}: it holds {images.dtype} {images.shape}, expected uint8 "
                      f"{expected}; decoding again")
        return None
    with warnings.catch_warnings():  # a read-only map was announced by load_npy_shared
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(images)


def _write_cache(path: Path, stamp: Path, source: str, images: torch.Tensor) -> bool:
    """Whether the decode cache and its stamp were written (a failure only costs the next load a
    decode). The stamp goes last: a crash between the two leaves a cache that is rebuilt."""
    try:
        save_npy_atomic(path, images.numpy())
        save_text_atomic(stamp, source)
        return True
    except OSError as error:
        warnings.warn(f"could not write the decode cache {path} ({error}); continuing without it")
        return False
