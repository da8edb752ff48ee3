"""methods.augment.dc_augment, DC's evaluation-only augmentation, against a per-pixel reference
of each op (methods.md §1.5), and the published choice of strategy per data set and model."""
import math

import pytest
import torch

from condense_engine.methods.augment import (DC_CROP_PAD, DC_NOISE_STD, DC_ROTATE, DC_SCALE, dc_augment,
                                             dc_augment_draws, dc_augment_ops, dc_eval_strategy)

# Not square, so a rotation that mixed up height and width would show.
SHAPE = (24, 2, 9, 11)


def _images(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _reference(images, ops, draws):
    """Each image's op, pixel by pixel: the source pixel of every output pixel, in pixel
    coordinates about the image centre; the batch's channel mean where the source is outside."""
    count, channels, height, width = images.shape
    mean = images.mean(dim=(0, 2, 3))
    out = images.clone()

    def pixel(n, c, y, x):
        inside = 0 <= y < height and 0 <= x < width
        return float(images[n, c, y, x] - mean[c]) if inside else 0.0

    for n in range(count):
        op = ops[int(draws["op"][n])]
        if op == "noise":
            continue
        for i in range(height):
            for j in range(width):
                dx, dy = j + 0.5 - width / 2, i + 0.5 - height / 2
                if op == "crop":
                    src_x, src_y = j + int(draws["shift"][n, 0]), i + int(draws["shift"][n, 1])
                elif op == "scale":
                    zoom_x, zoom_y = draws["zoom"][n].tolist()
                    src_x, src_y = dx / zoom_x + width / 2 - 0.5, dy / zoom_y + height / 2 - 0.5
                else:
                    angle = math.radians(int(draws["angle"][n]))
                    src_x = math.cos(angle) * dx - math.sin(angle) * dy + width / 2 - 0.5
                    src_y = math.sin(angle) * dx + math.cos(angle) * dy + height / 2 - 0.5
                for c in range(channels):
                    if op == "rotate":  # bilinear between the four neighbours
                        x0, y0 = math.floor(src_x), math.floor(src_y)
                        fx, fy = src_x - x0, src_y - y0
                        value = ((1 - fx) * (1 - fy) * pixel(n, c, y0, x0) + fx * (1 - fy) * pixel(n, c, y0, x0 + 1)
                                 + (1 - fx) * fy * pixel(n, c, y0 + 1, x0) + fx * fy * pixel(n, c, y0 + 1, x0 + 1))
                    else:  # nearest
                        value = pixel(n, c, round(src_y), round(src_x))
                    out[n, c, i, j] = value + mean[c]
    return out


@pytest.mark.parametrize("strategy", ["crop", "scale", "rotate", "crop_scale_rotate"])
def test_each_op_matches_the_per_pixel_reference(strategy):
    images = _images()
    ops = dc_augment_ops(strategy)
    draws = dc_augment_draws(len(images), ops, torch.Generator().manual_seed(5))
    out = dc_augment(images, strategy, torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, _reference(images, ops, draws), rtol=1e-4, atol=1e-4)
    if len(ops) > 1:
        assert set(draws["op"].tolist()) == set(range(len(ops)))  # every op was exercised


def test_draws_stay_in_the_published_ranges():
    draws = dc_augment_draws(4000, ("crop", "scale", "rotate"), torch.Generator().manual_seed(0))
    assert draws["shift"].min() == -DC_CROP_PAD and draws["shift"].max() == DC_CROP_PAD
    assert draws["zoom"].min() >= 1 - DC_SCALE and draws["zoom"].max() <= 1 + DC_SCALE
    assert draws["zoom"].min() < 1 - 0.9 * DC_SCALE and draws["zoom"].max() > 1 + 0.9 * DC_SCALE
    assert draws["angle"].min() == -DC_ROTATE and draws["angle"].max() == DC_ROTATE - 1
    # the two sides of an image zoom independently
    assert not torch.equal(draws["zoom"][:, 0], draws["zoom"][:, 1])


def test_noise_adds_small_gaussian_noise_only_to_the_images_that_drew_it():
    images = _images().repeat(20, 1, 1, 1)
    ops = ("crop", "noise")
    draws = dc_augment_draws(len(images), ops, torch.Generator().manual_seed(1))
    out = dc_augment(images, "crop_noise", torch.Generator().manual_seed(1))
    noisy = draws["op"] == 1
    assert 0 < int(noisy.sum()) < len(images)
    added = (out - images)[noisy]
    assert abs(float(added.std()) - DC_NOISE_STD) < 0.05 * DC_NOISE_STD and abs(float(added.mean())) < 1e-4
    torch.testing.assert_close(out[~noisy], _reference(images, ops, draws)[~noisy])


def test_seeded_and_leaves_the_input_alone():
    images = _images()
    kept = images.clone()
    first = dc_augment(images, "crop_scale_rotate", torch.Generator().manual_seed(3))
    assert torch.equal(first, dc_augment(images, "crop_scale_rotate", torch.Generator().manual_seed(3)))
    assert not torch.equal(first, dc_augment(images, "crop_scale_rotate", torch.Generator().manual_seed(4)))
    assert torch.equal(images, kept)


@pytest.mark.parametrize("strategy", ["", "flip", "crop_crop", "crop-scale", None])
def test_bad_strategies_are_refused(strategy):
    with pytest.raises(ValueError, match="DC augmentation strategy"):
        dc_augment(_images(), strategy, torch.Generator())


@pytest.mark.parametrize("dataset, model, expected", [
    ("mnist", "ConvNet", "crop_scale_rotate"), ("MNIST", "ConvNet", "crop_scale_rotate"),
    ("mnist-default", "ConvNet", "crop_scale_rotate"),
    ("fashion-mnist", "ConvNet", None), ("cifar10", "ConvNet", None), ("cifar10", "ConvNetBN", "crop_noise")])
def test_the_published_strategy_per_data_set_and_model(dataset, model, expected):
    assert dc_eval_strategy(dataset, model) == expected
