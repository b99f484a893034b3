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
    atomic_write_encoded(path, lambda: payload)


def atomic_write_encoded(path, encode):
    """Write the bytes ``encode()`` returns to ``path`` atomically; SIGINT and SIGTERM wait for the encoding too
    (one that lands inside ``zipfile`` leaves a write handle open, and closing the zip then raises ValueError in
    place of the interruption)."""
    with signals_deferred():
        _write(Path(path), encode())


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
    """Hold SIGINT and SIGTERM back for the duration (in the main thread): a signal that arrives meanwhile is
    recorded and raised again, to the handler that was in place, as soon as the block ends.

    Recorded by Python handlers rather than blocked with ``pthread_sigmask``: the system may deliver a signal to any
    thread that does not block it (a Numba or executor thread), and Python then runs the handler in the main thread
    at once, in the middle of the block.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived = []
    held = [signum for signum in DEFERRED_SIGNALS if signal.getsignal(signum) is not None]  # None: set outside Python
    previous = {signum: signal.signal(signum, lambda number, frame: arrived.append(number)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if arrived:
            signal.raise_signal(arrived[0])


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
