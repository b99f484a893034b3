"""Random search and multi-seed sweeps on held-out validation data: ``python -m spacenet_np.sweep``.

::

    python -m spacenet_np.sweep --task split_mnist --method spacenet \\
        --search lr=loguniform:0.003:0.1 --search rewire_ratio=uniform:0.05:0.5 --search selected=choice:60,80,120 \\
        --trials 48 --seeds 0 1 2 --validation 0.1 --out runs/sweep-mnist [--scheduler ADDRESS] [--workers N]

A trial is one configuration: the preset's values (the paper's by default), the ``--set`` values, and one value per
``--search`` dimension. Each trial runs once per ``--seeds`` seed, every run through ``engine.execute`` (a local
cluster on every core, or ``--scheduler`` for an existing Dask cluster).

- **One master seed.** Trial ``i``'s values are drawn, in ``--search`` order, from
  ``default_rng(SeedSequence(sweep_seed).spawn(trials)[i])``; ``--grid`` takes the full product of the choice and int
  dimensions instead. The (trial, seed) runs are the same whatever the backend, the workers or the order in which
  runs finish.
- **Selection uses validation data only.** Every run holds out ``--validation`` of each task's training images
  (stratified, with a split seed independent of the run seed, so all runs see the same split) and trains on the
  rest. Trials are ranked by their mean ``val_final_average_accuracy`` over seeds (std with ddof=0); only trials
  whose every seed finished are ranked (a configuration that fails on one seed is not chosen). Test accuracies are
  never written to trials.csv.
- **Files.** ``OUT/sweep.json``: the sweep's definition (its arguments and the resolved base spec).
  ``OUT/trials.csv``: one row per finished (trial, seed), rewritten atomically (temp file and rename) in (trial,
  seed) order as each run finishes, so a crash never leaves a half row. ``OUT/best.json``: the best trial. With
  ``--final-seeds``, ``OUT/final/``: the train CLI's run folder (results.json, runs.csv) of the best configuration.
- **Resumable.** The same command again runs only the missing (trial, seed) runs; runs interrupted mid-way continue
  from their last finished task (checkpoints in ``OUT/checkpoints/``, local runs only by default). A different
  definition into the same OUT is refused, naming what differs. Failed runs: a failure that the same spec always
  reproduces (TrainingDiverged, SpecError, an impossible hyperparameter: ValueError) is final; any other failure
  (a worker that died, data missing on a worker, a lost connection) is retried by the next invocation.
  ``--retry-failed`` retries every failed run.
- **Final runs** (``--final-seeds``) train the best configuration on the same training part (the same validation
  split, not train + validation), so they keep their validation metrics and differ from the trials only by seed;
  they are the only runs whose test accuracy is reported.

Exit codes: 0 when every run has finished (failed runs are recorded in trials.csv, each also printed as a line);
1 when no trial finished on every seed, a final run failed, the engine or a file write failed; 2 for a bad argument
or folder (one line ``error: ...``); 130 (Ctrl-C) or 143 (SIGTERM) when interrupted, finished rows kept.
"""
import argparse
import csv
import io
import itertools
import json
import math
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import engine, experiment, presets, train
from .experiment import CONFIG_OPTIONS, SpecError, config_hash, identity
from .fileio import WriteError, atomic_write_bytes, atomic_write_json
from .methods import METHODS
from .options import Count, Option, format_value, method_options
from .process import run_main
from .runfolder import RunFolder, RunFolderError
from .streams import STREAMS

FORMAT = "spacenet_np.sweep"
KINDS = ("uniform", "loguniform", "int", "choice")
DIST_HELP = "uniform:LO:HI, loguniform:LO:HI, int:LO:HI or choice:A,B,..."
ALIASES = {"selected": "selected_neurons", "reserved": "reserved_neurons", "connections": "connections_per_task"}
METRICS = ("val_final_average_accuracy", "val_backward_transfer", "val_average_forgetting")
FIXED_COLUMNS = ("trial", "seed", *METRICS, "wall_time_s", "config_hash", "status", "error")
FINAL_ERRORS = ("TrainingDiverged", "SpecError", "ValueError")  # the same spec fails the same way: not retried
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class SweepError(ValueError):
    """A sweep that cannot run as asked: a bad search spec, another sweep in OUT, a damaged trials.csv."""


# ----- names -----
@dataclass(frozen=True)
class Target:
    """Where a searched or set name goes: ``spec[part][field]`` (``[index]`` for one layer's entry)."""
    name: str  # as the user wrote it: the trials.csv column
    part: str  # "config" or "method_options"
    field: str
    index: int = None
    option: Option = field(default=None, compare=False)

    def overlaps(self, other):
        """Whether both set the same value (a whole per-layer field overlaps each of its entries)."""
        return (self.part, self.field) == (other.part, other.field) and (
            self.index is None or other.index is None or self.index == other.index)

    def to_dict(self):
        return {"name": self.name, "part": self.part, "field": self.field, "index": self.index}


