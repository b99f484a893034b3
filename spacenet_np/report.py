"""Tables and figures from training runs.

``python -m spacenet_np.report RUN_DIR [RUN_DIR ...] --out REPORT_DIR``. Each RUN_DIR is an ``--out``
folder of ``spacenet_np.train``: its ``results.json`` and, when present, the recorder snapshots
``snapshots/seed{S}.npz`` (see ``spacenet_np.recorder``). Writes, atomically, into REPORT_DIR:

- ``table.md``: per task stream, a table like the paper's Tables 2-3 (accuracy mean +/- std over seeds, BWT,
  forgetting, per-task std, parameters, model size, the paper's number, memory/data/expansion properties), the
  final per-task accuracies and the runs' settings;
- ``per_task_accuracy_<task>.png`` (Fig. 3 style) and ``accuracy_matrix_<task>_<method>.png``;
- from snapshots: ``connection_distribution_<task>.png`` (Fig. 5), ``input_connections_<task>.png`` (Fig. 6),
  ``activations_<task>.png`` (Fig. 4) and ``neuron_usage_<task>.png``.

Standard deviations are over seeds with ``ddof=0``, as in ``results.json``. Tasks are numbered from 1 in every
table and figure, as the CLI prints them.

Every input is read and checked before anything is written, and the outputs are built in a staging folder inside
REPORT_DIR and moved into place at the end: an invalid input (or any failure) leaves no new file behind. Runs of
one method are told apart by the shortest end of their paths that differs (``a/run`` and ``b/run``), and no two
outputs share a file name.
"""
import argparse
import io
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .fileio import atomic_write_bytes
from .layers import FREE
from .process import run_main
from .recorder import Recorder, snapshot_seed

METHOD_ORDER = ("joint", "finetune", "ewc", "rehearsal", "static", "spacenet")
METHOD_NAMES = {"spacenet": "SpaceNet", "static": "Static-SparseNN", "rehearsal": "SpaceNet-Rehearsal",
                "ewc": "EWC", "finetune": "Fine-tuning", "joint": "Joint training"}
# (extra memory requirements, old task data, model expansion), as in the paper's Tables 2-3.
METHOD_PROPERTIES = {"spacenet": ("No", "No", "No"), "static": ("No", "No", "No"),
                     "rehearsal": ("Yes", "Yes", "No"), "ewc": ("No", "No", "No"),
                     "finetune": ("No", "No", "No"), "joint": ("Yes", "Yes", "No")}
# The paper's average accuracy (mean, std over 10 seeds), Tables 2 (split MNIST) and 3 (split Fashion-MNIST).
PAPER_ACCURACY = {
    "split_mnist": {"ewc": (20.01, 0.06), "static": (61.25, 2.30), "spacenet": (75.53, 1.82),
                    "rehearsal": (95.08, 0.15)},
    "split_fashion_mnist": {"ewc": (19.47, 0.98), "static": (56.80, 2.30), "spacenet": (64.83, 0.69),
                            "rehearsal": (84.18, 0.24)},
}
STREAM_NAMES = {"split_mnist": "Split MNIST", "split_fashion_mnist": "Split Fashion-MNIST"}
STATUS_COLORS = {"reserved": "#d62728", "shared": "#1f77b4", "unused": "#d9d9d9"}


@dataclass
class RunDir:
    """One run folder: its results.json, a label unique within its stream, and its snapshots by seed.

    ``where`` is the end of the folder's path that tells it apart from other runs of its method ("" if none)."""
    path: Path
    results: dict
    label: str = ""
    snapshots: dict = field(default_factory=dict)
    where: str = ""

    @property
    def task(self):
        return self.results["task"]

    @property
    def method(self):
        return self.results["method"]

    @property
    def runs(self):
        return self.results["runs"]

    @property
    def name(self):
        """The display name: the paper's method name, with ``where`` when the stream has the method twice."""
        name = METHOD_NAMES.get(self.method, self.method)
        return f"{name} ({self.where})" if self.where else name

    def snapshot(self):
        """The snapshot of the lowest seed, or None."""
        return self.snapshots[min(self.snapshots)] if self.snapshots else None


