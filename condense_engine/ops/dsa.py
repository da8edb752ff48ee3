"""ops.dsa and DSAParams: differentiable Siamese augmentation (SPEC §3, methods.md §1.4).

`DSAParams` holds every random choice of one augmentation call as per-sample tensors, so the
same transform can be applied to several batches (the real and the synthetic images of a class)
and so the fused kernels get their parameters as plain tensors. With a `seed`, sampling is
counter-based: each value is a hash of (seed, field, sample index), hence identical on every
device and independent of the batch size for the first samples. `siamese_draws` gives the Siamese
draws of many seeds (one per class) at once, bit-identical to one `DSAParams.sample` per seed.
"""
import dataclasses
import functools
import math

import numpy as np
import torch

from condense_engine.ops._backend import choose
from condense_engine.ops.gather import host_to_device
from condense_engine.reference import dsa as reference

#: The op groups in the only order they may be applied.
GROUPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
#: The per-sample tensor fields each group reads.
GROUP_FIELDS = {
    "color": ("brightness", "saturation", "contrast"),
    "crop": ("translate",),
    "cutout": ("cutout_center",),
    "flip": ("flip",),
    "scale": ("scale",),
    "rotate": ("rotate",),
}
#: Per-sample shape after n, and dtype kind ("float", "int" or "bool") of every tensor field.
FIELD_LAYOUT = {
    "brightness": ((), "float"),
    "saturation": ((), "float"),
    "contrast": ((), "float"),
    "translate": ((2,), "int"),
    "cutout_center": ((2,), "int"),
    "flip": ((), "bool"),
    "scale": ((2,), "float"),
    "rotate": ((), "float"),
}
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
DIGITS_STRATEGY = "color_crop_cutout_scale_rotate"

# The published sampling ratios (methods.md §1.4).
BRIGHTNESS_RATIO = 1.0
SATURATION_RATIO = 2.0
CONTRAST_RATIO = 0.5
TRANSLATE_RATIO = 0.125
CUTOUT_RATIO = 0.5
FLIP_PROBABILITY = 0.5
SCALE_RATIO = 1.2
MAX_ROTATION = 15.0 / 180.0 * math.pi

# Stream numbers of the counter-based sampler: one per random field, never reused.
_STREAMS = {"group": 0, "brightness": 1, "saturation": 2, "contrast": 3, "translate": 4,
            "cutout_center": 5, "flip": 6, "scale": 7, "rotate": 8}


def default_strategy(dataset_name: str) -> str:
    """The DC README's strategy for a data set: no flip for digits (MNIST and its subsets, SVHN)."""
    name = dataset_name.lower().replace("-", "").replace("_", "")
    return DIGITS_STRATEGY if name.startswith(("mnist", "svhn")) else DEFAULT_STRATEGY


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64 arrays (wrapping arithmetic)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def counter_uniform(seed: int, stream: int, rows: int, cols: int) -> torch.Tensor:
    """(rows, cols) float64 in [0, 1); entry (i, k) hashes only (seed, stream, i·cols + k)."""
    key = np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)
    return counter_uniform_seeds(key, stream, rows, cols)[0]


def counter_uniform_seeds(seeds, stream: int, rows: int, cols: int) -> torch.Tensor:
    """`counter_uniform` for many seeds in one vectorised numpy pass: (len(seeds), rows, cols),
    entry s equal to counter_uniform(seeds[s], stream, rows, cols).

    `seeds` is 1-D integers that fit in 64 bits (a list, a numpy array or a CPU tensor); negative
    ones wrap modulo 2⁶⁴ as in counter_uniform.
    """
    keys = np.asarray(seeds).reshape(-1)
    if keys.dtype.kind not in "iu":
        raise TypeError(f"seeds must be 64-bit integers, got dtype {keys.dtype}")
    with np.errstate(over="ignore"):
        key = _splitmix64(keys.astype(np.uint64))
        key = _splitmix64(key ^ np.uint64(stream))
        counters = _splitmix64(np.arange(rows * cols, dtype=np.uint64))
        bits = _splitmix64(key[:, None] ^ counters[None, :])
    uniform = (bits >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)
    return torch.from_numpy(uniform.reshape(len(keys), rows, cols))


