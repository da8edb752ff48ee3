"""Test-wide setup: Triton kernels run in the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton decorates any kernel, so it is set here, before any
test module imports condense_engine.kernels.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test shapes are tiny and pytest-xdist already runs one worker per core: more threads per
# worker only oversubscribe the cores (measured: up to 100× slower steps on a busy 2-core box).
torch.set_num_threads(1)

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True)
def _private_decode_cache(tmp_path_factory, monkeypatch):
    """Decode caches go to a folder of the test's own, never to the user's ~/.cache."""
    monkeypatch.setenv("CONDENSE_CACHE", str(tmp_path_factory.mktemp("decode-cache")))


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data():
    """Path of ../shared/data (the verified MNIST/Fashion-MNIST files); skip when absent."""
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(os.path.join(path, "mnist")):
        pytest.skip(f"real data not found at {path} (the ../shared checkout beside the repo)")
    return path
