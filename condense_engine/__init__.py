"""condense-engine: dataset condensation (distillation) for PyTorch.

    import condense_engine as ce
    train = ce.datasets.load("mnist", root="data/mnist", split="train")
    syn = ce.distill(train, method="dm", ipc=10)
    report = ce.evaluate(syn, ce.datasets.load("mnist", root="data/mnist", split="test"))

Importing the package never imports triton or torchvision: Triton kernels load when an op first
dispatches to them.
"""
__version__ = "0.1.0"

from condense_engine import datasets, methods, models, ops  # noqa: E402
from condense_engine.driver import distill  # noqa: E402
from condense_engine.evaluate import evaluate  # noqa: E402
from condense_engine.fair import fair_scores  # noqa: E402
from condense_engine.synset import SyntheticSet  # noqa: E402

__all__ = ["SyntheticSet", "datasets", "distill", "evaluate", "fair_scores", "methods", "models", "ops", "__version__"]
