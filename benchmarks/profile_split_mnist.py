"""Profile of one split MNIST seed of spacenet_np, in-process: where the time goes, per batch and per phase.

The seed runs through the CLI in-process: ``spacenet_np.train.main(["--task", "split_mnist", "--hidden", W, W,
"--seeds", "0", "--quiet", "--out", TMP])``, with everything the CLI does by default. Every Numba kernel is called
through a thin Python wrapper installed in ``spacenet_np.kernels`` (the engine looks kernels up there at each call),
named ``numba_<kernel>_<serial|parallel>``, so that cProfile lists kernel time as its own entries; the strategy's
phases (``train_epoch``, ``rewire``, ``allocate``, ``reserve``, ``predict``, heads), the network's fused steps
(``SparseMLP.train_batches`` and ``train_step``, which also count the batches) and the data loading are timed by
wrappers too. The learner's own methods are not wrapped, so it trains on its default path (an epoch's batches in
one ``mlp_train_batches`` call). A one-epoch CLI run first loads the cached kernels and the data files. Two
runs of the same seed:

1. timers only (no cProfile, so Python code is not slowed down by the profiler): kernel time per phase, and per
   training batch the time in Numba kernels against the rest (Python and NumPy overhead);
2. under cProfile: the top entries by cumulative and by own time, written to ``results/profile.txt``.

The same is repeated at a second width (``--compare-width``, default 1,000,000) with the same per-task budget, and
the entries whose own time grows with the width are listed: they are the O(width) parts.

Run: ``python -m benchmarks.profile_split_mnist`` (about a minute). Threads default to 1 (``--threads 0``: all cores).
"""
if __name__ == "__main__":
    import sys
    if not __package__:  # run as a file: python benchmarks/profile_split_mnist.py
        from pathlib import Path
        sys.path[0] = str(Path(__file__).resolve().parent.parent)
    from benchmarks.common import limit_threads_from_argv
    limit_threads_from_argv(1)  # before NumPy and Numba are imported

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.common import (
    RESULTS_DIR,
    batches_trained,
    kernel_pairs,
    machine_info,
    md_table,
    reproduce_command,
    write_results,
)
from spacenet_np import experiment, kernels, train
from spacenet_np.network import SparseMLP
from spacenet_np.spacenet import SpaceNet

SINGLE_KERNELS = ("mlp_train_step", "mlp_train_batches")  # one build only
KERNEL_NAMES = tuple(kernel_pairs(kernels)) + SINGLE_KERNELS  # every (serial, parallel) pair, and the fused step
PHASES = {"train_epoch": "train", "rewire": "rewire", "allocate": "allocate", "reserve": "reserve",
          "predict": "evaluate", "set_aside_old_heads": "heads", "restore_heads": "heads"}
TOP = 40


def _renamed(function, name):
    """A copy of ``function`` with its own code object named ``name`` (cProfile keys entries by code object)."""
    code = function.__code__.replace(co_name=name, co_qualname=name)
    clone = type(function)(code, function.__globals__, name, function.__defaults__, function.__closure__)
    clone.__qualname__ = name
    return clone


