"""End to end: spacenet_np against the dense-masked NumPy reference on split MNIST (paper configuration).

Every run (one implementation, one seed) is its own child process, so that its peak RSS
(``ru_maxrss`` printed by the child) is its own; the two implementations alternate (seed 0: spacenet_np then
dense, seed 1: dense then spacenet_np, ...) so that slow drifts of the machine's load hit both alike. Both children
run the same driver (:func:`child_main`): load the stream, then per task ``learn`` (timed, with a time stamp per
epoch from the ``on_epoch`` callback, so an epoch includes its rewiring) and the evaluation on all tasks seen so far
(timed separately). Reported per run: the whole process's wall time (start-up, imports and data loading included,
measured by the parent), the training part (the sum of ``learn`` calls), the evaluation, the time per epoch, CPU
time, peak RSS and the final average accuracy; then mean ± std per implementation and the speed ratios.

Before the timed runs, each implementation runs once on a few batches (not reported) so that Numba's on-disk cache
and the OS file cache are warm for every timed run alike.

Run: ``python -m benchmarks.end_to_end`` (seeds 0-4; ``--seeds 0 1`` for fewer).
"""
if __name__ == "__main__" and not __package__:  # run as a file: python benchmarks/end_to_end.py
    import sys
    from pathlib import Path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import math
import statistics
import sys
import time

from benchmarks.common import (
    child_report,
    limit_threads,
    machine_info,
    md_table,
    mean_std,
    pm,
    python_module,
    reproduce_command,
    run_measured,
    write_results,
)

IMPLEMENTATIONS = ("spacenet_np", "dense")
LABELS = {"spacenet_np": "spacenet_np (sparse, Numba)", "dense": "dense reference (NumPy/BLAS)"}


# ----- child -----
def make_learner(impl, stream, hidden, seed):
    """A learner with ``learn(images, labels, classes, on_batch, on_epoch)`` and ``predict(images)``."""
    if impl == "spacenet_np":
        from spacenet_np.experiment import build_config, make_spec
        from spacenet_np.network import SparseMLP
        from spacenet_np.spacenet import SpaceNet
        config = build_config(make_spec("split_mnist", hidden=list(hidden)))  # the CLI's paper preset
        model = SparseMLP(stream.n_features, hidden, stream.n_classes)
        return SpaceNet(model, config, seed=seed, input_mean=stream.mean, input_std=stream.std)
    if impl == "dense":
        from benchmarks.dense_reference import DenseSpaceNet, default_config
        return DenseSpaceNet([stream.n_features, *hidden, stream.n_classes], default_config(hidden), seed=seed,
                             input_mean=stream.mean, input_std=stream.std)
    raise ValueError(f"unknown implementation {impl!r}")


def child_main(impl, seed, hidden, warmup=False, n_tasks=None):
    """Train and evaluate one implementation for one seed in this process; print the report line."""
    import numpy as np

    from spacenet_np import metrics
    from spacenet_np.streams import get_stream

    t0 = time.perf_counter()
    stream = get_stream("split_mnist")
    data_s = time.perf_counter() - t0
    t_run = time.perf_counter()
    learner = make_learner(impl, stream, hidden, seed)
    tasks = stream.tasks[:1] if warmup else stream.tasks[:n_tasks]
    matrix, epoch_s, task_train_s, task_eval_s = [], [], [], []
    for task in tasks:
        x, y = task.x_train, task.y_train
        if warmup:  # the first and last 512 images: both classes (the task is sorted by label)
            ids = np.r_[0:512, len(y) - 512:len(y)]
            x, y = x[ids], y[ids]
        marks = [time.perf_counter()]
        learner.learn(x, y, task.classes, on_epoch=lambda epoch: marks.append(time.perf_counter()))
        done = time.perf_counter()
        epoch_s += [b - a for a, b in zip(marks[:-1], marks[1:])]
        task_train_s.append(done - marks[0])
        matrix.append(metrics.evaluate_tasks(learner.predict, stream.tasks[:task.index + 1]))
        task_eval_s.append(time.perf_counter() - done)
    run_s = time.perf_counter() - t_run
    numba_threads = None
    if "numba" in sys.modules:
        numba_threads = sys.modules["numba"].get_num_threads()
    child_report({
        "impl": impl, "seed": seed, "hidden": list(hidden), "warmup": warmup, "tasks_run": len(tasks),
        "tasks_in_stream": len(stream.tasks), "train_samples": [int(t.x_train.shape[0]) for t in stream.tasks],
        "test_samples": [int(t.x_test.shape[0]) for t in stream.tasks],
        "data_s": data_s, "run_s": run_s, "train_s": sum(task_train_s), "eval_s": sum(task_eval_s),
        "task_train_s": task_train_s, "task_eval_s": task_eval_s, "epoch_s": epoch_s,
        "accuracy_matrix": matrix, "final_average_accuracy": metrics.final_average_accuracy(matrix),
        "numba_threads": numba_threads, "numpy": np.__version__,
    })
    return 0


