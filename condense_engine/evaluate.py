"""The standard evaluation protocol (SPEC §6, methods.md §1.6).

Train fresh networks on a synthetic set and report their test accuracy: SGD with momentum 0.9
and weight decay 5e-4, lr 0.01 (or the set's learned lr), lr ×0.1 at half the epochs (the
optimiser is re-created, which resets momentum, as published), per-sample DSA on every training
batch, accuracy after the last epoch; mean ± std over `repeats`. `baseline=True` also trains on
random real subsets of the same size under the same recipe, the number a synthetic set must beat.

`dc_augment="crop_scale_rotate"` (with `dsa=False`) trains with DC's own non-differentiable
augmentation instead of DSA, as DC's published numbers were evaluated on MNIST (methods.md §1.5;
`methods.augment.dc_eval_strategy` gives the published choice per data set and model).

`recipe="idc"` is IDC's evaluation instead (methods.md §9.4): batch 64, lr ×0.2 at 2/3 and 5/6
of the epochs (momentum kept), DSA colour/crop/flip/scale/rotate (no flip on MNIST and SVHN, no
cutout since CutMix replaces it) and CutMix (β = 1) on half the batches. It runs the loop.

`recipe="dd"` is DD's "random init" evaluation (methods.md §2) of a set made by `method="dd"`:
each fresh network, drawn as DD draws its students (`methods.dd.xavier_params`), takes exactly
the steps the run learned, step t plain SGD at the learned step size on its batch of the set, no
augmentation; epochs, lr, batch size and DSA do not apply. The random-real baseline replays
the same schedule on random real images. The runs take seconds and are not checkpointed.

The repeats train together as one vmapped model (evaluate_batched.py) on an accelerator when the
model allows it, else one after another; both give the same weights up to float rounding.

`checkpoint=` keeps every finished run in a file as soon as it finishes (`FinishedRuns`), keyed by
everything its result depends on, the code's `EVALUATION_REVISION` included, so an evaluation
stopped part-way (a killed job, a time-limited machine) and started again trains only the runs it
had not finished: on the loop path run by run, on the batched path all runs or none. Unfinished
runs continue from the state they saved last (every PROGRESS_MINUTES).
"""
import copy
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

from condense_engine import models
from condense_engine.checkpoint import atomic_save, load_versioned, require_writable_folder
from condense_engine.models.layers import ACTIVATION_CHANNELS, forward_chunk
from condense_engine.models.registry import CONVNET_VARIANTS
from condense_engine.datasets import ClassSampler, ImageDataset, RealImages, as_dataset
from condense_engine.device import resolve_device
from condense_engine.evaluate_batched import train_and_test_batched, unbatchable_reason
from condense_engine.methods.augment import cutmix, dc_augment, dc_augment_ops
from condense_engine.methods.dd import learned_for, learned_schedule, xavier_params
from condense_engine.ops.dsa import DSAParams, default_strategy, dsa

RECIPES = ("dc", "idc", "dd")
#: The revision of what an evaluation run computes (training loop, models, DSA, DC's augmentation,
#: CutMix). It is part of a checkpoint's keys, so bumping it makes runs finished by earlier code be
#: trained again instead of reused. Bump it with any change that changes a run's result:
#: tests/test_evaluate.py pins this revision's results and fails until it is bumped.
EVALUATION_REVISION = 1
#: IDC's evaluation: (epoch fraction, lr factor) milestones, CutMix probability and β, batch.
IDC_MILESTONES = ((2 / 3, 0.2), (5 / 6, 0.2))
IDC_CUTMIX_PROB, IDC_CUTMIX_BETA, IDC_BATCH = 0.5, 1.0, 64


@dataclass
class EvalReport:
    """Accuracies of `repeats` fresh models; `baseline` holds the random-real report if asked."""

    model: str
    accuracies: list
    recipe: dict
    baseline: "EvalReport | None" = None
    losses: list = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(torch.tensor(self.accuracies).mean())

    @property
    def std(self) -> float:
        accs = torch.tensor(self.accuracies, dtype=torch.float64)
        return float(accs.std(unbiased=False)) if len(accs) > 1 else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(mean=self.mean, std=self.std)
        if self.baseline is not None:
            out["baseline"] = self.baseline.to_dict()
        return out

    def __str__(self) -> str:
        text = f"{self.model}: {100 * self.mean:.2f} ± {100 * self.std:.2f} % over {len(self.accuracies)} runs"
        if self.baseline is not None:
            text += f" (random real: {100 * self.baseline.mean:.2f} ± {100 * self.baseline.std:.2f} %)"
        return text


