"""Rewiring memory: allocation and rewiring of the CNN's 4096 -> 512 fully connected layer, the old dense code (the
NumPy references in ``tests/test_growth.py``) against the new one (``spacenet_np.kernels``), in the same run.

The layer is built as SpaceNet builds it with the paper's CNN settings (every neuron selected, 12 % of the layer
per task, 30 neurons reserved per task, rewire ratio 0.2): each earlier task allocates its connections, gets a
random Omega and reserves its 30 most important neurons. Then, for the next task, from the same state:

- *allocation*: choosing the task's random empty positions of the block (``add_connections`` excluded);
- *growth*: what a rewire adds to the layer's own work: listing the block's connections and choosing where to grow
  (on the allocated layer; the old code listed the block's empty positions twice, before and after the drop);
- *rewire*: a whole rewire of the layer, drop and grow, including the layer's CSR rebuilds;
- *rebuild only*: the rewire's ``remove_connections`` and ``add_connections`` alone, the part both share.

Both methods pick the same positions (checked). Time: median of ``--repeats`` runs each; memory: ``tracemalloc``
peak above the live memory at the start, one run each.

Run: ``python -m benchmarks.rewire_memory`` (``--tasks 0 3``: tasks 1 and 4, after 0 and 3 earlier tasks;
``--repeats 5``); ``--quick`` checks that it works on a 512 -> 64 layer and writes nothing.
"""
if __name__ == "__main__" and not __package__:  # run as a file: python benchmarks/rewire_memory.py
    import sys
    from pathlib import Path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import statistics
import sys
import time
import tracemalloc

import numpy as np

from benchmarks.common import REPO_ROOT, machine_info, md_table, reproduce_command, write_results
from spacenet_np import kernels
from spacenet_np.layers import NeuronIndex, SparseLinear
from spacenet_np.spacenet import SpaceNet

sys.path.insert(0, str(REPO_ROOT / "tests"))
from test_growth import dense_allocate, dense_free_block, dense_fresh_top, dense_grow  # noqa: E402

DENSITY, RESERVED, RATIO = 0.12, 30 / 512, 0.2  # reserved: 30 of the 512 neurons per task


# ----- the two methods -----
def choose_new(layer, rows, cols, count, rng):
    occupied = SpaceNet._occupied(layer, rows, cols)
    n_empty = rows.size * cols.size - occupied.size
    return kernels.free_positions(occupied, np.sort(rng.choice(n_empty, size=count, replace=False)))


def choose_old(layer, rows, cols, count, rng):
    return dense_allocate(rng, dense_free_block(layer, rows, cols), count)


def grow_choice_new(layer, rows, cols, a_out, a_in, count):
    return np.sort(kernels.top_positions(a_out[rows], a_in[cols], SpaceNet._occupied(layer, rows, cols), count))


def grow_choice_old(layer, rows, cols, a_out, a_in, count):
    """The old rewire listed the block's empty positions twice (before and after the drop)."""
    fresh, _ = dense_free_block(layer, rows, cols), dense_free_block(layer, rows, cols)
    return np.sort(dense_fresh_top(np.outer(a_out[rows], a_in[cols]).ravel(), fresh, count))


def least_important(layer, task):
    mine = layer.connections_of(task)
    return mine[np.argsort(layer.importance[mine], kind="stable")[:int(RATIO * mine.size)]]


def rewire_new(layer, task, rows, cols, a_out, a_in):
    occupied = SpaceNet._occupied(layer, rows, cols)
    least = least_important(layer, task)
    layer.remove_connections(least)
    SpaceNet.grow(layer, task, rows, cols, a_out, a_in, occupied, least.size)


def rewire_old(layer, task, rows, cols, a_out, a_in):
    fresh = dense_free_block(layer, rows, cols)
    least = least_important(layer, task)
    layer.remove_connections(least)
    dense_grow(layer, task, rows, cols, a_out, a_in, fresh, dense_free_block(layer, rows, cols), least.size)


def rebuild_only(layer, task):
    """The layer's own work in a rewire: remove the least important connections, add as many (at the same
    positions)."""
    rows, cols, *_ = layer.remove_connections(least_important(layer, task))
    layer.add_connections(rows, cols, np.zeros(rows.size, np.float32), task)


# ----- the layer, several tasks in -----
def importances(layer, task):
    """Eq. 4 for the layer's outputs (ingoing) and inputs (outgoing, as for the flattened features)."""
    mine = layer.owner == task
    return (kernels.segment_sum(layer.importance[mine], layer.rows[mine], layer.out_index.n_slots),
            kernels.segment_sum(layer.importance[mine], layer.indices[mine], layer.in_index.n_slots))


