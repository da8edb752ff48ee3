"""ops.gather_normalize: every backend against the reference, errors, and the CUDA compile check."""
import glob
import os
import shutil
import subprocess

import pytest
import torch

from condense_engine import ops
from condense_engine._extension import has_native
from condense_engine.reference.gather import gather_normalize as reference

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _backends():
    """(backend, device) pairs to test: the native op on every device it is built for."""
    found = [("torch", "cpu")]
    for device in ("cpu", "cuda"):
        if (device == "cpu" or torch.cuda.is_available()) and has_native("gather_normalize", device) is None:
            found.append(("native", device))
    return found


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("channels,size", [(1, (28, 28)), (3, (7, 5))])
def test_matches_reference(backend, device, channels, size):
    images = torch.randint(0, 256, (50, channels, *size), dtype=torch.uint8)
    index = torch.randint(0, 50, (33,))
    mean, std = [0.1 * (c + 1) for c in range(channels)], [0.3] * channels
    out = ops.gather_normalize(images.to(device), index.to(device), mean, std, backend=backend)
    expected = reference(images, index, torch.tensor(mean), torch.tensor(std))
    assert out.shape == (33, channels, *size) and out.dtype == torch.float32 and out.device.type == device
    tolerance = 1e-6 if device == "cpu" else 1e-5  # the CUDA build uses fast math
    torch.testing.assert_close(out.cpu(), expected, rtol=tolerance, atol=tolerance)


def test_native_extension_is_built():
    """The CPU part of the extension always builds (make install); its absence is a defect."""
    assert has_native("gather_normalize", "cpu") is None


@pytest.mark.parametrize("bad,match", [
    (dict(images=torch.zeros(4, 1, 2, 2)), "uint8"),
    (dict(index=torch.tensor([0, 1], dtype=torch.int32)), "int64"),
    (dict(index=torch.tensor([0, 9])), "index values"),
    (dict(mean=[0.1, 0.2]), "mean and std"),
])
def test_bad_input(bad, match):
    args = dict(images=torch.zeros(4, 1, 2, 2, dtype=torch.uint8), index=torch.tensor([0, 3]),
                mean=[0.5], std=[0.5])
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        ops.gather_normalize(**args)


def test_unknown_backend_named():
    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="triton"):
        ops.gather_normalize(images, torch.tensor([0]), [0.5], [0.5], backend="triton")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(ROOT, "csrc/ops/cuda/*.cu"))),
                         ids=os.path.basename)
def test_cuda_source_compiles(source, tmp_path):
    """Every .cu kernel compiles with nvcc alone (no torch headers), as DESIGN.md requires."""
    result = subprocess.run(["nvcc", "-std=c++17", "-O2", "-c", source, "-o", str(tmp_path / "k.o")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