RUNS_KIND, RUNS_FORMAT_VERSION = "condense-engine/evaluation-runs", 1
#: Minutes between saves of an unfinished run's state (at the end of an epoch), so a killed long
#: run (21 min per model at MNIST IPC 50 on 2 CPU cores) continues from there.
PROGRESS_MINUTES = 10.0


def fingerprint(*parts) -> str:
    """A digest of tensors (dtype, shape and bytes) and JSON-able values, in order."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            flat = part.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{flat.dtype}{tuple(part.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


class FinishedRuns:
    """Evaluation runs kept in the file `path` (None: nowhere): the finished ones as
    {key: {repeat: [accuracy, last loss]}}, and the last saved state of unfinished ones (see
    ProgressSaver); every change rewrites the file atomically."""

    def __init__(self, path: str | None):
        self.path = os.fspath(path) if path is not None else None
        self.runs, self.unfinished = {}, {}
        if self.path is None:
            return
        require_writable_folder(os.path.dirname(os.path.abspath(self.path)), "evaluation runs")  # fail now, not later
        if os.path.exists(self.path):
            content = load_versioned(self.path, RUNS_KIND, RUNS_FORMAT_VERSION, map_location="cpu")
            self.runs, self.unfinished = content["runs"], content.get("unfinished", {})

    def get(self, key: str, repeat: int) -> tuple | None:
        found = self.runs.get(key, {}).get(repeat)
        return tuple(found) if found is not None else None

    def add(self, key: str, repeat: int, accuracy: float, loss: float) -> None:
        self.add_all(key, {repeat: (accuracy, loss)}, unfinished=repeat)

    def add_all(self, key: str, results: dict, unfinished) -> None:
        """Keep the finished runs `results` {repeat: (accuracy, last loss)} and drop the state
        saved under `unfinished` (a repeat, or the slot of runs trained together) while they ran."""
        if self.path is None:
            return
        for repeat, (accuracy, loss) in results.items():
            self.runs.setdefault(key, {})[repeat] = [float(accuracy), float(loss)]
        self.unfinished.get(key, {}).pop(unfinished, None)
        self._write()

    def state(self, key: str, slot) -> dict | None:
        """The last saved state of the unfinished run(s) in `slot` under `key`, or None."""
        return self.unfinished.get(key, {}).get(slot)

    def saver(self, key: str, slot) -> "ProgressSaver | None":
        """Where the unfinished run(s) in `slot` under `key` save their state; None without a file."""
        return ProgressSaver(self, key, slot) if self.path is not None else None

    def save_state(self, key: str, slot, state: dict) -> None:
        """Keep a copy of `state` (the live tensors go on changing) as the unfinished run(s) in `slot`."""
        self.unfinished.setdefault(key, {})[slot] = copy.deepcopy(state)
        self._write()

    def _write(self) -> None:
        atomic_save({"format": RUNS_KIND, "format_version": RUNS_FORMAT_VERSION, "runs": self.runs,
                     "unfinished": self.unfinished}, self.path)


class ProgressSaver:
    """Saves snapshots of an unfinished run's state into its FinishedRuns file, when `due()`:
    PROGRESS_MINUTES after the run started or was last saved."""

    def __init__(self, runs: FinishedRuns, key: str, slot):
        self.runs, self.key, self.slot = runs, key, slot
        self.saved_at = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.saved_at >= 60 * PROGRESS_MINUTES

    def __call__(self, state: dict) -> None:
        self.runs.save_state(self.key, self.slot, state)
        self.saved_at = time.monotonic()


def train_and_test(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   test_set: ImageDataset, *, epochs: int, lr: float, batch_size: int,
                   strategy: str | None, generator: torch.Generator, recipe: str = "dc",
                   dc_strategy: str | None = None, resume_from: dict | None = None,
                   save_progress: ProgressSaver | None = None) -> tuple[float, float]:
    """Train `model` on (images, labels) with the published recipe ("dc", or IDC's "idc"; see
    the module docstring), augmenting with DSA `strategy` or DC's `dc_strategy` (dc_augment);
    return (test acc, last loss). A ConvNet trains with its fused
    norm → act → pool epilogue (training needs first-order gradients only).

    `save_progress(state)`, when given, receives the run's state (weights, optimiser, generator,
    next epoch) at the end of each epoch it says is due; `resume_from` such a state continues the
    run exactly where it was saved."""
    if isinstance(model, models.ConvNet):
        model.use_fused_epilogue()
    device = images.device
    lr_now = float(lr)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr_now, momentum=0.9, weight_decay=5e-4)
    decay_at = epochs // 2
    milestones = {int(epochs * fraction): factor for fraction, factor in IDC_MILESTONES}
    loss = torch.tensor(float("nan"))
    start = 0
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])  # the decayed lr included
        generator.set_state(resume_from["generator"])
        start = resume_from["epoch"]
    model.train()
    for epoch in range(start, epochs):
        if recipe == "idc" and epoch in milestones and epoch > 0:
            for group in optimizer.param_groups:
                group["lr"] *= milestones[epoch]
        elif recipe == "dc" and epoch == decay_at and epoch > 0:
            lr_now *= 0.1
            optimizer = torch.optim.SGD(model.parameters(), lr=lr_now, momentum=0.9, weight_decay=5e-4)
        order = torch.randperm(len(images), generator=generator).to(device)
        for start in range(0, len(images), batch_size):
            index = order[start:start + batch_size]
            batch = images[index]
            if strategy:
                params = DSAParams.sample(len(batch), strategy, size=tuple(batch.shape[2:]), siamese=False,
                                          generator=generator, device=device)
                batch = dsa(batch, params)
            if dc_strategy:
                batch = dc_augment(batch, dc_strategy, generator)
            if recipe == "idc" and float(torch.rand((), generator=generator)) < IDC_CUTMIX_PROB:
                batch, pasted, kept = cutmix(batch, labels[index], IDC_CUTMIX_BETA, generator)
                logits = model(batch)
                loss = kept * F.cross_entropy(logits, labels[index]) + (1 - kept) * F.cross_entropy(logits, pasted)
            else:
                loss = F.cross_entropy(model(batch), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if save_progress is not None and epoch + 1 < epochs and save_progress.due():
            save_progress(dict(epoch=epoch + 1, model=model.state_dict(), optimizer=optimizer.state_dict(),
                               generator=generator.get_state()))
    return accuracy(model, test_set), float(loss.detach())


def replay_and_test(student: models.FunctionalNet, params: torch.Tensor, images: torch.Tensor,
                    labels: torch.Tensor, lrs: torch.Tensor, batches: list,
                    test_set: ImageDataset) -> tuple[float, float]:
    """Train the flat `params` of `student` by a learned schedule (the dd recipe): step t is
    plain SGD on rows batches[t] at lrs[t], the mean cross-entropy as in DD's unroll; return
    (test acc, last loss)."""
    loss = torch.tensor(float("nan"))
    with torch.enable_grad():
        for lr, rows in zip(lrs.tolist(), batches):
            params = params.detach().requires_grad_(True)
            loss = F.cross_entropy(student.forward(images[rows], params), labels[rows])
            grad, = torch.autograd.grad(loss, params)
            params = params - lr * grad
    return accuracy(student.to_module(params), test_set), float(loss.detach())


def _replay_repeats(images, labels, test_set, *, model, repeats, seed, channel, num_classes, im_size,
                    lrs, batches, draw=None) -> tuple[list, list]:
    """The dd recipe's `repeats` runs, repeat r drawn from a generator seeded seed·1000 + r (which
    `draw(generator)`, the random-real baseline, also draws its images from)."""
    student = models.functional_model(model, channel, num_classes, im_size)
    device = images.device
    batches = [rows.to(device) for rows in batches]
    accs, losses = [], []
    for repeat in range(repeats):
        generator = torch.Generator().manual_seed(seed * 1000 + repeat)
        pair = draw(generator) if draw is not None else (images, labels)
        acc, loss = replay_and_test(student, xavier_params(student, generator, device), *pair, lrs, batches,
                                    test_set)
        accs.append(acc)
        losses.append(loss)
    return accs, losses


def _check_dd_arguments(synset, model: str, lr, batch_size, dsa_strategy, dc_augment, batched) -> None:
    """ValueError for an argument the dd recipe cannot honour (its schedule is the set's, learned
    for the set's student architecture)."""
    given = {name: value for name, value in dict(lr=lr, batch_size=batch_size, dsa_strategy=dsa_strategy,
                                                 dc_augment=dc_augment).items() if value is not None}
    if given or batched:
        raise ValueError(f"the dd recipe trains by the set's learned schedule, without augmentation, one run "
                         f"after another; drop {', '.join(given) or 'batched=True'}")
    student = learned_for(synset)
    if student is not None and student != model:
        raise ValueError(f"the set's step sizes were learned for a {student} student; replay them on that "
                         f"architecture: model={student!r}")
    if model in CONVNET_VARIANTS and models.convnet_config(model)["norm"] == "batchnorm":
        raise ValueError(f"the dd recipe trains {model} functionally, which leaves batch norm's running "
                         f"statistics untrained: evaluate a ConvNet without batch norm")


#: Test images per forward off the CPU (the CPU takes smaller batches: models.layers.forward_chunk).
TEST_BATCH = 1024


@torch.no_grad()
def accuracy(model: torch.nn.Module, test_set: ImageDataset, batch_size: int | None = None) -> float:
    """Top-1 accuracy of `model` (in eval mode) on the whole `test_set`.

    batch_size None: TEST_BATCH images per forward, fewer on the CPU, where large activations
    cost more in page faults than in arithmetic; in eval mode the images are independent, so the
    batch size does not change the predictions.
    """
    model.eval()
    device = next(model.parameters()).device
    if batch_size is None:
        height, width = test_set.image_size
        batch_size = forward_chunk(device, ACTIVATION_CHANNELS * height * width * 4, TEST_BATCH)
    test = RealImages(test_set, device, "host")  # batches travel as stored (uint8), without a sync
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, len(test_set), batch_size):
        index = torch.arange(start, min(start + batch_size, len(test_set)))
        correct += (model(test.normalized(index, check_bounds=False)).argmax(1) == test.labels_at(index)).sum()
    model.train()
    return int(correct) / len(test_set)


