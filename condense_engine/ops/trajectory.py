"""ops.trajectory_match: the trajectory-matching loss and its gradients (SPEC §7).

See `condense_engine.reference.trajectory` for the three memory modes ("unrolled", "exact",
"tesla") and the exact definition of each gradient. This layer validates the inputs (a
ValueError names the argument) and dispatches; only the PyTorch implementation exists, because
the work is convolutions and their double backward, which cuDNN/cuBLAS already run.
"""
import inspect
import math

import torch

from condense_engine.ops._backend import choose
from condense_engine.ops.dsa import DSAParams, dsa
from condense_engine.reference import trajectory as reference
from condense_engine.reference.trajectory import RowShare, TrajectoryResult, schedule

MEMORY_MODES = ("unrolled", "exact", "tesla")

__all__ = ["MEMORY_MODES", "RowShare", "TrajectoryResult", "dsa_augment", "schedule", "trajectory_match"]


def dsa_augment(strategy: str):
    """An `augment` callable for trajectory_match: non-Siamese DSA (per-sample parameters) as MTT
    applies it to every student minibatch, with the parameters drawn from the step's seed.
    `share=(positions, size)` augments rows at those positions of a minibatch of `size` as the
    whole minibatch would (a RowShare's part)."""
    def augment(x: torch.Tensor, step_seed: int, share=None) -> torch.Tensor:
        positions, size = share if share is not None else (None, x.shape[0])
        params = DSAParams.sample(size, strategy, size=tuple(x.shape[2:]), siamese=False,
                                  seed=int(step_seed), device=x.device)
        return dsa(x, params if positions is None else params.select(positions))
    return augment


def trajectory_match(images, labels, lr, start, target, model, *, steps, batch_size, memory="unrolled",
                     augment=None, seed=0, share=None, backend=None) -> TrajectoryResult:
    """Run `steps` student SGD steps from `start` on the synthetic set; match `target`.

    images: float (N, C, H, W) synthetic images; labels: int64 class indices (N,) or float soft
    targets (N, K) (probabilities; their gradient is returned when they require grad); lr: the
    student learning rate, a 0-dim float tensor (or a float); start/target: flat parameter vectors
    of `model` (anything with `forward(x, flat_params)`). Minibatches of `batch_size` (capped at N)
    follow a permutation order drawn from `seed`; `augment(x, step_seed)` is applied per step.
    Returns loss = ‖θ_steps − target‖² / ‖start − target‖² with grad_images, grad_lr (and
    grad_labels). `memory` picks "unrolled", "exact" or "tesla" (see the reference module).
    Values are checked (finite lr, start ≠ target) only on CPU: on a GPU a bad value gives a
    non-finite loss instead of a host sync on every call.

    `share` (a RowShare; "exact" and "tesla" only) splits the set across processes: `images` and
    `labels` are rows share.first … of share.total, every process passes the same other
    arguments, and each gets the whole loss and grad_lr and its rows' gradients. `augment` must
    then take share=(positions, size) (dsa_augment does).
    """
    count = _check_student(images, labels, start, model)
    if share is not None:
        count = _check_share(share, count, memory, augment)
    if not isinstance(target, torch.Tensor) or target.shape != start.shape or target.dtype != start.dtype:
        raise ValueError(f"target must match start ({start.dtype} {tuple(start.shape)}), got {_describe(target)}")
    if target.device != images.device:
        raise ValueError(f"target is on {target.device} but images are on {images.device}")
    lr = _check_lr(lr, start)
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    _check_modes(memory, augment, seed)
    if start.device.type == "cpu" and not bool((start != target).any()):
        raise ValueError("start and target are identical: the normalised loss ‖θ − target‖²/‖start − target‖² "
                         "is undefined")
    choose("trajectory_match", backend, images.device, ("torch",))
    return reference.trajectory_match(images, labels, lr, start, target, model, steps=steps,
                                      batch_size=min(batch_size, count), memory=memory, augment=augment,
                                      seed=seed, share=share)


def _check_share(share, count: int, memory: str, augment) -> int:
    """ValueError unless `share` describes the `count` rows given (and `augment` takes a share);
    the whole set's row count. Checked before any collective, so every process fails alike."""
    if not isinstance(share, RowShare) or not callable(share.sum):
        raise ValueError(f"share must be a RowShare with a callable sum, got {type(share).__name__}")
    if augment is not None and "share" not in inspect.signature(augment).parameters:
        raise ValueError("with a share, augment must accept share=(positions, size) (see dsa_augment)")
    if share.count != count or not 0 <= share.first <= share.total - count:
        raise ValueError(f"share holds rows {share.first}..{share.first + share.count - 1} of {share.total}, "
                         f"but {count} images were given")
    if memory == "unrolled":
        raise ValueError("memory='unrolled' runs in one process; a share needs 'exact' (the same gradient), "
                         "or 'tesla' in trajectory_match")
    return share.total


def _check_labels(labels, count: int, images: torch.Tensor) -> None:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a tensor, got {type(labels).__name__}")
    hard = labels.dim() == 1 and labels.dtype == torch.int64
    soft = labels.dim() == 2 and labels.is_floating_point()
    if not (hard or soft) or labels.shape[0] != count:
        raise ValueError(f"labels must be int64 class indices ({count},) or float soft targets "
                         f"({count}, K), got {_describe(labels)}")
    if soft and labels.dtype != images.dtype:
        raise ValueError(f"soft labels ({labels.dtype}) and images ({images.dtype}) must share a dtype")
    if labels.device != images.device:
        raise ValueError(f"labels are on {labels.device} but images are on {images.device}")


