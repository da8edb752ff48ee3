"""ops.moments: per-class feature moments (mean and centred moments up to `order`), the
statistics of explicit moment matching.

Backends: "torch" (the definitions, reference/moments.py) and "triton" (one launch over all
classes for the forward and one for the backward, kernels/moments.py).
"""
import torch

from condense_engine.errors import NonFiniteError
from condense_engine.ops._backend import choose
from condense_engine.reference import moments as reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def moments(x: torch.Tensor, order: int = 4, *, backend: str | None = None) -> torch.Tensor:
    """Mean and centred moments of features x per class and feature; fp32.

    x: (N, d) or (C, N, d), fp32/bf16/fp16, accumulated in fp32. Returns (order, d) or
    (C, order, d): row 0 the mean μ over the N rows, row k − 1 the centred moment
    mean((a − μ)^k) for k = 2 … `order` (the biased, 1/N estimates). Differentiable w.r.t. x.
    Finiteness of x is checked on CPU only (on a GPU it would cost a host sync).
    """
    _check(x, order)
    chosen = choose("moments", backend, x.device, ("torch", "triton"))
    if chosen == "torch":
        return reference.moments(x, order)
    from condense_engine.kernels.moments import Moments

    batched = x.dim() == 3
    out = Moments.apply(x if batched else x.unsqueeze(0), order)
    return out if batched else out.squeeze(0)


def _check(x: torch.Tensor, order: int) -> None:
    """ValueErrors for a bad order, rank, size or dtype; NonFiniteError for NaN/inf on CPU."""
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an integer ≥ 1, got {order!r}")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be (rows, d) or (C, rows, d), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.shape[-2] < 1 or x.shape[-1] < 1 or (x.dim() == 3 and x.shape[0] < 1):
        raise ValueError(f"x needs at least one class, one row per class and d ≥ 1, got shape {tuple(x.shape)}")
    if x.device.type == "cpu" and not bool(torch.isfinite(x).all()):
        raise NonFiniteError("x contains NaN or infinite values")