def known_names(method):
    """The names --search and --set accept for ``method``, as text for an error message."""
    names = list(CONFIG_OPTIONS) + list(ALIASES) + list(method_options(METHODS[method]))
    per_layer = [name for name, option in CONFIG_OPTIONS.items() if option.per_layer]
    return f"{', '.join(names)} (and NAME.i for one layer's entry of {', '.join(per_layer)})"


def resolve(name, method, base):
    """The Target of ``name`` (a config field, an alias, ``NAME.i`` or one of ``method``'s options) in ``base``
    (a spec). SweepError naming an unknown name or a layer index out of range."""
    stem, dot, index_text = name.strip().partition(".")
    key = ALIASES.get(stem.replace("-", "_"), stem.replace("-", "_"))
    declared = method_options(METHODS[method])
    if key in CONFIG_OPTIONS:
        part, option = "config", CONFIG_OPTIONS[key]
    elif key in declared:
        part, option = "method_options", declared[key]
    else:
        owners = sorted(m for m, cls in METHODS.items() if key in method_options(cls))
        hint = f" ({key} is an option of --method {', '.join(owners)})" if owners else ""
        raise SweepError(f"unknown name {stem!r} for --method {method}{hint}; known names: {known_names(method)}")
    if not dot:
        return Target(name.strip(), part, key, None, option)
    n_layers = len(base[part][key]) if option.per_layer else 0
    if not option.per_layer:
        raise SweepError(f"{name}: {key} is one value, not one per layer; write {stem} without .i")
    if not (index_text.isdigit() and int(index_text) < n_layers):
        raise SweepError(f"{name}: layer index {index_text!r} must be an integer in [0, {n_layers - 1}] "
                         f"({key} has {n_layers} entries)")
    return Target(name.strip(), part, key, int(index_text), option)


def check_distinct(targets, flag):
    """SweepError naming two of ``targets`` (given with ``flag``) that set the same value: a duplicate name,
    or NAME and NAME.i."""
    for i, a in enumerate(targets):
        for b in targets[:i]:
            if a.overlaps(b):
                what = a.field if a.index is None or b.index is None else f"{a.field}[{a.index}]"
                raise SweepError(f"{flag} {b.name} and {flag} {a.name} both set {what}: give each name once")


def check_not_covered(fixed, searched):
    """SweepError if a --search dimension replaces a --set value (a --set of a whole per-layer field with a
    --search of one of its entries is fine: the other entries keep the --set value)."""
    for s in fixed:
        for d in searched:
            if (s.part, s.field) == (d.part, d.field) and (d.index is None or d.index == s.index):
                raise SweepError(f"--search {d.name} replaces --set {s.name}: give each value once")


# ----- search dimensions -----
@dataclass(frozen=True)
class Dimension:
    """One --search dimension: a Target and its distribution.

    ``kind`` is one of KINDS; ``low``/``high`` bound uniform, loguniform (floats) and int (ints, inclusive);
    ``values`` lists a choice's values (parsed by the option: None for 'all', ...).
    """
    target: Target
    kind: str
    low: float = None
    high: float = None
    values: tuple = None

    @property
    def name(self):
        return self.target.name

    def sample(self, rng):
        """One value drawn with ``rng`` (a numpy Generator), as a plain Python value."""
        if self.kind == "uniform":
            return float(rng.uniform(self.low, self.high))
        if self.kind == "loguniform":
            return float(np.exp(rng.uniform(np.log(self.low), np.log(self.high))))
        if self.kind == "int":
            return int(rng.integers(self.low, self.high, endpoint=True))
        return self.values[int(rng.integers(len(self.values)))]

    def grid(self):
        """Every value of a choice or int dimension; SweepError for continuous ones."""
        if self.kind == "choice":
            return list(self.values)
        if self.kind == "int":
            return list(range(self.low, self.high + 1))
        raise SweepError(f"--grid needs choice or int dimensions; {self.name} is {self.kind}")

    def text(self, value):
        """``value`` as written in trials.csv (floats exactly, None as the option's null text)."""
        return format_value(value, self.target.option)

    def to_dict(self):
        return {**self.target.to_dict(), "kind": self.kind, "low": self.low, "high": self.high,
                "values": None if self.values is None else list(self.values)}


def parse_search(text, method, base):
    """``NAME=DIST`` -> Dimension, with ``base`` (a spec) giving the layer counts. SweepError naming the
    problem: no '=', an unknown name or distribution, LO >= HI, loguniform LO <= 0, an empty or repeated choice,
    a value the option refuses, a distribution that does not fit the option's type."""
    name, eq, dist = text.partition("=")
    if not eq or not name.strip():
        raise SweepError(f"--search {text!r}: expected NAME=DIST with DIST one of {DIST_HELP}")
    try:
        target = resolve(name, method, base)
        kind, _, rest = dist.strip().partition(":")
        if kind not in KINDS:
            raise SweepError(f"unknown distribution {kind!r}; expected {DIST_HELP}")
        if kind == "choice":
            return Dimension(target, kind, values=parse_choice(rest, target.option))
        low, high = parse_bounds(kind, rest, target.option)
        return Dimension(target, kind, low, high)
    except (SweepError, ValueError) as err:
        raise SweepError(f"--search {text}: {err}") from None


