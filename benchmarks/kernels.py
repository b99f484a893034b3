"""Kernel throughput: the engine's Numba kernels against scipy.sparse and a dense NumPy (BLAS) matmul.

For one sparse layer (CSR over output neurons, activations neuron-major ``(neurons, batch)`` float32, exactly as
the engine stores them) and each density, three products are timed in this process (median of repeats, after a
warm-up call):

- forward ``out = relu(W @ x + b)``: ``SparseLinear.forward`` vs ``csr_array @ x`` vs ``np.matmul(W_dense, x)``;
- input gradient ``(W.T @ delta) * (act > 0)``: ``SparseLinear.backward_input`` vs ``W.T.tocsr() @ delta``
  (transpose built once, like the engine's CSC view) vs ``np.matmul(W_dense.T, delta)``;
- sampled weight gradient ``g[k] = delta[row k] . x[col k]`` at every live connection:
  ``SparseLinear.weight_grad`` vs a chunked NumPy gather + ``einsum`` (scipy.sparse has no sampled product) vs the
  full dense gradient ``np.matmul(delta, x.T)``.

The engine methods pick the serial or the parallel Numba build with ``kernels.pick`` as in training; scipy.sparse
products are single-threaded, BLAS uses all cores. The candidates are timed in interleaved rounds, so that other
work on the machine hits them alike. FLOPs count useful work only, ``2 * nnz * batch``, for every implementation;
the dense matmul's raw rate ``2 * n_out * n_in * batch / time`` is reported as well. The ceiling is the best
single-precision GEMM rate seen in the run: square GEMMs at the start and at the end, and the layer-shaped dense
matmuls (the best repeat, since other work on the machine lowers the median).

Besides the engine as it runs (its cached builds, chosen by ``kernels.pick``), the same engine calls are timed with
the engine's kernel functions compiled in this process without the disk cache, forced to the serial and to the
parallel build: the engine's two builds of a function share one Numba cache entry (Numba's cache key does not
include ``parallel``), so after the first compilation both run whichever build was compiled first. The report says
whether that is the case for each kernel.

Run: ``python -m benchmarks.kernels`` (about 1-2 minutes on an idle machine; ``--quick`` for a smoke run,
``--full`` adds the 50 % density of the 4000 x 4000 layer).
"""
if __name__ == "__main__":
    import sys
    if not __package__:  # run as a file: python benchmarks/kernels.py
        from pathlib import Path
        sys.path[0] = str(Path(__file__).resolve().parent.parent)
    if "--threads" in sys.argv[1:-1]:  # must be set before NumPy and Numba are imported
        from benchmarks.common import limit_threads
        limit_threads(int(sys.argv[sys.argv.index("--threads") + 1]))

import argparse
import contextlib
import os
import resource
import sys
import time

import numpy as np

from benchmarks.common import (
    cpu_busy_s,
    kernel_pairs,
    machine_info,
    md_table,
    reproduce_command,
    time_call,
    time_interleaved,
    write_results,
)
from spacenet_np import kernels
from spacenet_np.layers import NeuronIndex, SparseLinear

