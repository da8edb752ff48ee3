"""DD-Ranking's LRS and ARS: the score map, the formulas on the accuracies they report, which
evaluations run (soft labels judged by their argmax, full data measured only when not given),
and bad arguments."""
import math

import pytest
import torch

import condense_engine as ce
from condense_engine import fair
from tests.toy_data import toy_dataset

EVAL = dict(model="ConvNetW32", repeats=2, epochs=3, device="cpu")


def test_the_score_map_sends_minus_one_zero_and_one_to_zero_its_midpoint_and_one():
    assert fair.robust_score(-1.0) == pytest.approx(0.0, abs=1e-12)
    assert fair.robust_score(1.0) == pytest.approx(1.0)
    assert fair.robust_score(0.0) == pytest.approx((1 - math.exp(-1)) / (math.e - math.exp(-1)))


def _synset(train, soft=False):
    synset = ce.distill(train, method="dm", ipc=3, iterations=2, seed=0, progress=False, device="cpu",
                        batch_real=8, model="ConvNetW32")
    if soft:
        synset.labels = torch.nn.functional.one_hot(synset.labels, train.num_classes).float() * 0.8 + 0.2 / 3
    return synset


def _counted_evaluate(monkeypatch) -> list:
    calls, real = [], fair.evaluate

    def counted(synset, test_set, **options):
        calls.append(dict(options, images=len(synset.images), soft=synset.is_soft))
        return real(synset, test_set, **options)
    monkeypatch.setattr(fair, "evaluate", counted)
    return calls


def test_scores_follow_the_formulas_on_the_reported_accuracies(monkeypatch):
    train, test = toy_dataset(per_class=24), toy_dataset(per_class=10)
    calls = _counted_evaluate(monkeypatch)
    report = fair.fair_scores(_synset(train), test, train, full_accuracy=0.9, label_weight=0.3, aug_weight=0.6,
                              **EVAL)
    acc = report.accuracies
    assert report.hlr == pytest.approx(0.9 - acc["set_hard_labels"]) and acc["set_hard_labels"] == acc["set"]
    assert report.ior == pytest.approx(acc["set"] - acc["random"])
    assert report.lrs == pytest.approx(fair.robust_score(0.3 * report.ior - 0.7 * report.hlr))
    beta = 0.6 * (acc["set"] - acc["random"]) + 0.4 * (acc["set_no_aug"] - acc["random_no_aug"])
    assert report.ars == pytest.approx(fair.robust_score(beta))
    assert 0 <= report.lrs <= 1 and 0 <= report.ars <= 1
    assert [(c["dsa"], c["baseline"]) for c in calls] == [(True, True), (False, True)]
    assert report.to_dict()["accuracies"]["full_data"] == 0.9


def test_soft_labels_are_judged_by_their_argmax_and_full_data_is_measured_when_not_given(monkeypatch):
    train, test = toy_dataset(per_class=24), toy_dataset(per_class=10)
    calls = _counted_evaluate(monkeypatch)
    report = fair.fair_scores(_synset(train, soft=True), test, train, full_epochs=2, **EVAL)
    assert [c["soft"] for c in calls] == [True, True, False, False]
    assert calls[2]["images"] == 9 and calls[3]["images"] == len(train) and calls[3]["epochs"] == 2
    assert report.hlr == pytest.approx(report.accuracies["full_data"] - report.accuracies["set_hard_labels"])


def test_a_given_augmented_report_is_reused_and_must_carry_its_baseline(monkeypatch):
    train, test = toy_dataset(per_class=24), toy_dataset(per_class=10)
    synset = _synset(train)
    given = ce.evaluate(synset, test, baseline=True, train_set=train, **EVAL)
    calls = _counted_evaluate(monkeypatch)
    report = fair.fair_scores(synset, test, train, full_accuracy=0.9, report=given, **EVAL)
    assert [c["dsa"] for c in calls] == [False]
    assert report.accuracies["set"] == given.mean and report.accuracies["random"] == given.baseline.mean
    with pytest.raises(ValueError, match="report must come from"):
        fair.fair_scores(synset, test, train, full_accuracy=0.9, report=ce.evaluate(synset, test, **EVAL), **EVAL)


@pytest.mark.parametrize("options, message", [
    (dict(label_weight=1.5), "label_weight"), (dict(aug_weight=-0.1), "aug_weight"),
    (dict(full_accuracy=90.0), "full_accuracy"), (dict(dsa=False), "leave dsa"),
    (dict(dc_augment="crop"), "dc_augment")])
def test_bad_arguments_are_refused(options, message):
    train = toy_dataset()
    with pytest.raises(ValueError, match=message):
        fair.fair_scores(_synset(train), train, train, **dict(EVAL, **options))


def test_a_train_set_is_required():
    train = toy_dataset()
    with pytest.raises(ValueError, match="needs train_set"):
        fair.fair_scores(_synset(train), train, None, full_accuracy=0.5, **EVAL)
