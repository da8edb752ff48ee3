"""Expert trajectories for trajectory matching (MTT/TESLA/DATM; methods.md §6.1, §8.1).

An expert is a ConvNet trained on the whole real set with plain SGD (lr 0.01, no momentum, no
weight decay, no lr decay, batch 256) and per-sample DSA, its flat parameter vector snapshotted
at initialisation and after every epoch: a trajectory of shape (epochs + 1, P). DATM's "flat"
experts use GSAM over that SGD instead (`optimizer="gsam"`: ρ 0.01, α 0.3, adaptive; gsam.py).

A buffer is a folder: one file per expert (`expert_0000.pt`, ...) plus `index.pt` listing the
finished experts and the buffer's metadata (data set, ZCA or not, model and its architecture,
augmentation, image size, classes, optimiser settings, seed, library version). Each file is
written atomically and the index is rewritten after every expert; an expert still training saves
its state (`expert_0000.partial.pt`: trajectory so far, generator, momentum) after an epoch every
PARTIAL_EVERY_SECONDS. So a crash loses at most about that much training, and running the same
command again continues every expert where it stopped, to the same result (every expert's
randomness depends only on (seed, expert number)).
`load_experts` reads the index only; trajectories are memory-mapped when first accessed.

Under torchrun the ranks share out the experts still to train (rank r takes every world-th),
each on its own device, and write their files into the same folder; rank 0 keeps the index
current and completes it once every rank is done. The buffer equals the one-process buffer.
"""
import argparse
import contextlib
import os
import time
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import stack_module_state

from condense_engine import __version__, distributed
from condense_engine.checkpoint import (atomic_save, check_format, load_failure_reason, load_versioned,
                                        read_torch_file, require_writable_folder)
from condense_engine.datasets.rows import PLACEMENTS, RealImages, check_placement
from condense_engine.device import resolve_device
from condense_engine.evaluate_batched import augment_each, cross_entropy_of, stacked_template, unbatchable_reason
from condense_engine.gsam import GSAM
from condense_engine.models import FunctionalConvNet, convnet_config
from condense_engine.ops.dsa import DSAParams, default_strategy, dsa

FORMAT_VERSION = 1
EXPERT_KIND = "condense-engine/expert"
INDEX_KIND = "condense-engine/expert-index"
PARTIAL_KIND = "condense-engine/expert-partial"
INDEX_FILE = "index.pt"
#: An unfinished expert's state is saved after an epoch once this many seconds have passed since
#: the last save (or its start), so a crash loses at most about this much training.
PARTIAL_EVERY_SECONDS = 120.0
# Metadata that describes the library, not the experts: ignored when deciding whether an
# existing buffer folder may be continued.
_PROVENANCE_KEYS = ("library_version",)
OPTIMIZERS = ("sgd", "gsam")
# DATM's expert GSAM settings (methods.md §8.1: rho_max = rho_min = 0.01, alpha 0.3, adaptive).
DATM_GSAM = dict(rho=0.01, alpha=0.3, adaptive=True)


def expert_file_name(number: int) -> str:
    return f"expert_{number:04d}.pt"


def partial_file_name(number: int) -> str:
    """The file of an unfinished expert's state (not an expert file: expert_number gives None)."""
    return f"expert_{number:04d}.partial.pt"


@dataclass
class ExpertState:
    """An unfinished expert after some epochs: what continues it exactly where it stopped."""
    trajectory: torch.Tensor        # (epochs done + 1, P) on the CPU; the last row is the current parameters
    epoch_losses: list
    generator: torch.Tensor         # the state of the expert's generator (batch order, DSA draws)
    momentum: torch.Tensor | None   # flat SGD momentum buffer (P,); None without momentum


def expert_number(name: str) -> int | None:
    """The number in an expert file's name (expert_file_name's inverse), None for other names."""
    stem, dot, extension = name.partition(".")
    if extension != "pt" or not stem.startswith("expert_") or not stem[len("expert_"):].isdigit():
        return None
    return int(stem[len("expert_"):])


