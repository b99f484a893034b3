"""Atomic file writes: a temporary file in the same folder, then a rename, so readers never see half a file.

A failed write raises ``WriteError`` (an OSError) whose message names the file and the cause, and leaves no
temporary file behind. SIGINT and SIGTERM are held back while a file is written (in the main thread) and act
right after it, so a signal never leaves a temporary file or half a write.
"""
import contextlib
import json
import os
import signal
import tempfile
import threading
from pathlib import Path

DEFERRED_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class WriteError(OSError):
    """A file could not be written: the message names the path and the cause (full disk, permissions, ...)."""

    def __str__(self):
        return self.strerror


def atomic_write_bytes(path, payload):
    """Write ``payload`` to ``path`` atomically, creating the folder if needed. WriteError on failure."""
    with signals_deferred():
        _write(Path(path), payload)


def _write(path, payload):
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _remove(tmp)
        raise WriteError(err.errno, f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def signals_deferred():
    """Block SIGINT and SIGTERM in the main thread for the duration; a signal that arrived meanwhile is delivered
    (and its Python handler runs) as soon as they are unblocked."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _remove(tmp):
    if tmp is not None:
        Path(tmp).unlink(missing_ok=True)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path, obj):
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())
