"""Sparse kernels against dense im2col + BLAS for the convolution layers, per layer and per kernel density.

For every 3 x 3 convolution of the paper's CNN (split CIFAR-10, batch 128; ``--width wide`` for 64-64-128-128),
a ``SparseConv2d`` with random kernels at each density is timed through one training step's worth of work:
forward (with ReLU), input gradient and weight gradient at every live kernel. The same layer object runs with
``force_path = "sparse"`` (the direct Numba kernels) and ``"dense"`` (im2col, ``np.matmul`` with the kernels
scattered into a dense matrix, col2im), in interleaved rounds in this process; both give the same numbers. The
first layer (3 input channels) has no input gradient in training and is timed without it.

The crossover of a layer is the lowest density at which the dense path is at least as fast. ``SparseConv2d``
switches to the dense path at ``DENSE_MIN_DENSITY`` (``FEW_MAPS_DENSE_MIN_DENSITY`` with few input maps); the
report gives the cost of the automatic choice against the faster path (``auto / best``).

Run: ``python -m benchmarks.conv_paths`` (a few minutes on 2 idle cores; ``--quick`` for a smoke run).
"""
if __name__ == "__main__" and not __package__:  # run as a file: python benchmarks/conv_paths.py
    import sys
    from pathlib import Path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse

import numpy as np

from benchmarks.common import machine_info, md_table, reproduce_command, time_interleaved, write_results
from spacenet_np.buffers import aligned_copy, aligned_empty
from spacenet_np.layers import NeuronIndex, SparseConv2d

DENSITIES = (0.02, 0.05, 0.12, 0.24, 0.36, 0.48, 0.6, 0.75, 0.9, 1.0)
WIDTHS = {"standard": (32, 32, 64, 64), "wide": (64, 64, 128, 128)}


def conv_shapes(width, image=32, channels=3):
    """(in maps, out maps, map size) of each convolution, pooling after every two."""
    shapes, size = [], image
    for i, maps in enumerate(WIDTHS[width]):
        if i and i % 2 == 0:
            size //= 2
        shapes.append((channels, maps, size))
        channels = maps
    return shapes


