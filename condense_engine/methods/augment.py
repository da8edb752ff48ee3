"""Siamese DSA over a class-ordered batch: one shared transform per class, batched across classes.

DM, M3D and DC augment the real and the synthetic images of a class with the same seed, so both
get one identical transform while different classes get different ones. The transforms of all
classes are drawn together (`ops.dsa.siamese_draws`: one vectorised hash per random field), the
classes are ordered by the op group their seed picked, and each group is augmented in one call
(at most six calls in the published mode "S"). The host work is a fixed number of calls whatever
the number of classes, with one host→device copy of the parameters and no host sync.
"""
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from condense_engine.ops.dsa import FIELD_LAYOUT, GROUP_FIELDS, DSAParams, dsa, siamese_draws
from condense_engine.ops.gather import host_to_device

#: dtype of each field kind (FIELD_LAYOUT) when unpacked from the float32 parameter table.
_KIND_DTYPES = {"float": torch.float32, "int": torch.int64, "bool": torch.bool}


@dataclasses.dataclass(frozen=True)
class _ClassTable:
    """Every class's Siamese draws as one float32 (classes, columns) table on the device.

    Rows are the classes sorted (stably) by the op tuple their seed picked; `segments` lists
    (ops, first row, end row) per op tuple present. Columns hold each field's values (`columns`
    maps a field to its column range) and, last, the row's class index. float32 holds every value
    exactly: float fields are float32, the ints are image coordinates, flip is 0/1, and class
    indices stay below 2²⁴.
    """
    table: torch.Tensor
    columns: dict
    segments: list
    cutout_size: int

    def classes(self, first: int, end: int) -> torch.Tensor:
        """The class indices of rows first..end-1 (int64, on the device)."""
        return self.table[first:end, -1].long()

    def params(self, ops: tuple, first: int, end: int, per_class: int) -> DSAParams:
        """DSAParams for rows first..end-1, each row repeated for its `per_class` images."""
        fields = {}
        for group in ops:
            for name in GROUP_FIELDS[group]:
                start, stop = self.columns[name]
                per_sample, kind = FIELD_LAYOUT[name]
                value = self.table[first:end, start:stop].to(_KIND_DTYPES[kind])
                fields[name] = value.reshape(end - first, *per_sample).repeat_interleave(per_class, dim=0)
        return DSAParams(ops=ops, cutout_size=self.cutout_size if "cutout" in ops else None, **fields)


class SiameseDSA:
    """The Siamese DSA transforms of `seeds` under `strategy`, one per class (class c: seeds[c]).

    Called on a class-ordered batch ((len(seeds)·per_class, C, H, W)) it augments class c exactly
    as dsa(batch of class c, DSAParams.sample(per_class, strategy, size=(H, W), siamese=True,
    seed=seeds[c])) would, bit for bit, and stays differentiable w.r.t. the images. The draws and
    their device copy are made once per image size and device, so the real and the synthetic
    batch of an iteration share them.
    """

    def __init__(self, seeds, strategy: str):
        self.seeds = seeds
        self.strategy = strategy
        self.num_classes = len(seeds)
        self._tables: dict = {}

    def __call__(self, images: torch.Tensor, per_class: int) -> torch.Tensor:
        if images.shape[0] != self.num_classes * per_class:
            raise ValueError(f"expected {self.num_classes} classes × {per_class} images, got a batch of "
                             f"{images.shape[0]}")
        table = self._table(tuple(images.shape[2:]), images.device)
        if len(table.segments) == 1:  # one op tuple for all: the rows are in class order
            ops, first, end = table.segments[0]
            return dsa(images, table.params(ops, first, end, per_class))
        by_class = images.unflatten(0, (self.num_classes, per_class))
        out = torch.empty_like(by_class)
        for ops, first, end in table.segments:
            classes = table.classes(first, end)
            augmented = dsa(by_class.index_select(0, classes).flatten(0, 1),
                            table.params(ops, first, end, per_class))
            out.index_copy_(0, classes, augmented.unflatten(0, (end - first, per_class)))
        return out.flatten(0, 1)

    def _table(self, size: tuple, device: torch.device) -> _ClassTable:
        key = (size, device)
        if key not in self._tables:
            self._tables[key] = self._build_table(size, device)
        return self._tables[key]

    def _build_table(self, size: tuple, device: torch.device) -> _ClassTable:
        draws = siamese_draws(self.seeds, self.strategy, size=size)
        columns, pieces, width = {}, [], 0
        for name, value in draws.values.items():
            flat = value.reshape(self.num_classes, -1).to(torch.float32)
            columns[name] = (width, width + flat.shape[1])
            width += flat.shape[1]
            pieces.append(flat)
        pieces.append(torch.arange(self.num_classes, dtype=torch.float32).unsqueeze(1))
        order = torch.from_numpy(np.argsort(draws.choice, kind="stable"))
        table = host_to_device(torch.cat(pieces, 1).index_select(0, order), device)
        segments, first = [], 0
        for ops, count in zip(draws.choices, np.bincount(draws.choice, minlength=len(draws.choices)).tolist()):
            if count:
                segments.append((ops, first, first + count))
                first += count
        return _ClassTable(table=table, columns=columns, segments=segments, cutout_size=draws.cutout_size)