def unroll(images, labels, lr, start, model, batches, terminal, *, memory="exact", augment=None, seed=0,
           share=None, backend=None) -> TrajectoryResult:
    """Any loss of a student after SGD steps on the synthetic set, with its exact gradients.

    One step per entry of `batches` (int64 row indices into `images`) from `start`, step k at
    lr[k] (`lr`: one float per step, or a 0-dim tensor or float for all); the loss is
    `terminal(θ_last)` (a differentiable function of the flat parameters to a 0-dim tensor; DD:
    the cross-entropy on a real batch). `augment(x, step_seed)` gets one seed per step drawn from
    `seed`. Returns the loss with grad_images, grad_lr (shaped like `lr`) and grad_labels for
    soft labels that require grad; "exact" memory keeps one step's activations whatever the
    number of steps, "unrolled" is plain autograd ("tesla" applies to trajectory_match only).

    `share` (a RowShare; "exact" only) splits the set across processes as in trajectory_match:
    `images` and `labels` are this process's rows, `batches` index all share.total rows (keep them
    on the CPU: every step splits them), and `terminal` returns this process's part of the loss;
    the loss is the sum of the parts, and each process gets it, grad_lr and its rows' gradients.
    """
    count = _check_student(images, labels, start, model)
    if memory == "tesla":
        raise ValueError("memory='tesla' is trajectory matching's approximation; unroll takes 'exact' or 'unrolled'")
    if share is not None:
        count = _check_share(share, count, memory, augment)
    if not isinstance(batches, (list, tuple)) or not batches:
        raise ValueError(f"batches must be a non-empty list of index tensors, got {_describe(batches)}")
    for batch in batches:
        if not isinstance(batch, torch.Tensor) or batch.dtype != torch.int64 or batch.dim() != 1 or not len(batch):
            raise ValueError(f"batches must hold non-empty 1-D int64 index tensors, got {_describe(batch)}")
        if batch.device.type == "cpu" and (int(batch.min()) < 0 or int(batch.max()) >= count):
            raise ValueError(f"batches index rows outside the {count} images")
    if isinstance(lr, torch.Tensor) and lr.dim() == 1:
        if len(lr) != len(batches) or not lr.is_floating_point():
            raise ValueError(f"lr must hold one float per step ({len(batches)}), got {_describe(lr)}")
        if lr.device.type == "cpu" and not bool(torch.isfinite(lr.detach()).all()):
            raise ValueError("lr must be finite")
        lr = lr.detach().to(device=start.device, dtype=start.dtype)
    else:
        lr = _check_lr(lr, start)
    if not callable(terminal):
        raise ValueError(f"terminal must be a callable (flat_params) -> loss, got {type(terminal).__name__}")
    _check_modes(memory, augment, seed)
    choose("unroll", backend, images.device, ("torch",))
    step_seeds = torch.randint(0, 2**31 - 1, (len(batches),), generator=torch.Generator().manual_seed(seed)).tolist()
    return reference.unroll(images, labels, lr, start, model, list(batches), step_seeds, terminal, memory=memory,
                            augment=augment, share=share, terminal_part=share is not None)


def _check_student(images, labels, start, model) -> int:
    """ValueErrors for the synthetic images, labels, start parameters and model; the image count."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float (N, C, H, W) tensor, got {_describe(images)}")
    count = images.shape[0]
    if count < 1:
        raise ValueError("images must hold at least one image")
    _check_labels(labels, count, images)
    if not isinstance(start, torch.Tensor) or start.dim() != 1 or not start.is_floating_point():
        raise ValueError(f"start must be a float flat parameter vector (P,), got {_describe(start)}")
    expected = getattr(model, "num_params", None)
    if not callable(getattr(model, "forward", None)):
        raise ValueError(f"model must expose forward(x, flat_params), got {type(model).__name__}")
    if expected is not None and start.numel() != expected:
        raise ValueError(f"start has {start.numel()} values but model has {expected} parameters")
    if start.device != images.device:
        raise ValueError(f"start is on {start.device} but images are on {images.device}")
    if images.dtype != start.dtype:
        raise ValueError(f"images ({images.dtype}) and start ({start.dtype}) must share a dtype")
    return count


def _check_modes(memory, augment, seed) -> None:
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    if augment is not None and not callable(augment):
        raise ValueError(f"augment must be None or a callable (x, step_seed), "
                         f"got {type(augment).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")


def _check_lr(lr, start: torch.Tensor) -> torch.Tensor:
    """The lr as a 0-dim tensor in start's dtype and device; ValueError unless a finite scalar.

    A GPU tensor's value is not read (that would be a host sync every call); a non-finite one shows
    up as a non-finite loss, which the driver stops on."""
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        lr = torch.tensor(float(lr))
    if not isinstance(lr, torch.Tensor) or lr.dim() != 0 or not lr.is_floating_point():
        raise ValueError(f"lr must be a 0-dim float tensor or a float, got {_describe(lr)}")
    if lr.device.type == "cpu" and not math.isfinite(lr.item()):
        raise ValueError(f"lr must be finite, got {lr.item()}")
    return lr.detach().to(device=start.device, dtype=start.dtype)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
