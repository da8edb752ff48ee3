"""Class-sharded DM/M3D/DC/DSA/IDC/MTT/TESLA/DATM/DD/DQ across processes (Gloo on the CPU) equals the one-process run.

Each test spawns `world` processes that join a process group and call ce.distill exactly as a
torchrun launch would; every rank saves what it got, and the test compares with one process.
"""
import datetime
import json
import os
import signal
import time
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import condense_engine as ce
from condense_engine import distributed, driver
from condense_engine.datasets import ClassSampler
from condense_engine.distributed import ClassShard
from condense_engine.expert import train_experts
from condense_engine.methods import get_method
from condense_engine.methods.dm import DM
from condense_engine.models import ConvNetBank
from tests.toy_data import FAST, toy_dataset

RUN = dict(ipc=2, iterations=4, seed=0, device="cpu", progress=False)


def _count_embedded(monkeypatch_setattr) -> list:
    """Make ConvNetBank.embed count the images it embeds; returns the growing count ([n])."""
    count, embed = [0], ConvNetBank.embed

    def counted(self, x):
        count[0] += len(x)
        return embed(self, x)
    monkeypatch_setattr(ConvNetBank, "embed", counted)
    return count


def _record_held(monkeypatch_setattr) -> list:
    """Make ClassSampler record how many real images it keeps; returns the latest count ([n])."""
    held, init = [0], ClassSampler.__init__

    def recorded(self, *args, **kwargs):
        init(self, *args, **kwargs)
        held[0] = len(self.store)
    monkeypatch_setattr(ClassSampler, "__init__", recorded)
    return held


def _rank_main(rank: int, world: int, folder: str, calls: list) -> None:
    """One rank: join the group, run each (distill kwargs) call, save the set (and how many
    images this rank embedded and kept resident) or the error."""
    torch.set_num_threads(1)
    patch = lambda owner, name, value: setattr(owner, name, value)  # noqa: E731 (the child has no monkeypatch)
    embedded, held = _count_embedded(patch), _record_held(patch)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))  # bounded: a rank left waiting fails
    try:
        for index, kwargs in enumerate(calls):
            kwargs = dict(kwargs)
            data = toy_dataset(classes=kwargs.pop("classes", 3))
            if kwargs.pop("sigterm_rank", None) == rank:
                _sigterm_after(kwargs.pop("sigterm_after"))
            kwargs.pop("sigterm_after", None)
            if kwargs.pop("nan_rank", None) == rank:
                _poison_after(kwargs.pop("nan_after"))
            kwargs.pop("nan_after", None)
            if kwargs.pop("late_clock_rank", None) == rank:
                _clock_jumps_after(kwargs.pop("late_clock_after"))
            kwargs.pop("late_clock_after", None)
            if kwargs.pop("record_saves", False):
                _record_saves(os.path.join(folder, f"saves-{index}-{rank}.txt"))
            if kwargs.pop("unshardable", False):  # a method of the user's that declares it cannot shard
                get_method(kwargs["method"]).class_sharded = False
            for key in ("checkpoint", "log"):
                if key in kwargs:
                    kwargs[key] = os.path.join(folder, kwargs[key])
            try:
                embedded[0] = 0
                synset = ce.distill(data, **kwargs)
                torch.save(dict(images=synset.images, labels=synset.labels, lr=synset.lr, meta=synset.meta,
                                embedded=embedded[0], held=held[0]),
                           os.path.join(folder, f"images-{index}-{rank}.pt"))
            except (ValueError, KeyboardInterrupt) as err:
                with open(os.path.join(folder, f"error-{index}-{rank}.txt"), "w", encoding="utf-8") as f:
                    f.write(str(err))
    finally:
        distributed.leave()
    distributed.exit_rank(0)  # torch's Gloo teardown is not under test


def _after_dm_steps(steps: int, action) -> None:
    """Make this process call action(method, synset) after its `steps`-th DM step."""
    step, calls = DM.step, []

    def counted(self, synset, iteration):
        out = step(self, synset, iteration)
        calls.append(iteration)
        if len(calls) == steps:
            action(self, synset)
        return out
    DM.step = counted


def _sigterm_after(steps: int) -> None:
    """This process sends itself SIGTERM after its `steps`-th DM step (as a cluster would)."""
    _after_dm_steps(steps, lambda method, synset: os.kill(os.getpid(), signal.SIGTERM))


