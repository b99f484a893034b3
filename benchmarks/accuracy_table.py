"""Markdown table of CLI results: ``python benchmarks/accuracy_table.py RUN_DIR... > table.md``.

Each RUN_DIR holds a ``results.json`` written by ``python -m spacenet_np.train``. The table gives, per run folder,
the mean +/- std of the final average accuracy over seeds, the per-seed values, the mean per-task accuracy after
the last task and the mean wall time per seed.
"""
import json
import sys
from pathlib import Path

import numpy as np


def table(run_dirs):
    lines = ["| task | method | seeds | final average accuracy (%) | per seed | per task after the last (mean over seeds) "
             "| wall time per seed (s) |", "|---|---|---|---|---|---|---|"]
    for run_dir in run_dirs:
        results = json.loads((Path(run_dir) / "results.json").read_text())
        runs = results["runs"]
        finals = [r["final_average_accuracy"] for r in runs]
        per_task = np.mean([r["accuracy_matrix"][-1] for r in runs], axis=0)
        lines.append(
            f"| {results['task']} | {results['method']} | {', '.join(str(r['seed']) for r in runs)} "
            f"| {results['mean_final_average_accuracy']:.2f} +/- {results['std_final_average_accuracy']:.2f} "
            f"| {' '.join(f'{a:.2f}' for a in finals)} | {' '.join(f'{a:.1f}' for a in per_task)} "
            f"| {np.mean([r['wall_time_s'] for r in runs]):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1:]))
