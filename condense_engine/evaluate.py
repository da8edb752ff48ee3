"""The standard evaluation protocol (SPEC §6, methods.md §1.6).

Train fresh networks on a synthetic set and report their test accuracy: SGD with momentum 0.9
and weight decay 5e-4, lr 0.01 (or the set's learned lr), lr ×0.1 at half the epochs (the
optimiser is re-created, which resets momentum, as published), per-sample DSA on every training
batch, accuracy after the last epoch; mean ± std over `repeats`. `baseline=True` also trains on
random real subsets of the same size under the same recipe, the number a synthetic set must beat.
"""
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from condense_engine import models
from condense_engine.datasets import ClassSampler, ImageDataset
from condense_engine.ops.dsa import DSAParams, default_strategy, dsa


@dataclass
class EvalReport:
    """Accuracies of `repeats` fresh models; `baseline` holds the random-real report if asked."""

    model: str
    accuracies: list
    recipe: dict
    baseline: "EvalReport | None" = None
    losses: list = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(torch.tensor(self.accuracies).mean())

    @property
    def std(self) -> float:
        accs = torch.tensor(self.accuracies, dtype=torch.float64)
        return float(accs.std(unbiased=False)) if len(accs) > 1 else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(mean=self.mean, std=self.std)
        if self.baseline is not None:
            out["baseline"] = self.baseline.to_dict()
        return out

    def __str__(self) -> str:
        text = f"{self.model}: {100 * self.mean:.2f} ± {100 * self.std:.2f} % over {len(self.accuracies)} runs"
        if self.baseline is not None:
            text += f" (random real: {100 * self.baseline.mean:.2f} ± {100 * self.baseline.std:.2f} %)"
        return text


def train_and_test(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   test_set: ImageDataset, *, epochs: int, lr: float, batch_size: int,
                   strategy: str | None, generator: torch.Generator) -> tuple[float, float]:
    """Train `model` on (images, labels) with the published recipe; return (test acc, last loss)."""
    device = images.device
    lr_now = float(lr)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr_now, momentum=0.9, weight_decay=5e-4)
    decay_at = epochs // 2
    loss = torch.tensor(float("nan"))
    model.train()
    for epoch in range(epochs):
        if epoch == decay_at and epoch > 0:
            lr_now *= 0.1
            optimizer = torch.optim.SGD(model.parameters(), lr=lr_now, momentum=0.9, weight_decay=5e-4)
        order = torch.randperm(len(images), generator=generator).to(device)
        for start in range(0, len(images), batch_size):
            index = order[start:start + batch_size]
            batch = images[index]
            if strategy:
                params = DSAParams.sample(len(batch), strategy, size=tuple(batch.shape[2:]), siamese=False,
                                          generator=generator, device=device)
                batch = dsa(batch, params)
            loss = F.cross_entropy(model(batch), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return accuracy(model, test_set, batch_size=1024), float(loss.detach())


@torch.no_grad()
def accuracy(model: torch.nn.Module, test_set: ImageDataset, batch_size: int = 1024) -> float:
    """Top-1 accuracy of `model` (in eval mode) on the whole `test_set`."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(test_set), batch_size):
        index = torch.arange(start, min(start + batch_size, len(test_set)))
        images = test_set.normalized(index).to(device)
        correct += int((model(images).argmax(1) == test_set.labels[index].to(device)).sum())
    model.train()
    return correct / len(test_set)


def _train_repeats(images, labels, test_set, *, model, repeats, epochs, lr, batch_size, strategy,
                   seed, channel, num_classes, im_size, draw=None) -> tuple[list, list]:
    accs, losses = [], []
    for repeat in range(repeats):
        generator = torch.Generator().manual_seed(seed * 1000 + repeat)
        if draw is not None:
            images, labels = draw(generator)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + repeat)
            net = models.get_model(model, channel, num_classes, im_size).to(images.device)
        acc, loss = train_and_test(net, images, labels, test_set, epochs=epochs, lr=lr,
                                   batch_size=batch_size, strategy=strategy, generator=generator)
        accs.append(acc)
        losses.append(loss)
    return accs, losses


def evaluate(synset, test_set: ImageDataset, model: str = "ConvNet", repeats: int = 5,
             epochs: int = 1000, lr: float | None = None, batch_size: int = 256, dsa: bool = True,
             seed: int = 0, *, baseline: bool = False, train_set: ImageDataset | None = None,
             dsa_strategy: str | None = None, device=None) -> EvalReport:
    """Train `repeats` fresh `model`s on `synset` and report their test accuracy (SPEC §6).

    `lr=None` takes the set's learned lr when it has one, else 0.01. `baseline=True` needs
    `train_set` and adds the random-real baseline of the same images per class.
    """
    if repeats < 1 or epochs < 1 or batch_size < 1:
        raise ValueError(f"repeats, epochs and batch_size must be ≥ 1, got {repeats}, {epochs}, {batch_size}")
    if baseline and train_set is None:
        raise ValueError("baseline=True needs train_set (the real data to draw random subsets from)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    images, labels = synset.materialize()
    images, labels = images.detach().to(device), labels.detach().to(device)
    if tuple(images.shape[1:]) != (test_set.channels, *test_set.image_size):
        raise ValueError(f"synthetic images are {tuple(images.shape[1:])} but the test set holds "
                         f"{(test_set.channels, *test_set.image_size)}")
    if not torch.isfinite(images).all():
        raise ValueError("the synthetic set holds non-finite pixels")
    if lr is None:
        lr = float(synset.lr) if synset.lr is not None else 0.01
    strategy = (dsa_strategy or default_strategy(test_set.name)) if dsa else None
    recipe = dict(model=model, repeats=repeats, epochs=epochs, lr=lr, batch_size=batch_size,
                  dsa_strategy=strategy, optimizer="SGD(momentum=0.9, weight_decay=5e-4)",
                  schedule="lr x0.1 at epochs//2", seed=seed)
    shape = dict(channel=test_set.channels, num_classes=test_set.num_classes, im_size=test_set.image_size)
    run = dict(model=model, repeats=repeats, epochs=epochs, lr=lr, batch_size=batch_size,
               strategy=strategy, seed=seed, **shape)
    accs, losses = _train_repeats(images, labels, test_set, **run)
    report = EvalReport(model, accs, recipe, losses=losses)
    if baseline:
        ipc = int(synset.ipc)
        sampler = ClassSampler(train_set, device=device)
        base_recipe = dict(recipe, lr=0.01, images_per_class=ipc)
        accs, losses = _train_repeats(images, labels, test_set, **dict(run, lr=0.01),
                                      draw=lambda g: sampler.random_real(ipc, g))
        report.baseline = EvalReport(model, accs, base_recipe, losses=losses)
    return report
