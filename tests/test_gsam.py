"""GSAM: one step matches the update computed by hand from the paper's formulas (plain and
adaptive, through SGD's momentum and weight decay), α = 0 is SAM, ρ = 0 is SGD bit for bit,
degenerate gradients stay finite and bad settings are refused."""
import pytest
import torch

from condense_engine.gsam import GSAM

# L(w) = Σ ½·a⊙w² + b⊙w over two tensors, so ∇L(w) = a⊙w + b; an uneven a makes ∇L(w + e)
# point away from ∇L(w), so the orthogonal part is not zero.
CURVATURE = (torch.tensor([1.0, 3.0], dtype=torch.float64), torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64))
OFFSET = (torch.tensor([0.2, -0.4], dtype=torch.float64), torch.tensor([0.1, 0.3, -0.2], dtype=torch.float64))
START = (torch.tensor([0.7, -1.2], dtype=torch.float64), torch.tensor([0.4, 0.9, -0.6], dtype=torch.float64))


def _quadratic_params():
    return [w.clone().requires_grad_() for w in START]


def _quadratic_closure(params):
    return _with_backward(lambda: sum((0.5 * a * w * w + b * w).sum() for a, b, w in zip(CURVATURE, OFFSET, params)))


def _with_backward(loss_fn):
    def closure():
        loss = loss_fn()
        loss.backward()
        return loss
    return closure


def _gradient(w: torch.Tensor) -> torch.Tensor:
    return torch.cat(CURVATURE) * w + torch.cat(OFFSET)


def _direction_by_hand(w: torch.Tensor, rho: float, alpha: float, adaptive: bool) -> torch.Tensor:
    """d = g_p − α·g_⊥ from the formulas in gsam.py, on the flat weight vector."""
    g = _gradient(w)
    if adaptive:
        e = rho * w * w * g / (w.abs() * g).norm()
    else:
        e = rho * g / g.norm()
    g_p = _gradient(w + e)
    orthogonal = g - (g @ g_p) / (g_p @ g_p) * g_p
    return g_p - alpha * orthogonal


@pytest.mark.parametrize("adaptive", [False, True])
def test_two_steps_match_the_hand_computed_update_through_momentum_and_weight_decay(adaptive):
    lr, rho, alpha, momentum, decay = 0.1, 0.05, 0.3, 0.9, 0.01
    params = _quadratic_params()
    optimizer = GSAM(params, lr=lr, rho=rho, alpha=alpha, adaptive=adaptive, momentum=momentum,
                     weight_decay=decay)
    w = torch.cat(START)
    velocity = None
    for _ in range(2):
        step = _direction_by_hand(w, rho, alpha, adaptive) + decay * w
        velocity = step if velocity is None else momentum * velocity + step
        w = w - lr * velocity
        optimizer.step(_quadratic_closure(params))
        torch.testing.assert_close(torch.cat([p.detach() for p in params]), w, rtol=1e-12, atol=1e-12)


def test_the_orthogonal_part_changes_the_update():
    """The hand check above is only meaningful if α actually moves the step."""
    w = torch.cat(START)
    assert (_direction_by_hand(w, 0.05, 0.3, False) - _direction_by_hand(w, 0.05, 0.0, False)).abs().max() > 1e-3


def test_alpha_zero_is_sam():
    lr, rho = 0.1, 0.05
    params = _quadratic_params()
    GSAM(params, lr=lr, rho=rho, alpha=0.0).step(_quadratic_closure(params))
    w = torch.cat(START)
    g = _gradient(w)
    sam = w - lr * _gradient(w + rho * g / g.norm())
    torch.testing.assert_close(torch.cat([p.detach() for p in params]), sam, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("adaptive", [False, True])
def test_rho_zero_is_plain_sgd_bit_for_bit(adaptive):
    generator = torch.Generator().manual_seed(0)
    inputs, labels = torch.randn(16, 5, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    model.load_state_dict(reference.state_dict())
    settings = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    sgd = torch.optim.SGD(reference.parameters(), **settings)
    gsam = GSAM(model.parameters(), rho=0.0, alpha=0.3, adaptive=adaptive, **settings)
    for _ in range(3):
        sgd.zero_grad()
        torch.nn.functional.cross_entropy(reference(inputs), labels).backward()
        sgd.step()
        gsam.step(_with_backward(lambda: torch.nn.functional.cross_entropy(model(inputs), labels)))
    for expected, found in zip(reference.parameters(), model.parameters()):
        assert torch.equal(expected, found)


def test_closure_runs_twice_on_fresh_gradients_and_the_first_loss_is_returned():
    params = _quadratic_params()
    losses = []

    def closure():      # never zeroes the gradients itself: GSAM must
        loss = _quadratic_closure(params)()
        losses.append(loss.detach())
        return loss

    returned = GSAM(params, lr=0.1, rho=0.05, alpha=0.3).step(closure)
    assert len(losses) == 2 and torch.equal(returned.detach(), losses[0]) and losses[1] > losses[0]
    w = torch.cat(START)
    expected = w - 0.1 * _direction_by_hand(w, 0.05, 0.3, False)
    torch.testing.assert_close(torch.cat([p.detach() for p in params]), expected, rtol=1e-12, atol=1e-12)


def test_parameters_without_gradient_are_left_alone_and_zero_gradients_stay_finite():
    used = torch.tensor([0.0, 0.0], requires_grad=True)
    unused = torch.tensor([3.0], requires_grad=True)
    frozen = torch.tensor([4.0], requires_grad=False)
    for adaptive in (False, True):
        optimizer = GSAM([used, unused, frozen], lr=0.1, rho=0.05, alpha=0.3, adaptive=adaptive)
        optimizer.step(_with_backward(lambda: (used ** 2).sum()))       # ∇L(0) = 0: no perturbation
        assert torch.equal(used.detach(), torch.zeros(2))
    optimizer.step(_with_backward(lambda: ((used - 1) ** 2).sum()))
    assert torch.isfinite(used).all() and (used > 0).all()
    assert unused.grad is None and unused.item() == 3.0 and frozen.item() == 4.0


def test_zero_gradient_at_the_perturbed_point_keeps_the_update_finite():
    """‖g_p‖ = 0 means g_⊥ = g, so d = −α·g."""
    w = torch.tensor([2.0], requires_grad=True)
    # L = min(w, 2.05): g = 1 at w = 2, e = 0.1 lands where the gradient is 0, so d = −0.5.
    optimizer = GSAM([w], lr=1.0, rho=0.1, alpha=0.5)
    optimizer.step(_with_backward(lambda: torch.clamp(w, max=2.05) * 1.0))
    assert w.item() == pytest.approx(2.0 + 0.5 * 1.0)


@pytest.mark.parametrize("setting", [dict(rho=-0.01), dict(alpha=-0.3), dict(lr=-0.01), dict(rho=float("nan"))])
def test_bad_settings_are_refused(setting):
    settings = {**dict(lr=0.01, rho=0.01, alpha=0.3), **setting}
    with pytest.raises(ValueError, match=next(iter(setting))):
        GSAM([torch.zeros(2, requires_grad=True)], **settings)


def test_step_without_closure_is_refused():
    with pytest.raises(TypeError, match="closure"):
        GSAM([torch.zeros(2, requires_grad=True)], lr=0.01, rho=0.01, alpha=0.3).step(None)