def _check_groups(groups) -> None:
    """ValueError unless `groups` is a tuple of known group names in canonical order."""
    if not isinstance(groups, (tuple, list)) or not all(isinstance(g, str) for g in groups):
        raise ValueError(f"DSAParams.ops must be a tuple of group names, got {groups!r}")
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"DSAParams.ops has unknown groups {unknown}; known: {GROUPS}")
    positions = [GROUPS.index(g) for g in groups]
    if any(a >= b for a, b in zip(positions, positions[1:])):
        raise ValueError(f"DSAParams.ops must list each group once in the order {GROUPS}, "
                         f"got {tuple(groups)}")


@dataclasses.dataclass
class DSAParams:
    """Every random choice of one DSA call, as per-sample tensors (SPEC §3 lists the fields).

    Fields of groups not in `ops` may stay None. `cutout_size` None means the published side
    int(0.5·H + 0.5) of the image it is applied to.
    """
    ops: tuple
    brightness: torch.Tensor | None = None
    saturation: torch.Tensor | None = None
    contrast: torch.Tensor | None = None
    translate: torch.Tensor | None = None
    cutout_center: torch.Tensor | None = None
    cutout_size: int | None = None
    flip: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    rotate: torch.Tensor | None = None
    align_corners: bool = True

    def tensors(self) -> dict:
        """The tensor fields that are set, by name."""
        return {name: getattr(self, name) for name in FIELD_LAYOUT
                if getattr(self, name) is not None}

    @property
    def device(self) -> torch.device | None:
        """Device of the tensors (None when no tensor is set)."""
        tensors = self.tensors()
        return next(iter(tensors.values())).device if tensors else None

    def to(self, device) -> "DSAParams":
        """A copy with every tensor on `device`."""
        moved = {name: value.to(device) for name, value in self.tensors().items()}
        return dataclasses.replace(self, **moved)

    def select(self, index: torch.Tensor) -> "DSAParams":
        """The parameters of the samples at `index` only (a rank's share of a batch drawn whole)."""
        return dataclasses.replace(self, **{name: value[index] for name, value in self.tensors().items()})

    def resolved_cutout_size(self, height: int) -> int:
        """The cutout side for images of `height` rows."""
        if self.cutout_size is not None:
            return self.cutout_size
        return int(CUTOUT_RATIO * height + 0.5)

    def validate(self, n: int, size=None) -> None:
        """Raise ValueError naming the field when this does not fit a batch of `n` images of
        `size` (H, W): unknown or out-of-order groups, missing fields, wrong shapes or dtypes,
        tensors on different devices."""
        _check_groups(self.ops)
        for group in self.ops:
            for name in GROUP_FIELDS[group]:
                if getattr(self, name) is None:
                    raise ValueError(f"DSAParams.{name} is needed by group {group!r} but is None")
        for name, value in self.tensors().items():
            self._check_tensor(name, value, n)
        devices = {value.device for value in self.tensors().values()}
        if len(devices) > 1:
            raise ValueError(f"DSAParams tensors are on several devices: "
                             f"{sorted(map(str, devices))}")
        if not isinstance(self.align_corners, bool):
            raise ValueError(f"DSAParams.align_corners must be a bool, got {self.align_corners!r}")
        self._check_cutout_size(size)

    @staticmethod
    def _check_tensor(name: str, value, n: int) -> None:
        per_sample, kind = FIELD_LAYOUT[name]
        expected = (n, *per_sample)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"DSAParams.{name} must be a tensor of shape {expected}, "
                             f"got {type(value).__name__}")
        dtype_ok = {"float": value.is_floating_point(),
                    "int": value.dtype in (torch.int64, torch.int32, torch.int16, torch.int8,
                                           torch.uint8),
                    "bool": value.dtype == torch.bool}[kind]
        if not dtype_ok or tuple(value.shape) != expected:
            raise ValueError(f"DSAParams.{name} must be a {kind} tensor of shape {expected}, "
                             f"got {value.dtype} of shape {tuple(value.shape)}")

    def _check_cutout_size(self, size) -> None:
        side = self.cutout_size
        if side is not None and (isinstance(side, bool) or not isinstance(side, int) or side < 0):
            raise ValueError(f"DSAParams.cutout_size must be a non-negative int or None, "
                             f"got {side!r}")
        if size is None:
            return
        height, width = (int(v) for v in size)
        if height < 1 or width < 1:
            raise ValueError(f"size must be two positive ints (H, W), got {tuple(size)}")
        if side is not None and side > max(height, width):
            raise ValueError(f"DSAParams.cutout_size {side} is larger than the image "
                             f"({height}x{width})")

    @classmethod
    def sample(cls, n: int, strategy: str = DEFAULT_STRATEGY, *, size=(32, 32), mode: str = "S",
               siamese: bool = True, seed: int | None = None,
               generator: torch.Generator | None = None, device=None) -> "DSAParams":
        """Draw the parameters of one call with the published distributions.

        `strategy` lists groups joined by "_" in canonical order ("none" or "" for no group,
        as in the published code). Mode "S" keeps one group,
        chosen uniformly (shared by the batch); "M" keeps all. `siamese` gives every sample
        sample 0's values. Randomness: counter-based from `seed` when given, else `generator`,
        else the global torch RNG. `size` (H, W) sets the translation range and cutout square;
        cutout centres cover 0..H (0..H-1 when the side is odd), as in the published code.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        _check_mode(mode)
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both")
        height, width = _check_size(size)
        groups = _strategy_groups(strategy)

        def uniform(stream: str, rows: int, cols: int) -> torch.Tensor:
            if seed is not None:
                return counter_uniform(seed, _STREAMS[stream], rows, cols)
            if generator is not None:
                return torch.rand(rows, cols, dtype=torch.float64, generator=generator,
                                  device=generator.device).cpu()
            return torch.rand(rows, cols, dtype=torch.float64)

        if mode == "S" and len(groups) > 1:
            groups = (groups[int(uniform("group", 1, 1).item() * len(groups))],)
        rows = 1 if siamese else n
        values = {}
        for group in groups:
            for name in GROUP_FIELDS[group]:
                per_sample = FIELD_LAYOUT[name][0]
                value = _draw_field(name, uniform(name, rows, _field_columns(name)), height, width)
                values[name] = host_to_device(value.expand(n, *per_sample).contiguous(), device)
        return cls(ops=groups, cutout_size=_cutout_side(height) if "cutout" in groups else None,
                   **values)


def _check_mode(mode) -> None:
    if mode not in ("S", "M"):
        raise ValueError(f"mode must be 'S' or 'M', got {mode!r}")


def _check_size(size) -> tuple:
    """(H, W) as ints; ValueError unless both are positive."""
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise ValueError(f"size must be two positive ints (H, W), got {tuple(size)}")
    return height, width


def _strategy_groups(strategy: str) -> tuple:
    """The checked op groups a strategy string lists ("none" and "" name no group)."""
    groups = tuple(g for g in strategy.split("_") if g and g.lower() != "none")
    _check_groups(groups)
    return groups


def _cutout_side(height: int) -> int:
    return int(CUTOUT_RATIO * height + 0.5)


def _field_columns(name: str) -> int:
    """Uniform draws per sample of a field."""
    per_sample = FIELD_LAYOUT[name][0]
    return per_sample[0] if per_sample else 1


def _draw_field(name: str, u: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Field `name` from its (rows, columns) float64 uniforms for H×W images, with the published
    distribution: shape (rows, *per-sample shape), dtype float32, int64 or bool by its kind."""
    side = _cutout_side(height)
    radius = int(TRANSLATE_RATIO * height + 0.5)
    draws = {
        "brightness": lambda: (u - 0.5) * BRIGHTNESS_RATIO,
        "saturation": lambda: u * SATURATION_RATIO,
        "contrast": lambda: u + CONTRAST_RATIO,
        "translate": lambda: torch.floor(u * (2 * radius + 1)).long() - radius,
        # Centre in 0..H (H + 1 values) for an even side, 0..H-1 for an odd one, as published.
        "cutout_center": lambda: torch.floor(
            u * torch.tensor([height + 1 - side % 2, width + 1 - side % 2])).long(),
        "flip": lambda: u < FLIP_PROBABILITY,
        "scale": lambda: u * (SCALE_RATIO - 1.0 / SCALE_RATIO) + 1.0 / SCALE_RATIO,
        "rotate": lambda: (u - 0.5) * 2.0 * MAX_ROTATION,
    }
    per_sample, kind = FIELD_LAYOUT[name]
    value = draws[name]().reshape(len(u), *per_sample)
    return value.float() if kind == "float" else value


