"""SyntheticSet: the distilled images (or their parameterisation), labels, learned lr and metadata.

It is what `distill` returns and `evaluate` consumes. Files are single `.pt` dicts of CPU tensors
and plain values (readable with `torch.load(weights_only=True)`), written atomically; the MTT/DATM
`images_best.pt` / `labels_best.pt` / `lr_best.pt` convention is supported both ways, and
`save_grid` draws a PNG with one row per class.
"""
import copy
import math
import os
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from PIL import Image

from condense_engine import __version__
from condense_engine.checkpoint import atomic_save, check_format, read_torch_file

FORMAT_VERSION = 1
SYNSET_KIND = "condense-engine/synthetic-set"
MTT_IMAGES, MTT_LABELS, MTT_LR = "images_best.pt", "labels_best.pt", "lr_best.pt"
GRID_PADDING = 2


def _check_class_range(what: str, indices: torch.Tensor, num_classes: int) -> None:
    """ValueError naming `what` unless every class index lies in [0, num_classes)."""
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= num_classes):
        raise ValueError(f"{what} must lie in [0, {num_classes}), "
                         f"got values from {int(indices.min())} to {int(indices.max())}")


def _distilled_image_classes(content: dict) -> torch.Tensor | None:
    """The image classes of a soft-labelled set that `distill` saved before sets recorded them:
    it stores meta["ipc"] images per class, class by class. None for anything else."""
    labels, meta = content.get("labels"), content.get("meta") or {}
    ipc, num_classes = meta.get("ipc"), content.get("num_classes")
    if (not isinstance(labels, torch.Tensor) or labels.dim() != 2 or "method" not in meta
            or not isinstance(ipc, int) or not isinstance(num_classes, int) or len(labels) != ipc * num_classes):
        return None
    return torch.arange(num_classes).repeat_interleave(ipc)


