"""Expert buffers: training records every epoch, files round-trip and load lazily, an interrupted
run continues to the same result, damaged files and mismatched buffers give clear errors."""
import argparse
import datetime
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from condense_engine import distributed, expert
from condense_engine.datasets import from_tensors
from condense_engine.expert import (INDEX_FILE, add_experts_command, check_compatible, expert_file_name,
                                    load_experts, run_experts_command, train_experts)
from condense_engine.models import FunctionalConvNet
from tests.toy_data import toy_dataset

SETTINGS = dict(model="ConvNetD1", batch_size=16, device="cpu")


def _toy(name="toy", classes=4, per_class=8, size=8):
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(classes).repeat(per_class)
    images = torch.randint(0, 256, (classes * per_class, 3, size, size), dtype=torch.uint8, generator=generator)
    return from_tensors(images, labels, name=name)


def test_train_save_load_round_trip(tmp_path):
    data = _toy()
    buffer = train_experts(data, 2, 3, out=tmp_path, seed=1, **SETTINGS)
    assert sorted(os.listdir(tmp_path)) == [expert_file_name(0), expert_file_name(1), INDEX_FILE]
    loaded = load_experts(tmp_path)
    student = FunctionalConvNet(3, 4, depth=1, im_size=(8, 8))
    assert len(loaded) == 2 and loaded.num_epochs == 3
    assert loaded[0].shape == (4, student.num_params)          # epoch 0 (init) … epoch 3
    assert not torch.equal(loaded[0][0], loaded[0][1])          # training moved the weights
    assert not torch.equal(loaded[0][0], loaded[1][0])          # experts start from different inits
    meta = loaded.meta
    assert meta["dataset"] == "toy" and meta["zca"] is False and meta["model"] == "ConvNetD1"
    assert meta["image_size"] == [8, 8] and meta["num_classes"] == 4 and meta["epochs"] == 3
    assert meta["lr"] == 0.01 and meta["momentum"] == 0.0 and meta["seed"] == 1
    assert meta["augmentation"] == "color_crop_cutout_flip_scale_rotate" and "library_version" in meta
    assert loaded.network().num_params == student.num_params
    in_memory = train_experts(data, 2, 3, seed=1, **SETTINGS)
    assert all(torch.equal(in_memory[i], loaded[i]) for i in range(2))
    assert torch.equal(buffer[1], loaded[1])


def test_the_training_loss_falls_along_the_trajectory():
    data = _toy()
    without_dsa = train_experts(data, 1, 4, dsa=False, seed=3, **SETTINGS)
    assert without_dsa.meta["augmentation"] is None
    student = without_dsa.network()
    trajectory = without_dsa[0]
    images, labels = data.normalized(), data.labels
    losses = [torch.nn.functional.cross_entropy(student.forward(images, params), labels) for params in trajectory]
    assert losses[-1] < losses[0]


def test_loading_is_lazy_and_a_truncated_expert_gives_a_clear_error(tmp_path):
    train_experts(_toy(), 2, 2, out=tmp_path, **SETTINGS)
    damaged = tmp_path / expert_file_name(1)
    damaged.write_bytes(damaged.read_bytes()[:200])
    buffer = load_experts(tmp_path)        # the index alone: the damaged file is not read yet
    assert len(buffer) == 2
    assert buffer[0].shape[0] == 3
    with pytest.raises(ValueError, match=f"{expert_file_name(1)} is corrupt or truncated"):
        buffer[1]
    torch.save({"when": datetime.date(2026, 1, 1)}, damaged)  # a readable file holding a disallowed object
    with pytest.raises(ValueError, match=f"{expert_file_name(1)} is corrupt or truncated.*datetime") as raised:
        load_experts(tmp_path)[1]
    assert "weights_only" not in str(raised.value)  # not torch's advice to load it unsafely


