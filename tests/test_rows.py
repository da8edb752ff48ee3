"""RealImages: device-resident and host-streamed placements serve the same batches and labels,
a row subset serves only its rows, and rows out of range are refused."""
import pytest
import torch

from condense_engine.datasets import from_tensors
from condense_engine.datasets.rows import RealImages


def _dataset(dtype=torch.uint8):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 5, 7), dtype=torch.uint8, generator=generator)
    data = from_tensors(images, torch.arange(12) % 3, name="rows")
    if dtype == torch.float32:
        data.images = data.normalized()
    return data


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_both_placements_serve_the_normalized_rows(dtype):
    data = _dataset(dtype)
    rows = torch.tensor([11, 0, 4, 4, 7])
    expected = _dataset().normalized(rows)
    for place in ("device", "host"):
        real = RealImages(data, "cpu", place)
        torch.testing.assert_close(real.normalized(rows), expected)
        assert torch.equal(real.labels_at(rows), torch.tensor([2, 0, 1, 1, 1]))
        assert torch.equal(real.labels_at(rows.view(1, 5)), real.labels_at(rows).view(1, 5))
        assert len(real) == 12 and real.normalized(rows[:0]).shape == (0, 3, 5, 7)
    assert RealImages(data, "cpu", "host").images.data_ptr() == data.images.data_ptr()  # streamed: no copy


def test_a_row_subset_serves_only_its_rows():
    data = _dataset()
    subset = torch.tensor([3, 5, 9])
    real = RealImages(data, "cpu", "device", rows=subset)
    assert len(real) == 3
    torch.testing.assert_close(real.normalized(torch.tensor([2, 0])), data.normalized(torch.tensor([9, 3])))
    assert real.labels_at(torch.tensor([1])).tolist() == [2]


@pytest.mark.parametrize("place", ["device", "host"])
def test_rows_out_of_range_and_bad_placements_are_refused(place):
    real = RealImages(_dataset(), "cpu", place)
    for rows in (torch.tensor([0, 12]), torch.tensor([-1])):
        with pytest.raises(ValueError, match=r"rows must lie in \[0, 12\)"):
            real.normalized(rows)
    with pytest.raises(ValueError, match="images_on must be 'device' or 'host'"):
        RealImages(_dataset(), "cpu", "disk")
    half = _dataset(torch.float32)
    half.images = half.images.half()
    with pytest.raises(ValueError, match="uint8 .* or float32 .*, got torch.float16"):
        RealImages(half, "cpu", place)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_streamed_batches_reach_the_gpu_equal_to_resident_ones(dtype):
    data = _dataset(dtype)
    resident, streamed = RealImages(data, "cuda", "device"), RealImages(data, "cuda", "host")
    assert resident.images.is_cuda and not streamed.images.is_cuda and streamed.labels.is_cuda
    rows = torch.tensor([1, 8, 3])
    assert torch.equal(streamed.normalized(rows), resident.normalized(rows))
    assert torch.equal(streamed.normalized(rows.cuda()), resident.normalized(rows.cuda()))
