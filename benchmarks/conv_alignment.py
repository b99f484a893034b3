"""The convolution kernels on arrays placed as NumPy places them against the engine's aligned, staggered arrays.

NumPy's large arrays start 16 bytes past a page boundary: every other 32-byte vector load crosses a cache line,
and every array sits at the same offset from a 4 KB boundary. ``spacenet_np.buffers.aligned_empty`` starts each
array on a cache line, at a page offset that differs from the arrays made before it. For each convolution of the
paper's CNN (batch 128, random kernels at ``--density``), the three kernels (forward with ReLU, input gradient,
weight gradient at every kernel) run on both placements of the same values, in interleaved rounds, in this
process; both must give the same bits (the benchmark stops otherwise).

Run: ``python -m benchmarks.conv_alignment [--density 0.6] [--threads 2]`` (about a minute). Writes
``results/conv_alignment_tTHREADS.{json,md}``.
"""
if __name__ == "__main__":
    import sys
    if not __package__:  # run as a file: python benchmarks/conv_alignment.py
        from pathlib import Path
        sys.path[0] = str(Path(__file__).resolve().parent.parent)
    from benchmarks.common import limit_threads_from_argv
    limit_threads_from_argv(1)  # before NumPy and Numba are imported

import argparse
import sys

import numpy as np

from benchmarks.common import machine_info, md_table, reproduce_command, time_interleaved, write_results
from benchmarks.conv_paths import conv_shapes, random_layer
from spacenet_np.buffers import aligned_empty, empty_at

KERNELS = ("forward", "input gradient", "weight gradient")
BATCH = 128


def numpy_placed(shape):
    """A float32 array 16 bytes past a page boundary, where NumPy's large arrays start."""
    return empty_at(shape, np.float32, 16)


def arrays(place, values):
    """x, out, delta, grad_in for a layer, placed by ``place``, x and delta holding ``values``."""
    x, delta = place(values[0].shape), place(values[1].shape)
    x[...], delta[...] = values
    return x, place(values[1].shape), delta, place(values[0].shape)


def kernel_calls(layer, placed):
    """{kernel: (call, what it wrote)} on the arrays ``placed`` (x, out, delta, grad_in)."""
    x, out, delta, grad_in = placed
    connections = np.arange(layer.nnz)
    return {"forward": (lambda: layer.forward(x, out, relu=True), lambda result: out),
            "input gradient": (lambda: layer.backward_input(delta, x, grad_in), lambda result: grad_in),
            "weight gradient": (lambda: layer.weight_grad(connections, delta, x), lambda result: result)}


def measure(density, rng, max_total_s):
    rows = []
    for index, (n_in, n_out, size) in enumerate(conv_shapes("standard")):
        if index == 0:
            continue  # the 3 image channels: no input gradient in training, a small share of the work
        layer = random_layer(n_in, n_out, size, density, rng)
        layer.force_path = "sparse"
        values = (np.maximum(rng.standard_normal((n_in, size, size, BATCH)), 0).astype(np.float32),
                  rng.standard_normal((n_out, size, size, BATCH)).astype(np.float32))
        calls = {"numpy": kernel_calls(layer, arrays(numpy_placed, values)),
                 "aligned": kernel_calls(layer, arrays(aligned_empty, values))}
        for kernel in KERNELS:
            written = [output(call()).copy() for call, output in (calls[name][kernel] for name in calls)]
            if not np.array_equal(written[0].view(np.uint32), written[1].view(np.uint32)):
                raise RuntimeError(f"conv {index + 1} {kernel}: the two placements give different bits")
            timed = time_interleaved({name: calls[name][kernel][0] for name in calls}, max_total_s=max_total_s)
            numpy_s, aligned_s = timed["numpy"]["median_s"], timed["aligned"]["median_s"]
            rows.append({"layer": index, "in_maps": n_in, "out_maps": n_out, "map_size": size, "kernels": layer.nnz,
                         "kernel": kernel, "numpy_ms": 1e3 * numpy_s, "aligned_ms": 1e3 * aligned_s,
                         "speedup": numpy_s / aligned_s, "repeats": timed["numpy"]["repeats"]})
            print(f"conv {index + 1} ({n_in}->{n_out}, {size}x{size}) {kernel}: NumPy's placement "
                  f"{1e3 * numpy_s:.1f} ms, aligned {1e3 * aligned_s:.1f} ms ({numpy_s / aligned_s:.2f}x)", flush=True)
    return rows


def markdown(rows, density, threads):
    table = md_table(["conv", "maps", "size", "kernels", "kernel", "NumPy's placement ms", "aligned ms", "speedup"],
                     [[r["layer"] + 1, f"{r['in_maps']}->{r['out_maps']}", f"{r['map_size']}x{r['map_size']}",
                       r["kernels"], r["kernel"], f"{r['numpy_ms']:.1f}", f"{r['aligned_ms']:.1f}",
                       f"{r['speedup']:.2f}"] for r in rows])
    return "\n".join([
        f"# Convolution kernels: NumPy's array placement against aligned, staggered arrays (batch {BATCH}, "
        f"density {density}, {threads} thread(s))", "",
        "Median of interleaved calls on the same values; both placements give the same bits (checked).", "", table])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--density", type=float, default=0.6, help="kernel density (0.6: about task 5's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=3.0, help="timing budget per kernel and placement")
    args = parser.parse_args(argv)
    argv = list(argv) if argv is not None else sys.argv[1:]
    machine = machine_info()
    rows = measure(args.density, np.random.default_rng(args.seed), args.max_seconds)
    write_results(f"conv_alignment_t{args.threads}", {"density": args.density, "batch": BATCH, "rows": rows,
                                                       "threads": args.threads},
                  markdown(rows, args.density, args.threads), reproduce_command("conv_alignment", argv), machine)


if __name__ == "__main__":
    main()