def test_interrupted_training_continues_to_the_same_buffer(tmp_path):
    data = _toy()
    train_experts(data, 1, 2, out=tmp_path, **SETTINGS)
    first = (tmp_path / expert_file_name(0)).stat().st_mtime_ns
    continued = train_experts(data, 2, 2, out=tmp_path, **SETTINGS)
    assert (tmp_path / expert_file_name(0)).stat().st_mtime_ns == first      # not retrained
    uninterrupted = train_experts(data, 2, 2, **SETTINGS)
    assert torch.equal(continued[1], uninterrupted[1])
    with pytest.raises(ValueError, match="other settings.*lr"):
        train_experts(data, 3, 2, out=tmp_path, lr=0.1, **SETTINGS)


class _Crash(Exception):
    pass


def _crash_after_saving(monkeypatch, number: int, epoch: int) -> None:
    """Save every unfinished expert after each epoch; crash right after saving expert `number`
    at `epoch`."""
    monkeypatch.setattr(expert, "PARTIAL_EVERY_SECONDS", 0.0)
    save = expert.atomic_save

    def save_then_crash(content, path):
        save(content, path)
        if content["format"] == expert.PARTIAL_KIND and (content["number"], len(content["epoch_losses"])) == (
                number, epoch):
            raise _Crash
    monkeypatch.setattr(expert, "atomic_save", save_then_crash)


def _epochs_trained(out: str) -> list:
    """("expert(s)", "epoch/epochs") of each epoch line progress printed."""
    return [(line.split(" of ")[0], line.split(", epoch ")[1].split(":")[0]) for line in out.splitlines()
            if ", epoch " in line]


@pytest.mark.parametrize("parallel", [1, 2])
def test_an_expert_stopped_mid_training_continues_from_its_last_epoch(tmp_path, monkeypatch, capsys, parallel):
    """With momentum (whose buffer must come back too) and DSA, a run crashing after epoch 2 of
    4 continues from there, training only epochs 3 and 4, to the uninterrupted buffer."""
    data, settings = _toy(per_class=9), dict(SETTINGS, momentum=0.9)
    uninterrupted = train_experts(data, 2, 4, seed=5, parallel=parallel, **settings)
    with monkeypatch.context() as patched:
        _crash_after_saving(patched, parallel - 1, 2)
        with pytest.raises(_Crash):
            train_experts(data, 2, 4, seed=5, out=tmp_path, parallel=parallel, **settings)
    assert sorted(os.listdir(tmp_path)) == [expert.partial_file_name(n) for n in range(parallel)]
    capsys.readouterr()
    continued = train_experts(data, 2, 4, seed=5, out=tmp_path, parallel=parallel, progress=True, **settings)
    if parallel == 1:  # expert 2 had not started
        expected = [("expert 1", "3/4"), ("expert 1", "4/4")] + [("expert 2", f"{e}/4") for e in range(1, 5)]
    else:
        expected = [("experts 1, 2", "3/4"), ("experts 1, 2", "4/4")]
    assert _epochs_trained(capsys.readouterr().out) == expected
    for number in range(2):
        assert torch.equal(continued[number], uninterrupted[number])
    assert sorted(os.listdir(tmp_path)) == [expert_file_name(0), expert_file_name(1), INDEX_FILE]


def test_stopped_experts_continue_with_another_parallel_setting(tmp_path, monkeypatch, capsys):
    """Experts stopped at different epochs train in groups of the same epoch, each continuing."""
    data = _toy(per_class=9)
    uninterrupted = train_experts(data, 3, 3, seed=6, **SETTINGS)
    with monkeypatch.context() as patched:
        _crash_after_saving(patched, 0, 1)
        with pytest.raises(_Crash):  # expert 1 stops after epoch 1, experts 2 and 3 are not started
            train_experts(data, 3, 3, seed=6, out=tmp_path, **SETTINGS)
    continued = train_experts(data, 3, 3, seed=6, out=tmp_path, parallel=3, progress=True, **SETTINGS)
    assert _epochs_trained(capsys.readouterr().out) == [("expert 1", "2/3"), ("expert 1", "3/3")] + [
        ("experts 2, 3", f"{e}/3") for e in range(1, 4)]
    for number in range(3):
        torch.testing.assert_close(continued[number], uninterrupted[number], rtol=1e-4, atol=1e-5)


