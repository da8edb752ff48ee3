"""The method interface every condensation method implements, and the method registry.

A method is a small class: it declares its option defaults (and per data set / IPC overrides)
as data, `init()` prepares whatever it needs from the real data, and `step()` performs one
distillation iteration on the synthetic set. `condense_engine.distill` owns the loop around it:
progress, logging, evaluation, checkpoints, resume and the non-finite guard.
"""
import math
import numbers
import warnings

import torch

from condense_engine.models import get_model

_REGISTRY: dict = {}


def register(*names):
    """Class decorator: make a method available to `distill(method=name)` under `names`."""
    def wrap(cls):
        for name in names:
            _REGISTRY[name] = cls
        cls.name = names[0]
        return cls
    return wrap


def get_method(name: str):
    """The method class registered as `name` (case-insensitive)."""
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def method_names() -> list:
    return sorted(_REGISTRY)


def _dataset_key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


#: Options that count something (images per batch, networks, steps, epochs, bins, ...): at least 1.
COUNT_OPTIONS = frozenset({
    "batch_real", "batch_train", "batch_syn", "batch_syn_max", "batch_net", "embed_batch", "class_chunk",
    "nets", "model_steps", "syn_steps", "inner_steps", "outer_loop", "distill_steps", "distill_epochs",
    "expert_epochs", "max_start_epoch", "current_max_start_epoch", "expansion_end_epoch", "decay_every",
    "real_per_epoch", "bins", "factor", "degree"})
#: Options that may be zero but not negative (no network updates between matches, the first epoch, ...).
NON_NEGATIVE_OPTIONS = frozenset({"inner_loop", "min_start_epoch", "momentum"})


def check_option(method: str, name: str, value, default) -> None:
    """ValueError unless `value` has the kind of `default` (bool, int, number, string; a None
    default takes anything, and None is taken as "the method's choice", e.g. batch_syn=None for
    the whole set; the method checks those), a number is finite, a learning rate positive and a
    count (COUNT_OPTIONS) at least 1: a typo such as lr_img=abc, lr_img=nan, lr_img=-1 or
    model_steps=0 fails here, not later inside an update."""
    if default is None or value is None:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            check_number_range(method, name, value)
        return
    kinds = ((bool, "a bool", lambda v: isinstance(v, bool)),
             (int, "an int", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)),
             (float, "a number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)),
             (str, "a string", lambda v: isinstance(v, str)))
    for kind, words, accepts in kinds:
        if isinstance(default, kind):
            if not accepts(value):
                raise ValueError(f"method {method!r}: option {name} must be {words} (default {default!r}), "
                                 f"got {value!r}")
            if kind is float and not math.isfinite(value):
                raise ValueError(f"method {method!r}: option {name} must be finite, got {value!r}")
            if kind in (int, float):
                check_number_range(method, name, value)
            return


def is_learning_rate(option: str) -> bool:
    """Whether a method option names a learning rate (lr_img, lr_net, distill_lr, ...)."""
    return option == "lr" or option.startswith("lr_") or option.endswith("_lr")


def check_number_range(method: str, name: str, value) -> None:
    """ValueError when option `name` is a learning rate and `value` is not positive, a count
    below 1, or an option of NON_NEGATIVE_OPTIONS below 0."""
    if is_learning_rate(name) and not value > 0:
        raise ValueError(f"method {method!r}: option {name} is a learning rate and must be positive, got {value!r}")
    if name in COUNT_OPTIONS and not value >= 1:
        raise ValueError(f"method {method!r}: option {name} counts something and must be at least 1, got {value!r}")
    if name in NON_NEGATIVE_OPTIONS and not value >= 0:
        raise ValueError(f"method {method!r}: option {name} must not be negative, got {value!r}")


def refuse_batchnorm_when_sharded(shard, model: str, dataset) -> None:
    """ValueError for a BatchNorm `model` on a class-sharded run: its batch statistics would mix
    every rank's classes. The model is built aside, leaving the RNGs as they are."""
    if shard is None or not shard.sharded:
        return
    with torch.random.fork_rng(devices=[]):
        net = get_model(model, dataset.channels, dataset.num_classes, tuple(dataset.image_size))
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        raise ValueError(f"{model} uses BatchNorm, whose statistics mix classes: it cannot run class-sharded; "
                         f"use one process or an instance-norm ConvNet")


def exact_when_sharded(method: str, memory: str, shard) -> str:
    """The memory mode an unrolled-training method runs in: "exact" (the same gradient, with a
    warning) in place of "unrolled", which runs in one process only, on a class-sharded run."""
    if shard is None or not shard.sharded or memory != "unrolled":
        return memory
    warnings.warn(f"{method}: memory='unrolled' runs in one process; across {shard.world} ranks the exact mode "
                  f"computes the same gradient")
    return "exact"