def parse_choice(rest, option):
    """The values of ``choice:A,B,...`` parsed and checked by ``option``; ValueError if empty or repeated."""
    items = [item.strip() for item in rest.split(",")]
    if not rest.strip():
        raise ValueError("empty choice: give at least one value, choice:A,B,...")
    if "" in items:
        raise ValueError(f"choice:{rest} has an empty value")
    values = tuple(option.parse(item) for item in items)
    for i, value in enumerate(values):
        if value in values[:i]:
            raise ValueError(f"choice repeats the value {format_value(value, option)}")
    return values


def parse_bounds(kind, rest, option):
    """(LO, HI) of ``uniform|loguniform|int:LO:HI``, checked against ``option``; ValueError naming the problem."""
    parts = rest.split(":")
    if len(parts) != 2:
        raise ValueError(f"expected {kind}:LO:HI, got {kind}:{rest}")
    fits = {float: ("uniform", "loguniform"), int: ("int",), Count: ("uniform", "loguniform", "int")}
    if kind not in fits.get(option.type, ()):
        takes = ", ".join(fits.get(option.type, ()) + ("choice",))
        raise ValueError(f"{kind} does not fit {option.name} ({option.describe_type()}); it takes {takes}")
    low, high = (bound(text, kind, which) for text, which in zip(parts, ("LO", "HI")))
    if low >= high:
        raise ValueError(f"LO {low:g} must be < HI {high:g}")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"loguniform needs LO > 0, got {low:g}")
    if option.type is Count and kind != "int" and not (0 < low and high < 1):
        raise ValueError(f"{kind} draws fractions of the layer for {option.name}: LO and HI must be in (0, 1) "
                         f"(int:LO:HI draws counts)")
    for value in (low, high):
        option.check_value(value)
    return low, high


def bound(text, kind, which):
    """LO or HI: an int for ``int``, a finite float otherwise; ValueError naming it."""
    try:
        value = int(text) if kind == "int" else float(text)
    except ValueError:
        raise ValueError(f"{which} {text.strip()!r} is not {'an integer' if kind == 'int' else 'a number'}") from None
    if not math.isfinite(value):
        raise ValueError(f"{which} {text.strip()} must be finite")
    return value


# ----- fixed values (--set) -----
def parse_set(text, method, base):
    """``NAME=VALUE`` -> (Target, value). A per-layer field takes one value for every layer, or one per layer
    separated by commas; ``NAME.i`` one layer's entry. SweepError naming the problem."""
    name, eq, value_text = text.partition("=")
    if not eq or not name.strip() or not value_text.strip():
        raise SweepError(f"--set {text!r}: expected NAME=VALUE")
    try:
        target = resolve(name, method, base)
        items = [item.strip() for item in value_text.split(",")]
        values = [target.option.parse(item) for item in items]
        if len(values) == 1:
            return target, values[0]
        n_layers = len(base[target.part][target.field]) if target.option.per_layer else 1
        if target.index is not None or not target.option.per_layer or len(values) != n_layers:
            raise SweepError(f"{len(values)} values given; {target.name} takes one value"
                             + (f", or {n_layers} (one per layer)" if target.option.per_layer
                                and target.index is None else ""))
        return target, values
    except (SweepError, ValueError) as err:
        raise SweepError(f"--set {text}: {err}") from None


def with_values(spec, assignments):
    """``spec`` with each (Target, value) applied: one value for a whole per-layer field goes to every layer.
    Returns a checked spec (SpecError naming a bad value)."""
    parts = {"config": dict(spec["config"]), "method_options": dict(spec["method_options"])}
    for target, value in assignments:
        values = parts[target.part]
        if target.index is not None:
            entries = list(values[target.field])
            entries[target.index] = value
            values[target.field] = entries
        elif target.option.per_layer and not isinstance(value, (list, tuple)):
            values[target.field] = [value] * len(values[target.field])
        else:
            values[target.field] = value
    return experiment.check_spec({**spec, **parts})


# ----- the plan -----
@dataclass
class Plan:
    """A sweep's definition and its runs: ``base`` (a spec, seed 0) with ``fixed`` (Target, value) pairs applied,
    ``dims`` (Dimensions), ``values`` (one tuple per trial, aligned with ``dims``), ``seeds`` (run seeds)."""
    base: dict
    fixed: list
    dims: list
    values: list
    seeds: list
    grid: bool
    sweep_seed: int

    @property
    def runs(self):
        """Every (trial, seed), trial-major: the same list whatever runs them."""
        return [(trial, seed) for trial in range(len(self.values)) for seed in self.seeds]

    def spec(self, trial, seed):
        """The complete spec of run (trial, seed)."""
        assignments = [(dim.target, value) for dim, value in zip(self.dims, self.values[trial])]
        return {**with_values(self.base, assignments), "seed": seed}

    def params(self, trial):
        """{name: value} of a trial's searched values."""
        return {dim.name: value for dim, value in zip(self.dims, self.values[trial])}

    def columns(self):
        return ["trial", "seed", *(dim.name for dim in self.dims), *FIXED_COLUMNS[2:]]

    def definition(self):
        """What makes two sweeps the same sweep (sweep.json, compared on a rerun): no paths, no backend."""
        base = {k: v for k, v in identity(self.base).items() if k != "seed"}
        return {"search": [dim.to_dict() for dim in self.dims],
                "set": [{**target.to_dict(), "value": value} for target, value in self.fixed],
                "grid": self.grid, "trials": len(self.values), "seeds": list(self.seeds),
                "sweep_seed": self.sweep_seed, "base_spec": base}