def siamese_dsa(images: torch.Tensor, per_class: int, seeds, strategy: str) -> torch.Tensor:
    """Augment class-ordered `images` ((len(seeds)·per_class, C, H, W)); class c uses seeds[c]."""
    return SiameseDSA(seeds, strategy)(images, per_class)


def matched_batches(sampler, synset, batch_real: int, strategy: str | None, generator: torch.Generator,
                    classes: tuple | None = None) -> tuple:
    """`batch_real` real images of every class and the synthetic images, both class-ordered,
    after one shared Siamese DSA transform per class (none when `strategy` is None).

    `classes=(first, end)` returns only those classes' images (a class-sharded rank's share),
    drawn from the same random stream as the whole batch, so each class gets the images and the
    transform it gets in the whole batch. Returns (real, syn, synthetic images per class); `syn`
    stays differentiable w.r.t. the set.
    """
    first, end = classes or (0, synset.num_classes)
    if classes is None:
        real, _ = sampler.sample(batch_real)
    else:
        real, _ = sampler.sample_range(batch_real, first, end)
    syn, _ = synset.materialize(classes)
    per_class = syn.shape[0] // (end - first)
    if strategy:
        seeds = torch.randint(0, 2**31 - 1, (synset.num_classes,), generator=generator)
        transform = SiameseDSA(seeds[first:end], strategy)
        real = transform(real, batch_real)
        syn = transform(syn, per_class)
    return real, syn, per_class



