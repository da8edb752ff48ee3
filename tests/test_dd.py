"""DD (methods.md §2): batch layout, published initialisation, the learned step sizes, and a short
run that makes freshly initialised networks trained on the set better on the real data."""
import pytest
import torch
import torch.nn.functional as F

import condense_engine as ce
from condense_engine import ops
from condense_engine.methods.dd import DD
from tests.toy_data import toy_dataset

FAST = dict(batch_real=24, model="ConvNetW32", distill_steps=2, distill_epochs=2)
RUN = dict(method="dd", ipc=2, seed=0, progress=False, device="cpu")


def test_step_batches_hold_the_same_slice_of_every_class():
    batches = DD.step_batches(classes=3, ipc=4, steps=2, device="cpu")
    assert [b.tolist() for b in batches] == [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11]]


def _method(**options):
    data = toy_dataset()
    method = DD(data.name, 2, **dict(FAST, **options))
    synset = ce.distill(data, iterations=0, **dict(RUN, **FAST))
    sampler = ce.datasets.ClassSampler(data, generator=torch.Generator().manual_seed(0))
    method.init(synset, data, sampler, torch.Generator().manual_seed(0), torch.device("cpu"))
    return method


def test_fresh_networks_are_initialised_as_published():
    method = _method()
    params = method.student.unflatten(method.fresh_params())
    for name, value in params.items():
        if value.dim() > 1:
            fan_in, fan_out = value[0].numel(), value.shape[0] * value[0, 0].numel()
            assert value.std().item() == pytest.approx((2 / (fan_in + fan_out)) ** 0.5, rel=0.25), name
        else:
            assert torch.equal(value, torch.zeros_like(value) if name.endswith("bias") else torch.ones_like(value))
    assert not torch.equal(method.fresh_params(), method.fresh_params())


@pytest.mark.parametrize("options, message", [
    (dict(distill_steps=3), "must divide ipc"), (dict(init="zeros"), "init"), (dict(memory="tesla"), "memory"),
    (dict(batch_real=2), "no real image per class")])
def test_bad_layouts_and_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        ce.distill(toy_dataset(), iterations=1, **dict(RUN, **dict(FAST, **options)))


def _real_loss_after_training(synset, step_lrs, seeds=(11, 12, 13, 14)) -> float:
    """Mean real cross-entropy of fresh networks after the set's unrolled schedule."""
    data = toy_dataset()
    method = _method()
    real, labels = data.normalized(), data.labels
    losses = []
    for seed in seeds:
        method.generator.manual_seed(seed)
        result = ops.unroll(synset.images, synset.labels, torch.tensor(step_lrs), method.fresh_params(),
                            method.student, method.batches,
                            lambda params: F.cross_entropy(method.student.forward(real, params), labels))
        losses.append(float(result.loss))
    return sum(losses) / len(losses)


def test_a_short_run_teaches_fresh_networks_and_learns_the_step_sizes():
    data = toy_dataset()
    before = ce.distill(data, iterations=0, **dict(RUN, **FAST))
    after = ce.distill(data, iterations=40, **dict(RUN, **FAST, lr_img=0.05))
    steps = FAST["distill_steps"] * FAST["distill_epochs"]
    assert before.meta["step_lrs"] == pytest.approx([0.02] * steps)
    assert len(after.meta["step_lrs"]) == steps and after.meta["step_lrs"] != before.meta["step_lrs"]
    initial = _real_loss_after_training(before, before.meta["step_lrs"])
    learned = _real_loss_after_training(after, after.meta["step_lrs"])
    assert learned < 0.7 * initial, (initial, learned)


def test_exact_and_unrolled_memory_give_the_same_run():
    data = toy_dataset()
    exact = ce.distill(data, iterations=2, **dict(RUN, **FAST, memory="exact"))
    unrolled = ce.distill(data, iterations=2, **dict(RUN, **FAST, memory="unrolled"))
    torch.testing.assert_close(exact.images, unrolled.images, rtol=1e-4, atol=1e-5)
    assert exact.meta["step_lrs"] == pytest.approx(unrolled.meta["step_lrs"], rel=1e-4)