def test_a_damaged_or_foreign_unfinished_expert_is_reported(tmp_path, monkeypatch):
    data = _toy()
    with monkeypatch.context() as patched:
        _crash_after_saving(patched, 0, 1)
        with pytest.raises(_Crash):
            train_experts(data, 1, 2, out=tmp_path, **SETTINGS)
    partial = tmp_path / expert.partial_file_name(0)
    with pytest.raises(ValueError, match="other settings.*lr"):
        train_experts(data, 1, 2, out=tmp_path, lr=0.1, **SETTINGS)
    partial.write_bytes(partial.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"delete {partial} to train expert 0 from its start"):
        train_experts(data, 1, 2, out=tmp_path, **SETTINGS)


def test_an_expert_file_the_index_does_not_list_yet_is_kept(tmp_path):
    """A crash between writing an expert and rewriting the index (or another rank's expert)
    loses nothing: the next run lists that file instead of training the expert again; a listed
    file that was deleted is trained again."""
    data = _toy()
    train_experts(data, 2, 2, out=tmp_path, **SETTINGS)
    index = torch.load(tmp_path / INDEX_FILE, weights_only=True)
    torch.save(dict(index, experts=[expert_file_name(0)]), tmp_path / INDEX_FILE)
    written = (tmp_path / expert_file_name(1)).stat().st_mtime_ns
    resumed = train_experts(data, 3, 2, out=tmp_path, **SETTINGS)
    assert (tmp_path / expert_file_name(1)).stat().st_mtime_ns == written      # not retrained
    assert torch.load(tmp_path / INDEX_FILE, weights_only=True)["experts"] == [expert_file_name(n) for n in range(3)]
    straight = train_experts(data, 3, 2, **SETTINGS)
    assert all(torch.equal(resumed[n], straight[n]) for n in range(3))
    os.remove(tmp_path / expert_file_name(1))  # what the damaged-file error tells the user to do
    assert torch.equal(train_experts(data, 3, 2, out=tmp_path, **SETTINGS)[1], straight[1])
    train_experts(data, 1, 2, out=tmp_path / "other", lr=0.1, **SETTINGS)
    os.replace(tmp_path / "other" / expert_file_name(0), tmp_path / expert_file_name(7))
    with pytest.raises(ValueError, match="other settings.*lr"):
        train_experts(data, 4, 2, out=tmp_path, **SETTINGS)


def test_an_expert_folder_that_cannot_be_written_fails_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot write expert files to"):
        train_experts(_toy(), 1, 1, out=blocker / "buffer", **SETTINGS)


