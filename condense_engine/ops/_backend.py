"""Backend selection shared by every op (SPEC §1).

An op calls `choose(op, backend, device, supported)` and gets one of "torch", "triton" or
"native". Precedence: the call's `backend`, then `set_backend()`, then the CONDENSE_BACKEND
environment variable, then the fastest one available. A named backend that cannot run raises
RuntimeError with the reason; automatic choice never raises.
"""
import importlib.util
import os

import torch

from condense_engine._extension import has_native

BACKENDS = ("torch", "triton", "native")
_forced: str | None = None


def set_backend(backend: str | None) -> None:
    """Force one backend for every op (None restores automatic choice)."""
    global _forced
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    _forced = backend


def triton_unavailable(device: torch.device) -> str | None:
    """None when Triton kernels can run on `device`, else the reason."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'condense-engine[triton]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on CPU), got device {device}"


def unavailable(op: str, backend: str, device: torch.device, supported: tuple) -> str | None:
    """None when `backend` can run `op` on `device`, else the reason."""
    if backend not in supported:
        return f"ops.{op} has no {backend!r} backend (it has {', '.join(supported)})"
    if backend == "torch":
        return None
    if backend == "triton":
        return triton_unavailable(device)
    return has_native(op, device.type)


def choose(op: str, backend: str | None, device: torch.device, supported: tuple) -> str:
    """The backend that runs `op` on `device`; see the module docstring for precedence."""
    requested = backend or _forced or os.environ.get("CONDENSE_BACKEND") or None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
        reason = unavailable(op, requested, device, supported)
        if reason:
            raise RuntimeError(f"ops.{op}: backend {requested!r} is not available: {reason}")
        return requested
    preference = ("triton", "native", "torch") if device.type == "cuda" else ("native", "torch")
    for candidate in preference:
        if unavailable(op, candidate, device, supported) is None:
            return candidate
    return "torch"