def trial_values(dims, trials, sweep_seed, grid):
    """One tuple of values per trial: the full grid, or ``trials`` draws, trial ``i`` from the ``i``-th child of
    ``SeedSequence(sweep_seed)`` (so trial ``i`` does not depend on how many trials there are)."""
    if grid:
        return list(itertools.product(*(dim.grid() for dim in dims)))
    children = np.random.SeedSequence(sweep_seed).spawn(trials)
    return [tuple(dim.sample(rng) for dim in dims) for rng in map(np.random.default_rng, children)]


def make_plan(task, method="spacenet", searches=(), sets=(), trials=None, seeds=(0,), validation=0.1,
              sweep_seed=0, grid=False, preset="paper", arch="auto", width="standard", hidden=None, data_dir=None,
              stream_options=None):
    """The Plan of a sweep; SweepError (or SpecError) naming the first problem. Arguments as the CLI's."""
    if not searches:
        raise SweepError("nothing to search: give at least one --search NAME=DIST")
    if not (isinstance(validation, (int, float)) and 0 < validation < 1):
        raise SweepError(f"--validation {validation} must be in (0, 1): trials are chosen on validation data only")
    if grid and trials is not None:
        raise SweepError("--grid runs every combination of the choice and int values; drop --trials")
    if not grid and (trials is None or trials < 1):
        raise SweepError("random search needs --trials N (N >= 1), or --grid")
    if sweep_seed < 0:
        raise SweepError(f"--sweep-seed {sweep_seed} must be >= 0")
    check_seeds(seeds, "--seeds")
    base = experiment.make_spec(task, method, 0, preset, None, None, validation, data_dir, arch, width, hidden,
                                stream_options)
    fixed = [parse_set(text, method, base) for text in sets]
    check_distinct([target for target, _ in fixed], "--set")
    try:
        base = with_values(base, fixed)
    except SpecError as err:
        raise SweepError(f"--set: {err}") from None
    dims = [parse_search(text, method, base) for text in searches]
    check_distinct([dim.target for dim in dims], "--search")
    check_not_covered([target for target, _ in fixed], [dim.target for dim in dims])
    clash = [dim.name for dim in dims if dim.name in FIXED_COLUMNS]
    if clash:
        raise SweepError(f"--search {clash[0]}: the name clashes with a trials.csv column; write it another way")
    plan = Plan(base, fixed, dims, trial_values(dims, trials, sweep_seed, grid), list(seeds), grid, sweep_seed)
    plan.spec(0, plan.seeds[0])  # every trial's spec is checked the same way; the first fails first
    return plan


def check_seeds(seeds, flag):
    """SweepError unless ``seeds`` is a non-empty list of distinct integers >= 0."""
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise SweepError(f"{flag} {' '.join(map(str, seeds))} must be distinct integers >= 0")


# ----- trials.csv -----
def outcome_row(plan, trial, seed, outcome):
    """The trials.csv row (a dict of strings) of a finished run; no test accuracy ever goes in."""
    row = {"trial": str(trial), "seed": str(seed)}
    row.update({dim.name: dim.text(value) for dim, value in zip(plan.dims, plan.values[trial])})
    failed = "error" in outcome
    for key in (*METRICS, "wall_time_s"):
        row[key] = "" if failed else repr(float(outcome[key]))
    row["config_hash"] = config_hash(plan.spec(trial, seed))
    row["status"] = "failed" if failed else "ok"
    row["error"] = one_line(f"{outcome['error_type']}: {outcome['error']}") if failed else ""
    return row


def one_line(text):
    """``text`` with its lines joined, so every trials.csv row is one line."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def rows_csv(columns, rows):
    """CSV text of ``rows`` (dicts of strings) with a header."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def read_rows(path, columns):
    """The rows of a trials.csv (dicts of strings) keyed by (trial, seed); SweepError if damaged."""
    if not path.exists():
        return {}
    try:
        reader = csv.DictReader(io.StringIO(path.read_text()))
        if reader.fieldnames != list(columns):
            raise SweepError(f"{path} has the columns {reader.fieldnames}, expected {list(columns)}")
        rows = {(int(row["trial"]), int(row["seed"])): row for row in reader}
    except (OSError, ValueError, csv.Error) as err:
        raise SweepError(f"{path} cannot be read: {err}") from None
    return rows


