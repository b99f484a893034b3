"""The report of a sweep folder (``python -m spacenet_np.sweep --out OUT``): a top-k table and one figure per
searched hyperparameter.

``report_sweep(folder, out_dir)`` writes, atomically, into ``out_dir``:

- ``sweep_table.md``: the sweep's settings and the top trials by mean validation accuracy (± std over seeds,
  ddof=0; only trials whose every seed finished), as the sweep prints them;
- ``sweep_<name>.png`` per searched name: each run's validation accuracy against the searched value (log x for
  loguniform), with each trial's mean ± std.

Only validation metrics are shown: test accuracy is never used to choose. A folder that is not a sweep (no
sweep.json, a damaged trials.csv) raises ``SweepError`` before anything is written.
"""
import io
import math
import re
from pathlib import Path

from .fileio import atomic_write_bytes
from .sweep import METRICS, SweepError, ranked, read_rows, read_sweep_json, top_table, trial_stats


def is_sweep(folder):
    """Whether ``folder`` holds a sweep (a sweep.json)."""
    return (Path(folder) / "sweep.json").is_file()


def load_sweep(folder):
    """(sweep.json as a dict, trials.csv rows keyed by (trial, seed)); SweepError if ``folder`` is no sweep."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SweepError(f"{folder} is not a folder")
    if not is_sweep(folder):
        raise SweepError(f"{folder} holds no sweep.json: not a sweep folder")
    saved = read_sweep_json(folder / "sweep.json")
    columns = saved.get("columns")
    if not isinstance(columns, list):
        raise SweepError(f"{folder / 'sweep.json'} lists no trials.csv columns")
    if not (folder / "trials.csv").exists():
        raise SweepError(f"{folder} holds no trials.csv: no run of the sweep has finished")
    return saved, read_rows(folder / "trials.csv", columns)


def report_sweep(folder, out_dir, top=10):
    """Write sweep_table.md and one figure per searched name of the sweep in ``folder`` into ``out_dir``.
    Returns the written paths. SweepError (nothing written) if ``folder`` is not a sweep."""
    saved, rows = load_sweep(folder)
    definition = saved["definition"]
    dims = definition["search"]
    stats = trial_stats(rows, range(definition["trials"]), definition["seeds"])
    out_dir = Path(out_dir)
    table = out_dir / "sweep_table.md"
    atomic_write_bytes(table, sweep_table(folder, saved, rows, stats, top).encode())
    written = [table]
    for dim in dims:
        path = out_dir / f"sweep_{slug(dim['name'])}.png"
        atomic_write_bytes(path, figure_png(dim, rows, stats))
        written.append(path)
    return written


def slug(text):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def trial_params(rows, names):
    """{trial: {name: value text}} from the rows (every row of a trial holds the same values), floats to 4
    significant digits."""
    params = {}
    for (trial, _), row in sorted(rows.items()):
        params.setdefault(trial, {name: short(row[name]) for name in names})
    return params


def short(text):
    """A trials.csv value for a table: floats to 4 significant digits, integers and words as written."""
    try:
        int(text)
        return text
    except ValueError:
        pass
    try:
        return f"{float(text):.4g}"
    except ValueError:
        return text


def sweep_table(folder, saved, rows, stats, top):
    """The markdown of sweep_table.md."""
    definition = saved["definition"]
    base = definition["base_spec"]
    names = [dim["name"] for dim in definition["search"]]
    params = trial_params(rows, names)
    order = ranked(stats)
    n_failed = sum(1 for row in rows.values() if row["status"] == "failed")
    search = ", ".join(f"{d['name']} {d['kind']}" + (f" {d['values']}" if d["values"] is not None
                                                      else f" [{d['low']}, {d['high']}]") for d in definition["search"])
    lines = [f"# Sweep {Path(folder).name}", "",
             f"- task {base['task']}, method {base['method']}, preset {base['preset']}, hidden {base['hidden']}, "
             f"validation fraction {base['validation']}",
             f"- {'grid' if definition['grid'] else 'random search'}: {definition['trials']} trials x seeds "
             f"{definition['seeds']} (sweep seed {definition['sweep_seed']}); searched: {search}",
             f"- {len(rows)} of {saved.get('n_runs', '?')} runs finished, {n_failed} failed",
             "", f"Top trials by mean validation accuracy (± std over seeds, ddof=0), among the {len(order)} trials "
             "whose every seed finished. Test accuracy is never used to choose.", ""]
    if order:
        lines.append(top_table(order, lambda trial: params[trial], top))
    else:
        lines.append("No trial has finished on every seed yet.\n")
    return "\n".join(lines)


def numeric(texts):
    """The values as floats, or None if any is not a number (then the axis is categorical)."""
    try:
        values = [float(t) for t in texts]
    except ValueError:
        return None
    return values if all(math.isfinite(v) for v in values) else None


def figure_png(dim, rows, stats):
    """PNG bytes: validation accuracy of each run (points) and trial (mean ± std) against ``dim``'s value."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = dim["name"]
    ok = [row for row in rows.values() if row["status"] == "ok"]
    measured = {s["trial"]: s for s in stats if s["n_ok"]}
    first = {}
    for (trial, _), row in sorted(rows.items()):
        first.setdefault(trial, row[name])
    texts = sorted(set(first.values()))
    as_numbers = numeric(texts)
    position = (dict(zip(texts, as_numbers)) if as_numbers is not None else {t: i for i, t in enumerate(texts)})
    fig, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    ax.scatter([position[row[name]] for row in ok], [float(row[METRICS[0]]) for row in ok], s=12, alpha=0.35,
               color="#1f77b4", label="run")
    trials = sorted(measured)
    means = [measured[t][METRICS[0]] for t in trials]
    ax.errorbar([position[first[t]] for t in trials], [m for m, _ in means], yerr=[s for _, s in means], fmt="o",
                color="#d62728", markersize=4, capsize=2, label="trial mean ± std (ddof=0)")
    if dim["kind"] == "loguniform":
        ax.set_xscale("log")
    if as_numbers is None:
        ax.set_xticks(range(len(texts)), texts)
    n_failed = sum(1 for row in rows.values() if row["status"] == "failed")
    ax.set_xlabel(f"{name} ({dim['kind']})")
    ax.set_ylabel("validation final average accuracy (%)")
    ax.set_title(f"{name}: {len(ok)} runs" + (f", {n_failed} failed (not shown)" if n_failed else ""), fontsize=9)
    ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()

