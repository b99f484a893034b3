"""The execution engine: many runs on every core, or on a Dask cluster, through Dask distributed.

``execute(jobs)`` runs each job ``(key, spec, checkpoint_path)`` as ``experiment.run(spec, checkpoint_path)`` in a
worker process and reports each outcome as it finishes. One code path serves both cases:

- by default a ``distributed.LocalCluster`` with one single-threaded worker process per core (``workers``);
- ``scheduler="tcp://HOST:PORT"`` submits the same jobs to an existing cluster (``dask scheduler`` and
  ``dask worker``, or dask-jobqueue on SLURM). Start its workers with one thread each
  (``dask worker tcp://HOST:PORT --nworkers N --nthreads 1``): a run is single-threaded, so more threads per
  worker only share one process's GIL.

Every run sets Numba and BLAS to one thread, so N workers do not oversubscribe N cores. Workers read the data from
the spec's ``data_dir``, else from their own ``SPACENET_DATA`` (then ``./data``): the data folder must exist on
every worker machine (a missing file fails only the runs of that worker, with the file named). Checkpoint paths
must likewise be writable from the workers (on a cluster: a shared filesystem, or no checkpoints).

An exception in a run (``TrainingDiverged``, ``SpecError``, a missing file, ...) fails only that run: its outcome is
``{"error": message, "error_type": name}``. A worker process that dies mid-run (killed, out of memory) is replaced
and the run retried on another worker (``retries`` times on the local cluster; an existing cluster uses its own
``distributed.scheduler.allowed-failures``); after that its outcome is a ``KilledWorker`` failure.

Ctrl-C (KeyboardInterrupt, in this process) cancels the runs not started, closes the client and the local cluster
(stopping its worker processes: runs in progress keep only their checkpoints) and is re-raised. Local workers
ignore SIGINT, so a terminal's Ctrl-C, which reaches the whole process group, is handled once, here. On an existing
cluster a run already started finishes on its worker (a Python thread cannot be stopped) and its result is dropped.
"""
import contextlib
import logging
import os
import signal
import threading
from pathlib import Path

from . import experiment

# Set in every local worker before it starts, so BLAS and OpenMP pools are created with one thread even where
# threadpoolctl is missing. Dask's nanny already sets the first three by default (pre-spawn-environ).
# Not NUMBA_NUM_THREADS: a worker may have loaded Numba's config before the variable is set, and a later compile
# would then refuse the changed value ("Cannot set NUMBA_NUM_THREADS ... once the threads have been launched");
# each run calls numba.set_num_threads(1) instead (``single_threaded``).
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                     "VECLIB_MAXIMUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1"}
CONNECT_TIMEOUT = "20s"  # to reach an existing scheduler
LOG_LEVEL = logging.CRITICAL  # Dask logs cancelled tasks and shutdown races (a worker heartbeat to a closed
# scheduler) with tracebacks; the engine reports every failure itself


class EngineError(RuntimeError):
    """The engine cannot run the jobs: a scheduler that cannot be reached, bad arguments."""


# ----- in the worker -----
def run_job(spec, checkpoint_path):
    """``experiment.run(spec, checkpoint_path)`` -> its result record (a dict)."""
    return experiment.run(spec, None if checkpoint_path is None else Path(checkpoint_path))


def call(function, spec, checkpoint_path):
    """``function(spec, checkpoint_path)`` on one thread: its return value, or a failure dict for an exception.

    Runs in a worker process. Exceptions are returned, not raised, so Dask does not retry a run that fails the same
    way every time, and the client receives a plain dict even for exceptions that do not pickle.
    """
    with single_threaded():
        try:
            return function(spec, checkpoint_path)
        except Exception as err:
            return failure(err)


@contextlib.contextmanager
def single_threaded():
    """Numba and the BLAS/OpenMP pools limited to one thread while the block runs (this thread only, for Numba)."""
    import numba
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with _blas_limit():
            yield
    finally:
        numba.set_num_threads(previous)


def _blas_limit():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: the environment variables set at worker start do the same for new pools
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def failure(err):
    """The outcome of a failed run: ``{"error": message, "error_type": class name}``."""
    return {"error": str(err) or repr(err), "error_type": type(err).__name__}


