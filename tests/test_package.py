"""Package-level contracts: cheap import without optional dependencies, fallback without _C,
backend selection rules (SPEC §1)."""
import subprocess
import sys
import textwrap

import pytest
import torch

from condense_engine import ops
from condense_engine.ops import _backend


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)


def test_import_pulls_in_neither_triton_nor_torchvision():
    result = _python("""
        import sys
        import condense_engine as ce
        ce.datasets, ce.models, ce.ops, ce.distill, ce.evaluate, ce.SyntheticSet
        print(sorted(m for m in ("triton", "torchvision") if m in sys.modules))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_works_without_the_compiled_extension():
    """With condense_engine._C unimportable every op falls back to its reference."""
    result = _python("""
        import sys, torch
        sys.modules["condense_engine._C"] = None  # makes `from condense_engine import _C` fail
        from condense_engine import ops
        from condense_engine.ops._backend import choose
        images = torch.randint(0, 256, (4, 1, 3, 3), dtype=torch.uint8)
        out = ops.gather_normalize(images, torch.tensor([1, 2]), [0.5], [0.5])
        print(choose("gather_normalize", None, torch.device("cpu"), ("torch", "native")), tuple(out.shape))
        try:
            ops.gather_normalize(images, torch.tensor([1]), [0.5], [0.5], backend="native")
        except RuntimeError as err:
            print("refused:", "not available" in str(err))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["torch (2, 1, 3, 3)", "refused: True"]


def test_precedence_call_then_set_backend_then_environment(monkeypatch):
    cpu = torch.device("cpu")
    supported = ("torch", "native")
    monkeypatch.setenv("CONDENSE_BACKEND", "torch")
    assert _backend.choose("gather_normalize", None, cpu, supported) == "torch"
    ops.set_backend("native")
    try:
        assert _backend.choose("gather_normalize", None, cpu, supported) == "native"
        assert _backend.choose("gather_normalize", "torch", cpu, supported) == "torch"
    finally:
        ops.set_backend(None)
    monkeypatch.setenv("CONDENSE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.choose("gather_normalize", None, cpu, supported)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_backend("gpu")


def test_automatic_choice_on_cpu_never_picks_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("CONDENSE_BACKEND", raising=False)
    assert _backend.choose("mmd", None, torch.device("cpu"), ("torch", "triton")) == "torch"
