"""`ce.distill`: the loop every method runs in (SPEC §5).

The driver owns everything that is not the method's own algorithm: resolving the input data,
initialising the synthetic set from real images, the progress bar, JSON-lines (and TensorBoard) logging,
periodic evaluation, atomic checkpoints (every N iterations, every M minutes and on
SIGTERM/SIGINT), exact resume, and the guard that stops on a non-finite loss while keeping the
last good checkpoint.

Reading a value computed on an accelerator makes the host wait for the device, so on one the
driver keeps each iteration's stats and finiteness flag on the device and reads them back together
every `sync_every` iterations (and before every checkpoint, evaluation and the end): the log,
the progress bar and the guard's report are the same as when reading every iteration.

Under torchrun (torch.distributed initialised with several ranks) a method that supports it
runs class-sharded (`condense_engine.distributed`): every rank keeps only its own classes' real
images on its device and takes the same steps on its own classes; rank 0 alone logs, shows
progress, evaluates and writes checkpoints, and each of those first gathers the whole set onto
every rank; the ranks agree on a stop signal where they sync.
"""
import json
import math
import numbers
import os
import sys
import time

import torch

from condense_engine import __version__
from condense_engine.checkpoint import (capture_rng_state, load_checkpoint, require_writable_folder, restore_rng_state,
                                        save_checkpoint, stop_flag_on_signal)
from condense_engine.datasets import ClassSampler, ImageDataset, as_dataset
from condense_engine.device import resolve_device
from condense_engine.distributed import check_on_every_rank, class_shard
from condense_engine.errors import MissingPackageError, NonFiniteError, NonFiniteLossError
from condense_engine.methods import get_method
from condense_engine.synset import SyntheticSet

#: Default `sync_every` off the CPU (on the CPU reading back is free, so every iteration).
ACCELERATOR_SYNC_EVERY = 10
#: The keys of a log record that the driver adds beside the method's stats.
_DRIVER_KEYS = ("iteration", "seconds", "eval")


def initial_synset(dataset: ImageDataset, sampler: ClassSampler, ipc: int, generator, meta: dict,
                   shard=None) -> SyntheticSet:
    """`ipc` random real images per class, ordered class by class (the published real init; the
    whole set on every rank of a class `shard`, whose sampler holds only its own classes)."""
    images, labels = sampler.random_real(ipc, generator, shard)
    order = torch.sort(labels.cpu(), stable=True).indices.to(labels.device)
    return SyntheticSet.from_tensors(images[order].detach().clone(), labels[order], num_classes=dataset.num_classes,
                                     classes=list(dataset.classes), mean=dataset.mean, std=dataset.std,
                                     zca=dataset.zca, meta=meta)


