"""Pure-PyTorch trajectory matching (SPEC §7): the student's unrolled SGD steps and their gradient.

The student starts at an expert snapshot θ_0 and takes N plain SGD steps on synthetic minibatches,
θ_{k+1} = θ_k − α·g_k with g_k = ∇_θ CE(f(aug_k(x[B_k]); θ_k), y[B_k]). The loss is
L = ‖θ_N − θ*‖² / ‖θ_0 − θ*‖². Three ways to get dL/dx, dL/dα (and dL/dy for soft labels):

- "unrolled": autograd through the whole unrolled graph (published MTT); memory grows with N.
- "exact": reverse-mode by hand. The forward keeps only θ_0 … θ_{N−1}; the reverse sweep carries
  the adjoint a_k = dL/dθ_k backwards, recomputing one step's graph at a time:
      a_N = 2(θ_N − θ*)/D,   a_k = a_{k+1} − α·H_k a_{k+1}   (H_k = ∇²_θ CE at step k),
      dL/dα += −g_k·a_{k+1},  dL/dx[B_k] += −α·(∂g_k/∂x)ᵀ a_{k+1}   (likewise dL/dy).
  One double-backward per step gives H_k a_{k+1} and the input vector-Jacobian products together,
  so activation memory is that of one step, whatever N is; the result equals "unrolled".
- "tesla": TESLA's constant-memory scheme (Cui et al., ICML 2023) as its code computes it. With
  G = Σ_k g_k, θ_N = θ_0 − α·G, and each g_k is differentiated only through its own batch,
  holding θ_k fixed: dL/dx[B_k] = (2/D)·(α(θ* − θ_0) + α²G)·∂g_k/∂x, i.e. every step uses the
  final adjoint a_N (the exact recursion without the −α·H_k a_{k+1} terms). This drops how
  earlier batches move the parameters that later gradients are taken at; it equals "unrolled"
  for N = 1 and differs for N > 1. dL/dα = −2 G·(θ_N − θ*)/D, with G held constant.

The minibatch order (a random permutation, consumed in chunks of `batch_size` and redrawn when
used up, as in MTT) and one augmentation seed per step are drawn from `seed` before any step runs,
so every mode sees identical batches and identical augmentations.

`unroll` is the same machinery for any loss L = terminal(θ_N) and one lr per step (DD: the
cross-entropy of θ_N on real data): the adjoint starts at a_N = ∇terminal(θ_N), and dL/dα_k =
−g_k·a_{k+1}.

Split across processes (a `RowShare`, for class-sharded trajectory matching) the "exact" and
"tesla" sweeps are data-parallel: every process holds the same θ_k and adjoint and only its own
rows of the set; g_k = Σ_processes (Σ_own ∇ℓ_i)/|B_k| (and, in "exact", H_k a_{k+1} with the lr
term, in one collective) are summed across the processes, while dL/dx (and dL/dy) of a row
comes from the process that holds it. Each row's loss and augmentation are its own, so this
equals the one-process sweep up to summation order. Every process must take the same steps: an
error on one (out of memory on the process with most rows, say) leaves the others waiting in
their next sum until the process group's timeout.
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from condense_engine.distributed import rows_held
from condense_engine.ops.gather import host_to_device


@dataclass
class TrajectoryResult:
    """The matching loss and its gradients w.r.t. the images, the student lr and soft labels."""

    loss: torch.Tensor
    grad_images: torch.Tensor
    grad_lr: torch.Tensor
    grad_labels: torch.Tensor | None = None


@dataclass(frozen=True)
class RowShare:
    """This process's part of a synthetic set split by rows across processes: rows first …
    first + count − 1 of `total`; `sum` adds a tensor over the processes (a collective)."""

    first: int
    count: int
    total: int
    sum: Callable[[torch.Tensor], torch.Tensor]

    def split(self, batch: torch.Tensor) -> tuple:
        """(positions in the CPU `batch` of this process's rows, those rows among its own)."""
        return rows_held(batch, self.first, self.count)


def schedule(num_images: int, steps: int, batch_size: int, seed: int) -> tuple[list, list]:
    """(index chunks, augmentation seeds): one minibatch of row indices and one seed per step.

    Drawn on the CPU from `seed` alone, so the schedule is the same on every device and in every
    memory mode.
    """
    generator = torch.Generator().manual_seed(int(seed))
    step_seeds = torch.randint(0, 2**31 - 1, (steps,), generator=generator).tolist()
    chunks: list = []
    batches = []
    for _ in range(steps):
        if not chunks:
            chunks = list(torch.randperm(num_images, generator=generator).split(batch_size))
        batches.append(chunks.pop(0))
    return batches, step_seeds


def _student_loss(model, images, labels, params, augment, step_seed, part=None):
    """Cross-entropy of the student on one (augmented) minibatch; soft labels are probabilities.

    With `part` = (positions, size) the images are only those positions of a minibatch of
    `size` (a process's share): their summed loss over `size`, augmented as in the whole batch."""
    if part is None:
        if augment is not None:
            images = augment(images, step_seed)
        return F.cross_entropy(model.forward(images, params), labels)
    positions, size = part
    if augment is not None:
        images = augment(images, step_seed, share=(positions, size))
    return F.cross_entropy(model.forward(images, params), labels, reduction="sum") / size


def _step_gradient(model, images, labels, params, augment, step_seed, create_graph, part=None):
    """g = ∇_θ CE at `params` (a leaf requiring grad), optionally keeping its graph (zero for a
    share without rows)."""
    if part is not None and not len(images):
        return torch.zeros_like(params)
    loss = _student_loss(model, images, labels, params, augment, step_seed, part)
    return torch.autograd.grad(loss, params, create_graph=create_graph)[0]


def trajectory_match(images, labels, lr, start, target, model, *, steps, batch_size,
                     memory="unrolled", augment=None, seed=0, share=None) -> TrajectoryResult:
    """Trajectory-matching loss and gradients (inputs already validated by ops.trajectory_match).
    With a `share`, `images` and `labels` are its rows and the batches cover all share.total."""
    batches, step_seeds = schedule(share.total if share else images.shape[0], steps, batch_size, seed)
    start, target = start.detach(), target.detach()
    initial_distance = (start - target).pow(2).sum()
    return unroll(images, labels, lr, start, model, batches, step_seeds,
                  lambda params: (params - target).pow(2).sum() / initial_distance, memory=memory, augment=augment,
                  share=share)


def unroll(images, labels, lr, start, model, batches, step_seeds, terminal, *, memory="unrolled",
           augment=None, share=None, terminal_part=False) -> TrajectoryResult:
    """L = terminal(θ_N) after one SGD step per batch (row indices into `images`) from `start`;
    `lr` is 0-dim (one lr for all steps) or holds one lr per step, and grad_lr has its shape.
    "tesla" needs a 0-dim lr. With a `share` (adjoint modes only) the CPU batches index all
    share.total rows and each step uses this process's part; with `terminal_part` each process's
    terminal is its part of L (DD: its classes' share of the real-batch loss) and L is their sum,
    else every process computes the same L. Inputs are validated by the ops layer."""
    device = images.device
    if share is None:
        steps = [(batch.to(device), None) for batch in batches]
    else:
        if memory == "unrolled":
            raise ValueError("memory='unrolled' runs in one process; a share needs 'exact' or 'tesla'")
        steps = []
        for batch in batches:
            positions, rows = share.split(batch.cpu())
            positions = host_to_device(positions, device) if augment is not None else None
            steps.append((host_to_device(rows, device), (positions, len(batch))))
    want_labels = labels.is_floating_point() and labels.requires_grad
    inputs = (images.detach(), labels.detach(), lr.detach(), start.detach(), terminal, model, steps, step_seeds,
              augment, want_labels)
    if memory == "unrolled":
        return _unrolled(*inputs)
    return _adjoint(*inputs, exact=memory == "exact", share=share, terminal_part=terminal_part)


def _lr_at(lr: torch.Tensor, step: int) -> torch.Tensor:
    return lr if lr.dim() == 0 else lr[step]


def _unrolled(images, labels, lr, start, terminal, model, steps, step_seeds, augment, want_labels):
    """Autograd through every step (the published MTT computation); one process only."""
    with torch.enable_grad():
        images = images.requires_grad_(True)
        lr = lr.requires_grad_(True)
        labels = labels.requires_grad_(want_labels)
        params = start.clone().requires_grad_(True)
        for step, ((batch, _), step_seed) in enumerate(zip(steps, step_seeds)):
            grad = _step_gradient(model, images[batch], labels[batch], params, augment, step_seed, True)
            params = params - _lr_at(lr, step) * grad
        loss = terminal(params)
        inputs = [images, lr] + ([labels] if want_labels else [])
        grads = torch.autograd.grad(loss, inputs)
    return TrajectoryResult(loss.detach(), grads[0], grads[1], grads[2] if want_labels else None)


def _adjoint(images, labels, lr, start, terminal, model, steps, step_seeds, augment, want_labels, exact,
             share=None, terminal_part=False):
    """The "exact" (`exact=True`) and "tesla" modes: a graph-free forward, then one step's graph at a time."""
    visited = []             # θ_0 … θ_{N−1}: the only per-step state kept
    gradient_sum = torch.zeros_like(start)
    params = start
    with torch.enable_grad():
        for step, ((batch, part), step_seed) in enumerate(zip(steps, step_seeds)):
            visited.append(params)
            leaf = params.detach().requires_grad_(True)
            grad = _step_gradient(model, images[batch], labels[batch], leaf, augment, step_seed, False, part)
            if share is not None:
                grad = share.sum(grad)
            gradient_sum += grad
            params = params - _lr_at(lr, step) * grad
        final = params.detach().requires_grad_(True)
        loss = terminal(final)
        adjoint = torch.autograd.grad(loss, final)[0]          # a_N = dL/dθ_N
    loss = loss.detach()
    if terminal_part:  # the processes' parts of L and of a_N, summed in one collective
        summed = share.sum(torch.cat([adjoint, loss.reshape(1)]))
        adjoint, loss = summed[:-1], summed[-1]
    grad_lr = torch.zeros_like(lr) if exact else -(gradient_sum * adjoint).sum()
    grad_images = torch.zeros_like(images)
    grad_labels = torch.zeros_like(labels) if want_labels else None
    for k in reversed(range(len(steps))):
        batch, part = steps[k]
        step_grad, products = _vector_products(model, images[batch], labels[batch], visited[k], augment,
                                               step_seeds[k], adjoint, want_labels, exact, part)
        step_lr = _lr_at(lr, k)
        grad_images.index_add_(0, batch, -step_lr * products[0])
        if want_labels:
            grad_labels.index_add_(0, batch, -step_lr * products[1])
        if exact:
            hessian_product, step_lr_grad = products[-1], -(step_grad * adjoint).sum()
            if share is not None:  # both are sums over the batch's rows: one collective for the two
                summed = share.sum(torch.cat([hessian_product, step_lr_grad.reshape(1)]))
                hessian_product, step_lr_grad = summed[:-1], summed[-1]
            if lr.dim() == 0:
                grad_lr = grad_lr + step_lr_grad
            else:
                grad_lr[k] = step_lr_grad
            adjoint = adjoint - step_lr * hessian_product  # a_k = a_{k+1} − α_k·H_k a_{k+1}
    return TrajectoryResult(loss, grad_images, grad_lr, grad_labels)


def _vector_products(model, images, labels, params, augment, step_seed, adjoint, want_labels, with_hessian,
                     part=None):
    """Recompute one step's gradient g at `params` and return (g, products) where products are
    (∂g/∂x)ᵀa, then (∂g/∂y)ᵀa when `want_labels`, then H·a when `with_hessian`, from one double
    backward. The step's graph is freed on return, so only one step's activations ever live.
    With a `part`, g and H·a are this process's share of the sums (zeros when it has no rows)."""
    if part is not None and not len(images):
        zeros = torch.zeros_like(params)
        products = [torch.zeros_like(images)] + ([torch.zeros_like(labels)] if want_labels else [])
        return zeros, products + ([zeros] if with_hessian else [])
    with torch.enable_grad():
        leaf = params.detach().requires_grad_(True)
        images = images.requires_grad_(True)
        labels = labels.requires_grad_(want_labels)
        grad = _step_gradient(model, images, labels, leaf, augment, step_seed, True, part)
        inputs = [images] + ([labels] if want_labels else []) + ([leaf] if with_hessian else [])
        products = torch.autograd.grad(grad, inputs, grad_outputs=adjoint)
    return grad.detach(), products