def _dataset_key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def _expert_generator(seed: int, number: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, expert number): experts are reproducible alone."""
    state = np.random.SeedSequence([int(seed), int(number)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def buffer_meta(dataset, model: str, *, epochs: int, lr: float, momentum: float, weight_decay: float,
                batch_size: int, strategy: str | None, seed: int, optimizer: str = "sgd",
                gsam: dict | None = None) -> dict:
    """The metadata stored with every buffer (plain values only, so files load weights_only).

    `gsam` (rho, alpha, adaptive) is recorded only for optimizer "gsam".
    """
    student = student_network(dict(model=model, model_config=convnet_config(model),
                                   channels=dataset.channels, num_classes=dataset.num_classes,
                                   image_size=list(dataset.image_size)))
    return dict(dataset=dataset.name, zca=dataset.zca is not None, model=model,
                model_config=convnet_config(model), channels=dataset.channels,
                image_size=list(dataset.image_size), num_classes=dataset.num_classes,
                num_params=student.num_params, augmentation=strategy, epochs=int(epochs), lr=float(lr),
                momentum=float(momentum), weight_decay=float(weight_decay), batch_size=int(batch_size),
                seed=int(seed), optimizer=optimizer, **(gsam or {}), library_version=__version__)


def _upgraded(meta: dict) -> dict:
    """Metadata of buffers written before the optimiser was recorded: those experts used SGD."""
    return {"optimizer": "sgd", **meta}


def student_network(meta: dict) -> FunctionalConvNet:
    """The FunctionalConvNet whose flat parameters a buffer with this metadata holds."""
    return FunctionalConvNet(meta["channels"], meta["num_classes"], im_size=tuple(meta["image_size"]),
                             **meta["model_config"])


class ExpertBuffer:
    """Expert trajectories with their metadata; `buffer[i]` is expert i's (epochs + 1, P) tensor.

    Folder-backed buffers (from `load_experts`) open an expert's file on first access,
    memory-mapped, so only the snapshots actually read are paged in.
    """

    def __init__(self, meta: dict, *, trajectories: list | None = None, folder: str | None = None,
                 files: list | None = None):
        self.meta = meta
        self.folder = folder
        self._files = list(files or [])
        self._trajectories = dict(enumerate(trajectories)) if trajectories is not None else {}
        self._count = len(trajectories) if trajectories is not None else len(self._files)

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        where = f", folder={self.folder!r}" if self.folder else ""
        return (f"ExpertBuffer({self._count} experts, {self.meta['epochs']} epochs, {describe_optimizer(self.meta)}, "
                f"{self.meta['model']} on {self.meta['dataset']}{' (zca)' if self.meta['zca'] else ''}{where})")

    @property
    def num_epochs(self) -> int:
        return int(self.meta["epochs"])

    def network(self) -> FunctionalConvNet:
        return student_network(self.meta)

    def __getitem__(self, number: int) -> torch.Tensor:
        if not -self._count <= number < self._count:
            raise IndexError(f"expert {number} out of range: the buffer holds {self._count}")
        number %= self._count
        if number not in self._trajectories:
            self._trajectories[number] = self._read(number)
        return self._trajectories[number]

    def _read(self, number: int) -> torch.Tensor:
        path = os.path.join(self.folder, self._files[number])
        if not os.path.exists(path):
            raise FileNotFoundError(f"expert file {path} listed in {os.path.join(self.folder, INDEX_FILE)} "
                                    "is missing")
        try:
            content = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        except Exception as error:
            raise ValueError(f"expert file {path} is corrupt or truncated ({load_failure_reason(error)}); "
                             "delete it and its entry will be retrained by running `condense experts` "
                             "again with the same settings") from error
        content = check_format(content, EXPERT_KIND, FORMAT_VERSION, path)
        trajectory = content.get("trajectory")
        expected = (self.num_epochs + 1, self.meta["num_params"])
        if not isinstance(trajectory, torch.Tensor) or tuple(trajectory.shape) != expected:
            found = tuple(trajectory.shape) if isinstance(trajectory, torch.Tensor) else type(trajectory).__name__
            raise ValueError(f"expert file {path} holds a trajectory of shape {found}, expected {expected}")
        if _without_provenance(_upgraded(content["meta"])) != _without_provenance(self.meta):
            raise ValueError(f"expert file {path} was trained with other settings than its buffer index says")
        return trajectory


def describe_optimizer(meta: dict) -> str:
    """The experts' optimiser in words, e.g. "sgd lr 0.01" or "gsam lr 0.01 (rho 0.01, alpha 0.3, adaptive)"."""
    text = f"{meta['optimizer']} lr {meta['lr']:g}"
    if meta["optimizer"] == "gsam":
        text += f" (rho {meta['rho']:g}, alpha {meta['alpha']:g}{', adaptive' if meta['adaptive'] else ''})"
    return text