# ----- parent -----
def run_one(impl, seed, hidden, warmup=False, n_tasks=None, timeout_s=3600):
    """One child run of ``impl``; returns the measured record (raises RuntimeError if the child failed)."""
    argv = python_module("benchmarks.end_to_end", "--child", impl, "--seed", seed, "--hidden", *hidden)
    if warmup:
        argv.append("--warmup")
    if n_tasks is not None:
        argv += ["--tasks", str(n_tasks)]
    result = run_measured(argv, timeout_s=timeout_s, label=f"{impl} seed {seed}")
    if result["exit_code"] != 0 or result["report"] is None:
        raise RuntimeError(f"{impl} seed {seed} failed:\n{result['stderr_tail']}")
    report = result["report"]
    return {
        "impl": impl, "seed": seed, "process_wall_s": result["process_wall_s"],
        "startup_and_data_s": result["process_wall_s"] - report["run_s"],
        "data_s": report["data_s"], "run_s": report["run_s"], "train_s": report["train_s"],
        "eval_s": report["eval_s"], "epoch_s": report["epoch_s"],
        "mean_epoch_s": sum(report["epoch_s"]) / len(report["epoch_s"]),
        "peak_rss_mb": report["peak_rss_mb"], "wait4_maxrss_mb": result["wait4_maxrss_mb"],
        "cpu_s": result["cpu_user_s"] + result["cpu_sys_s"], "other_cpus_busy": result["other_cpus_busy"],
        "final_average_accuracy": report["final_average_accuracy"], "accuracy_matrix": report["accuracy_matrix"],
        "numba_threads": report["numba_threads"], "tasks_run": report["tasks_run"],
        "tasks_in_stream": report["tasks_in_stream"], "train_samples": report["train_samples"],
        "test_samples": report["test_samples"], "command": " ".join(["python", *[str(a) for a in argv[1:]]]),
    }


def summarize(runs):
    """Per implementation: mean and std of every measure. Returns {impl: {measure: {mean, std}}}."""
    measures = ("process_wall_s", "startup_and_data_s", "train_s", "eval_s", "mean_epoch_s", "peak_rss_mb",
                "cpu_s", "final_average_accuracy", "other_cpus_busy")
    summary = {}
    for impl in IMPLEMENTATIONS:
        mine = [r for r in runs if r["impl"] == impl]
        if mine:
            summary[impl] = {m: dict(zip(("mean", "std"), mean_std([r[m] or 0.0 for r in mine])))
                             for m in measures}
            summary[impl]["n"] = len(mine)
    return summary


def accuracy_agreement(summary):
    """Difference of mean accuracies against their combined standard error (Welch). Returns a dict."""
    a, b = summary["spacenet_np"], summary["dense"]
    diff = a["final_average_accuracy"]["mean"] - b["final_average_accuracy"]["mean"]
    n_a, n_b = a["n"], b["n"]
    # sample std from population std
    s_a = a["final_average_accuracy"]["std"] * math.sqrt(n_a / max(n_a - 1, 1))
    s_b = b["final_average_accuracy"]["std"] * math.sqrt(n_b / max(n_b - 1, 1))
    se = math.sqrt(s_a ** 2 / n_a + s_b ** 2 / n_b)
    z = diff / se if se > 0 else float("inf") if diff else 0.0
    return {"difference": diff, "standard_error": se, "z": z, "agree_within_noise": abs(z) < 2.0,
            "seed_std_spacenet_np": s_a, "seed_std_dense": s_b}


