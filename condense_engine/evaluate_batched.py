"""The evaluation repeats trained together as one vmapped model (SPEC §6, methods.md §1.6).

`train_and_test_batched` does what `evaluate.train_and_test` does, for R fresh models at once.
Their parameters are stacked with torch.func.stack_module_state and run through
torch.func.functional_call under torch.vmap over the model dimension, so each step is one
batched forward and backward instead of R. Each model still gets everything the loop gives it:
its own initialisation, and its own shuffled minibatch order and per-sample DSA parameters drawn
from its own generator. So the trained weights match the loop's up to float rounding. The
update is torch.optim.SGD on the stacked tensors. SGD is elementwise, so this is exactly R
separate optimisers.

Models with buffers are not batched: BatchNorm updates its running statistics in place in train
mode, which vmap cannot do. Models that torch.func fails on are not batched either; the failure
is remembered for each model name and device type.
"""
import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state

from condense_engine.datasets import ImageDataset, RealImages
from condense_engine.methods.augment import dc_augment_each
from condense_engine.ops.dsa import DSAParams, dsa

#: (model name, device type) → why torch.func cannot run the model, or None when it can.
_VMAP_PROBED: dict[tuple[str, str], str | None] = {}


def unbatchable_reason(name: str, nets: list[nn.Module], images: torch.Tensor) -> str | None:
    """Why the repeats `nets` of model `name` cannot be trained as one vmapped model, or None.

    On the first call for a (name, device type), a tiny vmapped forward and backward on
    `images[:1]` tests whether torch.func can handle the model. Its RuntimeError (vmap's error
    for an unsupported op, data-dependent control flow or in-place write) is remembered, so the
    probe runs only once.
    """
    if any(True for _ in nets[0].buffers()):
        return "the model has buffers (BatchNorm running statistics), which vmap cannot update in place"
    key = (name, images.device.type)
    if key not in _VMAP_PROBED:
        template = stacked_template(nets[0])
        params, _ = stack_module_state(nets)
        sample = images[:1].expand(len(nets), *images[:1].shape)
        targets = torch.zeros(len(nets), 1, dtype=torch.long, device=images.device)
        try:
            losses = torch.vmap(cross_entropy_of(template))(params, sample, targets)
            torch.autograd.grad(losses.sum(), list(params.values()), allow_unused=True)
            _VMAP_PROBED[key] = None
        except RuntimeError as error:
            _VMAP_PROBED[key] = f"torch.func cannot run {name}: {error}"
    return _VMAP_PROBED[key]


def train_and_test_batched(nets: list[nn.Module], images: torch.Tensor, labels: torch.Tensor,
                           test_set: ImageDataset, *, epochs: int, lr: float, batch_size: int,
                           strategy: str | None, generators: list[torch.Generator],
                           dc_strategy: str | None = None, resume_from: dict | None = None,
                           save_progress=None) -> tuple[list, list]:
    """Train `nets` together with the published recipe: net r on (images[r], labels[r]), with
    order and augmentation (DSA `strategy` or DC's `dc_strategy`) drawn from generators[r]. Like
    the loop, this leaves the trained weights in `nets`. Return each net's test accuracy and its
    last loss. `save_progress` and `resume_from` save and continue the runs' state as the loop's
    do (`evaluate.train_and_test`).

    `images` is (R, N, C, H, W) and `labels` is (R, N). An expanded view is fine when every net
    trains on the same set.
    """
    device = images.device
    repeats, count = labels.shape
    template = stacked_template(nets[0])
    params, _ = stack_module_state(nets)
    batched_loss = torch.vmap(cross_entropy_of(template))
    rows = torch.arange(repeats, device=device)[:, None]
    lr_now = float(lr)
    optimizer = _sgd(params, lr_now)
    decay_at = epochs // 2
    losses = torch.full((repeats,), float("nan"))
    start = 0
    if resume_from is not None:
        with torch.no_grad():
            for name, stacked in params.items():
                stacked.copy_(resume_from["params"][name])
        optimizer.load_state_dict(resume_from["optimizer"])  # the decayed lr included
        for generator, state in zip(generators, resume_from["generators"], strict=True):
            generator.set_state(state)
        start = resume_from["epoch"]
    template.train()
    for epoch in range(start, epochs):
        if epoch == decay_at and epoch > 0:
            lr_now *= 0.1
            optimizer = _sgd(params, lr_now)
        orders = torch.stack([torch.randperm(count, generator=g) for g in generators]).to(device)
        for start in range(0, count, batch_size):
            index = orders[:, start:start + batch_size]
            batch = images[rows, index]
            if strategy:
                batch = augment_each(batch, strategy, generators)
            if dc_strategy:
                batch = dc_augment_each(batch, dc_strategy, generators)
            losses = batched_loss(params, batch, labels[rows, index])
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
        if save_progress is not None and epoch + 1 < epochs and save_progress.due():
            save_progress(dict(epoch=epoch + 1, params={name: p.detach() for name, p in params.items()},
                               optimizer=optimizer.state_dict(),
                               generators=[generator.get_state() for generator in generators]))
    with torch.no_grad():
        for repeat, net in enumerate(nets):
            for name, weight in net.named_parameters():
                weight.copy_(params[name][repeat])
    return batched_accuracy(template, params, test_set), losses.detach().cpu().tolist()


