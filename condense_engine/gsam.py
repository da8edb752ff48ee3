"""GSAM: Surrogate Gap Guided Sharpness-Aware Minimization (Zhuang et al., ICLR 2022) over SGD.

DATM trains its "flat" experts with it (methods.md §8.1). One step at weights w, with the
gradient norms and inner products taken over all parameters together:

    g   = ∇L(w)
    e   = ρ·g / ‖g‖                       (plain)
    e   = ρ·(w²⊙g) / ‖|w|⊙g‖              (adaptive: ASAM's T_w = |w| with no η offset, as in
                                           the GSAM reference code)
    g_p = ∇L(w + e)
    g_⊥ = g − (⟨g, g_p⟩ / ‖g_p‖²)·g_p      (the part of g orthogonal to g_p)
    d   = g_p − α·g_⊥

then w is restored and SGD (lr, momentum, weight decay as configured) steps with d in place of
the gradient. α = 0 is SAM (ASAM when adaptive); ρ = 0 is plain SGD. A zero ‖g‖ gives e = 0
and a zero ‖g_p‖ gives g_⊥ = g, so no division by zero.

The paper lets ρ follow the lr schedule between ρ_min and ρ_max; DATM keeps the lr constant
with ρ_min = ρ_max, so `rho` is one number here (assign `optimizer.rho` to schedule it).
"""
import torch


class GSAM(torch.optim.SGD):
    """SGD stepping along GSAM's direction; `step(closure)` runs the closure twice.

    The closure computes the loss on one fixed batch and calls `backward()` on it, like
    torch.optim.LBFGS's; GSAM zeroes the gradients before each call, so the second pass never
    accumulates onto the first, and returns the first call's loss (the loss at w). The batch
    and any augmentation must be drawn outside the closure so both passes see the same data.
    Modules with running statistics (BatchNorm) update them on both passes.
    """

    def __init__(self, params, lr: float, *, rho: float, alpha: float, adaptive: bool = False,
                 momentum: float = 0.0, weight_decay: float = 0.0):
        for name, value in (("lr", lr), ("rho", rho), ("alpha", alpha)):
            if not value >= 0:
                raise ValueError(f"GSAM {name} must be a non-negative number, got {value!r}")
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.rho = float(rho)
        self.alpha = float(alpha)
        self.adaptive = bool(adaptive)

    def step(self, closure):
        """One GSAM update; `closure()` returns the loss after calling its backward()."""
        if closure is None:
            raise TypeError("GSAM.step needs a closure that computes the loss and calls backward(): "
                            "it evaluates the gradient twice, at w and at the perturbed w + e")
        loss = self._gradient_pass(closure)
        with torch.no_grad():
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            if not params:
                return loss
            grads = [p.grad.clone() for p in params]
            weights = [p.clone() for p in params]
            scaled = [w.abs() * g for w, g in zip(weights, grads)] if self.adaptive else grads
            norm = _inner_product(scaled, scaled).sqrt()
            scale = torch.where(norm > 0, self.rho / norm, torch.zeros_like(norm))
            for p, w, g in zip(params, weights, grads):
                p.add_(w * w * g * scale if self.adaptive else g * scale)
        self._gradient_pass(closure)
        with torch.no_grad():
            perturbed = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            sq_norm = _inner_product(perturbed, perturbed)
            inner = _inner_product(grads, perturbed)
            projection = torch.where(sq_norm > 0, inner / sq_norm, torch.zeros_like(sq_norm))
            for p, w, g, g_p in zip(params, weights, grads, perturbed):
                orthogonal = g - projection * g_p
                p.copy_(w)
                p.grad = g_p - self.alpha * orthogonal
        super().step()
        return loss

    def _gradient_pass(self, closure):
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            return closure()


def _inner_product(left: list, right: list) -> torch.Tensor:
    """Σ over all tensors of ⟨left_i, right_i⟩: the global inner product of two parameter lists."""
    return torch.stack([(a * b).sum() for a, b in zip(left, right)]).sum()