def retried(row, retry_failed):
    """Whether a finished row runs again: failed, and either asked to or not a failure its spec reproduces."""
    if row["status"] == "ok":
        return False
    return retry_failed or row["error"].split(":", 1)[0] not in FINAL_ERRORS


# ----- ranking -----
def trial_stats(rows, trials, seeds):
    """Per trial: {"trial", "n_ok", "n_failed", "complete", and mean/std (ddof 0) over its ok seeds of each
    metric}. ``rows``: trials.csv rows (dicts of strings); ``trials``: trial indices; ``seeds``: run seeds."""
    stats = []
    for trial in trials:
        ok = [rows[(trial, s)] for s in seeds if (trial, s) in rows and rows[(trial, s)]["status"] == "ok"]
        failed = sum(1 for s in seeds if (trial, s) in rows and rows[(trial, s)]["status"] == "failed")
        entry = {"trial": trial, "n_ok": len(ok), "n_failed": failed, "complete": len(ok) == len(seeds)}
        for metric in METRICS:
            values = [float(row[metric]) for row in ok]
            entry[metric] = (float(np.mean(values)), float(np.std(values))) if values else (math.nan, math.nan)
        stats.append(entry)
    return stats


def ranked(stats):
    """Trials whose every seed finished ok, best mean validation accuracy first (ties: the lower trial)."""
    return sorted((s for s in stats if s["complete"]), key=lambda s: (-s[METRICS[0]][0], s["trial"]))


def short(value, dim):
    """A searched value for a table: floats to 4 significant digits, others as in trials.csv."""
    return f"{value:.4g}" if isinstance(value, float) else dim.text(value)


def top_table(order, params_text, k):
    """A markdown table of the first ``k`` trials of ``order``; ``params_text(trial)`` -> {name: text}."""
    names = list(params_text(order[0]["trial"])) if order else []
    lines = ["| rank | trial | " + " | ".join(names) + " | val accuracy (mean ± std) | val BWT | val forgetting |"
             " seeds |", "|---" * (len(names) + 6) + "|"]
    for rank, s in enumerate(order[:k], 1):
        (mean, std), bwt, forgetting = s[METRICS[0]], s[METRICS[1]][0], s[METRICS[2]][0]
        values = " | ".join(params_text(s["trial"]).values())
        lines.append(f"| {rank} | {s['trial']} | {values} | {mean:.2f} ± {std:.2f} | {bwt:.2f} | {forgetting:.2f} "
                     f"| {s['n_ok']} |")
    return "\n".join(lines) + "\n"


# ----- the sweep folder -----
def read_sweep_json(path):
    """A sweep.json as a dict; SweepError if it is not one."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SweepError(f"{path} cannot be read: {err}") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or not isinstance(saved.get("definition"), dict):
        raise SweepError(f"{path} is not a sweep definition ({FORMAT})")
    return saved


def differences(saved, wanted, prefix=""):
    """The differing entries of two (nested) dicts, as 'key: X in OUT, Y here'."""
    parts = []
    for key in sorted(set(saved) | set(wanted), key=str):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            parts += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            parts.append(f"{prefix}{key}: {json.dumps(a)} in OUT, {json.dumps(b)} here")
    return parts


def check_folder(out, definition):
    """'new' or 'resume' for a sweep with ``definition`` into ``out``; SweepError if ``out`` is a file, holds
    another sweep (naming what differs) or holds files that are not a sweep's."""
    if out.exists() and not out.is_dir():
        raise SweepError(f"{out} is a file, not a sweep folder")
    if (out / "sweep.json").exists():
        saved = read_sweep_json(out / "sweep.json")["definition"]
        found = differences(saved, json.loads(json.dumps(definition)))
        if found:
            raise SweepError(f"{out} holds another sweep; differs: {'; '.join(found)}. Use another --out")
        return "resume"
    others = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.exists() else []
    if others:
        raise SweepError(f"{out} holds files that are not a sweep's ({', '.join(others)}): use another --out")
    return "new"


