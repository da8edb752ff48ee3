"""The driver's read-back cadence: `sync_every` changes when the stats and the non-finite guard
reach the host, never the results, the log, the guard's report or the checkpoints it keeps."""
import json
import os
import sys
import types
from unittest import mock

import pytest
import torch

import condense_engine as ce
from condense_engine import driver
from condense_engine.checkpoint import load_checkpoint
from condense_engine.errors import MissingPackageError, NonFiniteLossError
from condense_engine.methods.dm import DM
from tests.toy_data import FAST, distill_interrupted, toy_dataset

RUN = dict(method="dm", ipc=2, seed=3, progress=False, device="cpu", **FAST)


def _records(path) -> list:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _without_seconds(records: list) -> list:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in records]


def _crash_at_5(synset, iteration, stats):
    """A `_patched_step` change: the 5th iteration dies (as of a lost device or a kill)."""
    if iteration == 4:
        raise RuntimeError("crashed at iteration 5")
    return stats


def _patched_step(log_path, seen: list, change=None):
    """DM.step that first notes how many records the log holds, then calls `change(synset,
    iteration, stats)` on the real step's result (to inject a fault)."""
    original = DM.step

    def step(self, synset, iteration):
        seen.append(len(_records(log_path)) if os.path.exists(log_path) else 0)
        stats = original(self, synset, iteration)
        return change(synset, iteration, stats) if change else stats

    return mock.patch.object(DM, "step", step)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3"])
def test_sync_every_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="sync_every"):
        ce.distill(toy_dataset(), iterations=1, sync_every=bad, **RUN)