class Method:
    """Base class: option resolution, optimiser state for checkpoints, nothing method-specific.

    `defaults` maps option → value; `overrides` is a list of (dataset names, ipcs, options):
    the options apply when the data set matches one of the names (None = any) and the IPC is
    in ipcs (None = any). Explicit options passed by the user win over both.
    """

    name = "base"
    defaults: dict = {}
    overrides: list = []
    #: Whether the method runs class-sharded across ranks (`condense_engine.distributed`): the
    #: driver then sets `shard` before init(), and step() embeds and updates only its classes.
    class_sharded = False
    shard = None

    def __init__(self, dataset_name: str, ipc: int, **options):
        defaults = self.option_defaults(options)
        resolved = dict(defaults)
        key = _dataset_key(dataset_name)
        for names, ipcs, values in self.overrides:
            if (names is None or key in {_dataset_key(n) for n in names}) and (ipcs is None or ipc in ipcs):
                resolved.update(values)
        unknown = set(options) - set(resolved)
        if unknown:
            raise ValueError(f"method {self.name!r} has no option(s) {sorted(unknown)}; "
                             f"its options are {sorted(resolved)}")
        for key, value in options.items():  # against the base default's kind, so no IPC changes what is accepted
            check_option(self.name, key, value, defaults[key] if defaults.get(key) is not None else resolved[key])
        resolved.update(options)
        self.options = resolved
        self.ipc = ipc
        self.dataset_name = dataset_name

    def option_defaults(self, options: dict) -> dict:
        """The defaults given the options passed (before data-set/IPC overrides): `defaults`,
        unless a method's default depends on another option (M3D's degree on its kernel)."""
        return dict(self.defaults)

    @property
    def iterations(self) -> int:
        return int(self.options["iterations"])

    def check_real_batch(self, sampler, classes_sharing: int = 1) -> None:
        """ValueError before the first step when the smallest class cannot give the distinct real
        images per class that option batch_real draws each step (batch_real // `classes_sharing`:
        DD splits it over all classes, DM and DC draw it per class). It names the option and the
        largest value that fits, where the first step would only say that a draw failed. A run of
        no iterations (the real initialisation alone) draws nothing and passes."""
        if self.iterations == 0:
            return
        batch_real = self.options["batch_real"]
        per_class = batch_real // classes_sharing
        counts = sampler.counts
        smallest = int(counts.argmin())
        have = int(counts[smallest])
        if have < per_class:
            raise ValueError(f"method {self.name!r}: batch_real={batch_real} draws {per_class} distinct real images "
                             f"of every class each step, but class {smallest} ({sampler.classes[smallest]!r}) has "
                             f"only {have}; pass batch_real={have * classes_sharing} or less")

    def init(self, synset, dataset, sampler, generator: torch.Generator, device: torch.device) -> None:
        raise NotImplementedError

    def step(self, synset, iteration: int) -> dict:
        raise NotImplementedError

    def gather(self, synset) -> None:
        """Class-sharded methods: put every rank's classes of the set (and of any per-pixel
        optimiser state) onto every rank, before a checkpoint, an evaluation or the end."""
        raise NotImplementedError(f"method {self.name!r} does not run class-sharded")

    def own_class_rows(self, synset) -> slice:
        """This rank's rows of the (class-ordered) synthetic set: all of them in one process."""
        per_class = len(synset.images) // self.shard.num_classes
        return slice(self.shard.first * per_class, self.shard.end * per_class)

    def on_whole_set(self, synset, own: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A gradient computed for this rank's rows (`own`) as one for the whole set shaped like
        `like`: zeros on the other ranks' rows, which only their owners move (`own` itself in one
        process)."""
        if not self.shard.sharded:
            return own
        whole = torch.zeros_like(like)
        whole[self.own_class_rows(synset)] = own
        return whole

    def gather_images_and_optimizer_state(self, synset, optimizer: torch.optim.Optimizer) -> None:
        """gather() for a method whose only per-pixel state is its optimiser's (SGD momentum,
        Adam moments): every rank's classes of the stored images and of the optimiser's state
        tensors for them, onto every rank."""
        per_class = len(synset.images) // self.shard.num_classes
        self.shard.gather_classes(synset.images, per_class)
        for value in optimizer.state.get(synset.images, {}).values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:  # not Adam's step count
                self.shard.gather_classes(value, per_class)

    def finish(self, synset) -> None:
        """Called once at the end of a run: put anything learned beside the images (e.g. step
        sizes) into the set."""

    def state_dict(self) -> dict:
        """Everything beyond the synthetic set and RNGs that an exact resume needs."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
