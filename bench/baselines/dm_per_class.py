"""One DM iteration written the way the published code does it (methods.md §5), in eager PyTorch.

A fresh ConvNet per iteration; then, class by class: draw a random permutation of the class's
indices, take `batch_real` real images, run Siamese DSA on the real and on the synthetic batch
with the same seed, embed both with separate forwards, add the squared gap of the mean
embeddings; one SGD step at the end. It is the yardstick the batched DM iteration is timed
against (bench/dm_iteration.py), not part of the engine.
"""
import torch

from condense_engine.models import ConvNet
from condense_engine.ops.dsa import DSAParams
from condense_engine.reference.dsa import dsa as reference_dsa


def dm_iteration_per_class(real_by_class: list, syn: torch.Tensor, optimizer: torch.optim.Optimizer, *,
                           ipc: int, batch_real: int, strategy: str | None, channel: int, im_size: tuple,
                           seed: int) -> float:
    """One published-style DM step on `syn` ((classes·ipc, C, H, W), class-ordered); returns the loss."""
    device = syn.device
    net = ConvNet(channel, len(real_by_class), im_size=im_size).to(device)
    net.requires_grad_(False)
    loss = torch.zeros((), device=device)
    for c, real_images in enumerate(real_by_class):
        index = torch.randperm(len(real_images), device=device)[:batch_real]
        real = real_images[index]
        syn_c = syn[c * ipc:(c + 1) * ipc]
        if strategy:
            size = tuple(real.shape[2:])
            class_seed = seed * 1000 + c
            real = reference_dsa(real, DSAParams.sample(len(real), strategy, size=size, seed=class_seed, device=device))
            syn_c = reference_dsa(syn_c, DSAParams.sample(ipc, strategy, size=size, seed=class_seed, device=device))
        real_feats = net.embed(real).detach()
        syn_feats = net.embed(syn_c)
        loss = loss + ((real_feats.mean(0) - syn_feats.mean(0)) ** 2).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