class Instrument:
    """Timing wrappers around the Numba kernels and the SpaceNet phases; ``install()`` / ``remove()``."""

    def __init__(self):
        self.phase = "other"
        self.kernel_s = defaultdict(float)   # (phase, kernel, build) -> seconds
        self.kernel_calls = defaultdict(int)
        self.phase_s = defaultdict(float)
        self.phase_calls = defaultdict(int)
        self.batches = 0
        self.saved_kernels, self.saved_methods, self.saved_steps = {}, {}, {}

    def _kernel_wrapper(self, name, build, kernel):
        instrument = self

        def wrapper(*args):
            start = time.perf_counter()
            result = kernel(*args)
            key = (instrument.phase, name, build)
            instrument.kernel_s[key] += time.perf_counter() - start
            instrument.kernel_calls[key] += 1
            return result
        return _renamed(wrapper, f"numba_{name}_{build}")

    def _method_wrapper(self, method_name, phase, method):
        instrument = self

        def wrapper(*args, **kwargs):
            outer = instrument.phase
            if phase is not None:
                instrument.phase = phase
            start = time.perf_counter()
            try:
                result = method(*args, **kwargs)
                instrument.batches += batches_trained(method_name, result)  # SparseMLP's steps count
                return result
            finally:
                instrument.phase_s[method_name] += time.perf_counter() - start
                instrument.phase_calls[method_name] += 1
                instrument.phase = outer
        return _renamed(wrapper, f"timed_{method_name}")

    def install(self):
        # data loading, as the CLI calls it; the per-process stream cache is emptied so every run loads it
        experiment._load_stream.cache_clear()
        experiment._fingerprint.cache_clear()
        self.saved_get_stream = experiment.get_stream
        experiment.get_stream = self._method_wrapper("load_data", "load_data", self.saved_get_stream)
        for name in KERNEL_NAMES:
            if name in SINGLE_KERNELS:  # the fused MLP step: its sparse products run inside, unwrapped
                kernel = self.saved_kernels[name] = getattr(kernels, name)
                setattr(kernels, name, self._kernel_wrapper(name, "serial", kernel))
                continue
            serial, parallel = self.saved_kernels[name] = getattr(kernels, name)
            setattr(kernels, name, (self._kernel_wrapper(name, "serial", serial),
                                    self._kernel_wrapper(name, "parallel", parallel)))
        for method_name in PHASES:
            if not hasattr(SpaceNet, method_name):  # the engine changed: time what still exists
                continue
            self.saved_methods[method_name] = getattr(SpaceNet, method_name)
            setattr(SpaceNet, method_name, self._method_wrapper(method_name, PHASES.get(method_name),
                                                                self.saved_methods[method_name]))
        for method_name in ("train_step", "train_batches"):
            self.saved_steps[method_name] = getattr(SparseMLP, method_name)
            setattr(SparseMLP, method_name, self._method_wrapper(method_name, None, self.saved_steps[method_name]))

    def remove(self):
        if getattr(self, "saved_get_stream", None) is not None:
            experiment.get_stream = self.saved_get_stream
        for name, pair in self.saved_kernels.items():
            setattr(kernels, name, pair)
        for method_name, method in self.saved_methods.items():
            if method_name in vars(SpaceNet) and vars(SpaceNet)[method_name] is not method:
                delattr(SpaceNet, method_name)  # remove the wrapper
            if getattr(SpaceNet, method_name, None) is not method:
                setattr(SpaceNet, method_name, method)
        for method_name, method in self.saved_steps.items():
            setattr(SparseMLP, method_name, method)

    def kernel_total(self, phase=None, name=None):
        return sum(v for (p, n, _), v in self.kernel_s.items() if (phase is None or p == phase)
                   and (name is None or n == name))


def cli_argv(hidden, seed, out, extra=()):
    return ["--task", "split_mnist", "--hidden", *[str(h) for h in hidden], "--seeds", str(seed), "--quiet",
            "--out", str(out), *extra]


def warm_up(hidden):
    """Load every cached Numba kernel and the data files once (a one-epoch CLI run), before anything is timed."""
    with tempfile.TemporaryDirectory(prefix="profile_warmup_") as out, contextlib.redirect_stdout(io.StringIO()):
        train.main(cli_argv(hidden, 0, out, ["--epochs", "1"]))


def run_once(hidden, seed, profile=False):
    """``python -m spacenet_np.train --task split_mnist --hidden ... --seeds SEED --quiet --out TMP`` in-process,
    instrumented (and under cProfile if ``profile``). Returns (instrument, results.json run entry, seconds, stats)."""
    instrument = Instrument()
    instrument.install()
    profiler = cProfile.Profile() if profile else None
    with tempfile.TemporaryDirectory(prefix="profile_run_") as out:
        try:
            start = time.perf_counter()
            if profiler:
                profiler.enable()
            with contextlib.redirect_stdout(io.StringIO()):
                code = train.main(cli_argv(hidden, seed, out))
            if profiler:
                profiler.disable()
            elapsed = time.perf_counter() - start
        finally:
            instrument.remove()
        if code != 0:
            raise RuntimeError(f"spacenet_np.train exited with {code}")
        run = json.loads((Path(out) / "results.json").read_text())["runs"][0]
    stats = pstats.Stats(profiler) if profiler else None
    return instrument, run, elapsed, stats