def load_run(path):
    """Read ``path/results.json`` and ``snapshots/seed*.npz``; SystemExit naming the folder if unusable."""
    path = Path(path)
    results_file = path / "results.json"
    if not results_file.is_file():
        raise SystemExit(f"error: {path} has no results.json (expected {results_file}); give the --out "
                         f"folder of a finished 'python -m spacenet_np.train' run")
    try:
        results = json.loads(results_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"error: cannot read {results_file}: {err}") from None
    check_results(results_file, results)
    run = RunDir(path=path, results=results)
    seeds = {r.get("seed") for r in results["runs"]}
    for file in sorted((path / "snapshots").glob("seed*.npz")):
        seed = snapshot_seed(file)
        if seed is not None and seed in seeds:
            try:
                run.snapshots[seed] = Recorder.load(file)
            except (OSError, ValueError, KeyError) as err:
                print(f"note: skipping unreadable snapshot {file}: {err}")
    return run


def check_results(results_file, results):
    """SystemExit naming ``results_file`` unless ``results`` has what the table and figures read: ``task`` and
    ``method`` strings, and runs whose accuracy matrices are lower-triangular (row i has i + 1 finite numbers), all
    with the same number of tasks, with matching ``final_per_task_accuracy`` and ``final_average_accuracy``."""
    def refuse(what):
        raise SystemExit(f"error: {results_file} {what}; give the --out folder of a finished "
                         f"'python -m spacenet_np.train' run")

    if not isinstance(results, dict):
        refuse("does not hold a JSON object")
    missing = [key for key in ("task", "method", "runs") if key not in results]
    if missing or not isinstance(results["runs"], list) or not results["runs"]:
        refuse(f"lacks {missing or ['runs (empty)']}")
    if not (isinstance(results["task"], str) and isinstance(results["method"], str)):
        refuse("has a task or method that is not a string")
    lengths = set()
    for k, run in enumerate(results["runs"]):
        matrix = run.get("accuracy_matrix") if isinstance(run, dict) else None
        if not (isinstance(matrix, list) and matrix and all(
                isinstance(row, list) and len(row) == i + 1 and all(_finite(v) for v in row)
                for i, row in enumerate(matrix))):
            refuse(f"run {k}: accuracy_matrix must be rows of 1, 2, ... finite numbers")
        final = run.get("final_per_task_accuracy")
        if not (isinstance(final, list) and len(final) == len(matrix) and all(_finite(v) for v in final)
                and _finite(run.get("final_average_accuracy"))):
            refuse(f"run {k}: final_per_task_accuracy ({len(matrix)} numbers) or final_average_accuracy is missing "
                   f"or invalid")
        lengths.add(len(matrix))
    if len(lengths) > 1:
        refuse(f"has runs with different numbers of tasks {sorted(lengths)}")


def _finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def group_runs(runs):
    """Runs grouped by task stream (in order of first appearance), each group sorted by ``METHOD_ORDER``.

    Labels are the method names, with ``where`` (the shortest end of the path that differs) added when a stream
    has one method more than once; the same folder given twice is refused.
    """
    streams = {}
    for run in runs:
        streams.setdefault(run.task, []).append(run)
    for group in streams.values():
        by_method = {}
        for run in group:
            by_method.setdefault(run.method, []).append(run)
        for same in by_method.values():
            for run, where in zip(same, distinguishing_ends([run.path for run in same])):
                run.where = where
                run.label = f"{run.method} ({where})" if where else run.method
        rank = {m: k for k, m in enumerate(METHOD_ORDER)}
        group.sort(key=lambda r: (rank.get(r.method, len(METHOD_ORDER)), r.label))
    return streams


def distinguishing_ends(paths):
    """The shortest ends of ``paths`` (as "a/run") that tell them apart; [""] for one path. SystemExit for a
    folder given twice."""
    if len(paths) == 1:
        return [""]
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    if len(set(parts)) < len(parts):
        twice = next(p for p in paths if parts.count(Path(os.path.abspath(p)).parts) > 1)
        raise SystemExit(f"error: the run folder {twice} is given twice")
    for k in range(1, max(map(len, parts)) + 1):
        ends = ["/".join(p[-k:]) for p in parts]
        if len(set(ends)) == len(ends):
            return ends
    return ["/".join(p) for p in parts]  # pragma: no cover - distinct paths differ in some end


def slug(text):
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


# ----- statistics -----
def seed_stats(runs, key):
    """(mean, std, n) of ``run[key]`` over the runs that have it, or None."""
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return None
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std()), values.size


