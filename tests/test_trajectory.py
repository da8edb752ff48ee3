"""ops.trajectory_match: the exact mode equals autograd through the unrolled steps, TESLA's scheme
matches its published closed form, the exact mode's saved activations do not grow with the
number of steps, and bad inputs are refused by name."""
import threading

import pytest
import torch
import torch.nn.functional as F

from condense_engine.models import FunctionalConvNet
from condense_engine.ops import trajectory_match, unroll
from condense_engine.ops.trajectory import RowShare, dsa_augment, schedule

DOUBLE = torch.float64




def _problem(norm="instancenorm", soft=False, dtype=DOUBLE, classes=4, ipc=2, seed=0):
    """A tiny student (width 8, depth 2, 8×8 images) with a target a little away from the start."""
    generator = torch.Generator().manual_seed(seed)
    net = FunctionalConvNet(3, classes, width=8, depth=2, norm=norm, im_size=(8, 8))
    images = torch.randn(classes * ipc, 3, 8, 8, generator=generator, dtype=dtype)
    if soft:
        labels = F.softmax(torch.randn(classes * ipc, classes, generator=generator, dtype=dtype), 1)
        labels.requires_grad_(True)
    else:
        labels = torch.arange(classes).repeat_interleave(ipc)
    start = net.init_params(seed, dtype=dtype)
    target = start + 0.05 * torch.randn(start.shape, generator=generator, dtype=dtype)
    return net, images, labels, torch.tensor(0.05, dtype=dtype), start, target


def _run(problem, memory, **kwargs):
    net, images, labels, lr, start, target = problem
    options = dict(steps=5, batch_size=3, seed=7)
    options.update(kwargs)
    return trajectory_match(images, labels, lr, start, target, net, memory=memory, **options)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("augment", [None, "dsa"])
def test_exact_equals_unrolled(soft, augment):
    augment = dsa_augment("color_crop_cutout_flip_scale_rotate") if augment else None
    problem = _problem(soft=soft)
    unrolled = _run(problem, "unrolled", augment=augment)
    exact = _run(problem, "exact", augment=augment)
    assert torch.allclose(exact.loss, unrolled.loss, rtol=1e-12, atol=0)
    assert unrolled.grad_images.abs().max() > 1e-4        # a real gradient, not two zeros
    assert torch.allclose(exact.grad_images, unrolled.grad_images, rtol=1e-9, atol=1e-14)
    assert torch.allclose(exact.grad_lr, unrolled.grad_lr, rtol=1e-9, atol=1e-14)
    if soft:
        assert unrolled.grad_labels.abs().max() > 1e-4
        assert torch.allclose(exact.grad_labels, unrolled.grad_labels, rtol=1e-9, atol=1e-14)
    else:
        assert exact.grad_labels is None and unrolled.grad_labels is None


class _ThreadSum:
    """RowShare.sum for `parties` threads standing in for processes: each call returns the sum of
    what every party passed in the same round."""

    def __init__(self, parties: int):
        self.barrier, self.slots = threading.Barrier(parties), [None] * parties

    def of(self, party: int):
        def total(tensor):
            self.slots[party] = tensor.clone()
            self.barrier.wait()
            result = torch.stack(self.slots).sum(0)
            self.barrier.wait()  # all have read this round before the next one writes
            return result
        return total


