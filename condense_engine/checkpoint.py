"""Atomic checkpoints, versioned file reading with clear errors, exact RNG resume, SIGTERM handling.

A distillation driver saves `{"images": ..., "method": ..., "rng": capture_rng_state(...)}` every
N iterations with `save_checkpoint`; every write goes through `atomic_save`, so a crash or a
kill mid-write never leaves a half-written file under the target name. Files hold only tensors
and plain Python values, so `torch.load(weights_only=True)` reads them.
"""
import contextlib
import os
import random
import signal
import tempfile
import threading
import uuid

import numpy as np
import torch

FORMAT_VERSION = 1
CHECKPOINT_KIND = "condense-engine/checkpoint"


def require_writable_folder(folder, what: str) -> None:
    """Create `folder` and check that files can be written there (ValueError naming `what` it
    was for), so a path that cannot work fails before a long run rather than at its first save."""
    folder = os.fspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"cannot write {what} to {folder}: {error.strerror or error}") from None


def atomic_save(obj, path) -> str:
    """`torch.save(obj)` to `path` so readers see either the old file or the complete new one.

    Writes a temp file in the same folder, flushes and fsyncs it, renames it over `path`, then
    fsyncs the folder so the rename itself survives a power cut. The temp file is removed when
    anything fails. Parent folders are created. Returns `path`.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temp_path = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temp_path, "xb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp_path)
        raise
    _fsync_folder(folder)
    return path


def _fsync_folder(folder: str) -> None:
    """Persist a rename in `folder` (POSIX only: other systems cannot open a folder to fsync it)."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_torch_file(path, map_location=None, mmap: bool = False):
    """`torch.load(path, weights_only=True)` with errors that name the file and say what is wrong
    (`mmap`: tensors are memory-mapped, read from disk only where used).

    FileNotFoundError when it does not exist; ValueError when it is not a readable PyTorch file
    (corrupt, truncated, random bytes, or it pickles objects other than tensors and plain values).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"expected a file, got a folder: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except OSError:
        raise
    except Exception as error:
        raise ValueError(f"{path} is not a readable PyTorch file of tensors and plain values "
                         f"(corrupt or truncated?): {load_failure_reason(error)}") from error


def load_failure_reason(error: Exception) -> str:
    """The line of a `torch.load` error that says what is wrong with the file.

    A weights-only failure opens with torch's generic advice to retry with `weights_only=False`,
    which is wrong for a corrupt file and unsafe for an untrusted one; its cause follows the
    `WeightsUnpickler error:` marker.
    """
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def load_versioned(path, kind: str, max_version: int, map_location=None) -> dict:
    """Read a condense-engine file of the given `kind` and check its format (see `check_format`)."""
    return check_format(read_torch_file(path, map_location), kind, max_version, os.fspath(path))


def check_format(content, kind: str, max_version: int, source: str) -> dict:
    """Check that `content` is a condense-engine dict of `kind` in a version this code reads.

    Every condense-engine file is a dict with "format" (its kind) and "format_version". Content of
    another kind, or not ours at all, raises ValueError naming `source` and what was expected; a
    version newer than `max_version` raises ValueError asking to upgrade.
    """
    found_kind = content.get("format") if isinstance(content, dict) else None
    if not isinstance(found_kind, str) or not found_kind.startswith("condense-engine/"):
        raise ValueError(f"{source} is not a condense-engine file: expected a dict with "
                         f"format={kind!r} and a format_version, got {_describe(content)}")
    if found_kind != kind:
        raise ValueError(f"{source} holds a {found_kind!r} file, expected {kind!r}")
    version = content.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{source} has an invalid format_version {version!r} (expected an int ≥ 1)")
    if version > max_version:
        raise ValueError(f"{source} was written in format version {version}, but this condense-engine "
                         f"reads versions up to {max_version}; upgrade condense-engine to read it")
    return content


def _describe(content) -> str:
    if isinstance(content, dict):
        keys = sorted(map(str, content))
        return f"a dict with keys {keys[:8]}{' ...' if len(keys) > 8 else ''}"
    return f"a {type(content).__name__}"


def save_checkpoint(state: dict, path) -> str:
    """Write a driver's resume state atomically, tagged with the checkpoint kind and version."""
    return atomic_save({"format": CHECKPOINT_KIND, "format_version": FORMAT_VERSION, "state": state}, path)


def load_checkpoint(path, map_location=None) -> dict:
    """The state dict written by `save_checkpoint`, with clear errors."""
    return load_versioned(path, CHECKPOINT_KIND, FORMAT_VERSION, map_location)["state"]


def capture_rng_state(generators=()) -> dict:
    """Every random stream a run draws from: python, numpy, torch CPU, all CUDA devices, `generators`.

    The result holds only tensors and plain values, so it can go into a checkpoint and be read
    back with weights_only=True.
    """
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": [generator.get_state() for generator in generators],
    }


def restore_rng_state(state: dict, generators=()) -> None:
    """Put every stream back where `capture_rng_state` found it, so the next draws repeat exactly.

    `generators` must be the same torch.Generator objects (same number, same order) as at capture.
    CUDA states are restored only when CUDA is available.
    """
    generators = list(generators)
    if len(generators) != len(state["generators"]):
        raise ValueError(f"the RNG state holds {len(state['generators'])} generator state(s) "
                         f"but {len(generators)} generator(s) were passed")
    version, internal_state, gauss_next = state["python"]
    random.setstate((version, tuple(internal_state), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["key"].cpu().numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([cuda_state.cpu() for cuda_state in state["cuda"]])
    for generator, generator_state in zip(generators, state["generators"]):
        generator.set_state(generator_state.cpu())


@contextlib.contextmanager
def stop_flag_on_signal():
    """Inside the block, SIGTERM/SIGINT set the yielded threading.Event instead of interrupting.

    A driver checks the flag between iterations, so the checkpoint it then writes holds a
    consistent state (never one cut in the middle of an update). A second signal after the
    flag is set interrupts at once. The previous handlers come back on exit; outside the main
    thread (where Python cannot install handlers) the flag is simply never set.
    """
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handle(signum, frame):
        if flag.is_set():
            raise KeyboardInterrupt(f"stopped by a second {signal.Signals(signum).name}")
        flag.set()

    watched = (signal.SIGTERM, signal.SIGINT)
    previous = {signum: signal.getsignal(signum) for signum in watched}
    for signum in watched:
        signal.signal(signum, handle)
    try:
        yield flag
    finally:
        for signum, handler in previous.items():
            # None means a handler installed outside Python; the default is the closest we can restore.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
