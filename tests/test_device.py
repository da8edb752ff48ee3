"""resolve_device: the default device, and clear errors for devices that cannot be used."""
import pytest
import torch

import condense_engine as ce
from condense_engine.device import resolve_device
from tests.toy_data import toy_dataset


def test_the_default_is_cuda_when_present_else_cpu():
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(torch.device("cpu"))


def test_a_malformed_device_name_is_a_value_error():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_by_every_entry_point():
    with pytest.raises(ValueError, match="sees no CUDA GPU; use device='cpu'"):
        ce.distill(toy_dataset(), ipc=1, iterations=1, device="cuda", progress=False)
    synset = ce.distill(toy_dataset(), ipc=1, iterations=0, device="cpu", progress=False)
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        ce.evaluate(synset, toy_dataset(), repeats=1, epochs=1, device="cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_index_beyond_the_visible_ones_is_refused():
    with pytest.raises(ValueError, match="visible"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