def random_layer(n_in, n_out, size, density, rng):
    """A ``SparseConv2d`` with ``round(density * n_in * n_out)`` random kernels (at least one)."""
    layer = SparseConv2d(NeuronIndex(n_in, dense=True), NeuronIndex(n_out, dense=True), size, size)
    count = max(1, int(round(density * n_in * n_out)))
    keys = np.sort(rng.choice(n_in * n_out, size=count, replace=False))
    layer.add_connections(keys // n_in, keys % n_in, rng.uniform(-0.1, 0.1, (count, 9)).astype(np.float32), 0)
    layer.bias[:] = rng.uniform(-0.1, 0.1, n_out)
    return layer


def step_work(layer, x, out, delta, grad_in, with_input_grad):
    """One training step's convolution work: forward, input gradient, weight gradient at every kernel."""
    connections = np.arange(layer.nnz)

    def run():
        layer.forward(x, out, relu=True)
        if with_input_grad:
            layer.backward_input(delta, x, grad_in)
        layer.weight_grad(connections, delta, x)
    return run


def measure(width, densities, batch, rng, max_total_s):
    rows = []
    for index, (n_in, n_out, size) in enumerate(conv_shapes(width)):
        # placed as the engine's buffers are (spacenet_np.buffers)
        x = aligned_copy(np.maximum(rng.standard_normal((n_in, size, size, batch)), 0).astype(np.float32))
        out = aligned_empty((n_out, size, size, batch))
        delta = aligned_copy(rng.standard_normal(out.shape).astype(np.float32))
        grad_in = aligned_empty(x.shape)
        for density in densities:
            layer = random_layer(n_in, n_out, size, density, rng)
            work = step_work(layer, x, out, delta, grad_in, with_input_grad=index > 0)

            def around(path):
                import contextlib

                @contextlib.contextmanager
                def forced():
                    layer.force_path = path
                    yield
                    layer.force_path = None
                return forced()

            timed = time_interleaved({"sparse": work, "dense": work}, around=around, max_total_s=max_total_s)
            auto = "dense" if layer.dense_path() else "sparse"
            sparse_s, dense_s = timed["sparse"]["median_s"], timed["dense"]["median_s"]
            rows.append({"layer": index, "in_maps": n_in, "out_maps": n_out, "map_size": size, "batch": batch,
                         "density": layer.density, "kernels": layer.nnz, "sparse_ms": 1e3 * sparse_s,
                         "dense_ms": 1e3 * dense_s, "dense_over_sparse": dense_s / sparse_s, "auto_path": auto,
                         "auto_over_best": timed[auto]["median_s"] / min(sparse_s, dense_s),
                         "repeats": timed["sparse"]["repeats"]})
            print(f"conv {index} ({n_in}->{n_out}, {size}x{size}) density {layer.density:.2f}: sparse "
                  f"{1e3 * sparse_s:.1f} ms, dense {1e3 * dense_s:.1f} ms, auto {auto}", flush=True)
    return rows


def crossovers(rows):
    """Per layer: the lowest measured density at which dense is at least as fast (None if never)."""
    result = {}
    for row in rows:
        if row["dense_ms"] <= row["sparse_ms"] and result.get(row["layer"]) is None:
            result[row["layer"]] = row["density"]
        result.setdefault(row["layer"], None)
    return result


def markdown(rows, cross, width, threshold):
    table = md_table(
        ["conv", "maps", "size", "density", "kernels", "sparse ms", "dense ms", "dense / sparse", "auto path",
         "auto / best"],
        [[r["layer"] + 1, f"{r['in_maps']}->{r['out_maps']}", f"{r['map_size']}x{r['map_size']}",
          f"{r['density']:.2f}", r["kernels"], f"{r['sparse_ms']:.1f}", f"{r['dense_ms']:.1f}",
          f"{r['dense_over_sparse']:.2f}", r["auto_path"], f"{r['auto_over_best']:.2f}"] for r in rows])
    lines = [f"# Convolution paths: sparse kernels vs dense im2col + BLAS ({width} CNN, batch {rows[0]['batch']})",
             "", "Time of one training step's work per layer: forward + input gradient (not for conv 1) + weight "
             "gradient at every kernel, median of interleaved rounds.", "", table, "",
             "Crossover (lowest measured density where dense is at least as fast): "
             + ", ".join(f"conv {l + 1}: " + (f"{d:.2f}" if d is not None else "never (up to 1.0)")
                         for l, d in cross.items()) + ".",
             f"The engine switches to the dense path at density >= {threshold} (>= "
             f"{SparseConv2d.FEW_MAPS_DENSE_MIN_DENSITY} in layers with fewer than {SparseConv2d.FEW_INPUT_MAPS} "
             f"input maps); worst auto / best: {max(r['auto_over_best'] for r in rows):.2f}."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", default="standard", choices=sorted(WIDTHS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 densities, batch 16, short timing")
    args = parser.parse_args(argv)
    argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    densities = (0.05, 0.5, 1.0) if args.quick else DENSITIES
    batch = 16 if args.quick else args.batch
    machine = machine_info()
    rows = measure(args.width, densities, batch, np.random.default_rng(0), 0.5 if args.quick else 3.0)
    cross = crossovers(rows)
    name = "conv_paths" + ("" if args.width == "standard" else f"_{args.width}") + ("_quick" if args.quick else "")
    payload = {"width": args.width, "rows": rows, "crossover_density": {f"conv{l + 1}": d for l, d in cross.items()},
               "dense_min_density": SparseConv2d.DENSE_MIN_DENSITY,
               "few_input_maps": SparseConv2d.FEW_INPUT_MAPS,
               "few_maps_dense_min_density": SparseConv2d.FEW_MAPS_DENSE_MIN_DENSITY,
               "worst_auto_over_best": max(r["auto_over_best"] for r in rows)}
    write_results(name, payload, markdown(rows, cross, args.width, SparseConv2d.DENSE_MIN_DENSITY),
                  reproduce_command("conv_paths", argv), machine)


if __name__ == "__main__":
    main()
