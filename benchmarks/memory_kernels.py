"""Serial against parallel builds of the kernels that only move or compare values, by array size.

``kernels.pick`` runs a kernel's parallel build from ``PARALLEL_MIN_WORK`` multiply-adds on; a kernel that only
moves or compares values (pooling and its backward pass, the pixel lookups, bias adds, SGD steps) counts
``ELEMENT_WORK`` per element. Each kernel is timed here with both builds on the same arrays, in interleaved
rounds, at sizes from 4,096 elements to the split CIFAR-10 CNN's largest (batch 128): the crossover (the smallest
measured size where the parallel build is faster) and the cost of ``pick``'s choice against the faster build.
Both builds give the same bits (checked on every size).

Run: ``python -m benchmarks.memory_kernels`` (about a minute on 2 idle cores; ``--quick`` for a smoke run).
"""
if __name__ == "__main__" and not __package__:  # run as a file: python benchmarks/memory_kernels.py
    import sys
    from pathlib import Path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse

import numba
import numpy as np

from benchmarks.common import machine_info, md_table, reproduce_command, time_interleaved, write_results
from spacenet_np import kernels
from spacenet_np.buffers import aligned_copy, aligned_empty
from spacenet_np.network import input_lookup

# (maps, map size, batch) of pooling inputs; the last two are the CNN's conv 4 and conv 2 outputs at batch 128
POOL_SHAPES = [(4, 8, 32), (16, 8, 32), (16, 16, 16), (32, 16, 16), (32, 16, 64), (64, 16, 128), (32, 32, 128)]
PIXEL_BATCHES = [(784, 8), (784, 32), (784, 128), (3072, 128), (784, 512)]  # (features, batch): MNIST, CIFAR
ELEMENTS = [4096, 16384, 65536, 131072, 524288, 1 << 21, 1 << 22]


