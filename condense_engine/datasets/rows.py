"""RealImages: a data set's images by row, served as float32 network-space batches on a device.

One interface, two placements, so every reader of real images streams the same way:
- `images_on="device"` copies the stored images (uint8 normally, so CIFAR-10 costs 150 MB) to
  the device once; a batch is one `ops.gather_normalize` there.
- `images_on="host"` leaves them where the data set has them (for a decode-cached set, a map of
  the cache file, so not even the host must hold it all). A batch gathers its rows there into
  pinned memory and only the batch travels, in its stored dtype; this is for a set larger than
  the device's memory.
Both give the same batches. The ClassSampler's draws, expert training and DQ's embedding
network read through it.
"""
import torch

from condense_engine.datasets.base import ImageDataset
from condense_engine.ops.gather import gather_normalize, host_to_device

PLACEMENTS = ("device", "host")


def check_placement(images_on: str) -> str:
    if images_on not in PLACEMENTS:
        raise ValueError(f"images_on must be 'device' or 'host', got {images_on!r}")
    return images_on


class RealImages:
    """The images (and labels) of `dataset`, or of its `rows` only, served on `device`.

    Labels are small and always live on `device`. `images` is the stored tensor: a copy on the
    device, or the data set's own tensor (or its `rows`) when streamed from the host.
    """

    def __init__(self, dataset: ImageDataset, device=None, images_on: str = "device",
                 rows: torch.Tensor | None = None):
        self.images_on = check_placement(images_on)
        if dataset.images.dtype not in (torch.uint8, torch.float32):
            raise ValueError(f"images must be uint8 (raw pixels) or float32 (network space), "
                             f"got {dataset.images.dtype}")
        self.device = torch.device(device) if device is not None else dataset.images.device
        images, labels = dataset.images, dataset.labels
        if rows is not None:
            images = images.index_select(0, rows.to(images.device))
            labels = labels.index_select(0, rows.to(labels.device))
        self.images = images.to(self.device) if images_on == "device" else images
        self.labels = labels.to(self.device)
        self.mean = torch.tensor(dataset.mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(dataset.std, dtype=torch.float32, device=self.device)

    def __len__(self) -> int:
        return self.images.shape[0]

    def normalized(self, rows: torch.Tensor, check_bounds: bool = True) -> torch.Tensor:
        """Float32 network-space images at `rows` (int64 (B,)), on the device.

        Rows on the CPU are bounds-checked (ValueError) unless `check_bounds` is False (rows in
        range by construction, as the ClassSampler's); rows already on an accelerator never are,
        since reading them back would make the host wait. Streamed images want CPU rows (device
        rows are copied back first).
        """
        if (check_bounds and rows.device.type == "cpu" and rows.numel()
                and (int(rows.min()) < 0 or int(rows.max()) >= len(self))):
            raise ValueError(f"rows must lie in [0, {len(self)}), got [{int(rows.min())}, {int(rows.max())}]")
        if self.images_on == "host":
            batch = self._fetch(rows.cpu())
            if batch.dtype != torch.uint8:
                return batch
            every = torch.arange(len(batch), device=self.device)
            return gather_normalize(batch, every, self.mean, self.std, check_bounds=False)
        rows = host_to_device(rows, self.device)
        if self.images.dtype == torch.uint8:
            return gather_normalize(self.images, rows, self.mean, self.std, check_bounds=False)
        return self.images.index_select(0, rows)

    def labels_at(self, rows: torch.Tensor) -> torch.Tensor:
        """The int64 labels at `rows`, on the device."""
        return self.labels[host_to_device(rows, self.device)]

    def _fetch(self, rows: torch.Tensor) -> torch.Tensor:
        """The stored images at CPU `rows`, gathered where they are and moved to the device (to a
        GPU from pinned memory, without making the host wait)."""
        if self.images.device.type == "cpu" and self.device.type == "cuda":
            batch = torch.empty((len(rows), *self.images.shape[1:]), dtype=self.images.dtype, pin_memory=True)
            return torch.index_select(self.images, 0, rows, out=batch).to(self.device, non_blocking=True)
        return self.images.index_select(0, rows.to(self.images.device)).to(self.device)
