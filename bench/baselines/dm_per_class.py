"""One DM or M3D iteration written the way the published code does it (methods.md §5, §12), in eager PyTorch.

A fresh ConvNet per iteration; then, class by class: draw a random permutation of the class's
indices, take `batch_real` real images, run Siamese DSA on the real and on the synthetic batch
with the same seed, embed both with separate forwards, add the class's loss; one SGD step at the
end. The loss is DM's squared gap of the mean embeddings (kernel "linear") or M3D's kernel MMD²
from explicit Gram matrices (kernel "gaussian": bandwidths σ₀·(0.5, 1, 2), σ₀² the mean squared
distance of the class's real features). It is the yardstick the batched DM and M3D iterations
are timed against (bench/dm_iteration.py), not part of the engine.
"""
import torch

from condense_engine.models import ConvNet
from condense_engine.ops.dsa import DSAParams
from condense_engine.reference import mmd as reference_mmd
from condense_engine.reference.dsa import dsa as reference_dsa


def class_loss(real_feats: torch.Tensor, syn_feats: torch.Tensor, kernel: str) -> torch.Tensor:
    """One class's loss between (N, d) real and (M, d) synthetic features. Linear: DM's
    ‖mean real − mean syn‖². Otherwise the Gram-matrix MMD² without the real–real term, as
    M3D computes it (include_xx=False: that term does not depend on the synthetic images)."""
    if kernel == "linear":
        return ((real_feats.mean(0) - syn_feats.mean(0)) ** 2).sum()
    return reference_mmd.mmd(real_feats, syn_feats, kernel, include_xx=False)


def dm_iteration_per_class(real_by_class: list, syn: torch.Tensor, optimizer: torch.optim.Optimizer, *,
                           ipc: int, batch_real: int, strategy: str | None, channel: int, im_size: tuple,
                           seed: int, kernel: str = "linear") -> float:
    """One published-style DM (kernel "linear") or M3D (kernel "gaussian") step on `syn`
    ((classes·ipc, C, H, W), class-ordered); returns the loss."""
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
        loss = loss + class_loss(real_feats, syn_feats, kernel)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