def _without_provenance(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in _PROVENANCE_KEYS}


def _read_index(folder: str) -> dict:
    return load_versioned(os.path.join(folder, INDEX_FILE), INDEX_KIND, FORMAT_VERSION)


def load_experts(path) -> ExpertBuffer:
    """Open a buffer folder (or its index.pt): metadata now, trajectories lazily on access."""
    path = os.fspath(path)
    folder = os.path.dirname(path) if os.path.basename(path) == INDEX_FILE else path
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no expert buffer at {path}: expected a folder written by "
                                "`condense experts` / train_experts(out=...)")
    if not os.path.exists(os.path.join(folder, INDEX_FILE)):
        raise FileNotFoundError(f"{folder} has no {INDEX_FILE}: it is not an expert buffer "
                                "(train one with `condense experts --out {folder}`)")
    index = _read_index(folder)
    if not index["experts"]:
        raise ValueError(f"the expert buffer {folder} holds no finished expert yet")
    return ExpertBuffer(_upgraded(index["meta"]), folder=folder, files=index["experts"])


def check_compatible(meta: dict, dataset, model, zca: bool) -> None:
    """ValueError unless a buffer with this metadata fits `dataset`, `model` and ZCA use `zca`.

    `model` is a ConvNet* name or a FunctionalConvNet. Trajectories only make sense for the
    data and network they were trained on: the same data set, whitening, architecture, image
    size and number of classes.
    """
    source = (f"the expert buffer (trained on {meta['dataset']}{' with ZCA' if meta['zca'] else ''}, {meta['model']}, "
              f"{describe_optimizer(_upgraded(meta))})")
    if _dataset_key(meta["dataset"]) != _dataset_key(dataset.name):
        raise ValueError(f"{source} does not fit data set {dataset.name!r}: it was trained on {meta['dataset']!r}")
    if bool(meta["zca"]) != bool(zca):
        if meta["zca"]:
            raise ValueError(f"{source} was trained on ZCA-whitened images but the data here are not whitened; "
                             "load the data with zca=True, or use a buffer trained without ZCA")
        raise ValueError(f"{source} was trained without ZCA but the data here are ZCA-whitened; "
                         "load the data without zca, or train a buffer on the whitened data")
    if list(meta["image_size"]) != list(dataset.image_size) or meta["channels"] != dataset.channels:
        raise ValueError(f"{source} expects {meta['channels']}×{'×'.join(map(str, meta['image_size']))} images, "
                         f"the data set has {dataset.channels}×{'×'.join(map(str, dataset.image_size))}")
    if meta["num_classes"] != dataset.num_classes:
        raise ValueError(f"{source} has {meta['num_classes']} classes, the data set has {dataset.num_classes}")
    if isinstance(model, FunctionalConvNet):
        expected = dict(meta["model_config"], channel=meta["channels"], im_size=tuple(meta["image_size"]))
        found = {k: model.config[k] for k in expected}
        if found != expected or model.num_classes != meta["num_classes"]:
            raise ValueError(f"{source} was trained with architecture {expected}, the student has {found}")
    elif model != meta["model"] and convnet_config(model) != meta["model_config"]:
        raise ValueError(f"{source} was trained with model {meta['model']!r}, not {model!r}")


