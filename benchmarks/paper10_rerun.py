"""The 10-seed split MNIST / F-MNIST table (paper preset) rerun on the current code against the committed one.

Reruns ``benchmarks/fidelity/run_paper10.sh``'s six commands (SpaceNet, Static-SparseNN, rehearsal; seeds 0-9;
test accuracy) into a temporary folder unless ``--rerun DIR`` names a finished rerun, and compares every run's
accuracy matrix and final average accuracy with ``results/fidelity/paper10``: performance work must not change
results beyond float rounding.

Run: ``SPACENET_DATA=DIR python -m benchmarks.paper10_rerun [--rerun DIR]`` (about 3 minutes on 2 cores).
Writes ``results/paper10_rerun.{json,md}``.
"""
if __name__ == "__main__" and not __package__:  # run as a file: python benchmarks/paper10_rerun.py
    import sys
    from pathlib import Path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS_DIR, machine_info, md_table, reproduce_command, write_results

TASKS = ("split_mnist", "split_fashion_mnist")
METHODS = ("spacenet", "static", "rehearsal")
SEEDS = range(10)


def rerun(folder):
    for task in TASKS:
        for method in METHODS:
            subprocess.run([sys.executable, "-m", "spacenet_np.train", "--task", task, "--method", method, "--seeds",
                            *map(str, SEEDS), "--workers", "2", "--checkpoint-every", "none", "--quiet", "--out",
                            str(folder / f"{task}-{method}"), "--overwrite"], check=True)


def runs_by_seed(path):
    return {run["seed"]: run for run in json.loads(path.read_text())["runs"]}


def compare(committed, new):
    """Per seed: final accuracies and the accuracy-matrix entries that differ (count, largest difference)."""
    a, b = runs_by_seed(committed), runs_by_seed(new)
    final_a = [a[s]["final_average_accuracy"] for s in SEEDS]
    final_b = [b[s]["final_average_accuracy"] for s in SEEDS]
    differing = []
    for s in SEEDS:
        entries = [(x, y) for row_a, row_b in zip(a[s]["accuracy_matrix"], b[s]["accuracy_matrix"])
                   for x, y in zip(row_a, row_b) if x != y]
        if entries:
            largest = max(abs(x - y) for x, y in entries)
            differing.append({"seed": s, "entries": len(entries), "max_abs_points": largest})
    return {"committed_final": final_a, "rerun_final": final_b, "committed_mean": float(np.mean(final_a)),
            "rerun_mean": float(np.mean(final_b)), "committed_std_ddof1": float(np.std(final_a, ddof=1)),
            "rerun_std_ddof1": float(np.std(final_b, ddof=1)), "seeds_with_differences": differing}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rerun", type=Path, help="a finished rerun folder (default: rerun now)")
    args = parser.parse_args(argv)
    argv = list(argv) if argv is not None else sys.argv[1:]
    machine = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.rerun or Path(tmp)
        if args.rerun is None:
            rerun(folder)
        committed = RESULTS_DIR / "fidelity" / "paper10"
        results = {f"{task}-{method}": compare(committed / f"{task}-{method}" / "results.json",
                                               folder / f"{task}-{method}" / "results.json")
                   for task in TASKS for method in METHODS}
    rows = [[name, f"{r['committed_mean']:.2f} ± {r['committed_std_ddof1']:.2f}",
             f"{r['rerun_mean']:.2f} ± {r['rerun_std_ddof1']:.2f}",
             f"{max(abs(x - y) for x, y in zip(r['committed_final'], r['rerun_final'])):.2f}",
             ", ".join(f"seed {d['seed']}: {d['entries']} entr{'y' if d['entries'] == 1 else 'ies'}, "
                       f"{d['max_abs_points']:.2f} pts" for d in r["seeds_with_differences"]) or "none"]
            for name, r in results.items()]
    md = "\n".join(["# The 10-seed table (paper preset, test) rerun on the current code", "",
                    md_table(["stream-method", "committed (ddof 1)", "rerun (ddof 1)", "largest final difference",
                              "accuracy-matrix entries that differ"], rows), "",
                    "An accuracy-matrix entry is one task's test accuracy after one task; 0.05 points is one test "
                    "image of a 2000-image task."]
                   + ([] if args.rerun is None else [
                       "", f"The rerun folder was made beforehand by this module's commands (`rerun()`: "
                       f"`python -m spacenet_np.train --task TASK --method METHOD --seeds 0 ... 9 --workers 2 "
                       f"--checkpoint-every none --quiet --out {args.rerun}/TASK-METHOD`)."]))
    write_results("paper10_rerun", results, md, reproduce_command("paper10_rerun", argv), machine)


if __name__ == "__main__":
    main()
