"""Numba's cache folder on a read-only installation: the choice (``numba_cache_dir``) on folders where writing
really fails, also for root (paths under a regular file), and a fresh interpreter importing a copy of the package
whose ``__pycache__`` cannot be created, with an unwritable home."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spacenet_np.numba_cache import numba_cache_dir

PACKAGE = Path(__file__).resolve().parent.parent / "spacenet_np"


@pytest.fixture
def blocked(tmp_path):
    """A regular file: no folder can be created below it, whatever the permissions (root included)."""
    path = tmp_path / "a-regular-file"
    path.write_bytes(b"")
    return path


def test_numba_cache_dir_set_and_writable_is_respected(tmp_path, blocked):
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "mine"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert numba_cache_dir(tmp_path / "pkg", env, tmp_path / "home") == ("env", tmp_path / "mine")
    assert numba_cache_dir(blocked / "pkg", env, blocked) == ("env", tmp_path / "mine")


def test_writable_package_folder_keeps_numbas_default(tmp_path, blocked):
    env = {"NUMBA_CACHE_DIR": str(blocked / "unwritable"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert numba_cache_dir(tmp_path / "pkg", env, tmp_path) == ("package", tmp_path / "pkg" / "__pycache__")
    assert numba_cache_dir(tmp_path / "pkg", {}, None)[0] == "package"
    assert not (tmp_path / "xdg").exists()


def test_read_only_package_uses_the_user_cache_folder(tmp_path, blocked):
    package = blocked / "site-packages" / "spacenet_np"
    xdg = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert numba_cache_dir(package, xdg, blocked) == ("user", tmp_path / "xdg" / "spacenet_np" / "numba")
    home = tmp_path / "home"
    assert numba_cache_dir(package, {}, home) == ("user", home / ".cache" / "spacenet_np" / "numba")
    assert (home / ".cache" / "spacenet_np" / "numba").is_dir()


def test_without_a_writable_home_a_private_temporary_folder(tmp_path, blocked):
    env = {"XDG_CACHE_HOME": str(blocked / "xdg"), "TMPDIR": str(tmp_path / "tmp")}
    kind, folder = numba_cache_dir(blocked / "pkg", env, blocked / "home")
    assert kind == "temp" and folder.parent == tmp_path / "tmp" and folder.name.startswith("spacenet_np-numba-")
    assert folder.stat().st_mode & 0o777 == 0o700


def test_a_temporary_folder_others_can_write_is_not_used(tmp_path, blocked):
    """Numba's cache index is a pickle: a folder another user could fill must not be loaded from."""
    env = {"TMPDIR": str(tmp_path / "tmp")}
    _, folder = numba_cache_dir(blocked / "pkg", env, blocked)
    folder.chmod(0o777)
    assert numba_cache_dir(blocked / "pkg", env, blocked) == ("off", None)


def test_nothing_writable_turns_the_cache_off(blocked):
    env = {"NUMBA_CACHE_DIR": str(blocked / "n"), "XDG_CACHE_HOME": str(blocked / "x"), "TMPDIR": str(blocked / "t")}
    assert numba_cache_dir(blocked / "pkg", env, blocked / "home") == ("off", None)


SCRIPT = """
import os, sys, warnings
import numpy as np
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import spacenet_np
    from spacenet_np import kernels
assert spacenet_np.__file__.startswith(sys.argv[1]), spacenet_np.__file__  # the read-only copy, not the checkout
weights, importance = np.zeros(3, np.float32), np.zeros(3, np.float32)
kernels.sgd_step_with_importance[0](np.arange(3), np.ones(3, np.float32), np.float32(0.5), weights, importance)
assert weights.tolist() == [-0.5] * 3 and importance.tolist() == [0.5] * 3
print(kernels.CACHE, os.environ.get("NUMBA_CACHE_DIR"), len(caught))
for warning in caught:
    print(warning.message)
"""


@pytest.mark.parametrize("temp_writable", [True, False], ids=["temp-folder", "no-cache"])
def test_import_from_a_read_only_installation(tmp_path, blocked, temp_writable):
    """No writable __pycache__ (a file of that name), home and XDG cache under a regular file, NUMBA_CACHE_DIR
    unset: without the choice, ``njit(cache=True)`` raises "no locator available" at import."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / "spacenet_np", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "spacenet_np" / "__pycache__").write_bytes(b"")
    temp = tmp_path / "tmp" if temp_writable else blocked / "tmp"
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "PYTHONPATH")}
    env.update(HOME=str(blocked / "home"), XDG_CACHE_HOME=str(blocked / "cache"), TMPDIR=str(temp),
               PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(site)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    cache, folder, n_warnings, *messages = done.stdout.split(maxsplit=3)
    if temp_writable:
        assert (cache, n_warnings) == ("True", "0")
        assert Path(folder).parent == temp
        assert list(Path(folder).rglob("*sgd_step_with_importance*.nbi")), "the kernel was not cached"
    else:
        assert (cache, folder, n_warnings) == ("False", "None", "1")
        assert "no writable folder for Numba's cache" in messages[0]


CACHED_RUN = """
import hashlib, sys
import numpy as np
from spacenet_np import SparseCNN, SparseMLP, SpaceNet, SpaceNetConfig, kernels

kernels.PARALLEL_MIN_WORK = 0 if sys.argv[1] == "parallel" else 1 << 62
rng = np.random.default_rng(0)
images, labels = rng.random((96, 2 * 8 * 8), dtype=np.float32), np.repeat(np.arange(4), 24)
digest = hashlib.sha256()
for model, density in ((SparseMLP(128, (20, 20), 4), 0.2), (SparseCNN((2, 8, 8), (6, 6, 6, 6), (12,), 4), 0.12)):
    n_layers = len(model.layers)
    config = SpaceNetConfig(connections_per_task=(density,) * n_layers, selected_neurons=(None,) * (n_layers - 1),
                            reserved_neurons=(1,) * (n_layers - 1), epochs=2, batch_size=16, lr=0.05)
    learner = SpaceNet(model, config, seed=3, input_mean=0.5, input_std=0.3)
    for task in (0, 1):
        chosen = (labels // 2) == task
        learner.learn(images[chosen], labels[chosen], np.array([2 * task, 2 * task + 1]))
    digest.update(learner.predict(images).tobytes())
    for layer in model.layers:
        digest.update(layer.W.data.tobytes())
print(digest.hexdigest(), "numba.np.arraymath" in sys.modules)
"""


@pytest.mark.parametrize("build", ["serial", "parallel"])
def test_cached_kernels_load_without_numba_compiler_registries(tmp_path, build):
    """A process that finds its kernels in the cache does not import Numba's compiler registries
    (``load_without_registries``) and computes the same bits as the process that compiled them: MLP and CNN
    SpaceNet, two tasks, weights and predictions; the parallel builds (threading layer loaded from the cache) too."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache"), "NUMBA_NUM_THREADS": "2"}
    runs = [subprocess.run([sys.executable, "-c", CACHED_RUN, build], env=env, capture_output=True, text=True,
                           timeout=900) for _ in range(2)]
    assert [run.returncode for run in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    (compiled_digest, compiled_registries), (loaded_digest, loaded_registries) = [r.stdout.split() for r in runs]
    assert compiled_registries == "True", "the first run found a cache in a new folder"
    assert loaded_registries == "False", "loading from the cache imported Numba's compiler registries"
    assert loaded_digest == compiled_digest
