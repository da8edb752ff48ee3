"""Reference of ops.mmd: kernel MMD² built from explicit Gram matrices (the ground truth).

Clarity over speed: every Gram matrix (N×N, M×M, N×M per class) is materialised. Inputs are
assumed valid (ops.mmd checks them); 2-D inputs are one class and give a 0-d result.
"""
import functools
from collections.abc import Sequence

import torch

# Multiples of the base bandwidth used when `sigmas` is None (see default_sigmas).
DEFAULT_SIGMA_FACTORS = (0.5, 1.0, 2.0)


def default_gamma(dim: int) -> float:
    """The polynomial kernel's scale when `gamma` is None: 1/d keeps γ⟨a,b⟩ of order one."""
    return 1.0 / dim


def default_sigmas(x: torch.Tensor) -> torch.Tensor:
    """Bandwidths for the Gaussian kernel when `sigmas` is None, as a 1-D fp32 tensor.

    Mean heuristic on the real features, multi-bandwidth: σ₀² is the mean squared distance
    between two real features of the same class, averaged over classes, which has the closed
    form 2·(mean‖a‖² − ‖mean a‖²), so it costs O(N·d) and no N×N matrix (unlike the median
    heuristic). The kernel then averages σ ∈ σ₀·(0.5, 1, 2), staying informative when the
    feature scale of the embedding network is unknown. Computed from `x` only and detached,
    so the loss's bandwidth does not move with the synthetic features it is optimising.
    """
    return sigmas_from_sq_distance(mean_sq_distance(x))


def sigmas_from_sq_distance(sq_distance: torch.Tensor) -> torch.Tensor:
    """default_sigmas given σ₀² (the mean squared distance of two real features of a class)."""
    return sq_distance.clamp_min(1e-12).sqrt() * _sigma_factors(sq_distance.device)


def mean_sq_distance(x: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between two features of a class ((N, d) or (C, N, d)), averaged
    over classes, detached: 2·(mean‖a‖² − ‖mean a‖²) per class, O(N·d)."""
    return class_sq_distances(x).mean()


def class_sq_distances(x: torch.Tensor) -> torch.Tensor:
    """mean_sq_distance of each class of (N, d) or (C, N, d) features, shape (C,), detached."""
    feats = x.detach().float()
    if feats.dim() == 2:
        feats = feats.unsqueeze(0)
    return 2.0 * (feats.pow(2).sum(-1).mean(-1) - feats.mean(1).pow(2).sum(-1))


@functools.lru_cache(maxsize=16)
def _sigma_factors(device: torch.device) -> torch.Tensor:
    """DEFAULT_SIGMA_FACTORS on `device`, copied once (a fresh copy per call would block a GPU)."""
    return torch.tensor(DEFAULT_SIGMA_FACTORS, dtype=torch.float32, device=device)


def sigma_tensor(sigmas, x: torch.Tensor) -> torch.Tensor:
    """`sigmas` (None, a number or a sequence of numbers) as a 1-D fp32 tensor on x's device."""
    if sigmas is None:
        return default_sigmas(x)
    if isinstance(sigmas, torch.Tensor):
        return sigmas.detach().reshape(-1).to(device=x.device, dtype=torch.float32)
    values = list(sigmas) if isinstance(sigmas, Sequence) else [sigmas]
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=x.device)


def gram(a: torch.Tensor, b: torch.Tensor, kernel: str, *, degree: int, gamma: float,
         coef0: float, sigmas: torch.Tensor) -> torch.Tensor:
    """k(a_i, b_j) for every pair, per class: (C, P, d) × (C, Q, d) → (C, P, Q)."""
    inner = torch.bmm(a, b.transpose(1, 2))
    if kernel == "linear":
        return inner
    if kernel == "poly":
        return (gamma * inner + coef0).pow(degree)
    sq_dist = (a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1).unsqueeze(1)
               - 2.0 * inner).clamp_min(0.0)
    sigmas = sigmas.to(a.dtype)
    return sum(torch.exp(-sq_dist / (2.0 * s * s)) for s in sigmas) / len(sigmas)


def pair_mean(k: torch.Tensor, exclude_diagonal: bool) -> torch.Tensor:
    """Mean of a (C, P, Q) Gram matrix per class, optionally without its diagonal (P == Q)."""
    if not exclude_diagonal:
        return k.mean(dim=(1, 2))
    count = k.shape[1]
    off_diagonal_sum = k.sum(dim=(1, 2)) - torch.diagonal(k, dim1=1, dim2=2).sum(-1)
    return off_diagonal_sum / (count * (count - 1))


def mmd(x: torch.Tensor, y: torch.Tensor, kernel: str = "linear", *, degree: int = 3,
        gamma: float | None = None, coef0: float = 1.0, sigmas=None, estimator: str = "biased",
        include_xx: bool = True, reduction: str = "sum") -> torch.Tensor:
    """MMD² between x (N, d) or (C, N, d) and y (M, d) or (C, M, d); see SPEC §2.

    Computes in fp32 (fp64 when the inputs are fp64, for gradcheck) and returns that dtype.
    """
    batched = x.dim() == 3
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = (x if batched else x.unsqueeze(0)).to(compute_dtype)
    ys = (y if batched else y.unsqueeze(0)).to(compute_dtype)
    options = dict(degree=degree, gamma=default_gamma(xs.shape[-1]) if gamma is None else gamma,
                   coef0=coef0, sigmas=sigma_tensor(sigmas, x) if kernel == "gaussian" else None)
    unbiased = estimator == "unbiased"
    per_class = (pair_mean(gram(ys, ys, kernel, **options), unbiased)
                 - 2.0 * pair_mean(gram(xs, ys, kernel, **options), False))
    if include_xx:
        per_class = per_class + pair_mean(gram(xs, xs, kernel, **options), unbiased)
    return reduce_classes(per_class, batched, reduction)


def reduce_classes(per_class: torch.Tensor, batched: bool, reduction: str) -> torch.Tensor:
    """Apply `reduction` over the class axis; unbatched (2-D) inputs give the one class's value."""
    if not batched:
        return per_class[0]
    if reduction == "sum":
        return per_class.sum()
    if reduction == "mean":
        return per_class.mean()
    return per_class

