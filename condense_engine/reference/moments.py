"""Reference of ops.moments: per-class feature moments, written as their definitions.

Row 0 is the mean μ; row k − 1 (k ≥ 2) is the centred moment E[(a − μ)^k], each over the class's
rows and per feature, in fp32. Inputs are assumed valid (ops.moments checks them); 2-D input is
one class.
"""
import torch


def moments(x: torch.Tensor, order: int) -> torch.Tensor:
    """(order, d) for x (N, d), (C, order, d) for x (C, N, d); differentiable through autograd."""
    feats = x.float()
    mean = feats.mean(-2, keepdim=True)
    centred = feats - mean
    rows = [mean.squeeze(-2)] + [centred.pow(k).mean(-2) for k in range(2, order + 1)]
    return torch.stack(rows, dim=-2)
