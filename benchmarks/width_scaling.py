"""Width scaling: split MNIST with a fixed per-task budget while the hidden layers grow from 400 to 1,000,000.

spacenet_np runs through its command line, one child process per width:
``python -m spacenet_np.train --task split_mnist --hidden W W --quiet --out DIR`` (10000 / 1640 / 80 connections,
80 selected and 40 reserved neurons per task, whatever the width), wrapped by ``benchmarks.common run-module`` so
that the child reports its peak RSS. Its time per seed is the CLI's own ``wall_time_s`` (model, training and the
per-task evaluation); the process wall time (start-up and data loading included) is reported too.

The dense reference (:mod:`benchmarks.dense_reference`) runs where its matrices fit: its peak memory is estimated
from the matrix sizes (:func:`benchmarks.dense_reference.estimate_peak_bytes`) and widths above ``--dense-limit-gb``
(8 GB) are skipped with a note. A full dense seed at width 4000 takes many minutes on two cores, so by default
widths above ``--dense-full-max-width`` (400) run the first task only, and the seed's time is extrapolated from it
(training x total training samples / samples trained, evaluation x 15 task test sets / 1); ``--dense-full`` runs
them in full. The extrapolated numbers are marked as such.

Writes ``results/width_scaling.{json,md}`` and the figure ``results/width_scaling.png`` (time and peak memory
against width, log axes, both implementations). Reports the ratios of the 1,000,000 run to the 400 run.

Run: ``python -m benchmarks.width_scaling`` (a few minutes).
"""
if __name__ == "__main__" and not __package__:  # run as a file: python benchmarks/width_scaling.py
    import sys
    from pathlib import Path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    RESULTS_DIR,
    limit_threads,
    machine_info,
    md_table,
    mean_std,
    measured_module,
    reproduce_command,
    run_measured,
    write_results,
)
from benchmarks.dense_reference import estimate_peak_bytes
from benchmarks.end_to_end import run_one

WIDTHS = [400, 4000, 40000, 400000, 1000000]
TARGET_RATIO = 1.5


def run_spacenet(width, seeds, init_fan, timeout_s):
    """spacenet_np's CLI at ``width`` in a child process. Returns one record (with per-seed times)."""
    with tempfile.TemporaryDirectory(prefix="width_scaling_") as out:
        cli = ["--task", "split_mnist", "--hidden", str(width), str(width), "--seeds", *[str(s) for s in seeds],
               "--quiet", "--out", out]
        if init_fan != "layer":
            cli += ["--init-fan", init_fan]
        result = run_measured(measured_module("spacenet_np.train", *cli), timeout_s=timeout_s,
                              label=f"spacenet_np width {width}")
        results_path = Path(out) / "results.json"
        results = json.loads(results_path.read_text()) if results_path.exists() else None
    report = result["report"] or {}
    ok = result["exit_code"] == 0 and results is not None and report.get("module_exit_code") == 0
    record = {
        "impl": "spacenet_np", "width": width, "init_fan": init_fan, "ok": ok, "estimated": False,
        "command": "python -m spacenet_np.train " + " ".join(cli[:-1] + ["DIR"]),
        "process_wall_s": result["process_wall_s"], "peak_rss_mb": report.get("peak_rss_mb"),
        "wait4_maxrss_mb": result["wait4_maxrss_mb"], "cpu_s": result["cpu_user_s"] + result["cpu_sys_s"],
        "other_cpus_busy": result["other_cpus_busy"],
    }
    if not ok:
        record["error"] = result["stderr_tail"] or result["stdout_tail"]
        return record
    runs = results["runs"]
    record.update({
        "seeds": [r["seed"] for r in runs],
        "seed_times_s": [r["wall_time_s"] for r in runs],
        "time_per_seed_s": mean_std([r["wall_time_s"] for r in runs])[0],
        "accuracies": [r["final_average_accuracy"] for r in runs],
        "accuracy": mean_std([r["final_average_accuracy"] for r in runs])[0],
        "accuracy_std": mean_std([r["final_average_accuracy"] for r in runs])[1],
        "connections_per_layer": runs[-1]["connections_per_layer"],
    })
    return record


