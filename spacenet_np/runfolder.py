"""A run folder belongs to one run: what it holds, who writes it now, and what a new run may do to it.

``OUT/run.json`` records the run (its spec without the seed, its seeds, and the command line). While a process
writes the folder it holds ``OUT/.lock``, a JSON file with its pid and host; a lock whose process is gone (same
host, pid not alive) is stale and is taken over. A new run into a folder that holds another run's files is refused
unless ``overwrite`` is given; a refused run changes nothing in the folder.
"""
import json
import os
import shutil
import socket
import time
from pathlib import Path

from .fileio import WriteError, atomic_write_json

RUN_FILES = ("run.json", "results.json", "runs.csv", "args.json", "checkpoints", "snapshots")


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked: held by another process, another run's files, not a folder."""


class RunFolder:
    """The files of one run under ``path``: results.json, runs.csv, run.json, checkpoints/ and snapshots/."""

    def __init__(self, path):
        self.path = Path(path)
        self.results = self.path / "results.json"
        self.csv = self.path / "runs.csv"
        self.run_json = self.path / "run.json"
        self.lock_file = self.path / ".lock"
        self.locked = False

    def checkpoint(self, seed):
        return self.path / "checkpoints" / f"seed{seed}.ckpt"

    def snapshots(self, seed):
        return self.path / "snapshots" / f"seed{seed}.npz"

    # ----- what the folder holds -----
    def check_usable(self):
        """RunFolderError unless the path is a folder or does not exist yet."""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"{self.path} is a file, not a run folder")

    def run_files(self):
        """The names of run files present (another run's, for a new run)."""
        return [name for name in RUN_FILES if (self.path / name).exists()]

    def check_new(self, overwrite):
        """For a new run: RunFolderError if the folder holds another run's files and ``overwrite`` is False."""
        self.check_usable()
        present = self.run_files()
        if present and not overwrite:
            raise RunFolderError(f"{self.path} holds another run's files ({', '.join(present)}): pass --overwrite "
                                 f"to replace them, --resume {self.path} to continue that run, or another --out")

    def read_run(self):
        """The run.json of a folder to resume; RunFolderError if it is not a run folder of this CLI."""
        self.check_usable()
        try:
            run = json.loads(self.run_json.read_text())
        except FileNotFoundError:
            raise RunFolderError(f"{self.run_json} not found: {self.path} is not a run folder of this CLI") from None
        except (OSError, ValueError) as err:
            raise RunFolderError(f"{self.run_json} cannot be read: {err}") from None
        if not isinstance(run, dict) or run.get("format") != "spacenet_np.run":
            raise RunFolderError(f"{self.run_json} is not a spacenet_np run record")
        return run

    def clear(self):
        """Remove another run's files (for --overwrite), after the lock is held."""
        for name in RUN_FILES:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    def write_run(self, record):
        atomic_write_json(self.run_json, {"format": "spacenet_np.run", **record})

    # ----- the lock -----
    def lock(self):
        """Hold the folder's lock, taking over a stale one. RunFolderError naming the holder if a live process
        holds it; WriteError if the folder cannot be written."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise WriteError(err.errno, f"cannot create {self.path}: {err.strerror or err}") from None
        body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        for _ in range(3):
            try:
                fd = os.open(self.lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None and self._lock_age() < 10.0:  # just created: its writer is filling it in
                    holder = {"pid": "?", "host": "?"}
                if holder is not None and not stale(holder):
                    raise RunFolderError(f"{self.path} is in use by process {holder.get('pid')} on "
                                         f"{holder.get('host')} (lock file {self.lock_file}); wait for it to end, "
                                         f"or use another --out") from None
                self.lock_file.unlink(missing_ok=True)  # stale or unreadable: the writer is gone
                continue
            except OSError as err:
                raise WriteError(err.errno, f"cannot write {self.lock_file}: {err.strerror or err}") from None
            with os.fdopen(fd, "w") as f:
                f.write(body)
            self.locked = True
            return
        raise RunFolderError(f"{self.path}: could not take the lock {self.lock_file}")

    def holder(self):
        """The lock's {"pid", "host", ...}, or None if it is unreadable or half-written."""
        try:
            holder = json.loads(self.lock_file.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _lock_age(self):
        try:
            return time.time() - self.lock_file.stat().st_mtime
        except OSError:
            return float("inf")

    def unlock(self):
        if self.locked:
            self.lock_file.unlink(missing_ok=True)
            self.locked = False


def stale(holder):
    """Whether a lock's holder is gone: same host and no process with its pid. A lock from another host is never
    stale (its process cannot be checked from here)."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by someone else
        return False
    return False
