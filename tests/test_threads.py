"""--threads: Numba and the BLAS pools limited while a run computes, the previous settings restored afterwards."""
import json
import os

import numba
import numpy as np
import pytest
from helpers import make_blobs
from threadpoolctl import threadpool_info

from spacenet_np import threads, train

NET = ["--hidden", "20", "--connections", "40", "12", "--selected", "8", "--reserved", "2", "--epochs", "1",
       "--batch-size", "16", "--quiet"]


def blas_threads():
    return {pool["internal_api"]: pool["num_threads"] for pool in threadpool_info()}


def test_limited_sets_numba_blas_and_the_environment_then_restores_them(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before_numba, before_blas = numba.get_num_threads(), blas_threads()
    with threads.limited(1):
        assert numba.get_num_threads() == 1
        assert set(blas_threads().values()) <= {1}
        assert all(os.environ[name] == "1" for name in threads.ENV_VARS)
    assert numba.get_num_threads() == before_numba and blas_threads() == before_blas
    assert "OMP_NUM_THREADS" not in os.environ
    with threads.limited(None):  # the default: every core, nothing changed
        assert numba.get_num_threads() == before_numba


@pytest.mark.parametrize("n", [0, threads.max_threads() + 1, 1.5, True])
def test_a_bad_thread_count_is_named(n):
    with pytest.raises(ValueError, match=f"threads={n!r} must be an integer in \\[1, {threads.max_threads()}\\]"):
        with threads.limited(n):
            pass


def test_cli_runs_with_threads_and_gives_the_numbers_of_all_cores(tmp_path):
    x_train, y_train = make_blobs(4, 16, 12, seed=0)
    x_test, y_test = make_blobs(4, 16, 4, seed=1, centre_seed=0)
    np.savez(tmp_path / "d.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    args = ["--task", f"npz:{tmp_path / 'd.npz'}"] + NET
    before = numba.get_num_threads()
    assert train.main(args + ["--threads", "1", "--out", str(tmp_path / "one")]) == 0
    assert numba.get_num_threads() == before
    assert train.main(args + ["--out", str(tmp_path / "all")]) == 0
    one, every = (json.loads((tmp_path / name / "results.json").read_text())["runs"][0]["accuracy_matrix"]
                  for name in ("one", "all"))
    assert one == every


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads: threads=0 must be an integer in [1, "),
    (["--threads", "2", "--workers", "2"], "--threads sets the threads of a single-process run"),
    (["--resume", "RUN", "--threads", "0"], "--threads: threads=0 must be"),
])
def test_cli_refuses_bad_threads(tmp_path, capsys, argv, message):
    argv = [str(tmp_path) if a == "RUN" else a for a in argv]
    with pytest.raises(SystemExit) as stop:
        train.main(["--task", "split_mnist"] * ("--resume" not in argv) + argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err