def run_dense(width, seed, full, timeout_s):
    """The dense reference at ``width`` (all tasks if ``full``, else the first task, extrapolated)."""
    run = run_one("dense", seed, [width, width], n_tasks=None if full else 1, timeout_s=timeout_s)
    record = {
        "impl": "dense", "width": width, "init_fan": "layer", "ok": True, "seeds": [seed],
        "command": run["command"], "process_wall_s": run["process_wall_s"], "peak_rss_mb": run["peak_rss_mb"],
        "wait4_maxrss_mb": run["wait4_maxrss_mb"], "cpu_s": run["cpu_s"], "other_cpus_busy": run["other_cpus_busy"],
        "mean_epoch_s": run["mean_epoch_s"], "tasks_run": run["tasks_run"],
        "estimated_peak_mb": estimate_peak_bytes([784, width, width, 10]) / 2**20,
    }
    if run["tasks_run"] == run["tasks_in_stream"]:
        record.update({"estimated": False, "time_per_seed_s": run["run_s"], "seed_times_s": [run["run_s"]],
                       "accuracy": run["final_average_accuracy"], "accuracies": [run["final_average_accuracy"]]})
    else:
        trained = sum(run["train_samples"][:run["tasks_run"]])
        evaluated = sum(run["test_samples"][:run["tasks_run"]])
        n = run["tasks_in_stream"]
        # a full run evaluates task j's test set after every task i >= j
        eval_total = sum(run["test_samples"][j] * (n - j) for j in range(n))
        estimate = (run["run_s"] - run["train_s"] - run["eval_s"]
                    + run["train_s"] * sum(run["train_samples"]) / trained + run["eval_s"] * eval_total / evaluated)
        record.update({"estimated": True, "time_per_seed_s": estimate, "measured_run_s": run["run_s"],
                       "accuracy": None, "accuracies": [],
                       "note": f"ran {run['tasks_run']} of {n} tasks; time per seed extrapolated"})
    return record


def skipped_dense(width, limit_gb, reason):
    return {"impl": "dense", "width": width, "ok": False, "skipped": True, "estimated": True,
            "estimated_peak_mb": estimate_peak_bytes([784, width, width, 10]) / 2**20, "note": reason,
            "limit_gb": limit_gb}


def ratio(records, key, impl="spacenet_np", init_fan="layer", low=400, high=1000000):
    by_width = {r["width"]: r for r in records if r["impl"] == impl and r.get("init_fan") == init_fan and r["ok"]}
    if low in by_width and high in by_width and by_width[low].get(key) and by_width[high].get(key):
        return by_width[high][key] / by_width[low][key]
    return None


def _short(width):
    return f"{width // 1000000}M" if width % 1000000 == 0 else f"{width // 1000}k" if width % 1000 == 0 else str(width)