def matrix_stats(runs):
    """Seed mean and std of the accuracy matrix: two (T, T) arrays, NaN above the diagonal."""
    T = max(len(r["accuracy_matrix"]) for r in runs)
    stack = np.full((len(runs), T, T), np.nan)
    for k, r in enumerate(runs):
        for i, row in enumerate(r["accuracy_matrix"]):
            stack[k, i, :len(row)] = row
    with warnings.catch_warnings():  # the cells above the diagonal are NaN in every seed
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(stack, axis=0), np.nanstd(stack, axis=0)


def final_per_task(runs):
    """(mean (T,), std (T,)) over seeds of the accuracy on each task after the last task."""
    finals = np.asarray([r["final_per_task_accuracy"] for r in runs], dtype=np.float64)
    return finals.mean(axis=0), finals.std(axis=0)


def concentration(pairs, column):
    """Distinct neurons in ``pairs[:, column]`` and the fewest of them holding half of the connections."""
    if pairs.shape[0] == 0:
        return 0, 0
    counts = np.sort(np.unique(pairs[:, column], return_counts=True)[1])[::-1]
    half = int(np.searchsorted(np.cumsum(counts), 0.5 * counts.sum()) + 1)
    return counts.size, half


# ----- table.md -----
def fmt(stats, digits=2):
    if stats is None:
        return "—"
    mean, std, n = stats
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def stream_table(task, group):
    """The Markdown of one stream: main table, per-task accuracies, settings."""
    lines = [f"## {STREAM_NAMES.get(task, task)} (`{task}`)", "",
             "| Method | Accuracy (%) | Seeds | Paper (%) | BWT | Forgetting | Per-task std | Parameters "
             "| Model size (KB) | Extra memory | Old task data | Model expansion |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    paper = PAPER_ACCURACY.get(task, {})
    for run in group:
        acc = seed_stats(run.runs, "final_average_accuracy")
        ref = paper.get(run.method)
        ref_text = f"{ref[0]:.2f} ± {ref[1]:.2f}" if ref else "—"
        params = seed_stats(run.runs, "parameter_count")
        size = seed_stats(run.runs, "model_size_bytes")
        size_kb = None if size is None else (size[0] / 1024, size[1] / 1024, size[2])
        props = METHOD_PROPERTIES.get(run.method, ("?", "?", "?"))
        lines.append(f"| {run.name} | {fmt(acc)} | {acc[2]} | {ref_text} "
                     f"| {fmt(seed_stats(run.runs, 'backward_transfer'))} "
                     f"| {fmt(seed_stats(run.runs, 'average_forgetting'))} "
                     f"| {fmt(seed_stats(run.runs, 'final_per_task_std'))} "
                     f"| {'—' if params is None else f'{params[0]:,.0f}'} "
                     f"| {'—' if size_kb is None else f'{size_kb[0]:.1f}'} | {' | '.join(props)} |")
    lines += ["", "Accuracy: final average accuracy over all tasks, mean ± std over seeds (ddof=0). "
              "Paper: Tables 2-3 of Sokar et al. (2021), 10 seeds (SpaceNet-Rehearsal for `rehearsal`). "
              "BWT: mean of R[T][j] - R[j][j]; forgetting: mean of best earlier minus final accuracy; "
              "per-task std: std of the final per-task accuracies, mean over seeds. Parameters and size: "
              "live connections and biases, mean over seeds.", ""]
    n_tasks = max(len(r["final_per_task_accuracy"]) for run in group for r in run.runs)
    lines += ["Final accuracy per task (%), mean ± std over seeds:", "",
              "| Method | " + " | ".join(f"Task {j + 1}" for j in range(n_tasks)) + " |",
              "|---|" + "---|" * n_tasks]
    for run in group:
        mean, std = final_per_task(run.runs)
        cells = [f"{m:.2f} ± {s:.2f}" if len(run.runs) > 1 else f"{m:.2f}" for m, s in zip(mean, std)]
        lines.append(f"| {run.name} | " + " | ".join(cells) + " |")
    lines += ["", "Runs:", ""]
    for run in group:
        cfg = run.results.get("config", {})
        keys = ("hidden", "connections_per_task", "selected_neurons", "reserved_neurons", "epochs", "lr",
                "batch_size", "rewire_ratio")
        settings = ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)
        wall = seed_stats(run.runs, "wall_time_s")
        seeds = [r.get("seed") for r in run.runs]
        snap = f"snapshots for seeds {sorted(run.snapshots)}" if run.snapshots else "no snapshots"
        lines.append(f"- {run.name}: `{run.path}`, seeds {seeds}, {settings}"
                     + (f", {wall[0]:.0f} s per seed" if wall else "") + f"; {snap}")
    return "\n".join(lines) + "\n"


