"""SyntheticSet: construction, save/load, MTT export, PNG grid, IDC multi-formation."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from condense_engine import synset as synset_module
from condense_engine.synset import SyntheticSet

MEAN, STD = (0.5,), (0.25,)


def _hard_set(**kwargs):
    images = torch.randn(6, 1, 4, 5)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    return SyntheticSet.from_tensors(images, labels, mean=MEAN, std=STD, **kwargs)


def test_from_tensors_infers_classes_ipc_and_fills_meta():
    syn = _hard_set(meta={"method": "dm"})
    assert syn.num_classes == 3 and syn.classes == ["0", "1", "2"] and syn.ipc == 2 and len(syn) == 6
    assert syn.labels.dtype == torch.int64
    assert syn.meta["method"] == "dm" and "library_version" in syn.meta and "created" in syn.meta
    soft_labels = torch.tensor([[0.1, 2.0], [3.0, 0.0], [0.0, 1.0]])
    soft = SyntheticSet.from_tensors(torch.randn(3, 1, 2, 2), soft_labels, mean=MEAN, std=STD)
    assert soft.num_classes == 2 and soft.hard_labels.tolist() == [1, 0, 1] and soft.ipc == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(images=torch.zeros(2, 1, 3, 3, dtype=torch.uint8)), "network space"),
    (dict(labels=torch.tensor([0, 5])), r"\[0, 3\)"),
    (dict(labels=torch.tensor([0, 1, 2])), "labels must be"),
    (dict(mean=(0.1, 0.2)), "mean/std need 1"),
    (dict(factor=0), "factor"),
    (dict(lr=torch.tensor([0.1, 0.2])), "lr must be"),
    (dict(image_classes=torch.tensor([0.0, 1.0])), "image_classes must be class indices"),
    (dict(image_classes=torch.tensor([0, 1, 2])), "image_classes must be class indices"),
    (dict(image_classes=torch.tensor([0, 3])), r"image_classes must lie in \[0, 3\)"),
])
def test_from_tensors_rejects_bad_input(kwargs, match):
    arguments = dict(images=torch.zeros(2, 1, 3, 3), labels=torch.tensor([0, 1]), mean=MEAN, std=STD,
                     num_classes=3)
    arguments.update(kwargs)
    images, labels = arguments.pop("images"), arguments.pop("labels")
    with pytest.raises(ValueError, match=match):
        SyntheticSet.from_tensors(images, labels, **arguments)


def _assert_same(loaded, original):
    assert torch.equal(loaded.images, original.images) and loaded.images.dtype == original.images.dtype
    assert torch.equal(loaded.labels, original.labels) and loaded.labels.dtype == original.labels.dtype
    assert (loaded.num_classes, loaded.classes, loaded.mean, loaded.std, loaded.factor) == \
        (original.num_classes, original.classes, original.mean, original.std, original.factor)
    assert loaded.meta == original.meta


def test_save_load_round_trip_hard_labels(tmp_path):
    syn = _hard_set(lr=0.0123, classes=["cat", "dog", "emu"],
                    meta={"method": "dm", "ipc": 2, "options": {"lr_img": 1.0, "dsa": True, "sizes": (1, 2)},
                          "seed": 0, "iterations": 10})
    path = syn.save(tmp_path / "out" / "syn.pt")
    loaded = SyntheticSet.load(path)
    _assert_same(loaded, syn)
    assert loaded.lr == 0.0123
    assert torch.load(path, weights_only=True)["format_version"] == 1
    assert os.listdir(tmp_path / "out") == ["syn.pt"]


def test_save_load_round_trip_soft_labels_tensor_lr_factor_and_zca(tmp_path):
    images = torch.randn(4, 3, 4, 4, requires_grad=True)
    syn = SyntheticSet.from_tensors(images, torch.randn(4, 2), mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0),
                                    lr=torch.tensor(0.02, requires_grad=True), factor=2,
                                    zca_state={"mean": torch.randn(48), "inverse_matrix": torch.eye(48)})
    loaded = SyntheticSet.load(syn.save(tmp_path / "syn.pt"))
    _assert_same(loaded, syn)
    assert loaded.is_soft and not loaded.images.requires_grad
    assert isinstance(loaded.lr, torch.Tensor) and torch.equal(loaded.lr, syn.lr.detach())
    assert torch.equal(loaded.zca_state["inverse_matrix"], torch.eye(48))


def test_soft_labels_peaking_at_another_class_keep_each_images_class(tmp_path):
    """A teacher's soft label can peak at another class (TESLA's ankle boot read as a sandal):
    the set's images per class, its grid rows and its hard labels must follow the class each
    image was made for, which `image_classes` records and a save keeps."""
    soft = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 5.0, 1.0]])  # image 2 peaks at class 1
    syn = SyntheticSet.from_tensors(torch.randn(3, 1, 2, 2), soft, mean=MEAN, std=STD, image_classes=[0, 1, 2])
    assert syn.ipc == 1 and syn.class_counts().tolist() == [1, 1, 1] and syn.hard_labels.tolist() == [0, 1, 2]
    loaded = SyntheticSet.load(syn.save(tmp_path / "syn.pt"))
    assert loaded.hard_labels.tolist() == [0, 1, 2] and loaded.ipc == 1
    assert SyntheticSet.from_tensors(syn.images, soft, mean=MEAN, std=STD).ipc == 2  # argmax alone: 1, 1, 0


def test_a_distilled_soft_set_saved_before_image_classes_gets_them_from_its_ipc(tmp_path):
    soft = torch.tensor([[0.0, 5.0], [0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])  # argmax 1, 1, 0, 1
    content = SyntheticSet.from_tensors(torch.randn(4, 1, 2, 2), soft, mean=MEAN, std=STD,
                                        meta={"method": "tesla", "ipc": 2}).to_dict()
    del content["image_classes"]
    assert SyntheticSet.from_dict(content).hard_labels.tolist() == [0, 0, 1, 1]
    content["meta"] = {"ipc": 2}  # not from distill: no layout to rely on
    assert SyntheticSet.from_dict(content).hard_labels.tolist() == [1, 1, 0, 1]


def test_save_refuses_metadata_that_weights_only_cannot_read(tmp_path):
    syn = _hard_set(meta={"options": {"net": object()}})
    with pytest.raises(TypeError, match=r"meta\['options'\]\['net'\]"):
        syn.save(tmp_path / "syn.pt")
    assert not os.path.exists(tmp_path / "syn.pt")


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        SyntheticSet.load(tmp_path / "nothing.pt")

    truncated = tmp_path / "truncated.pt"
    _hard_set().save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated.pt"):
        SyntheticSet.load(truncated)

    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(ValueError, match="random.pt"):
        SyntheticSet.load(random_bytes)

    other_dict = tmp_path / "other.pt"
    torch.save({"images": torch.zeros(1, 1, 2, 2), "labels": torch.zeros(1)}, other_dict)
    with pytest.raises(ValueError, match="other.pt is not a condense-engine file"):
        SyntheticSet.load(other_dict)

    checkpoint_file = tmp_path / "ckpt.pt"
    synset_module.atomic_save({"format": "condense-engine/checkpoint", "format_version": 1}, checkpoint_file)
    with pytest.raises(ValueError, match="ckpt.pt holds a 'condense-engine/checkpoint' file"):
        SyntheticSet.load(checkpoint_file)


def test_load_refuses_a_newer_format_version(tmp_path):
    content = _hard_set().to_dict()
    content["format_version"] = synset_module.FORMAT_VERSION + 1
    torch.save(content, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="future.pt.*version 2.*upgrade"):
        SyntheticSet.load(tmp_path / "future.pt")


def test_mtt_export_round_trip(tmp_path):
    syn = SyntheticSet.from_tensors(torch.randn(4, 1, 3, 3), torch.randn(4, 2), mean=MEAN, std=STD, lr=0.015)
    folder = syn.export_mtt(tmp_path / "run")
    assert sorted(os.listdir(folder)) == ["images_best.pt", "labels_best.pt", "lr_best.pt"]
    assert torch.load(os.path.join(folder, "lr_best.pt"), weights_only=True).dim() == 0
    loaded = SyntheticSet.from_mtt(folder, mean=MEAN, std=STD)
    assert torch.equal(loaded.images, syn.images) and torch.equal(loaded.labels, syn.labels)
    assert loaded.lr == pytest.approx(0.015)

    _hard_set().export_mtt(folder)  # no lr: the stale lr_best.pt goes
    assert SyntheticSet.from_mtt(folder, mean=MEAN, std=STD).lr is None


def test_mtt_export_writes_the_materialised_images(tmp_path):
    syn = SyntheticSet.from_tensors(torch.randn(2, 1, 4, 4), torch.tensor([0, 1]), mean=MEAN, std=STD, factor=2)
    loaded = SyntheticSet.from_mtt(syn.export_mtt(tmp_path), mean=MEAN, std=STD)
    images, labels = syn.materialize()
    assert torch.equal(loaded.images, images) and torch.equal(loaded.labels, labels)


def test_from_mtt_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="images_best.pt"):
        SyntheticSet.from_mtt(tmp_path, mean=MEAN, std=STD)
    torch.save(torch.zeros(2, 1, 2, 2), tmp_path / "images_best.pt")
    torch.save({"not": "a tensor"}, tmp_path / "labels_best.pt")
    with pytest.raises(ValueError, match="labels_best.pt should hold a tensor"):
        SyntheticSet.from_mtt(tmp_path, mean=MEAN, std=STD)


def test_materialize_factor_two_tiles_upsampled_with_repeated_labels():
    # Each 4×4 stored image holds four constant 2×2 quadrants; decoded tiles are then constant.
    quadrant_values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, -2.0, -3.0, -4.0]])
    images = torch.zeros(2, 1, 4, 4)
    for index, (a, b, c, d) in enumerate(quadrant_values.tolist()):
        images[index, 0] = torch.tensor([[a, b], [c, d]]).repeat_interleave(2, 0).repeat_interleave(2, 1)
    images.requires_grad_(True)
    syn = SyntheticSet.from_tensors(images, torch.tensor([1, 0]), mean=MEAN, std=STD, factor=2)
    decoded, labels = syn.materialize()
    assert decoded.shape == (8, 1, 4, 4)
    assert labels.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    expected = quadrant_values.flatten()[:, None, None, None].expand(8, 1, 4, 4)
    assert torch.allclose(decoded, expected)
    decoded.sum().backward()
    assert torch.allclose(images.grad.sum(), torch.tensor(2 * 4 * 16.0))  # each pixel feeds 4×4 outputs


@pytest.mark.parametrize("factor", [1, 2])
def test_materialize_a_class_range_decodes_only_those_classes(factor):
    syn = SyntheticSet.from_tensors(torch.randn(6, 1, 4, 4), torch.tensor([0, 0, 1, 1, 2, 2]), mean=MEAN, std=STD,
                                    factor=factor)
    images, labels = syn.materialize()
    part, part_labels = syn.materialize(classes=(1, 3))
    per_class = 2 * factor * factor
    assert torch.equal(part, images[per_class:]) and torch.equal(part_labels, labels[per_class:])
    with pytest.raises(ValueError, match="classes"):
        syn.materialize(classes=(2, 4))


def test_materialize_pads_with_grey_when_size_is_not_divisible():
    mean, std = (0.2,), (0.25,)
    syn = SyntheticSet.from_tensors(torch.full((1, 1, 3, 3), 7.0), torch.tensor([0]), mean=mean, std=std, factor=2)
    decoded, _ = syn.materialize()
    grey = (0.5 - mean[0]) / std[0]  # mid-grey pixel 0.5 in network space, as IDC pads in pixel space
    assert decoded.shape == (4, 1, 3, 3)
    assert torch.allclose(decoded[0], torch.full((1, 3, 3), 7.0))  # top-left tile is all image
    bottom_right = decoded[3, 0]  # its 2×2 tile is [[7, grey], [grey, grey]]
    assert bottom_right[0, 0] == pytest.approx(7.0) and bottom_right[2, 2] == pytest.approx(grey)


def test_materialize_factor_one_returns_the_stored_tensors():
    syn = _hard_set()
    images, labels = syn.materialize()
    assert images is syn.images and labels is syn.labels


def test_clone_is_independent_and_detached():
    syn = SyntheticSet.from_tensors(torch.zeros(2, 1, 2, 2, requires_grad=True), torch.tensor([0, 1]),
                                    mean=MEAN, std=STD, meta={"options": {"a": 1}})
    copy = syn.clone()
    copy.images += 1
    copy.meta["options"]["a"] = 2
    assert syn.images.abs().sum() == 0 and syn.meta["options"]["a"] == 1
    assert not copy.images.requires_grad and not syn.detach().images.requires_grad
    assert syn.to("cpu").images.device.type == "cpu"


def _read_png(path):
    with Image.open(path) as image:
        return image.mode, np.array(image)


def test_save_grid_layout_and_denormalised_pixels(tmp_path):
    # Class 0 has images at positions 1 and 2, class 1 at 0 and 3: rows must follow class order.
    height, width = 3, 4
    # Network-space values; pixels = v·0.25 + 0.5 → 0.5, 0 (clamped), 1 (clamped), 0.75.
    values = torch.tensor([0.0, -2.0, 2.0, 1.0])
    images = values[:, None, None, None].expand(4, 1, height, width).clone()
    syn = SyntheticSet.from_tensors(images, torch.tensor([1, 0, 0, 1]), mean=MEAN, std=STD)
    mode, grid = _read_png(syn.save_grid(tmp_path / "grid.png"))
    assert mode == "L"
    assert grid.shape == (2 * (height + 2) + 2, 2 * (width + 2) + 2)
    expected = {(0, 0): 0, (0, 1): 255, (1, 0): 128, (1, 1): 191}
    for (row, column), pixel in expected.items():
        top, left = 2 + row * (height + 2), 2 + column * (width + 2)
        assert (grid[top:top + height, left:left + width] == pixel).all(), (row, column)
    assert grid[:2].max() == 0 and grid[:, :2].max() == 0 and grid[2 + height:4 + height].max() == 0


def test_save_grid_colour_soft_labels_max_per_class_and_zca(tmp_path):
    images = torch.zeros(3, 3, 2, 2)
    images[:, 1] = 1.0  # green channel up
    soft = torch.tensor([[0.0, 5.0], [4.0, 0.0], [0.0, 3.0]])  # argmax: 1, 0, 1
    syn = SyntheticSet.from_tensors(images, soft, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    mode, grid = _read_png(syn.save_grid(tmp_path / "soft.png", max_per_class=1))
    assert mode == "RGB" and grid.shape == (2 * 4 + 2, 1 * 4 + 2, 3)
    assert (grid[2:4, 2:4] == [0, 255, 0]).all() and (grid[6:8, 2:4] == [0, 255, 0]).all()

    class HalveInverse:
        def inverse(self, x):
            return x * 0.5

    _, halved = _read_png(syn.save_grid(tmp_path / "zca.png", zca=HalveInverse()))
    assert (halved[2:4, 2:4] == [0, 128, 0]).all()
    with_zca = SyntheticSet.from_tensors(images, soft, mean=(0.0,) * 3, std=(1.0,) * 3, zca=HalveInverse())
    _, halved_by_set = _read_png(with_zca.save_grid(tmp_path / "set_zca.png"))
    assert (halved_by_set == halved).all()
    assert "zca" not in with_zca.to_dict()

    syn.zca_state = {"mean": torch.full((12,), 0.25), "inverse_matrix": torch.zeros(12, 12)}
    _, from_state = _read_png(syn.save_grid(tmp_path / "state.png"))
    assert (from_state[2:4, 2:4] == [64, 64, 64]).all()
