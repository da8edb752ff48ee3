"""Data set names, `load`, `verify` and `list_datasets`: the entry points of condense_engine.datasets."""
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from condense_engine.datasets import arrays, cifar, embedded, idx, images, svhn
from condense_engine.datasets._files import file_digest
from condense_engine.datasets.base import DatasetError, ImageDataset
from condense_engine.datasets.constants import OFFICIAL_MD5
from condense_engine.datasets.zca import ZCA, whiten


@dataclass(frozen=True)
class DatasetInfo:
    """How to read one named data set.

    `read(root, split, **options)` returns the ImageDataset; `files(root, split)` lists what the
    split is read from (for checksums); `splits` is None where any split name is allowed;
    `options` names the extra keyword arguments `read` accepts.
    """

    name: str
    description: str
    read: Callable
    files: Callable
    splits: tuple | None = ("train", "test")
    aliases: tuple = ()
    needs_root: bool = True
    options: tuple = ()


def _single(path_of: Callable) -> Callable:
    return lambda root, split: [path_of(root, split)]


_DATASETS = [
    DatasetInfo("mnist", "MNIST handwritten digits, 28×28 grey, 10 classes (official IDX files, .gz or raw)",
                lambda root, split: idx.read_idx_dataset("mnist", root, split),
                lambda root, split: list(idx.idx_files("mnist", root, split))),
    DatasetInfo("fashion-mnist", "Fashion-MNIST Zalando articles, 28×28 grey, 10 classes (official IDX files)",
                lambda root, split: idx.read_idx_dataset("fashion-mnist", root, split),
                lambda root, split: list(idx.idx_files("fashion-mnist", root, split)),
                aliases=("fmnist",)),
    DatasetInfo("cifar10", "CIFAR-10, 32×32 RGB, 10 classes (cifar-10-batches-py/ or cifar-10-python.tar.gz)",
                lambda root, split: cifar.read_cifar("cifar10", root, split),
                _single(lambda root, split: cifar.locate("cifar10", root))),
    DatasetInfo("cifar100", "CIFAR-100, 32×32 RGB, 100 fine classes (cifar-100-python/ or its .tar.gz)",
                lambda root, split: cifar.read_cifar("cifar100", root, split),
                _single(lambda root, split: cifar.locate("cifar100", root))),
    DatasetInfo("svhn", "SVHN cropped digits, 32×32 RGB, 10 classes (train_32x32.mat / test_32x32.mat)",
                svhn.read_svhn, _single(svhn.svhn_file), splits=("train", "test", "extra")),
    DatasetInfo("tinyimagenet", "Tiny ImageNet, 64×64 RGB, 200 classes (tiny-imagenet-200 tree; test = val/)",
                images.read_tiny_imagenet,
                _single(lambda root, split: images.tiny_imagenet_root(root)),
                aliases=("tinyimagenet200", "tiny"), options=("cache",)),
    DatasetInfo("imagefolder", "any root/<split>/<class>/<images> or root/<class>/<images> tree",
                images.read_imagefolder, lambda root, split: [root], splits=None,
                aliases=("folder",), options=("size", "cache")),
    DatasetInfo("npz", "a .npz with images (N,H,W,C or N,C,H,W) and labels, or <split>_images/_labels",
                arrays.read_npz, lambda root, split: [root], splits=None),
    DatasetInfo("tensors", "a torch.save'd dict with images and labels (or <split>_images/_labels)",
                arrays.read_tensors, lambda root, split: [root], splits=None, aliases=("pt", "torch")),
    DatasetInfo("default", "the embedded MNIST subset (500 train / 200 test per class); needs no files",
                lambda root, split: embedded.read_default(split),
                lambda root, split: [Path(str(embedded.embedded_resource()))],
                aliases=("mnistdefault", "embedded"), needs_root=False),
]
_BY_KEY = {}
for _info in _DATASETS:
    for _name in (_info.name, *_info.aliases):
        _BY_KEY[_name.replace("-", "").replace("_", "")] = _info


def _lookup(name: str) -> DatasetInfo:
    key = str(name).strip().lower().replace("-", "").replace("_", "").replace(" ", "")
    if key not in _BY_KEY:
        raise DatasetError(f"unknown data set {name!r}; known: {', '.join(i.name for i in _DATASETS)}")
    return _BY_KEY[key]


def _resolve_split(info: DatasetInfo, split: str) -> str:
    if info.splits is None:
        return split
    canonical = "test" if split in ("val", "valid", "validation") and info.name == "tinyimagenet" else split
    if canonical not in info.splits:
        raise DatasetError(f"{info.name} has no split {split!r}; expected one of {list(info.splits)}")
    return canonical


