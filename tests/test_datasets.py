"""Readers of every supported format, on the real MNIST/Fashion-MNIST files and on small files
written here in each official format, including corrupt ones and wrong layouts."""
import errno
import fcntl
import gzip
import os
import pickle
import struct
import tarfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import condense_engine.datasets as ds
from condense_engine.datasets import DatasetError, embedded
from condense_engine.datasets import images as images_module

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ----------------------------------------------------------------------------- writers

def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder, split="test", count=12, compress=True, seed=0):
    """Official-name IDX files for one split; returns (images, labels)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = np.arange(count, dtype=np.uint8) % 10
    prefix = "train" if split == "train" else "t10k"
    folder.mkdir(parents=True, exist_ok=True)
    for kind, dims, array in (("images", 3, images), ("labels", 1, labels)):
        name = folder / f"{prefix}-{kind}-idx{dims}-ubyte"
        data = idx_bytes(array)
        if compress:
            (folder / (name.name + ".gz")).write_bytes(gzip.compress(data))
        else:
            name.write_bytes(data)
    return images, labels


def cifar_batch(count, num_classes, seed, labels_key="labels"):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
    return {"batch_label": "testing batch", labels_key: [int(v) for v in rng.integers(0, num_classes, count)],
            "data": data, "filenames": [f"img_{i}.png" for i in range(count)]}


def write_cifar10(root, per_batch=3):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {f"data_batch_{i}": cifar_batch(per_batch, 10, i) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(per_batch, 10, 9)
    batches["batches.meta"] = {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}
    for name, content in batches.items():
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
    return folder, batches


def write_cifar100(root, count=5):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    contents = {"train": cifar_batch(count, 100, 1, "fine_labels"),
                "test": cifar_batch(count, 100, 2, "fine_labels"),
                "meta": {"fine_label_names": [f"fine{i}" for i in range(100)],
                         "coarse_label_names": [f"coarse{i}" for i in range(20)]}}
    for name, content in contents.items():
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
    return folder, contents


def make_tar(folder, archive):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def save_image(path, color, size=(64, 64), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size[1], size[0]), color).save(path)


def write_tiny(root, classes=("n02", "n01", "n03"), per_class=2):
    base = root / "tiny-imagenet-200"
    for number, wnid in enumerate(classes):
        for i in range(per_class):
            save_image(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", (40 * number, 100, 200))
    (base / "wnids.txt").write_text("n02\n")  # cut down, as in the public copy: must be ignored
    lines = []
    for i, wnid in enumerate(["n03", "n01", "n01", "n02"]):
        save_image(base / "val" / "images" / f"val_{i}.JPEG", (0, 0, 0))
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


# ----------------------------------------------------------------------------- real data

def test_real_mnist_shapes_counts_and_constants(shared_data):
    train = ds.load("mnist", os.path.join(shared_data, "mnist"), "train")
    test = ds.load("MNIST", os.path.join(shared_data, "mnist"), split="test")
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert test.class_counts().tolist() == MNIST_TEST_COUNTS
    assert train.class_counts().sum() == 60000
    assert (train.mean, train.std) == ((0.1307,), (0.3081,))
    assert train.classes == [str(d) for d in range(10)] and train.name == "mnist"


def test_real_fashion_mnist_is_balanced(shared_data):
    root = os.path.join(shared_data, "fashion-mnist")
    train = ds.load("fashionmnist", root, "train")
    test = ds.load("Fashion-MNIST", root, "test")
    assert train.class_counts().tolist() == [6000] * 10
    assert test.class_counts().tolist() == [1000] * 10
    assert (train.mean, train.std) == ((0.2861,), (0.3530,))
    assert train.classes[0] == "T-shirt/top" and train.name == "fashion-mnist"


def test_real_md5_verify_passes(shared_data):
    for name in ("mnist", "fashion-mnist"):
        report = ds.verify(name, os.path.join(shared_data, name))
        assert report["ok"] and len(report["files"]) == 4
        assert all(entry["status"] == "ok" for entry in report["files"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds.load("mnist", os.path.join(shared_data, "mnist"), "test", verify=True)


def test_real_files_found_under_raw(shared_data, tmp_path):
    (tmp_path / "raw").symlink_to(os.path.join(shared_data, "mnist"))
    assert ds.load("mnist", tmp_path, "test").class_counts().tolist() == MNIST_TEST_COUNTS


# ----------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("compress", [True, False])
def test_idx_raw_and_gz_load_the_written_pixels(tmp_path, compress):
    images, labels = write_mnist(tmp_path, compress=compress)
    loaded = ds.load("mnist", tmp_path, "test")
    assert torch.equal(loaded.images[:, 0], torch.from_numpy(images))
    assert loaded.labels.tolist() == labels.tolist()


def test_idx_bad_magic_names_the_file(tmp_path):
    write_mnist(tmp_path, compress=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    data[3] = 1
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte: bad IDX magic 0x00000801; expected 0x00000803"):
        ds.load("mnist", tmp_path, "test")


def test_idx_truncated_file_is_a_size_mismatch(tmp_path):
    write_mnist(tmp_path, compress=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte: size mismatch"):
        ds.load("mnist", tmp_path, "test")


def test_idx_broken_gzip_names_the_file(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz: corrupt gzip"):
        ds.load("mnist", tmp_path, "test")
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz: not a gzip file"):
        ds.load("mnist", tmp_path, "test")


def test_idx_count_mismatch_and_label_range(tmp_path):
    write_mnist(tmp_path, count=12)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(11, np.uint8))))
    with pytest.raises(DatasetError, match="12 images but .*t10k-labels-idx1-ubyte.gz holds 11 labels"):
        ds.load("mnist", tmp_path, "test")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(12, 10, np.uint8))))
    with pytest.raises(DatasetError, match="label 10 out of range"):
        ds.load("mnist", tmp_path, "test")


def test_idx_missing_files_say_where_they_were_looked_for(tmp_path):
    write_mnist(tmp_path, split="test")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
        ds.load("mnist", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ds.load("fashion-mnist", tmp_path / "nowhere", "test")


def test_verify_flags_non_official_files(tmp_path):
    write_mnist(tmp_path)
    with pytest.raises(DatasetError, match="checksum mismatch: .*t10k-images-idx3-ubyte.gz: md5"):
        ds.load("mnist", tmp_path, "test", verify=True)
    report = ds.verify("mnist", tmp_path)
    statuses = {os.path.basename(entry["path"]): entry["status"] for entry in report["files"]}
    assert not report["ok"] and statuses["t10k-images-idx3-ubyte.gz"] == "mismatch"
    assert "missing" in statuses.values()


def test_verify_warns_for_raw_idx_without_official_md5(tmp_path):
    write_mnist(tmp_path, compress=False)
    with pytest.warns(UserWarning, match="no official checksum"):
        ds.load("mnist", tmp_path, "test", verify=True)


# ----------------------------------------------------------------------------- CIFAR

def test_cifar10_folder_layout_and_pixel_order(tmp_path):
    folder, batches = write_cifar10(tmp_path)
    batches["data_batch_1"]["data"][0, 1024 + 32 * 5 + 7] = 7
    (folder / "data_batch_1").write_bytes(pickle.dumps(batches["data_batch_1"], protocol=2))
    train = ds.load("cifar10", tmp_path, "train")
    test = ds.load("cifar-10", folder, "test")
    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert train.images[0, 1, 5, 7] == 7
    expected = sum((batches[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])
    assert train.labels.tolist() == expected
    assert train.classes == [f"class{i}" for i in range(10)]
    assert train.mean == (0.4914, 0.4822, 0.4465) and train.std == (0.2023, 0.1994, 0.2010)


def test_cifar10_tar_matches_folder_and_checks_md5(tmp_path):
    folder, _ = write_cifar10(tmp_path / "unpacked")
    archive = make_tar(folder, tmp_path / "cifar-10-python.tar.gz")
    from_tar = ds.load("cifar10", tmp_path, "train")
    from_folder = ds.load("cifar10", tmp_path / "unpacked", "train")
    assert torch.equal(from_tar.images, from_folder.images)
    assert torch.equal(ds.load("cifar10", archive, "test").labels, ds.load("cifar10", folder, "test").labels)
    with pytest.raises(DatasetError, match="cifar-10-python.tar.gz: md5 .*expected c58f30108f718f92721af3b95e74349a"):
        ds.load("cifar10", archive, "train", verify=True)


def test_cifar_reads_python2_module_path_of_numpy(tmp_path):
    folder, _ = write_cifar10(tmp_path)
    path = folder / "test_batch"
    path.write_bytes(path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert ds.load("cifar10", tmp_path, "test").images.shape == (3, 3, 32, 32)


class _Sneaky:
    def __reduce__(self):
        return (os.getpid, ())


def test_cifar_refuses_pickles_that_name_other_globals(tmp_path):
    folder, batches = write_cifar10(tmp_path)
    batches["test_batch"]["payload"] = _Sneaky()
    (folder / "test_batch").write_bytes(pickle.dumps(batches["test_batch"], protocol=2))
    with pytest.raises(DatasetError, match=r"test_batch: broken pickle .*forbidden global posix.getpid"):
        ds.load("cifar10", tmp_path, "test")


def test_cifar_broken_files_and_layouts(tmp_path):
    folder, batches = write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps(batches["test_batch"], protocol=2)[:-50])
    with pytest.raises(DatasetError, match="test_batch: broken pickle"):
        ds.load("cifar10", tmp_path, "test")
    batches["test_batch"]["labels"].append(1)
    (folder / "test_batch").write_bytes(pickle.dumps(batches["test_batch"], protocol=2))
    with pytest.raises(DatasetError, match="test_batch: 3 images but 4 labels"):
        ds.load("cifar10", tmp_path, "test")
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        ds.load("cifar10", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="expected the folder cifar-10-batches-py"):
        ds.load("cifar10", tmp_path / "elsewhere", "test")


def test_cifar_truncated_archive(tmp_path):
    folder, _ = write_cifar10(tmp_path / "unpacked")
    archive = make_tar(folder, tmp_path / "cifar-10-python.tar.gz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DatasetError, match="cifar-10-python.tar.gz: corrupt or truncated archive"):
        ds.load("cifar10", archive, "train")


def test_cifar100_folder_and_tar(tmp_path):
    folder, contents = write_cifar100(tmp_path / "unpacked")
    train = ds.load("cifar100", folder.parent, "train")
    assert train.images.shape == (5, 3, 32, 32) and train.num_classes == 100
    assert train.labels.tolist() == contents["train"]["fine_labels"]
    assert train.mean == (0.5071, 0.4866, 0.4409)
    archive = make_tar(folder, tmp_path / "cifar-100-python.tar.gz")
    assert torch.equal(ds.load("cifar100", archive, "test").images, ds.load("cifar100", folder, "test").images)


# ----------------------------------------------------------------------------- SVHN

def write_svhn(path, count=6):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 32, 3, count), dtype=np.uint8)
    labels = (np.arange(count) % 10 + 1).reshape(-1, 1).astype(np.uint8)
    scipy.io.savemat(path, {"X": pixels, "y": labels})
    return pixels, labels


def test_svhn_mat_layout_and_label_ten_is_zero(tmp_path):
    pixels, labels = write_svhn(tmp_path / "train_32x32.mat", count=12)
    dataset = ds.load("svhn", tmp_path, "train")
    assert dataset.images.shape == (12, 3, 32, 32)
    assert dataset.images[3, 2, 5, 7] == pixels[5, 7, 2, 3]
    assert dataset.labels.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]
    assert dataset.mean == (0.4377, 0.4438, 0.4728)


def test_svhn_corrupt_and_wrong_files(tmp_path):
    path = tmp_path / "test_32x32.mat"
    write_svhn(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DatasetError, match="test_32x32.mat: unreadable .mat"):
        ds.load("svhn", tmp_path, "test")
    scipy.io.savemat(path, {"images": np.zeros((2, 2))})
    with pytest.raises(DatasetError, match=r"test_32x32.mat: variables \['images'\]; expected"):
        ds.load("svhn", tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="train_32x32.mat"):
        ds.load("svhn", tmp_path, "train")
    with pytest.raises(DatasetError, match="eb5a983be6a315427106f1b164d9cef3"):
        write_svhn(path)
        ds.load("svhn", tmp_path, "test", verify=True)


# ----------------------------------------------------------------------------- TinyImageNet

def test_tiny_imagenet_classes_labels_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDENSE_CACHE", str(tmp_path / "cache"))
    base = write_tiny(tmp_path)
    train = ds.load("tiny-imagenet", tmp_path, "train")
    assert train.classes == ["n01", "n02", "n03"]
    assert train.images.shape == (6, 3, 64, 64) and train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    first = train.images[train.labels == 1][0].float().mean(dim=(1, 2))
    assert torch.allclose(first, torch.tensor([0.0, 100.0, 200.0]), atol=3)
    test = ds.load("tinyimagenet", base, "val")
    assert test.split == "test" and test.labels.tolist() == [2, 0, 0, 1]
    assert test.mean == (0.485, 0.456, 0.406)
    assert len(list((tmp_path / "cache").glob("tinyimagenet-train-*.npy"))) == 1
    (base / "train" / "n01" / "images" / "n01_0.JPEG").write_bytes(b"garbage")
    assert torch.equal(ds.load("tinyimagenet", base, "train").images, train.images)
    with pytest.raises(DatasetError, match="n01_0.JPEG: unreadable image"):
        ds.load("tinyimagenet", base, "train", cache=False)


def test_tiny_imagenet_cache_is_mapped_and_private(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDENSE_CACHE", str(tmp_path / "cache"))
    base = write_tiny(tmp_path)
    decoded = ds.load("tinyimagenet", base, "train", cache=False).images
    first = ds.load("tinyimagenet", base, "train").images
    cache_file, = (tmp_path / "cache").glob("tinyimagenet-train-*.npy")
    with open("/proc/self/maps") as maps:
        mapped = [line for line in maps if line.rstrip().endswith(str(cache_file))]
    assert mapped, "the cached images should be a map of the cache file, not a copy"
    assert torch.equal(first, decoded)
    first.zero_()  # copy-on-write: the file and a later load keep the decoded pixels
    assert torch.equal(ds.load("tinyimagenet", base, "train").images, decoded)


@pytest.mark.parametrize("damage", ["truncate", "wrong shape", "garbage"])
def test_tiny_imagenet_damaged_cache_is_rebuilt(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("CONDENSE_CACHE", str(tmp_path / "cache"))
    base = write_tiny(tmp_path)
    decoded = ds.load("tinyimagenet", base, "train").images.clone()
    cache_file, = (tmp_path / "cache").glob("tinyimagenet-train-*.npy")
    if damage == "truncate":
        cache_file.write_bytes(cache_file.read_bytes()[:-100])
    elif damage == "wrong shape":
        np.save(cache_file, np.zeros((5, 3, 64, 64), np.uint8))
    else:
        cache_file.write_bytes(b"not an array")
    with pytest.warns(UserWarning, match="cache"):
        assert torch.equal(ds.load("tinyimagenet", base, "train").images, decoded)
    assert np.load(cache_file).shape == tuple(decoded.shape)  # rewritten


def test_tiny_imagenet_bad_trees(tmp_path):
    base = write_tiny(tmp_path, per_class=1)
    save_image(base / "train" / "n01" / "images" / "n01_0.JPEG", (1, 2, 3), size=(32, 32))
    with pytest.raises(DatasetError, match="n01_0.JPEG: image is 32×32; expected 64×64"):
        ds.load("tinyimagenet", base, "train", cache=False)
    annotations = base / "val" / "val_annotations.txt"
    annotations.write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DatasetError, match="val_annotations.txt:1: .*n99"):
        ds.load("tinyimagenet", base, "test", cache=False)
    annotations.unlink()
    with pytest.raises(FileNotFoundError, match="val_annotations.txt"):
        ds.load("tinyimagenet", base, "test", cache=False)
    with pytest.raises(FileNotFoundError, match="no tiny-imagenet-200 tree"):
        ds.load("tinyimagenet", tmp_path / "empty", "train")


# ----------------------------------------------------------------------------- ImageFolder

def test_imagefolder_with_split_folders_and_computed_stats(tmp_path):
    save_image(tmp_path / "train" / "dog" / "a.png", (10, 20, 30), size=(6, 5))
    save_image(tmp_path / "train" / "cat" / "b.png", (50, 60, 70), size=(6, 5))
    save_image(tmp_path / "train" / "cat" / "sub" / "c.PNG", (90, 100, 110), size=(6, 5))
    dataset = ds.load("imagefolder", tmp_path, "train")
    assert dataset.classes == ["cat", "dog"] and dataset.labels.tolist() == [0, 0, 1]
    assert dataset.images.shape == (3, 3, 6, 5)
    assert dataset.images[2, :, 0, 0].tolist() == [10, 20, 30]
    assert dataset.mean == pytest.approx([50 / 255, 60 / 255, 70 / 255])
    assert dataset.std[0] == pytest.approx(np.std([10, 50, 90]) / 255)
    (tmp_path / "train" / "dog" / "gone.png").symlink_to(tmp_path / "nowhere.png")  # dangling: not an image
    (tmp_path / "train" / "dog" / "folder.png").mkdir()
    assert torch.equal(ds.load("imagefolder", tmp_path, "train", cache=False).images, dataset.images)


def test_imagefolder_without_split_mixed_modes_and_resize(tmp_path):
    save_image(tmp_path / "a" / "1.png", 128, size=(4, 4), mode="L")
    save_image(tmp_path / "b" / "2.png", (1, 2, 3), size=(8, 8))
    with pytest.raises(DatasetError, match=r"2.png: image is 8×8 .* pass size=\(H, W\)"):
        ds.load("imagefolder", tmp_path, "train")
    dataset = ds.load("image-folder", tmp_path, size=(4, 4))
    assert dataset.images.shape == (2, 3, 4, 4)
    assert dataset.images[0, :, 0, 0].tolist() == [128, 128, 128]
    assert dataset.images[1, :, 2, 2].tolist() == [1, 2, 3]


def test_imagefolder_errors(tmp_path):
    save_image(tmp_path / "train" / "a" / "1.png", 5, size=(4, 4), mode="L")
    with pytest.raises(FileNotFoundError, match=r"split folders \['train'\], expected one named 'test'"):
        ds.load("imagefolder", tmp_path, "test")
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match="broken.png: unreadable image"):
        ds.load("imagefolder", tmp_path, "train")
    (tmp_path / "train" / "b" / "broken.png").unlink()
    with pytest.raises(DatasetError, match="no image files"):
        ds.load("imagefolder", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="missing"):
        ds.load("imagefolder", tmp_path / "missing")
    with pytest.raises(DatasetError, match="size= does not apply to data set 'mnist'"):
        ds.load("mnist", tmp_path, size=(4, 4))


def test_imagefolder_cache_follows_the_files_and_size(tmp_path, monkeypatch):
    save_image(tmp_path / "tree" / "a" / "1.png", (1, 2, 3), size=(4, 4))
    save_image(tmp_path / "tree" / "b" / "2.png", (4, 5, 6), size=(4, 4))
    decodes = counting_decodes(monkeypatch)
    first = ds.load("imagefolder", tmp_path / "tree")
    assert torch.equal(ds.load("imagefolder", tmp_path / "tree").images, first.images) and decodes() == 1
    resized = ds.load("imagefolder", tmp_path / "tree", size=(2, 2))
    assert resized.images.shape == (2, 3, 2, 2) and decodes() == 2
    save_image(tmp_path / "tree" / "b" / "2.png", (7, 8, 9), size=(4, 4))
    os.utime(tmp_path / "tree" / "b" / "2.png", ns=(1, 1))  # a new modification time, even on a coarse clock
    assert ds.load("imagefolder", tmp_path / "tree").images[1, :, 0, 0].tolist() == [7, 8, 9]
    assert decodes() == 3
    cache = Path(os.environ["CONDENSE_CACHE"])
    assert len(list(cache.glob("imagefolder-*.npy"))) == 2  # the edit replaced its tree's file: one per size
    ds.load("imagefolder", tmp_path / "tree", cache=False)
    assert decodes() == 4


def test_loads_at_once_decode_once(tmp_path, monkeypatch):
    """Ranks loading one set together take turns on the cache: one decodes, the others map it."""
    base = write_tiny(tmp_path)
    decodes = counting_decodes(monkeypatch, seconds=0.3)
    with ThreadPoolExecutor(3) as pool:
        loaded = list(pool.map(lambda _: ds.load("tinyimagenet", base).images, range(3)))
    assert decodes() == 1
    assert all(torch.equal(images, loaded[0]) for images in loaded)


def test_unwritable_cache_folder_still_loads(tmp_path, monkeypatch):
    base = write_tiny(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("CONDENSE_CACHE", str(tmp_path / "a-file" / "cache"))
    with pytest.warns(UserWarning, match="could not write the decode cache"):
        loaded = ds.load("tinyimagenet", base)
    assert torch.equal(loaded.images, ds.load("tinyimagenet", base, cache=False).images)


def test_a_cache_too_large_to_map_copy_on_write_is_mapped_read_only(tmp_path, monkeypatch):
    base = write_tiny(tmp_path)
    decoded = ds.load("tinyimagenet", base).images.clone()
    load = np.load

    def refuse_private_maps(*args, mmap_mode=None, **kwargs):
        if mmap_mode == "c":
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return load(*args, mmap_mode=mmap_mode, **kwargs)
    monkeypatch.setattr(np, "load", refuse_private_maps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = ds.load("tinyimagenet", base).images
    assert [str(w.message) for w in caught if "mapped read-only" in str(w.message)]
    assert not any("not writable" in str(w.message) for w in caught)
    assert torch.equal(images, decoded)
    cache_file, = Path(os.environ["CONDENSE_CACHE"]).glob("tinyimagenet-train-*.npy")
    with open("/proc/self/maps") as maps:
        permissions = {line.split()[1] for line in maps if line.rstrip().endswith(str(cache_file))}
    assert "r--s" in permissions  # a shared read-only map (copy-on-write ones read rw-p)


def test_a_file_system_without_locks_still_loads(tmp_path, monkeypatch):
    base = write_tiny(tmp_path)

    def no_locks(handle, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="loading without the lock"):
        first = ds.load("tinyimagenet", base).images
    with pytest.warns(UserWarning, match="loading without the lock"):
        assert torch.equal(ds.load("tinyimagenet", base).images, first)


def counting_decodes(monkeypatch, seconds=0.0):
    """Count calls of the image decoder (each sleeping `seconds`, to overlap concurrent loads)."""
    calls = []
    decode = images_module.decode_images

    def counted(*args, **kwargs):
        calls.append(1)
        time.sleep(seconds)
        return decode(*args, **kwargs)
    monkeypatch.setattr(images_module, "decode_images", counted)
    return lambda: len(calls)


# ----------------------------------------------------------------------------- npz / tensors

def test_npz_channels_last_classes_and_split_keys(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 5, 4, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "plain.npz", images=images, labels=labels, classes=np.array(["x", "y", "z"]))
    dataset = ds.load("npz", tmp_path / "plain.npz")
    assert dataset.images.shape == (6, 3, 5, 4) and dataset.classes == ["x", "y", "z"]
    assert torch.equal(dataset.images, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert dataset.mean == pytest.approx((images / 255.0).mean(axis=(0, 1, 2)))
    np.savez(tmp_path / "split.npz", train_images=images.transpose(0, 3, 1, 2), train_labels=labels,
             test_images=images[:2].transpose(0, 3, 1, 2), test_labels=labels[:2])
    assert len(ds.load("npz", tmp_path / "split.npz", "test")) == 2
    with pytest.raises(DatasetError, match=r"split.npz: no arrays for split 'val' \(keys: \['test_images'"):
        ds.load("npz", tmp_path / "split.npz", "val")


def test_npz_corrupt_mismatched_and_missing(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((3, 1, 2, 2), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(DatasetError, match="bad.npz: 3 images but 2 labels"):
        ds.load("npz", path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetError, match="bad.npz: unreadable .npz"):
        ds.load("npz", path)
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        ds.load("npz", tmp_path / "absent.npz")


def test_tensors_file(tmp_path):
    images = torch.randint(0, 256, (4, 1, 3, 3), dtype=torch.uint8)
    torch.save({"images": images, "labels": torch.tensor([1, 0, 1, 0]), "classes": ["a", "b"]},
               tmp_path / "set.pt")
    dataset = ds.load("tensors", tmp_path / "set.pt")
    assert torch.equal(dataset.images, images) and dataset.classes == ["a", "b"]
    torch.save([images], tmp_path / "list.pt")
    with pytest.raises(DatasetError, match="list.pt: holds a list"):
        ds.load("tensors", tmp_path / "list.pt")
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DatasetError, match="broken.pt: unreadable tensor file"):
        ds.load("pt", tmp_path / "broken.pt")


# ----------------------------------------------------------------------------- in-memory sources

def test_from_tensors_value_conventions():
    pixels = torch.rand(8, 3, 4, 4)
    labels = torch.arange(8) % 2
    from_unit = ds.from_tensors(pixels, labels)
    assert from_unit.images.dtype == torch.float32
    assert torch.allclose(from_unit.pixels01(), pixels, atol=1e-6)
    assert torch.allclose(from_unit.images.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    already = ds.from_tensors(pixels * 4 - 2, labels, mean=0.5, std=0.25)
    assert torch.equal(already.images, pixels * 4 - 2) and already.std == (0.25,) * 3
    raw = ds.from_tensors((pixels * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy(), labels.numpy())
    assert raw.images.dtype == torch.uint8 and raw.images.shape == (8, 3, 4, 4)
    assert raw.classes == ["0", "1"]


def test_from_tensors_rejects_bad_labels():
    with pytest.raises(DatasetError, match="4 images but 3 labels"):
        ds.from_tensors(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(DatasetError, match="negative label"):
        ds.from_tensors(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, -1]))
    with pytest.raises(DatasetError, match="label 2 but only 2 class names"):
        ds.from_tensors(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 2]), classes=["a", "b"])


class _PairDataset(torch.utils.data.Dataset):
    classes = ["zero", "one"]

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], index % 2


def test_from_torch_dataset_tensors_and_pil():
    tensors = [torch.rand(3, 4, 4) for _ in range(4)]
    dataset = ds.from_torch_dataset(_PairDataset(tensors))
    assert dataset.classes == ["zero", "one"] and dataset.labels.tolist() == [0, 1, 0, 1]
    assert torch.allclose(dataset.pixels01(), torch.stack(tensors), atol=1e-6)
    pil = ds.from_torch_dataset(_PairDataset([Image.new("L", (4, 3), 9) for _ in range(2)]))
    assert pil.images.dtype == torch.uint8 and pil.images.shape == (2, 1, 3, 4)
    with pytest.raises(DatasetError, match="item 1: image"):
        ds.from_torch_dataset(_PairDataset([torch.rand(3, 4, 4), torch.rand(3, 5, 5)]))


# ----------------------------------------------------------------------------- names, default set

def test_unknown_name_split_and_root():
    with pytest.raises(DatasetError, match="unknown data set 'imagenet-1k'; known: mnist, fashion-mnist"):
        ds.load("imagenet-1k", "/tmp")
    with pytest.raises(DatasetError, match="no split 'valid'"):
        ds.load("mnist", "/tmp", "valid")
    with pytest.raises(DatasetError, match="needs root="):
        ds.load("cifar10")
    assert set(ds.list_datasets()) >= {"mnist", "fashion-mnist", "cifar10", "cifar100", "svhn",
                                        "tinyimagenet", "imagefolder", "npz", "tensors", "default"}


def test_default_set_is_balanced_and_pinned():
    train, test = ds.load("default"), ds.load("default", split="test")
    assert train.name == "mnist-default" and train.images.shape == (5000, 1, 28, 28)
    assert train.class_counts().tolist() == [500] * 10 and test.class_counts().tolist() == [200] * 10
    assert train.mean == (0.1307,) and "first 500 training" in train.meta["provenance"]
    report = ds.verify("default")
    assert report["ok"] and [entry["status"] for entry in report["files"]] == ["ok"]
    assert len(embedded.embedded_bytes()) <= 2 * 1024 * 1024


def test_default_set_is_the_first_images_of_each_class(shared_data):
    train = ds.load("default")
    real = ds.load("mnist", os.path.join(shared_data, "mnist"), "test")
    test = ds.load("default", split="test")
    first = torch.cat([torch.nonzero(real.labels == c).flatten()[:200] for c in range(10)]).sort().values
    assert torch.equal(test.images, real.images[first]) and torch.equal(test.labels, real.labels[first])
    assert train.labels[:5].tolist() == [5, 0, 4, 1, 9]


def test_default_set_detects_a_corrupt_install(monkeypatch):
    monkeypatch.setattr(embedded, "EMBEDDED_SHA256", "0" * 64)
    with pytest.raises(DatasetError, match="mnist_default.npz: sha256 .* corrupt"):
        ds.load("default")
    assert ds.verify("default")["files"][0]["status"] == "mismatch"


def test_load_with_zca_fits_on_train_and_applies_to_test(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "set.npz", train_images=rng.integers(0, 256, (40, 1, 3, 3), dtype=np.uint8),
             train_labels=np.arange(40) % 2,
             test_images=rng.integers(0, 256, (6, 1, 3, 3), dtype=np.uint8), test_labels=np.arange(6) % 2)
    train = ds.load("npz", tmp_path / "set.npz", "train", zca=True)
    raw_test = ds.load("npz", tmp_path / "set.npz", "test")
    test = ds.load("npz", tmp_path / "set.npz", "test", zca=train.zca)
    assert train.images.dtype == torch.float32 and test.zca is train.zca
    assert torch.allclose(test.images, train.zca.apply(raw_test.images))
    assert torch.allclose(train.zca.inverse(test.images), raw_test.images / 255.0, atol=1e-5)


def test_fingerprint_tells_data_apart_and_repeats():
    """Same data, same value; another pixel, label order or normalisation, another value."""
    images = (torch.rand(600, 1, 6, 6, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    labels = torch.arange(600) % 3
    data = ds.from_tensors(images, labels)
    assert data.fingerprint() == ds.from_tensors(images.clone(), labels.clone()).fingerprint()
    changed_pixel = images.clone()
    changed_pixel[0, 0, 0, 0] ^= 1  # the first image is always among those read
    others = [ds.from_tensors(changed_pixel, labels), ds.from_tensors(images, labels.roll(1)),
              replace(data, mean=(0.5,)), ds.from_tensors(images.float() / 255, labels)]
    assert len({data.fingerprint(), *(other.fingerprint() for other in others)}) == 1 + len(others)
