"""How many threads a run computes with: Numba's parallel kernels and the BLAS/OpenMP pools (``--threads N``).

By default a run uses every core: Numba starts with ``NUMBA_NUM_THREADS`` threads (the core count unless that
variable is set) and the BLAS library with its own default (all cores unless ``OMP_NUM_THREADS`` or
``OPENBLAS_NUM_THREADS`` say otherwise). ``limited(n)`` sets both to ``n`` while a block runs: Numba through
``numba.set_num_threads`` and the BLAS/OpenMP libraries already loaded through threadpoolctl; the environment
variables cover libraries loaded later. Sweeps run one thread per worker process instead (``engine``), so N
workers do not oversubscribe N cores. The kernels give the same numbers with any thread count.
"""
import contextlib
import os

ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
            "NUMEXPR_NUM_THREADS")


def max_threads():
    """The most threads Numba can use in this process: ``NUMBA_NUM_THREADS``, by default the core count."""
    import numba
    return int(numba.config.NUMBA_NUM_THREADS)


def check_threads(n):
    """``n`` as an int in [1, max_threads()]; ValueError naming the limit otherwise."""
    limit = max_threads()
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
        raise ValueError(f"threads={n!r} must be an integer in [1, {limit}] ({limit} is NUMBA_NUM_THREADS, by "
                         f"default the number of cores)")
    return n


@contextlib.contextmanager
def limited(n):
    """Numba (in this thread) and the BLAS/OpenMP pools limited to ``n`` threads while the block runs; the
    previous settings come back afterwards. ``n=None`` changes nothing (every core)."""
    if n is None:
        yield
        return
    import numba
    from threadpoolctl import threadpool_limits
    n = check_threads(n)
    previous_env = {name: os.environ.get(name) for name in ENV_VARS}
    previous = numba.get_num_threads()
    os.environ.update({name: str(n) for name in ENV_VARS})
    numba.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        numba.set_num_threads(previous)
        for name, value in previous_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
