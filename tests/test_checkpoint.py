"""checkpoint: atomic writes, versioned reads with clear errors, exact RNG resume, signal handling."""
import datetime
import os
import random
import signal
import threading
import time

import numpy as np
import pytest
import torch

from condense_engine import checkpoint
from condense_engine.checkpoint import (
    atomic_save,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    stop_flag_on_signal,
)


def test_atomic_save_writes_creates_folders_and_leaves_no_temp(tmp_path):
    target = tmp_path / "deep" / "er" / "state.pt"
    atomic_save({"x": torch.arange(5)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.arange(5))
    assert os.listdir(target.parent) == ["state.pt"]


def test_atomic_save_failure_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "state.pt"
    atomic_save({"version": "old"}, target)
    real_save = torch.save

    def save_half_then_fail(obj, handle):
        real_save(obj, handle)
        handle.truncate(10)
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"version": "new"}, target)
    assert os.listdir(tmp_path) == ["state.pt"]
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"version": "old"}


def test_atomic_save_failure_without_old_file_leaves_nothing(tmp_path, monkeypatch):
    def fail(obj, handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"a": 1}, tmp_path / "state.pt")
    assert os.listdir(tmp_path) == []


def test_save_checkpoint_round_trip(tmp_path):
    state = {"iteration": 6, "images": torch.randn(2, 1, 3, 3), "options": {"lr": 0.1, "tags": ("a", 1)}}
    save_checkpoint(state, tmp_path / "run.pt")
    loaded = load_checkpoint(tmp_path / "run.pt")
    assert loaded["iteration"] == 6 and loaded["options"] == {"lr": 0.1, "tags": ("a", 1)}
    assert torch.equal(loaded["images"], state["images"])

def test_load_checkpoint_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(missing)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(300))
    with pytest.raises(ValueError, match="garbage.pt"):
        load_checkpoint(garbage)

    text = tmp_path / "text.pt"
    text.write_bytes(b"garbage\n")
    with pytest.raises(ValueError, match="text.pt.*corrupt or truncated") as raised:
        load_checkpoint(text)
    assert "weights_only" not in str(raised.value)  # not torch's advice to load it unsafely

    pickled_object = tmp_path / "object.pt"
    torch.save({"format": checkpoint.CHECKPOINT_KIND, "when": datetime.date(2026, 1, 1)}, pickled_object)
    with pytest.raises(ValueError, match=r"object.pt.*datetime\.date") as raised:
        load_checkpoint(pickled_object)
    assert "weights_only" not in str(raised.value)

    truncated = tmp_path / "truncated.pt"
    save_checkpoint({"x": torch.randn(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.pt.*corrupt or truncated"):
        load_checkpoint(truncated)

    foreign = tmp_path / "foreign.pt"
    torch.save({"model": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="foreign.pt is not a condense-engine file"):
        load_checkpoint(foreign)


def test_load_checkpoint_refuses_newer_version(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format": checkpoint.CHECKPOINT_KIND, "format_version": checkpoint.FORMAT_VERSION + 1,
                "state": {}}, path)
    with pytest.raises(ValueError, match="future.pt.*upgrade"):
        load_checkpoint(path)


def _draw_everything(generator):
    return (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(),
            torch.randn(2, generator=generator).tolist())


def test_rng_state_round_trip_through_a_checkpoint_repeats_draws(tmp_path):
    generator = torch.Generator().manual_seed(7)
    _draw_everything(generator)
    np.random.randn()  # leaves numpy with a cached gaussian, part of its state
    save_checkpoint({"rng": capture_rng_state([generator])}, tmp_path / "rng.pt")
    expected = _draw_everything(generator)
    _draw_everything(generator)

    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"], [generator])
    assert _draw_everything(generator) == expected
    assert _draw_everything(generator) != expected


def test_restore_rng_state_checks_generator_count():
    state = capture_rng_state([torch.Generator()])
    with pytest.raises(ValueError, match="1 generator state"):
        restore_rng_state(state)


def test_signal_sets_the_flag_without_interrupting():
    before_term, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with stop_flag_on_signal() as stop:
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the handler runs between bytecodes; give it a moment
            if stop.is_set():
                break
            time.sleep(0.01)
        assert stop.is_set()
    assert signal.getsignal(signal.SIGTERM) is before_term
    assert signal.getsignal(signal.SIGINT) is before_int


def test_second_signal_interrupts():
    with stop_flag_on_signal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)


def test_signal_flag_outside_main_thread_is_inert():
    outcome = []

    def worker():
        with stop_flag_on_signal() as stop:
            outcome.append((signal.getsignal(signal.SIGTERM), stop.is_set()))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert outcome == [(signal.getsignal(signal.SIGTERM), False)]
