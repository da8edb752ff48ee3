"""The DM/M3D step path reads no tensor value back to the host (on a GPU each read is a sync) and
issues as many ops for 600 classes as for 60; gather_normalize's bounds check stays for callers.

Reads are counted as aten._local_scalar_dense, the op behind int(t), bool(t) and t.item().
"""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from condense_engine import ops
from condense_engine.datasets import ClassSampler, from_tensors
from condense_engine.methods.augment import matched_batches
from condense_engine.ops.dsa import DEFAULT_STRATEGY
from condense_engine.synset import SyntheticSet


class CountOps(TorchDispatchMode):
    """Counts every aten op dispatched while active, by name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _sampler_and_synset(classes: int):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes * 4, 1, 4, 4), dtype=torch.uint8, generator=generator)
    data = from_tensors(images, torch.arange(classes).repeat_interleave(4))
    sampler = ClassSampler(data, generator=generator)
    synset = SyntheticSet.from_tensors(torch.randn(classes, 1, 4, 4), torch.arange(classes), num_classes=classes,
                                       mean=data.mean, std=data.std)
    return sampler, synset


def test_sampler_reads_nothing_back():
    sampler, _ = _sampler_and_synset(5)
    with CountOps() as ops_:
        sampler.sample(2)
    assert ops_.counts["aten._local_scalar_dense"] == 0


def test_matched_batches_read_nothing_back_and_do_not_grow_with_classes():
    counts = {}
    for classes in (60, 600):
        sampler, synset = _sampler_and_synset(classes)
        with CountOps() as ops_:
            matched_batches(sampler, synset, 2, DEFAULT_STRATEGY, torch.Generator().manual_seed(1))
        counts[classes] = ops_.counts
    assert counts[60]["aten._local_scalar_dense"] == 0
    assert counts[600] == counts[60]


@pytest.mark.parametrize("index", [[0, 4], [-1, 2]])
def test_gather_normalize_still_checks_bounds_by_default(index):
    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"index values must lie in \[0, 4\)"):
        ops.gather_normalize(images, torch.tensor(index), [0.5], [0.5])


def test_gather_normalize_without_the_check_gives_the_same_batch():
    images = torch.randint(0, 256, (6, 2, 3, 3), dtype=torch.uint8)
    index = torch.tensor([5, 0, 3, 3])
    with CountOps() as ops_:
        unchecked = ops.gather_normalize(images, index, [0.4, 0.5], [0.2, 0.3], check_bounds=False)
    assert ops_.counts["aten._local_scalar_dense"] == 0
    assert torch.equal(unchecked, ops.gather_normalize(images, index, [0.4, 0.5], [0.2, 0.3]))
