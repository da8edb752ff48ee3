"""condense-engine: dataset condensation (distillation) for PyTorch.

    import condense_engine as ce
    train = ce.datasets.load("mnist", root="data/mnist", split="train")
    syn = ce.distill(train, method="dm", ipc=10)
    report = ce.evaluate(syn, ce.datasets.load("mnist", root="data/mnist", split="test"))

Submodules load on first use, so importing the package is cheap and never pulls in triton or
torchvision.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "datasets": ("condense_engine.datasets", None),
    "models": ("condense_engine.models", None),
    "ops": ("condense_engine.ops", None),
    "methods": ("condense_engine.methods", None),
    "SyntheticSet": ("condense_engine.synset", "SyntheticSet"),
    "evaluate": ("condense_engine.evaluate", "evaluate"),
    "distill": ("condense_engine.distill", "distill"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'condense_engine' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__():
    return __all__