def fresh_models(model: str, repeats: int, seed: int, channel: int, num_classes: int, im_size,
                 device) -> list[torch.nn.Module]:
    """The `repeats` freshly initialised models of an evaluation: repeat r is built under the
    global seed seed·1000 + r, without touching the caller's global RNG state."""
    nets = []
    for repeat in range(repeats):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + repeat)
            nets.append(models.get_model(model, channel, num_classes, im_size).to(device))
    return nets


#: Why batched=None loops on CPU: measured there (one thread, 4 ConvNets, 20 epochs on 100 or on
#: 10 images of 28×28), the vmapped model took 1.6× or 1.4× as long as the loop. vmap adds layout
#: copies and separate per-model affine passes to every norm, and a CPU gains nothing from
#: bigger launches.
CPU_LOOP_REASON = "on CPU the loop is faster than the vmapped model; batched=True forces batching"


def _default_eval_strategy(dataset: str, recipe: str) -> str:
    """The data set's published DSA strategy; IDC's evaluation: no cutout, no flip on digits."""
    if recipe != "idc":
        return default_strategy(dataset)
    key = dataset.lower().replace("-", "").replace("_", "")
    return "color_crop_scale_rotate" if key in ("mnist", "svhn") else "color_crop_flip_scale_rotate"