def write_table(streams, out, path=None):
    text = "# Results\n\n" + "\n".join(stream_table(task, group) for task, group in streams.items())
    path = out / "table.md" if path is None else path
    atomic_write_bytes(path, text.encode())
    return path


# ----- figures -----
def _figure(width, height):
    from matplotlib.figure import Figure  # no pyplot: no global state, the Agg canvas is used for PNG
    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig, path):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def method_colors(group):
    from matplotlib import colormaps
    base = {"spacenet": 0, "static": 1, "rehearsal": 2, "ewc": 3, "finetune": 4, "joint": 5}
    cmap = colormaps["tab10"]
    used, colors = set(), {}
    for run in group:
        index = base.get(run.method, 6)
        while index in used:
            index += 1
        used.add(index)
        colors[run.label] = cmap(index % 10)
    return colors


def plot_per_task_accuracy(task, group, path):
    """Fig. 3 style: final accuracy per task and the average, bars per method, std error bars."""
    n_tasks = max(len(r["final_per_task_accuracy"]) for run in group for r in run.runs)
    groups = [f"Task {j + 1}" for j in range(n_tasks)] + ["Average"]
    fig = _figure(max(7.0, 1.2 * len(groups) * max(1, len(group)) ** 0.5 + 2), 4.4)
    ax = fig.add_subplot()
    colors = method_colors(group)
    width = 0.8 / len(group)
    x = np.arange(len(groups))
    for k, run in enumerate(group):
        mean, std = final_per_task(run.runs)
        avg = seed_stats(run.runs, "final_average_accuracy")
        heights = np.append(mean, avg[0])
        errors = np.append(std, avg[1])
        pos = x - 0.4 + width * (k + 0.5)
        ax.bar(pos, heights, width, yerr=errors if len(run.runs) > 1 else None, capsize=2,
               color=colors[run.label], label=f"{run.name} (n={len(run.runs)})", edgecolor="black",
               linewidth=0.4)
        tops = heights + (errors if len(run.runs) > 1 else 0)
        for p, h, top in zip(pos, heights, tops):
            ax.text(p, top + 1.0, f"{h:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, groups)
    ax.axvline(n_tasks - 0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylim(0, 115)
    ax.set_ylabel("test accuracy after the last task (%)")
    ax.set_title(f"{STREAM_NAMES.get(task, task)}: accuracy per task after learning all tasks "
                 "(mean ± std over seeds)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncols=min(len(group), 3))
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_accuracy_matrix(task, run, path):
    """The seed-mean accuracy matrix as an annotated lower-triangular heatmap."""
    mean, std = matrix_stats(run.runs)
    T = mean.shape[0]
    fig = _figure(1.1 * T + 2.2, 0.95 * T + 1.6)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(mean), cmap="viridis", vmin=0, vmax=100)
    for i in range(T):
        for j in range(i + 1):
            text = f"{mean[i, j]:.1f}" + (f"\n±{std[i, j]:.1f}" if len(run.runs) > 1 else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if mean[i, j] < 60 else "black")
    ax.set_xticks(range(T), [str(j + 1) for j in range(T)])
    ax.set_yticks(range(T), [str(i + 1) for i in range(T)])
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after learning task")
    ax.set_title(f"{STREAM_NAMES.get(task, task)}, {run.name}: accuracy (%)\n"
                 f"mean over {len(run.runs)} seed(s)", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return save_figure(fig, path)


def plot_connection_distribution(task, run, analysis_task, path):
    """Fig. 5: one task's connections in the snapshot layer, at allocation and after adaptive training.

    Top: the connection matrix over the neurons the task touched, both panels ordered by the neurons'
    connection counts after training. Bottom: connections per neuron, sorted, before vs after.
    Returns (path, summary lines).
    """
    seed = min(run.snapshots)
    rec = run.snapshots[seed]
    layer = int(rec.arrays["pair_layer"])
    before, after = rec.pairs(analysis_task, "begin"), rec.pairs(analysis_task, "end")
    out_order = _degree_order(before[:, 0], after[:, 0])
    in_order = _degree_order(before[:, 1], after[:, 1])
    fig = _figure(10, 8.6)
    grid = fig.add_gridspec(2, 2, height_ratios=[1.25, 1])
    names = ("at allocation (random)", "after adaptive training")
    summary = []
    for k, (pairs, name) in enumerate(zip((before, after), names)):
        ax = fig.add_subplot(grid[0, k])
        matrix = np.zeros((out_order.size, in_order.size))
        matrix[_positions(out_order, pairs[:, 0]), _positions(in_order, pairs[:, 1])] = 1
        ax.imshow(matrix, cmap="Greys", aspect="auto", interpolation="nearest", vmin=0, vmax=1)
        n_out, half_out = concentration(pairs, 0)
        n_in, half_in = concentration(pairs, 1)
        ax.set_title(f"({'ab'[k]}) {name}\n"
                     f"{pairs.shape[0]} connections; {n_in} in / {n_out} out neurons touched;\n"
                     f"half of the connections on {half_in} in / {half_out} out neurons", fontsize=9)
        ax.set_xlabel(f"in neurons (layer {layer}), by connections after training")
        ax.set_ylabel(f"out neurons (layer {layer + 1}), by connections after training")
        summary.append((name, pairs.shape[0], n_in, n_out, half_in, half_out))
    for k, (column, side) in enumerate(((0, f"out neuron (layer {layer + 1}): in-degree"),
                                        (1, f"in neuron (layer {layer}): out-degree"))):
        ax = fig.add_subplot(grid[1, k])
        for pairs, name, style in ((before, names[0], "--"), (after, names[1], "-")):
            counts = np.sort(np.unique(pairs[:, column], return_counts=True)[1])[::-1] if pairs.size else []
            ax.step(np.arange(1, len(counts) + 1), counts, where="mid", linestyle=style, label=name)
        ax.set_xlabel("neurons, sorted by their number of connections")
        ax.set_ylabel(f"connections per {side.split(':')[0]}")
        ax.set_title(f"connections per {side}", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    where = (f"between hidden layers {layer} and {layer + 1}" if layer + 1 < len(rec.sizes) - 1
             else f"in layer {layer}")
    fig.suptitle(f"{STREAM_NAMES.get(task, task)}, {run.name}, seed {seed}: task {analysis_task + 1}'s "
                 f"connections {where}", fontsize=11)
    lines = [f"{run.name} seed {seed}, task {analysis_task + 1}, layer {layer}: {name}: {m} connections "
             f"touch {ni} in / {no} out neurons (half of the connections on {hi} in / {ho} out)"
             for name, m, ni, no, hi, ho in summary]
    for other in sorted(run.snapshots)[1:]:
        r = run.snapshots[other]
        if r.has(f"t{analysis_task}_end_touched"):
            b, a = r.touched(analysis_task, "begin"), r.touched(analysis_task, "end")
            lines.append(f"{run.name} seed {other}, task {analysis_task + 1}: {b[2]} in / {b[1]} out neurons "
                         f"at allocation, {a[2]} in / {a[1]} out after training")
    return save_figure(fig, path), lines


def _degree_order(before, after):
    """Neuron ids touched before or after, sorted by connections after training (then before, then id)."""
    ids = np.union1d(before, after)

    def counts(values):
        unique, n = np.unique(values, return_counts=True)
        out = np.zeros(ids.size, dtype=np.int64)
        out[np.searchsorted(ids, unique)] = n
        return out

    return ids[np.lexsort((ids, -counts(before), -counts(after)))]


def _positions(order, values):
    """Position of each of ``values`` in the array ``order`` (which holds every value once)."""
    index = np.argsort(order)
    return index[np.searchsorted(order[index], values)]


def _image_shape(n):
    side = int(round(np.sqrt(n)))
    return (side, side) if side * side == n else (1, n)


def plot_input_connections(task, spacenet_run, static_run, path):
    """Fig. 6: per task, the task's layer-0 connections per input pixel as an image; mean over seeds.

    Rows: SpaceNet after training, then Static-SparseNN after training (or SpaceNet at allocation when no
    static run with snapshots is given).
    """
    rows = [(spacenet_run, "end", f"{spacenet_run.name}\nafter training")]
    if static_run is not None:
        rows.append((static_run, "end", f"{static_run.name}\nafter training"))
    else:
        rows.append((spacenet_run, "begin", f"{spacenet_run.name}\nat allocation"))
    tasks = spacenet_run.snapshot().tasks
    maps = []
    for run, when, _ in rows:
        row = []
        for t in tasks:
            stack = [rec.pixel_counts(t, when) for rec in run.snapshots.values()
                     if rec.has(f"t{t}_{when}_pixels")]
            row.append(np.mean(stack, axis=0) if stack else None)
        maps.append(row)
    vmax = max(float(m.max()) for row in maps for m in row if m is not None)
    shape = _image_shape(spacenet_run.snapshot().sizes[0])
    fig = _figure(2.3 * len(tasks) + 1.4, 2.5 * len(rows) + 0.7)
    axes = fig.subplots(len(rows), len(tasks), squeeze=False)
    image = None
    for r, (_run, _when, name) in enumerate(rows):
        for c, t in enumerate(tasks):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if maps[r][c] is None:
                ax.set_axis_off()
                continue
            image = ax.imshow(maps[r][c].reshape(shape), cmap="hot", vmin=0, vmax=vmax,
                              interpolation="nearest")
            if r == 0:
                classes = spacenet_run.snapshot().classes(t)
                ax.set_title(f"task {t + 1} ({' or '.join(str(k) for k in classes)})", fontsize=10)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="connections per input pixel")
    n_seeds = len(spacenet_run.snapshots)
    fig.suptitle(f"{STREAM_NAMES.get(task, task)}: each task's input-layer connections per pixel "
                 f"(mean over {n_seeds} seed(s))", fontsize=11)
    return save_figure(fig, path)


def plot_activations(task, run, analysis_task, path):
    """Fig. 4: hidden activations of the probe samples of one task, after that task and after the last one.

    Samples on the y axis (grouped by class), the neurons with slots on the x axis (by neuron id); a strip
    above each heatmap colours the neurons reserved for each task. Returns None if no probe has its classes.
    """
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    seed = min(run.snapshots)
    rec = run.snapshots[seed]
    labels = rec.probe_labels
    classes = rec.classes(analysis_task)
    samples = np.flatnonzero(np.isin(labels, classes))
    samples = samples[np.argsort(labels[samples], kind="stable")]
    if samples.size == 0:
        return None
    last = rec.tasks[-1]
    moments = [analysis_task] + ([last] if last != analysis_task else [])
    n_hidden = len(rec.sizes) - 2
    fig = _figure(6.2 * n_hidden + 1.0, 3.6 * len(moments) + 0.8)
    grid = fig.add_gridspec(2 * len(moments), n_hidden, height_ratios=[0.06, 1] * len(moments))
    strip_colors = ListedColormap(["white"] + [colormaps["tab10"](k % 10) for k in range(len(rec.tasks))])
    image = None
    positive = np.concatenate([rec.activations(m, h)[1][:, samples].ravel() for m in moments
                               for h in range(n_hidden)])
    positive = positive[positive > 0]
    # a few large values would hide the rest
    vmax = float(np.percentile(positive, 99)) if positive.size else 1.0
    for i, moment in enumerate(moments):
        for h in range(n_hidden):
            ids, acts, reserved_by = rec.activations(moment, h)
            order = np.argsort(ids, kind="stable")
            values = acts[order][:, samples].T
            strip_ax = fig.add_subplot(grid[2 * i, h])
            ax = fig.add_subplot(grid[2 * i + 1, h], sharex=strip_ax)
            reserved = reserved_by[order].astype(np.int64)
            strip = np.where(reserved == FREE, 0, reserved + 1)[None, :]
            strip_ax.imshow(strip, aspect="auto", cmap=strip_colors, vmin=0, vmax=len(rec.tasks),
                            interpolation="nearest")
            strip_ax.set_yticks([])
            strip_ax.tick_params(labelbottom=False, bottom=False)
            n_active = float(np.count_nonzero(values)) / max(samples.size, 1)
            strip_ax.set_title(f"hidden layer {h + 1} after task {moment + 1}: "
                               f"{ids.size} of {rec.sizes[h + 1]} neurons have slots\n"
                               f"active (> 0) per sample: {n_active:.0f} neurons = "
                               f"{100 * n_active / max(ids.size, 1):.0f}% of those with slots, "
                               f"{100 * n_active / rec.sizes[h + 1]:.0f}% of the layer", fontsize=9)
            image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0, vmax=vmax,
                              interpolation="nearest")
            ticks = np.linspace(0, ids.size - 1, min(ids.size, 8)).round().astype(int) if ids.size else []
            ax.set_xticks(ticks, [str(ids[order][t]) for t in ticks], fontsize=7)
            ax.set_xlabel("neurons with slots, sorted by neuron id (tick labels: neuron ids)", fontsize=8)
            for b in np.flatnonzero(np.diff(labels[samples])) + 0.5:
                ax.axhline(b, color="white", linewidth=1)
            present = [c for c in classes if np.any(labels[samples] == c)]
            ax.set_yticks([np.mean(np.flatnonzero(labels[samples] == c)) for c in present],
                          [f"class {c}" for c in present], fontsize=8, rotation=90, va="center")
            if h == 0:
                ax.set_ylabel(f"{samples.size} test samples", fontsize=8)
    fig.colorbar(image, ax=fig.axes, shrink=0.6, extend="max", label="activation (ReLU)")
    handles = [Patch(facecolor="white", edgecolor="black", label="free")] + [
        Patch(facecolor=strip_colors(k + 1), label=f"reserved for task {k + 1}")
        for k in range(len(rec.tasks))]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8,
               title="strip above each heatmap", title_fontsize=8)
    fig.suptitle(f"{STREAM_NAMES.get(task, task)}, {run.name}, seed {seed}: hidden activations for test "
                 f"samples of task {analysis_task + 1} (colour scale capped at the 99th percentile of "
                 f"positive values)", fontsize=10)
    return save_figure(fig, path)


def plot_neuron_usage(task, runs, path):
    """Fractions of reserved / shared / unused neurons per hidden layer after each task (mean over seeds)."""
    n_hidden = len(runs[0].snapshot().sizes) - 2
    fig = _figure(3.3 * n_hidden + 1.8, 2.9 * len(runs) + 0.6)
    axes = fig.subplots(len(runs), n_hidden, squeeze=False, sharey=True)
    for r, run in enumerate(runs):
        tasks = run.snapshot().tasks
        status = np.mean([[rec.neuron_status(t) for t in tasks] for rec in run.snapshots.values()
                          if all(rec.has(f"t{t}_status") for t in tasks)], axis=0)  # (tasks, hidden, 4)
        for h in range(min(n_hidden, status.shape[1])):
            ax = axes[r, h]
            width = status[:, h, 0]
            bottom = np.zeros(len(tasks))
            x = np.arange(len(tasks))
            for col, name in ((1, "reserved"), (2, "shared"), (3, "unused")):
                frac = status[:, h, col] / width
                ax.bar(x, frac, 0.7, bottom=bottom, color=STATUS_COLORS[name],
                       label={"shared": "shared (slot, not reserved)", "unused": "free, never used (no slot)"}
                       .get(name, name), edgecolor="black", linewidth=0.4)
                for xi, (b, f, n) in enumerate(zip(bottom, frac, status[:, h, col])):
                    if f > 0.06:
                        ax.text(xi, b + f / 2, f"{n:.0f}", ha="center", va="center", fontsize=7)
                bottom += frac
            ax.set_xticks(x, [str(t + 1) for t in tasks])
            ax.set_xlabel("after task")
            ax.set_title(f"{run.name}: hidden layer {h + 1} ({int(width[0])} neurons)", fontsize=9)
            if h == 0:
                ax.set_ylabel("fraction of the layer")
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=3, fontsize=8)
    fig.suptitle(f"{STREAM_NAMES.get(task, task)}: neuron usage per hidden layer "
                 "(bar labels: neuron counts, mean over seeds)", fontsize=10)
    return save_figure(fig, path)


