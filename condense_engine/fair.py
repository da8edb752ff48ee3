"""Fair scores for a condensed set: DD-Ranking's label-robust (LRS) and augmentation-robust (ARS)
scores (ecosystem.md, DD-Ranking arXiv 2505.13300), measured with the engine's evaluation protocol.

Plain test accuracy rewards what the evaluation adds (soft labels from a teacher, heavy
augmentation) as much as what the images hold, and a random real subset evaluated the same way
often scores close. Both scores compare the set with a random real subset of the same IPC under the
same evaluation, accuracies as fractions:

- LRS: HLR = Acc(full real data) − Acc(set, hard labels: each image's class, `image_classes`);
  IOR = Acc(set, its own labels) − Acc(random subset); α = w·IOR − (1 − w)·HLR (w = `label_weight`, 0.5).
- ARS: β = γ·(Acc(set) − Acc(random)) with augmentation + (1 − γ)·(the same gap without it)
  (γ = `aug_weight`, 0.5: DD-Ranking's `ars_lambda`, formula checked against its
  AugmentationRobustScore).

Each is mapped to [0, 1] by (e^x − e^−1)/(e − e^−1). Two differences from DD-Ranking's own runs:
it maps each evaluation run's gaps and averages the scores, where we map the gaps of the mean
accuracies (equal to first order, the gaps being small), and it takes each model's best test
accuracy during training and grid-searches the random subsets' lr, where we use the engine's
fixed protocol for both. The random subsets carry hard labels (DD-Ranking
gives them the set's label treatment; the engine's soft labels come from distillation, not a
teacher that could relabel them). Acc(full real data) is `full_accuracy` when given (e.g. the
published full-data row), otherwise measured by training the same model on the whole train set for
`full_epochs` epochs.
"""
import dataclasses
import math
from dataclasses import dataclass

from condense_engine.datasets import as_dataset
from condense_engine.evaluate import EvalReport, evaluate
from condense_engine.synset import SyntheticSet


def robust_score(x: float) -> float:
    """DD-Ranking's map of a gap in [−1, 1] to a score in [0, 1]: (e^x − e^−1)/(e − e^−1)."""
    return (math.exp(x) - math.exp(-1)) / (math.e - math.exp(-1))


@dataclass
class FairReport:
    """The scores and every accuracy (fractions) they come from; `recipe` is the evaluation's."""

    lrs: float
    ars: float
    hlr: float
    ior: float
    accuracies: dict
    label_weight: float
    aug_weight: float
    recipe: dict

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        acc = self.accuracies
        return (f"LRS {100 * self.lrs:.2f}  ARS {100 * self.ars:.2f}  (HLR {100 * self.hlr:.2f}, IOR "
                f"{100 * self.ior:.2f}; set {100 * acc['set']:.2f}, random {100 * acc['random']:.2f}, "
                f"full data {100 * acc['full_data']:.2f} %)")


def _check_fraction(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def fair_scores(synset: SyntheticSet, test_set, train_set, *, full_accuracy: float | None = None,
                full_epochs: int = 30, label_weight: float = 0.5, aug_weight: float = 0.5,
                report: EvalReport | None = None, **evaluate_options) -> FairReport:
    """LRS and ARS of `synset` (see the module docstring). `evaluate_options` (model, repeats,
    epochs, lr, seed, device, ...) go to every `ce.evaluate` call; `dsa` is set by the scores.
    `report`: the `evaluate(synset, dsa=True, baseline=True, **evaluate_options)` report when it
    has been run already (it is then not run again)."""
    _check_fraction("label_weight", label_weight)
    _check_fraction("aug_weight", aug_weight)
    if full_accuracy is not None:
        _check_fraction("full_accuracy", full_accuracy)
    if {"dsa", "dc_augment", "baseline"} & evaluate_options.keys():
        raise ValueError("fair_scores sets the augmentation (DSA or none) and baseline itself; leave dsa, "
                         "dc_augment and baseline out")
    if evaluate_options.get("recipe") == "dd":
        raise ValueError("fair scores compare training with DSA and without, which the dd recipe (the set's "
                         "learned schedule, never augmented) does not do: use recipe 'dc'")
    if train_set is None:
        raise ValueError("fair_scores needs train_set: the random subsets (and the full-data run) come from it")
    test_set = as_dataset(test_set, "test_set", mean=synset.mean, std=synset.std)
    train_set = as_dataset(train_set, "train_set", mean=synset.mean, std=synset.std)
    if report is not None and (report.baseline is None or not report.recipe.get("dsa_strategy")):
        raise ValueError("report must come from evaluate(..., dsa=True, baseline=True): it needs the DSA "
                         "accuracies of the set and of its random-real baseline")
    augmented = report or evaluate(synset, test_set, dsa=True, baseline=True, train_set=train_set,
                                   **evaluate_options)
    plain = evaluate(synset, test_set, dsa=False, baseline=True, train_set=train_set, **evaluate_options)
    hard = augmented
    if synset.is_soft:
        hard = evaluate(dataclasses.replace(synset, labels=synset.hard_labels), test_set, dsa=True,
                        **evaluate_options)
    if full_accuracy is None:
        whole = SyntheticSet.from_tensors(train_set.normalized(), train_set.labels, mean=train_set.mean,
                                          std=train_set.std, num_classes=train_set.num_classes,
                                          classes=list(train_set.classes), zca=train_set.zca)
        options = dict(evaluate_options, epochs=full_epochs, lr=0.01)
        full_accuracy = evaluate(whole, test_set, dsa=True, **options).mean
    accuracies = dict(set=augmented.mean, random=augmented.baseline.mean, set_hard_labels=hard.mean,
                      set_no_aug=plain.mean, random_no_aug=plain.baseline.mean, full_data=full_accuracy)
    hlr = full_accuracy - hard.mean
    ior = augmented.mean - augmented.baseline.mean
    alpha = label_weight * ior - (1 - label_weight) * hlr
    beta = aug_weight * ior + (1 - aug_weight) * (plain.mean - plain.baseline.mean)
    return FairReport(lrs=robust_score(alpha), ars=robust_score(beta), hlr=hlr, ior=ior, accuracies=accuracies,
                      label_weight=label_weight, aug_weight=aug_weight, recipe=augmented.recipe)