def dask_setup(worker):
    """Worker preload: a local worker ignores SIGINT. A Ctrl-C in the terminal reaches every process of the
    foreground group; the client alone handles it (it cancels the runs and closes the cluster)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----- in the client -----
def execute(jobs, workers=None, scheduler=None, on_result=None, retries=1, function=run_job):
    """Run ``jobs`` and return ``{key: outcome}``.

    jobs: list of ``(key, spec, checkpoint_path or None)`` with distinct hashable keys; ``function(spec,
    checkpoint_path)`` runs each (default ``experiment.run``; a module-level function, so workers can import it).
    workers: local worker processes (default: every core this process may use). scheduler: the address of an
    existing cluster (then ``workers`` must be None). on_result(key, outcome): called in this process as each
    job finishes; outcome is the function's result, or ``{"error": message, "error_type": name}``. retries:
    re-runs of a job whose local worker died. KeyboardInterrupt cancels the pending jobs, closes the cluster and
    is re-raised. Raises EngineError for bad arguments or a scheduler that cannot be reached.
    """
    keys = [job[0] for job in jobs]
    if len(set(keys)) != len(keys):
        raise EngineError("every job needs its own key; some keys repeat")
    check_resources(workers, scheduler, retries)
    if not jobs:
        return {}
    client, cluster = connect(workers, scheduler, retries)
    futures = {}
    try:
        for key, spec, checkpoint_path in jobs:
            path = None if checkpoint_path is None else str(checkpoint_path)
            futures[client.submit(call, function, spec, path, pure=False)] = key
        return collect(client, futures, on_result)
    except BaseException:
        with contextlib.suppress(Exception):  # a lost connection: closing below ends the runs anyway
            client.cancel(list(futures))
        raise
    finally:
        close(client, cluster)


def check_resources(workers, scheduler, retries):
    """EngineError naming a bad ``workers``/``scheduler``/``retries`` combination."""
    if scheduler is not None and workers is not None:
        raise EngineError("workers applies to the local cluster; an existing cluster (scheduler) has its own")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise EngineError(f"workers={workers!r} must be an integer >= 1")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise EngineError(f"retries={retries!r} must be an integer >= 0")


def collect(client, futures, on_result):
    """Outcomes of ``futures`` ({future: key}) in completion order, each passed to ``on_result`` as it arrives."""
    from distributed import as_completed
    outcomes = {}
    for future in as_completed(list(futures), loop=client.loop):
        key = futures[future]
        outcomes[key] = outcome_of(future)
        future.release()  # the record now lives here; the cluster may forget it
        if on_result is not None:
            on_result(key, outcomes[key])
    return outcomes


def outcome_of(future):
    """The job's result, or a failure dict: a worker that died (KilledWorker), a cancelled job, ..."""
    try:
        return future.result()
    except Exception as err:
        return failure(err)


def connect(workers, scheduler, retries):
    """(client, cluster): a new LocalCluster (cluster is None for an existing ``scheduler``)."""
    from distributed import Client, LocalCluster
    if scheduler is not None:
        check_address(scheduler)
        try:
            return Client(scheduler, timeout=CONNECT_TIMEOUT, set_as_default=False), None
        except (OSError, TimeoutError, ValueError) as err:
            raise EngineError(f"cannot reach the Dask scheduler at {scheduler}: {err}") from None
    cluster = LocalCluster(n_workers=workers or default_workers(), threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=LOG_LEVEL, env=SINGLE_THREAD_ENV,
                           preload=[__name__], memory_limit=0,  # the OS, not the nanny, limits a run's memory
                           scheduler_kwargs={"allowed_failures": retries})
    try:
        return Client(cluster, set_as_default=False), cluster
    except BaseException:
        cluster.close()
        raise


def check_address(address):
    """EngineError unless ``address`` reads as a scheduler address, [PROTOCOL://]HOST:PORT (checked before a
    Client is made: a Client that fails on a malformed address hangs the interpreter's exit)."""
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import backends
    try:
        protocol, location = parse_address(address)
        host, _ = parse_host_port(location)
    except (ValueError, TypeError) as err:
        raise EngineError(f"scheduler address {address!r}: {err}; expected tcp://HOST:PORT") from None
    if protocol not in backends or not host:
        raise EngineError(f"scheduler address {address!r}: expected tcp://HOST:PORT")


def default_workers():
    """The cores this process may use (its CPU affinity where the OS tells it), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity on macOS and Windows
        return os.cpu_count() or 1


def close(client, cluster):
    """Close the client, then the local cluster (which stops its worker processes)."""
    try:
        client.close()
    finally:
        if cluster is not None:
            cluster.close()