class Sweep:
    """A Plan run into a folder: the rows finished so far, what runs next, trials.csv kept up to date.

    ``checkpoints``: save each run after every task under OUT/checkpoints/ (the workers must be able to write
    there) so an interrupted run continues from its last task.
    """

    def __init__(self, plan, out, checkpoints=True, quiet=False):
        self.plan, self.out, self.checkpoints, self.quiet = plan, Path(out), checkpoints, quiet
        self.columns = plan.columns()
        self.rows = {}
        self.lock = RunFolder(self.out)
        self.bar = None

    @property
    def csv_path(self):
        return self.out / "trials.csv"

    def checkpoint(self, trial, seed):
        return self.out / "checkpoints" / f"trial{trial}-seed{seed}.ckpt" if self.checkpoints else None

    def open(self, argv=()):
        """Lock the folder, check it holds this sweep or nothing, write sweep.json, read the finished rows."""
        if self.out.exists() and not self.out.is_dir():
            raise SweepError(f"{self.out} is a file, not a sweep folder")
        self.lock.lock()
        try:
            definition = self.plan.definition()
            if check_folder(self.out, definition) == "new":
                atomic_write_json(self.out / "sweep.json", {
                    "format": FORMAT, "version": 1, "definition": definition, "columns": self.columns,
                    "n_runs": len(self.plan.runs), "argv": list(argv)})
            self.rows = self.check_rows(read_rows(self.csv_path, self.columns))
        except BaseException:
            self.close()
            raise

    def check_rows(self, rows):
        """``rows`` if each is a planned run with its planned config hash; SweepError otherwise."""
        planned = set(self.plan.runs)
        for (trial, seed), row in rows.items():
            if (trial, seed) not in planned:
                raise SweepError(f"{self.csv_path}: trial {trial} seed {seed} is not a run of this sweep")
            if row["config_hash"] != config_hash(self.plan.spec(trial, seed)) or row["status"] not in ("ok", "failed"):
                raise SweepError(f"{self.csv_path}: the row of trial {trial} seed {seed} does not match this sweep")
        return rows

    def close(self):
        self.lock.unlock()

    def pending(self, retry_failed=False):
        """The (trial, seed) runs to do: missing ones and failed ones that are retried (see ``retried``)."""
        return [key for key in self.plan.runs if key not in self.rows or retried(self.rows[key], retry_failed)]

    def run(self, workers=None, scheduler=None, retry_failed=False):
        """Run the pending runs through the engine, writing each row as it finishes. Returns how many ran."""
        todo = self.pending(retry_failed)
        jobs = [(key, self.plan.spec(*key), self.checkpoint(*key)) for key in todo]
        if not jobs:
            return 0
        self.start_bar(len(self.plan.runs) - len(todo))
        try:
            engine.execute(jobs, workers=workers, scheduler=scheduler, on_result=self.finish)
        finally:
            if self.bar is not None:
                self.bar.close()
            folder = self.out / "checkpoints"
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()  # every run finished: no checkpoint left
        return len(jobs)

    def start_bar(self, done):
        """A tqdm bar over runs (done/total, ETA, best validation accuracy so far); none when quiet."""
        if self.quiet:
            return
        from tqdm import tqdm
        self.bar = tqdm(total=len(self.plan.runs), initial=done, unit="run", desc="sweep", file=sys.stderr,
                        dynamic_ncols=True)
        self.show_best()

    def show_best(self):
        values = [float(row[METRICS[0]]) for row in self.rows.values() if row["status"] == "ok"]
        if self.bar is not None and values:
            self.bar.set_postfix_str(f"best val {max(values):.2f} %")

    def finish(self, key, outcome):
        """A finished run: its row into trials.csv (the whole file, atomically, in run order)."""
        trial, seed = key
        row = outcome_row(self.plan, trial, seed, outcome)
        self.rows[key] = row
        order = {run: i for i, run in enumerate(self.plan.runs)}
        ordered = [self.rows[k] for k in sorted(self.rows, key=order.__getitem__)]
        atomic_write_bytes(self.csv_path, rows_csv(self.columns, ordered).encode())
        path = self.checkpoint(trial, seed)
        if path is not None and not retried(row, False):
            path.unlink(missing_ok=True)  # finished for good; a run retried later resumes from it
        if row["status"] == "failed":
            self.say(f"trial {trial} seed {seed} failed: {row['error']}")
        if self.bar is not None:
            self.bar.update(1)
            self.show_best()

    def say(self, text):
        """A line above the bar (failures are printed even with --quiet)."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    # ----- the end -----
    def stats(self):
        return trial_stats(self.rows, range(len(self.plan.values)), self.plan.seeds)

    def params_text(self, trial):
        """{name: value as text} of a trial's searched values, floats to 4 significant digits (for tables)."""
        return {dim.name: short(value, dim) for dim, value in zip(self.plan.dims, self.plan.values[trial])}

    def best(self):
        """best.json's content for the best ranked trial, or None when no trial finished on every seed."""
        order = ranked(self.stats())
        if not order:
            return None
        top = order[0]
        spec = self.plan.spec(top["trial"], self.plan.seeds[0])
        mean, std = top[METRICS[0]]
        return {"trial": top["trial"], "params": self.plan.params(top["trial"]),
                "spec": {**spec, "seed": None}, "seeds": list(self.plan.seeds), "config_hash": config_hash(spec),
                "val_final_average_accuracy_mean": mean, "val_final_average_accuracy_std": std,
                "val_backward_transfer_mean": top[METRICS[1]][0], "val_average_forgetting_mean": top[METRICS[2]][0],
                "n_seeds": top["n_ok"], "std_ddof": 0,
                "selection": "highest mean val_final_average_accuracy over the seeds, among the trials whose "
                             "every seed finished; ties go to the lower trial; test accuracy is never used"}


