"""Exceptions shared across the package."""


class NonFiniteError(FloatingPointError, ValueError):
    """NaN or infinite values where finite ones are required (an input, a loss, the pixels)."""


class NonFiniteLossError(NonFiniteError):
    """A distillation produced a non-finite loss or non-finite synthetic pixels and was stopped."""


class MissingPackageError(ImportError):
    """An optional package that the requested feature needs is not installed."""
