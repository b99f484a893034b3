"""The sweep's speed-up from 1 to 2 workers: the issue's random search (48 trials x 3 seeds on split MNIST).

Runs ``python -m spacenet_np.sweep`` (the command below) into a fresh folder once with ``--workers 1`` and once with
``--workers 2``, as child processes, timing each from spawn to exit (cluster start-up included). The 1-worker sweep
is the reference of the same run: speed-up = wall(1) / wall(2), parallel efficiency = speed-up / 2. It also checks
that both sweeps wrote the same trials.csv rows (wall times aside) and the same best.json choice.

    SPACENET_DATA=../shared/data python -m benchmarks.sweep_speedup [--trials 48] [--seeds 0 1 2]
"""
import argparse
import csv
import json
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.common import machine_info, md_table, reproduce_command, run_measured, write_results

SEARCH = ["--search", "lr=loguniform:0.003:0.1", "--search", "rewire_ratio=uniform:0.05:0.5",
          "--search", "selected=choice:60,80,120"]


def sweep_argv(out, workers, trials, seeds):
    return [sys.executable, "-m", "spacenet_np.sweep", "--task", "split_mnist", "--method", "spacenet", *SEARCH,
            "--trials", str(trials), "--seeds", *map(str, seeds), "--validation", "0.1", "--out", str(out),
            "--workers", str(workers), "--quiet"]


def rows_without_time(out):
    with open(out / "trials.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in csv.DictReader(f)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=48)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--keep", metavar="DIR", help="keep the two sweep folders under DIR")
    args = p.parse_args(argv)
    machine = machine_info()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sweep_speedup_"))
    measured = {}
    for workers in (1, 2):
        out = root / f"workers{workers}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"sweep with {workers} worker(s) ...", flush=True)
        measured[workers] = run_measured(sweep_argv(out, workers, args.trials, args.seeds))
        if measured[workers]["exit_code"] != 0:
            raise SystemExit(f"the {workers}-worker sweep failed:\n{measured[workers]['stderr_tail']}")
    same_rows = rows_without_time(root / "workers1") == rows_without_time(root / "workers2")
    best = [json.loads((root / f"workers{w}" / "best.json").read_text()) for w in (1, 2)]
    wall = {w: measured[w]["process_wall_s"] for w in (1, 2)}
    speedup = wall[1] / wall[2]
    runs = args.trials * len(args.seeds)
    payload = {"trials": args.trials, "seeds": args.seeds, "runs": runs, "wall_s": wall, "speedup": speedup,
               "parallel_efficiency": speedup / 2, "identical_rows": same_rows,
               "best_trial": [b["trial"] for b in best],
               "best_val_mean": [b["val_final_average_accuracy_mean"] for b in best],
               "other_cpus_busy": {w: measured[w]["other_cpus_busy"] for w in (1, 2)},
               "sweep_command": " ".join(sweep_argv("OUT", "N", args.trials, args.seeds)[1:])}
    table = md_table(["workers", "wall s", "runs / min", "other cores busy"],
                     [[w, f"{wall[w]:.1f}", f"{runs / wall[w] * 60:.1f}", f"{measured[w]['other_cpus_busy']:.2f}"]
                      for w in (1, 2)])
    markdown = (f"# Sweep speed-up, 1 -> 2 workers\n\n`python -m spacenet_np.sweep ... --trials {args.trials} "
                f"--seeds {' '.join(map(str, args.seeds))} --validation 0.1` on split MNIST ({runs} runs, cluster "
                f"start-up included).\n\n{table}\n\nSpeed-up {speedup:.2f}x, parallel efficiency "
                f"{100 * speedup / 2:.1f} % (target >= 85 %). trials.csv rows identical (wall times aside): "
                f"{same_rows}; best trial {best[0]['trial']} / {best[1]['trial']}, validation accuracy "
                f"{best[0]['val_final_average_accuracy_mean']:.2f} %.")
    write_results("sweep_speedup", payload, markdown, reproduce_command("sweep_speedup", argv or sys.argv[1:]),
                  machine)
    print(markdown)


if __name__ == "__main__":
    main()
