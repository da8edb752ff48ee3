"""In-memory and array-file data sets: tensors, torch Datasets, .npz and .pt files."""
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from condense_engine.datasets.base import DatasetError, ImageDataset, channel_stats


def from_tensors(images, labels, *, classes=None, mean=None, std=None, name="tensors",
                 split="train", normalized=None) -> ImageDataset:
    """Wrap image and label arrays (torch or numpy) as an ImageDataset.

    images: (N, H, W), (N, C, H, W) or channels-last (N, H, W, C) when the last axis is 1 or 3
    and the second is not. Accepted value conventions:
      - uint8: raw pixels 0..255, stored as uint8; mean/std default to the data's statistics.
      - float in [0, 1] (`normalized` None or False): pixels; normalised with mean/std (given, or
        the data's statistics) and stored as float32 in network space.
      - float outside [0, 1], or `normalized=True`: already in network space, stored as is;
        mean/std (default 0/1) only record how to map back to pixels.
      - other integer types holding 0..255: treated as uint8.
    labels: integer class indices (N,); classes default to "0".."max label".
    """
    return build_dataset(images, labels, classes=classes, mean=mean, std=std, name=name,
                         split=split, normalized=normalized, source="images")


def as_dataset(data, role: str, *, mean=None, std=None) -> ImageDataset:
    """An ImageDataset from an ImageDataset, an (images, labels) pair (see from_tensors) or a
    torch Dataset: every entry point takes the same three. `role` names the argument in errors;
    `mean`/`std` normalise a pair's pixels (default: its own statistics)."""
    if isinstance(data, ImageDataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return from_tensors(*data, mean=mean, std=std)
    if isinstance(data, torch.utils.data.Dataset):
        return from_torch_dataset(data)
    raise TypeError(f"{role} must be an ImageDataset, an (images, labels) tensor pair or a torch Dataset, "
                    f"got {type(data).__name__}")


def build_dataset(images, labels, *, classes, mean, std, name, split, normalized,
                  source: str) -> ImageDataset:
    """from_tensors with `source` (a file name, for readers) named in every error."""
    images = _as_tensor(images, "images", source)
    labels = _as_tensor(labels, "labels", source)
    images = _channels_first(images, source)
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DatasetError(f"{source}: labels are {labels.dtype} of shape {tuple(labels.shape)}; "
                           f"expected integer class indices of shape (N,)")
    if len(labels) != len(images):
        raise DatasetError(f"{source}: {len(images)} images but {len(labels)} labels; expected one "
                           f"label per image")
    if len(images) == 0:
        raise DatasetError(f"{source}: no images; expected at least one")
    labels = labels.long()
    if int(labels.min()) < 0:
        raise DatasetError(f"{source}: negative label {int(labels.min())}; expected class indices >= 0")
    classes = _class_names(classes, int(labels.max()), source)
    channels = images.shape[1]
    images, mean, std = _to_storage(images, _per_channel(mean, channels, "mean", source),
                                    _per_channel(std, channels, "std", source), normalized, source)
    return ImageDataset(images, labels.to(images.device), classes, mean, std, name=name, split=split)


def _as_tensor(value, what: str, source: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.from_numpy(np.array(value, order="C"))
    except (TypeError, ValueError) as error:
        raise DatasetError(f"{source}: {what} cannot be read as a numeric array ({error})") from error


def _channels_first(images: torch.Tensor, source: str) -> torch.Tensor:
    if images.dim() == 3:
        return images.unsqueeze(1)
    if images.dim() != 4:
        raise DatasetError(f"{source}: images have shape {tuple(images.shape)}; expected (N, H, W), "
                           f"(N, C, H, W) or (N, H, W, C)")
    if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        return images.permute(0, 3, 1, 2).contiguous()
    return images.contiguous()


def _per_channel(value, channels: int, what: str, source: str):
    if value is None:
        return None
    values = [float(v) for v in torch.as_tensor(value, dtype=torch.float64).reshape(-1)]
    if len(values) == 1:
        values *= channels
    if len(values) != channels:
        raise DatasetError(f"{source}: {what} has {len(values)} values; expected 1 or {channels}")
    return tuple(values)


def _class_names(classes, max_label: int, source: str) -> list:
    if classes is None:
        return [str(c) for c in range(max_label + 1)]
    names = [c.decode() if isinstance(c, bytes) else str(c) for c in list(classes)]
    if max_label >= len(names):
        raise DatasetError(f"{source}: label {max_label} but only {len(names)} class names")
    return names


def _to_storage(images: torch.Tensor, mean, std, normalized, source: str):
    """(stored images, mean, std) following the conventions in from_tensors' docstring."""
    if images.dtype == torch.uint8:
        if normalized:
            raise DatasetError(f"{source}: uint8 images cannot be already normalised")
        data_mean, data_std = channel_stats(images) if mean is None or std is None else (mean, std)
        return images, mean or data_mean, std or data_std
    if images.dtype == torch.bool or images.is_complex():
        raise DatasetError(f"{source}: images are {images.dtype}; expected uint8 or float")
    if not images.dtype.is_floating_point:
        if int(images.min()) < 0 or int(images.max()) > 255:
            raise DatasetError(f"{source}: integer images span {int(images.min())}..{int(images.max())};"
                               f" expected pixel values 0..255")
        return _to_storage(images.to(torch.uint8), mean, std, normalized, source)
    images = images.float()
    if not bool(torch.isfinite(images).all()):
        raise DatasetError(f"{source}: images contain NaN or infinity")
    in_unit_range = float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    if normalized if normalized is not None else not in_unit_range:
        channels = images.shape[1]
        return images, mean or (0.0,) * channels, std or (1.0,) * channels
    data_mean, data_std = channel_stats(images) if mean is None or std is None else (mean, std)
    mean, std = mean or data_mean, std or data_std
    shape = (1, -1, 1, 1)
    scale = torch.tensor(std, device=images.device).view(shape)
    shift = torch.tensor(mean, device=images.device).view(shape)
    return (images - shift) / scale, mean, std


def from_torch_dataset(dataset, *, classes=None, name=None, split="train") -> ImageDataset:
    """Collect a torch Dataset yielding (image, label) pairs into an ImageDataset.

    Images may be tensors (C, H, W) or (H, W), PIL images, or numpy arrays (H, W[, C]); all must
    share one shape. Conversion then follows `from_tensors` (ToTensor output in [0, 1] is treated
    as pixels). Class names come from `classes` or the data set's `classes` attribute.
    """
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        items = iter(dataset)
    else:
        items = (dataset[index] for index in range(len(dataset)))
    images, labels = [], []
    for index, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DatasetError(f"item {index} is a {type(item).__name__}; expected an (image, label) pair")
        image = _item_image(item[0], index)
        if images and (image.shape != images[0].shape or image.dtype != images[0].dtype):
            raise DatasetError(f"item {index}: image {image.dtype} {tuple(image.shape)} but item 0 is "
                               f"{images[0].dtype} {tuple(images[0].shape)}; all images must match")
        images.append(image)
        labels.append(int(item[1]))
    if not images:
        raise DatasetError(f"{type(dataset).__name__} yielded no items; expected (image, label) pairs")
    return from_tensors(torch.stack(images), torch.tensor(labels, dtype=torch.int64),
                        classes=classes if classes is not None else getattr(dataset, "classes", None),
                        name=name or type(dataset).__name__.lower(), split=split)


def _item_image(image, index: int) -> torch.Tensor:
    """One item's image as a (C, H, W) tensor."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode))
    if isinstance(image, np.ndarray):
        array = image[:, :, None] if image.ndim == 2 else image
        if array.ndim != 3:
            raise DatasetError(f"item {index}: array image of shape {image.shape}; expected (H, W[, C])")
        return torch.from_numpy(np.array(array.transpose(2, 0, 1), order="C"))
    if isinstance(image, torch.Tensor):
        if image.dim() == 2:
            return image.unsqueeze(0)
        if image.dim() == 3:
            return image
    raise DatasetError(f"item {index}: image is {type(image).__name__} "
                       f"{tuple(getattr(image, 'shape', ()))}; expected a (C, H, W) tensor, a PIL "
                       f"image or an (H, W[, C]) array")


def _split_arrays(contents, keys, split: str, path: Path) -> tuple[str, str]:
    """The (images, labels) keys for `split`: '<split>_images' if present, else 'images'."""
    for images_key, labels_key in ((f"{split}_images", f"{split}_labels"), ("images", "labels")):
        if images_key in keys:
            if labels_key not in keys:
                raise DatasetError(f"{path}: has '{images_key}' but no '{labels_key}'")
            return images_key, labels_key
    raise DatasetError(f"{path}: no arrays for split {split!r} (keys: {sorted(keys)}); expected "
                       f"'images' and 'labels', or '{split}_images' and '{split}_labels'")


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found; expected {what}")


def read_npz(path: Path, split: str) -> ImageDataset:
    """Load a .npz with 'images' (uint8 NHWC or NCHW) and 'labels' (or per-split keys), 'classes' optional."""
    _require_file(path, "a .npz holding 'images' and 'labels' (or '<split>_images'/'<split>_labels')")
    try:
        with np.load(path, allow_pickle=False) as contents:
            images_key, labels_key = _split_arrays(contents, set(contents.files), split, path)
            images, labels = contents[images_key], contents[labels_key]
            classes = contents["classes"].tolist() if "classes" in contents.files else None
    except DatasetError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as error:
        raise DatasetError(f"{path}: unreadable .npz ({type(error).__name__}: {error}); expected a "
                           f"numpy .npz archive") from error
    return build_dataset(images, labels, classes=classes, mean=None, std=None, name="npz",
                         split=split, normalized=None, source=str(path))


def read_tensors(path: Path, split: str) -> ImageDataset:
    """Load a torch.save'd dict with 'images' and 'labels' (or per-split keys); optional 'classes', 'mean', 'std'."""
    _require_file(path, "a .pt file holding a dict with 'images' and 'labels'")
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a damaged file
        raise DatasetError(f"{path}: unreadable tensor file ({type(error).__name__}: {error}); "
                           f"expected a torch.save'd dict with 'images' and 'labels'") from error
    if not isinstance(contents, dict):
        raise DatasetError(f"{path}: holds a {type(contents).__name__}; expected a dict with "
                           f"'images' and 'labels'")
    images_key, labels_key = _split_arrays(contents, set(contents), split, path)
    return build_dataset(contents[images_key], contents[labels_key], classes=contents.get("classes"),
                         mean=contents.get("mean"), std=contents.get("std"), name="tensors",
                         split=split, normalized=None, source=str(path))