def test_a_checkpoint_folder_that_cannot_be_written_fails_before_the_first_iteration(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot write checkpoints to"):
        ce.distill(toy_dataset(), iterations=1, checkpoint=str(blocker / "checkpoint.pt"), **RUN)


@pytest.mark.parametrize("bad", ["a", 1.5, True, None])
def test_seed_must_be_an_int(bad):
    with pytest.raises(ValueError, match="seed must be an integer"):
        ce.distill(toy_dataset(), iterations=1, **dict(RUN, seed=bad))


@pytest.mark.parametrize("test_set, error, match", [
    (toy_dataset(size=10), ValueError, r"test_set holds \(1, 10, 10\) images but the data to distill \(1, 12, 12\)"),
    (toy_dataset(classes=4), ValueError, "test_set has labels up to 3 but the data to distill has 3 classes"),
    ("data/test", TypeError, r"test_set must be an ImageDataset, an \(images, labels\) tensor pair"),
])
def test_a_test_set_the_evaluations_cannot_use_fails_before_the_first_iteration(test_set, error, match, tmp_path):
    """With eval_every, a mismatched test set used to fail only at the first evaluation."""
    log = tmp_path / "log.jsonl"
    with pytest.raises(error, match=match):
        ce.distill(toy_dataset(), iterations=4, test_set=test_set, eval_every=2, log=str(log), **RUN)
    assert not log.exists() or _records(log) == []


def test_a_tensor_pair_test_set_is_evaluated_with_the_training_statistics():
    """A pair's pixels take the training data's mean/std, as a data set's test split does."""
    train = toy_dataset()
    pixels = train.images.float() / 255 * 0.5  # darker: its own statistics would differ
    pair = (pixels, train.labels)
    seen = []
    report = types.SimpleNamespace(mean=0.0, std=0.0, accuracies=[])
    with mock.patch.object(driver, "evaluate_now", lambda synset, test_set, options: seen.append(test_set) or report):
        ce.distill(train, iterations=2, test_set=pair, eval_every=2, **RUN)
    (used,) = seen
    assert (used.mean, used.std) == (train.mean, train.std)
    torch.testing.assert_close(used.normalized(), (pixels - train.mean[0]) / train.std[0])


@pytest.mark.parametrize("bad", [-1, 2.5, True, "3", float("inf"), float("nan")])
def test_iterations_must_be_a_non_negative_int(bad):
    with pytest.raises(ValueError, match="iterations must be a non-negative integer"):
        ce.distill(toy_dataset(), iterations=bad, **RUN)


def test_results_and_log_do_not_depend_on_sync_every(tmp_path):
    data = toy_dataset()
    runs = {}
    for sync_every in (None, 1, 3, 100):
        log = tmp_path / f"log{sync_every}.jsonl"
        synset = ce.distill(data, iterations=7, sync_every=sync_every, log=str(log), **RUN)
        runs[sync_every] = (synset.images, _without_seconds(_records(log)))
    images, records = runs[1]
    assert [r["iteration"] for r in records] == list(range(1, 8))
    assert all(isinstance(r["loss"], float) for r in records)
    for other_images, other_records in runs.values():
        assert torch.equal(other_images, images)
        assert other_records == records


@pytest.mark.parametrize("method", ["dm", "m3d"])
def test_results_do_not_depend_on_where_the_real_images_are(method):
    data = toy_dataset()
    runs = [ce.distill(data, iterations=3, real_images_on=place, **dict(RUN, method=method))
            for place in ("device", "host")]
    assert torch.equal(runs[0].images, runs[1].images)
    with pytest.raises(ValueError, match="images_on must be 'device' or 'host'"):
        ce.distill(data, iterations=1, real_images_on="disk", **RUN)


def test_log_grows_at_the_cadence_and_before_checkpoints(tmp_path):
    log = str(tmp_path / "log.jsonl")
    seen = []
    with _patched_step(log, seen):
        ce.distill(toy_dataset(), iterations=8, sync_every=3, checkpoint=str(tmp_path / "ckpt.pt"),
                   checkpoint_every=5, log=log, **RUN)
    # Read back after 3 (cadence), 5 (checkpoint), 6 (cadence) and 8 (the end) iterations.
    assert seen == [0, 0, 0, 3, 3, 5, 6, 6]
    assert [r["iteration"] for r in _records(log)] == list(range(1, 9))


def test_cpu_default_reads_back_every_iteration(tmp_path):
    log = str(tmp_path / "log.jsonl")
    seen = []
    with _patched_step(log, seen):
        ce.distill(toy_dataset(), iterations=4, log=log, **RUN)
    assert seen == [0, 1, 2, 3]


def test_evaluation_reads_back_first_and_lands_on_its_iteration(tmp_path, monkeypatch):
    log = str(tmp_path / "log.jsonl")
    at_evaluation = []

    def fake_evaluate(synset, test_set, eval_options):
        at_evaluation.append(len(_records(log)))
        return types.SimpleNamespace(mean=0.5, std=0.0, accuracies=[0.5])

    monkeypatch.setattr(driver, "evaluate_now", fake_evaluate)
    ce.distill(toy_dataset(), iterations=5, sync_every=10, test_set=toy_dataset(), eval_every=2, log=log, **RUN)
    # Records 1..k−1 are published before evaluating at iteration k; its own record carries the result.
    assert at_evaluation == [0, 2, 4]
    assert [r["iteration"] for r in _records(log) if "eval" in r] == [2, 4, 5]


def test_tensor_and_number_stats_are_both_logged(tmp_path):
    log = str(tmp_path / "log.jsonl")
    add_number = lambda synset, iteration, stats: dict(stats, scale=float(iteration))  # noqa: E731
    with _patched_step(log, [], add_number):
        ce.distill(toy_dataset(), iterations=4, sync_every=3, log=log, **RUN)
    records = _records(log)
    assert [r["scale"] for r in records] == [0.0, 1.0, 2.0, 3.0]
    assert all(isinstance(r["loss"], float) and r["loss"] > 0 for r in records)


@pytest.mark.parametrize("sync_every, minutes, written", [
    (1, 10, [3, 6, 9, 10]),  # due at 12, 24 and 36 minutes, each counted from the last write
    (4, 10, [4, 8, 10]),     # overdue since iteration 3, written at the next read-back
    (1, None, [10]),         # by iterations only
])
def test_a_slow_run_also_checkpoints_by_the_clock(tmp_path, monkeypatch, sync_every, minutes, written):
    """Every iteration takes 4 minutes (a fake clock); checkpoint_every=100 never comes round, so
    the checkpoints come from checkpoint_minutes, at read-backs, and at the end."""
    log, clock, saved = str(tmp_path / "log.jsonl"), [0.0], []
    monkeypatch.setattr(driver, "time", types.SimpleNamespace(perf_counter=driver.time.perf_counter,
                                                              monotonic=lambda: clock[0]))
    save = driver.save_checkpoint
    monkeypatch.setattr(driver, "save_checkpoint", lambda state, path: saved.append(state["iteration"]) or save(state, path))

    def four_minutes(synset, iteration, stats):
        clock[0] += 240.0
        return stats

    with _patched_step(log, [], four_minutes):
        ce.distill(toy_dataset(), iterations=10, sync_every=sync_every, checkpoint=str(tmp_path / "ckpt.pt"),
                   checkpoint_every=100, checkpoint_minutes=minutes, log=log, **RUN)
    assert saved == written


@pytest.mark.parametrize("option, value", [("checkpoint_minutes", 0), ("checkpoint_minutes", -1.0),
                                           ("checkpoint_minutes", True), ("checkpoint_minutes", "10"),
                                           ("checkpoint_every", 0), ("checkpoint_every", 2.5)])
def test_bad_checkpoint_cadence_is_refused_by_name(tmp_path, option, value):
    with pytest.raises(ValueError, match=option):
        ce.distill(toy_dataset(), iterations=1, checkpoint=str(tmp_path / "ckpt.pt"), **{option: value}, **RUN)


def test_non_finite_loss_between_reads_names_its_iteration_and_keeps_the_checkpoint_before(tmp_path):
    log, ckpt = str(tmp_path / "log.jsonl"), str(tmp_path / "ckpt.pt")

    def nan_loss_at_4(synset, iteration, stats):
        return {"loss": torch.tensor(float("nan"))} if iteration == 4 else stats

    with _patched_step(log, [], nan_loss_at_4), \
            pytest.raises(NonFiniteLossError, match=r"loss .*nan.* at iteration 4; the last good checkpoint "
                                                    r"\(iteration 3\)"):
        # Reads back after 3 (checkpoint), 4 (cadence) and 6 (checkpoint): iteration 4 (the 5th)
        # is found at the third read, which must not write the checkpoint of iteration 6.
        ce.distill(toy_dataset(), iterations=12, sync_every=4, checkpoint=ckpt, checkpoint_every=3, log=log, **RUN)
    assert load_checkpoint(ckpt)["iteration"] == 3
    assert [r["iteration"] for r in _records(log)] == [1, 2, 3, 4]


def test_non_finite_pixels_are_traced_to_their_iteration_when_a_later_step_fails(tmp_path):
    log, ckpt = str(tmp_path / "log.jsonl"), str(tmp_path / "ckpt.pt")

    def nan_pixels_at_3(synset, iteration, stats):
        if iteration == 3:
            with torch.no_grad():
                synset.images[0, 0, 0, 0] = float("nan")
        return stats

    # Iteration 3 (not read back before 6) spoils the pixels; iteration 4's loss then raises on
    # the CPU (ops.mmd's check), and the driver must blame iteration 3.
    seen = []
    with _patched_step(log, seen, nan_pixels_at_3), \
            pytest.raises(NonFiniteLossError, match=r"synthetic pixels at iteration 3; the last good checkpoint "
                                                    r"\(iteration 3\)"):
        ce.distill(toy_dataset(), iterations=12, sync_every=7, checkpoint=ckpt, checkpoint_every=3, log=log, **RUN)
    assert len(seen) == 5  # the step of iteration 4 raised
    saved = load_checkpoint(ckpt)
    assert saved["iteration"] == 3 and torch.isfinite(saved["images"]).all()
    assert [r["iteration"] for r in _records(log)] == [1, 2, 3]


def test_stop_signal_reads_back_and_resume_is_bit_identical(tmp_path):
    data = toy_dataset()
    full_log, log, ckpt = tmp_path / "full.jsonl", tmp_path / "log.jsonl", str(tmp_path / "ckpt.pt")
    full = ce.distill(data, iterations=7, sync_every=1, log=str(full_log), **RUN)
    stopped_at = distill_interrupted(DM, 2, dataset=data, iterations=7, sync_every=4, checkpoint=ckpt,
                                     checkpoint_every=100, log=str(log), **RUN)
    assert stopped_at == 2
    resumed = ce.distill(data, iterations=7, sync_every=4, checkpoint=ckpt, resume=True, log=str(log), **RUN)
    assert torch.equal(resumed.images, full.images)
    assert _without_seconds(_records(log)) == _without_seconds(_records(full_log))


def test_resume_after_a_crash_keeps_one_log_record_per_iteration(tmp_path):
    """A run that dies between checkpoints has logged iterations that the resumed run does
    again, and may have been killed in the middle of a line: neither may stay in the log."""
    data = toy_dataset()
    full_log, log, ckpt = tmp_path / "full.jsonl", tmp_path / "log.jsonl", str(tmp_path / "ckpt.pt")
    full = ce.distill(data, iterations=7, log=str(full_log), **RUN)

    with _patched_step(log, [], _crash_at_5), pytest.raises(RuntimeError, match="crashed at iteration 5"):
        ce.distill(data, iterations=7, checkpoint=ckpt, checkpoint_every=3, log=str(log), **RUN)
    assert [r["iteration"] for r in _records(log)] == [1, 2, 3, 4]
    with open(log, "a", encoding="utf-8") as torn:
        torn.write('{"iteration": 5, "seco')
    resumed = ce.distill(data, iterations=7, checkpoint=ckpt, resume=True, log=str(log), **RUN)
    assert torch.equal(resumed.images, full.images)
    assert _without_seconds(_records(log)) == _without_seconds(_records(full_log))


def test_a_resumed_run_counts_its_seconds_on_from_the_checkpoint(tmp_path, monkeypatch):
    """Each process's clock starts at 0 here, as a new process's would; the log's seconds and
    the set's meta["seconds"] must still count the whole run's time."""
    data = toy_dataset()
    log, ckpt = tmp_path / "log.jsonl", str(tmp_path / "ckpt.pt")

    def fresh_clock():
        ticks = iter(range(0, 10 ** 6, 10))
        monkeypatch.setattr(driver, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks)),
                                                                  monotonic=lambda: 0.0))

    fresh_clock()
    distill_interrupted(DM, 2, dataset=data, iterations=5, checkpoint=ckpt, log=str(log), **RUN)
    saved_seconds = load_checkpoint(ckpt)["seconds"]
    assert saved_seconds >= _records(log)[-1]["seconds"] > 0
    fresh_clock()
    resumed = ce.distill(data, iterations=5, checkpoint=ckpt, resume=True, log=str(log), **RUN)
    seconds = [r["seconds"] for r in _records(log)]
    assert seconds[2] > saved_seconds and seconds == sorted(seconds)
    assert resumed.meta["seconds"] > seconds[-1]