def augment_each(batch: torch.Tensor, strategy: str, generators: list[torch.Generator]) -> torch.Tensor:
    """DSA on each model's (B, C, H, W) slice of `batch`, with parameters drawn from that model's
    generator exactly as the loop draws them.

    Models that drew the same op group are augmented in one call, with their parameters joined.
    """
    repeats, count = batch.shape[:2]
    drawn = [DSAParams.sample(count, strategy, size=tuple(batch.shape[3:]), siamese=False,
                              generator=g, device=batch.device) for g in generators]
    members_by_ops: dict[tuple, list[int]] = {}
    for repeat, params in enumerate(drawn):
        members_by_ops.setdefault(params.ops, []).append(repeat)
    augmented = torch.empty_like(batch)
    for members in members_by_ops.values():
        joined = _concatenate([drawn[r] for r in members])
        chosen = torch.tensor(members, device=batch.device)
        augmented[chosen] = dsa(batch[chosen].flatten(0, 1), joined).view(len(members), *batch.shape[1:])
    return augmented


@torch.no_grad()
def batched_accuracy(template: nn.Module, params: dict, test_set: ImageDataset,
                     batch_size: int = 1024) -> list[float]:
    """Top-1 test accuracy of every stacked model (eval mode), one vmapped pass per test batch."""
    template.eval()
    forward = torch.vmap(lambda p, x: functional_call(template, p, (x,)), in_dims=(0, None))
    device = next(iter(params.values())).device
    test = RealImages(test_set, device, "host")  # batches travel as stored (uint8), without a sync
    correct = 0
    for start in range(0, len(test_set), batch_size):
        index = torch.arange(start, min(start + batch_size, len(test_set)))
        logits = forward(params, test.normalized(index, check_bounds=False))
        correct = correct + (logits.argmax(2) == test.labels_at(index)).sum(1)
    template.train()
    return [hits / len(test_set) for hits in correct.tolist()]


def stacked_template(net: nn.Module) -> nn.Module:
    """A weightless (meta-device) copy of `net` for functional_call to run stacked weights through."""
    return copy.deepcopy(net).to("meta")


def cross_entropy_of(template: nn.Module):
    """Cross-entropy of one model's weights on one batch, the function vmap maps over the models."""
    def loss(params: dict, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(template, params, (images,)), labels)
    return loss


def _sgd(params: dict, lr: float) -> torch.optim.SGD:
    """The published optimiser over the stacked weights; its elementwise update treats every
    model's slice independently."""
    return torch.optim.SGD(params.values(), lr=lr, momentum=0.9, weight_decay=5e-4)


def _concatenate(parts: list[DSAParams]) -> DSAParams:
    """One DSAParams for the concatenated batches of `parts`, which share their op groups."""
    names = parts[0].tensors()
    return dataclasses.replace(parts[0], **{name: torch.cat([getattr(p, name) for p in parts])
                                            for name in names})