def _poison_after(steps: int) -> None:
    """This process's synthetic pixels turn NaN after its `steps`-th DM step (a divergence that
    only one rank's classes see)."""
    def poison(method, synset):
        with torch.no_grad():
            synset.images[method.shard.first * 2] = float("nan")
    _after_dm_steps(steps, poison)


def _clock_jumps_after(steps: int) -> None:
    """This process's clock (the driver's) jumps an hour ahead after its `steps`-th DM step, so
    that only this rank finds a timed checkpoint overdue."""
    offset, monotonic = [0.0], time.monotonic
    driver.time = types.SimpleNamespace(perf_counter=time.perf_counter, monotonic=lambda: monotonic() + offset[0])
    _after_dm_steps(steps, lambda method, synset: offset.__setitem__(0, 3600.0))


def _record_saves(path: str) -> None:
    """This process appends the iteration of every checkpoint it writes to `path`."""
    save = driver.save_checkpoint

    def recorded(state, target):
        save(state, target)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{state['iteration']}\n")
    driver.save_checkpoint = recorded


def _run_ranks(world: int, folder, calls: list) -> None:
    mp.spawn(_rank_main, args=(world, str(folder), calls), nprocs=world, join=True)


def _one_process_run(call: dict, folder, **changes):
    """The set one process distills for `call` (with `changes`), logging to single.jsonl; checks
    that the run moved the images, so agreeing with it means something."""
    single = dict(call, log=str(folder / "single.jsonl"), **changes)
    data = toy_dataset(classes=single.pop("classes"))
    expected = ce.distill(data, **single)
    assert not torch.equal(expected.images, ce.distill(data, **dict(single, iterations=0, log=None)).images)
    return expected


