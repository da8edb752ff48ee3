"""The evaluation protocol on tiny sets: it learns, it follows the recipe, it reports a baseline,
its repeats trained together as one vmapped model match the repeats trained one by one, and a
stopped evaluation resumes from its finished runs."""
import importlib
import types
import warnings

import pytest
import torch

import condense_engine as ce
from condense_engine import evaluate_batched
from condense_engine.datasets import from_tensors
from condense_engine.evaluate import CPU_LOOP_REASON, accuracy, fresh_models, train_and_test
from condense_engine.models import layers
from condense_engine.evaluate_batched import train_and_test_batched
from condense_engine.synset import SyntheticSet


def _separable(per_class, classes=3, size=8, seed=0):
    """Each class lights up its own band of rows: trivially learnable, so accuracy must be high."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = torch.rand(len(labels), 1, size, size, generator=g) * 60
    for c in range(classes):
        images[labels == c, :, 2 * c:2 * c + 2, :] = 255
    return from_tensors(images.to(torch.uint8), labels, name="toy")


def _synset(data):
    return SyntheticSet.from_tensors(data.normalized(), data.labels, num_classes=data.num_classes,
                                     classes=list(data.classes), mean=data.mean, std=data.std)


def test_learns_a_separable_set_and_reports_baseline():
    train, test = _separable(4), _separable(30, seed=1)
    report = ce.evaluate(_synset(train), test, model="ConvNetW32", repeats=2, epochs=30, dsa=False,
                         baseline=True, train_set=_separable(20, seed=2))
    assert len(report.accuracies) == 2
    assert report.mean > 0.9, report
    assert report.baseline is not None and report.baseline.mean > 0.9
    assert report.recipe["lr"] == 0.01 and report.recipe["epochs"] == 30
    assert "random real" in str(report)


def test_untrained_network_is_near_chance():
    """Guards the test above: with zero epochs of learning signal accuracy is not high."""
    train, test = _separable(4), _separable(30, seed=1)
    synset = _synset(train)
    synset.labels = torch.zeros_like(synset.labels)  # every image labelled class 0
    report = ce.evaluate(synset, test, model="ConvNetW32", repeats=1, epochs=10, dsa=False)
    assert report.mean < 0.5


def test_uses_learned_lr_and_decays_at_half(monkeypatch):
    seen = []
    original = torch.optim.SGD

    def recording_sgd(params, lr, **kw):
        seen.append((lr, kw["momentum"], kw["weight_decay"]))
        return original(params, lr=lr, **kw)

    monkeypatch.setattr(torch.optim, "SGD", recording_sgd)
    train, test = _separable(2), _separable(3, seed=1)
    synset = _synset(train)
    synset.lr = 0.05
    ce.evaluate(synset, test, model="ConvNetW32", repeats=1, epochs=4, dsa=True)
    assert [s[0] for s in seen] == pytest.approx([0.05, 0.005])
    assert all(s[1:] == (0.9, 5e-4) for s in seen)


def test_idc_recipe_keeps_momentum_and_decays_at_two_thirds_and_five_sixths(monkeypatch):
    steps = []
    original = torch.optim.SGD

    class RecordingSGD(original):
        def step(self, closure=None):
            steps.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    train, test = _separable(2), _separable(3, seed=1)
    report = ce.evaluate(_synset(train), test, model="ConvNetW32", repeats=1, epochs=6, recipe="idc")
    assert steps == pytest.approx([0.01] * 4 + [0.002, 0.0004])  # one optimiser: 6 images, batch 64
    assert report.recipe["batch_size"] == 64 and report.recipe["recipe"] == "idc"
    assert report.recipe["dsa_strategy"] == "color_crop_flip_scale_rotate" and "CutMix" in report.recipe["schedule"]


def test_idc_recipe_learns_with_cutmix_repeats_exactly_and_refuses_batching():
    train, test = _separable(4), _separable(30, seed=1)
    runs = [ce.evaluate(_synset(train), test, model="ConvNetW32", repeats=1, epochs=40, dsa=False, recipe="idc",
                        seed=2) for _ in range(2)]
    assert runs[0].accuracies == runs[1].accuracies and runs[0].mean > 0.9
    assert runs[0].losses != ce.evaluate(_synset(train), test, model="ConvNetW32", repeats=1, epochs=40, dsa=False,
                                         seed=2).losses
    with pytest.raises(ValueError, match="idc recipe"):
        ce.evaluate(_synset(train), test, model="ConvNetW32", repeats=1, epochs=1, recipe="idc", batched=True)
    with pytest.raises(ValueError, match="recipe"):
        ce.evaluate(_synset(train), test, model="ConvNetW32", repeats=1, epochs=1, recipe="kip")


def test_dc_augmentation_replaces_dsa_in_training_and_is_recorded(monkeypatch):
    train, test, pool = _separable(3, size=12), _separable(10, size=12, seed=1), _separable(10, size=12, seed=2)
    options = dict(model="ConvNetW32", repeats=2, epochs=4, batch_size=4, dsa=False, device="cpu",
                   baseline=True, train_set=pool)
    plain = ce.evaluate(_synset(train), test, **options)
    augmented = ce.evaluate(_synset(train), test, dc_augment="crop_scale_rotate", **options)
    assert augmented.recipe["dc_augment"] == "crop_scale_rotate" and augmented.recipe["dsa_strategy"] is None
    assert plain.recipe["dc_augment"] is None
    assert augmented.losses != plain.losses and augmented.baseline.losses != plain.baseline.losses
    again = ce.evaluate(_synset(train), test, dc_augment="crop_scale_rotate", **options)
    assert again.accuracies == augmented.accuracies and again.losses == augmented.losses
    with pytest.raises(ValueError, match="pass dsa=False"):
        ce.evaluate(_synset(train), test, repeats=1, epochs=1, dc_augment="crop")
    with pytest.raises(ValueError, match="DC augmentation strategy"):
        ce.evaluate(_synset(train), test, repeats=1, epochs=1, dsa=False, dc_augment="flip")


def test_seeded_runs_repeat_exactly():
    train, test = _separable(3), _separable(5, seed=1)
    a = ce.evaluate(_synset(train), test, model="ConvNetW32", repeats=1, epochs=3, seed=4, device="cpu")
    b = ce.evaluate(_synset(train), test, model="ConvNetW32", repeats=1, epochs=3, seed=4, device="cpu")
    assert a.accuracies == b.accuracies and a.losses == b.losses


@pytest.mark.parametrize("model", ["MLP", "LeNet"])
def test_cross_architecture_by_name(model):
    train, test = _separable(3, size=28), _separable(3, size=28, seed=1)
    report = ce.evaluate(_synset(train), test, model=model, repeats=1, epochs=2)
    assert 0.0 <= report.mean <= 1.0


def test_bad_input():
    train, test = _separable(2), _separable(2, seed=1)
    synset = _synset(train)
    with pytest.raises(ValueError, match="train_set"):
        ce.evaluate(synset, test, repeats=1, epochs=1, baseline=True)
    with pytest.raises(ValueError, match="test set holds"):
        ce.evaluate(synset, _separable(2, size=10), repeats=1, epochs=1)
    with pytest.raises(ValueError, match="the random-real baseline needs the same classes"):
        ce.evaluate(synset, test, repeats=1, epochs=1, baseline=True, train_set=_separable(2, classes=4))
    with pytest.raises(ValueError, match="labels up to 3 but the synthetic set has 3 classes"):
        ce.evaluate(synset, _separable(2, classes=4, seed=1), repeats=1, epochs=1)
    # a test set holding only some of the set's classes is fine: the models still have one output per set class
    partial = _separable(2, classes=2, seed=1)
    assert 0.0 <= ce.evaluate(synset, partial, repeats=1, epochs=1).mean <= 1.0
    with pytest.raises(ValueError, match="lr must be a positive learning rate, got -0.1"):
        ce.evaluate(synset, test, repeats=1, epochs=1, lr=-0.1)
    synset.lr = torch.tensor(-0.01)
    with pytest.raises(ValueError, match="learned lr is -0.01"):
        ce.evaluate(synset, test, repeats=1, epochs=1)
    synset.lr = None
    synset.images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ce.evaluate(synset, test, repeats=1, epochs=1)


def _test_sets_trained_against(monkeypatch) -> list:
    """A list that collects the test set every evaluation's models are trained against."""
    seen = []
    evaluate_module = importlib.import_module("condense_engine.evaluate")
    train_repeats = evaluate_module._train_repeats
    monkeypatch.setattr(evaluate_module, "_train_repeats",
                        lambda images, labels, test_set, **kw: seen.append(test_set) or train_repeats(
                            images, labels, test_set, **kw))
    return seen