def _loop_reason(batched: bool | None, model: str, nets: list, images: torch.Tensor,
                 recipe: str = "dc") -> str | None:
    """Why the repeats train one after another, or None to train them together (see evaluate)."""
    if batched is False:
        return "batched=False"
    if recipe == "idc":
        if batched:
            raise ValueError("batched=True, but the idc recipe (CutMix, multistep lr) runs the loop")
        return "the idc recipe (CutMix, multistep lr) runs the loop"
    reason = unbatchable_reason(model, nets, images)
    if batched and reason is not None:
        raise ValueError(f"batched=True, but the repeats cannot be batched: {reason}")
    if reason is None and batched is None and images.device.type == "cpu":
        return CPU_LOOP_REASON
    return reason


def _train_repeats(images, labels, test_set, *, model, repeats, epochs, lr, batch_size, strategy,
                   seed, channel, num_classes, im_size, batched, recipe="dc", dc_strategy=None, draw=None,
                   finished: FinishedRuns | None = None, key: str = "") -> tuple[list, list, dict]:
    """Train `repeats` fresh models, repeat r seeded by seed·1000 + r. Return their accuracies,
    last losses and the path taken: {"path": "batched"} or {"path": "loop", "loop_reason": ...}.

    `batched` is evaluate's; `draw(generator)` replaces the training set per repeat (the
    random-real baseline). Runs that `finished` holds under `key` are not trained again, and
    each trained run is added to it.
    """
    finished = finished or FinishedRuns(None)
    generators = [torch.Generator().manual_seed(seed * 1000 + repeat) for repeat in range(repeats)]
    sets = [draw(g) if draw is not None else (images, labels) for g in generators]
    nets = fresh_models(model, repeats, seed, channel, num_classes, im_size, images.device)
    train = dict(test_set=test_set, epochs=epochs, lr=lr, batch_size=batch_size, strategy=strategy,
                 dc_strategy=dc_strategy)
    reason = _loop_reason(batched, model, nets, images, recipe)
    key = fingerprint(key, "loop" if reason is not None else "batched") if key else key
    kept = [finished.get(key, repeat) for repeat in range(repeats)]
    if reason is not None:
        results = []
        for repeat, (net, pair, g) in enumerate(zip(nets, sets, generators)):
            if kept[repeat] is None:  # each run has its own seed and generator: skipping one changes no other
                kept[repeat] = train_and_test(net, *pair, **train, generator=g, recipe=recipe,
                                              resume_from=finished.state(key, repeat),
                                              save_progress=finished.saver(key, repeat))
                finished.add(key, repeat, *kept[repeat])
            results.append(kept[repeat])
        accs, losses = (list(column) for column in zip(*results))
        return accs, losses, dict(path="loop", loop_reason=reason)
    if all(result is not None for result in kept):
        accs, losses = (list(column) for column in zip(*kept))
        return accs, losses, dict(path="batched")
    if draw is None:
        stacked_images = images.expand(repeats, *images.shape)
        stacked_labels = labels.expand(repeats, *labels.shape)
    else:
        stacked_images = torch.stack([pair[0] for pair in sets])
        stacked_labels = torch.stack([pair[1] for pair in sets])
    together = f"{repeats} together"  # a saved state holds exactly these runs
    accs, losses = train_and_test_batched(nets, stacked_images, stacked_labels, **train, generators=generators,
                                          resume_from=finished.state(key, together),
                                          save_progress=finished.saver(key, together))
    finished.add_all(key, dict(enumerate(zip(accs, losses))), unfinished=together)
    return accs, losses, dict(path="batched")