def build(n_in, n_out, tasks, seed=0):
    """The layer after ``tasks`` tasks, with a random Omega on task ``tasks``'s connections too. Returns (layer,
    rows of the next task, cols, count, rng)."""
    rng = np.random.default_rng(seed)
    layer = SparseLinear(NeuronIndex(n_in, dense=True), NeuronIndex(n_out, dense=True))
    free, cols = np.ones(n_out, bool), np.arange(n_in)
    count = int(round(DENSITY * n_in * n_out))
    for task in range(tasks + 1):
        rows = np.flatnonzero(free)
        if task == tasks:
            return layer, rows, cols, count, rng
        chosen = choose_new(layer, rows, cols, count, rng)
        layer.add_connections(rows[chosen // n_in], cols[chosen % n_in], rng.normal(size=count), task,
                              rng.exponential(size=count))
        a_out = importances(layer, task)[0]
        free[rows[np.argsort(-a_out[rows], kind="stable")[:round(RESERVED * n_out)]]] = False


def measure(run, restore, repeats):
    """(median seconds over ``repeats`` runs, tracemalloc peak in bytes above the start of one run, result)."""
    times = []
    for _ in range(repeats):
        restore()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    restore()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    result = run()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return statistics.median(times), peak, result


def same(a, b):
    if isinstance(a, list):
        return all(np.array_equal(x, y) for x, y in zip(a, b))
    return np.array_equal(a, b)


def one_task(n_in, n_out, tasks, repeats):
    """Measure both methods with ``tasks`` earlier tasks in the layer. Returns (results dict, Markdown section)."""
    layer, rows, cols, count, rng = build(n_in, n_out, tasks)
    task, before, rng_state = tasks, layer.connection_arrays(), rng.bit_generator.state

    def restore_before():
        rng.bit_generator.state = rng_state
        layer.set_connection_arrays(before)

    chosen = choose_new(layer, rows, cols, count, rng)  # the task's allocation, then a random Omega
    layer.add_connections(rows[chosen // n_in], cols[chosen % n_in], rng.normal(size=count), task,
                          rng.exponential(size=count))
    a_out, a_in = importances(layer, task)
    allocated, taken = layer.connection_arrays(), SpaceNet._occupied(layer, rows, cols).size

    def restore_allocated():
        layer.set_connection_arrays(allocated)

    def rewired(rewire):
        rewire(layer, task, rows, cols, a_out, a_in)
        return [a.copy() for a in layer.connection_arrays()]

    moved = int(RATIO * count)
    cases = {"allocation (choosing the positions)": (lambda: choose_old(layer, rows, cols, count, rng),
                                                     lambda: choose_new(layer, rows, cols, count, rng), restore_before),
             "growth (listing the block, choosing where to grow)": (
                 lambda: grow_choice_old(layer, rows, cols, a_out, a_in, moved),
                 lambda: grow_choice_new(layer, rows, cols, a_out, a_in, moved), restore_allocated),
             "rewire (drop and grow, whole)": (lambda: rewired(rewire_old), lambda: rewired(rewire_new),
                                               restore_allocated)}
    results, table = {}, []
    for name, (old, new, restore) in cases.items():
        t_old, m_old, r_old = measure(old, restore, repeats)
        t_new, m_new, r_new = measure(new, restore, repeats)
        if not same(r_old, r_new):
            raise SystemExit(f"{name}: the old and new methods picked different positions")
        results[name] = dict(old_s=t_old, new_s=t_new, old_peak_bytes=m_old, new_peak_bytes=m_new)
        table.append([name, f"{t_old * 1e3:.1f}", f"{t_new * 1e3:.1f}", f"{t_old / t_new:.1f}x",
                      f"{m_old / 1e6:.1f}", f"{m_new / 1e6:.1f}", f"{m_old / max(m_new, 1):.1f}x"])
    t_base, m_base, _ = measure(lambda: rebuild_only(layer, task), restore_allocated, repeats)
    results["rebuild only"] = dict(s=t_base, peak_bytes=m_base)
    table.append(["rebuild only (the rewire's remove and add, in both)", "", f"{t_base * 1e3:.1f}", "", "",
                  f"{m_base / 1e6:.1f}", ""])
    headers = ["", "old ms", "new ms", "speed-up", "old peak MB", "new peak MB", "less memory"]
    markdown = (f"## Task {task + 1}\n\nBlock: {rows.size} free neurons x {n_in} inputs = {rows.size * n_in:,} "
                f"positions, {taken:,} taken after the allocation (the layer holds {len(allocated[0]):,} "
                f"connections); {count:,} connections per task, {moved:,} moved per rewire.\n\n"
                + md_table(headers, table))
    results.update(block_positions=int(rows.size * n_in), taken=int(taken), connections=len(allocated[0]))
    return results, markdown


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[0, 3],
                        help="earlier tasks in the layer, one measurement each (default 0 3)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method (default 5)")
    parser.add_argument("--quick", action="store_true", help="a 512 -> 64 layer, nothing written")
    args = parser.parse_args(argv)
    n_in, n_out = (512, 64) if args.quick else (4096, 512)
    machine = machine_info()
    one_task(n_in // 8, n_out // 8, 1, 1)  # compile the kernels before timing
    sections, results = [], {}
    for tasks in args.tasks:
        results[f"task {tasks + 1}"], section = one_task(n_in, n_out, tasks, args.repeats)
        sections.append(section)
    markdown = (f"# Rewiring memory: the CNN's {n_in} -> {n_out} layer\n\n"
                f"Every neuron selected, {DENSITY:.0%} of the layer per task, {round(RESERVED * n_out)} neurons "
                f"reserved per task, rewire ratio {RATIO}. Old: the dense NumPy code (tests/test_growth.py); new: "
                f"spacenet_np.kernels' occupied_positions, free_positions and top_positions; both pick the same "
                f"positions (checked). Time: median of {args.repeats} runs; "
                f"memory: tracemalloc peak above the start.\n\n" + "\n\n".join(sections))
    print(markdown)
    if not args.quick:
        write_results("rewire_memory", dict(n_in=n_in, n_out=n_out, results=results), markdown,
                      reproduce_command("rewire_memory", argv or sys.argv[1:]), machine)


if __name__ == "__main__":
    main()