def train_expert(real: RealImages, student: FunctionalConvNet, meta: dict, number: int, device,
                 on_epoch=None, resume: ExpertState | None = None) -> tuple:
    """Train expert `number` on the `real` images, or continue it from `resume`; returns
    (trajectory (epochs + 1, P) on the CPU, mean loss per epoch). After each epoch
    `on_epoch(epoch, [loss], states)` is called (epoch 1-based; `states()` gives [ExpertState])."""
    generator = _expert_generator(meta["seed"], number)
    init_seed = int(torch.randint(0, 2**62, (), generator=generator))
    if resume:
        generator.set_state(resume.generator)
    net = student.to_module(resume.trajectory[-1] if resume else student.init_params(init_seed)).to(device)
    optimizer = _expert_optimizer(net, meta)
    if resume:
        _restore_momentum(optimizer, student, dict(net.named_parameters()), [resume.momentum], stacked=False)
    strategy, size = meta["augmentation"], tuple(meta["image_size"])
    count = len(real)
    snapshots = list(resume.trajectory) if resume else [student.flatten(net).cpu()]
    epoch_losses = list(resume.epoch_losses) if resume else []

    def states() -> list:
        momentum = _momentum_rows(optimizer, list(net.parameters()), 1)
        return [ExpertState(torch.stack(snapshots), list(epoch_losses), generator.get_state(),
                            None if momentum is None else momentum[0])]

    for _ in range(len(epoch_losses), meta["epochs"]):
        total = torch.zeros((), device=device)
        for batch in torch.randperm(count, generator=generator).split(meta["batch_size"]):
            images = real.normalized(batch)
            if strategy:
                params = DSAParams.sample(len(batch), strategy, size=size, siamese=False, generator=generator,
                                          device=device)
                images = dsa(images, params)
            labels = real.labels_at(batch)

            def batch_loss():  # GSAM calls it twice on the same (augmented) batch
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(net(images), labels)
                loss.backward()
                return loss

            loss = optimizer.step(batch_loss)
            total += loss.detach() * len(batch)
        epoch_losses.append(float(total) / count)
        snapshots.append(student.flatten(net).cpu())
        if on_epoch:
            on_epoch(len(epoch_losses), epoch_losses[-1:], states)
    return torch.stack(snapshots), epoch_losses


def train_expert_group(real: RealImages, student: FunctionalConvNet, meta: dict, numbers: list, device,
                       on_epoch=None, resume: list | None = None) -> list:
    """train_expert for each of `numbers` at once, as one vmapped model: one batched forward and
    backward per step instead of len(numbers). Each expert keeps its own initialisation, batch
    order and DSA draws (from its own generator, in the loop's order), and SGD is elementwise, so
    the trajectories are train_expert's up to float rounding. SGD experts without buffers only.
    `on_epoch(epoch, losses, states)` gets every expert's loss of each epoch; `resume` continues
    the experts from their ExpertStates, which must all have stopped at the same epoch."""
    generators = [_expert_generator(meta["seed"], number) for number in numbers]
    init_seeds = [int(torch.randint(0, 2**62, (), generator=g)) for g in generators]
    if resume:
        if len({len(state.epoch_losses) for state in resume}) != 1:
            raise ValueError("experts continued together must have stopped at the same epoch")
        for generator, state in zip(generators, resume):
            generator.set_state(state.generator)
    starts = [state.trajectory[-1] for state in resume] if resume else [student.init_params(s) for s in init_seeds]
    nets = [student.to_module(start).to(device) for start in starts]
    template = stacked_template(nets[0])
    params, _ = stack_module_state(nets)
    batched_loss = torch.vmap(cross_entropy_of(template))
    optimizer = torch.optim.SGD(params.values(), lr=meta["lr"], momentum=meta["momentum"],
                                weight_decay=meta["weight_decay"])
    if resume:
        _restore_momentum(optimizer, student, params, [state.momentum for state in resume], stacked=True)
    strategy, count, experts = meta["augmentation"], len(real), len(numbers)

    def flat() -> torch.Tensor:  # (experts, P) in the student's parameter order
        return _flat_rows([params[name] for name in student.names], experts)

    snapshots = list(torch.stack([state.trajectory for state in resume]).unbind(1)) if resume else [flat()]
    epoch_losses = [list(losses) for losses in zip(*(state.epoch_losses for state in resume))] if resume else []

    def states() -> list:
        trajectories = torch.stack(snapshots, dim=1)
        momenta = _momentum_rows(optimizer, [params[name] for name in student.names], experts)
        return [ExpertState(trajectories[e], [losses[e] for losses in epoch_losses], generator.get_state(),
                            None if momenta is None else momenta[e]) for e, generator in enumerate(generators)]

    for _ in range(len(epoch_losses), meta["epochs"]):
        orders = torch.stack([torch.randperm(count, generator=g) for g in generators])
        total = torch.zeros(experts, device=device)
        for start in range(0, count, meta["batch_size"]):
            index = orders[:, start:start + meta["batch_size"]]
            images = real.normalized(index.reshape(-1)).view(*index.shape, *real.images.shape[1:])
            if strategy:
                images = augment_each(images, strategy, generators)
            losses = batched_loss(params, images, real.labels_at(index))
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            total += losses.detach() * index.shape[1]
        epoch_losses.append((total / count).tolist())
        snapshots.append(flat())
        if on_epoch:
            on_epoch(len(epoch_losses), epoch_losses[-1], states)
    trajectories = torch.stack(snapshots, dim=1)
    return [(trajectories[e], [losses[e] for losses in epoch_losses]) for e in range(experts)]


