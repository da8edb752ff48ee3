"""ops.match_dist: DC's gradient-matching distance between real and synthetic gradients.

Backends: "torch" (the per-parameter loop of the published code) and, for the default "ours"
metric, "triton": all rows of all layers (and classes) in one forward and one backward launch.
"""
from collections.abc import Sequence

import torch

from condense_engine.ops._backend import choose
from condense_engine.reference import match_dist as reference

METRICS = reference.METRICS
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def match_dist(grads_real, grads_syn, *, metric: str = "ours", batched: bool = False,
               backend: str | None = None) -> torch.Tensor:
    """Distance between two lists of gradients (one tensor per parameter); fp32 scalar.

    metric "ours" (published default): per parameter with ≥ 2 dims, reshape to (out, -1) and sum
    1 − cos over the rows (1e-6 added to the norm product); 1-D parameters contribute nothing.
    "mse": Σ (syn − real)²; "l1": Σ |syn − real|; "cos": 1 − cos of all gradients concatenated
    (1-D ones included).
    `batched`: each tensor has a leading class dimension C and the per-class distances are
    summed. Differentiable w.r.t. both lists (normally `grads_syn`, built with create_graph).
    Empty lists, or only 1-D parameters under "ours", give 0 (a constant).
    """
    real, syn = _check(grads_real, grads_syn, metric, batched)
    device = syn[0].device if syn else torch.device("cpu")
    chosen = choose("match_dist", backend, device, ("torch", "triton") if metric == "ours" else ("torch",))
    if chosen == "torch":
        return reference.match_dist(real, syn, metric, batched)
    row_dims = 2 if batched else 1
    weights = [index for index, g in enumerate(syn) if g.dim() > row_dims]
    if not weights:
        return torch.zeros((), dtype=torch.float32, device=device)
    from condense_engine.kernels import match_dist as kernel

    return kernel.layerwise_cosine_distance([real[i] for i in weights], [syn[i] for i in weights],
                                            row_dims, reference.NORM_EPS)


def _check(grads_real, grads_syn, metric: str, batched: bool) -> tuple[list, list]:
    """The two lists, after ValueErrors naming the argument for any malformed input."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    for name, grads in (("grads_real", grads_real), ("grads_syn", grads_syn)):
        if isinstance(grads, torch.Tensor) or not isinstance(grads, Sequence):
            raise ValueError(f"{name} must be a list or tuple of tensors, got {type(grads).__name__}")
        for index, g in enumerate(grads):
            if not isinstance(g, torch.Tensor):
                raise ValueError(f"{name}[{index}] must be a tensor, got {type(g).__name__}")
            if g.dtype not in DTYPES:
                raise ValueError(f"{name}[{index}] must be float32, bfloat16 or float16, got {g.dtype}")
    if len(grads_real) != len(grads_syn):
        raise ValueError(f"grads_real has {len(grads_real)} tensors but grads_syn has {len(grads_syn)}")
    for index, (real, syn) in enumerate(zip(grads_real, grads_syn)):
        if real.shape != syn.shape:
            raise ValueError(f"grads_real[{index}] has shape {tuple(real.shape)} but grads_syn[{index}] "
                             f"has shape {tuple(syn.shape)}")
        if real.device != grads_syn[0].device or syn.device != grads_syn[0].device:
            raise ValueError(f"all gradients must be on one device; grads_real[{index}] is on {real.device}, "
                             f"grads_syn[{index}] on {syn.device}, grads_syn[0] on {grads_syn[0].device}")
    if batched and grads_syn:
        classes = grads_syn[0].shape[0] if grads_syn[0].dim() else 0
        for index, g in enumerate(grads_syn):
            if g.dim() == 0 or g.shape[0] != classes or classes < 1:
                raise ValueError(f"batched=True needs every tensor to start with the same class "
                                 f"dimension C ≥ 1; grads_syn[{index}] has shape {tuple(g.shape)}")
    return list(grads_real), list(grads_syn)
