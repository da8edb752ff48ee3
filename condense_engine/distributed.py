"""Class-sharded distillation across processes (`torchrun`): each rank owns a slice of the classes.

Distribution matching's loss is a sum over classes and each class's gradient reaches only its
own synthetic images, so the classes split across ranks with no per-iteration exchange of
images or gradients. Every rank runs the same random stream (same seed: the same real-batch
draws, DSA seeds and random networks as a single process), embeds only its classes and updates
only their images; the summed loss, the finiteness flag and, for M3D, the few statistics that
come from all classes are all-reduced as device tensors (no host sync). The images (and their
optimiser state) are gathered when a checkpoint, an evaluation or the end needs the whole set,
so a checkpoint has the single-process format and resumes under any number of ranks.

DC, DSA and IDC shard the same way: each rank matches its classes' gradients and updates their
images; the network trained between image updates is trained data-parallel (each rank takes
its classes' rows of every batch; one all-reduce of the network's gradient per step, and for
an IDC CutMix batch one of the batch's images, whose partners may be another rank's), so every
rank keeps the same network; the summed loss is all-reduced once per iteration.

MTT, TESLA and DATM (exact and tesla memory modes) run the same student on every rank; each student
step's gradient and, in the exact mode's reverse sweep, Hessian-vector product are summed across
the ranks, each computed on the rank's own synthetic rows (`ops.RowShare`): two parameter-sized
all-reduces per step (one in the tesla mode). DD's unrolled training runs the same way (exact
mode); its loss on the real batch is a sum over classes, so each rank adds its classes' part and
the part's gradient, one more parameter-sized all-reduce per unrolled network.

DQ trains its embedding network data-parallel the same way and bins each rank's classes; the
selection is gathered at the end.

Expert training (`condense_engine.expert`) spreads whole experts over the ranks instead: they
are independent, so there is nothing to exchange but a final barrier.
"""
import dataclasses
import datetime
import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist

#: How long a rank waits in a collective (torchrun launches) before giving up.
COLLECTIVE_TIMEOUT_HOURS = 2


@dataclasses.dataclass(frozen=True)
class ClassShard:
    """Classes first..end-1 of num_classes belong to this rank (rank of world)."""
    rank: int
    world: int
    first: int
    end: int
    num_classes: int

    @classmethod
    def whole(cls, num_classes: int) -> "ClassShard":
        """One process owning every class."""
        return cls(rank=0, world=1, first=0, end=num_classes, num_classes=num_classes)

    @property
    def sharded(self) -> bool:
        return self.world > 1

    @property
    def count(self) -> int:
        return self.end - self.first

    def bounds(self, rank: int) -> tuple:
        """(first, end) of `rank`'s classes: contiguous, sizes differing by at most one."""
        base, extra = divmod(self.num_classes, self.world)
        first = rank * base + min(rank, extra)
        return first, first + base + (rank < extra)

    def class_mean(self, per_class: torch.Tensor) -> torch.Tensor:
        """The mean over all classes of per-class values (this rank's classes, last dim or
        rows: any shape whose size is a multiple of count), all-reduced across ranks."""
        if not self.sharded:
            return per_class.mean()
        return self.sum(per_class.sum()) / (per_class.numel() // self.count * self.num_classes)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over ranks (itself when not sharded); differentiable only unsharded."""
        if not self.sharded:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def sum_in_place(self, tensors: list) -> None:
        """Sum every tensor of `tensors` over ranks, in place, in one collective (a data-parallel
        step's gradients); nothing when not sharded."""
        if not self.sharded or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            tensor.copy_(part.view_as(tensor))

    def sum_gradients(self, module: torch.nn.Module) -> None:
        """Sum the gradients of `module`'s trainable parameters over ranks (one a rank did not
        reach counts as zeros), so every rank takes the same optimiser step: a data-parallel step."""
        if not self.sharded:
            return
        weights = [p for p in module.parameters() if p.requires_grad]
        for weight in weights:
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
        self.sum_in_place([weight.grad for weight in weights])

    def gather_objects(self, value) -> list:
        """Every rank's `value` (picklable), in rank order ([value] when not sharded)."""
        if not self.sharded:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def all_true(self, flag: torch.Tensor) -> torch.Tensor:
        """A 0-d bool tensor: `flag` holds on every rank."""
        if not self.sharded:
            return flag
        value = flag.to(torch.int32).reshape(1)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return value[0].bool()

    def any_rank(self, flag: bool) -> bool:
        """A host flag that is true on some rank (a sync: call where the host waits anyway)."""
        return any_rank(flag) if self.sharded else flag

    def gather_classes(self, tensor: torch.Tensor, per_class: int) -> None:
        """Fill `tensor`'s class-ordered rows (per_class per class) of every rank's classes from
        that rank, in place, so each rank holds the whole tensor."""
        if not self.sharded:
            return
        rows = tensor.detach()
        size = max(self.bounds(r)[1] - self.bounds(r)[0] for r in range(self.world)) * per_class
        padded = rows.new_zeros((size, *rows.shape[1:]))
        padded[:self.count * per_class] = rows[self.first * per_class:self.end * per_class]
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous())
        with torch.no_grad():
            for rank, part in enumerate(parts):
                first, end = self.bounds(rank)
                rows[first * per_class:end * per_class] = part[:(end - first) * per_class]


