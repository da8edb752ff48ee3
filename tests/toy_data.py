"""Small class-structured data sets and run helpers shared by the method tests."""
import os
import signal
from unittest import mock

import pytest
import torch

import condense_engine as ce
from condense_engine.checkpoint import load_checkpoint
from condense_engine.datasets import from_tensors


def toy_dataset(classes=3, per_class=24, size=12, channels=1):
    """Class-dependent blobs so there is a distribution to match."""
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = torch.rand(len(labels), channels, size, size, generator=g) * 80
    for c in range(classes):
        images[labels == c, :, c * 3:c * 3 + 4, :] += 150
    return from_tensors(images.clamp(0, 255).to(torch.uint8), labels)


FAST = dict(batch_real=8, model="ConvNetW32", dsa=True)


def distill_interrupted(method_cls, stop_after: int, **distill_kwargs) -> int:
    """Run `ce.distill`, sending ourselves SIGTERM after `stop_after` steps of `method_cls`.

    The driver must stop with KeyboardInterrupt after checkpointing; returns the iteration the
    checkpoint (distill_kwargs["checkpoint"]) holds.
    """
    original = method_cls.step
    calls = []

    def step(self, synset, iteration):
        out = original(self, synset, iteration)
        calls.append(iteration)
        if len(calls) == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    with mock.patch.object(method_cls, "step", step), pytest.raises(KeyboardInterrupt):
        ce.distill(**distill_kwargs)
    return load_checkpoint(distill_kwargs["checkpoint"])["iteration"]
