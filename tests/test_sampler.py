"""ClassSampler: one gather per batch, n distinct images per class, seeded determinism, errors."""
import pytest
import torch

import condense_engine.datasets as ds

COUNTS = [7, 3, 12, 5]


def indexed_dataset(counts=COUNTS, dtype=torch.uint8):
    """Each image is constant and equal to its row number, so a batch reveals which rows it holds."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))]
    rows = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 2, 4, 4)
    dataset = ds.from_tensors(rows.contiguous(), labels, mean=(0.25, 0.5), std=(0.5, 2.0))
    if dtype == torch.float32:
        dataset = ds.from_tensors(dataset.normalized(), labels, mean=(0.25, 0.5), std=(0.5, 2.0),
                                  normalized=True)
    return dataset


def rows_of(images, dataset):
    """Recover the row numbers encoded in normalised images."""
    mean, std = dataset.mean[0], dataset.std[0]
    return torch.round((images[:, 0, 0, 0] * std + mean) * 255).long()


def seeded(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("storage", [torch.uint8, torch.float32])
def test_sample_gives_n_distinct_images_of_each_class_in_order(storage):
    dataset = indexed_dataset(dtype=storage)
    sampler = ds.ClassSampler(dataset, generator=seeded(0))
    images, labels = sampler.sample(3)
    assert images.shape == (12, 2, 4, 4) and images.dtype == torch.float32
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    rows = rows_of(images, dataset)
    assert torch.equal(dataset.labels[rows], labels)
    for c in range(4):
        assert len(set(rows[labels == c].tolist())) == 3
    assert torch.allclose(images, dataset.normalized(rows), atol=1e-6)


def test_same_seed_same_batches_and_fresh_draws_per_call():
    dataset = indexed_dataset()
    first, second = ds.ClassSampler(dataset, generator=seeded(5)), ds.ClassSampler(dataset, generator=seeded(5))
    draws = [first.sample(2)[0] for _ in range(3)]
    assert all(torch.equal(a, second.sample(2)[0]) for a in draws)
    assert not torch.equal(rows_of(draws[0], dataset), rows_of(draws[1], dataset))
    other = ds.ClassSampler(dataset, generator=seeded(6)).sample(2)[0]
    assert not torch.equal(other, draws[0])


def test_every_image_of_a_class_is_reachable():
    dataset = indexed_dataset()
    sampler = ds.ClassSampler(dataset, generator=seeded(1))
    seen = set()
    for _ in range(40):
        seen |= set(rows_of(sampler.sample_class(2, 3), dataset).tolist())
    assert seen == set(torch.nonzero(dataset.labels == 2).flatten().tolist())
    full = rows_of(sampler.sample_class(1, 3), dataset)
    assert sorted(full.tolist()) == sorted(torch.nonzero(dataset.labels == 1).flatten().tolist())


def test_class_subset_counts_and_random_real():
    dataset = indexed_dataset()
    sampler = ds.ClassSampler(dataset, device="cpu", generator=seeded(2))
    assert sampler.counts.tolist() == COUNTS
    images, labels = sampler.sample(2, classes=[2, 0])
    assert labels.tolist() == [2, 2, 0, 0]
    assert torch.equal(dataset.labels[rows_of(images, dataset)], labels)
    real, real_labels = sampler.random_real(3, generator=seeded(9))
    again, _ = ds.ClassSampler(dataset).random_real(3, generator=seeded(9))
    assert real.shape == (12, 2, 4, 4) and torch.equal(real, again)
    assert torch.bincount(real_labels).tolist() == [3, 3, 3, 3]


def test_sample_range_is_that_slice_of_the_whole_batch_from_the_same_stream():
    dataset = indexed_dataset()
    whole, ranged = ds.ClassSampler(dataset, generator=seeded(4)), ds.ClassSampler(dataset, generator=seeded(4))
    for _ in range(2):  # the second draw checks that both consumed the generator alike
        images, labels = whole.sample(2)
        part, part_labels = ranged.sample_range(2, 1, 3)
        assert torch.equal(part, images[2:6]) and part_labels.tolist() == [1, 1, 2, 2]
    with pytest.raises(ValueError, match="class range"):
        ranged.sample_range(2, 3, 3)


@pytest.mark.parametrize("storage", [torch.uint8, torch.float32])
def test_a_sampler_holding_some_classes_stores_only_them_and_draws_the_whole_stream(storage):
    """A class-sharded rank's sampler: only classes 1..2's images are resident, and its draws
    are the ones a whole-set sampler makes with the same seed."""
    dataset = indexed_dataset(dtype=storage)
    whole, held = ds.ClassSampler(dataset, generator=seeded(4)), ds.ClassSampler(dataset, generator=seeded(4),
                                                                                 classes=(1, 3))
    assert len(held.store) == COUNTS[1] + COUNTS[2] and held.counts.tolist() == COUNTS
    for _ in range(2):
        images, _ = whole.sample(2)
        part, labels = held.sample_range(2, 1, 3)
        assert torch.equal(part, images[2:6]) and labels.tolist() == [1, 1, 2, 2]
    assert torch.equal(held.sample(3, classes=[2], generator=seeded(1))[0],
                       whole.sample(3, classes=[2], generator=seeded(1))[0])
    for ask in (lambda: held.sample(1), lambda: held.sample(1, classes=[0]), lambda: held.sample_range(1, 2, 4),
                lambda: held.draw_indices(1, [3])):
        with pytest.raises(ValueError, match="holds only classes 1..2"):
            ask()
    for bad in ((2, 2), (-1, 2), (0, 5)):
        with pytest.raises(ValueError, match="classes must be a range"):
            ds.ClassSampler(dataset, classes=bad)


@pytest.mark.parametrize("storage", [torch.uint8, torch.float32])
@pytest.mark.parametrize("classes", [None, (1, 3)])
def test_a_streaming_sampler_keeps_the_images_where_they_are_and_draws_the_same(storage, classes):
    dataset = indexed_dataset(dtype=storage)
    resident = ds.ClassSampler(dataset, generator=seeded(4), classes=classes)
    streamed = ds.ClassSampler(dataset, generator=seeded(4), classes=classes, images_on="host")
    assert streamed.store.images.data_ptr() == dataset.images.data_ptr()  # no copy, not even of a shard
    first, end = classes or (0, 4)
    for _ in range(2):
        expected, expected_labels = resident.sample_range(2, first, end)
        images, labels = streamed.sample_range(2, first, end)
        assert torch.equal(images, expected) and torch.equal(labels, expected_labels)
    assert torch.equal(dataset.labels[rows_of(images, dataset)], labels)
    if classes:
        with pytest.raises(ValueError, match="holds only classes 1..2"):
            streamed.sample(1, classes=[0])


def test_images_on_must_be_device_or_host():
    with pytest.raises(ValueError, match="images_on must be 'device' or 'host'"):
        ds.ClassSampler(indexed_dataset(), images_on="disk")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_streaming_sampler_moves_only_the_batch_to_the_gpu():
    dataset = indexed_dataset()
    resident = ds.ClassSampler(dataset, device="cuda", generator=seeded(4), classes=(1, 3))
    streamed = ds.ClassSampler(dataset, device="cuda", generator=seeded(4), classes=(1, 3), images_on="host")
    assert streamed.store.images.device.type == "cpu" and resident.store.images.device.type == "cuda"
    images, labels = streamed.sample_range(2, 1, 3)
    assert images.device.type == "cuda" and labels.device.type == "cuda"
    assert torch.equal(images, resident.sample_range(2, 1, 3)[0])


def test_sample_every_class_without_a_shard_is_sample():
    dataset = indexed_dataset()
    images, labels = ds.ClassSampler(dataset, generator=seeded(7)).sample_every_class(2)
    expected, expected_labels = ds.ClassSampler(dataset, generator=seeded(7)).sample(2)
    assert torch.equal(images, expected) and torch.equal(labels, expected_labels)


def test_too_many_per_class_names_the_class():
    sampler = ds.ClassSampler(indexed_dataset())
    with pytest.raises(ValueError, match=r"cannot draw 4 distinct images from class 1 \('1'\): it has only 3"):
        sampler.sample(4)
    assert sampler.sample(4, classes=[0, 2])[0].shape[0] == 8
    with pytest.raises(ValueError, match="classes must lie in"):
        sampler.sample(1, classes=[4])
    with pytest.raises(ValueError, match="at least 1"):
        sampler.sample(0)