def breakdown(instrument, elapsed):
    """Per-batch and per-phase numbers from a timers-only run. Returns a dict."""
    batches = instrument.batches
    train_epoch_s = instrument.phase_s["train_epoch"]
    train_kernels = instrument.kernel_total("train")
    per_kernel = {name: instrument.kernel_total("train", name) for name in KERNEL_NAMES}
    phases = {name: instrument.phase_s[name] for name in (*PHASES, "load_data")}
    phases["heads"] = phases.pop("set_aside_old_heads") + phases.pop("restore_heads")
    accounted = sum(phases.values())
    step_s = instrument.phase_s["train_step"] + instrument.phase_s["train_batches"]
    return {
        "elapsed_s": elapsed, "seed_s": None, "batches": batches,
        "per_batch_ms": 1e3 * train_epoch_s / batches,
        "per_batch_kernel_ms": 1e3 * train_kernels / batches,
        "per_batch_overhead_ms": 1e3 * (train_epoch_s - train_kernels) / batches,
        "kernel_fraction_of_batch": train_kernels / train_epoch_s,
        "per_batch_kernel_ms_by_kernel": {k: 1e3 * v / batches for k, v in per_kernel.items()},
        "step_ms": 1e3 * step_s / batches,
        "phases_s": phases, "phase_calls": dict(instrument.phase_calls),
        "other_s": elapsed - accounted,
        "kernel_s_by_phase": {p: instrument.kernel_total(p) for p in
                              sorted({p for p, _, _ in instrument.kernel_s})},
        "kernel_calls": {f"{p}/{n}/{b}": c for (p, n, b), c in sorted(instrument.kernel_calls.items())},
    }


def stats_text(stats, sort, limit=TOP):
    buffer = io.StringIO()
    stats.stream = buffer
    stats.sort_stats(sort).print_stats(limit)
    return buffer.getvalue()


def own_times(stats):
    """{'file:line(function)': (own seconds, calls)} of a pstats object."""
    out = {}
    for (filename, line, name), (_, calls, tottime, _, _) in stats.stats.items():
        short = filename.split("/site-packages/")[-1].split("/work/main/")[-1]
        out[f"{short}:{line}({name})"] = (tottime, calls)
    return out


def width_growth(base, wide, min_extra_s=0.1, min_ratio=1.5):
    """Entries whose own time grows from the base width to the wide one by more than ``min_extra_s`` seconds and
    ``min_ratio`` times (smaller changes are run-to-run noise on a shared machine)."""
    rows = []
    for key, (t_wide, calls_wide) in wide.items():
        t_base, calls_base = base.get(key, (0.0, 0))
        if t_wide - t_base > min_extra_s and t_wide > min_ratio * t_base:
            rows.append({"function": key, "base_s": t_base, "wide_s": t_wide, "extra_s": t_wide - t_base,
                         "calls_base": calls_base, "calls_wide": calls_wide})
    return sorted(rows, key=lambda r: -r["extra_s"])


def profile_width(hidden, seed):
    print(f"hidden {hidden}: timers-only run ...", flush=True)
    instrument, run, elapsed, _ = run_once(hidden, seed)
    numbers = breakdown(instrument, elapsed)
    numbers["final_average_accuracy"] = run["final_average_accuracy"]
    numbers["seed_s"] = run["wall_time_s"]
    print(f"  {elapsed:.1f} s, {numbers['batches']} batches, {numbers['per_batch_ms']:.3f} ms/batch of which "
          f"kernels {numbers['per_batch_kernel_ms']:.3f} ms ({100 * numbers['kernel_fraction_of_batch']:.0f} %)",
          flush=True)
    print(f"hidden {hidden}: cProfile run ...", flush=True)
    _, _, profiled_s, stats = run_once(hidden, seed, profile=True)
    numbers["profiled_elapsed_s"] = profiled_s
    return numbers, stats