def _flat_rows(tensors: list, rows: int) -> torch.Tensor:
    """Tensors with `rows` experts stacked in front (in the student's parameter order) joined into
    (rows, P) on the CPU: each expert's flat vector."""
    return torch.cat([tensor.detach().reshape(rows, -1) for tensor in tensors], dim=1).cpu()


def _momentum_rows(optimizer: torch.optim.Optimizer, tensors: list, rows: int) -> torch.Tensor | None:
    """The SGD momentum buffers of `tensors` as _flat_rows; None without momentum."""
    buffers = [optimizer.state[tensor].get("momentum_buffer") for tensor in tensors]
    return None if any(buffer is None for buffer in buffers) else _flat_rows(buffers, rows)


def _restore_momentum(optimizer: torch.optim.Optimizer, student: FunctionalConvNet, tensors: dict, momenta: list,
                      stacked: bool) -> None:
    """Put the experts' flat momentum buffers back into the optimizer's state of `tensors` (by
    parameter name; `stacked`: the experts' tensors are stacked in front, as vmapped)."""
    if momenta[0] is None:
        return
    unflattened = [student.unflatten(momentum) for momentum in momenta]
    for name in student.names:
        pieces = [buffers[name] for buffers in unflattened]
        buffer = torch.stack(pieces) if stacked else pieces[0]
        optimizer.state[tensors[name]]["momentum_buffer"] = buffer.to(tensors[name].device).clone()


def _expert_optimizer(net: torch.nn.Module, meta: dict) -> torch.optim.Optimizer:
    if meta["optimizer"] == "gsam":
        return GSAM(net.parameters(), lr=meta["lr"], rho=meta["rho"], alpha=meta["alpha"],
                    adaptive=meta["adaptive"], momentum=meta["momentum"], weight_decay=meta["weight_decay"])
    return torch.optim.SGD(net.parameters(), lr=meta["lr"], momentum=meta["momentum"],
                           weight_decay=meta["weight_decay"])