# ----- final runs -----
def train_argv(spec, seeds, out, workers=None, quiet=False, checkpoint_every="task"):
    """The train CLI's arguments for ``spec`` (seed ignored) with ``seeds``: every config value and method option
    written out, so the final runs do not depend on the preset's values staying the same."""
    argv = ["--task", spec["task"], "--method", spec["method"], "--preset", spec["preset"], "--arch", spec["arch"],
            "--width", spec["width"], "--hidden", *map(str, spec["hidden"])]
    declared = [(CONFIG_OPTIONS, spec["config"]), (method_options(METHODS[spec["method"]]), spec["method_options"])]
    for options, values in declared:
        for name, option in options.items():
            value = values[name]
            argv += [option.flag, *(format_value(v, option) for v in (value if option.per_layer else [value]))]
    argv += ["--validation", repr(spec["validation"]), "--seeds", *map(str, seeds), "--out", str(out),
             "--checkpoint-every", checkpoint_every]
    if spec["data_dir"] is not None:
        argv += ["--data-dir", spec["data_dir"]]
    for name, value in spec["stream_options"].items():
        if value is not None:
            argv += ["--" + name.replace("_", "-"), *map(str, value if isinstance(value, list) else [value])]
    if workers is not None:
        argv += ["--workers", str(workers)]
    return argv + (["--quiet"] if quiet else [])


def final_state(folder, spec, seeds):
    """'new', 'done' or 'resume' for final runs of ``spec`` with ``seeds`` in ``folder``; SweepError if it holds
    the final runs of another configuration or other seeds."""
    run_json, results = folder / "run.json", folder / "results.json"
    if not run_json.exists():
        return "new"
    try:
        run = json.loads(run_json.read_text())
        done = results.exists() and json.loads(results.read_text()).get("complete") is True
    except (OSError, ValueError) as err:
        raise SweepError(f"{folder} cannot be read: {err}") from None
    saved = {"spec": identity({**run.get("spec", {}), "seed": None}), "seeds": run.get("seeds")}
    found = differences(saved, {"spec": identity({**spec, "seed": None}), "seeds": list(seeds)})
    if found:
        raise SweepError(f"{folder} holds final runs of another configuration; differs: {'; '.join(found)}. "
                         f"Remove it to evaluate the best trial again")
    return "done" if done else "resume"


def run_final(best, seeds, out, workers=None, quiet=False, checkpoint_every="task"):
    """Train the best configuration with ``seeds`` through the train CLI into ``out``/final. Returns its exit
    code (0: results.json written)."""
    from . import train
    folder = Path(out) / "final"
    state = final_state(folder, best["spec"], seeds)
    if state == "done":
        print(f"final runs already in {folder / 'results.json'}")
        return 0
    workers = min(workers or engine.default_workers(), len(seeds))
    if state == "resume":
        argv = ["--resume", str(folder), "--workers", str(workers)] + (["--quiet"] if quiet else [])
    else:
        argv = train_argv(best["spec"], seeds, folder, workers, quiet, checkpoint_every)
    print(f"final runs of trial {best['trial']}: python -m spacenet_np.train {' '.join(argv)}", flush=True)
    return train.main(argv)


