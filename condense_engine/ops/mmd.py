"""ops.mmd: kernel MMD², the distribution-matching loss (SPEC §2).

Backends: "torch" (the Gram-matrix reference) and "triton" (tiled kernels that never store an
N×M matrix; the linear kernel uses its exact O((N+M)·d) closed form via class sums instead).
"""
import functools
import math
from collections.abc import Sequence

import torch

from condense_engine.errors import NonFiniteError
from condense_engine.ops._backend import choose
from condense_engine.reference import mmd as reference

KERNELS = ("linear", "poly", "gaussian")
ESTIMATORS = ("biased", "unbiased")
REDUCTIONS = ("sum", "mean", "none")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def mmd(x: torch.Tensor, y: torch.Tensor, kernel: str = "linear", *, degree: int = 3,
        gamma: float | None = None, coef0: float = 1.0, sigmas=None, estimator: str = "biased",
        include_xx: bool = True, reduction: str = "sum", backend: str | None = None
        ) -> torch.Tensor:
    """MMD² between real features x and synthetic features y, per class; fp32 result.

    x: (N, d) or (C, N, d); y: (M, d) or (C, M, d), fp32/bf16/fp16 (mixed dtypes are promoted),
    accumulated in fp32. Gradients reach whichever of x, y requires grad.

    kernel: "linear" ⟨a,b⟩ (biased MMD² = ‖mean x − mean y‖², DM's loss); "poly"
    (γ⟨a,b⟩ + coef0)^degree with γ = `gamma` or 1/d; "gaussian" the mean over σ in `sigmas`
    of exp(−‖a−b‖²/(2σ²)). `sigmas` is a number or a sequence of them; None picks σ₀·(0.5, 1, 2)
    with σ₀² the mean squared distance between two real features of a class (exact closed form,
    O(N·d), treated as a constant): a scale-free choice since embedding features have no fixed
    scale, and unlike the median heuristic it needs no N×N matrix.

    estimator: "biased" (all pairs) or "unbiased" (x–x and y–y exclude i = i′; N, M ≥ 2).
    include_xx=False drops the x–x term: the value changes, the gradient w.r.t. y does not.
    reduction over classes: "sum", "mean" or "none" (shape (C,)); 2-D inputs are one class
    and give a 0-d tensor. Finiteness of x and y is checked on CPU only (on a GPU it would cost
    a host sync).
    """
    _check_features(x, y, estimator)
    _check_options(kernel, degree, gamma, coef0, estimator, reduction)
    sigma_values = sigma_tensor(sigmas, x) if kernel == "gaussian" else None
    chosen = choose("mmd", backend, x.device, ("torch", "triton"))
    options = dict(degree=degree, gamma=gamma, coef0=coef0, estimator=estimator,
                   include_xx=include_xx)
    if chosen == "torch":
        return reference.mmd(x, y, kernel, sigmas=sigma_values, reduction=reduction, **options)
    batched = x.dim() == 3
    dtype = torch.promote_types(x.dtype, y.dtype)
    xs = (x if batched else x.unsqueeze(0)).to(dtype)
    ys = (y if batched else y.unsqueeze(0)).to(dtype)
    unbiased = estimator == "unbiased"
    if kernel == "linear":
        per_class = _linear_per_class(xs, ys, unbiased, include_xx)
    else:
        from condense_engine.kernels import mmd as tiled

        per_class = tiled.mmd_per_class(
            xs, ys, kernel, degree=degree,
            gamma=reference.default_gamma(xs.shape[-1]) if gamma is None else gamma,
            coef0=coef0, sigmas=sigma_values, unbiased=unbiased, include_xx=include_xx)
    return reference.reduce_classes(per_class, batched, reduction)


