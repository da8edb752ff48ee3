"""Reference of DC's gradient-matching distance (methods.md §3): a plain loop over parameters.

"ours" (the published default) reshapes each parameter's gradient to (output units, rest) and
sums 1 − cos over the rows, with 1e-6 added to the norm product; tensors with fewer than two
dimensions (biases, norm scale/shift) contribute nothing. "mse" is the squared distance, "l1"
the absolute one (IDC on MNIST, FashionMNIST and ImageNet), and "cos" one minus the cosine of all gradients flattened and concatenated (every parameter,
1-D ones included, as in the published code).
"""
import torch

METRICS = ("ours", "mse", "l1", "cos")
#: Added to the product of the two norms, as in the published code.
NORM_EPS = 1e-6


def layer_distance(grad_real: torch.Tensor, grad_syn: torch.Tensor) -> torch.Tensor:
    """Σ over output units of (1 − cos) between two gradients of one parameter; 0 for 1-D."""
    if grad_real.dim() < 2:
        return grad_syn.new_zeros((), dtype=torch.float32)
    real = grad_real.float().reshape(grad_real.shape[0], -1)
    syn = grad_syn.float().reshape(grad_syn.shape[0], -1)
    cosine = (real * syn).sum(-1) / (real.norm(dim=-1) * syn.norm(dim=-1) + NORM_EPS)
    return (1.0 - cosine).sum()


def single_distance(grads_real, grads_syn, metric: str) -> torch.Tensor:
    """The distance between one pair of gradient lists (one class); 0 for empty lists."""
    if len(grads_real) == 0:
        return torch.zeros((), dtype=torch.float32)
    if metric == "ours":
        return torch.stack([layer_distance(real, syn) for real, syn in zip(grads_real, grads_syn)]).sum()
    real = torch.cat([g.float().reshape(-1) for g in grads_real])
    syn = torch.cat([g.float().reshape(-1) for g in grads_syn])
    if metric == "mse":
        return (syn - real).pow(2).sum()
    if metric == "l1":
        return (syn - real).abs().sum()
    return 1.0 - (real * syn).sum() / (real.norm() * syn.norm() + NORM_EPS)


def match_dist(grads_real, grads_syn, metric: str = "ours", batched: bool = False) -> torch.Tensor:
    """Gradient-matching distance (fp32 scalar), differentiable w.r.t. both lists.

    With `batched`, every tensor has a leading class dimension C (one gradient per class) and the
    result is the sum over classes of the per-class distance, computed class by class.
    """
    if not batched or len(grads_real) == 0:
        return single_distance(grads_real, grads_syn, metric)
    per_class = [single_distance([g[c] for g in grads_real], [g[c] for g in grads_syn], metric)
                 for c in range(grads_real[0].shape[0])]
    return torch.stack(per_class).sum()