def pool_cases(rng):
    for maps, size, batch in POOL_SHAPES:
        x = aligned_copy(rng.standard_normal((maps, size, size, batch)).astype(np.float32))
        pooled = aligned_empty((maps, size // 2, size // 2, batch))
        winners = np.zeros(pooled.shape, np.uint8)
        kernels.max_pool2[0](x, pooled, winners)
        yield "max_pool2", x.size, (x, pooled, winners)
        yield "max_pool2_backward", x.size, (pooled, winners, aligned_empty(x.shape), kernels.NO_LEAVES)


def pixel_cases(rng):
    images = rng.integers(0, 256, (4096, 3072), dtype=np.uint8)
    for features, batch in PIXEL_BATCHES:
        ids = rng.permutation(images.shape[0])[:batch]
        part = np.ascontiguousarray(images[:, :features])
        out = aligned_empty((features, batch))
        yield "transpose_lookup", out.size, (part, ids, input_lookup(0.13, 0.31), out)
        scale, shift = (rng.random(features, dtype=np.float32) for _ in range(2))
        yield "transpose_standardize", out.size, (part[ids], scale, shift, out)


def element_cases(rng):
    for n in ELEMENTS:
        maps = 32
        yield "add_bias", n, (rng.standard_normal((maps, n // maps)).astype(np.float32),
                              rng.standard_normal(maps).astype(np.float32), True)
        connections = np.sort(rng.permutation(2 * n)[:n]).astype(np.int64)  # in CSR order, as trained
        weights, importance = np.zeros(2 * n, np.float32), np.zeros(2 * n, np.float32)
        yield "sgd_step_with_importance", n, (connections, rng.standard_normal(n).astype(np.float32),
                                              np.float32(0.01), weights, importance)


def outputs(args):
    """The arrays a kernel call writes (compared between the builds): every float32/uint8 array argument."""
    return [a.copy() for a in args if isinstance(a, np.ndarray) and a.dtype in (np.float32, np.uint8)]


def same_bits(pair, args, name):
    """Run both builds from the same inputs and check that they write the same bits."""
    start = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    pair[0](*start)
    serial = outputs(start)
    start = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    pair[1](*start)
    if not all(np.array_equal(a.view(np.uint8), b.view(np.uint8)) for a, b in zip(serial, outputs(start))):
        raise SystemExit(f"{name}: the serial and parallel builds differ")


def measure(rng, max_total_s):
    rows = []
    for cases in (pool_cases(rng), pixel_cases(rng), element_cases(rng)):
        for name, elements, args in cases:
            pair = getattr(kernels, name)
            same_bits(pair, args, name)
            timed = time_interleaved({"serial": lambda: pair[0](*args), "parallel": lambda: pair[1](*args)},
                                     min_rounds=9, max_total_s=max_total_s)
            chosen = "parallel" if kernels.pick_by_elements(pair, elements) is pair[1] else "serial"
            serial_s, parallel_s = timed["serial"]["median_s"], timed["parallel"]["median_s"]
            rows.append({"kernel": name, "elements": elements, "serial_ms": 1e3 * serial_s,
                         "parallel_ms": 1e3 * parallel_s, "parallel_speedup": serial_s / parallel_s,
                         "pick": chosen, "pick_over_best": timed[chosen]["median_s"] / min(serial_s, parallel_s),
                         "rounds": timed["serial"]["repeats"]})
            print(f"{name} {elements} elements: serial {1e3 * serial_s:.3f} ms, parallel {1e3 * parallel_s:.3f} ms,"
                  f" pick {chosen}", flush=True)
    return sorted(rows, key=lambda r: (r["kernel"], r["elements"]))


def crossovers(rows):
    """Per kernel: the smallest measured size where the parallel build is faster (None if never)."""
    result = {}
    for row in rows:
        result.setdefault(row["kernel"], None)
        if row["parallel_speedup"] > 1 and result[row["kernel"]] is None:
            result[row["kernel"]] = row["elements"]
    return result


def markdown(rows, cross, threads):
    threshold = kernels.PARALLEL_MIN_WORK // kernels.ELEMENT_WORK
    table = md_table(["kernel", "elements", "serial ms", "parallel ms", "parallel speed-up", "pick", "pick / best"],
                     [[r["kernel"], r["elements"], f"{r['serial_ms']:.3f}", f"{r['parallel_ms']:.3f}",
                       f"{r['parallel_speedup']:.2f}", r["pick"], f"{r['pick_over_best']:.2f}"] for r in rows])
    return "\n".join([
        f"# Kernels that only move values: serial against parallel builds ({threads} threads)", "",
        "Median of interleaved rounds per call; the same bits from both builds (checked). `pick` runs the parallel "
        f"build from PARALLEL_MIN_WORK / ELEMENT_WORK = {threshold:,} elements.", "", table, "",
        "Crossover (the smallest measured size where the parallel build is faster; the smallest size measured "
        "may not be the real crossover): "
        + ", ".join(f"{k}: {v:,}" if v is not None else f"{k}: never" for k, v in cross.items()) + ".",
        f"Worst pick / best: {max(r['pick_over_best'] for r in rows):.2f}."])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: short timing")
    args = parser.parse_args(argv)
    argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    threads = numba.get_num_threads()
    if threads < 2:
        raise SystemExit("memory_kernels compares serial and parallel builds: it needs at least 2 Numba threads")
    machine = machine_info()
    rows = measure(np.random.default_rng(0), 0.2 if args.quick else 2.0)
    cross = crossovers(rows)
    payload = {"threads": threads, "element_work": kernels.ELEMENT_WORK,
               "parallel_min_work": kernels.PARALLEL_MIN_WORK, "rows": rows, "crossover_elements": cross,
               "worst_pick_over_best": max(r["pick_over_best"] for r in rows)}
    write_results("memory_kernels" + ("_quick" if args.quick else ""), payload, markdown(rows, cross, threads),
                  reproduce_command("memory_kernels", argv), machine)


if __name__ == "__main__":
    main()
