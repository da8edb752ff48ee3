"""File helpers shared by the readers: locating files, checksums and the decode cache."""
import contextlib
import errno
import fcntl
import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np


def find_file(directories, names, what: str) -> Path:
    """The first existing `directory/name`; otherwise FileNotFoundError listing every place tried."""
    tried = []
    for directory in directories:
        for name in names:
            candidate = Path(directory) / name
            if candidate.is_file():
                return candidate
            tried.append(str(candidate))
    raise FileNotFoundError(f"{what} not found; looked for: {', '.join(tried)}")


def require_dir(path: Path, what: str) -> Path:
    """`path` if it is a folder; otherwise FileNotFoundError saying what should be there."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: folder not found; expected {what}")
    return path


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where decoded arrays are cached: $CONDENSE_CACHE or ~/.cache/condense_engine."""
    override = os.environ.get("CONDENSE_CACHE")
    return Path(override) if override else Path.home() / ".cache" / "condense_engine"


@contextlib.contextmanager
def atomic_write(path: Path):
    """Yield a binary stream whose bytes replace `path` only once complete and on disk, so that
    readers (and a run that crashed mid-write) see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def cache_lock(path: Path):
    """Hold an exclusive lock on `path`.lock while inside, so that processes building the same
    cache file (the ranks of one machine loading a set the first time) take turns: the first
    builds it, the others then find it. Where no lock can be had (an unwritable folder, a file
    system without flock), each process goes on alone and may build its own."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_name(path.name + ".lock"), "a")
    except OSError:
        handle = None
    if handle is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:
            warnings.warn(f"cannot lock {handle.name} ({error}); loading without the lock")
            handle.close()
            handle = None
    if handle is None:
        yield
        return
    with handle:
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Write one array as .npy (memory-mappable: see `load_npy_shared`) atomically."""
    with atomic_write(path) as stream:
        np.save(stream, array, allow_pickle=False)


def save_text_atomic(path: Path, text: str) -> None:
    """Write a small text file atomically."""
    with atomic_write(path) as stream:
        stream.write(text.encode())


def load_npy_shared(path: Path) -> np.ndarray:
    """Map a .npy: pages come from the OS page cache, so processes on one machine (torchrun
    ranks) share one copy of a large decoded set, and nothing is read until used.

    The map is copy-on-write (a write stays private to the process). The kernel may refuse that
    for a file larger than the memory that could back the writes; the map is then read-only
    (`flags.writeable` False; writing into it would crash the process), with a warning.
    """
    try:
        return np.load(path, mmap_mode="c", allow_pickle=False)
    except OSError as error:
        if error.errno != errno.ENOMEM:
            raise
    warnings.warn(f"{path} ({path.stat().st_size / 2**30:.1f} GiB) is larger than this machine can map "
                  f"copy-on-write; it is mapped read-only, so the images must not be written in place")
    return np.load(path, mmap_mode="r", allow_pickle=False)
