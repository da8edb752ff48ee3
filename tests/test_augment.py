"""methods.augment: the vectorised Siamese DSA against the per-class DSAParams.sample path, bit for
bit (draws, augmented images and gradients), and matched_batches sharing one transform per class."""
import numpy as np
import pytest
import torch

from condense_engine import ops
from condense_engine._extension import has_native
from condense_engine.datasets import ClassSampler
from condense_engine.methods.augment import SiameseDSA, matched_batches, siamese_dsa
from condense_engine.ops.dsa import (DEFAULT_STRATEGY, DIGITS_STRATEGY, DSAParams, counter_uniform,
                                     counter_uniform_seeds, siamese_draws)
from condense_engine.synset import SyntheticSet
from tests.toy_data import toy_dataset

STRATEGIES = [DEFAULT_STRATEGY, DIGITS_STRATEGY, "color", "crop_cutout", "flip_scale_rotate", "none"]


@pytest.fixture(params=["torch"] + (["native"] if has_native("dsa", "cpu") is None else []))
def each_backend(request):
    """Run the test once per DSA backend available on CPU."""
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend(None)


def _seeds(count: int, start: int = 0) -> list:
    return torch.randint(0, 2**31 - 1, (count,), generator=torch.Generator().manual_seed(start)).tolist()


def _per_class(images, per_class, seeds, strategy, mode="S"):
    """The published path: one DSAParams.sample and one dsa call per class."""
    size = tuple(images.shape[2:])
    return torch.cat([ops.dsa(chunk, DSAParams.sample(per_class, strategy, size=size, mode=mode, seed=seed))
                      for chunk, seed in zip(images.split(per_class), seeds)])


def test_counter_uniform_seeds_equals_one_seed_at_a_time():
    seeds = [0, 1, 7, 2**31 - 2, -5, 2**62 + 3]
    batched = counter_uniform_seeds(np.array(seeds, dtype=np.int64), 4, 3, 2)
    assert batched.shape == (len(seeds), 3, 2)
    for row, seed in zip(batched, seeds):
        assert torch.equal(row, counter_uniform(seed, 4, 3, 2))
    assert torch.equal(counter_uniform_seeds(torch.tensor(seeds), 4, 3, 2), batched)
    with pytest.raises(TypeError, match="64-bit integers"):
        counter_uniform_seeds([0.5], 4, 1, 1)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mode", ["S", "M"])
@pytest.mark.parametrize("size", [(32, 32), (7, 9), (4, 4), (5, 5)])
def test_siamese_draws_equal_per_seed_sample(strategy, mode, size):
    seeds = _seeds(40, start=len(strategy))
    draws = siamese_draws(seeds, strategy, size=size, mode=mode)
    for row, seed in enumerate(seeds):
        expected = DSAParams.sample(1, strategy, size=size, mode=mode, seed=seed)
        ops_ = draws.choices[draws.choice[row]]
        assert ops_ == expected.ops
        assert (draws.cutout_size if "cutout" in ops_ else None) == expected.cutout_size
        for name, value in expected.tensors().items():
            assert draws.values[name][row:row + 1].dtype == value.dtype, name
            assert torch.equal(draws.values[name][row:row + 1], value), (name, seed)


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("classes, per_class, size", [(1, 3, (8, 8)), (17, 2, (7, 9)), (40, 1, (4, 4))])
def test_images_and_gradients_equal_the_per_class_path(strategy, classes, per_class, size):
    seeds = _seeds(classes, start=classes)
    images = torch.randn(classes * per_class, 2, *size, requires_grad=True)
    ours = siamese_dsa(images, per_class, seeds, strategy)
    (ours_grad,) = torch.autograd.grad((ours * ours.detach()).sum(), images)
    published = _per_class(images, per_class, seeds, strategy)
    (published_grad,) = torch.autograd.grad((published * published.detach()).sum(), images)
    assert torch.equal(ours, published)
    assert torch.equal(ours_grad, published_grad)


def test_many_classes_use_several_op_groups():
    """The grouped path (classes reordered by op group and put back) is what the test above covers."""
    draws = siamese_draws(_seeds(17, start=17), DEFAULT_STRATEGY, size=(7, 9))
    assert len(set(draws.choice.tolist())) > 1


def test_one_transform_serves_several_batch_sizes_and_image_sizes():
    seeds = _seeds(12, start=3)
    transform = SiameseDSA(torch.tensor(seeds), DEFAULT_STRATEGY)
    for per_class, size in [(3, (8, 8)), (1, (8, 8)), (2, (6, 10))]:
        images = torch.randn(12 * per_class, 3, *size)
        assert torch.equal(transform(images, per_class), _per_class(images, per_class, seeds, DEFAULT_STRATEGY))


def test_batch_size_must_match_the_classes():
    with pytest.raises(ValueError, match="3 classes × 2 images"):
        SiameseDSA([1, 2, 3], DEFAULT_STRATEGY)(torch.randn(5, 1, 4, 4), 2)


def test_matched_batches_share_one_transform_per_class():
    data = toy_dataset(classes=5, per_class=10, size=8)
    sampler = ClassSampler(data, generator=torch.Generator().manual_seed(2))
    synset = SyntheticSet.from_tensors(torch.randn(10, 1, 8, 8), torch.arange(5).repeat_interleave(2),
                                       num_classes=5, mean=data.mean, std=data.std)
    generator = torch.Generator().manual_seed(4)
    real, syn, per_class = matched_batches(sampler, synset, 3, DEFAULT_STRATEGY, generator)

    sampler.generator.manual_seed(2)
    plain_real, _ = sampler.sample(3)
    seeds = torch.randint(0, 2**31 - 1, (5,), generator=torch.Generator().manual_seed(4)).tolist()
    assert per_class == 2
    assert torch.equal(real, _per_class(plain_real, 3, seeds, DEFAULT_STRATEGY))
    assert torch.equal(syn, _per_class(synset.images, 2, seeds, DEFAULT_STRATEGY))