def plot(records, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 (used as matplotlib.ticker)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    sparse = sorted((r for r in records if r["impl"] == "spacenet_np" and r["init_fan"] == "layer" and r["ok"]),
                    key=lambda r: r["width"])
    dense_run = sorted((r for r in records if r["impl"] == "dense" and r["ok"]), key=lambda r: r["width"])
    dense_skip = sorted((r for r in records if r["impl"] == "dense" and not r["ok"]), key=lambda r: r["width"])
    for ax, key, label in ((axes[0], "time_per_seed_s", "time per seed (s)"),
                           (axes[1], "peak_rss_mb", "peak RSS (MB)")):
        ax.plot([r["width"] for r in sparse], [r[key] for r in sparse], "o-", color="tab:blue",
                label="spacenet_np (sparse)")
        if dense_run:
            ax.plot([r["width"] for r in dense_run], [r[key] for r in dense_run], "-", color="tab:red")
        measured = [r for r in dense_run if not (key == "time_per_seed_s" and r["estimated"])]
        ax.plot([r["width"] for r in measured], [r[key] for r in measured], "s", color="tab:red",
                label="dense reference")
        if key == "time_per_seed_s":
            extrapolated = [r for r in dense_run if r["estimated"]]
            if extrapolated:
                ax.plot([r["width"] for r in extrapolated], [r[key] for r in extrapolated], "s", color="tab:red",
                        mfc="none", label="dense, extrapolated from its first task")
        else:
            est = dense_run + dense_skip
            ax.plot([r["width"] for r in est], [r["estimated_peak_mb"] for r in est], "s--", color="tab:red",
                    mfc="none", alpha=0.6, label="dense, estimated from matrix sizes")
            ax.axhline(8 * 1024, color="gray", lw=0.8, ls=":", label="8 GB")
        ax.set_xscale("log")
        ax.set_yscale("log")
        widths = sorted({r["width"] for r in records})
        ax.set_xticks(widths, [_short(w) for w in widths])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("hidden width (neurons per layer)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Split MNIST, fixed per-task budget (10000/1640/80 connections, 80 selected, 40 reserved)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def fmt(value, spec, missing="—"):
    return missing if value is None else format(value, spec)


def markdown(records, ratios, args, threads):
    rows = []
    for r in records:
        if r.get("skipped"):
            rows.append([r["width"], "dense reference", "—", "skipped", "—", "—",
                         f"{r['estimated_peak_mb'] / 1024:.1f} GB (est.)", "—", r["note"]])
            continue
        label = "spacenet_np" + (f" (init-fan {r['init_fan']})" if r["impl"] == "spacenet_np" else "")
        label = label if r["impl"] == "spacenet_np" else "dense reference"
        if not r["ok"]:
            rows.append([r["width"], label, "—", "failed", "—", "—", "—", "—", r.get("error", "")[-120:]])
            continue
        time_cell = f"{r['time_per_seed_s']:.1f}" + (" (extrapolated)" if r["estimated"] else "")
        acc = (f"{r['accuracy']:.2f}" + (f" ± {r['accuracy_std']:.2f}" if r.get("accuracy_std") else "")
               if r.get("accuracy") is not None else "—")
        rows.append([r["width"], label, len(r.get("seeds", [])), time_cell, f"{r['process_wall_s']:.1f}",
                     f"{r['cpu_s']:.1f}", f"{r['peak_rss_mb']:.0f} MB", acc,
                     f"{fmt(r.get('other_cpus_busy'), '.2f')} cores busy elsewhere"
                     + (f"; {r['note']}" if r.get("note") else "")])
    t, m = ratios.get("time_per_seed_s"), ratios.get("peak_rss_mb")
    verdict = lambda v: "—" if v is None else ("meets" if v <= TARGET_RATIO else "**misses**")  # noqa: E731
    parts = [
        "# Width scaling: split MNIST with a fixed per-task budget",
        "",
        "Per task 10000 / 1640 / 80 connections, 80 selected and 40 reserved neurons per hidden layer, whatever the "
        "width; two hidden layers of W neurons. spacenet_np runs its CLI `python -m spacenet_np.train --task "
        "split_mnist --hidden W W --quiet --out DIR` in a child process per width; *time per seed* is the CLI's "
        "`wall_time_s` (model, training, per-task evaluation), *process* adds interpreter start-up and data "
        "loading. The dense reference runs where its estimated memory is below "
        f"{args.dense_limit_gb:g} GB; above width {args.dense_full_max_width} it runs the first task only and "
        "its time per seed is extrapolated (its peak RSS is measured: all matrices exist from the first task on). "
        f"Threads: {threads}.",
        "",
        md_table(["width", "implementation", "seeds", "time per seed s", "process s", "CPU s", "peak RSS",
                  "final avg accuracy %", "notes"], rows),
        "",
        f"**spacenet_np, width 1,000,000 vs 400 (init-fan layer):** time per seed {fmt(t, '.2f')}× "
        f"({verdict(t)} the ≤ {TARGET_RATIO}× target), peak RSS {fmt(m, '.2f')}× ({verdict(m)} the ≤ "
        f"{TARGET_RATIO}× target); process wall time {fmt(ratios.get('process_wall_s'), '.2f')}×, process CPU time "
        f"{fmt(ratios.get('cpu_s'), '.2f')}× (less sensitive to other work on the machine).",
        "",
        "With `--init-fan layer` (paper, official code) the Xavier bound is sqrt(6 / (fan_in + fan_out)) of the "
        "whole layer, so at large widths the fixed budget of connections starts near zero and accuracy "
        "collapses; `--init-fan selected` takes the bound from the selected block and keeps the scale. Cost "
        "does not depend on it.",
        "",
        "![width scaling](width_scaling.png)",
    ]
    return "\n".join(parts)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.width_scaling", description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=WIDTHS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="spacenet_np seeds (one process per width)")
    p.add_argument("--init-fan", nargs="+", default=["layer", "selected"], choices=["layer", "selected"],
                   help="spacenet_np init-fan settings to run (the figure and ratios use 'layer')")
    p.add_argument("--dense-seed", type=int, default=0)
    p.add_argument("--dense-limit-gb", type=float, default=8.0, help="skip dense runs estimated above this")
    p.add_argument("--dense-full-max-width", type=int, default=400,
                   help="wider dense runs train the first task only and are extrapolated")
    p.add_argument("--dense-full", action="store_true", help="run every dense width in full")
    p.add_argument("--no-dense", action="store_true")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    p.add_argument("--threads", type=int, default=1,
                   help="Numba and BLAS threads of the children; 0 = library defaults (all cores)")
    args = p.parse_args(argv)
    threads = limit_threads(args.threads)
    command = reproduce_command("width_scaling", argv)
    machine = machine_info()
    start = time.perf_counter()
    records = []
    for width in args.widths:
        for init_fan in args.init_fan:
            r = run_spacenet(width, args.seeds, init_fan, args.timeout)
            records.append(r)
            if r["ok"]:
                print(f"width {width:>8} spacenet_np (init-fan {init_fan:>8}): {r['time_per_seed_s']:7.1f} s/seed, "
                      f"process {r['process_wall_s']:6.1f} s, peak RSS {r['peak_rss_mb']:7.0f} MB, "
                      f"accuracy {r['accuracy']:.2f} %", flush=True)
            else:
                print(f"width {width:>8} spacenet_np (init-fan {init_fan}): FAILED", flush=True)
        if args.no_dense:
            continue
        estimate_gb = estimate_peak_bytes([784, width, width, 10]) / 2**30
        if estimate_gb > args.dense_limit_gb:
            records.append(skipped_dense(width, args.dense_limit_gb,
                                         f"estimated {estimate_gb:.1f} GB > {args.dense_limit_gb:g} GB: not run"))
            print(f"width {width:>8} dense: skipped (estimated {estimate_gb:.1f} GB)", flush=True)
            continue
        full = args.dense_full or width <= args.dense_full_max_width
        try:
            r = run_dense(width, args.dense_seed, full, args.timeout)
        except RuntimeError as err:
            r = {"impl": "dense", "width": width, "ok": False, "estimated": False, "error": str(err)[-300:]}
        records.append(r)
        if r["ok"]:
            print(f"width {width:>8} dense: {r['time_per_seed_s']:7.1f} s/seed"
                  f"{' (extrapolated)' if r['estimated'] else ''}, peak RSS {r['peak_rss_mb']:7.0f} MB "
                  f"(estimated {r['estimated_peak_mb']:.0f} MB)", flush=True)
    ratios = {k: ratio(records, k) for k in ("time_per_seed_s", "peak_rss_mb", "process_wall_s", "cpu_s")}
    figure = RESULTS_DIR / "width_scaling.png"
    plot(records, figure)
    payload = {"widths": args.widths, "seeds": args.seeds, "threads": threads,
               "budget": {"connections_per_task": [10000, 1640, 80],
               "selected": 80, "reserved": 40}, "records": records,
               "ratio_1000000_over_400": ratios, "target_ratio": TARGET_RATIO, "figure": str(figure.name),
               "elapsed_s": time.perf_counter() - start}
    write_results("width_scaling", payload, markdown(records, ratios, args, threads), command, machine)
    print(f"ratios width 1,000,000 / 400: time per seed {fmt(ratios['time_per_seed_s'], '.2f')}x, "
          f"peak RSS {fmt(ratios['peak_rss_mb'], '.2f')}x (target <= {TARGET_RATIO}x); figure {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