def markdown(results, growth, hidden, compare):
    base = results[0]["numbers"]
    parts = ["# Profile: one split MNIST seed of spacenet_np", ""]
    rows = []
    for r in results:
        n = r["numbers"]
        rows.append([" x ".join(str(h) for h in r["hidden"]), f"{n['elapsed_s']:.2f}", f"{n['seed_s']:.2f}",
                     f"{n['phases_s']['load_data']:.2f}", n["batches"],
                     f"{n['per_batch_ms']:.3f}", f"{n['per_batch_kernel_ms']:.3f}", f"{n['per_batch_overhead_ms']:.3f}",
                     f"{100 * n['kernel_fraction_of_batch']:.0f} %", f"{n['phases_s']['rewire']:.2f}",
                     f"{n['phases_s']['allocate']:.2f}", f"{n['phases_s']['reserve']:.3f}",
                     f"{n['phases_s']['heads']:.3f}", f"{n['phases_s']['predict']:.2f}", f"{n['other_s']:.2f}",
                     f"{n['final_average_accuracy']:.2f}"])
    parts += [
        "The CLI `python -m spacenet_np.train --task split_mnist --hidden W W --seeds 0 --quiet --out TMP` run "
        "in-process (`spacenet_np.train.main`), timers only (no profiler). *CLI s* is the whole `main` call, "
        "*seed s* the CLI's own `wall_time_s`. *Per batch* is the training loop (`train_epoch` time / batches): "
        "input gather, forward, loss, backward, SGD; *kernels* is the time inside the Numba kernels during "
        "training, *overhead* the rest (Python and NumPy). Phases are totals over the seed in seconds; *other* is "
        "what no phase covers (model set-up, the CLI's recorder snapshots and per-task checkpoints, result files).",
        "",
        md_table(["hidden", "CLI s", "seed s", "load data s", "batches", "ms / batch", "kernels ms / batch",
                  "overhead ms / batch",
                  "kernel share", "rewire s", "allocate s", "reserve s", "heads s", "evaluate s", "other s",
                  "accuracy %"], rows),
        "",
        "## Kernel time per batch (training, width " + " x ".join(str(h) for h in hidden) + ")",
        "",
        md_table(["kernel", "ms / batch", "share of batch"],
                 [[k, f"{v:.4f}", f"{100 * v / base['per_batch_ms']:.1f} %"]
                  for k, v in base["per_batch_kernel_ms_by_kernel"].items() if v > 0]),
        "",
        f"Of the {base['per_batch_ms']:.3f} ms per batch, the calls of `SparseMLP.train_batches` and `train_step` "
        f"(the fused steps, the input gather included) take {base['step_ms']:.3f} ms.",
        "",
    ]
    if growth is not None:
        parts += [f"## Own time that grows with the width ({' x '.join(str(h) for h in hidden)} → "
                  f"{compare} x {compare}, cProfile)", ""]
        if growth:
            parts.append(md_table(["function", "own s (narrow)", "own s (wide)", "calls (narrow → wide)"],
                                  [[f"`{g['function']}`", f"{g['base_s']:.3f}", f"{g['wide_s']:.3f}",
                                    f"{g['calls_base']} → {g['calls_wide']}"] for g in growth[:15]]))
        else:
            parts.append("No entry's own time grows by more than 0.1 s and 1.5x: nothing measurable is O(width).")
        parts.append("")
    parts.append("Full cProfile listings (top entries by cumulative and by own time): `profile.txt`.")
    return "\n".join(parts)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_split_mnist", description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[400, 400])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare-width", type=int, default=1000000, help="second width to profile (0: none)")
    p.add_argument("--threads", type=int, default=1, help="Numba and BLAS threads (0: all cores)")
    args = p.parse_args(argv)
    command = reproduce_command("profile_split_mnist", argv)
    machine = machine_info()
    warm_up(args.hidden)
    results, text = [], []
    configs = [list(args.hidden)]
    if args.compare_width:
        configs.append([args.compare_width] * len(args.hidden))
    stats_by_width = []
    for hidden in configs:
        numbers, stats = profile_width(hidden, args.seed)
        results.append({"hidden": hidden, "numbers": numbers})
        stats_by_width.append(stats)
        label = " x ".join(str(h) for h in hidden)
        text.append(f"{'=' * 100}\nsplit MNIST, seed {args.seed}, hidden {label}: cProfile, top {TOP} by cumulative "
                    f"time\n{'=' * 100}\n" + stats_text(stats, "cumulative"))
        text.append(f"{'=' * 100}\nsplit MNIST, seed {args.seed}, hidden {label}: cProfile, top {TOP} by own time "
                    f"(tottime)\n{'=' * 100}\n" + stats_text(stats, "tottime"))
    growth = None
    if len(stats_by_width) == 2:
        growth = width_growth(own_times(stats_by_width[0]), own_times(stats_by_width[1]))
    from spacenet_np.fileio import atomic_write_bytes
    atomic_write_bytes(RESULTS_DIR / "profile.txt", ("\n".join(text) + f"\nReproduce: {command}\n").encode())
    print(f"wrote {(RESULTS_DIR / 'profile.txt').relative_to(RESULTS_DIR.parent.parent)}")
    payload = {"seed": args.seed, "threads": _threads_description(), "results": results, "width_growth": growth}
    write_results("profile", payload, markdown(results, growth, args.hidden, args.compare_width), command, machine)
    return 0


def _threads_description():
    import os
    return {k: os.environ.get(k) for k in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


if __name__ == "__main__":
    sys.exit(main())