def pair_ratios(runs):
    """Per seed, the dense process's wall time over spacenet_np's (the two ran back to back). Returns {seed: ratio}."""
    wall = {(r["impl"], r["seed"]): r["process_wall_s"] for r in runs}
    return {seed: wall["dense", seed] / wall["spacenet_np", seed] for impl, seed in wall
            if impl == "spacenet_np" and ("dense", seed) in wall}


def markdown(runs, summary, ratios, agreement, hidden, threads):
    rows = []
    for r in runs:
        rows.append([r["seed"], r["impl"], f"{r['process_wall_s']:.1f}", f"{r['startup_and_data_s']:.1f}",
                     f"{r['train_s']:.1f}", f"{r['eval_s']:.2f}", f"{r['mean_epoch_s']:.3f}", f"{r['cpu_s']:.1f}",
                     f"{r['peak_rss_mb']:.0f}", f"{r['final_average_accuracy']:.2f}",
                     f"{r['other_cpus_busy']:.2f}" if r["other_cpus_busy"] is not None else "?"])
    summary_rows = []
    for impl, s in summary.items():
        f = lambda m, d=2: f"{s[m]['mean']:.{d}f} ± {s[m]['std']:.{d}f}"  # noqa: E731
        summary_rows.append([LABELS[impl], s["n"], f("process_wall_s", 1), f("startup_and_data_s", 1),
                             f("train_s", 1), f("eval_s", 2), f("mean_epoch_s", 3), f("cpu_s", 1),
                             f("peak_rss_mb", 0), f("final_average_accuracy"), f("other_cpus_busy")])
    headers = ["seed", "implementation", "process wall s", "start-up + data s", "training s", "evaluation s",
               "s / epoch", "CPU s", "peak RSS MB", "final avg accuracy %", "other work (cores busy)"]
    parts = [
        "# End to end: spacenet_np vs dense-masked NumPy reference (split MNIST)",
        "",
        f"Paper configuration: hidden {' x '.join(str(h) for h in hidden)}, 10000/1640/80 connections per task, "
        "80 selected / 40 reserved neurons, r = 0.2, SGD lr 0.01, batch 128, 4 epochs per task, 5 tasks. "
        "One child process per run, implementations alternating. *Process wall* is spawn to exit (interpreter "
        "start-up, imports, data loading, training, evaluation); *training* is the sum of `learn` calls; "
        "*s / epoch* includes the epoch's rewiring; *CPU s* is user + system time of the child; *other work* is "
        "the average number of cores that other processes on the machine kept busy during the run (from "
        "/proc/stat), a measure of contention. "
        + f"Threads: {threads}. The dense reference process also imports Numba (through `spacenet_np.streams`). "
        "Both cache their bytecode as a default Python does (`PYTHONDONTWRITEBYTECODE` is removed for the children; "
        "the warm-up runs write the `.pyc` files).",
        "",
        "## Summary (mean ± std over seeds)",
        "",
        md_table(["implementation", "runs", *headers[2:]], summary_rows),
        "",
        "**Speed ratio (dense time / spacenet_np time; > 1 means spacenet_np is faster):** "
        f"process wall {ratios['process_wall_s']:.2f}×, training {ratios['train_s']:.2f}×, "
        f"per epoch {ratios['mean_epoch_s']:.2f}×, CPU time {ratios['cpu_s']:.2f}×. "
        f"**Peak RSS ratio (dense / spacenet_np):** {ratios['peak_rss_mb']:.2f}×. Process wall ratio per seed "
        "(the two runs of a seed follow each other): "
        + ", ".join(f"{ratio:.2f}×" for ratio in ratios["process_wall_s_per_seed"].values())
        + f" (median {statistics.median(ratios['process_wall_s_per_seed'].values()):.2f}×).",
        "",
        f"**Accuracy:** spacenet_np {pm([r['final_average_accuracy'] for r in runs if r['impl'] == 'spacenet_np'])} %, "
        f"dense {pm([r['final_average_accuracy'] for r in runs if r['impl'] == 'dense'])} % (mean ± population "
        f"std); difference {agreement['difference']:+.2f} points, standard error of the difference "
        f"{agreement['standard_error']:.2f} (Welch), z = {agreement['z']:+.2f}: "
        + ("they agree within seed-to-seed noise (|z| < 2)." if agreement["agree_within_noise"]
           else "**they differ by more than seed-to-seed noise (|z| >= 2).**"),
        "",
        "## Runs",
        "",
        md_table(headers, rows),
    ]
    return "\n".join(parts)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.end_to_end", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--hidden", type=int, nargs="+", default=[400, 400])
    p.add_argument("--threads", type=int, default=1,
                   help="Numba and BLAS threads of the children; 0 = library defaults (all cores)")
    p.add_argument("--only", choices=IMPLEMENTATIONS, default=None, help="run one implementation only")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up runs")
    p.add_argument("--child", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tasks", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args.child, args.seed, args.hidden, warmup=args.warmup, n_tasks=args.tasks)

    threads = limit_threads(args.threads)
    command = reproduce_command("end_to_end", argv)
    machine = machine_info()
    impls = [args.only] if args.only else list(IMPLEMENTATIONS)
    start = time.perf_counter()
    if not args.no_warmup:
        for impl in impls:
            run_one(impl, 0, args.hidden, warmup=True)
    runs = []
    for i, seed in enumerate(args.seeds):
        order = impls if i % 2 == 0 else impls[::-1]
        for impl in order:
            run = run_one(impl, seed, args.hidden)
            runs.append(run)
            print(f"seed {seed} {impl:>11}: process {run['process_wall_s']:6.1f} s, training {run['train_s']:6.1f} s, "
                  f"{run['mean_epoch_s']:.3f} s/epoch, peak RSS {run['peak_rss_mb']:6.0f} MB, "
                  f"accuracy {run['final_average_accuracy']:.2f} %", flush=True)
    summary = summarize(runs)
    ratios, agreement = {}, None
    if len(summary) == 2:
        for m in ("process_wall_s", "train_s", "mean_epoch_s", "cpu_s", "peak_rss_mb"):
            ratios[m] = summary["dense"][m]["mean"] / summary["spacenet_np"][m]["mean"]
        ratios["process_wall_s_per_seed"] = pair_ratios(runs)
        agreement = accuracy_agreement(summary)
    payload = {"hidden": args.hidden, "seeds": args.seeds, "threads": threads, "runs": runs,
               "summary": summary, "speed_ratio_dense_over_spacenet_np": ratios, "accuracy_agreement": agreement,
               "elapsed_s": time.perf_counter() - start}
    if ratios:
        text = markdown(runs, summary, ratios, agreement, args.hidden, threads)
    else:
        text = "# End to end (one implementation)\n\n" + md_table(
            ["implementation", "measure", "mean ± std"],
            [[impl, m, f"{v['mean']:.3f} ± {v['std']:.3f}"] for impl, s in summary.items() for m, v in s.items()
             if m != "n"])
    name = "end_to_end"  # variants get their own files, the default run keeps end_to_end.*
    if args.hidden != [400, 400]:
        name += "_hidden" + "x".join(str(h) for h in args.hidden)
    if args.threads != 1:
        name += f"_threads{args.threads or 'default'}"
    if args.only:
        name += f"_{args.only}"
    write_results(name, payload, text, command, machine)
    for impl, s in summary.items():
        print(f"{impl:>11}: process {s['process_wall_s']['mean']:.1f} ± {s['process_wall_s']['std']:.1f} s, "
              f"training {s['train_s']['mean']:.1f} ± {s['train_s']['std']:.1f} s, "
              f"accuracy {s['final_average_accuracy']['mean']:.2f} ± {s['final_average_accuracy']['std']:.2f} %")
    if ratios:
        print(f"speed ratio dense/spacenet_np: process {ratios['process_wall_s']:.2f}x, training "
              f"{ratios['train_s']:.2f}x; accuracy difference {agreement['difference']:+.2f} "
              f"(z = {agreement['z']:+.2f})")
    return 0


if __name__ == "__main__":
    from spacenet_np.process import run_main
    run_main(main)  # as the spacenet_np CLIs run: the same process exit for both implementations