def test_test_images_are_normalised_with_the_sets_statistics(monkeypatch):
    """A test split that carries its own statistics is evaluated normalised with the training
    split's, which the set's pixels are in, and without a warning (the statistics are close)."""
    train, test = _separable(4), _separable(6, seed=1)
    assert test.mean != train.mean  # from_tensors gave each split its own statistics
    seen = _test_sets_trained_against(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ce.evaluate(_synset(train), test, model="ConvNetW32", repeats=1, epochs=1, dsa=False, device="cpu")
    (used,) = seen
    assert (used.mean, used.std) == (train.mean, train.std)
    expected = (test.images.float() / 255 - train.mean[0]) / train.std[0]
    torch.testing.assert_close(used.normalized(), expected)


def test_tensor_pairs_are_evaluated_like_data_sets(monkeypatch):
    """test_set and train_set take an (images, labels) pair as distill does; float pixels are
    normalised with the set's statistics, not the pair's own."""
    train, test = _separable(4), _separable(6, seed=1)
    pixels = test.images.float() / 255
    seen = _test_sets_trained_against(monkeypatch)
    options = dict(model="ConvNetW32", repeats=1, epochs=2, dsa=False, device="cpu", baseline=True)
    from_pairs = ce.evaluate(_synset(train), (pixels, test.labels), train_set=(train.images, train.labels),
                             **options)
    from_sets = ce.evaluate(_synset(train), test, train_set=train, **options)
    assert from_pairs.accuracies == from_sets.accuracies
    assert from_pairs.baseline.accuracies == from_sets.baseline.accuracies
    torch.testing.assert_close(seen[0].normalized(), (pixels - train.mean[0]) / train.std[0])
    with pytest.raises(TypeError, match="test_set must be an ImageDataset, an \\(images, labels\\) tensor pair"):
        ce.evaluate(_synset(train), "data/test", **options)


def test_statistics_of_another_data_set_warn():
    train, test = _separable(4), _separable(6, seed=1)
    synset = _synset(train)
    synset.mean, synset.meta = (0.5,), {"dataset": "fashion-mnist"}
    with pytest.warns(UserWarning, match=r"synthetic set \(fashion-mnist\).*test set \(toy\).*another data set"):
        ce.evaluate(synset, test, model="ConvNetW32", repeats=1, epochs=1, dsa=False, device="cpu")


def _train_both_ways(train, test, *, repeats, epochs, batch_size, strategy, dc_strategy=None, seed=3):
    """Fresh models trained one after another and together, from the same seeds."""
    shape = dict(channel=1, num_classes=train.num_classes, im_size=train.image_size, device="cpu")
    images, labels = train.normalized(), train.labels
    recipe = dict(epochs=epochs, lr=0.01, batch_size=batch_size, strategy=strategy, dc_strategy=dc_strategy)

    def generators():
        return [torch.Generator().manual_seed(seed * 1000 + r) for r in range(repeats)]

    looped = fresh_models("ConvNetW32", repeats, seed, **shape)
    loop_results = [train_and_test(net, images, labels, test, **recipe, generator=g)
                    for net, g in zip(looped, generators())]
    together = fresh_models("ConvNetW32", repeats, seed, **shape)
    accs, losses = train_and_test_batched(together, images.expand(repeats, *images.shape),
                                          labels.expand(repeats, *labels.shape), test, **recipe,
                                          generators=generators())
    return looped, loop_results, together, list(zip(accs, losses))


@pytest.mark.parametrize("strategy, dc_strategy", [(None, None), ("color_crop_cutout_flip_scale_rotate", None),
                                                   (None, "crop_scale_rotate_noise")])
def test_batched_training_gives_the_loops_weights(strategy, dc_strategy):
    """Same init, minibatch order and augmentation draws (DSA's or DC's): the weights agree up
    to float rounding.

    Batches of 4 from 12 images over 4 epochs: several steps per epoch, several op groups
    drawn, and the lr decay with its momentum reset at epoch 2.
    """
    train, test = _separable(4), _separable(10, seed=1)
    looped, loop_results, together, batched_results = _train_both_ways(
        train, test, repeats=2, epochs=4, batch_size=4, strategy=strategy, dc_strategy=dc_strategy)
    assert [acc for acc, _ in batched_results] == [acc for acc, _ in loop_results]
    torch.testing.assert_close([loss for _, loss in batched_results],
                               [loss for _, loss in loop_results], rtol=1e-4, atol=1e-6)
    for loop_net, batched_net in zip(looped, together):
        torch.testing.assert_close(dict(batched_net.named_parameters()),
                                   dict(loop_net.named_parameters()), rtol=1e-4, atol=1e-6)
    # The two repeats really differ, so matching them pairwise means something.
    first, second = (dict(net.named_parameters())["classifier.weight"] for net in together)
    assert not torch.allclose(first, second, atol=1e-3)


def test_evaluate_batched_matches_loop_with_baseline():
    train, test = _separable(3), _separable(6, seed=1)
    kwargs = dict(model="ConvNetW32", repeats=2, epochs=3, batch_size=4, seed=1, baseline=True,
                  train_set=_separable(10, seed=2))
    looped = ce.evaluate(_synset(train), test, batched=False, **kwargs)
    together = ce.evaluate(_synset(train), test, batched=True, **kwargs)
    assert looped.recipe["path"] == "loop" and looped.recipe["loop_reason"] == "batched=False"
    assert together.recipe["path"] == "batched" and together.baseline.recipe["path"] == "batched"
    assert together.accuracies == looped.accuracies
    assert together.baseline.accuracies == looped.baseline.accuracies
    torch.testing.assert_close(together.losses, looped.losses, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(together.baseline.losses, looped.baseline.losses, rtol=1e-4, atol=1e-6)


def test_default_loops_on_cpu_and_batches_on_an_accelerator():
    train, test = _separable(2), _separable(3, seed=1)
    on_cpu = ce.evaluate(_synset(train), test, model="ConvNetW32", repeats=2, epochs=1, device="cpu")
    assert on_cpu.recipe["path"] == "loop" and on_cpu.recipe["loop_reason"] == CPU_LOOP_REASON
    if torch.cuda.is_available():
        on_gpu = ce.evaluate(_synset(train), test, model="ConvNetW32", repeats=2, epochs=1, device="cuda")
        assert on_gpu.recipe["path"] == "batched"


def test_batchnorm_model_falls_back_to_the_loop():
    train, test = _separable(4), _separable(10, seed=1)
    report = ce.evaluate(_synset(train), test, model="ConvNetBN", repeats=2, epochs=2, batch_size=6)
    assert report.recipe["path"] == "loop" and "BatchNorm" in report.recipe["loop_reason"]
    assert len(report.accuracies) == 2 and all(0.0 <= acc <= 1.0 for acc in report.accuracies)
    with pytest.raises(ValueError, match="cannot be batched"):
        ce.evaluate(_synset(train), test, model="ConvNetBN", repeats=1, epochs=1, batched=True)


class _DataDependentNet(torch.nn.Module):
    """A linear classifier with Python control flow on a tensor value, which vmap cannot trace."""

    def __init__(self, channel, num_classes, im_size):
        super().__init__()
        self.linear = torch.nn.Linear(channel * im_size[0] * im_size[1], num_classes)

    def forward(self, x):
        logits = self.linear(x.flatten(1))
        return logits if logits.sum() > -1e9 else -logits


def test_model_torch_func_cannot_run_falls_back_and_is_remembered(monkeypatch):
    monkeypatch.setattr(evaluate_batched, "_VMAP_PROBED", {})
    original = ce.models.get_model
    monkeypatch.setattr(ce.models, "get_model", lambda name, *args: (
        _DataDependentNet(*args) if name == "DataDependent" else original(name, *args)))
    train, test = _separable(4), _separable(10, seed=1)
    report = ce.evaluate(_synset(train), test, model="DataDependent", repeats=2, epochs=2, dsa=False)
    assert report.recipe["path"] == "loop" and "torch.func" in report.recipe["loop_reason"]
    assert len(report.accuracies) == 2
    # The verdict is remembered: a second evaluation reuses it instead of probing again.
    evaluate_batched._VMAP_PROBED[("DataDependent", "cpu")] = "remembered"
    again = ce.evaluate(_synset(train), test, model="DataDependent", repeats=2, epochs=1, dsa=False)
    assert again.recipe["loop_reason"] == "remembered"


def test_cpu_test_batches_do_not_change_the_accuracy(monkeypatch):
    test = _separable(30, seed=1)
    net = fresh_models("ConvNet", 1, seed=0, channel=1, num_classes=3, im_size=(8, 8), device="cpu")[0]
    whole = accuracy(net, test, batch_size=len(test))
    batches = []
    forward = net.forward
    monkeypatch.setattr(net, "forward", lambda x: batches.append(len(x)) or forward(x))
    monkeypatch.setattr(layers, "CPU_ACTIVATION_BYTES", 40 * 128 * 8 * 8 * 4)
    assert accuracy(net, test) == whole
    assert batches == [40, 40, 10]


def test_a_stopped_evaluation_resumes_from_its_finished_runs(tmp_path, monkeypatch):
    """Killed during its second run, an evaluation with checkpoint= keeps the first; started
    again it trains only the runs it had not finished (set and baseline) and reports exactly
    the uninterrupted numbers. Another recipe is a different evaluation and trains afresh."""
    train, test, pool = _separable(3), _separable(10, seed=1), _separable(10, seed=2)
    options = dict(model="ConvNetW32", repeats=3, epochs=3, baseline=True, train_set=pool, device="cpu")
    straight = ce.evaluate(_synset(train), test, **options)
    trained = []

    def counted(*args, **kwargs):
        if len(trained) == stop_after[0]:
            raise KeyboardInterrupt("killed")
        trained.append(1)
        return train_and_test(*args, **kwargs)
    monkeypatch.setattr(importlib.import_module("condense_engine.evaluate"), "train_and_test", counted)
    checkpoint = tmp_path / "runs.pt"
    stop_after = [1]
    with pytest.raises(KeyboardInterrupt):
        ce.evaluate(_synset(train), test, checkpoint=checkpoint, **options)
    stop_after, trained[:] = [None], []
    resumed = ce.evaluate(_synset(train), test, checkpoint=checkpoint, **options)
    assert len(trained) == 2 + 3  # the two set runs left, then the whole baseline
    assert resumed.accuracies == straight.accuracies and resumed.baseline.accuracies == straight.baseline.accuracies
    trained[:] = []
    assert ce.evaluate(_synset(train), test, checkpoint=checkpoint, **options).accuracies == straight.accuracies
    assert trained == []  # everything was finished
    more = ce.evaluate(_synset(train), test, checkpoint=checkpoint, **dict(options, repeats=4, baseline=False))
    assert len(trained) == 1 and more.accuracies[:3] == straight.accuracies  # only the new fourth run
    trained[:] = []
    ce.evaluate(_synset(train), test, checkpoint=checkpoint, **dict(options, epochs=2, baseline=False))
    assert len(trained) == 3
    trained[:] = []
    ce.evaluate(_synset(train), test, checkpoint=checkpoint, **dict(options, dsa=False))
    assert len(trained) == 3 + 3
    trained[:] = []
    ce.evaluate(_synset(train), test, checkpoint=checkpoint, **dict(options, dsa=False, dc_augment="crop"))
    assert len(trained) == 3 + 3  # DC's augmentation is another evaluation: set and baseline afresh
    trained[:] = []
    monkeypatch.setattr(importlib.import_module("condense_engine.evaluate"), "EVALUATION_REVISION", 2)
    ce.evaluate(_synset(train), test, checkpoint=checkpoint, **options)
    assert len(trained) == 3 + 3  # runs of an earlier revision of the evaluation code are not reused


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("killed_at", [2, 4])  # before the lr decay at epoch 3, and after it
def test_runs_killed_part_way_continue_from_their_last_saved_state(tmp_path, monkeypatch, killed_at, batched):
    """With a save after every epoch, an evaluation killed right after saving epoch `killed_at`
    continues from there and ends exactly as the uninterrupted one (weights, momentum, decayed lr
    and DSA draws restored), on the loop path (run 0 was killed) and the batched one (both runs
    were); the finished runs' saved state is then dropped from the file."""
    evaluate_module = importlib.import_module("condense_engine.evaluate")
    train, test = _separable(3), _separable(10, seed=1)
    options = dict(model="ConvNetW32", repeats=2, epochs=6, device="cpu", batched=batched)
    straight = ce.evaluate(_synset(train), test, **options)
    monkeypatch.setattr(evaluate_module, "PROGRESS_MINUTES", 0.0)
    saves, shuffles = [], []
    save = evaluate_module.ProgressSaver.__call__

    def killed_after_saving(self, state):
        save(self, state)
        saves.append((self.slot, state["epoch"]))
        if len(saves) == killed_at:
            raise KeyboardInterrupt("killed")
    monkeypatch.setattr(evaluate_module.ProgressSaver, "__call__", killed_after_saving)
    randperm = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: shuffles.append(1) or randperm(*a, **k))
    checkpoint = tmp_path / "runs.pt"
    with pytest.raises(KeyboardInterrupt):
        ce.evaluate(_synset(train), test, checkpoint=checkpoint, **options)
    slot = "2 together" if batched else 0
    assert saves == [(slot, epoch) for epoch in range(1, killed_at + 1)]
    shuffles[:] = []
    resumed = ce.evaluate(_synset(train), test, checkpoint=checkpoint, **options)
    # One shuffle per run and epoch: the epochs left of the killed runs (and all of run 1 on the loop).
    assert len(shuffles) == (2 * (6 - killed_at) if batched else 6 - killed_at + 6)
    assert resumed.accuracies == straight.accuracies and resumed.losses == straight.losses
    assert not any(evaluate_module.FinishedRuns(checkpoint).unfinished.values())


def test_a_saved_state_is_a_snapshot_taken_when_due(tmp_path, monkeypatch):
    """A run's state is saved PROGRESS_MINUTES after it started or was last saved, as a copy: the
    live tensors it was taken from go on changing."""
    evaluate_module = importlib.import_module("condense_engine.evaluate")
    clock = [0.0]
    monkeypatch.setattr(evaluate_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    runs = evaluate_module.FinishedRuns(tmp_path / "runs.pt")
    saver, live = runs.saver("key", 0), torch.zeros(3)
    clock[0] = 60 * evaluate_module.PROGRESS_MINUTES - 1
    assert not saver.due()
    clock[0] += 1
    assert saver.due()
    saver({"weights": live})
    assert not saver.due()
    live += 1
    assert torch.equal(runs.state("key", 0)["weights"], torch.zeros(3))
    assert torch.equal(evaluate_module.FinishedRuns(tmp_path / "runs.pt").state("key", 0)["weights"], torch.zeros(3))


# The last training loss of each run of this revision of the evaluation code (see the test below).
PINNED_LOSSES = {1: {"dsa": [0.6505854725837708, 0.8134459257125854],
                     "dc_augment": [1.0979833602905273, 0.9179407954216003],
                     "idc": [0.6060670018196106, 0.7630459666252136]}}


def test_a_change_of_what_a_run_computes_needs_a_new_evaluation_revision():
    """Checkpoints reuse finished runs of the same EVALUATION_REVISION, so a change to the training
    loop, DSA, DC's augmentation or CutMix that changes a run's result must bump it; this pins the
    revision's results on all three augmentation paths (CPU, 2 runs of 10 epochs each)."""
    from condense_engine.evaluate import EVALUATION_REVISION
    train, test = _separable(3), _separable(10, seed=1)
    paths = {"dsa": {}, "dc_augment": dict(dsa=False, dc_augment="crop_scale_rotate"), "idc": dict(recipe="idc")}
    for name, options in paths.items():
        report = ce.evaluate(_synset(train), test, model="ConvNetW32", repeats=2, epochs=10, device="cpu", **options)
        assert report.losses == pytest.approx(PINNED_LOSSES[EVALUATION_REVISION][name], rel=1e-4), (
            f"the {name} evaluation now computes other results: bump EVALUATION_REVISION and pin its losses here")


def test_an_unwritable_evaluation_checkpoint_is_refused_before_training(tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setattr(importlib.import_module("condense_engine.evaluate"), "train_and_test",
                        lambda *a, **k: pytest.fail("trained before checking the checkpoint's folder"))
    with pytest.raises(ValueError, match="cannot write evaluation runs to .*a-file"):
        ce.evaluate(_synset(_separable(2)), _separable(2, seed=1), repeats=1, epochs=1, device="cpu",
                    checkpoint=blocked / "runs.pt")


def test_a_damaged_evaluation_checkpoint_is_reported(tmp_path):
    damaged = tmp_path / "runs.pt"
    damaged.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="runs.pt"):
        ce.evaluate(_synset(_separable(2)), _separable(2, seed=1), repeats=1, epochs=1, checkpoint=damaged)