SHAPES = [(784, 400), (400, 400), (4000, 4000)]  # (fan_in, fan_out)
DENSITIES = [0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
QUICK_DENSITIES = [0.001, 0.02, 0.5]
LARGE_LAYER = 4_000_000  # fan_in * fan_out above which densities stop at LARGE_MAX_DENSITY (unless --full)
LARGE_MAX_DENSITY = 0.2  # 50 % of 4000 x 4000 alone takes about a minute to build and time with scipy
BATCH = 128
GATHER_CHUNK = 1 << 15  # connections per gather in the NumPy sampled gradient (bounds its temporaries)
OPS = ("forward", "backward_input", "weight_grad")


def gemm_ceiling(sizes=(1024, 2048), quick=False):
    """Attainable dense float32 GFLOP/s: square ``np.matmul`` (BLAS sgemm), best median over ``sizes``."""
    rng = np.random.default_rng(1)
    rows = []
    for n in sizes:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        c = np.empty((n, n), np.float32)
        t = time_call(lambda: np.matmul(a, b, out=c), warmup=1, min_repeats=3 if quick else 5, min_total_s=0.5)
        rows.append({"n": n, "median_s": t["median_s"], "min_s": t["min_s"],
                     "gflops": 2.0 * n ** 3 / t["median_s"] / 1e9, "best_gflops": 2.0 * n ** 3 / t["min_s"] / 1e9,
                     "repeats": t["repeats"]})
    return max(r["best_gflops"] for r in rows), rows


KERNEL_NAMES = ("csr_forward", "csc_backward_input", "sampled_weight_grad")
_FRESH = {}


def fresh_builds():
    """The engine's kernel functions compiled here, serial and parallel, without the on-disk cache.

    Same source, options and compiler as the engine's builds (copied from their ``targetoptions`` and
    pipeline class: ``kernels.NoAliasCompiler`` for some serial builds). Needed because the
    engine's two builds of a function share one Numba cache entry (see :func:`shared_cache_entries`), so a cached
    "serial" build may run the parallel code or the reverse. Returns {name: (serial, parallel)}.
    """
    import numba
    if not _FRESH:
        for name in KERNEL_NAMES:
            pair = getattr(kernels, name)
            py_func = pair[0].py_func
            builds = []
            for parallel, engine_build in ((False, pair[0]), (True, pair[1])):
                options = {k: v for k, v in engine_build.targetoptions.items() if k not in ("cache", "nopython")}
                options.update(parallel=parallel, cache=False)
                builds.append(numba.njit(pipeline_class=engine_build._compiler.pipeline_class, **options)(py_func))
            _FRESH[name] = tuple(builds)
    return _FRESH


def shared_cache_entries():
    """{kernel: True if its serial and parallel builds read and write the same Numba cache index file}.

    Numba's cache key is (signature, target machine, bytecode hash): it does not include ``parallel``, so whichever
    build is compiled first is loaded by both in later processes.
    """
    shared = {}
    for name, (serial, parallel) in kernel_pairs(kernels).items():
        try:
            shared[name] = serial._cache._cache_file._index_path == parallel._cache._cache_file._index_path
        except AttributeError:  # Numba internals changed, or caching is off
            shared[name] = None
    return shared


@contextlib.contextmanager
def forced_build(which):
    """While active, the engine calls the fresh serial (``which`` 0) or parallel (1) builds through ``pick``.

    ``which`` None leaves the engine as it is (its cached builds, chosen by ``pick``).
    """
    if which is None:
        yield
        return
    saved = {name: getattr(kernels, name) for name in KERNEL_NAMES}
    original_pick = kernels.pick
    for name, pair in fresh_builds().items():
        setattr(kernels, name, pair)
    kernels.pick = lambda kernel_pair, work: kernel_pair[which]
    try:
        yield
    finally:
        kernels.pick = original_pick
        for name, pair in saved.items():
            setattr(kernels, name, pair)


def make_layer(fan_in, fan_out, density, rng):
    """A ``SparseLinear`` between two dense neuron indices with ``density * fan_in * fan_out`` random connections."""
    nnz = max(1, int(round(density * fan_in * fan_out)))
    layer = SparseLinear(NeuronIndex(fan_in, dense=True), NeuronIndex(fan_out, dense=True))
    flat = rng.choice(fan_in * fan_out, size=nnz, replace=False)
    weights = rng.uniform(-0.1, 0.1, size=nnz).astype(np.float32)
    layer.add_connections(flat // fan_in, flat % fan_in, weights, owner=0)
    return layer


def numpy_sampled_grad(rows, cols, delta, x, out):
    """``out[k] = delta[rows[k]] . x[cols[k]]`` by gathering rows in chunks and ``einsum``: the NumPy baseline."""
    for start in range(0, rows.shape[0], GATHER_CHUNK):
        stop = start + GATHER_CHUNK
        np.einsum("kb,kb->k", delta[rows[start:stop]], x[cols[start:stop]], out=out[start:stop])
    return out


def bench_layer(fan_in, fan_out, density, quick=False):
    """Time the three products for one layer shape and density. Returns one result dict per operation."""
    rng = np.random.default_rng(0)
    layer = make_layer(fan_in, fan_out, density, rng)
    nnz = layer.nnz
    x = rng.standard_normal((fan_in, BATCH), dtype=np.float32)
    act = np.maximum(x, 0.0)  # a ReLU output: the mask of the input gradient
    delta = rng.standard_normal((fan_out, BATCH), dtype=np.float32)
    out = np.empty((fan_out, BATCH), np.float32)
    grad_in = np.empty((fan_in, BATCH), np.float32)
    connections = np.arange(nnz, dtype=np.int64)
    W = layer.W
    WT = W.T.tocsr()
    Wd = W.toarray()
    rows64, cols64 = layer.rows.astype(np.int64), layer.indices.astype(np.int64)
    out_d = np.empty((fan_out, BATCH), np.float32)
    grad_in_d = np.empty((fan_in, BATCH), np.float32)
    grad_w_d = np.empty((fan_out, fan_in), np.float32)
    grad_np = np.empty(nnz, np.float32)

    # correctness: each pair of implementations computes the same numbers
    ref_fwd = np.maximum(Wd @ x, 0.0)
    ref_bwd = (Wd.T @ delta) * (act > 0)
    ref_grad = (delta @ x.T)[layer.rows, layer.indices]
    scale = lambda a: 1e-4 * max(1.0, float(np.abs(a).max()))  # noqa: E731 (float32 sums in any order)
    assert np.abs(layer.forward(x, out, relu=True) - ref_fwd).max() <= scale(ref_fwd)
    assert np.abs(np.maximum(W @ x, 0.0) - ref_fwd).max() <= scale(ref_fwd)
    assert np.abs(layer.backward_input(delta, act, grad_in) - ref_bwd).max() <= scale(ref_bwd)
    assert np.abs(layer.weight_grad(connections, delta, x) - ref_grad).max() <= scale(ref_grad)
    assert np.abs(numpy_sampled_grad(rows64, cols64, delta, x, grad_np) - ref_grad).max() <= scale(ref_grad)

    candidates = {
        "forward": {
            "numba": lambda: layer.forward(x, out, relu=True),
            "scipy": lambda: W @ x,
            "dense": lambda: np.matmul(Wd, x, out=out_d),
        },
        "backward_input": {
            "numba": lambda: layer.backward_input(delta, act, grad_in),
            "scipy": lambda: WT @ delta,
            "dense": lambda: np.matmul(Wd.T, delta, out=grad_in_d),
        },
        "weight_grad": {
            "numba": lambda: layer.weight_grad(connections, delta, x),
            "scipy": lambda: numpy_sampled_grad(rows64, cols64, delta, x, grad_np),
            "dense": lambda: np.matmul(delta, x.T, out=grad_w_d),
        },
    }
    useful = 2.0 * nnz * BATCH
    raw_dense = 2.0 * fan_in * fan_out * BATCH
    results = []
    for op in OPS:
        parallel = kernels.pick((False, True), nnz * BATCH)
        row = {"shape": [fan_in, fan_out], "density": density, "nnz": nnz, "op": op, "batch": BATCH,
               "numba_build": "parallel" if parallel else "serial", "useful_gflop": useful / 1e9}
        fns = {**candidates[op], "numba1": candidates[op]["numba"], "numbaP": candidates[op]["numba"]}
        builds = {"numba1": 0, "numbaP": 1}
        timings = time_interleaved(fns, warmup=1, min_rounds=3 if quick else 5,
                                   min_total_s=0.2 if quick else 0.6, max_total_s=1.5 if quick else 4.0,
                                   around=lambda impl: forced_build(builds.get(impl)))
        for impl, t in timings.items():
            row[f"{impl}_s"] = t["median_s"]
            row[f"{impl}_min_s"] = t["min_s"]
            row[f"{impl}_repeats"] = t["repeats"]
            row[f"{impl}_gflops"] = useful / t["median_s"] / 1e9
            row[f"{impl}_best_gflops"] = useful / t["min_s"] / 1e9
        row["dense_raw_gflops"] = raw_dense / row["dense_s"] / 1e9
        row["dense_raw_best_gflops"] = raw_dense / row["dense_min_s"] / 1e9
        row["speedup_vs_scipy"] = row["scipy_s"] / row["numba_s"]
        row["speedup_vs_dense"] = row["dense_s"] / row["numba_s"]
        results.append(row)
    return results


def break_even(rows, shape, op):
    """The lowest measured density at which the dense matmul beats the Numba kernel (None: never)."""
    slower = [r["density"] for r in rows if r["shape"] == list(shape) and r["op"] == op and r["speedup_vs_dense"] < 1]
    return min(slower) if slower else None


def markdown(rows, ceiling, gemm_rows, shapes):
    parts = [
        "# Kernel throughput: Numba vs scipy.sparse vs dense NumPy",
        "",
        f"Batch {BATCH}, float32, activations neuron-major `(neurons, batch)`. GFLOP/s count useful work "
        "`2 * nnz * batch` for every column; *dense raw* counts the dense matmul's full `2 * n_out * n_in * batch`. "
        "Median of repeats after a warm-up; the candidates are timed in interleaved rounds so that other work on "
        "the machine hits them alike. The weight-gradient 'scipy' column is a NumPy gather + einsum "
        "(scipy.sparse has no sampled dense-dense product). *numba* is the engine's call path "
        "(`SparseLinear` methods, the cached builds chosen by `kernels.pick`); *serial build* and *parallel build* "
        "make the same call with the engine's kernel functions compiled in this process without the disk cache, "
        "forced serial or parallel. "
        f"Layers above {LARGE_LAYER:,} entries stop at {100 * LARGE_MAX_DENSITY:g} % density unless `--full`.",
        "",
        f"**Dense ceiling (best float32 GEMM rate seen, square or layer-shaped): {ceiling:.1f} GFLOP/s.** Square "
        "GEMMs (best of repeats, at the start and at the end: "
        + ", ".join(f"{g['n']}³: {g['best_gflops']:.1f}" for g in gemm_rows) + "). The ceiling uses the best "
        "(minimum-time) repeat, the kernel tables the median; the JSON has both.",
        "",
    ]
    for shape in shapes:
        parts += [f"## Layer {shape[0]} → {shape[1]} (fan_in × fan_out)", ""]
        table = []
        for r in rows:
            if r["shape"] != list(shape):
                continue
            table.append([
                r["op"], f"{100 * r['density']:g} %", f"{r['nnz']:,}", r["numba_build"],
                f"{1e6 * r['numba_s']:.0f}", f"{r['numba_gflops']:.2f}", f"{100 * r['numba_gflops'] / ceiling:.1f} %",
                f"{r['numba1_gflops']:.2f}", f"{r['numbaP_gflops']:.2f}",
                f"{r['scipy_gflops']:.2f}", f"{r['dense_gflops']:.2f}", f"{r['dense_raw_gflops']:.1f}",
                f"{r['speedup_vs_scipy']:.2f}×", f"{r['speedup_vs_dense']:.2f}×",
            ])
        parts.append(md_table(["op", "density", "nnz", "numba build", "numba µs", "numba GFLOP/s",
                               "of ceiling", "serial build GFLOP/s", "parallel build GFLOP/s", "scipy GFLOP/s",
                               "dense useful GFLOP/s", "dense raw GFLOP/s", "numba / scipy", "numba / dense"],
                              table))
        parts.append("")
        parts.append("Lowest density at which the dense matmul is faster than Numba (median times): " + ", ".join(
            f"{op} {('%g %%' % (100 * d)) if d is not None else 'none measured'}"
            for op, d in ((op, break_even(rows, shape, op)) for op in OPS)) + ".")
        parts.append("")
    return "\n".join(parts)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="three densities, fewer repeats (smoke run)")
    p.add_argument("--densities", type=float, nargs="+", default=None, help="fractions, e.g. 0.001 0.5")
    p.add_argument("--shapes", type=str, nargs="+", default=None,
                   help="layer shapes as FAN_INxFAN_OUT, e.g. 784x400 4000x4000")
    p.add_argument("--full", action="store_true",
                   help=f"every density on every shape (default: at most {LARGE_MAX_DENSITY:g} on layers above "
                        f"{LARGE_LAYER:,} entries)")
    p.add_argument("--threads", type=int, default=0,
                   help="Numba and BLAS threads (0: library defaults, all cores); needs a fresh process")
    args = p.parse_args(argv)
    densities = args.densities or (QUICK_DENSITIES if args.quick else DENSITIES)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes] if args.shapes else SHAPES
    command = reproduce_command("kernels", argv)
    machine = machine_info()
    start = time.perf_counter()
    busy_before = cpu_busy_s()

    shared = shared_cache_entries()
    t_compile = time.perf_counter()
    fresh_builds()
    compile_s = time.perf_counter() - t_compile
    print(f"compiled the serial and parallel builds in-process in {compile_s:.1f} s; engine builds sharing one cache "
          f"entry: {[k for k, v in shared.items() if v]}", flush=True)
    ceiling, gemm_rows = gemm_ceiling(quick=args.quick)
    print(f"dense float32 GEMM ceiling: {ceiling:.1f} GFLOP/s", flush=True)
    rows = []
    for fan_in, fan_out in shapes:
        for density in densities:
            if fan_in * fan_out > LARGE_LAYER and density > LARGE_MAX_DENSITY and not (args.full or args.densities):
                continue
            for r in bench_layer(fan_in, fan_out, density, quick=args.quick):
                rows.append(r)
                print(f"{fan_in}x{fan_out} {100 * density:5g}% {r['op']:>14}: numba {r['numba_gflops']:7.2f}  "
                      f"scipy {r['scipy_gflops']:7.2f}  dense useful {r['dense_gflops']:7.2f} "
                      f"(raw {r['dense_raw_gflops']:6.1f}) GFLOP/s", flush=True)
    elapsed = time.perf_counter() - start
    ceiling_end, gemm_rows_end = gemm_ceiling(quick=args.quick)
    print(f"dense float32 GEMM ceiling at the end: {ceiling_end:.1f} GFLOP/s", flush=True)
    best_layer_gemm = max(r["dense_raw_best_gflops"] for r in rows)
    ceiling = max(ceiling, ceiling_end, best_layer_gemm)  # the best float32 GEMM rate seen in this process
    gemm_rows = gemm_rows + gemm_rows_end
    usage = resource.getrusage(resource.RUSAGE_SELF)
    other = (cpu_busy_s() - busy_before - usage.ru_utime - usage.ru_stime) / (time.perf_counter() - start)
    payload = {
        "batch": BATCH, "shapes": [list(s) for s in shapes], "densities": densities,
        "dense_ceiling_gflops": ceiling, "gemm": gemm_rows, "best_layer_gemm_gflops": best_layer_gemm,
        "parallel_min_work": kernels.PARALLEL_MIN_WORK,
        "dense_faster_from_density": {f"{s[0]}x{s[1]}": {op: break_even(rows, s, op) for op in OPS} for s in shapes},
        "results": rows, "elapsed_s": elapsed, "other_cpus_busy": max(0.0, other),
        "serial_and_parallel_builds_share_cache_entry": shared, "fresh_compile_s": compile_s,
        "threads": {"numba": kernels.numba.get_num_threads(), "env": {
            k: os.environ.get(k) for k in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}},
    }
    sharing = [k for k, v in shared.items() if v]
    text = markdown(rows, ceiling, gemm_rows, shapes) + (
        f"\nOther processes kept {max(0.0, other):.2f} cores busy on average during this benchmark (contention).\n"
        + (f"\n**Engine finding:** the serial and parallel builds of {', '.join(f'`{k}`' for k in sharing)} read and "
           "write the same Numba cache index file (`serial._cache._cache_file._index_path == "
           "parallel._cache._cache_file._index_path`), and Numba's cache key (signature, target, bytecode hash) "
           "does not include `parallel`, so in any process after the first both entries of a pair load whichever "
           "build was compiled first: `kernels.pick` then chooses between two copies of the same code.\n"
           if sharing else ""))
    write_results("kernels" if not args.threads else f"kernels_threads{args.threads}", payload, text, command,
                  machine)
    print(f"done in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
