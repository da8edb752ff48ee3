"""methods.augment.dc_augment, DC's evaluation-only augmentation, against a per-pixel reference
of each op (methods.md §1.5), and the published choice of strategy per data set and model."""
import math

import pytest
import torch
import torch.nn.functional as F

from condense_engine.methods.augment import (DC_CROP_PAD, DC_NOISE_STD, DC_ROTATE, DC_SCALE, dc_augment,
                                             dc_augment_draws, dc_augment_each, dc_augment_ops, dc_eval_strategy)

# Not square, so a rotation that mixed up height and width would show.
SHAPE = (24, 2, 9, 11)


def _images(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _reference(images, ops, draws):
    """Each image's op done the long way: crop by slicing a canvas padded with the channel means;
    scale by F.interpolate onto a zero canvas of the largest side, then slicing its centre; rotate
    pixel by pixel, bilinear about the centre, filling with the mean of the channel means."""
    count, channels, height, width = images.shape
    means = images.mean(dim=(0, 2, 3))
    out = images.clone()
    for n in range(count):
        op = ops[int(draws["op"][n])]
        if op == "crop":
            canvas = means[:, None, None].repeat(1, height + 2 * DC_CROP_PAD, width + 2 * DC_CROP_PAD)
            canvas[:, DC_CROP_PAD:DC_CROP_PAD + height, DC_CROP_PAD:DC_CROP_PAD + width] = images[n]
            top, left = DC_CROP_PAD + int(draws["shift"][n, 1]), DC_CROP_PAD + int(draws["shift"][n, 0])
            out[n] = canvas[:, top:top + height, left:left + width]
        elif op == "scale":
            new_h, new_w = int(draws["zoom"][n, 1] * height), int(draws["zoom"][n, 0] * width)
            resized = F.interpolate(images[n:n + 1], [new_h, new_w], mode="nearest")[0]
            side = max(new_h, new_w, height, width)
            canvas = torch.zeros(channels, side, side)
            top, left = (side - new_h) // 2, (side - new_w) // 2
            canvas[:, top:top + new_h, left:left + new_w] = resized
            top, left = (side - height) // 2, (side - width) // 2
            out[n] = canvas[:, top:top + height, left:left + width]
        elif op == "rotate":
            fill = float(means.mean())
            angle = math.radians(int(draws["angle"][n]))

            def pixel(c, y, x):
                return float(images[n, c, y, x]) - fill if 0 <= y < height and 0 <= x < width else 0.0
            for i in range(height):
                for j in range(width):
                    dx, dy = j + 0.5 - width / 2, i + 0.5 - height / 2
                    src_x = math.cos(angle) * dx - math.sin(angle) * dy + width / 2 - 0.5
                    src_y = math.sin(angle) * dx + math.cos(angle) * dy + height / 2 - 0.5
                    x0, y0 = math.floor(src_x), math.floor(src_y)
                    fx, fy = src_x - x0, src_y - y0
                    corners = (((1 - fx) * (1 - fy), y0, x0), (fx * (1 - fy), y0, x0 + 1),
                               ((1 - fx) * fy, y0 + 1, x0), (fx * fy, y0 + 1, x0 + 1))
                    for c in range(channels):
                        out[n, c, i, j] = fill + sum(weight * pixel(c, y, x) for weight, y, x in corners)
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
    assert draws["shift"].min() == -DC_CROP_PAD and draws["shift"].max() == DC_CROP_PAD - 1  # 8 offsets of a pad 4
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


def test_each_slice_is_augmented_with_its_own_draws_and_fills():
    """The batched models' call: slice r as dc_augment would do it alone with generators[r]. The
    slices' means differ, so a fill taken from the whole batch or another slice would show."""
    slices = torch.stack([_images(seed) + 3 * seed for seed in range(3)])
    ops = dc_augment_ops("crop_scale_rotate")
    out = dc_augment_each(slices, "crop_scale_rotate", [torch.Generator().manual_seed(10 + r) for r in range(3)])
    for r, images in enumerate(slices):
        draws = dc_augment_draws(len(images), ops, torch.Generator().manual_seed(10 + r))
        torch.testing.assert_close(out[r], _reference(images, ops, draws), rtol=1e-4, atol=1e-4)
    noisy = dc_augment_each(slices, "crop_noise", [torch.Generator().manual_seed(10 + r) for r in range(3)])
    for r, images in enumerate(slices):
        torch.testing.assert_close(noisy[r], dc_augment(images, "crop_noise", torch.Generator().manual_seed(10 + r)))


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
