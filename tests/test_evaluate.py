"""The evaluation protocol on tiny sets: it learns, it follows the recipe, it reports a baseline."""
import pytest
import torch

import condense_engine as ce
from condense_engine.datasets import from_tensors
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


def test_seeded_runs_repeat_exactly():
    train, test = _separable(3), _separable(5, seed=1)
    a = ce.evaluate(_synset(train), test, model="ConvNetW32", repeats=1, epochs=3, seed=4)
    b = ce.evaluate(_synset(train), test, model="ConvNetW32", repeats=1, epochs=3, seed=4)
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
    synset.images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ce.evaluate(synset, test, repeats=1, epochs=1)