# ----- the report -----
def write_report(run_dirs, out, fig4_task=0, fig5_task=1, log=print):
    """Write table.md and every figure for ``run_dirs`` (paths) into ``out``. Returns the written paths.

    ``fig4_task``/``fig5_task`` are 0-based task indices of the activation and connection-distribution
    figures. ``log`` receives the notes and the Fig. 5 summary lines. Every run folder is read and checked first
    (SystemExit naming a bad one); the files are built in a staging folder inside ``out`` and moved into ``out`` at
    the end, so a failure leaves no new file (and no folder the report created) behind.
    """
    streams = group_runs([load_run(d) for d in run_dirs])
    out = Path(out)
    created = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    moved = []
    try:
        for path in write_outputs(streams, staging, fig4_task, fig5_task, log):
            moved.append(out / path.name)
            os.replace(path, moved[-1])
    except BaseException:
        for path in moved:
            path.unlink(missing_ok=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return moved


def write_outputs(streams, out, fig4_task, fig5_task, log):
    """Write the table and figures of ``streams`` (``group_runs``) into the folder ``out``, each under a file name
    no other output has. Returns the written paths."""
    used = set()

    def place(name):
        stem, dot, ext = name.rpartition(".")
        unique, k = name, 1
        while unique in used:
            k += 1
            unique = f"{stem}-{k}{dot}{ext}"
        used.add(unique)
        return out / unique

    written = [write_table(streams, out, place("table.md"))]
    for task, group in streams.items():
        written.append(plot_per_task_accuracy(task, group, place(f"per_task_accuracy_{slug(task)}.png")))
        for run in group:
            name = f"accuracy_matrix_{slug(task)}_{slug(run.label)}.png"
            written.append(plot_accuracy_matrix(task, run, place(name)))
        with_snapshots = [run for run in group if run.snapshots]
        for run in group:
            if not run.snapshots:
                log(f"note: {run.path} has no snapshots/seed*.npz; skipping its analysis figures "
                    f"({task}, {run.name})")
        spacenets = [run for run in with_snapshots if run.method == "spacenet"]
        statics = [run for run in with_snapshots if run.method == "static"]
        if not spacenets:
            log(f"note: no SpaceNet run with snapshots for {task}; skipping connection_distribution, "
                f"input_connections and activations figures")
        for run in spacenets:
            suffix = slug(task) + ("" if len(spacenets) == 1 else f"_{slug(run.label)}")
            rec = run.snapshot()
            if rec.has(f"t{fig5_task}_end_pairs"):
                path, lines = plot_connection_distribution(task, run, fig5_task,
                                                           place(f"connection_distribution_{suffix}.png"))
                written.append(path)
                for line in lines:
                    log(line)
            else:
                log(f"note: {run.path}: no snapshot of task {fig5_task + 1}; "
                    f"skipping connection_distribution")
            written.append(plot_input_connections(task, run, statics[0] if statics else None,
                                                  place(f"input_connections_{suffix}.png")))
            path = None
            if rec.probe_labels is not None and rec.has(f"t{fig4_task}_act0"):
                path = plot_activations(task, run, fig4_task, place(f"activations_{suffix}.png"))
            if path is not None:
                written.append(path)
            elif len(rec.sizes) > 2:
                log(f"note: {run.path}: no probe activations for the classes of task {fig4_task + 1}; "
                    f"skipping activations")
        usage = [run for run in with_snapshots if len(run.snapshot().sizes) > 2 and run.snapshot().tasks]
        if usage:
            written.append(plot_neuron_usage(task, usage, place(f"neuron_usage_{slug(task)}.png")))
    return written


def build_parser():
    p = argparse.ArgumentParser(prog="python -m spacenet_np.report", description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="--out folders of spacenet_np.train, or one sweep folder of spacenet_np.sweep")
    p.add_argument("--out", help="folder for the tables and PNG figures (default for a sweep: SWEEP/report)")
    p.add_argument("--top", type=int, default=10, help="sweep folders: trials in the top-k table")
    p.add_argument("--activations-task", type=int, default=1,
                   help="task (from 1) whose test samples the activation figure shows (paper Fig. 4: 1)")
    p.add_argument("--connections-task", type=int, default=2,
                   help="task (from 1) whose connections the distribution figure shows (paper Fig. 5: 2)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from .sweep_report import SweepError, is_sweep, report_sweep
    if len(args.run_dirs) == 1 and is_sweep(args.run_dirs[0]):
        try:
            written = report_sweep(args.run_dirs[0], args.out or Path(args.run_dirs[0]) / "report", top=args.top)
        except SweepError as err:
            raise SystemExit(f"error: {err}") from None
        for path in written:
            print(path)
        return 0
    if args.out is None:
        raise SystemExit("error: --out is required for train run folders")
    if args.activations_task < 1 or args.connections_task < 1:
        raise SystemExit("error: --activations-task and --connections-task count from 1")
    written = write_report(args.run_dirs, args.out, args.activations_task - 1, args.connections_task - 1)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    run_main(main)
