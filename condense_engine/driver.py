"""`ce.distill`: the loop every method runs in (SPEC §5).

The driver owns everything that is not the method's own algorithm: resolving the input data,
initialising the synthetic set from real images, the progress bar, JSON-lines logging,
periodic evaluation, atomic checkpoints (every N iterations and on SIGTERM/SIGINT), exact
resume, and the guard that stops on a non-finite loss while keeping the last good checkpoint.
"""
import json
import math
import os
import time

import torch

from condense_engine import __version__
from condense_engine.checkpoint import (capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint,
                                        stop_flag_on_signal)
from condense_engine.datasets import ClassSampler, ImageDataset, from_tensors, from_torch_dataset
from condense_engine.errors import NonFiniteError, NonFiniteLossError
from condense_engine.methods import get_method
from condense_engine.synset import SyntheticSet

def as_dataset(data) -> ImageDataset:
    """An ImageDataset from an ImageDataset, an (images, labels) pair or a torch Dataset."""
    if isinstance(data, ImageDataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return from_tensors(*data)
    if isinstance(data, torch.utils.data.Dataset):
        return from_torch_dataset(data)
    raise TypeError(f"distill needs an ImageDataset, an (images, labels) tensor pair or a torch Dataset, "
                    f"got {type(data).__name__}")


def initial_synset(dataset: ImageDataset, sampler: ClassSampler, ipc: int, generator, meta: dict) -> SyntheticSet:
    """`ipc` random real images per class, ordered class by class (the published real init)."""
    images, labels = sampler.random_real(ipc, generator)
    order = torch.sort(labels.cpu(), stable=True).indices.to(labels.device)
    return SyntheticSet.from_tensors(images[order].detach().clone(), labels[order], num_classes=dataset.num_classes,
                                     classes=list(dataset.classes), mean=dataset.mean, std=dataset.std,
                                     zca=dataset.zca, meta=meta)


class _JsonLog:
    def __init__(self, path: str | None, append: bool):
        self.file = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def distill(dataset, method: str = "dm", ipc: int = 10, iterations: int | None = None, device=None,
            seed: int = 0, *, test_set: ImageDataset | None = None, eval_every: int = 0,
            eval_options: dict | None = None, checkpoint: str | None = None, checkpoint_every: int = 500,
            resume: bool = False, log: str | None = None, progress: bool = True, **options) -> SyntheticSet:
    """Condense `dataset` into `ipc` images per class with `method`; returns a SyntheticSet.

    Method options (e.g. lr_img, batch_real) pass through `**options`; defaults come from the
    method's table for the data set and IPC. With `checkpoint` set, the state is written
    atomically every `checkpoint_every` iterations and when SIGTERM/SIGINT arrives, and
    `resume=True` continues from it (bit-identically on CPU). `test_set` with `eval_every > 0`
    evaluates the set periodically (`eval_options` go to `ce.evaluate`).
    """
    dataset = as_dataset(dataset)
    counts = dataset.class_counts()
    if not isinstance(ipc, int) or ipc < 1:
        raise ValueError(f"ipc must be a positive integer, got {ipc!r}")
    if ipc > int(counts.min()):
        smallest = int(counts.argmin())
        raise ValueError(f"ipc={ipc} is larger than class {smallest} ({dataset.classes[smallest]!r}), "
                         f"which has only {int(counts.min())} images")
    if resume and not checkpoint:
        raise ValueError("resume=True needs checkpoint=<path>")
    algorithm = get_method(method)(dataset.name, ipc, **options)
    if iterations is not None:
        algorithm.options["iterations"] = int(iterations)
    total = algorithm.iterations
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    sampler = ClassSampler(dataset, device=device, generator=generator)
    config = dict(method=algorithm.name, dataset=dataset.name, ipc=ipc, seed=seed, options=algorithm.options)
    meta = dict(config, iterations=total, version=__version__, normalization=dict(mean=dataset.mean, std=dataset.std))
    synset = initial_synset(dataset, sampler, ipc, generator, meta)
    synset.images = synset.images.to(device)
    synset.labels = synset.labels.to(device)
    algorithm.init(synset, dataset, sampler, generator, device)

    start = 0
    if resume and os.path.exists(checkpoint):
        start = _restore(checkpoint, config, synset, algorithm, generator)

    def write_checkpoint(iteration: int) -> None:
        if checkpoint:
            save_checkpoint({"iteration": iteration, "config": config, "images": synset.images.detach().cpu(),
                             "method": algorithm.state_dict(), "rng": capture_rng_state(generators=[generator])},
                            checkpoint)

    logger = _JsonLog(log, append=start > 0)
    bar = _progress(progress, start, total, algorithm.name)
    last_saved = start if (resume and start) else None
    began = time.perf_counter()
    try:
        with stop_flag_on_signal() as stop:
            for iteration in range(start, total):
                try:
                    stats = algorithm.step(synset, iteration)
                    what = None if torch.isfinite(synset.images).all() else "synthetic pixels"
                    if not all(math.isfinite(v) for v in stats.values()):
                        what = f"loss {stats}"
                except NonFiniteError as err:
                    what = f"values ({err})"
                if what:
                    where = (f"the last good checkpoint (iteration {last_saved}) is kept at {checkpoint}"
                             if last_saved is not None else "no checkpoint was written")
                    raise NonFiniteLossError(f"{algorithm.name}: non-finite {what} at iteration {iteration}; "
                                             f"{where}. Try a smaller learning rate (lr_img).")
                done = iteration + 1
                record = dict(iteration=done, seconds=round(time.perf_counter() - began, 3), **stats)
                if test_set is not None and eval_every > 0 and (done % eval_every == 0 or done == total):
                    report = evaluate_now(synset, test_set, eval_options)
                    record["eval"] = dict(mean=report.mean, std=report.std, accuracies=report.accuracies)
                logger.write(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items()})
                if checkpoint and (done % checkpoint_every == 0 or done == total or stop.is_set()):
                    write_checkpoint(done)
                    last_saved = done
                if stop.is_set():
                    raise KeyboardInterrupt(f"stopped by signal after iteration {done}"
                                            + (f"; resume from {checkpoint}" if checkpoint else ""))
    finally:
        logger.close()
        if bar is not None:
            bar.close()
    synset.images = synset.images.detach()
    synset.meta["seconds"] = round(time.perf_counter() - began, 3)
    return synset


def evaluate_now(synset: SyntheticSet, test_set: ImageDataset, eval_options: dict | None):
    from condense_engine.evaluate import evaluate

    snapshot = synset.clone()
    snapshot.images = snapshot.images.detach()
    return evaluate(snapshot, test_set, **(eval_options or {}))


def _restore(path: str, config: dict, synset: SyntheticSet, algorithm, generator) -> int:
    state = load_checkpoint(path, map_location="cpu")
    if state["config"] != config:
        raise ValueError(f"{path} belongs to another run: it has {state['config']}, this run is {config}")
    with torch.no_grad():
        synset.images.copy_(state["images"].to(synset.images.device))
    algorithm.load_state_dict(state["method"])
    restore_rng_state(state["rng"], generators=[generator])
    return int(state["iteration"])


def _progress(enabled: bool, start: int, total: int, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=f"distill[{name}]", dynamic_ncols=True)