def train_experts(dataset, num_experts: int, epochs: int, *, model: str = "ConvNet", lr: float = 0.01,
                  momentum: float = 0.0, weight_decay: float = 0.0, batch_size: int = 256, dsa: bool = True,
                  dsa_strategy: str | None = None, optimizer: str = "sgd", rho: float | None = None,
                  alpha: float | None = None, adaptive: bool | None = None, device=None, seed: int = 0,
                  out=None, progress: bool = False, parallel: int = 1,
                  images_on: str = "device") -> ExpertBuffer:
    """Train `num_experts` experts for `epochs` epochs each (MTT's buffer.py recipe by default).

    `optimizer="gsam"` trains DATM's flat experts: GSAM over the SGD settings, with `rho`,
    `alpha` and `adaptive` defaulting to DATM's (0.01, 0.3, True); they are refused with "sgd".
    The data are used as given: a ZCA-whitened ImageDataset yields a ZCA buffer (recorded in
    the metadata). With `out`, each expert is saved as soon as it is done and an existing
    buffer there with the same settings is continued; without it the buffer stays in memory.
    `parallel` experts train at once as one vmapped model (`train_expert_group`; SGD only): as
    many as the device's memory holds, each costing one expert's activations.
    `images_on="host"` leaves the real images off the device and moves each batch there
    (`datasets.rows.RealImages`; for a set larger than the device's memory): the same experts.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not lr > 0:
        raise ValueError(f"lr must be a positive learning rate, got {lr}")
    if not (momentum >= 0 and weight_decay >= 0):
        raise ValueError(f"momentum and weight_decay must be non-negative, got {momentum} and {weight_decay}")
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"parallel must be a positive int, got {parallel!r}")
    if parallel > 1 and optimizer != "sgd":
        raise ValueError(f"parallel experts train with SGD only; optimizer {optimizer!r} trains one at a time")
    check_placement(images_on)
    gsam = _gsam_settings(optimizer, rho=rho, alpha=alpha, adaptive=adaptive)
    device = resolve_device(device)
    strategy = (dsa_strategy or default_strategy(dataset.name)) if dsa else None
    meta = buffer_meta(dataset, model, epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                       batch_size=batch_size, strategy=strategy, seed=seed, optimizer=optimizer, gsam=gsam)
    student = student_network(meta)
    rank, world = distributed.rank(), distributed.world_size()
    if world > 1 and out is None:
        raise ValueError(f"training experts across {world} ranks needs out=<folder>: each rank writes its "
                         "experts there")
    distributed.check_on_every_rank(lambda: out is None or require_writable_folder(out, "expert files"))
    # Rank 0's view of the finished experts for every rank: ranks listing the folder themselves
    # at different moments could split the missing experts differently.
    finished = distributed.lead_value(
        lambda: {expert_number(name) for name in _finished_files(out, meta)} if out is not None else set())
    numbers = [number for number in range(num_experts) if number not in finished][rank::world]
    trajectories = []
    real = RealImages(dataset, device, images_on)
    if parallel > 1:
        probe = [student.to_module(student.init_params(0)).to(device) for _ in range(2)]
        reason = unbatchable_reason(model, probe, real.normalized(torch.arange(1)))
        if reason:
            raise ValueError(f"parallel experts need a model torch.func can batch: {reason}")
    where = f"rank {rank}: " if world > 1 else ""
    unfinished = {number: _load_partial(out, number, meta) for number in numbers} if out is not None else {}
    for group in _groups(numbers, unfinished, parallel):
        began = time.perf_counter()
        on_epoch = _epoch_hook(where, group, num_experts, meta, out, progress, began)
        resume = [unfinished[number] for number in group] if unfinished.get(group[0]) else None
        if len(group) > 1:
            results = train_expert_group(real, student, meta, group, device, on_epoch, resume)
        else:
            results = [train_expert(real, student, meta, group[0], device, on_epoch, resume and resume[0])]
        for number, (trajectory, losses) in zip(group, results):
            if out is None:
                trajectories.append(trajectory)
            else:
                atomic_save({"format": EXPERT_KIND, "format_version": FORMAT_VERSION, "meta": meta,
                             "number": number, "epoch_losses": losses, "trajectory": trajectory},
                            os.path.join(out, expert_file_name(number)))
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(out, partial_file_name(number)))
                if rank == 0:
                    _write_index(out, meta)
            if progress:
                print(f"{where}expert {number + 1}/{num_experts}: final train loss {losses[-1]:.4f} "
                      f"({time.perf_counter() - began:.1f} s for {len(group)})", flush=True)
    if out is None:
        return ExpertBuffer(meta, trajectories=trajectories)
    distributed.barrier()  # every rank's experts are written

    def listed_missing() -> list:
        _write_index(out, meta)
        listed = {expert_number(name) for name in _read_index(os.fspath(out))["experts"]}
        return sorted(set(range(num_experts)) - listed)

    missing = distributed.lead_value(listed_missing)
    if missing:
        raise ValueError(f"{out} lacks experts {missing} after every rank finished: the ranks must write to a "
                         "folder on a file system they all see")
    return load_experts(out)


def _groups(numbers: list, unfinished: dict, parallel: int) -> list:
    """`numbers` in groups of up to `parallel` that train together: experts that stopped at the
    same epoch (none started: 0), so an interrupted run continues every expert where it stopped."""
    by_epoch = {}
    for number in numbers:
        state = unfinished.get(number)
        by_epoch.setdefault(len(state.epoch_losses) if state else 0, []).append(number)
    return [bucket[i:i + parallel] for bucket in by_epoch.values() for i in range(0, len(bucket), parallel)]


def _epoch_hook(where: str, group: list, num_experts: int, meta: dict, out, progress: bool, began: float):
    """on_epoch callback of a group: with `progress` it prints the epoch, train losses and time so
    far (an expert can take hours on a CPU); with `out` it saves each unfinished expert's state
    once PARTIAL_EVERY_SECONDS have passed since the last save, as the expert file is written only
    when the expert is done."""
    names = ", ".join(str(number + 1) for number in group)
    saved = [began]

    def on_epoch(epoch: int, losses: list, states) -> None:
        if progress:
            print(f"{where}expert{'s' if len(group) > 1 else ''} {names} of {num_experts}, epoch {epoch}/"
                  f"{meta['epochs']}: train loss {' '.join(f'{loss:.4f}' for loss in losses)} "
                  f"({time.perf_counter() - began:.1f} s)", flush=True)
        if out is not None and epoch < meta["epochs"] and time.perf_counter() - saved[0] >= PARTIAL_EVERY_SECONDS:
            for number, state in zip(group, states()):
                atomic_save({"format": PARTIAL_KIND, "format_version": FORMAT_VERSION, "meta": meta, "number": number,
                             **vars(state)}, os.path.join(out, partial_file_name(number)))
            saved[0] = time.perf_counter()
    return on_epoch


def _load_partial(folder, number: int, meta: dict) -> ExpertState | None:
    """Expert `number`'s saved unfinished state in `folder`, None when there is none. ValueError
    when the file is damaged or was written with other settings."""
    path = os.path.join(folder, partial_file_name(number))
    if not os.path.exists(path):
        return None
    try:
        content = check_format(read_torch_file(path, "cpu"), PARTIAL_KIND, FORMAT_VERSION, path)
    except ValueError as err:
        raise ValueError(f"{err}; delete {path} to train expert {number} from its start") from err
    _check_same_settings(os.fspath(folder), content["meta"], meta)
    return ExpertState(**{field.name: content[field.name] for field in fields(ExpertState)})


def _write_index(folder, meta: dict) -> None:
    """Rewrite `folder`'s index to list every finished expert file there."""
    atomic_save({"format": INDEX_KIND, "format_version": FORMAT_VERSION, "meta": meta,
                 "experts": _finished_files(folder, meta)}, os.path.join(folder, INDEX_FILE))