def _losses(path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.mark.parametrize("world, method, options", [
    (2, "dm", {}),
    (2, "m3d", {}),
    (3, "m3d", dict(kernel="poly", factor=1, classes=5)),
])
def test_sharded_run_gives_every_rank_the_one_process_set_and_log(tmp_path, world, method, options, monkeypatch):
    call = dict(RUN, method=method, log="log.jsonl", **FAST, **options)
    _run_ranks(world, tmp_path, [call])
    single = dict(call, log=str(tmp_path / "single.jsonl"))
    embedded = _count_embedded(monkeypatch.setattr)
    expected = ce.distill(toy_dataset(classes=single.pop("classes", 3)), **single).images
    shares, held = [], []
    for rank in range(world):
        got = torch.load(tmp_path / f"images-0-{rank}.pt")
        torch.testing.assert_close(got["images"], expected, rtol=1e-4, atol=1e-4)
        shares.append(got["embedded"])
        held.append(got["held"])
    assert sum(shares) == embedded[0] and max(shares) < embedded[0]  # each rank embeds only its classes
    data = toy_dataset(classes=options.get("classes", 3))
    assert held == [int(data.class_counts()[slice(*ClassShard(rank, world, 0, 0, data.num_classes).bounds(rank))].sum())
                    for rank in range(world)]  # and keeps only their real images
    assert not torch.equal(expected, ce.distill(toy_dataset(classes=options.get("classes", 3)),
                                                **dict(single, iterations=0, log=None)).images)
    # rank 0 alone writes the log (two writers would double its lines), with the summed loss
    torch.testing.assert_close(_losses(tmp_path / "log.jsonl"), _losses(tmp_path / "single.jsonl"), rtol=1e-4, atol=0)


GRADIENT_MATCHING = dict(outer_loop=3, inner_loop=2, batch_real=8, batch_train=3, model="ConvNetW32")
IDC_SMALL = dict(inner_steps=3, batch_real=8, real_per_epoch=15, batch_net=4, cutmix_prob=0.5, model="ConvNetW32")


@pytest.mark.parametrize("world, method, classes, place, options", [
    (2, "dc", 3, "device", GRADIENT_MATCHING),
    (3, "dsa", 5, "host", GRADIENT_MATCHING),
    (2, "idc", 3, "device", IDC_SMALL),
])
def test_sharded_gradient_matching_gives_every_rank_the_one_process_set_and_log(tmp_path, world, method, classes,
                                                                                place, options):
    """DC/DSA/IDC: each rank matches its classes; the network between image updates trains
    data-parallel on small batches that straddle the ranks' classes (some hold none of a batch's
    rows; IDC's real batches with CutMix about half the time), and still follows the one-process
    network (also with streamed real images)."""
    call = dict(RUN, method=method, iterations=2, log="log.jsonl", classes=classes, real_images_on=place, **options)
    _run_ranks(world, tmp_path, [call])
    single = dict(call, log=str(tmp_path / "single.jsonl"))
    data = toy_dataset(classes=single.pop("classes"))
    expected = ce.distill(data, **single).images
    assert not torch.equal(expected, ce.distill(data, **dict(single, iterations=0, log=None)).images)
    for rank in range(world):
        got = torch.load(tmp_path / f"images-0-{rank}.pt")
        torch.testing.assert_close(got["images"], expected, rtol=1e-4, atol=1e-4)
        own = int(data.class_counts()[slice(*ClassShard(rank, world, 0, 0, classes).bounds(rank))].sum())
        assert got["held"] == (own if place == "device" else len(data))  # streamed: the set's own tensor, no copy
    torch.testing.assert_close(_losses(tmp_path / "log.jsonl"), _losses(tmp_path / "single.jsonl"), rtol=1e-4, atol=0)


DATM_SMALL = dict(min_start_epoch=0, current_max_start_epoch=1, expansion_end_epoch=2, threshold=10.0)


@pytest.mark.parametrize("world, method, classes, memory, options", [
    (2, "mtt", 3, "unrolled", {}), (3, "tesla", 5, "tesla", {}), (2, "datm", 3, "exact", DATM_SMALL)])
def test_sharded_trajectory_matching_gives_every_rank_the_one_process_set_and_log(tmp_path, world, method,
                                                                                  classes, memory, options):
    """MTT (unrolled in one process, its exact gradient across ranks), TESLA (soft labels from the target expert, gathered with the set) and
    DATM (images chosen per class, learned labels gathered with their momentum): every rank runs
    the same student, each step's gradient summed from the ranks' own rows of minibatches of 4
    that straddle them; the set, its labels, lr and log equal one process's."""
    buffer = str(tmp_path / "experts")
    train_experts(toy_dataset(classes=classes), 2, 3, model="ConvNetD1", batch_size=16, device="cpu", out=buffer)
    trajectory = dict(model="ConvNetD1", syn_steps=4, expert_epochs=2, max_start_epoch=1, lr_img=100.0, batch_syn=4)
    call = dict(RUN, method=method, iterations=3, log="log.jsonl", classes=classes, buffer=buffer, memory=memory,
                **trajectory, **options)
    _run_ranks(world, tmp_path, [call])
    expected = _one_process_run(call, tmp_path)
    for rank in range(world):
        got = torch.load(tmp_path / f"images-0-{rank}.pt")
        torch.testing.assert_close(got["images"], expected.images, rtol=1e-4, atol=1e-4)
        if method != "mtt":
            torch.testing.assert_close(got["labels"], expected.labels, rtol=1e-4, atol=1e-5)
            assert got["labels"].dim() == 2
        torch.testing.assert_close(got["lr"], expected.lr, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(_losses(tmp_path / "log.jsonl"), _losses(tmp_path / "single.jsonl"), rtol=1e-4, atol=0)


def test_a_sharded_datm_run_resumes_under_ranks_and_skips_where_one_process_does(tmp_path):
    """DATM with a threshold that skips some iterations: two ranks run 2 iterations with a
    checkpoint, then resume to 4; images, learned labels, lr and log equal one process's 4."""
    buffer = str(tmp_path / "experts")
    train_experts(toy_dataset(), 2, 3, model="ConvNetD1", batch_size=16, device="cpu", out=buffer)
    call = dict(RUN, method="datm", iterations=2, log="log.jsonl", checkpoint="checkpoint.pt", buffer=buffer,
                memory="exact", model="ConvNetD1", syn_steps=4, expert_epochs=2, max_start_epoch=1, lr_img=100.0,
                batch_syn=4, **dict(DATM_SMALL, threshold=0.9))
    _run_ranks(2, tmp_path, [call, dict(call, iterations=4, resume=True)])
    single = dict(call, iterations=4, log=str(tmp_path / "single.jsonl"), checkpoint=None)
    expected = ce.distill(toy_dataset(), **single)
    skipped = [json.loads(line)["skipped"] for line in open(tmp_path / "single.jsonl")]
    assert 0.0 in skipped and 1.0 in skipped  # both branches ran
    for rank in range(2):
        got = torch.load(tmp_path / f"images-1-{rank}.pt")
        for key in ("images", "labels", "lr"):
            torch.testing.assert_close(got[key], getattr(expected, key), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_losses(tmp_path / "log.jsonl"), _losses(tmp_path / "single.jsonl"), rtol=1e-4, atol=0)


@pytest.mark.parametrize("world, classes, memory, options", [
    (2, 3, "unrolled", {}), (3, 5, "exact", dict(init="real", nets=2, decay_every=1))])
def test_sharded_dd_resumes_under_ranks_to_the_one_process_set_and_step_sizes(tmp_path, world, classes, memory,
                                                                               options):
    """DD (unrolled in one process, its exact gradient across ranks): every rank unrolls the same
    fresh student over batches that hold every class, the real-batch loss summed from the ranks'
    classes. Two iterations with a checkpoint (Adam's moments gathered into it), then a resume to
    four: the set, the learned step sizes and the log equal one process's four. Also with real
    initial images, two networks per iteration and a step-size decay every iteration. (Not at
    IPC 4 with real images: that toy problem is chaotic, Adam's first steps turning rounding-level
    pixel gradients into full steps; one process on 1 and on 2 threads already differs by 0.27.)"""
    call = dict(RUN, method="dd", iterations=2, classes=classes, memory=memory, log="log.jsonl",
                checkpoint="checkpoint.pt", batch_real=24, model="ConvNetW32", distill_steps=2, distill_epochs=2,
                lr_img=0.05, **options)
    _run_ranks(world, tmp_path, [call, dict(call, iterations=4, resume=True)])
    expected = _one_process_run(call, tmp_path, iterations=4, checkpoint=None)
    for rank in range(world):
        got = torch.load(tmp_path / f"images-1-{rank}.pt")
        torch.testing.assert_close(got["images"], expected.images, rtol=1e-4, atol=1e-5)
        assert got["meta"]["step_lrs"] == pytest.approx(expected.meta["step_lrs"], rel=1e-5)
    torch.testing.assert_close(_losses(tmp_path / "log.jsonl"), _losses(tmp_path / "single.jsonl"), rtol=1e-4, atol=0)


@pytest.mark.parametrize("world, classes, place", [(2, 3, "device"), (3, 5, "host")])
def test_sharded_dq_selects_the_one_process_coreset(tmp_path, world, classes, place):
    """DQ: the embedding network trains data-parallel on batches of 5 (2 epochs, with DSA), each
    rank bins its own classes; every rank ends with the one-process selection and images."""
    call = dict(RUN, method="dq", iterations=2, classes=classes, real_images_on=place, bins=2, batch_net=5,
                model="ConvNetW32", log="log.jsonl")
    _run_ranks(world, tmp_path, [call])
    single = dict(call, log=str(tmp_path / "single.jsonl"))
    data = toy_dataset(classes=single.pop("classes"))
    expected = ce.distill(data, **single)
    assert len(expected.meta["selected"]) == classes * 2
    for rank in range(world):
        got = torch.load(tmp_path / f"images-0-{rank}.pt")
        assert got["meta"]["selected"] == expected.meta["selected"]
        torch.testing.assert_close(got["meta"]["coverage"], expected.meta["coverage"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["images"], expected.images)
    torch.testing.assert_close(_losses(tmp_path / "log.jsonl"), _losses(tmp_path / "single.jsonl"), rtol=1e-4, atol=0)


def test_a_sharded_checkpoint_extends_in_one_process(tmp_path):
    """Rank 0 writes the one-process checkpoint format: two ranks run 3 iterations, one
    process resumes it to 6, and the set is the 6-iteration one-process set."""
    call = dict(RUN, method="m3d", iterations=3, checkpoint="checkpoint.pt", **FAST)
    _run_ranks(2, tmp_path, [call])
    resumed = ce.distill(toy_dataset(), **dict(call, iterations=6, checkpoint=str(tmp_path / "checkpoint.pt"),
                                               resume=True))
    straight = ce.distill(toy_dataset(), **dict(call, iterations=6, checkpoint=None))
    torch.testing.assert_close(resumed.images, straight.images, rtol=1e-4, atol=1e-4)


def test_a_signal_to_one_rank_stops_all_after_the_same_iteration_with_a_resumable_checkpoint(tmp_path):
    call = dict(RUN, method="dm", iterations=6, checkpoint="checkpoint.pt", **FAST)
    _run_ranks(2, tmp_path, [dict(call, sigterm_rank=1, sigterm_after=2)])
    for rank in range(2):
        assert "stopped by signal after iteration 2" in (tmp_path / f"error-0-{rank}.txt").read_text()
    resumed = ce.distill(toy_dataset(), **dict(call, checkpoint=str(tmp_path / "checkpoint.pt"), resume=True))
    straight = ce.distill(toy_dataset(), **dict(call, checkpoint=None))
    torch.testing.assert_close(resumed.images, straight.images, rtol=1e-4, atol=1e-4)


def test_a_timed_checkpoint_due_on_one_rank_is_written_by_all_after_the_same_iteration(tmp_path):
    """Only rank 1's clock says a checkpoint is overdue (after its second step); the ranks agree,
    gather the set and rank 0 writes it after iteration 2 (then at the end), with no rank left
    waiting in a collective."""
    call = dict(RUN, method="dm", iterations=6, checkpoint="checkpoint.pt", checkpoint_every=100, record_saves=True,
                late_clock_rank=1, late_clock_after=2, **FAST)
    _run_ranks(2, tmp_path, [call])
    assert (tmp_path / "saves-0-0.txt").read_text().split() == ["2", "6"]
    assert not (tmp_path / "saves-0-1.txt").exists()  # the lead alone writes
    assert all((tmp_path / f"images-0-{rank}.pt").exists() for rank in range(2))


def test_non_finite_pixels_on_one_rank_stop_every_rank_at_the_same_iteration(tmp_path):
    """Rank 1's pixels go NaN after its first step; with read-backs every 4 iterations its next
    step meets NaN features (ops.mmd refuses them on the CPU) before any rank has looked. No rank
    may be left waiting in a collective: all stop with the guard's error naming iteration 1."""
    call = dict(RUN, method="m3d", iterations=6, sync_every=4, checkpoint="checkpoint.pt", checkpoint_every=100,
                nan_rank=1, nan_after=1, **FAST)
    _run_ranks(2, tmp_path, [call])
    for rank in range(2):
        assert "non-finite synthetic pixels at iteration 0" in (tmp_path / f"error-0-{rank}.txt").read_text()
    assert not (tmp_path / "checkpoint.pt").exists()


def test_methods_and_models_that_cannot_shard_are_refused_on_every_rank(tmp_path):
    buffer = str(tmp_path / "experts")
    train_experts(toy_dataset(), 1, 2, model="ConvNetBN", batch_size=16, device="cpu", out=buffer)
    calls = [dict(RUN, method="dd", model="ConvNetBN"), dict(RUN, method="dm", **dict(FAST, model="ConvNetBN")),
             dict(RUN, method="dsa", outer_loop=1, inner_loop=1, model="ConvNetBN"),
             dict(RUN, method="mtt", buffer=buffer, model="ConvNetBN", max_start_epoch=1, expert_epochs=1),
             dict(RUN, method="dm", unshardable=True, **FAST)]  # last: the flag stays set in the ranks
    _run_ranks(2, tmp_path, calls)
    for rank in range(2):
        assert "cannot run class-sharded across 2 ranks; run it in one process" in (
            tmp_path / f"error-{len(calls) - 1}-{rank}.txt").read_text()
        for index in range(len(calls) - 1):
            assert "BatchNorm" in (tmp_path / f"error-{index}-{rank}.txt").read_text()
            assert "cannot run class-sharded" in (tmp_path / f"error-{index}-{rank}.txt").read_text()


@pytest.mark.parametrize("classes, world", [(10, 3), (200, 8), (5, 5)])
def test_shards_cover_every_class_once_with_sizes_within_one(classes, world):
    shard = ClassShard(rank=0, world=world, first=0, end=0, num_classes=classes)
    bounds = [shard.bounds(rank) for rank in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == classes
    assert all(end == next_first for (_, end), (next_first, _) in zip(bounds, bounds[1:]))
    sizes = [end - first for first, end in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
