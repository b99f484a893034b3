"""The execution engine on real Dask local clusters (worker processes): outcomes in this process, one thread per
run, a run in a worker identical to one in this process, failures that lose only their run (an exception, a worker
process that dies), Ctrl-C, and refused arguments."""
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import write_tiny_dataset

from spacenet_np import engine, experiment
from spacenet_np.strategy import TrainingDiverged


# Module-level functions, so the worker processes can import them (tests/ is on their sys.path too).
def probe(spec, checkpoint_path):
    """What a run sees in its worker: its arguments, process, and thread limits."""
    import numba
    from threadpoolctl import threadpool_info
    return {"spec": spec, "path": checkpoint_path, "pid": os.getpid(), "numba": numba.get_num_threads(),
            "blas": [pool["num_threads"] for pool in threadpool_info()],
            "sigint_ignored": signal.getsignal(signal.SIGINT) == signal.SIG_IGN}


def fragile(spec, checkpoint_path):
    """``spec`` is an instruction: 'raise' diverges, 'die:PATH' kills the worker process the first time (PATH
    marks that it did), 'die' every time; anything else returns itself."""
    if spec == "raise":
        raise TrainingDiverged("the training loss became nan")
    if spec.startswith("die:") and not os.path.exists(spec[4:]):
        open(spec[4:], "w").close()
        os._exit(3)
    if spec == "die":
        os._exit(3)
    return spec


def sleepy(spec, checkpoint_path):
    time.sleep(1.0)
    return spec


def test_runs_are_single_threaded_in_worker_processes():
    seen = []
    jobs = [(k, {"n": k}, f"/ckpt/{k}" if k % 2 else None) for k in range(4)]
    outcomes = engine.execute(jobs, workers=2, function=probe, on_result=lambda k, o: seen.append((k, o)))
    assert sorted(k for k, _ in seen) == [0, 1, 2, 3] and dict(seen) == outcomes
    for key, spec, path in jobs:
        outcome = outcomes[key]
        assert outcome["spec"] == spec and outcome["path"] == path
        assert outcome["pid"] != os.getpid()
        assert outcome["numba"] == 1 and outcome["blas"] and set(outcome["blas"]) == {1}
        assert outcome["sigint_ignored"]  # a terminal's Ctrl-C reaches the client only
    assert len({o["pid"] for o in outcomes.values()}) <= 2


def test_a_run_in_a_worker_equals_the_run_in_this_process(tmp_path):
    write_tiny_dataset(tmp_path / "data", "mnist", n_train=200, n_test=100)
    spec = experiment.make_spec("split_mnist", seed=3, hidden=[30, 30], validation=0.1, data_dir=tmp_path / "data",
                                config={"connections_per_task": [300, 50, 20], "selected_neurons": 10,
                                        "reserved_neurons": 4, "epochs": 2, "batch_size": 16})
    record = engine.execute([("run", spec, tmp_path / "run.ckpt")], workers=1)["run"]
    here = experiment.run(spec)
    for key in ("accuracy_matrix", "val_accuracy_matrix", "val_final_average_accuracy", "connections_per_layer"):
        assert record[key] == here[key]
    assert (tmp_path / "run.ckpt").exists()  # the worker checkpointed where it was told


def test_failures_lose_only_their_run(tmp_path):
    marker = tmp_path / "died-once"
    jobs = [("dies once", f"die:{marker}", None), ("fine", "fine", None), ("diverges", "raise", None)]
    outcomes = engine.execute(jobs, workers=2, function=fragile, retries=1)
    assert marker.exists()  # the first attempt killed its worker; Dask ran it again on a new one
    assert outcomes["dies once"] == f"die:{marker}" and outcomes["fine"] == "fine"
    assert outcomes["diverges"] == {"error": "the training loss became nan", "error_type": "TrainingDiverged"}