@dataclass(repr=False)
class SyntheticSet:
    """Synthetic images with their labels, the learned student lr and how they were made.

    - `images`: float32 (M, C, H, W) in network space (normalised like the real data), or, when
      `factor` > 1, IDC's parameterisation: each stored image packs factor×factor sub-images that
      `materialize()` decodes into the images the evaluation trains on.
    - `labels`: hard int64 class indices (M,) or soft float labels (M, num_classes).
    - `image_classes`: optional int64 (M,), the class each image was made for, which soft labels
      do not name reliably (a teacher's soft label can peak at another class). `distill` sets it;
      None means the hard labels, or the argmax of soft labels for a set made elsewhere.
    - `lr`: the learned student learning rate (float or 0-dim tensor), or None.
    - `mean`/`std`: the per-channel normalisation, to map back to pixels for display.
    - `zca_state`: optional {"mean": (D,), "inverse_matrix": (D, D)} undoing ZCA whitening for
      display (x_flat @ inverse_matrix + mean, D = C·H·W; kornia's convention); saved with the set.
    - `zca`: optional fitted ZCA object (as in ImageDataset) whose `inverse(x)` `save_grid` uses;
      held in memory only, never saved.
    - `meta`: plain values describing the run (method, dataset, ipc, options, seed, iterations,
      ...); the library version and creation time are filled in when absent.
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple
    std: tuple
    lr: float | torch.Tensor | None = None
    num_classes: int | None = None
    classes: list | None = None
    factor: int = 1
    zca_state: dict | None = None
    meta: dict = field(default_factory=dict)
    image_classes: torch.Tensor | None = None
    zca: object = field(default=None, compare=False)

    def __post_init__(self):
        if not isinstance(self.images, torch.Tensor) or self.images.dim() != 4 \
                or self.images.dtype != torch.float32:
            raise ValueError("images must be a float32 (M, C, H, W) tensor, "
                             f"got {_describe_tensor(self.images)}")
        count, channels = self.images.shape[:2]
        self._check_labels(count)
        self._check_image_classes(count)
        self.mean = tuple(float(value) for value in self.mean)
        self.std = tuple(float(value) for value in self.std)
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean/std need {channels} values (one per channel), "
                             f"got {len(self.mean)}/{len(self.std)}")
        if isinstance(self.factor, bool) or not isinstance(self.factor, int) or self.factor < 1:
            raise ValueError(f"factor must be an int ≥ 1, got {self.factor!r}")
        self._check_lr()
        if self.zca_state is not None and not isinstance(self.zca_state, dict):
            raise TypeError(f"zca_state must be a dict or None, got {type(self.zca_state).__name__}")
        if not isinstance(self.meta, dict):
            raise TypeError(f"meta must be a dict, got {type(self.meta).__name__}")
        self.meta.setdefault("library_version", __version__)
        self.meta.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def _check_image_classes(self, count: int) -> None:
        classes = self.image_classes
        if classes is None:
            return
        if (not isinstance(classes, torch.Tensor) or classes.shape != (count,) or classes.is_floating_point()
                or classes.is_complex() or classes.dtype == torch.bool):
            raise ValueError(f"image_classes must be class indices ({count},) of an integer dtype, "
                             f"got {_describe_tensor(classes)}")
        _check_class_range("image_classes", classes, self.num_classes)
        self.image_classes = classes.long()

    def _check_labels(self, count: int) -> None:
        """Validate the labels and fill in `num_classes` and `classes` when not given."""
        labels = self.labels
        if not isinstance(labels, torch.Tensor):
            raise ValueError(f"labels must be a tensor, got {type(labels).__name__}")
        soft = labels.dim() == 2 and labels.is_floating_point()
        hard = labels.dim() == 1 and not labels.is_floating_point() and not labels.is_complex()
        if not (soft or hard) or labels.shape[0] != count:
            raise ValueError(f"labels must be hard class indices ({count},) of an integer dtype or soft "
                             f"labels ({count}, num_classes) of a float dtype, got {_describe_tensor(labels)}")
        if soft:
            given = self.num_classes if self.num_classes is not None else (
                len(self.classes) if self.classes is not None else labels.shape[1])
            if given != labels.shape[1]:
                raise ValueError(f"soft labels have {labels.shape[1]} columns but num_classes is {given}")
            self.num_classes = labels.shape[1]
        else:
            self.labels = labels = labels.long()
            if self.num_classes is None:
                self.num_classes = len(self.classes) if self.classes is not None else (
                    int(labels.max()) + 1 if count else 0)
            _check_class_range("hard labels", labels, self.num_classes)
        if self.classes is None:
            self.classes = [str(index) for index in range(self.num_classes)]
        self.classes = list(self.classes)
        if len(self.classes) != self.num_classes:
            raise ValueError(f"{len(self.classes)} class names given for {self.num_classes} classes")

    def _check_lr(self) -> None:
        if isinstance(self.lr, torch.Tensor):
            if self.lr.dim() != 0 or not self.lr.is_floating_point():
                raise ValueError("lr must be a float or a 0-dim float tensor, "
                                 f"got {_describe_tensor(self.lr)}")
        elif isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool):
            self.lr = float(self.lr)
        elif self.lr is not None:
            raise ValueError(f"lr must be a float, a 0-dim tensor or None, got {type(self.lr).__name__}")

    @classmethod
    def from_tensors(cls, images, labels, *, mean, std, num_classes=None, classes=None, lr=None,
                     factor=1, zca_state=None, zca=None, meta=None, image_classes=None) -> "SyntheticSet":
        """Build a set from float images already in network space and hard or soft labels.

        Images of another float dtype are cast to float32 (a float32 tensor is kept as is, so a
        leaf being optimised stays that leaf). uint8 pixels are refused: normalise them first.
        """
        images = torch.as_tensor(images)
        if not images.is_floating_point():
            raise ValueError(f"images must be float in network space, got {images.dtype}; "
                             "normalise raw pixels first (e.g. ImageDataset.normalized())")
        if images.dtype != torch.float32:
            images = images.float()
        return cls(images, torch.as_tensor(labels), mean, std, lr=lr, num_classes=num_classes,
                   classes=classes, factor=factor, zca_state=zca_state, meta=dict(meta or {}), zca=zca,
                   image_classes=None if image_classes is None else torch.as_tensor(image_classes))

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        kind = "soft" if self.is_soft else "hard"
        lr = None if self.lr is None else float(self.lr)
        return (f"SyntheticSet(images={tuple(self.images.shape)}, {kind} labels, "
                f"num_classes={self.num_classes}, ipc={self.ipc}, factor={self.factor}, lr={lr}, "
                f"device={self.images.device})")

    @property
    def is_soft(self) -> bool:
        return self.labels.dim() == 2

    @property
    def hard_labels(self) -> torch.Tensor:
        """Class indices (M,): `image_classes` when known, else the labels themselves, or the
        argmax of soft labels."""
        if self.image_classes is not None:
            return self.image_classes
        return self.labels.argmax(dim=1) if self.is_soft else self.labels

    def class_counts(self) -> torch.Tensor:
        """Stored images per class, (num_classes,)."""
        return torch.bincount(self.hard_labels.detach().cpu(), minlength=self.num_classes)

    @property
    def ipc(self) -> int:
        """Stored images per class (the largest class count when the classes are unequal)."""
        return int(self.class_counts().max()) if len(self) else 0

    def to(self, device) -> "SyntheticSet":
        lr = self.lr.to(device) if isinstance(self.lr, torch.Tensor) else self.lr
        image_classes = None if self.image_classes is None else self.image_classes.to(device)
        return replace(self, images=self.images.to(device), labels=self.labels.to(device), lr=lr,
                       image_classes=image_classes)

    def detach(self) -> "SyntheticSet":
        """The same set cut from the autograd graph (tensors shared, no copy)."""
        lr = self.lr.detach() if isinstance(self.lr, torch.Tensor) else self.lr
        return replace(self, images=self.images.detach(), labels=self.labels.detach(), lr=lr)

    def clone(self) -> "SyntheticSet":
        """An independent, detached copy: a snapshot that later optimisation steps do not touch."""
        detached = self.detach()
        lr = detached.lr.clone() if isinstance(detached.lr, torch.Tensor) else detached.lr
        image_classes = None if self.image_classes is None else self.image_classes.clone()
        return replace(detached, images=detached.images.clone(), labels=detached.labels.clone(),
                       image_classes=image_classes, lr=lr, classes=list(self.classes),
                       zca_state=copy.deepcopy(self.zca_state), meta=copy.deepcopy(self.meta))

    def materialize(self, classes: tuple | None = None) -> tuple:
        """(images, labels) the evaluation trains on, differentiable w.r.t. `images`.

        With factor f > 1 (IDC multi-formation) each stored image is cut into an f×f grid of
        tiles (padded at the bottom/right with mid-grey when the size is not divisible by f), each
        tile is upsampled bilinearly to full size, and its label repeated: stored image i yields
        outputs i·f² … i·f² + f² − 1, tiles in row-major order. With factor 1 they are returned as is.
        `classes=(first, end)` decodes only those classes' images, for a set stored class by class
        with the same count per class (as `distill` makes it).
        """
        images, labels = self.images, self.labels
        if classes is not None:
            first, end = classes
            if len(images) % self.num_classes or not 0 <= first < end <= self.num_classes:
                raise ValueError(f"classes={classes} needs a set of equal-sized classes stored in class order "
                                 f"and 0 ≤ first < end ≤ {self.num_classes}")
            per_class = len(images) // self.num_classes
            images, labels = images[first * per_class:end * per_class], labels[first * per_class:end * per_class]
        if self.factor == 1:
            return images, labels
        factor = self.factor
        count, channels, height, width = images.shape
        tile_height, tile_width = math.ceil(height / factor), math.ceil(width / factor)
        if (tile_height * factor, tile_width * factor) != (height, width):
            grey = torch.tensor([(0.5 - m) / s for m, s in zip(self.mean, self.std)],
                                dtype=images.dtype, device=images.device).view(1, channels, 1, 1)
            padded = grey.expand(count, channels, tile_height * factor, tile_width * factor).clone()
            padded[:, :, :height, :width] = images
            images = padded
        tiles = (images.reshape(count, channels, factor, tile_height, factor, tile_width)
                 .permute(0, 2, 4, 1, 3, 5)
                 .reshape(count * factor * factor, channels, tile_height, tile_width))
        decoded = F.interpolate(tiles, size=(height, width), mode="bilinear", align_corners=False)
        return decoded, labels.repeat_interleave(factor * factor, dim=0)

    def to_dict(self) -> dict:
        """The set as a versioned dict of CPU tensors and plain values (what `save` writes).

        A driver can embed it in a checkpoint; `from_dict` reads it back.
        """
        lr = self.lr.detach().cpu().clone() if isinstance(self.lr, torch.Tensor) else self.lr
        return {
            "format": SYNSET_KIND,
            "format_version": FORMAT_VERSION,
            "images": self.images.detach().cpu().clone(),
            "labels": self.labels.detach().cpu().clone(),
            "lr": lr,
            "num_classes": self.num_classes,
            "classes": _plain_copy(self.classes, "classes"),
            "mean": list(self.mean),
            "std": list(self.std),
            "factor": self.factor,
            "zca_state": _plain_copy(self.zca_state, "zca_state"),
            "meta": _plain_copy(self.meta, "meta"),
            "image_classes": None if self.image_classes is None else self.image_classes.detach().cpu().clone(),
        }

    @classmethod
    def from_dict(cls, content, source: str = "the given dict") -> "SyntheticSet":
        """Rebuild a set from `to_dict()` output; errors name `source` (the file it came from)."""
        check_format(content, SYNSET_KIND, FORMAT_VERSION, source)
        missing = [key for key in ("images", "labels", "mean", "std") if key not in content]
        if missing:
            raise ValueError(f"{source} is a synthetic-set file without {missing}: truncated or edited?")
        try:
            return cls(content["images"], content["labels"], content["mean"], content["std"],
                       lr=content.get("lr"), num_classes=content.get("num_classes"),
                       classes=content.get("classes"), factor=content.get("factor", 1),
                       zca_state=content.get("zca_state"), meta=dict(content.get("meta") or {}),
                       image_classes=content.get("image_classes", _distilled_image_classes(content)))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source} holds an invalid synthetic set: {error}") from error

    def save(self, path) -> str:
        """Write the set to one `.pt` file atomically. Returns the path."""
        return atomic_save(self.to_dict(), path)

    @classmethod
    def load(cls, path, map_location=None) -> "SyntheticSet":
        """Read a file written by `save`.

        FileNotFoundError when it is missing; ValueError naming the file when it is corrupt,
        truncated, not a condense-engine synthetic set, or from a newer format version.
        """
        return cls.from_dict(read_torch_file(path, map_location), source=os.fspath(path))

    def export_mtt(self, folder) -> str:
        """Write MTT/DATM's images_best.pt, labels_best.pt and lr_best.pt into `folder`.

        The images are the materialised ones (what MTT-style evaluators train on), in network
        space; lr_best.pt is a 0-dim tensor, and is removed rather than left stale when `lr` is None.
        Returns the folder.
        """
        folder = os.fspath(folder)
        images, labels = self.detach().materialize()
        atomic_save(images.cpu().clone(), os.path.join(folder, MTT_IMAGES))
        atomic_save(labels.cpu().clone(), os.path.join(folder, MTT_LABELS))
        lr_path = os.path.join(folder, MTT_LR)
        if self.lr is None:
            if os.path.exists(lr_path):
                os.remove(lr_path)
        else:
            atomic_save(torch.as_tensor(self.lr).detach().cpu().clone().float(), lr_path)
        return folder

    @classmethod
    def from_mtt(cls, folder, mean, std, *, num_classes=None, classes=None, meta=None,
                 map_location="cpu") -> "SyntheticSet":
        """Read MTT/DATM's images_best.pt, labels_best.pt and (when present) lr_best.pt.

        `mean`/`std` are the normalisation the images were stored in (0 and 1 with ZCA).
        """
        folder = os.fspath(folder)
        images_path, labels_path = os.path.join(folder, MTT_IMAGES), os.path.join(folder, MTT_LABELS)
        images = _read_tensor(images_path, map_location)
        labels = _read_tensor(labels_path, map_location)
        lr_path = os.path.join(folder, MTT_LR)
        lr = None
        if os.path.exists(lr_path):
            lr_value = read_torch_file(lr_path, map_location)
            if isinstance(lr_value, torch.Tensor) and lr_value.numel() == 1:
                lr = float(lr_value.item())
            elif isinstance(lr_value, (int, float)) and not isinstance(lr_value, bool):
                lr = float(lr_value)
            else:
                raise ValueError(f"{lr_path} should hold one number (the learned lr), got {lr_value!r:.80}")
        try:
            return cls.from_tensors(images, labels, mean=mean, std=std, num_classes=num_classes,
                                    classes=classes, lr=lr, meta=meta)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{folder} does not hold a valid MTT-style synthetic set: {error}") from error

    def save_grid(self, path, *, max_per_class=None, zca=None) -> str:
        """Save a PNG of the stored images: one row per class (in class order), one column per image.

        Images are mapped back to pixels: first through the inverse ZCA when there is one (the
        `zca` argument, else the set's `zca`, else its `zca_state`), then x·std + mean, clamped to
        [0, 1]. 1-channel sets are drawn grey, with 2 black pixels between and around cells. Soft
        labels are drawn under their argmax class. Returns `path`.
        """
        path = os.fspath(path)
        count, channels, height, width = self.images.shape
        if channels not in (1, 3):
            raise ValueError(f"save_grid draws 1- or 3-channel images, these have {channels}")
        columns = self.ipc if max_per_class is None else min(self.ipc, int(max_per_class))
        if count == 0 or columns < 1:
            raise ValueError("save_grid has nothing to draw: the set is empty or max_per_class < 1")
        pixels = self._display_pixels(zca if zca is not None else self.zca)
        labels = self.hard_labels.detach().cpu()
        step_y, step_x = height + GRID_PADDING, width + GRID_PADDING
        canvas = torch.zeros(channels, self.num_classes * step_y + GRID_PADDING,
                             columns * step_x + GRID_PADDING, dtype=torch.uint8)
        for class_index in range(self.num_classes):
            members = torch.nonzero(labels == class_index).flatten()[:columns]
            top = GRID_PADDING + class_index * step_y
            for column, member in enumerate(members.tolist()):
                left = GRID_PADDING + column * step_x
                canvas[:, top:top + height, left:left + width] = pixels[member]
        array = canvas[0].numpy() if channels == 1 else canvas.permute(1, 2, 0).contiguous().numpy()
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(array).save(path, format="PNG")
        return path

    def _display_pixels(self, zca) -> torch.Tensor:
        """uint8 (M, C, H, W) pixels for display: inverse ZCA, de-normalise, clamp, scale to 0–255."""
        images = self.images.detach()
        if zca is not None:
            images = zca.inverse(images).detach()  # on the images' device, where a fitted ZCA lives
        images = images.cpu()
        if zca is None and self.zca_state is not None:
            images = _inverse_zca(self.zca_state, images)
        shape = (1, -1, 1, 1)
        pixels = images * torch.tensor(self.std).view(shape) + torch.tensor(self.mean).view(shape)
        return (pixels.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def _inverse_zca(zca_state: dict, images: torch.Tensor) -> torch.Tensor:
    """Undo ZCA whitening with a {"mean", "inverse_matrix"} state: x_flat @ inverse_matrix + mean."""
    inverse_matrix = zca_state["inverse_matrix"].cpu().to(images.dtype)
    mean = zca_state["mean"].cpu().to(images.dtype)
    return (images.flatten(1) @ inverse_matrix + mean).view(images.shape)


def _read_tensor(path: str, map_location) -> torch.Tensor:
    value = read_torch_file(path, map_location)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{path} should hold a tensor, got a {type(value).__name__}")
    return value


def _plain_copy(value, where: str):
    """A CPU copy of `value` made only of tensors and plain values, so weights_only loading reads it."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, (list, tuple)):
        items = [_plain_copy(item, f"{where}[{index}]") for index, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} has a key {key!r} of type {type(key).__name__}; "
                                "only str and int keys can be saved")
        return {key: _plain_copy(item, f"{where}[{key!r}]") for key, item in value.items()}
    raise TypeError(f"{where} holds a {type(value).__name__}; only tensors, numbers, strings, None, "
                    "lists, tuples and dicts can be saved (so the file loads with weights_only=True)")


def _describe_tensor(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
