"""Write ``spacenet_np/tuned.py`` (the ``--preset tuned`` values) from the searches' stage-2 choices (stage2.json).

Each search folder ``benchmarks/results/fidelity/search/TASK-METHOD/`` holds the trial chosen on validation data
(stage2.json); an ablation variant with a better 10-seed validation mean replaces it. The chosen full config is
compared with the paper preset and only the values that differ are kept.

    python -m benchmarks.fidelity.make_tuned
"""
import json
import pprint
from pathlib import Path

from spacenet_np import presets, tuned
from spacenet_np.fileio import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1] / "results" / "fidelity" / "search"
TARGET = Path(__file__).resolve().parents[2] / "spacenet_np" / "tuned.py"


def tuned_entries():
    """{(task, method): {"config": {...differences...}, "source": ..., ...}}: per search, the best 10-seed
    validation mean among its stage-2 candidates (stage2.json) and, for SpaceNet, the ablation variants (the paper
    preset with one switch changed, also seeds 0-9 on the same validation split)."""
    entries = {}
    for chosen_path in sorted(ROOT.glob("*/stage2.json")):
        chosen = json.loads(chosen_path.read_text())
        spec, source = chosen["spec"], chosen_path
        val_mean = chosen["candidates"][str(chosen["chosen_trial"])]["val_mean"]
        for variant in ablation_variants(spec["task"], spec["method"]):
            if variant["val_mean"] > val_mean:
                spec, source, val_mean = variant["spec"], variant["path"], variant["val_mean"]
        paper = presets.paper(spec["arch"], spec["width"], spec["hidden"])["config"]
        config = {k: v for k, v in spec["config"].items() if paper.get(k, default_of(k)) != v}
        entries[(spec["task"], spec["method"])] = {
            "config": config, "source": str(source.relative_to(ROOT.parents[3])),
            "val_mean_seeds_0_9": round(val_mean, 2)}
    return entries


def ablation_variants(task, method):
    """The ablation runs of ``task`` and ``method``: [{"spec", "path", "val_mean"}] (10-seed validation means)."""
    variants = []
    for results_path in sorted((ROOT.parent / "ablations" / task).glob("*/results.json")):
        results = json.loads(results_path.read_text())
        if results["method"] == method and results.get("complete"):
            values = [run["val_final_average_accuracy"] for run in results["runs"]]
            variants.append({"spec": results["spec"], "path": results_path, "val_mean": sum(values) / len(values)})
    return variants


def default_of(name):
    from spacenet_np.experiment import CONFIG_OPTIONS
    value = CONFIG_OPTIONS[name].default
    return list(value) if isinstance(value, tuple) else value


def main():
    entries = tuned_entries()
    body = '"""' + tuned.__doc__ + '"""\nTUNED = ' + pprint.pformat(entries, width=110, sort_dicts=True) + "\n"
    atomic_write_bytes(TARGET, body.encode())
    print(f"wrote {TARGET} with {len(entries)} tuned configurations: {sorted(entries)}")


if __name__ == "__main__":
    main()