def rows_held(batch: torch.Tensor, first: int, count: int) -> tuple:
    """(positions in the CPU `batch` of rows first … first + count − 1, those rows counted from
    `first`): a rank's part of a batch drawn over the whole set."""
    local = batch - first
    mine = ((local >= 0) & (local < count)).nonzero().squeeze(1)
    return mine, local[mine]


def class_shard(num_classes: int) -> ClassShard:
    """This process's share of the classes: all of them unless torch.distributed is initialised
    with more than one rank. ValueError when there are more ranks than classes."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ClassShard.whole(num_classes)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world > num_classes:
        raise ValueError(f"{world} ranks but only {num_classes} classes: class sharding needs at most one rank "
                         f"per class")
    first, end = ClassShard(rank, world, 0, 0, num_classes).bounds(rank)
    return ClassShard(rank=rank, world=world, first=first, end=end, num_classes=num_classes)


def launched_by_torchrun() -> bool:
    """True when the environment names a multi-process launch (WORLD_SIZE > 1, as torchrun sets)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | None) -> torch.device:
    """Join the process group torchrun describes (NCCL on GPUs, else Gloo); this rank's device.

    The timeout is long because the other ranks wait in their next collective while rank 0
    evaluates (--eval-every), which can take many minutes on a large set."""
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=COLLECTIVE_TIMEOUT_HOURS))
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """How many ranks the process group has (1 outside one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait until every rank gets here (nothing outside a process group)."""
    if world_size() > 1:
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """A host flag that is true on some rank (every rank calls it; the flag itself outside a group)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def check_on_every_rank(check) -> None:
    """Run check() here (it raises ValueError when something is wrong) and raise on every rank
    when it failed on any (a collective): none is left waiting for a rank that stopped."""
    problem = None
    try:
        check()
    except ValueError as error:
        problem = str(error)
    if any_rank(problem is not None):
        raise ValueError(problem or "another rank stopped; its error says why")


def lead_value(compute):
    """compute() run on rank 0 alone, its value handed to every rank (a collective). A ValueError
    it raises is raised on every rank, so no rank is left waiting for the value."""
    if world_size() == 1:
        return compute()
    box = [None]
    if rank() == 0:
        try:
            box[0] = ("value", compute())
        except ValueError as error:
            box[0] = ("error", str(error))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise ValueError(value)
    return value


def leave(clean: bool = True) -> None:
    """Leave the process group init_from_env joined. A clean exit first waits for every rank:
    tearing Gloo down while a peer's last collective is still in flight aborts the process.
    After an error (clean=False) it does not wait, since the peers may be in any collective:
    this process exits with its error and torchrun stops the others."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def run_ranked(work):
    """work() inside the process group torchrun describes, leaving it cleanly on success and
    without waiting on an error (see leave)."""
    try:
        result = work()
    except BaseException:
        leave(clean=False)
        raise
    leave()
    return result


def _collective_device() -> torch.device:
    """Where a host flag must live for the process group's backend."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exit_rank(code: int) -> NoReturn:
    """End this torchrun rank with exit status `code`, skipping Python's finalisation (stdout and
    stderr are flushed first; every file the commands write is closed by then).

    Gloo's worker threads may still be releasing the tensors of the last collectives after the
    main thread has left the process group. Where the last reference to such a tensor's Python
    object goes while the interpreter is finalising, that thread cannot take the GIL, is unwound
    through a noexcept destructor and aborts the whole process ('terminate called without an
    active exception', SIGABRT): about one launch in fifty on two busy CPU cores, after the work
    was written. Without finalisation there is nothing left for those threads to race."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