# ----- command line -----
class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: ...`` on stderr, exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser():
    p = Parser(prog="python -m spacenet_np.sweep", description=__doc__.splitlines()[0],
               epilog="presets:\n  " + "\n  ".join(presets.describe()),
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, type=train.task_name, help="task stream: "
                   f"{', '.join(sorted(STREAMS))}, or npz:PATH (your own arrays)")
    p.add_argument("--classes-per-task", type=int, help="npz:PATH tasks: classes per task (default 2)")
    p.add_argument("--class-order", type=int, nargs="+", metavar="LABEL",
                   help="npz:PATH tasks: every class label once, in the order tasks learn them (default sorted)")
    p.add_argument("--method", default="spacenet", choices=sorted(METHODS), help="continual-learning method")
    p.add_argument("--preset", default="paper", choices=presets.PRESETS, help="the values a trial starts from")
    p.add_argument("--arch", default="auto", choices=experiment.ARCHS, help="network (auto: the paper's)")
    p.add_argument("--width", default="standard", choices=sorted(presets.CNN_WIDTHS), help="CNN feature maps")
    p.add_argument("--hidden", type=int, nargs="+", help="fully connected hidden widths (default: the preset's)")
    p.add_argument("--search", action="append", default=[], metavar="NAME=DIST",
                   help=f"a searched hyperparameter (repeatable); DIST: {DIST_HELP}. NAME: a config field (lr, "
                        "rewire_ratio, selected, reserved, connections, ...; NAME.i for one layer's entry) or an "
                        "option of the method")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a fixed value instead of the preset's (repeatable; per-layer fields: one value, or one "
                        "per layer separated by commas)")
    p.add_argument("--grid", action="store_true", help="every combination of the choice/int values")
    p.add_argument("--trials", type=int, help="random trials (not with --grid)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="run seeds of every trial (default 0)")
    p.add_argument("--validation", type=float, default=0.1,
                   help="fraction of each task's training images held out to choose on (default 0.1; > 0)")
    p.add_argument("--sweep-seed", type=int, default=0, help="master seed of the trials' values (default 0)")
    p.add_argument("--out", help="sweep folder (default runs/sweep-TASK-METHOD)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="an existing Dask cluster (tcp://HOST:PORT)")
    p.add_argument("--workers", type=int, help="local worker processes (default: every core)")
    p.add_argument("--checkpoint-every", choices=["task", "none"],
                   help="save each run after every task (OUT/checkpoints/) so an interrupted run continues "
                        "(default: task locally, none with --scheduler)")
    p.add_argument("--retry-failed", action="store_true", help="also rerun failed runs that would fail the same way")
    p.add_argument("--final-seeds", type=int, nargs="+", help="then train the best trial with these seeds (OUT/final)")
    p.add_argument("--top", type=int, default=10, help="trials in the printed table (default 10)")
    p.add_argument("--data-dir", help="dataset folder on every worker (default: their $SPACENET_DATA, then ./data)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_args(argv):
    """The parsed arguments; exit 2 with one line for a bad combination."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers {args.workers} must be >= 1")
    if args.workers is not None and args.scheduler is not None:
        parser.error("--workers sets the local cluster's size; an existing cluster (--scheduler) has its own")
    if args.top < 1:
        parser.error(f"--top {args.top} must be >= 1")
    if args.scheduler is not None:
        try:
            engine.check_address(args.scheduler)
        except engine.EngineError as err:
            parser.error(f"--scheduler: {err}")
    return args


def plan_from_args(args):
    if args.final_seeds is not None:
        check_seeds(args.final_seeds, "--final-seeds")
    if train.stream_options(args) is None and (args.classes_per_task is not None or args.class_order is not None):
        raise SweepError(f"--classes-per-task and --class-order apply to npz:PATH tasks only, not --task {args.task}")
    return make_plan(args.task, args.method, args.search, args.set, args.trials, args.seeds, args.validation,
                     args.sweep_seed, args.grid, args.preset, args.arch, args.width, args.hidden, args.data_dir,
                     train.stream_options(args))


def report_end(sweep, top):
    """Print the top trials and write best.json. Returns best.json's content (None if no trial is complete)."""
    stats = sweep.stats()
    n_failed = sum(1 for row in sweep.rows.values() if row["status"] == "failed")
    order = ranked(stats)
    print(f"top {min(top, len(order))} of {len(order)} trials finished on every seed, by mean validation accuracy "
          f"(± std over {len(sweep.plan.seeds)} seed(s), ddof=0); {n_failed} run(s) failed")
    if order:
        print(top_table(order, sweep.params_text, top), end="")
    best = sweep.best()
    if best is None:
        print("no trial finished on every seed: no best.json", file=sys.stderr)
        return None
    atomic_write_json(sweep.out / "best.json", best)
    print(f"best: trial {best['trial']} {best['params']}: validation accuracy "
          f"{best['val_final_average_accuracy_mean']:.2f} ± {best['val_final_average_accuracy_std']:.2f} % "
          f"-> {sweep.out / 'best.json'}")
    return best


def run_sweep(args, argv):
    """The sweep of ``args``: plan, run, report, final runs. Returns the exit code."""
    plan = plan_from_args(args)
    out = Path(args.out or f"runs/sweep-{args.task}-{args.method}")
    checkpoints = (args.checkpoint_every or ("none" if args.scheduler else "task")) == "task"
    sweep = Sweep(plan, out, checkpoints, args.quiet)
    sweep.open(argv)
    try:
        todo = len(sweep.pending(args.retry_failed))
        where = args.scheduler or f"{args.workers or engine.default_workers()} local worker(s)"
        print(f"sweep {out}: {len(plan.values)} trials x {len(plan.seeds)} seed(s) = {len(plan.runs)} runs; "
              f"{len(plan.runs) - todo} done, {todo} to run on {where}", flush=True)
        sweep.run(args.workers, args.scheduler, args.retry_failed)
    except KeyboardInterrupt:
        done = sum(1 for key in plan.runs if key in sweep.rows)
        print(f"interrupted: {done} of {len(plan.runs)} runs are in {sweep.csv_path}; run the same command again "
              f"to continue", file=sys.stderr)
        raise
    finally:
        sweep.close()
    best = report_end(sweep, args.top)
    if best is None:
        return 1
    if args.final_seeds is None:
        return 0
    return run_final(best, args.final_seeds, out, args.workers, args.quiet, "task" if checkpoints else "none")


class Stopped(KeyboardInterrupt):
    """SIGTERM: unwinds like Ctrl-C (runs cancelled, cluster closed, finished rows kept)."""

    signum = signal.SIGTERM


def raise_stopped(signum, frame):
    raise Stopped()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, raise_stopped)
    try:
        return run_sweep(args, argv)
    except (SweepError, SpecError, RunFolderError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (engine.EngineError, WriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        return EXIT_SIGNAL[getattr(err, "signum", signal.SIGINT)]
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    run_main(main)