def normalized_like_the_set(synset, test_set: ImageDataset) -> ImageDataset:
    """The test set normalised with the synthetic set's mean/std: the statistics of the training
    split the set was condensed from, as the protocol normalises test images. Splits that carry
    their own statistics (an image folder's, tensors') differ slightly; raw (uint8) test pixels
    then take the set's. Statistics far apart (by more than 0.02 in [0, 1] pixel units) warn: the
    set was most likely condensed from another data set, and its accuracy would mean nothing."""
    pairs = list(zip((*synset.mean, *synset.std), (*test_set.mean, *test_set.std)))
    if not all(math.isclose(a, b, abs_tol=0.02) for a, b in pairs):
        condensed_from = synset.meta.get("dataset", "another data set")
        warnings.warn(f"the synthetic set ({condensed_from}) is normalised with mean {synset.mean}, std {synset.std} "
                      f"but the test set ({test_set.name}) with mean {test_set.mean}, std {test_set.std}: "
                      f"was it condensed from another data set?", stacklevel=3)
    if test_set.images.dtype == torch.uint8 and any(a != b for a, b in pairs):
        return replace(test_set, mean=synset.mean, std=synset.std)
    return test_set


def evaluate(synset, test_set, model: str | None = None, repeats: int = 5,
             epochs: int = 1000, lr: float | None = None, batch_size: int | None = None, dsa: bool = True,
             seed: int = 0, *, baseline: bool = False, train_set=None,
             dsa_strategy: str | None = None, device=None, batched: bool | None = None,
             recipe: str = "dc", checkpoint: str | None = None, dc_augment: str | None = None) -> EvalReport:
    """Train `repeats` fresh `model`s on `synset` and report their test accuracy (SPEC §6).

    `test_set` and `train_set` take what `distill` takes: an ImageDataset, an (images, labels)
    tensor pair or a torch Dataset.
    `model` None is the ConvNet, or under the dd recipe the student the set's steps were learned
    for. `recipe` "dc" is the standard protocol, "idc" IDC's, "dd" DD's replay of a DD set's
    learned steps (see the module docstring); batch_size None is the recipe's (256 or 64). `dc_augment`:
    a strategy of DC's own augmentation (such as "crop_scale_rotate") to train with instead of
    DSA; it needs dsa=False.
    `lr=None` takes the set's learned lr when it has one, else 0.01. `baseline=True` needs
    `train_set` and adds the random-real baseline of the same images per class. `batched=True`
    trains the repeats together as one vmapped model (ValueError if the model does not allow
    it), False one after another, None batched when the model allows it and the device is not
    the CPU (where the loop is faster). `recipe["path"]` says which ran, and why when it looped.
    `checkpoint`: a file keeping each finished run, so that the same evaluation started again
    trains only the runs not yet finished (see the module docstring); one file may serve several
    evaluations.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    if model is None:
        model = (learned_for(synset) if recipe == "dd" else None) or "ConvNet"
    if recipe == "dd":
        _check_dd_arguments(synset, model, lr, batch_size, dsa_strategy, dc_augment, batched)
    if dc_augment is not None:
        dc_augment_ops(dc_augment)
        if dsa:
            raise ValueError("dc_augment replaces DSA: pass dsa=False with it")
    # A tensor pair's pixels take the set's statistics, as a data set's test split does.
    test_set = as_dataset(test_set, "test_set", mean=synset.mean, std=synset.std)
    if train_set is not None:
        train_set = as_dataset(train_set, "train_set", mean=synset.mean, std=synset.std)
    if batch_size is None:
        batch_size = IDC_BATCH if recipe == "idc" else 256
    if repeats < 1 or epochs < 1 or batch_size < 1:
        raise ValueError(f"repeats, epochs and batch_size must be ≥ 1, got {repeats}, {epochs}, {batch_size}")
    if baseline and train_set is None:
        raise ValueError("baseline=True needs train_set (the real data to draw random subsets from)")
    if baseline and train_set.num_classes != synset.num_classes:
        raise ValueError(f"the train set has {train_set.num_classes} classes and the synthetic set "
                         f"{synset.num_classes}: the random-real baseline needs the same classes")
    device = resolve_device(device)
    images, labels = synset.materialize()
    images, labels = images.detach().to(device), labels.detach().to(device)
    if tuple(images.shape[1:]) != (test_set.channels, *test_set.image_size):
        raise ValueError(f"synthetic images are {tuple(images.shape[1:])} but the test set holds "
                         f"{(test_set.channels, *test_set.image_size)}")
    if not torch.isfinite(images).all():
        raise ValueError("the synthetic set holds non-finite pixels")
    test_set = normalized_like_the_set(synset, test_set)
    if len(test_set) and int(test_set.labels.max()) >= synset.num_classes:
        raise ValueError(f"the test set has labels up to {int(test_set.labels.max())} but the synthetic set has "
                         f"{synset.num_classes} classes: its models could never predict those labels")
    if recipe == "dd":
        return _evaluate_replay(synset, images, labels, test_set, model=model, repeats=repeats, seed=seed,
                                baseline=baseline, train_set=train_set, device=device)
    if lr is None:
        lr = float(synset.lr) if synset.lr is not None else 0.01
        if not lr > 0:
            raise ValueError(f"the synthetic set's learned lr is {lr:g}; give a positive lr to evaluate it")
    elif not lr > 0:
        raise ValueError(f"lr must be a positive learning rate, got {lr}")
    strategy = (dsa_strategy or _default_eval_strategy(test_set.name, recipe)) if dsa else None
    schedule = "lr x0.2 at 2/3 and 5/6 of the epochs; CutMix p 0.5" if recipe == "idc" else "lr x0.1 at epochs//2"
    described = dict(model=model, repeats=repeats, epochs=epochs, lr=lr, batch_size=batch_size,
                     dsa_strategy=strategy, optimizer="SGD(momentum=0.9, weight_decay=5e-4)",
                     schedule=schedule, seed=seed, recipe=recipe, dc_augment=dc_augment)
    shape = dict(channel=test_set.channels, num_classes=synset.num_classes, im_size=test_set.image_size)
    run = dict(model=model, repeats=repeats, epochs=epochs, lr=lr, batch_size=batch_size,
               strategy=strategy, seed=seed, batched=batched, recipe=recipe, dc_strategy=dc_augment, **shape)
    finished = FinishedRuns(checkpoint)
    # A run's result depends on its training images, the test set, the recipe and the device (and
    # the path, added in _train_repeats); the repeat number picks its seed, so how many repeats
    # there are does not matter: an evaluation with more repeats reuses the first ones.
    test_key = fingerprint(test_set.images, test_set.labels, test_set.mean, test_set.std) if checkpoint else ""
    recipe_key = dict({k: v for k, v in run.items() if k not in ("repeats", "batched")}, revision=EVALUATION_REVISION)
    key = fingerprint("set", images, labels, test_key, recipe_key, device.type) if checkpoint else ""
    accs, losses, path = _train_repeats(images, labels, test_set, **run, finished=finished, key=key)
    described.update(path)
    report = EvalReport(model, accs, described, losses=losses)
    if baseline:
        ipc = int(synset.ipc)
        sampler = ClassSampler(train_set, device=device, images_on="host")  # draws only ipc per class
        base_recipe = dict(described, lr=0.01, images_per_class=ipc)
        key = (fingerprint("random real", ipc, train_set.images, train_set.labels, train_set.mean, train_set.std,
                           test_key, dict(recipe_key, lr=0.01), device.type) if checkpoint else "")
        accs, losses, path = _train_repeats(images, labels, test_set, **dict(run, lr=0.01),
                                            draw=lambda g: sampler.random_real(ipc, g), finished=finished, key=key)
        report.baseline = EvalReport(model, accs, dict(base_recipe, **path), losses=losses)
    return report


def _evaluate_replay(synset, images, labels, test_set, *, model, repeats, seed, baseline, train_set,
                     device) -> EvalReport:
    """evaluate() with the dd recipe (see the module docstring)."""
    lrs, batches = learned_schedule(synset)
    steps = synset.meta["distill_steps"]
    shape = dict(channel=test_set.channels, num_classes=synset.num_classes, im_size=test_set.image_size)
    run = dict(model=model, repeats=repeats, seed=seed, lrs=lrs, batches=batches, **shape)
    described = dict(model=model, repeats=repeats, epochs=len(lrs) // steps, lr=float(lrs.mean()),
                     batch_size=len(batches[0]), dsa_strategy=None, optimizer="SGD (no momentum, no weight decay)",
                     schedule=f"the set's {len(lrs)} learned step sizes over its {steps} batches "
                              f"(lr is their mean)",
                     seed=seed, recipe="dd", dc_augment=None, path="loop")
    accs, losses = _replay_repeats(images, labels, test_set, **run)
    report = EvalReport(model, accs, described, losses=losses)
    if baseline:
        ipc = int(synset.ipc)
        sampler = ClassSampler(train_set, device=device, images_on="host")
        accs, losses = _replay_repeats(images, labels, test_set, **run, draw=lambda g: sampler.random_real(ipc, g))
        report.baseline = EvalReport(model, accs, dict(described, images_per_class=ipc), losses=losses)
    return report