@dataclasses.dataclass(frozen=True)
class SiameseDraws:
    """The Siamese draws of many seeds, one row per seed (see `siamese_draws`).

    `choices` are the op tuples a seed can get and `choice[s]` (numpy int64) indexes seed s's;
    `values[name]` is (seeds, *per-sample shape) for every field of every group of the strategy
    (a field that seed's ops do not use is drawn but unused); `cutout_size` is the side of the
    cutout square for the size drawn for.
    """
    choices: tuple
    choice: np.ndarray
    values: dict
    cutout_size: int


def siamese_draws(seeds, strategy: str = DEFAULT_STRATEGY, *, size=(32, 32),
                  mode: str = "S") -> SiameseDraws:
    """For every seed at once, what DSAParams.sample(n, strategy, size=size, mode=mode,
    siamese=True, seed=seed) draws: its op groups and the one row of values all n samples share.

    Bit-identical to the per-seed calls (the same hashes, formulas and dtypes), but one vectorised
    pass per random field whatever the number of seeds. Values stay on the CPU.
    """
    _check_mode(mode)
    height, width = _check_size(size)
    groups = _strategy_groups(strategy)
    count = len(np.asarray(seeds).reshape(-1))
    if mode == "S" and len(groups) > 1:
        choices = tuple((group,) for group in groups)
        # float64 × int then truncation: what int(u.item() * len(groups)) does per seed.
        picked = counter_uniform_seeds(seeds, _STREAMS["group"], 1, 1).numpy().reshape(-1)
        choice = (picked * len(groups)).astype(np.int64)
    else:
        choices = (groups,)
        choice = np.zeros(count, dtype=np.int64)
    values = {}
    for group in groups:
        for name in GROUP_FIELDS[group]:
            uniforms = counter_uniform_seeds(seeds, _STREAMS[name], 1, _field_columns(name))
            values[name] = _draw_field(name, uniforms[:, 0], height, width)
    return SiameseDraws(choices=choices, choice=choice, values=values,
                        cutout_size=_cutout_side(height))