def test_a_worker_that_keeps_dying_is_a_failed_run():
    outcomes = engine.execute([("dies", "die", None)], workers=1, function=fragile, retries=0)
    assert outcomes["dies"]["error_type"] == "KilledWorker" and "die" in outcomes["dies"]["error"]


def test_ctrl_c_cancels_the_pending_runs_and_closes_the_cluster():
    seen = []

    def interrupt(key, outcome):
        seen.append(key)
        raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        engine.execute([(k, k, None) for k in range(8)], workers=1, function=sleepy, on_result=interrupt)
    assert seen == [0]
    assert time.monotonic() - start < 6.0  # the other seven runs (7 s on one worker) were cancelled
    assert multiprocessing.active_children() == []  # the worker processes are gone


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kwargs, problem", [
    ({"jobs": [(1, {}, None), (1, {}, None)]}, "every job needs its own key"),
    ({"workers": 0}, r"workers=0 must be an integer >= 1"),
    ({"workers": 2, "scheduler": "tcp://127.0.0.1:8786"}, "workers applies to the local cluster"),
    ({"retries": -1}, r"retries=-1 must be an integer >= 0"),
    ({"scheduler": "nonsense"}, r"scheduler address 'nonsense': missing port number"),
])
def test_bad_arguments_are_refused(kwargs, problem):
    jobs = kwargs.pop("jobs", [(1, {}, None)])
    with pytest.raises(engine.EngineError, match=problem):
        engine.execute(jobs, **kwargs)


def test_unreachable_scheduler_is_named(monkeypatch):
    monkeypatch.setattr(engine, "CONNECT_TIMEOUT", "1s")
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(engine.EngineError, match=f"cannot reach the Dask scheduler at {address}"):
        engine.execute([(1, {}, None)], scheduler=address)


def test_no_jobs_start_no_cluster():
    assert engine.execute([], workers=1) == {}
    assert multiprocessing.active_children() == []


def test_kernels_compile_in_workers_with_a_cold_cache(tmp_path):
    """The CLI's workers compile the kernels themselves (a new machine: empty Numba cache) and give the numbers of
    the sequential run. Workers run one thread each, so they take the serial builds; the sequential run, on every
    core, compiles the parallel ones. The CLI module imports Numba before Dask sets the workers' environment
    (spawned workers import the main module first)."""
    write_tiny_dataset(tmp_path / "data", "mnist", n_train=1000, n_test=50)
    # 70000 input connections x batch 128 is above kernels.PARALLEL_MIN_WORK: the parallel builds run with threads
    args = ["--task", "split_mnist", "--data-dir", str(tmp_path / "data"), "--hidden", "2000", "20",
            "--connections", "70000", "30", "10", "--selected", "300", "8", "--reserved", "2", "2", "--epochs", "1",
            "--seeds", "0", "1", "--checkpoint-every", "none", "--quiet"]
    cache = tmp_path / "cold-cache"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": os.pathsep.join(sys.path)}
    parallel = subprocess.run([sys.executable, "-m", "spacenet_np.train", *args, "--out", str(tmp_path / "p"),
                               "--workers", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert parallel.returncode == 0, parallel.stderr
    assert any(cache.rglob("*csr_forward*.nbi")) and not any(cache.rglob("*parallel*.nbi"))
    env.pop("NUMBA_NUM_THREADS", None)
    sequential = subprocess.run([sys.executable, "-m", "spacenet_np.train", *args, "--out", str(tmp_path / "s")],
                                env=env, capture_output=True, text=True, timeout=300)
    assert sequential.returncode == 0, sequential.stderr
    assert any(cache.rglob("*parallel*.nbi")) == (len(os.sched_getaffinity(0)) > 1)  # Numba's default threads
    runs = [json.loads((tmp_path / name / "results.json").read_text())["runs"] for name in ("p", "s")]
    assert [r["accuracy_matrix"] for r in runs[0]] == [r["accuracy_matrix"] for r in runs[1]]
