"""Test-wide setup: Triton kernels run in the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton decorates any kernel, so it is set here, before any
test module imports condense_engine.kernels.
"""
import os

import pytest
import torch
from packaging.version import Version

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test shapes are tiny and pytest-xdist already runs one worker per core: more threads per
# worker only oversubscribe the cores (measured: up to 100× slower steps on a busy 2-core box).
torch.set_num_threads(1)

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def pytest_configure(config):
    """Triton 3.6's interpreter calls int() on one-element arrays, which NumPy 2.4 refuses.

    Every interpreted kernel would then fail with "only 0-dimensional arrays can be converted to
    Python scalars" (measured: triton 3.6.0 + numpy 2.4.6, 101 failures; numpy 2.2/2.3 or triton
    3.7 pass). Stop at once with the fix instead.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy
        import triton
    except ImportError:
        return
    release = lambda module: Version(module.__version__).release[:2]  # noqa: E731
    if release(triton) < (3, 7) and release(numpy) >= (2, 4):
        pytest.exit(f"triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot run on numpy "
                    f"{numpy.__version__}: install 'numpy<2.4' or 'triton>=3.7'", returncode=4)


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