def list_datasets() -> dict:
    """Every known data set name with a one-line description."""
    return {info.name: info.description for info in _DATASETS}


def _file_entry(path: Path, status: str, algorithm: str = "md5", expected: str | None = None,
                actual: str | None = None, detail: str = "") -> dict:
    """One line of a verification report.

    status: "ok" (checksum matches), "mismatch", "missing", or "unverified" (no official
    checksum exists for this file or layout, e.g. unpacked archives or raw IDX files).
    """
    return {"path": str(path), "status": status, "algorithm": algorithm, "expected": expected,
            "actual": actual, "detail": detail}


def _check_file(info: DatasetInfo, path: Path) -> dict:
    if info.name == "default":
        actual = file_digest(path, "sha256")
        status = "ok" if actual == embedded.EMBEDDED_SHA256 else "mismatch"
        return _file_entry(path, status, "sha256", embedded.EMBEDDED_SHA256, actual)
    expected = OFFICIAL_MD5.get(info.name, {}).get(path.name)
    if expected is None:
        return _file_entry(path, "unverified", detail="no official checksum for this file or layout")
    actual = file_digest(path, "md5")
    return _file_entry(path, "ok" if actual == expected else "mismatch", "md5", expected, actual)


def verify(name: str, root=None, split: str | None = None) -> dict:
    """Checksum report for the files of `name` under `root` (one split, or all known splits).

    Returns {"dataset", "root", "ok", "files"}: `files` lists one entry per file (path, status,
    algorithm, expected, actual, detail); `ok` is False when any file is missing or mismatched.
    """
    info = _lookup(name)
    root = _root_path(info, root)
    splits = [_resolve_split(info, split)] if split is not None else list(info.splits or ["train"])
    files, seen = [], set()
    for each in splits:
        try:
            paths = info.files(root, each)
        except FileNotFoundError as error:
            files.append(_file_entry(root, "missing", detail=f"{each}: {error}"))
            continue
        for path in paths:
            if path not in seen:
                seen.add(path)
                files.append(_check_file(info, path))
    ok = not any(entry["status"] in ("mismatch", "missing") for entry in files)
    return {"dataset": info.name, "root": None if root is None else str(root), "ok": ok, "files": files}


def _root_path(info: DatasetInfo, root) -> Path | None:
    if root is None:
        if info.needs_root:
            raise DatasetError(f"data set {info.name!r} needs root= (the folder or file holding it)")
        return None
    return Path(root).expanduser()


def load(name: str, root=None, split: str = "train", *, verify: bool = False,
         zca: ZCA | bool | None = None, size: tuple | None = None, cache: bool = True) -> ImageDataset:
    """Read one split of a named data set into memory (uint8 NCHW images, int64 labels).

    verify: check the md5 of the official files first (where one is known) and raise on a mismatch.
    zca: True fits ZCA whitening on this split (train); a fitted ZCA applies it (test); the
    result then holds float32 images in network space with `dataset.zca` set.
    size: (H, W) to resize imagefolder images. cache: keep TinyImageNet's and imagefolder's decoded
    images on disk ($CONDENSE_CACHE or ~/.cache/condense_engine) and map them on later loads.
    """
    if not (zca is None or isinstance(zca, (bool, ZCA))):
        raise TypeError(f"zca must be None, True or a fitted ZCA, got {type(zca).__name__}")
    info = _lookup(name)
    split = _resolve_split(info, split)
    root = _root_path(info, root)
    options = {"size": size, "cache": cache}
    for option, default in (("size", None), ("cache", True)):
        if options[option] != default and option not in info.options:
            raise DatasetError(f"option {option}= does not apply to data set {info.name!r}")
    if verify:
        _verify_or_raise(info, root, split)
    dataset = info.read(root, split, **{key: options[key] for key in info.options})
    if zca is True:
        return whiten(dataset)
    return whiten(dataset, zca) if isinstance(zca, ZCA) else dataset


def _verify_or_raise(info: DatasetInfo, root: Path | None, split: str) -> None:
    report = [_check_file(info, path) for path in info.files(root, split)]
    bad = [entry for entry in report if entry["status"] == "mismatch"]
    if bad:
        lines = "; ".join(f"{e['path']}: {e['algorithm']} {e['actual']}, expected {e['expected']}"
                          for e in bad)
        raise DatasetError(f"checksum mismatch: {lines}; the file is corrupt or not the official one")
    for entry in report:
        if entry["status"] == "unverified":
            warnings.warn(f"{entry['path']}: {entry['detail']}; not verified", stacklevel=3)