def test_a_set_whose_soft_labels_all_peak_at_one_class_keeps_its_images_classes(tmp_path):
    """As a young teacher's soft labels (TESLA) can: the set must still count ipc images per class."""
    def one_peak(synset, iteration, stats):
        synset.labels = torch.zeros(len(synset.images), synset.num_classes)
        synset.labels[:, 0] = 1.0
        return stats

    with _patched_step(str(tmp_path / "log.jsonl"), [], one_peak):
        synset = ce.distill(toy_dataset(), iterations=1, **RUN)
    assert synset.is_soft and synset.ipc == 2
    assert synset.hard_labels.tolist() == [0, 0, 1, 1, 2, 2]


def _board_scalars(folder) -> dict:
    """{tag: [(step, value), ...]} of the TensorBoard events in `folder`, as TensorBoard reads them
    (events of purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_the_logged_numbers_per_iteration(tmp_path, monkeypatch):
    log, board = tmp_path / "log.jsonl", tmp_path / "board"
    monkeypatch.setattr(driver, "evaluate_now",
                        lambda synset, test_set, eval_options: types.SimpleNamespace(mean=0.25, std=0.5, accuracies=[]))
    ce.distill(toy_dataset(), iterations=4, test_set=toy_dataset(), eval_every=2, log=str(log),
               tensorboard=str(board), **RUN)
    scalars = _board_scalars(board)
    assert sorted(scalars) == ["eval/accuracy", "eval/std", "loss"]
    assert scalars["loss"] == [(r["iteration"], pytest.approx(r["loss"])) for r in _records(log)]
    assert scalars["eval/accuracy"] == [(2, 0.25), (4, 0.25)] and scalars["eval/std"] == [(2, 0.5), (4, 0.5)]


def test_tensorboard_after_a_crash_and_resume_holds_each_iteration_once(tmp_path):
    data = toy_dataset()
    board, ckpt = tmp_path / "board", str(tmp_path / "ckpt.pt")
    full_log = tmp_path / "full.jsonl"
    ce.distill(data, iterations=6, log=str(full_log), **RUN)

    with _patched_step(str(tmp_path / "seen.jsonl"), [], _crash_at_5), \
            pytest.raises(RuntimeError, match="crashed at iteration 5"):
        ce.distill(data, iterations=6, checkpoint=ckpt, checkpoint_every=3, tensorboard=str(board), **RUN)
    assert [step for step, _ in _board_scalars(board)["loss"]] == [1, 2, 3, 4]
    ce.distill(data, iterations=6, checkpoint=ckpt, resume=True, tensorboard=str(board), **RUN)
    assert _board_scalars(board)["loss"] == [(r["iteration"], pytest.approx(r["loss"])) for r in _records(full_log)]


def test_tensorboard_without_the_package_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with mock.patch.object(DM, "init", side_effect=AssertionError("set up despite the missing package")), \
            pytest.raises(MissingPackageError, match="pip install tensorboard"):
        ce.distill(toy_dataset(), iterations=2, tensorboard=str(tmp_path / "board"), **RUN)


@pytest.mark.parametrize("method,options", [
    ("dm", FAST), ("m3d", FAST), ("dsa", dict(outer_loop=2, inner_loop=1, batch_real=8, model="ConvNetW32")),
    ("dd", dict(batch_real=24, model="ConvNetW32", distill_steps=2, distill_epochs=2, decay_every=3)),
    ("idc", dict(inner_steps=1, batch_real=4, real_per_epoch=12, batch_net=6, model="ConvNetW32")),
    ("dq", dict(bins=2, batch_net=16, model="ConvNetW32"))])
def test_a_finished_shorter_run_extends_to_the_longer_run(method, options, tmp_path):
    """No step reads the total, so resuming a 2-iteration run's final checkpoint with
    iterations=4 must give the 4-iteration run bit for bit."""
    data = toy_dataset()
    run = dict(method=method, ipc=2, seed=1, progress=False, device="cpu", **options)
    longer = ce.distill(data, iterations=4, **run)
    ckpt = str(tmp_path / "ckpt.pt")
    shorter = ce.distill(data, iterations=2, checkpoint=ckpt, **run)
    assert not torch.equal(shorter.images, longer.images)
    extended = ce.distill(data, iterations=4, checkpoint=ckpt, resume=True, **run)
    assert torch.equal(extended.images, longer.images)
    assert load_checkpoint(ckpt)["iteration"] == 4 and extended.meta["options"]["iterations"] == 4


def test_resume_rejects_a_checkpoint_beyond_the_run(tmp_path):
    data = toy_dataset()
    ckpt = str(tmp_path / "ckpt.pt")
    ce.distill(data, iterations=3, checkpoint=ckpt, **RUN)
    with pytest.raises(ValueError, match="iteration 3, beyond this run's 2 iterations"):
        ce.distill(data, iterations=2, checkpoint=ckpt, resume=True, **RUN)


def test_resume_without_a_checkpoint_starts_afresh_and_says_where_it_looked(tmp_path, capsys):
    data = toy_dataset()
    ckpt = str(tmp_path / "ckpt.pt")
    fresh = ce.distill(data, iterations=2, **RUN)
    resumed = ce.distill(data, iterations=2, checkpoint=ckpt, resume=True, **dict(RUN, progress=True))
    assert torch.equal(resumed.images, fresh.images)
    assert f"no checkpoint at {ckpt} yet; starting from iteration 0" in capsys.readouterr().err
    ce.distill(data, iterations=2, checkpoint=ckpt, resume=True, **dict(RUN, progress=True))
    assert "no checkpoint" not in capsys.readouterr().err  # it found the one just written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("method,options", [
    ("dm", FAST), ("m3d", FAST), ("dsa", dict(outer_loop=2, inner_loop=1, batch_real=8, model="ConvNetW32"))])
def test_gpu_run_follows_the_cpu_run(method, options):
    """Same seed, same draws (nets, batches and DSA parameters come from counter-based or CPU
    generators): the GPU path (Triton epilogue and DSA, vmapped class gradients) lands where
    the CPU path does, up to TF32 convolutions and summation order."""
    data = toy_dataset()
    runs = {device: ce.distill(data, method=method, ipc=2, iterations=2, seed=0, progress=False, device=device,
                               **options) for device in ("cpu", "cuda")}
    assert runs["cuda"].images.device.type == "cuda"
    torch.testing.assert_close(runs["cuda"].images.cpu(), runs["cpu"].images, rtol=2e-2, atol=2e-2)
    if method != "dsa":  # the real images streamed from the host: the same batches reach the GPU
        streamed = ce.distill(data, method=method, ipc=2, iterations=2, seed=0, progress=False, device="cuda",
                              real_images_on="host", **options)
        torch.testing.assert_close(streamed.images, runs["cuda"].images, rtol=1e-4, atol=1e-4)  # atomics' order
