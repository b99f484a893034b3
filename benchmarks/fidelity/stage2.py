"""Stage 2 of the random searches: the top trials of each search again on validation data with seeds 0-9.

A 3-seed mean is a noisy choice (its std over seeds is 1-4 points), so the ``--top`` trials of each search (by
their 3-seed validation mean) run again with seeds 0-9 on the same validation split, through the train CLI, and
the one with the best 10-seed validation mean is chosen. Test accuracy is never read. Writes
``SEARCH/stage2/trialN/`` (train run folders) and ``SEARCH/stage2.json`` (the chosen trial and its spec), which
``make_tuned`` reads.

    SPACENET_DATA=../shared/data python -m benchmarks.fidelity.stage2 [--top 5]
"""
import argparse
import json
from pathlib import Path

import numpy as np

from spacenet_np import sweep, train
from spacenet_np.fileio import atomic_write_json

ROOT = Path(__file__).resolve().parents[1] / "results" / "fidelity" / "search"
REPO = Path(__file__).resolve().parents[2]
SEEDS = list(range(10))


def plan_of(folder):
    """The sweep's Plan, rebuilt from the command line recorded in sweep.json and checked against its definition."""
    saved = json.loads((folder / "sweep.json").read_text())
    plan = sweep.plan_from_args(sweep.parse_args(saved["argv"]))
    if plan.definition() != saved["definition"]:
        raise SystemExit(f"{folder}: the rebuilt plan differs from sweep.json")
    return plan


def top_trials(folder, plan, k):
    """The ``k`` trials with the best 3-seed validation mean (complete trials only)."""
    rows = sweep.read_rows(folder / "trials.csv", plan.columns())
    order = sweep.ranked(sweep.trial_stats(rows, range(len(plan.values)), plan.seeds))
    return [entry["trial"] for entry in order[:k]]


def validate_trial(folder, plan, trial):
    """The trial's 10-seed validation accuracies {seed: val ACC} (runs the train CLI if not done yet)."""
    out = folder / "stage2" / f"trial{trial}"
    results = out / "results.json"
    if not (results.exists() and json.loads(results.read_text()).get("complete")):
        argv = sweep.train_argv(plan.spec(trial, 0), SEEDS, out, workers=2, quiet=True, checkpoint_every="none")
        if train.main(argv + ["--overwrite"]) != 0:
            raise SystemExit(f"stage 2 of {folder.name} trial {trial} failed")
    runs = json.loads(results.read_text())["runs"]
    return {run["seed"]: run["val_final_average_accuracy"] for run in runs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--top", type=int, default=5)
    args = p.parse_args(argv)
    for folder in sorted(path for path in ROOT.iterdir() if (path / "sweep.json").exists()):
        plan = plan_of(folder)
        candidates = {}
        for trial in top_trials(folder, plan, args.top):
            values = validate_trial(folder, plan, trial)
            candidates[trial] = {"val_mean": float(np.mean(list(values.values()))),
                                 "val_std_ddof1": float(np.std(list(values.values()), ddof=1)),
                                 "per_seed": values, "params": plan.params(trial)}
            print(f"{folder.name} trial {trial}: {candidates[trial]['val_mean']:.2f} ± "
                  f"{candidates[trial]['val_std_ddof1']:.2f}", flush=True)
        chosen = max(candidates, key=lambda t: (candidates[t]["val_mean"], -t))
        atomic_write_json(folder / "stage2.json", {
            "chosen_trial": chosen, "spec": {**plan.spec(chosen, 0), "seed": None, "data_dir": None},
            "selection": f"top {args.top} trials by 3-seed validation mean, then the best 10-seed (0-9) validation "
                         f"mean; test accuracy never used", "candidates": candidates})
        print(f"{folder.name}: chose trial {chosen}", flush=True)


if __name__ == "__main__":
    main()
