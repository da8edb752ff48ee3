"""DD (methods.md §2): batch layout, published initialisation, the learned step sizes, a short
run that makes freshly initialised networks trained on the set better on the real data, and the
dd evaluation recipe that replays the learned steps."""
import json

import pytest
import torch
import torch.nn.functional as F

import condense_engine as ce
from condense_engine import ops
from condense_engine.evaluate import accuracy, normalized_like_the_set
from condense_engine.methods.dd import DD, xavier_params
from condense_engine.models import functional_model
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


# The dd evaluation recipe: fresh networks replay the set's learned steps (DD's "random init" numbers).

def _replayed_by_hand(synset, test, seed: int, repeat: int, model: str = FAST["model"]) -> tuple[float, float]:
    """A `model` module drawn as DD draws students, then plain SGD at each learned step size on
    its batch of the set, written with torch.optim rather than the recipe's functional steps;
    (test accuracy, loss of the last step)."""
    student = functional_model(model, 1, 3, (12, 12))
    net = student.to_module(xavier_params(student, torch.Generator().manual_seed(seed * 1000 + repeat), "cpu"))
    images, labels = synset.materialize()
    steps = synset.meta["distill_steps"]
    batches = DD.step_batches(3, 2, steps, "cpu") * (len(synset.meta["step_lrs"]) // steps)
    for lr, rows in zip(synset.meta["step_lrs"], batches):
        optimizer = torch.optim.SGD(net.parameters(), lr=lr)
        optimizer.zero_grad()
        loss = F.cross_entropy(net(images[rows]), labels[rows])
        loss.backward()
        optimizer.step()
    return accuracy(net, normalized_like_the_set(synset, test)), float(loss.detach())


def test_the_dd_recipe_replays_the_learned_steps_from_fresh_published_initialisations(tmp_path):
    data = toy_dataset()
    synset = ce.distill(data, iterations=3, **dict(RUN, **FAST))
    synset.save(tmp_path / "dd.pt")
    loaded = ce.SyntheticSet.load(tmp_path / "dd.pt")
    report = ce.evaluate(loaded, data, model=FAST["model"], recipe="dd", repeats=2, seed=5, baseline=True,
                         train_set=data)
    for repeat, (acc, loss) in enumerate(zip(report.accuracies, report.losses)):
        by_hand = _replayed_by_hand(loaded, data, 5, repeat)
        assert acc == pytest.approx(by_hand[0], abs=1.5 / len(data)) and loss == pytest.approx(by_hand[1], rel=1e-4)
    assert report.recipe["recipe"] == "dd" and report.recipe["dsa_strategy"] is None
    assert report.recipe["epochs"] == FAST["distill_epochs"] and report.recipe["batch_size"] == 3  # 1 per class
    assert report.recipe["lr"] == pytest.approx(sum(loaded.meta["step_lrs"]) / 4)
    assert len(report.baseline.accuracies) == 2 and report.baseline.recipe["recipe"] == "dd"
    again = ce.evaluate(loaded, data, model=FAST["model"], recipe="dd", repeats=2, seed=5)
    assert again.accuracies == report.accuracies


def test_the_dd_recipe_scores_a_distilled_set_above_its_noise_start():
    data = toy_dataset()
    before = ce.distill(data, iterations=0, **dict(RUN, **FAST))
    after = ce.distill(data, iterations=40, **dict(RUN, **FAST, lr_img=0.05))
    scores = [ce.evaluate(s, data, model=FAST["model"], recipe="dd", repeats=3).mean for s in (before, after)]
    assert scores[1] > scores[0] + 0.3, scores


def test_a_dd_run_evaluates_by_replay_while_it_runs(tmp_path):
    data = toy_dataset()
    log = tmp_path / "log.jsonl"
    ce.distill(data, iterations=2, test_set=data, eval_every=1, log=str(log),
               eval_options=dict(model=FAST["model"], recipe="dd", repeats=1), **dict(RUN, **FAST))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [0 <= r["eval"]["mean"] <= 1 for r in records] == [True, True]


@pytest.mark.parametrize("change, message", [
    (dict(method="dm"), "holds no learned schedule"),
    (dict(step_lrs=[0.02] * 3), "damaged"),
    (dict(step_lrs=[0.02, -0.01, 0.02, 0.02]), "finite and positive"),
    (dict(step_lrs=[0.02, float("nan"), 0.02, 0.02]), "finite and positive")])
def test_the_dd_recipe_refuses_a_set_without_a_usable_schedule(change, message):
    data = toy_dataset()
    synset = ce.distill(data, iterations=0, **dict(RUN, **FAST))
    synset.meta.update(change)
    with pytest.raises(ValueError, match=message):
        ce.evaluate(synset, data, model=FAST["model"], recipe="dd", repeats=1)


def test_the_dd_recipe_refuses_a_set_out_of_class_order():
    data = toy_dataset()
    synset = ce.distill(data, iterations=0, **dict(RUN, **FAST))
    synset.labels = synset.labels.flip(0)
    with pytest.raises(ValueError, match="class order"):
        ce.evaluate(synset, data, model=FAST["model"], recipe="dd", repeats=1)


@pytest.mark.parametrize("options, message", [
    (dict(lr=0.01), "drop lr"), (dict(batch_size=4), "drop batch_size"), (dict(batched=True), "batched"),
    (dict(dsa=False, dc_augment="crop"), "drop dc_augment"),
    (dict(model="LeNet"), "learned for a ConvNetW32 student")])
def test_the_dd_recipe_refuses_what_it_cannot_honour(options, message):
    data = toy_dataset()
    synset = ce.distill(data, iterations=0, **dict(RUN, **FAST))
    with pytest.raises(ValueError, match=message):
        ce.evaluate(synset, data, **dict(dict(model=FAST["model"], recipe="dd", repeats=1), **options))


def test_the_dd_recipe_refuses_a_batch_norm_student():
    data = toy_dataset()
    synset = ce.distill(data, iterations=0, **dict(RUN, **dict(FAST, model="ConvNetBN")))
    with pytest.raises(ValueError, match="batch norm"):
        ce.evaluate(synset, data, recipe="dd", repeats=1)


def test_dd_distils_for_lenet_as_published_and_replays_on_it():
    """DD's MNIST student is LeNet; the replay runs on the student the steps were learned for."""
    assert [DD(name, 10).options["model"] for name in ("mnist", "fashion-mnist", "cifar10")] == \
        ["LeNet", "LeNet", "ConvNet"]
    data = toy_dataset()
    lenet = dict(FAST, model="LeNet")
    before = ce.distill(data, iterations=0, **dict(RUN, **lenet))
    after = ce.distill(data, iterations=40, **dict(RUN, **lenet, lr_img=0.05))
    reports = [ce.evaluate(s, data, recipe="dd", repeats=3, seed=2) for s in (before, after)]
    assert [r.recipe["model"] for r in reports] == ["LeNet", "LeNet"]
    assert reports[1].mean > reports[0].mean + 0.3, [r.mean for r in reports]
    acc, loss = _replayed_by_hand(after, data, 2, 0, model="LeNet")
    assert reports[1].accuracies[0] == pytest.approx(acc, abs=1.5 / len(data))
    assert reports[1].losses[0] == pytest.approx(loss, rel=1e-4)


def test_only_a_dd_run_can_be_evaluated_by_replay():
    data = toy_dataset()
    with pytest.raises(ValueError, match="learns none"):
        ce.distill(data, method="dm", ipc=2, iterations=1, progress=False, test_set=data, eval_every=1,
                   eval_options=dict(recipe="dd"))
    synset = ce.distill(data, iterations=0, **dict(RUN, **FAST))
    with pytest.raises(ValueError, match="fair scores"):
        ce.fair_scores(synset, data, data, full_accuracy=0.9, model=FAST["model"], recipe="dd", repeats=1)