def dsa(x: torch.Tensor, params: DSAParams, *, backend: str | None = None) -> torch.Tensor:
    """Apply the DSA groups `params.ops` to the (n, C, H, W) float batch `x`, in order.

    Differentiable w.r.t. `x`. Params on another device are moved to `x`'s device.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        dtype = x.dtype if isinstance(x, torch.Tensor) else ""
        raise ValueError(f"x must be a floating (n, C, H, W) tensor, got {dtype} {shape}")
    if not isinstance(params, DSAParams):
        raise ValueError(f"params must be a DSAParams, got {type(params).__name__}")
    params.validate(x.shape[0], x.shape[2:])
    if params.device is not None and params.device != x.device:
        params = params.to(x.device)
    supported = ("torch",)
    if x.device.type in NATIVE_DEVICES:
        supported += ("native",)
    if x.dtype in TRITON_DTYPES:
        supported += ("triton",)
    chosen = choose("dsa", backend, x.device, supported)
    if chosen == "native":
        return native_dsa(x, params)
    if chosen == "triton":
        return triton_dsa(x, params)
    return reference.dsa(x, params)


#: Input dtypes of the Triton kernels (fp32 maths); float64 stays with native or torch.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_dsa(x: torch.Tensor, params: DSAParams) -> torch.Tensor:
    """kernels/augment.py's fused chain with autograd (imported only here, so triton stays
    optional); no input checks."""
    from condense_engine.kernels import augment

    return augment.dsa(x, *native_arguments(params, x))


#: Device types whose native kernels have passed tests/test_dsa.py. The CUDA kernels build, but
#: have not yet run on a GPU; add "cuda" once test_native_matches_reference passes there.
NATIVE_DEVICES = ("cpu",)


def native_dsa(x: torch.Tensor, params: DSAParams) -> torch.Tensor:
    """torch.ops.condense.dsa with autograd, on any device with a kernel; no input checks."""
    register_native_autograd()
    return torch.ops.condense.dsa(x, *native_arguments(params, x))


#: Bit of each group in the native ops' `groups` mask.
GROUP_BITS = {group: 1 << position for position, group in enumerate(GROUPS)}


def native_arguments(params: DSAParams, x: torch.Tensor) -> tuple:
    """`params` packed as torch.ops.condense.dsa expects them after `x` (see csrc/ops/dsa.cpp):
    color (n, 3), affine (n, 4), shifts (n, 5), groups mask, cutout side, align_corners.
    Unlisted groups get identity values; floats are float64 for double `x`, else float32."""
    n = x.shape[0]
    float_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32

    def floats(value, identity, width=1):
        if value is None:
            return torch.full((n, width), identity, dtype=float_dtype, device=x.device)
        return value.to(float_dtype).reshape(n, width)

    def ints(value, width):
        if value is None:
            return torch.zeros(n, width, dtype=torch.int64, device=x.device)
        return value.to(torch.int64).reshape(n, width)

    angle = floats(params.rotate, 0.0)
    color = torch.cat([floats(params.brightness, 0.0), floats(params.saturation, 1.0),
                       floats(params.contrast, 1.0)], 1)
    affine = torch.cat([floats(params.scale, 1.0, 2), torch.cos(angle), torch.sin(angle)], 1)
    shifts = torch.cat([ints(params.translate, 2), ints(params.cutout_center, 2),
                        ints(params.flip, 1)], 1)
    groups = sum(GROUP_BITS[group] for group in params.ops)
    return (color.contiguous(), affine.contiguous(), shifts.contiguous(), groups,
            params.resolved_cutout_size(x.shape[2]), params.align_corners)


@functools.cache
def register_native_autograd() -> None:
    """Make torch.ops.condense.dsa differentiable (twice): its backward is dsa_backward, whose
    own adjoint is dsa with zero brightness (the chain is affine in x). Also registers the
    shape functions torch.compile needs."""
    def save_parameters(ctx, inputs, output):
        _, color, affine, shifts, *settings = inputs
        ctx.save_for_backward(color, affine, shifts)
        ctx.settings = settings

    def dsa_grad(ctx, grad_out):
        color, affine, shifts = ctx.saved_tensors
        grad_in = torch.ops.condense.dsa_backward(grad_out, color, affine, shifts, *ctx.settings)
        return (grad_in,) + (None,) * 6

    def dsa_backward_grad(ctx, grad_grad_in):
        color, affine, shifts = ctx.saved_tensors
        linear_color = color.clone()
        linear_color[:, 0] = 0
        grad = torch.ops.condense.dsa(grad_grad_in, linear_color, affine, shifts, *ctx.settings)
        return (grad,) + (None,) * 6

    for name, grad in (("condense::dsa", dsa_grad), ("condense::dsa_backward", dsa_backward_grad)):
        torch.library.register_fake(name)(lambda x, *rest: torch.empty_like(x))
        torch.library.register_autograd(name, grad, setup_context=save_parameters)