def _gsam_settings(optimizer: str, **given) -> dict | None:
    """DATM's GSAM settings overridden by those given; None (and none given) for SGD."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown expert optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    chosen = {name: value for name, value in given.items() if value is not None}
    if optimizer == "sgd":
        if chosen:
            raise ValueError(f"{', '.join(chosen)} only apply to optimizer='gsam', not 'sgd'")
        return None
    settings = dict(DATM_GSAM, **chosen)
    return dict(rho=float(settings["rho"]), alpha=float(settings["alpha"]), adaptive=bool(settings["adaptive"]))


def _finished_files(folder, meta: dict) -> list:
    """The finished expert files in `folder`, in expert order: those its index lists (unless
    deleted since, e.g. a damaged one, to be trained again) and those written after the index was
    (by another rank, or just before a crash). ValueError when the folder holds a buffer trained
    with other settings."""
    folder = os.fspath(folder)
    listed = []
    if os.path.exists(os.path.join(folder, INDEX_FILE)):
        index = _read_index(folder)
        _check_same_settings(folder, _upgraded(index["meta"]), meta)
        listed = [name for name in index["experts"] if os.path.exists(os.path.join(folder, name))]  # deleted: redo
    unlisted = [name for name in (os.listdir(folder) if os.path.isdir(folder) else [])
                if expert_number(name) is not None and name not in listed]
    for name in unlisted:
        path = os.path.join(folder, name)
        content = check_format(read_torch_file(path, "cpu", mmap=True), EXPERT_KIND, FORMAT_VERSION, path)
        _check_same_settings(folder, _upgraded(content["meta"]), meta)
    return sorted(listed + unlisted, key=expert_number)


def _check_same_settings(folder: str, existing: dict, meta: dict) -> None:
    if _without_provenance(existing) != _without_provenance(meta):
        changed = sorted(k for k in set(meta) | set(existing)
                         if k not in _PROVENANCE_KEYS and existing.get(k) != meta.get(k))
        raise ValueError(f"{folder} already holds an expert buffer trained with other settings "
                         f"(differing: {', '.join(changed)}); choose another folder")


def add_experts_command(subparsers) -> argparse.ArgumentParser:
    """Add `condense experts` (train an expert-trajectory buffer) to the CLI's subparsers."""
    p = subparsers.add_parser(
        "experts", help="train expert trajectories for trajectory matching (mtt, tesla, datm)",
        description="Train ConvNet experts on the whole training split with SGD (MTT's buffer.py) or GSAM "
        "over SGD (DATM's flat experts) and DSA, saving every epoch's parameters. Re-running with the same "
        "--out continues an interrupted run. Under torchrun the ranks share out the experts, one device each.")
    p.add_argument("--dataset", required=True, help="data set name (see `condense datasets list`)")
    p.add_argument("--root", default=None, help="folder (or file) holding the data set's files")
    p.add_argument("--num-experts", type=int, default=100, help="experts to train (100)")
    p.add_argument("--epochs", type=int, default=50, help="epochs per expert (50; DATM uses 100)")
    p.add_argument("--model", default="ConvNet", help="ConvNet variant (ConvNet; ConvNetD4 for 64 px)")
    p.add_argument("--lr", type=float, default=0.01, help="expert SGD learning rate (0.01)")
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                   help="sgd (MTT) or gsam: sharpness-aware GSAM over that SGD (DATM's experts)")
    p.add_argument("--rho", type=float, default=None,
                   help=f"GSAM perturbation radius ({DATM_GSAM['rho']}; gsam only)")
    p.add_argument("--alpha", type=float, default=None,
                   help=f"GSAM surrogate-gap weight ({DATM_GSAM['alpha']}; gsam only)")
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                   help="GSAM's weight-scaled (ASAM) perturbation (on; gsam only)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--parallel", type=int, default=1,
                   help="experts trained at once as one batched model (1; SGD only; as many as memory holds)")
    p.add_argument("--zca", action="store_true", help="ZCA-whiten the data first (a ZCA buffer)")
    p.add_argument("--no-dsa", action="store_true", help="train without DSA augmentation")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="buffer folder to write")
    p.add_argument("--real-images-on", choices=PLACEMENTS, default="device",
                   help="where the real images stay: on the device (default, fastest) or on the host, "
                        "moving each batch (for a set larger than the device's memory)")
    return p


def run_experts_command(args) -> int:
    """Run `condense experts`: train (or continue) the buffer and print where it is. Under
    torchrun every rank trains its share of the experts on its own device."""
    from condense_engine import datasets

    def work(device) -> int:
        train = datasets.load(args.dataset, root=args.root, split="train", zca=True if args.zca else None)
        buffer = train_experts(train, args.num_experts, args.epochs, model=args.model, lr=args.lr,
                               momentum=args.momentum, weight_decay=args.weight_decay, batch_size=args.batch_size,
                               dsa=not args.no_dsa, optimizer=args.optimizer, rho=args.rho, alpha=args.alpha,
                               adaptive=args.adaptive, device=device, seed=args.seed, out=args.out, progress=True,
                               parallel=args.parallel, images_on=args.real_images_on)
        if distributed.rank() == 0:
            print(f"{buffer}", flush=True)
        return 0

    if not distributed.launched_by_torchrun():
        return work(args.device)
    device = distributed.init_from_env(args.device)
    return distributed.run_ranked(lambda: work(device))
