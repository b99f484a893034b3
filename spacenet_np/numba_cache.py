"""Where Numba caches the compiled kernels; chosen before ``numba`` is imported (``kernels`` calls ``configure``).

The kernels are compiled with ``cache=True``. Numba writes that cache next to the source
(``spacenet_np/__pycache__``), else in its user-wide folder (``~/.cache/numba``), and ``njit(cache=True)`` raises
at import when neither is writable: a read-only installation run by a user without a writable home. The choice,
first that works:

1. ``$NUMBA_CACHE_DIR``, when set and writable (respected as is);
2. the package's ``__pycache__`` (Numba's default);
3. ``$XDG_CACHE_HOME/spacenet_np/numba``, else ``~/.cache/spacenet_np/numba``;
4. ``spacenet_np-numba-<uid>`` in the temporary folder, created private (0700) and used only if it is ours and
   private: Numba's cache index is a pickle, so a folder others can write would let them run code in this process;
5. no cache, with one warning: every process compiles the kernels it uses again (seconds each).

For 3 and 4, ``NUMBA_CACHE_DIR`` is set in ``os.environ`` (Numba reads it when it is imported) and in
``numba.config.CACHE_DIR`` if numba is already imported. "Writable" means a probe file can be created in the
folder, Numba's own test, so it holds for root too (for whom permission bits do not count).

``load_without_registries`` makes a process that finds every kernel it runs in the cache skip Numba's compiler
set-up (about 0.4 s of imports, a sixth of a split MNIST run).
"""
import os
import stat
import sys
import tempfile
import warnings
from pathlib import Path

ENV_VAR = "NUMBA_CACHE_DIR"
KINDS = ("env", "package", "user", "temp", "off")


def numba_cache_dir(package_dir, env, home):
    """The cache folder for the kernels in ``package_dir``: ``(kind, folder)``, kind one of ``KINDS``.

    ``env`` is a mapping like ``os.environ`` (``NUMBA_CACHE_DIR``, ``XDG_CACHE_HOME``, ``TMPDIR``); ``home`` the
    home folder (or None). ``folder`` is a Path, None for ``"off"``. May create the folder it returns.
    """
    given = env.get(ENV_VAR)
    if given and _writable(Path(given)):
        return "env", Path(given)
    in_tree = Path(package_dir) / "__pycache__"
    if _writable(in_tree):
        return "package", in_tree
    base = env.get("XDG_CACHE_HOME") or (Path(home) / ".cache" if home else None)
    if base and _writable(Path(base) / "spacenet_np" / "numba"):
        return "user", Path(base) / "spacenet_np" / "numba"
    temp = Path(env.get("TMPDIR") or tempfile.gettempdir()) / f"spacenet_np-numba-{_user_id()}"
    if _private(temp) and _writable(temp):
        return "temp", temp
    return "off", None


def configure():
    """Apply ``numba_cache_dir`` to this package. Returns whether the kernels may be compiled with ``cache=True``."""
    kind, folder = numba_cache_dir(Path(__file__).resolve().parent, os.environ, os.path.expanduser("~"))
    if kind in ("user", "temp"):
        os.environ[ENV_VAR] = str(folder)
        if "numba" in sys.modules:  # too late for the environment variable; the locator reads the config
            sys.modules["numba"].config.CACHE_DIR = str(folder)
    elif kind == "off":
        warnings.warn("spacenet_np: no writable folder for Numba's cache (NUMBA_CACHE_DIR, the package folder, "
                      "~/.cache, the temporary folder); the kernels are compiled again in every process",
                      RuntimeWarning, stacklevel=2)
    return kind != "off"


def _writable(folder):
    """Whether ``folder`` exists or can be created, and a file can be created in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


def _private(folder):
    """Create ``folder`` (0700) if missing; whether it is a real folder owned by this user that others cannot write."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.lstat()
    except OSError:
        return False
    owned = not hasattr(os, "getuid") or info.st_uid == os.getuid()
    return stat.S_ISDIR(info.st_mode) and owned and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _user_id():
    return os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")


def load_without_registries(namespace):
    """Load the cached builds of the Numba kernels in ``namespace`` (a module's globals: dispatchers, and tuples of
    them) without first loading Numba's compiler registries.

    Numba's ``Cache.load_overload`` refreshes its target context before reading the cache: it imports every typing
    and lowering module (``numba.np.linalg`` imports ``scipy.linalg``, then ``numba.typed``, ...), about 0.4 s in a
    new process, and none of it is needed to run machine code that is already compiled. A cached kernel needs the
    NRT (its memory allocator's symbols) and its ``reload_init`` hooks (the threading layer of a parallel kernel),
    which the load runs. A cache miss compiles, and Numba's compiler refreshes the context itself.

    Only the kernels' own caches change, never Numba's class. With a Numba that lacks the private methods used here,
    or with the cache off, nothing changes.
    """
    from numba.core.caching import FunctionCache
    from numba.core.dispatcher import Dispatcher
    from numba.core.runtime import rtsys

    if not all(hasattr(FunctionCache, name) for name in ("_load_overload", "_guard_against_spurious_io_errors")):
        return

    class KernelCache(FunctionCache):
        def load_overload(self, sig, target_context):
            rtsys.initialize(target_context)
            with self._guard_against_spurious_io_errors():
                return self._load_overload(sig, target_context)

    for value in namespace.values():
        for kernel in value if isinstance(value, tuple) else (value,):  # a tuple: serial and parallel builds
            if isinstance(kernel, Dispatcher) and type(getattr(kernel, "_cache", None)) is FunctionCache:
                kernel._cache.__class__ = KernelCache  # the same state; a new cache would probe its folder again