def _in_parties(bounds: list, run) -> dict:
    """run(party, first, end, share) in one thread per (first, end) row span of the set, the
    spans' RowShares summing through each other; {party: what run returned}."""
    total, collective, results = bounds[-1][1], _ThreadSum(len(bounds)), {}

    def party_main(party, first, end):
        results[party] = run(party, first, end, RowShare(first, end - first, total, collective.of(party)))
    threads = [threading.Thread(target=party_main, args=(party, *span)) for party, span in enumerate(bounds)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == list(range(len(bounds)))
    return results


def _assert_each_party_has_its_part(results: dict, whole, bounds: list, soft: bool) -> None:
    """Every party got the one-process loss and lr gradient, and its own rows' gradients."""
    for party, (first, end) in enumerate(bounds):
        got = results[party]
        torch.testing.assert_close(got.loss, whole.loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(got.grad_lr, whole.grad_lr, rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(got.grad_images, whole.grad_images[first:end], rtol=1e-9, atol=1e-14)
        if soft:
            torch.testing.assert_close(got.grad_labels, whole.grad_labels[first:end], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("memory", ["exact", "tesla"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_a_set_split_in_row_shares_gives_the_one_process_result(memory, soft):
    """Three shares (rows 0-1, 2, 3-7; batches of 3, so a share often holds none of a batch) with
    DSA: every share gets the one-process loss and lr gradient, and its rows' gradients."""
    net, images, labels, lr, start, target = _problem(soft=soft)
    augment = dsa_augment("color_crop_cutout_flip_scale_rotate")
    options = dict(steps=6, batch_size=3, seed=7, memory=memory, augment=augment)
    whole = trajectory_match(images, labels, lr, start, target, net, **options)
    bounds = [(0, 2), (2, 3), (3, 8)]

    def run(party, first, end, share):
        part_labels = labels[first:end].detach().requires_grad_(soft)
        return trajectory_match(images[first:end], part_labels, lr, start, target, net, share=share, **options)
    results = _in_parties(bounds, run)
    _assert_each_party_has_its_part(results, whole, bounds, soft)
    assert whole.grad_images.abs().max() > 1e-4


def test_a_share_is_checked():
    net, images, labels, lr, start, target = _problem()
    share = RowShare(2, 3, 8, lambda tensor: tensor)
    with pytest.raises(ValueError, match="share holds rows 2..4 of 8, but 8 images were given"):
        trajectory_match(images, labels, lr, start, target, net, steps=2, batch_size=3, memory="exact", share=share)
    with pytest.raises(ValueError, match="memory='unrolled' runs in one process"):
        trajectory_match(images[2:5], labels[2:5], lr, start, target, net, steps=2, batch_size=3, share=share)
    with pytest.raises(ValueError, match=r"augment must accept share=\(positions, size\)"):
        trajectory_match(images[2:5], labels[2:5], lr, start, target, net, steps=2, batch_size=3, memory="exact",
                         share=share, augment=lambda x, step_seed: x)
    with pytest.raises(ValueError, match="RowShare with a callable sum"):
        trajectory_match(images[2:5], labels[2:5], lr, start, target, net, steps=2, batch_size=3, memory="exact",
                         share=RowShare(2, 3, 8, None))


def test_exact_equals_unrolled_with_batchnorm_and_many_steps():
    problem = _problem(norm="batchnorm", classes=3, ipc=3)
    unrolled = _run(problem, "unrolled", steps=12, batch_size=4)
    exact = _run(problem, "exact", steps=12, batch_size=4)
    assert torch.allclose(exact.grad_images, unrolled.grad_images, rtol=1e-9, atol=1e-14)
    assert torch.allclose(exact.grad_lr, unrolled.grad_lr, rtol=1e-9, atol=1e-14)


def test_unrolled_lr_gradient_matches_finite_differences():
    net, images, labels, lr, start, target = _problem()
    result = _run((net, images, labels, lr, start, target), "unrolled")
    h = 1e-6
    up = _run((net, images, labels, lr + h, start, target), "unrolled").loss
    down = _run((net, images, labels, lr - h, start, target), "unrolled").loss
    assert torch.allclose(result.grad_lr, (up - down) / (2 * h), rtol=1e-6)


def test_loss_is_the_normalised_distance_after_the_scheduled_sgd_steps():
    net, images, labels, lr, start, target = _problem()
    batches, _ = schedule(len(images), 5, 3, seed=7)
    params = start.clone()
    for batch in batches:
        params = params.requires_grad_(True)
        loss = F.cross_entropy(net.forward(images[batch], params), labels[batch])
        params = (params - lr * torch.autograd.grad(loss, params)[0]).detach()
    expected = (params - target).pow(2).sum() / (start - target).pow(2).sum()
    for memory in ("unrolled", "exact", "tesla"):
        assert torch.allclose(_run((net, images, labels, lr, start, target), memory).loss, expected, rtol=1e-12)


def test_schedule_consumes_permutations_in_chunks_and_depends_on_seed():
    batches, seeds = schedule(8, 5, 3, seed=1)
    assert [len(b) for b in batches] == [3, 3, 2, 3, 3]
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(8))   # one permutation, then a new one
    again, again_seeds = schedule(8, 5, 3, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(batches, again)) and seeds == again_seeds
    other, other_seeds = schedule(8, 5, 3, seed=2)
    assert other_seeds != seeds


def test_batch_size_larger_than_the_set_means_the_whole_set():
    problem = _problem()
    assert torch.equal(_run(problem, "exact", batch_size=8).grad_images,
                       _run(problem, "exact", batch_size=1000).grad_images)


def _tesla_by_hand(problem, steps, batch_size, seed):
    """TESLA's published update: dL/dx_i = (2/D)·∂/∂x [(α(θ* − θ_0) + α²G)·g_i] with θ_i fixed,
    dL/dα from ‖θ_0 − αG − θ*‖²/D with G constant."""
    net, images, labels, lr, start, target = problem
    batches, _ = schedule(len(images), steps, batch_size, seed)
    params, visited, gradient_sum = start, [], torch.zeros_like(start)
    for batch in batches:
        visited.append(params)
        leaf = params.clone().requires_grad_(True)
        g = torch.autograd.grad(F.cross_entropy(net.forward(images[batch], leaf), labels[batch]), leaf)[0]
        gradient_sum += g
        params = params - lr * g
    distance = (start - target).pow(2).sum()
    vector = lr * (target - start) + lr ** 2 * gradient_sum
    grad_images = torch.zeros_like(images)
    for params, batch in zip(visited, batches):
        leaf = params.clone().requires_grad_(True)
        x = images[batch].clone().requires_grad_(True)
        g = torch.autograd.grad(F.cross_entropy(net.forward(x, leaf), labels[batch]), leaf, create_graph=True)[0]
        grad_images[batch] += 2 * torch.autograd.grad((vector * g).sum() / distance, x)[0]
    alpha = lr.clone().requires_grad_(True)
    grad_lr = torch.autograd.grad((start - alpha * gradient_sum - target).pow(2).sum() / distance, alpha)[0]
    return grad_images, grad_lr


def test_tesla_matches_the_published_closed_form():
    problem = _problem()
    tesla = _run(problem, "tesla", steps=4, batch_size=3, seed=3)
    grad_images, grad_lr = _tesla_by_hand(problem, steps=4, batch_size=3, seed=3)
    assert torch.allclose(tesla.grad_images, grad_images, rtol=1e-9, atol=1e-14)
    assert torch.allclose(tesla.grad_lr, grad_lr, rtol=1e-9)


def test_tesla_equals_unrolled_for_one_step_and_drops_curvature_for_more():
    problem = _problem(soft=True)
    one_tesla, one_unrolled = _run(problem, "tesla", steps=1), _run(problem, "unrolled", steps=1)
    assert torch.allclose(one_tesla.grad_images, one_unrolled.grad_images, rtol=1e-9, atol=1e-14)
    assert torch.allclose(one_tesla.grad_lr, one_unrolled.grad_lr, rtol=1e-9)
    assert torch.allclose(one_tesla.grad_labels, one_unrolled.grad_labels, rtol=1e-9, atol=1e-14)
    many_tesla, many_unrolled = _run(problem, "tesla", steps=6), _run(problem, "unrolled", steps=6)
    gap = (many_tesla.grad_images - many_unrolled.grad_images).norm() / many_unrolled.grad_images.norm()
    assert gap > 1e-3
    # Dropping the Hessian terms is a small correction for a small lr: the directions still agree.
    assert F.cosine_similarity(many_tesla.grad_images.flatten(), many_unrolled.grad_images.flatten(), 0) > 0.5


class _SavedBytes:
    """Peak bytes of tensors saved for backward that are alive at once (a saved-tensors hook)."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, tensor):
        return _Held(self, tensor)

    @staticmethod
    def unpack(held):
        return held.tensor


class _Held:
    def __init__(self, counter, tensor):
        # detach(): holding a node's own output with its grad_fn would make a reference cycle.
        self.counter, self.tensor = counter, tensor.detach()
        self.size = tensor.numel() * tensor.element_size()
        counter.live += self.size
        counter.peak = max(counter.peak, counter.live)

    def __del__(self):
        self.counter.live -= self.size


def _peak_saved_bytes(memory, steps):
    problem = _problem(dtype=torch.float32)
    counter = _SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        _run(problem, memory, steps=steps, batch_size=8)
    return counter.peak


def test_exact_and_tesla_activation_memory_is_flat_in_steps_while_unrolled_grows():
    unrolled = [_peak_saved_bytes("unrolled", steps) for steps in (2, 8)]
    assert unrolled[1] > 3 * unrolled[0]
    for memory in ("exact", "tesla"):
        short, long = (_peak_saved_bytes(memory, steps) for steps in (2, 8))
        assert long == short
        assert long < unrolled[1] / 3


def test_labels_gradient_only_when_soft_labels_require_grad():
    net, images, labels, lr, start, target = _problem(soft=True)
    frozen = labels.detach()
    result = trajectory_match(images, frozen, lr, start, target, net, steps=2, batch_size=4, memory="exact")
    assert result.grad_labels is None


@pytest.mark.parametrize("change, name", [
    (dict(images=torch.zeros(8, 3, 8)), "images"),
    (dict(labels=torch.zeros(7, dtype=torch.int64)), "labels"),
    (dict(labels=torch.zeros(8, 4, dtype=torch.float32)), "labels"),
    (dict(lr=torch.tensor([0.1, 0.2], dtype=DOUBLE)), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(lr=torch.tensor(float("inf"), dtype=DOUBLE)), "lr"),
    (dict(target=torch.zeros(3, dtype=DOUBLE)), "target"),
    (dict(start=torch.zeros(3, dtype=DOUBLE), target=torch.ones(3, dtype=DOUBLE)), "start"),
    (dict(steps=0), "steps"),
    (dict(batch_size=0), "batch_size"),
    (dict(memory="checkpointed"), "memory"),
    (dict(augment="dsa"), "augment"),
    (dict(seed=1.5), "seed"),
    (dict(same=True), "start and target are identical"),
])
def test_invalid_inputs_raise_value_errors_naming_the_argument(change, name):
    net, images, labels, lr, start, target = _problem()
    arguments = dict(images=images, labels=labels, lr=lr, start=start, target=target, model=net, steps=2,
                     batch_size=4, memory="exact", augment=None, seed=0)
    if change.pop("same", False):
        arguments["target"] = start.clone()
    arguments.update(change)
    with pytest.raises(ValueError, match=name):
        trajectory_match(**arguments)


def test_unavailable_backend_is_refused():
    net, images, labels, lr, start, target = _problem()
    with pytest.raises(RuntimeError, match="triton"):
        trajectory_match(images, labels, lr, start, target, net, steps=1, batch_size=4, backend="triton")


def _real_batch():
    """(12 real images, their labels, the generator that drew them) for the unroll tests."""
    generator = torch.Generator().manual_seed(11)
    real = torch.randn(12, 3, 8, 8, generator=generator, dtype=DOUBLE)
    return real, torch.randint(0, 4, (12,), generator=generator), generator


def _unroll_problem(soft=False):
    """_problem's student with DD's loss: cross-entropy of the last parameters on a real batch,
    after cycling two fixed batches three times at one lr per step."""
    net, images, labels, _, start, _ = _problem(soft=soft)
    real, real_labels, generator = _real_batch()
    batches = [torch.tensor([0, 2, 4, 6]), torch.tensor([1, 3, 5, 7])] * 3
    lrs = 0.05 + 0.01 * torch.rand(len(batches), generator=generator, dtype=DOUBLE)
    terminal = lambda params: F.cross_entropy(net.forward(real, params), real_labels)  # noqa: E731
    return net, images, labels, lrs, start, batches, terminal


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_unroll_exact_equals_unrolled_for_any_terminal_loss_and_per_step_lrs(soft):
    net, images, labels, lrs, start, batches, terminal = _unroll_problem(soft)
    exact = unroll(images, labels, lrs, start, net, batches, terminal, memory="exact")
    unrolled = unroll(images, labels, lrs, start, net, batches, terminal, memory="unrolled")
    assert exact.grad_lr.shape == lrs.shape
    torch.testing.assert_close(exact.loss, unrolled.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(exact.grad_images, unrolled.grad_images, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(exact.grad_lr, unrolled.grad_lr, rtol=1e-9, atol=1e-14)
    if soft:
        torch.testing.assert_close(exact.grad_labels, unrolled.grad_labels, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_unroll_split_in_row_shares_with_the_terminal_loss_in_parts_gives_the_one_process_result(soft):
    """DD across processes: three shares of the synthetic rows (0-1, 2, 3-7) and of the real batch
    (each party's terminal sums its real rows over the whole batch's 12); every party gets the
    one-process loss and per-step lr gradient, and its rows' gradients."""
    net, images, labels, lrs, start, batches, terminal = _unroll_problem(soft)
    real, real_labels, _ = _real_batch()
    whole = unroll(images, labels, lrs, start, net, batches, terminal, memory="exact")
    real_spans = {0: slice(0, 5), 1: slice(5, 6), 2: slice(6, 12)}

    def run(party, first, end, share):
        rows = real_spans[party]
        terminal = lambda params: F.cross_entropy(net.forward(real[rows], params), real_labels[rows],  # noqa: E731
                                                  reduction="sum") / len(real)
        part_labels = labels[first:end].detach().requires_grad_(soft)
        return unroll(images[first:end], part_labels, lrs, start, net, batches, terminal, memory="exact",
                      share=share)
    bounds = [(0, 2), (2, 3), (3, 8)]
    results = _in_parties(bounds, run)
    assert whole.grad_images.abs().max() > 1e-4
    _assert_each_party_has_its_part(results, whole, bounds, soft)


def test_unroll_refuses_a_share_in_the_unrolled_mode():
    net, images, labels, lrs, start, batches, terminal = _unroll_problem()
    with pytest.raises(ValueError, match="memory='unrolled' runs in one process"):
        unroll(images[2:5], labels[2:5], lrs, start, net, batches, terminal, memory="unrolled",
               share=RowShare(2, 3, 8, lambda tensor: tensor))


def test_unroll_per_step_lr_gradient_matches_finite_differences():
    net, images, labels, lrs, start, batches, terminal = _unroll_problem()
    result = unroll(images, labels, lrs, start, net, batches, terminal, memory="exact")
    step, h = 3, 1e-6
    bump = torch.zeros_like(lrs)
    bump[step] = h
    up = unroll(images, labels, lrs + bump, start, net, batches, terminal).loss
    down = unroll(images, labels, lrs - bump, start, net, batches, terminal).loss
    torch.testing.assert_close(result.grad_lr[step], (up - down) / (2 * h), rtol=1e-6, atol=0)


@pytest.mark.parametrize("change, message", [
    (dict(lrs=torch.full((5,), 0.1, dtype=DOUBLE)), "one float per step"),
    (dict(batches=[torch.tensor([0, 8])]), "outside"),
    (dict(batches=[]), "batches"),
    (dict(terminal=3.0), "terminal"),
    (dict(memory="tesla"), "tesla"),
])
def test_unroll_refuses_bad_inputs_by_name(change, message):
    net, images, labels, lrs, start, batches, terminal = _unroll_problem()
    arguments = dict(lrs=lrs, batches=batches, terminal=terminal, memory="exact")
    arguments.update(change)
    if "batches" in change and "lrs" not in change:
        arguments["lrs"] = torch.tensor(0.05, dtype=DOUBLE)
    with pytest.raises(ValueError, match=message):
        unroll(images, labels, arguments["lrs"], start, net, arguments["batches"], arguments["terminal"],
               memory=arguments["memory"])