def _expert_rank(rank: int, world: int, folder: str) -> None:
    """One rank of a torchrun-like launch of train_experts (Gloo on the CPU)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        try:
            train_experts(_toy(), 3, 2, **SETTINGS)
        except ValueError as err:
            with open(os.path.join(folder, f"error-{rank}.txt"), "w", encoding="utf-8") as f:
                f.write(str(err))
        train_experts(_toy(), 3, 2, out=os.path.join(folder, "buffer"), progress=True, **SETTINGS)
        try:  # rank 0 alone reads the folder: its error reaches rank 1 too, which must not wait for it
            train_experts(_toy(), 3, 2, out=os.path.join(folder, "buffer"), **dict(SETTINGS, lr=0.1))
        except ValueError as err:
            with open(os.path.join(folder, f"settings-{rank}.txt"), "w", encoding="utf-8") as f:
                f.write(str(err))
        if rank == 1:  # as if rank 1's folder were another machine's: rank 0 never sees its expert
            expert.expert_file_name = lambda number: f"elsewhere_{number:04d}.pt"
        try:
            train_experts(_toy(), 3, 2, out=os.path.join(folder, "unshared"), **SETTINGS)
        except ValueError as err:
            with open(os.path.join(folder, f"unshared-{rank}.txt"), "w", encoding="utf-8") as f:
                f.write(str(err))
    finally:
        distributed.leave()
    distributed.exit_rank(0)  # torch's Gloo teardown is not under test


def test_ranks_share_out_the_experts_and_write_the_one_process_buffer(tmp_path, capfd):
    mp.spawn(_expert_rank, args=(2, str(tmp_path)), nprocs=2, join=True)
    printed = capfd.readouterr().out
    assert all(line in printed for line in ("rank 0: expert 1/3", "rank 1: expert 2/3", "rank 0: expert 3/3"))
    buffer, single = load_experts(tmp_path / "buffer"), train_experts(_toy(), 3, 2, **SETTINGS)
    assert len(buffer) == 3
    for number in range(3):
        torch.testing.assert_close(buffer[number], single[number], rtol=1e-5, atol=1e-6)
    for rank in range(2):
        assert "needs out=" in (tmp_path / f"error-{rank}.txt").read_text()
        assert "other settings" in (tmp_path / f"settings-{rank}.txt").read_text()
        assert "lacks experts [1]" in (tmp_path / f"unshared-{rank}.txt").read_text()


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 5e-4)])
def test_parallel_experts_follow_the_one_at_a_time_trajectories(tmp_path, momentum, weight_decay):
    """Three experts as one vmapped model (with DSA, a ragged last batch and, resuming from one
    finished expert, a group that starts mid-buffer) equal the loop up to float rounding."""
    data = _toy(per_class=9)
    settings = dict(SETTINGS, momentum=momentum, weight_decay=weight_decay)
    one_at_a_time = train_experts(data, 4, 3, seed=2, **settings)
    train_experts(data, 1, 3, seed=2, out=tmp_path, **settings)
    together = train_experts(data, 4, 3, seed=2, out=tmp_path, parallel=3, **settings)
    assert len(together) == 4
    for number in range(4):
        torch.testing.assert_close(together[number], one_at_a_time[number], rtol=1e-4, atol=1e-5)
    saved = torch.load(tmp_path / expert_file_name(3), weights_only=True)
    assert saved["number"] == 3 and len(saved["epoch_losses"]) == 3


@pytest.mark.parametrize("parallel", [1, 2])
def test_progress_reports_every_epoch_with_the_losses_the_files_record(tmp_path, capsys, parallel):
    """An expert's file appears only when it is done (hours on a CPU): progress says each epoch."""
    train_experts(_toy(), 2, 3, seed=4, out=tmp_path, progress=True, parallel=parallel, **SETTINGS)
    lines = capsys.readouterr().out.splitlines()
    epoch_lines = [line for line in lines if ", epoch " in line]
    assert len(epoch_lines) == 3 * (2 // parallel)
    saved = [torch.load(tmp_path / expert_file_name(n), weights_only=True)["epoch_losses"] for n in range(2)]
    if parallel == 1:
        expected = [f"expert {n + 1} of 2, epoch {e + 1}/3: train loss {saved[n][e]:.4f} (" for n in range(2)
                    for e in range(3)]
    else:
        expected = [f"experts 1, 2 of 2, epoch {e + 1}/3: train loss {saved[0][e]:.4f} {saved[1][e]:.4f} ("
                    for e in range(3)]
    assert [line[:len(start)] for line, start in zip(epoch_lines, expected)] == expected


@pytest.mark.parametrize("parallel", [1, 2])
@pytest.mark.parametrize("storage", [torch.uint8, torch.float32])
def test_experts_on_streamed_images_are_the_resident_ones(parallel, storage):
    data = _toy(per_class=9)
    if storage == torch.float32:
        data = replace(data, images=data.normalized())  # float storage, as after ZCA
    resident = train_experts(data, 2, 2, seed=4, parallel=parallel, **SETTINGS)
    streamed = train_experts(data, 2, 2, seed=4, parallel=parallel, images_on="host", **SETTINGS)
    assert all(torch.equal(streamed[n], resident[n]) for n in range(2))
    with pytest.raises(ValueError, match="images_on must be 'device' or 'host'"):
        train_experts(data, 1, 1, images_on="disk", **SETTINGS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_experts_keep_the_set_off_the_gpu():
    data = _toy(per_class=2048, size=32)  # a 25 MB uint8 set
    settings = dict(SETTINGS, device="cuda", batch_size=256)
    buffers, peaks = {}, {}
    for place in ("device", "host"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        buffers[place] = train_experts(data, 1, 1, seed=4, images_on=place, **settings)
        peaks[place] = torch.cuda.max_memory_allocated() - start
    assert peaks["device"] - peaks["host"] >= 0.9 * data.images.numel()
    torch.testing.assert_close(buffers["host"][0], buffers["device"][0], rtol=1e-4, atol=1e-5)  # atomic DSA backward


def test_parallel_experts_refuse_gsam_batchnorm_and_bad_counts():
    data = _toy()
    with pytest.raises(ValueError, match="SGD only"):
        train_experts(data, 2, 1, optimizer="gsam", parallel=2, **SETTINGS)
    with pytest.raises(ValueError, match="torch.func can batch"):
        train_experts(data, 2, 1, parallel=2, **dict(SETTINGS, model="ConvNetBN"))
    with pytest.raises(ValueError, match="parallel must be a positive int"):
        train_experts(data, 2, 1, parallel=0, **SETTINGS)


def _training_losses(buffer, data):
    student = buffer.network()
    return [float(torch.nn.functional.cross_entropy(student.forward(data.normalized(), params), data.labels))
            for params in buffer[0]]


def test_gsam_experts_record_their_settings_and_learn(tmp_path):
    data = toy_dataset()
    settings = dict(SETTINGS, dsa=False, seed=2)
    trained = train_experts(data, 1, 1, optimizer="gsam", out=tmp_path, **settings)
    buffer = load_experts(tmp_path)
    meta = buffer.meta
    assert (meta["optimizer"], meta["rho"], meta["alpha"], meta["adaptive"]) == ("gsam", 0.01, 0.3, True)
    assert "gsam lr 0.01 (rho 0.01, alpha 0.3, adaptive)" in repr(buffer)
    assert torch.equal(buffer[0], trained[0])
    losses = _training_losses(buffer, data)
    assert losses[1] < losses[0]
    sgd = train_experts(data, 1, 1, **settings)
    assert sgd.meta["optimizer"] == "sgd" and "rho" not in sgd.meta
    assert torch.equal(sgd[0][0], buffer[0][0]) and not torch.equal(sgd[0][1], buffer[0][1])
    with pytest.raises(ValueError, match="other settings.*alpha.*optimizer.*rho"):
        train_experts(data, 2, 1, out=tmp_path, **settings)
    with pytest.raises(ValueError, match="other settings.*alpha"):
        train_experts(data, 2, 1, optimizer="gsam", alpha=0.5, out=tmp_path, **settings)


def test_expert_optimizer_settings_are_checked():
    with pytest.raises(ValueError, match="unknown expert optimizer 'adam'"):
        train_experts(_toy(), 1, 1, optimizer="adam", **SETTINGS)
    with pytest.raises(ValueError, match="rho only apply to optimizer='gsam'"):
        train_experts(_toy(), 1, 1, rho=0.05, **SETTINGS)
    with pytest.raises(ValueError, match="GSAM alpha must be a non-negative"):
        train_experts(_toy(), 1, 1, optimizer="gsam", alpha=-0.3, **SETTINGS)


def test_buffers_written_before_the_optimizer_was_recorded_are_sgd_and_continue(tmp_path):
    data = _toy()
    train_experts(data, 1, 1, out=tmp_path, **SETTINGS)
    for name in (INDEX_FILE, expert_file_name(0)):
        content = torch.load(tmp_path / name, weights_only=True)
        del content["meta"]["optimizer"]
        torch.save(content, tmp_path / name)
    old = load_experts(tmp_path)
    assert old.meta["optimizer"] == "sgd" and old[0].shape[0] == 2
    continued = train_experts(data, 2, 1, out=tmp_path, **SETTINGS)
    assert len(continued) == 2 and torch.equal(continued[0], old[0])


def test_missing_buffer_and_missing_index_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no expert buffer"):
        load_experts(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=INDEX_FILE):
        load_experts(tmp_path)


def test_check_compatible_names_what_differs():
    data = _toy()
    meta = train_experts(data, 1, 1, **SETTINGS).meta
    check_compatible(meta, data, "ConvNetD1", zca=False)
    check_compatible(meta, data, FunctionalConvNet(3, 4, depth=1, im_size=(8, 8)), zca=False)
    with pytest.raises(ValueError, match="trained without ZCA"):
        check_compatible(meta, data, "ConvNetD1", zca=True)
    with pytest.raises(ValueError, match="ZCA-whitened images but the data here are not"):
        check_compatible(dict(meta, zca=True), data, "ConvNetD1", zca=False)
    with pytest.raises(ValueError, match="'cifar10'"):
        check_compatible(meta, replace(data, name="cifar10"), "ConvNetD1", zca=False)
    with pytest.raises(ValueError, match="model 'ConvNetD1', not 'ConvNet'"):
        check_compatible(meta, data, "ConvNet", zca=False)
    with pytest.raises(ValueError, match="architecture"):
        check_compatible(meta, data, FunctionalConvNet(3, 4, width=8, depth=1, im_size=(8, 8)), zca=False)
    with pytest.raises(ValueError, match="3×16×16"):
        check_compatible(meta, _toy(size=16), "ConvNetD1", zca=False)
    with pytest.raises(ValueError, match="4 classes, the data set has 5"):
        check_compatible(meta, _toy(classes=5), "ConvNetD1", zca=False)


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError, match="num_experts"):
        train_experts(_toy(), 0, 2, **SETTINGS)
    with pytest.raises(ValueError, match="epochs"):
        train_experts(_toy(), 1, 0, **SETTINGS)
    for lr in (0.0, -0.01, float("nan")):
        with pytest.raises(ValueError, match="lr must be a positive learning rate"):
            train_experts(_toy(), 1, 1, **{**SETTINGS, "lr": lr})
    with pytest.raises(ValueError, match="momentum and weight_decay must be non-negative"):
        train_experts(_toy(), 1, 1, **{**SETTINGS, "momentum": -0.5})
    with pytest.raises(ValueError, match="momentum and weight_decay must be non-negative"):
        train_experts(_toy(), 1, 1, **{**SETTINGS, "weight_decay": float("nan")})


def test_experts_command_trains_a_buffer(tmp_path, capsys):
    data = _toy()
    npz = tmp_path / "toy.npz"
    np.savez(npz, images=data.images.numpy(), labels=data.labels.numpy())
    parser = argparse.ArgumentParser()
    add_experts_command(parser.add_subparsers(dest="command"))
    out = tmp_path / "buffer"
    args = parser.parse_args(["experts", "--dataset", "npz", "--root", str(npz), "--num-experts", "1",
                              "--epochs", "1", "--model", "ConvNetD1", "--batch-size", "16", "--device", "cpu",
                              "--out", str(out), "--real-images-on", "host"])
    assert args.real_images_on == "host" and run_experts_command(args) == 0
    buffer = load_experts(out)
    assert len(buffer) == 1 and buffer.meta["epochs"] == 1 and buffer.meta["batch_size"] == 16
    assert "expert 1/1" in capsys.readouterr().out


def test_experts_command_trains_gsam_experts(tmp_path):
    data = _toy()
    npz = tmp_path / "toy.npz"
    np.savez(npz, images=data.images.numpy(), labels=data.labels.numpy())
    parser = argparse.ArgumentParser()
    add_experts_command(parser.add_subparsers(dest="command"))
    common = ["experts", "--dataset", "npz", "--root", str(npz), "--num-experts", "1", "--epochs", "1",
              "--model", "ConvNetD1", "--batch-size", "16", "--device", "cpu", "--optimizer", "gsam"]
    assert run_experts_command(parser.parse_args(common + ["--out", str(tmp_path / "datm")])) == 0
    meta = load_experts(tmp_path / "datm").meta
    assert (meta["optimizer"], meta["rho"], meta["alpha"], meta["adaptive"]) == ("gsam", 0.01, 0.3, True)
    chosen = common + ["--rho", "0.05", "--alpha", "0", "--no-adaptive", "--out", str(tmp_path / "sam")]
    assert run_experts_command(parser.parse_args(chosen)) == 0
    meta = load_experts(tmp_path / "sam").meta
    assert (meta["optimizer"], meta["rho"], meta["alpha"], meta["adaptive"]) == ("gsam", 0.05, 0.0, False)
