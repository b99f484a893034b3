"""Write ``spacenet_np/tuned.py`` (the ``--preset tuned`` values) from the searches' stage-2 choices (stage2.json).

Each search folder ``benchmarks/results/fidelity/search/TASK-METHOD/`` holds the trial chosen on validation data
(stage2.json); its full config is compared with the paper preset and only the values that differ are kept.

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
    """{(task, method): {"config": {...differences...}, "source": ..., ...}} from every search's stage2.json (the
    10-seed validation choice among its top trials, see ``stage2``)."""
    entries = {}
    for chosen_path in sorted(ROOT.glob("*/stage2.json")):
        chosen = json.loads(chosen_path.read_text())
        spec, trial = chosen["spec"], chosen["chosen_trial"]
        paper = presets.paper(spec["arch"], spec["width"], spec["hidden"])["config"]
        config = {k: v for k, v in spec["config"].items() if paper.get(k, default_of(k)) != v}
        entries[(spec["task"], spec["method"])] = {
            "config": config, "source": str(chosen_path.relative_to(ROOT.parents[3])), "trial": trial,
            "val_mean_seeds_0_9": round(chosen["candidates"][str(trial)]["val_mean"], 2)}
    return entries


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
