"""ClassSampler: the real data set resident on the device, sampled per class with one gather.

The images stay in their storage dtype (uint8 normally, so a CIFAR-10 train set costs 150 MB of
device memory); a padded (classes, max_count) index matrix maps (class, position) to a row.
Each draw picks n distinct positions per class uniformly at random (the distribution of the
published `randperm(count)[:n]`) for all requested classes at once, then one
`ops.gather_normalize` fetches and normalises the whole batch. With a CPU generator the positions
reach the device by a non-blocking copy, and the rows are in range by construction (so no bounds
check), hence a draw never makes the host wait for the device.

A class-sharded rank (`condense_engine.distributed`) keeps only its own classes' images
(`classes=(first, end)`): its device holds 1/world of the set, and its draws are still the
whole set's random stream, so every class gets the images it gets in one process.

`images_on="host"` streams instead, for a set larger than the device's memory: the images stay
where the data set has them and only each batch travels (`datasets.rows.RealImages`, which
serves the batches in both placements). The draws are the same as with the images on the device.
"""
from collections.abc import Sequence

import torch

from condense_engine.datasets.base import ImageDataset
from condense_engine.datasets.rows import RealImages, check_placement
from condense_engine.distributed import ClassShard
from condense_engine.ops.gather import host_to_device


class ClassSampler:
    """Class-balanced random batches of real images from `dataset`, kept on `device`.

    Randomness comes only from `generator` (or the one passed to a call; with neither, torch's
    global CPU generator). Positions are drawn on the generator's device, so a CPU generator with
    one seed gives the same batches whatever device the sampler keeps the images on.
    `classes=(first, end)` keeps only those classes' images (held); the others cannot be sampled.
    `images_on`: "device" copies the held images to `device`; "host" leaves them in the data set
    and moves each batch (see the module docstring).
    """

    def __init__(self, dataset: ImageDataset, device=None, generator: torch.Generator | None = None,
                 classes: tuple[int, int] | None = None, images_on: str = "device"):
        self.device = torch.device(device) if device is not None else dataset.images.device
        self.images_on = check_placement(images_on)
        storage = self.device if images_on == "device" else dataset.images.device
        self.num_classes = dataset.num_classes
        self.generator = generator
        labels = dataset.labels.cpu()
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        self.held = classes if classes is not None else (0, self.num_classes)
        first, end = self.held
        if not 0 <= first < end <= self.num_classes:
            raise ValueError(f"classes must be a range (first, end) with 0 ≤ first < end ≤ {self.num_classes}, "
                             f"got {classes!r}")
        self.classes = list(dataset.classes)
        self._counts = torch.bincount(labels, minlength=self.num_classes)
        order = torch.argsort(labels, stable=True)
        sorted_labels = labels[order]
        starts = torch.cumsum(self._counts, 0) - self._counts
        position = torch.arange(len(labels)) - starts[sorted_labels]
        # On the device, a shard stores just its classes' rows (in class order) and the index
        # points into that copy; streamed, the data set's images stay whole and it points into them.
        kept = (sorted_labels >= first) & (sorted_labels < end)
        rows = order[kept] if classes is not None else order
        compact = classes is not None and images_on == "device"
        self.store = RealImages(dataset, self.device, images_on, rows=rows if compact else None)
        # Width is the largest class of the whole set, so draws match the one-process stream.
        index = torch.full((self.num_classes, max(1, int(self._counts.max()))), -1, dtype=torch.int64)
        index[sorted_labels[kept], position[kept]] = torch.arange(len(rows)) if compact else rows
        self.index = index.to(storage)

    @property
    def counts(self) -> torch.Tensor:
        """Images per class (CPU int64, shape (classes,))."""
        return self._counts.clone()

    def _class_list(self, classes) -> torch.Tensor:
        if classes is None:
            self._check_held(0, self.num_classes - 1, "all classes")
            return torch.arange(self.num_classes)
        chosen = torch.as_tensor(classes if not isinstance(classes, int) else [classes]).reshape(-1)
        chosen = chosen.long().cpu()
        if len(chosen) and (int(chosen.min()) < 0 or int(chosen.max()) >= self.num_classes):
            raise ValueError(f"classes must lie in [0, {self.num_classes}), got {chosen.tolist()}")
        if len(chosen):
            self._check_held(int(chosen.min()), int(chosen.max()), chosen.tolist())
        return chosen

    def _check_held(self, lowest: int, highest: int, asked) -> None:
        """ValueError unless classes lowest..highest have their images here (`asked` names the request)."""
        first, end = self.held
        if lowest < first or highest >= end:
            raise ValueError(f"this sampler holds only classes {first}..{end - 1} (a class-sharded rank's share), "
                             f"asked for {asked}")

    def draw_indices(self, n_per_class: int, classes: Sequence[int] | torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Rows of `images` (len(classes)·n,), on its device: n distinct per class, class by class."""
        return self._draw_rows(n_per_class, self._class_list(classes), generator)

    def _draw_rows(self, n_per_class: int, chosen: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """draw_indices for an already checked CPU class list."""
        if n_per_class < 1:
            raise ValueError(f"n_per_class must be at least 1, got {n_per_class}")
        counts = self._counts[chosen]
        short = (counts < n_per_class).nonzero()
        if len(short):
            worst = int(chosen[short[0, 0]])
            raise ValueError(f"cannot draw {n_per_class} distinct images from class {worst} "
                             f"({self.classes[worst]!r}): it has only {int(self._counts[worst])}")
        generator = generator if generator is not None else self.generator
        draw_device = generator.device if generator is not None else torch.device("cpu")
        width = self.index.shape[1]
        keys = torch.rand(len(chosen), width, generator=generator, dtype=torch.float64,
                          device=draw_device)
        counts = host_to_device(counts, draw_device)
        padding = torch.arange(width, device=draw_device).unsqueeze(0) >= counts.unsqueeze(1)
        keys.masked_fill_(padding, 2.0)
        positions = keys.topk(n_per_class, dim=1, largest=False, sorted=True).indices
        storage = self.index.device
        rows = self.index[host_to_device(chosen, storage)].gather(1, host_to_device(positions, storage))
        return rows.reshape(-1)

    def sample(self, n_per_class: int, classes: Sequence[int] | torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels): n distinct images of each requested class, ordered class by class.

        Images are float32 in network space, shape (len(classes)·n, C, H, W), on the sampler
        device; every call draws afresh. Raises ValueError if a class has fewer than n images.
        """
        chosen = self._class_list(classes)
        return self._gather(self._draw_rows(n_per_class, chosen, generator), chosen, n_per_class)

    def sample_range(self, n_per_class: int, first: int, end: int,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """sample(n_per_class)'s images and labels of classes first..end-1 only: the draw is the
        one for all classes (the same random stream as sample), but only this range is gathered
        (a class-sharded rank's real batch)."""
        if not 0 <= first < end <= self.num_classes:
            raise ValueError(f"class range must satisfy 0 ≤ first < end ≤ {self.num_classes}, got {first}..{end}")
        self._check_held(first, end - 1, f"{first}..{end - 1}")
        chosen = torch.arange(self.num_classes)
        rows = self._draw_rows(n_per_class, chosen, generator)
        return self._gather(rows[first * n_per_class:end * n_per_class], chosen[first:end], n_per_class)

    def _gather(self, rows: torch.Tensor, chosen: torch.Tensor, n_per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 network-space images at `rows`, labels of the `chosen` classes × n each)."""
        labels = host_to_device(chosen, self.device).repeat_interleave(n_per_class)
        return self.store.normalized(rows, check_bounds=False), labels

    def sample_class(self, label: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n distinct float32 network-space images of class `label`."""
        return self.sample(n, [label], generator)[0]

    def sample_every_class(self, n_per_class: int, generator: torch.Generator | None = None,
                           shard: ClassShard | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """sample(n_per_class) of all classes, also on a class-sharded rank: each rank gathers the
        classes it holds and the ranks exchange the rest (a collective: every rank of `shard`
        calls it). The same images as one process's sample(n_per_class) on every rank."""
        if shard is None or not shard.sharded:
            return self.sample(n_per_class, None, generator)
        own, _ = self.sample_range(n_per_class, shard.first, shard.end, generator)
        images = own.new_zeros((self.num_classes * n_per_class, *own.shape[1:]))
        images[shard.first * n_per_class:shard.end * n_per_class] = own
        shard.gather_classes(images, n_per_class)
        return images, torch.arange(self.num_classes, device=self.device).repeat_interleave(n_per_class)

    def random_real(self, ipc: int, generator: torch.Generator | None = None, shard: ClassShard | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A class-balanced random real subset, `ipc` per class (synthetic-set init / baseline).

        Returns float32 images (classes·ipc, C, H, W) and their labels, class by class (on every
        rank of `shard`, see sample_every_class).
        """
        return self.sample_every_class(ipc, generator, shard)