def _linear_per_class(x: torch.Tensor, y: torch.Tensor, unbiased: bool,
                      include_xx: bool) -> torch.Tensor:
    """Linear-kernel MMD² per class from class sums: Σ_{i,i′}⟨a_i, a_i′⟩ = ‖Σ_i a_i‖²."""
    x, y = x.float(), y.float()
    if include_xx and not unbiased:
        return (x.mean(1) - y.mean(1)).pow(2).sum(-1)

    def pair_mean(feats: torch.Tensor) -> torch.Tensor:
        count = feats.shape[1]
        total = feats.sum(1).pow(2).sum(-1)
        if unbiased:
            return (total - feats.pow(2).sum((1, 2))) / (count * (count - 1))
        return total / (count * count)

    cross = (x.mean(1) * y.mean(1)).sum(-1)
    per_class = pair_mean(y) - 2.0 * cross
    return per_class + pair_mean(x) if include_xx else per_class


def _check_features(x: torch.Tensor, y: torch.Tensor, estimator: str) -> None:
    """ValueErrors naming x or y for bad rank, shape, dtype, device, size or values."""
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() not in (2, 3):
            raise ValueError(f"{name} must be (rows, d) or (C, rows, d), got shape "
                             f"{tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if x.dim() != y.dim():
        raise ValueError(f"x and y must both be 2-D or both 3-D, got x {tuple(x.shape)} and "
                         f"y {tuple(y.shape)}")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x and y must have the same feature size d, got x {tuple(x.shape)} "
                         f"and y {tuple(y.shape)}")
    if x.dim() == 3 and x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of classes C, got x "
                         f"{tuple(x.shape)} and y {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"x is on {x.device} but y is on {y.device}")
    min_rows = 2 if estimator == "unbiased" else 1
    for name, t in (("x", x), ("y", y)):
        if t.shape[-2] < min_rows or t.shape[-1] < 1 or (t.dim() == 3 and t.shape[0] < 1):
            raise ValueError(f"{name} needs at least {min_rows} row(s) per class "
                             f"(estimator={estimator!r}) and d ≥ 1, got shape {tuple(t.shape)}")
        if t.device.type == "cpu" and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{name} contains NaN or infinite values")


def _check_options(kernel, degree, gamma, coef0, estimator, reduction) -> None:
    """ValueErrors naming the option that is unknown or out of range."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if kernel == "poly":
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ValueError(f"degree must be an integer ≥ 1, got {degree!r}")
        if gamma is not None and not math.isfinite(gamma):
            raise ValueError(f"gamma must be a finite number or None, got {gamma!r}")
        if not math.isfinite(coef0):
            raise ValueError(f"coef0 must be a finite number, got {coef0!r}")


def sigma_tensor(sigmas, x: torch.Tensor) -> torch.Tensor:
    """The Gaussian bandwidths as a 1-D fp32 tensor on x's device, checked finite and positive.

    Numbers are checked in Python and their device copy is cached, so a GPU call with fixed
    bandwidths never waits on a host-to-device copy; a tensor is checked on its device (a sync).
    """
    if sigmas is None:
        return reference.default_sigmas(x)
    if isinstance(sigmas, torch.Tensor):
        values = sigmas.detach().reshape(-1).to(device=x.device, dtype=torch.float32)
        valid = values.numel() > 0 and bool(((values > 0) & torch.isfinite(values)).all())
    else:
        numbers = tuple(float(s) for s in (sigmas if isinstance(sigmas, Sequence) else [sigmas]))
        valid = len(numbers) > 0 and all(0 < s < math.inf for s in numbers)
        values = _device_sigmas(numbers, x.device) if valid else None
    if not valid:
        raise ValueError(f"sigmas must be one or more finite positive numbers, got {sigmas!r}")
    return values


@functools.lru_cache(maxsize=64)
def _device_sigmas(numbers: tuple, device: torch.device) -> torch.Tensor:
    """A cached device copy of fixed bandwidths (callers never modify it)."""
    return torch.tensor(numbers, dtype=torch.float32, device=device)