class _JsonLog:
    """The JSON-lines log: one record per iteration. A run resumed from the checkpoint of
    iteration `start` continues the file after dropping what the stopped run wrote beyond that
    checkpoint (the iterations this run does again) and a torn last line, so every iteration
    keeps exactly one record."""

    def __init__(self, path: str | None, start: int):
        self.file = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if start and os.path.exists(path):
                _keep_records_through(path, start)
            self.file = open(path, "a" if start else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


class _TensorBoardLog:
    """The log's numbers as TensorBoard scalars in `folder`, at the iteration as the step: each
    stat under its name, an evaluation as eval/accuracy and eval/std. A resumed run first
    purges the steps after its checkpoint, as the JSON-lines log drops their records."""

    def __init__(self, folder: str | None, start: int):
        self.writer = None
        if folder:
            self.writer = tensorboard_writer()(folder, purge_step=start + 1 if start else None)

    def write(self, record: dict) -> None:
        if self.writer is None:
            return
        step = record["iteration"]
        for name, value in record.items():
            if name not in _DRIVER_KEYS and isinstance(value, numbers.Real):
                self.writer.add_scalar(name, value, step)
        if "eval" in record:
            self.writer.add_scalar("eval/accuracy", record["eval"]["mean"], step)
            self.writer.add_scalar("eval/std", record["eval"]["std"], step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def tensorboard_writer():
    """torch's SummaryWriter class; a clear error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise MissingPackageError("TensorBoard logging needs the tensorboard package: pip install tensorboard "
                                  "(or condense-engine's [tensorboard] extra)") from err
    return SummaryWriter


def _keep_records_through(path: str, last: int) -> None:
    """Rewrite the log at `path` (atomically) with only its whole records of iterations ≤ `last`."""
    kept = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the stopped run was killed while writing this line
                continue
            if isinstance(record, dict) and isinstance(record.get("iteration"), int) and record["iteration"] <= last:
                kept.append(line if line.endswith("\n") else line + "\n")
    partial = path + ".part"
    with open(partial, "w", encoding="utf-8") as out:
        out.writelines(kept)
    os.replace(partial, path)


class _PendingIterations:
    """Iterations whose results are still on the device: stats (numbers or 0-d tensors), the
    seconds since the start when the step returned (on an accelerator: when the host had queued
    it), and whether the pixels were finite after it (a 0-d bool tensor). `take` reads them all
    back at once."""

    def __init__(self):
        self.entries = []

    def add(self, iteration: int, seconds: float, stats: dict, pixels_finite: torch.Tensor) -> None:
        stats = {name: value.detach() if isinstance(value, torch.Tensor) else value for name, value in stats.items()}
        self.entries.append((iteration, seconds, stats, pixels_finite))

    def take(self) -> list:
        """[(iteration, seconds, stats as Python numbers, pixels finite as bool)] in order; empties
        the buffer. One device→host copy per device holding the tensors."""
        tensors = []
        for _, _, stats, pixels_finite in self.entries:
            tensors.append(pixels_finite)
            tensors.extend(value for value in stats.values() if isinstance(value, torch.Tensor))
        host = iter(_read_back(tensors))
        taken = []
        for iteration, seconds, stats, _ in self.entries:
            pixels_finite = bool(next(host))
            values = {name: next(host) if isinstance(value, torch.Tensor) else value
                      for name, value in stats.items()}
            taken.append((iteration, seconds, values, pixels_finite))
        self.entries = []
        return taken


def _read_back(tensors: list) -> list:
    """The 0-d `tensors` as Python floats (float(t) for each), stacked per device so each device
    is read once."""
    by_device: dict = {}
    for position, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(position)
    values = [None] * len(tensors)
    for positions in by_device.values():
        stacked = torch.stack([tensors[p].detach().reshape(()).to(torch.float64) for p in positions])
        for position, value in zip(positions, stacked.tolist()):
            values[position] = value
    return values


def checked_test_set(test_set, dataset: ImageDataset) -> ImageDataset:
    """`test_set` as an ImageDataset (a tensor pair takes the training data's statistics), refused
    now if the periodic evaluations could not use it: other image shapes, or labels the
    training data lacks."""
    test_set = as_dataset(test_set, "test_set", mean=dataset.mean, std=dataset.std)
    if (test_set.channels, *test_set.image_size) != (dataset.channels, *dataset.image_size):
        raise ValueError(f"test_set holds {(test_set.channels, *test_set.image_size)} images but the data to "
                         f"distill {(dataset.channels, *dataset.image_size)}")
    if int(test_set.labels.max()) >= dataset.num_classes:
        raise ValueError(f"test_set has labels up to {int(test_set.labels.max())} but the data to distill has "
                         f"{dataset.num_classes} classes")
    return test_set


def distill(dataset, method: str = "dm", ipc: int = 10, iterations: int | None = None, device=None,
            seed: int = 0, *, test_set=None, eval_every: int = 0,
            eval_options: dict | None = None, checkpoint: str | None = None, checkpoint_every: int = 500,
            checkpoint_minutes: float | None = 10.0, resume: bool = False, log: str | None = None,
            tensorboard: str | None = None, progress: bool = True, sync_every: int | None = None,
            real_images_on: str = "device", **options) -> SyntheticSet:
    """Condense `dataset` into `ipc` images per class with `method`; returns a SyntheticSet.

    Method options (e.g. lr_img, batch_real) pass through `**options`; defaults come from the
    method's table for the data set and IPC. With `checkpoint` set, the state is written
    atomically every `checkpoint_every` iterations, at the first read-back (see `sync_every`)
    `checkpoint_minutes` after the last write (so a slow run killed without a signal loses at most
    about that much; None: by iterations only), and when SIGTERM/SIGINT arrives, and
    `resume=True` continues from it (bit-identically on CPU), also when it was written by the
    same run with fewer iterations, which extends that run; with no file there yet it starts
    afresh (saying so on stderr when `progress` is on). `test_set` with `eval_every > 0`
    evaluates the set periodically (`eval_options` go to `ce.evaluate`); it is checked against
    `dataset` before the first iteration. Called on every rank of
    an initialised torch.distributed group (e.g. under torchrun), every method shards the
    classes across the ranks and every rank returns the whole set (see `condense_engine.distributed`).

    `sync_every` (a positive int; None: 1 on the CPU, ACCELERATOR_SYNC_EVERY elsewhere) is how
    often the stats and the non-finite guard are read back to the host, which waits for the device.
    It changes neither the results nor the log (each record keeps its iteration; the guard names
    the first bad iteration and never checkpoints after it), only when they are written: if the
    run dies of another error, up to sync_every − 1 finished iterations may be missing from the log.

    `log` is a JSON-lines file with one record per iteration (the method's stats, `seconds`
    since the run began, and `eval` where one ran); `tensorboard` a folder that gets the
    same numbers as TensorBoard scalars (it needs the tensorboard package).

    `real_images_on` "host" keeps the real images off the device and moves each batch there (a
    set larger than the device's memory; see `ClassSampler`); the draws are the same.
    """
    dataset = as_dataset(dataset, "the data to distill")
    counts = dataset.class_counts()
    if not isinstance(ipc, int) or ipc < 1:
        raise ValueError(f"ipc must be a positive integer, got {ipc!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if test_set is not None:
        test_set = checked_test_set(test_set, dataset)
    if sync_every is not None and (isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1):
        raise ValueError(f"sync_every must be a positive integer or None, got {sync_every!r}")
    if ipc > int(counts.min()):
        smallest = int(counts.argmin())
        raise ValueError(f"ipc={ipc} is larger than class {smallest} ({dataset.classes[smallest]!r}), "
                         f"which has only {int(counts.min())} images")
    if resume and not checkpoint:
        raise ValueError("resume=True needs checkpoint=<path>")
    if tensorboard:
        tensorboard_writer()  # before the data and the method are set up: a missing package should cost nothing
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    if checkpoint_minutes is not None and (isinstance(checkpoint_minutes, bool)
                                           or not isinstance(checkpoint_minutes, numbers.Real)
                                           or not checkpoint_minutes > 0):
        raise ValueError(f"checkpoint_minutes must be a positive number of minutes or None, got {checkpoint_minutes!r}")
    algorithm = get_method(method)(dataset.name, ipc, **options)
    if eval_every and (eval_options or {}).get("recipe") == "dd" and algorithm.name != "dd":
        raise ValueError(f"eval_options recipe 'dd' replays the step sizes a DD run learns; method "
                         f"{method!r} learns none: evaluate with recipe 'dc' or 'idc'")
    if iterations is not None:
        if (isinstance(iterations, bool) or not isinstance(iterations, numbers.Real)
                or not float(iterations).is_integer() or iterations < 0):
            raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
        algorithm.options["iterations"] = int(iterations)
    shard = class_shard(dataset.num_classes)
    if shard.sharded:
        if not algorithm.class_sharded:
            raise ValueError(f"method {algorithm.name!r} cannot run class-sharded across {shard.world} ranks; "
                             f"run it in one process")
        algorithm.shard = shard
    lead = shard.rank == 0  # the rank that logs, evaluates and writes
    # The lead alone writes checkpoints; every rank stops if it cannot.
    check_on_every_rank(lambda: not (checkpoint and lead)
                        or require_writable_folder(os.path.dirname(os.path.abspath(checkpoint)), "checkpoints"))
    total = algorithm.iterations
    device = resolve_device(device)
    sync_every = sync_every or (1 if device.type == "cpu" else ACCELERATOR_SYNC_EVERY)

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    sampler = ClassSampler(dataset, device=device, generator=generator,
                           classes=(shard.first, shard.end) if shard.sharded else None, images_on=real_images_on)
    config = run_config(algorithm, dataset, ipc, seed)
    meta = dict(config, iterations=total, version=__version__, normalization=dict(mean=dataset.mean, std=dataset.std),
                ranks=shard.world)
    synset = initial_synset(dataset, sampler, ipc, generator, meta, shard)
    synset.images = synset.images.to(device)
    synset.labels = synset.labels.to(device)
    made_for = synset.labels.clone()  # each image's class: soft labels (TESLA, DATM) may peak elsewhere
    algorithm.init(synset, dataset, sampler, generator, device)
    synset.image_classes = made_for if synset.is_soft else synset.labels.clone()

    start, earlier_seconds = 0, 0.0
    if resume and os.path.exists(checkpoint):
        start, earlier_seconds = _restore(checkpoint, config, synset, algorithm, generator)
    elif resume and progress and lead:  # a preemptible job's first start, or a mistyped path: say which
        print(f"distill: no checkpoint at {checkpoint} yet; starting from iteration 0", file=sys.stderr, flush=True)

    def write_checkpoint(iteration: int) -> None:
        if checkpoint and lead:
            save_checkpoint({"iteration": iteration, "seconds": time.perf_counter() - began, "config": config,
                             "images": synset.images.detach().cpu(),
                             "method": algorithm.state_dict(), "rng": capture_rng_state(generators=[generator])},
                            checkpoint)

    logger = _JsonLog(log if lead else None, start)
    board = _TensorBoardLog(tensorboard if lead else None, start)
    bar = _progress(progress and lead, start, total, algorithm.name)
    last_saved = start if (resume and start) else None
    timed = bool(checkpoint and checkpoint_minutes)  # the same on every rank: they agree only when it is on
    written_at = time.monotonic()
    pending = _PendingIterations()
    began = time.perf_counter() - earlier_seconds  # a resumed run's clock goes on from its checkpoint's

    def fail(iteration: int, what: str):
        where = (f"the last good checkpoint (iteration {last_saved}) is kept at {checkpoint}"
                 if last_saved is not None else "no checkpoint was written")
        raise NonFiniteLossError(f"{algorithm.name}: non-finite {what} at iteration {iteration}; "
                                 f"{where}. Try a smaller learning rate (lr_img).")

    def publish(records: list) -> None:
        for record in records:
            logger.write(record)
            board.write(record)
        if bar is not None and records:
            bar.update(len(records))
            bar.set_postfix({k: f"{v:.4g}" for k, v in records[-1].items() if k not in _DRIVER_KEYS})

    def checked_records() -> list:
        """The pending iterations' log records, read back in one go; at the first non-finite
        iteration, publishes the records before it and raises NonFiniteLossError."""
        taken = pending.take()
        records = []
        for index, (iteration, seconds, stats, pixels_finite) in enumerate(taken):
            what = None if pixels_finite else "synthetic pixels"
            if not all(math.isfinite(v) for v in stats.values()):
                what = f"loss {stats}"
            if what:
                publish(records)
                fail(iteration, what)
            if index == len(taken) - 1:  # read back just now: the device has finished it
                seconds = time.perf_counter() - began
            records.append(dict(iteration=iteration + 1, seconds=round(seconds, 3), **stats))
        return records

    try:
        with stop_flag_on_signal() as stop:
            for iteration in range(start, total):
                try:
                    stats = algorithm.step(synset, iteration)
                except NonFiniteError as err:
                    publish(checked_records())  # an earlier pending iteration may be the first bad one
                    fail(iteration, f"values ({err})")
                pending.add(iteration, time.perf_counter() - began, stats,
                            shard.all_true(torch.isfinite(synset.images).all()))
                done = iteration + 1
                evaluate_due = test_set is not None and eval_every > 0 and (done % eval_every == 0 or done == total)
                scheduled = checkpoint and (done % checkpoint_every == 0 or done == total)
                at_sync = done % sync_every == 0 or done == total or evaluate_due or scheduled
                stopping = stop.is_set()
                overdue = timed and time.monotonic() - written_at >= 60 * checkpoint_minutes
                if shard.sharded:  # agree where the ranks wait anyway, so all stop (or write) after the same iteration
                    stopping = at_sync and shard.any_rank(stopping)
                    overdue = timed and at_sync and shard.any_rank(overdue)
                if not (at_sync or stopping):
                    continue
                checkpoint_due = checkpoint and (scheduled or stopping or overdue)
                records = checked_records()
                if shard.sharded and (evaluate_due or checkpoint_due):
                    algorithm.gather(synset)
                if evaluate_due and lead:
                    report = evaluate_now(synset, test_set, eval_options)
                    records[-1]["eval"] = dict(mean=report.mean, std=report.std, accuracies=report.accuracies)
                publish(records)
                if checkpoint_due:
                    board.flush()
                    write_checkpoint(done)
                    last_saved, written_at = done, time.monotonic()
                if stopping:
                    raise KeyboardInterrupt(f"stopped by signal after iteration {done}"
                                            + (f"; resume from {checkpoint}" if checkpoint else ""))
    finally:
        logger.close()
        board.close()
        if bar is not None:
            bar.close()
    if shard.sharded:
        algorithm.gather(synset)
    algorithm.finish(synset)
    synset.images = synset.images.detach()
    synset.meta["seconds"] = round(time.perf_counter() - began, 3)
    return synset


def evaluate_now(synset: SyntheticSet, test_set: ImageDataset, eval_options: dict | None):
    from condense_engine.evaluate import evaluate

    snapshot = synset.clone()
    snapshot.images = snapshot.images.detach()
    return evaluate(snapshot, test_set, **(eval_options or {}))


def _restore(path: str, config: dict, synset: SyntheticSet, algorithm, generator) -> tuple[int, float]:
    """Load a checkpoint of this run, or of the same run with fewer iterations: no method's step
    reads the total, so continuing a shorter run's last state is the longer run exactly. Returns
    its iteration and the run's seconds until then (0 for checkpoints that predate the record)."""
    state = load_checkpoint(path, map_location="cpu")
    differences = run_differences(state["config"], config)
    if differences:
        raise ValueError(f"{path} belongs to another run: {'; '.join(differences)}. Remove it, or resume with "
                         f"the settings it was written with")
    total = config["options"]["iterations"]
    if state["iteration"] > total:
        raise ValueError(f"{path} is at iteration {state['iteration']}, beyond this run's {total} iterations")
    with torch.no_grad():
        synset.images.copy_(state["images"].to(synset.images.device))
    algorithm.load_state_dict(state["method"])
    restore_rng_state(state["rng"], generators=[generator])
    return int(state["iteration"]), float(state.get("seconds", 0.0))


def run_config(algorithm, dataset: ImageDataset, ipc: int, seed: int) -> dict:
    """What makes a run this run, as its checkpoint records it: method, data (name and
    fingerprint), IPC, seed and every option."""
    return dict(method=algorithm.name, dataset=dataset.name, data=dataset.fingerprint(), ipc=ipc, seed=seed,
                options=algorithm.options)


def run_differences(saved: dict, here: dict) -> list:
    """How the run of config `saved` differs from the run `here`, ignoring the iteration count
    (runs that differ only in length continue each other) and the data fingerprint where `saved`
    predates it; empty for the same run."""
    def flat(config):
        fields = {key: value for key, value in config.items() if key != "options"}
        fields.update({f"option {key}": value for key, value in config["options"].items() if key != "iterations"})
        return fields

    saved_fields, here_fields = flat(saved), flat(here)
    if "data" not in saved_fields:
        here_fields.pop("data", None)

    def shown(fields, key):
        return repr(fields[key]) if key in fields else "absent"

    names = dict(data="the data's fingerprint")
    return [f"{names.get(key, key)} {shown(saved_fields, key)} there, {shown(here_fields, key)} here"
            for key in sorted(saved_fields.keys() | here_fields.keys())
            if key not in saved_fields or key not in here_fields or saved_fields[key] != here_fields[key]]


def _progress(enabled: bool, start: int, total: int, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=f"distill[{name}]", dynamic_ncols=True)
