"""Loads the compiled extension condense_engine._C, if it was built.

Importing _C registers the native ops under torch.ops.condense. The package works without it:
every op then falls back to its pure-PyTorch reference.
"""
import functools

import torch


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None when the extension is loaded, else why it is not."""
    try:
        from condense_engine import _C  # noqa: F401
    except ImportError as err:
        return f"the compiled extension condense_engine._C is not available ({err})"
    return None


def has_native(op: str, device_type: str) -> str | None:
    """None when torch.ops.condense.<op> has a kernel for `device_type`, else the reason."""
    reason = load_error()
    if reason:
        return reason
    name = f"condense::{op}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(name, device_type.upper()):
        return f"{name} has no {device_type.upper()} kernel in this build"
    return None