def cutmix(images: torch.Tensor, labels: torch.Tensor, beta: float, generator: torch.Generator) -> tuple:
    """CutMix (Yun et al. 2019) as IDC trains with it: a box of area ≈ (1 − λ), λ ~ Beta(β, β),
    cut from a shuffled copy of the batch is pasted at the same place into every image.

    Returns (mixed images, the pasted images' labels, the kept fraction λ recomputed from the
    clipped box); the loss is λ·CE(labels) + (1 − λ)·CE(pasted labels). Randomness comes from
    the CPU `generator` only.
    """
    height, width = images.shape[-2:]
    draws = np.random.default_rng(int(torch.randint(0, 2**62, (), generator=generator)))
    lam = float(draws.beta(beta, beta))
    cut = (1.0 - lam) ** 0.5
    box_h, box_w = int(height * cut), int(width * cut)
    center_y, center_x = int(draws.integers(height)), int(draws.integers(width))
    top, bottom = max(center_y - box_h // 2, 0), min(center_y + box_h // 2, height)
    left, right = max(center_x - box_w // 2, 0), min(center_x + box_w // 2, width)
    order = torch.randperm(len(images), generator=generator).to(images.device)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = images[order][..., top:bottom, left:right]
    kept = 1.0 - (bottom - top) * (right - left) / (height * width)
    return mixed, labels[order], kept


#: DC's evaluation-only augmentation (methods.md §1.5): its ops, crop padding, scale range,
#: rotation range (degrees, integers in [−45, 45)) and noise std.
DC_AUGMENT_OPS = ("crop", "scale", "rotate", "noise")
DC_CROP_PAD, DC_SCALE, DC_ROTATE, DC_NOISE_STD = 4, 0.2, 45, 0.001


def dc_augment_ops(strategy: str) -> tuple:
    """The ops of a DC augmentation strategy such as "crop_scale_rotate"; ValueError if it names
    anything else or none."""
    ops = tuple(strategy.split("_")) if isinstance(strategy, str) and strategy else ()
    if not ops or len(set(ops)) != len(ops) or not set(ops) <= set(DC_AUGMENT_OPS):
        raise ValueError(f"a DC augmentation strategy joins distinct ops of {DC_AUGMENT_OPS} with '_', "
                         f"got {strategy!r}")
    return ops


def dc_eval_strategy(dataset_name: str, model: str = "ConvNet") -> str | None:
    """The DC augmentation DC's evaluation used (methods.md §1.5): "crop_noise" for ConvNetBN,
    "crop_scale_rotate" on MNIST (and its subsets, such as the embedded "mnist-default"), none
    elsewhere."""
    if model.lower() == "convnetbn":
        return "crop_noise"
    return "crop_scale_rotate" if dataset_name.lower().startswith("mnist") else None


def dc_augment_draws(count: int, ops: tuple, generator: torch.Generator) -> dict:
    """dc_augment's draws for `count` images, from the CPU `generator`, the same number per image
    whatever op it gets: "op" (index into `ops`), "shift" (crop, (x, y) pixels in
    [−DC_CROP_PAD, DC_CROP_PAD − 1]), "zoom" (scale, (x, y) factors) and "angle" (rotate, degrees)."""
    return dict(op=torch.randint(len(ops), (count,), generator=generator),
                shift=torch.randint(-DC_CROP_PAD, DC_CROP_PAD, (count, 2), generator=generator),
                zoom=1 + DC_SCALE * (2 * torch.rand(count, 2, generator=generator, dtype=torch.float64) - 1),
                angle=torch.randint(-DC_ROTATE, DC_ROTATE, (count,), generator=generator))


def _shift_and_zoom_sources(draws: dict, is_crop: torch.Tensor, height: int, width: int) -> list:
    """For images that crop (`is_crop`) or scale: per image, the source row of every output row,
    (N, H), and the source column of every output column, (N, W), each with whether it lies inside
    the image. A crop shifts by draws["shift"]. A scale resizes each side to ⌊zoom · size⌋ pixels
    by nearest neighbour (source ⌊i · size / new⌋, as F.interpolate picks), centres the result on a
    square canvas as large as the largest side, and keeps the canvas's centre height × width."""
    new = (draws["zoom"] * torch.tensor([width, height])).floor().long().clamp(min=1)  # (N, 2): new width, height
    canvas = new.amax(1).clamp(min=max(height, width))
    sources = []
    for axis, size in ((1, height), (0, width)):
        index = torch.arange(size)
        resized = index + ((canvas - size) // 2 - (canvas - new[:, axis]) // 2)[:, None]
        zoomed = (resized.float() * (size / new[:, axis, None].float())).floor().long()
        shifted = index + draws["shift"][:, axis, None]
        source = torch.where(is_crop[:, None], shifted, zoomed)
        inside = torch.where(is_crop[:, None], (shifted >= 0) & (shifted < size),
                             (resized >= 0) & (resized < new[:, axis, None]))
        sources.append((source.clamp(0, size - 1), inside))
    return sources


def dc_augment(images: torch.Tensor, strategy: str, generator: torch.Generator) -> torch.Tensor:
    """DC's non-differentiable evaluation augmentation: each image of the (N, C, H, W) batch gets
    one op of `strategy`, drawn at random (methods.md §1.5), as DC's code applies it.

    crop shifts the image by −DC_CROP_PAD … DC_CROP_PAD − 1 pixels each way, filling with the
    batch's channel means; scale resizes each side by a factor in [1 − DC_SCALE, 1 + DC_SCALE]
    (nearest neighbour) and keeps the centre, filling with 0 (the data set's mean once
    normalised); rotate turns the image about its centre by an integer angle in
    [−DC_ROTATE, DC_ROTATE) degrees, filling with the mean of the channel means, bilinearly where
    DC used scipy's cubic spline; noise adds N(0, DC_NOISE_STD²). The draws (dc_augment_draws,
    then the noise) come from the CPU `generator`, so they do not depend on the device.
    """
    return dc_augment_each(images[None], strategy, [generator])[0]


def dc_augment_each(batches: torch.Tensor, strategy: str, generators: list[torch.Generator]) -> torch.Tensor:
    """dc_augment on each (B, C, H, W) slice of the (R, B, C, H, W) `batches` in one pass: slice r
    with draws from generators[r], drawn as dc_augment draws them, and fills from its own channel
    means. The evaluation's batched models use it, one slice per model, instead of R calls."""
    ops = dc_augment_ops(strategy)
    repeats, count, _, height, width = batches.shape
    device = batches.device
    drawn, noises = [], []
    for generator in generators:
        drawn.append(dc_augment_draws(count, ops, generator))
        if "noise" in ops:
            noises.append(DC_NOISE_STD * torch.randn(batches.shape[1:], generator=generator))
    draws = {key: torch.cat([part[key] for part in drawn]) for key in drawn[0]}
    images = batches.flatten(0, 1)
    channel_mean = batches.mean(dim=(1, 3, 4)).repeat_interleave(count, 0)  # (R·B, C): each image's slice's
    picked = {name: draws["op"] == ops.index(name) if name in ops else torch.zeros(len(images), dtype=torch.bool)
              for name in DC_AUGMENT_OPS}
    out = images.clone()
    moved = picked["crop"] | picked["scale"]
    if moved.any():
        where = moved.nonzero().squeeze(1)
        is_crop = picked["crop"][where]
        (rows, rows_inside), (cols, cols_inside) = _shift_and_zoom_sources(
            {key: value[where] for key, value in draws.items()}, is_crop, height, width)
        rows, cols, is_crop = rows.to(device), cols.to(device), is_crop.to(device)
        where = where.to(device)
        gathered = images[where[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (n, H, W, C)
        inside = (rows_inside[:, :, None] & cols_inside[:, None, :]).to(device)[..., None]
        fill = torch.where(is_crop[:, None], channel_mean[where], 0.0)[:, None, None, :]
        out[where] = torch.where(inside, gathered, fill).permute(0, 3, 1, 2)
    if picked["rotate"].any():
        where = picked["rotate"].nonzero().squeeze(1)
        radians = torch.deg2rad(draws["angle"][where].float())
        cos, sin, zero = radians.cos(), radians.sin(), torch.zeros(len(where))
        # The map from output to input pixels in grid_sample's [-1, 1] coordinates.
        theta = torch.stack([torch.stack([cos, -sin * height / width, zero], 1),
                             torch.stack([sin * width / height, cos, zero], 1)], 1)
        where = where.to(device)
        fill = channel_mean[where].mean(1)[:, None, None, None]
        grid = F.affine_grid(theta.to(images), (len(where), *images.shape[1:]), align_corners=False)
        out[where] = F.grid_sample(images[where] - fill, grid, mode="bilinear", padding_mode="zeros",
                                   align_corners=False) + fill
    if noises:
        chosen = picked["noise"].to(device)
        out[chosen] += torch.cat(noises).to(images)[chosen]
    return out.view(batches.shape)
