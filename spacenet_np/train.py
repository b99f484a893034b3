"""Command line: ``python -m spacenet_np.train --task split_mnist``.

Parses the arguments into run specs (``experiment.make_spec``), runs them (``experiment.run``) one seed after
another or in parallel (``--workers``), prints the accuracy on every task seen so far after each task, and writes
``OUT/results.json``. The options of the config and of each method come from their declarations.
"""
import argparse
import csv
import io
import json
import os
import signal
import sys
import tempfile

import numpy as np

from . import experiment, npz_stream, presets, threads
from .checkpoint import CheckpointError
from .data import DataError
from .fileio import WriteError, atomic_write_bytes, atomic_write_json
from .methods import METHODS
from .options import method_options
from .process import run_main
from .recorder import Recorder, probe_set
from .runfolder import RunFolder, RunFolderError
from .strategy import TrainingDiverged
from .streams import STREAMS

RESUME_KEEPS = ("resume", "quiet", "data_dir", "workers", "threads", "scheduler")  # what --resume may be given with
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Stopped(BaseException):
    """SIGTERM (or SIGINT) arrived: unwinds like KeyboardInterrupt, so temporary files are removed."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ----- arguments -----
def build_parser():
    p = argparse.ArgumentParser(prog="python -m spacenet_np.train", description=__doc__.splitlines()[0],
                                epilog="presets:\n  " + "\n  ".join(presets.describe()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", type=task_name, metavar="TASK", help=f"task stream: {', '.join(sorted(STREAMS))}, or "
                   f"npz:PATH for your own data (x_train, y_train, x_test, y_test in a .npz; required unless --resume)")
    p.add_argument("--classes-per-task", type=int, help="npz:PATH tasks: classes per task (default 2)")
    p.add_argument("--class-order", type=int, nargs="+", metavar="LABEL",
                   help="npz:PATH tasks: every class label once, in the order tasks learn them (default sorted)")
    p.add_argument("--method", choices=sorted(METHODS), help="continual-learning method (default spacenet)")
    p.add_argument("--preset", choices=presets.PRESETS, help="the values a run starts from (default paper; see "
                                                             "below)")
    p.add_argument("--seeds", type=int, nargs="+", help="one run per seed (default 0)")
    p.add_argument("--arch", choices=experiment.ARCHS,
                   help="network: auto (default) is the paper's CNN for the CIFAR streams and the MLP otherwise")
    p.add_argument("--width", choices=sorted(presets.CNN_WIDTHS),
                   help="CNN feature maps: standard 32-32-64-64 (default) or wide 64-64-128-128")
    p.add_argument("--hidden", type=int, nargs="+", help="fully connected hidden widths (default: MLP 400 400, "
                                                         "CNN 512)")
    config = p.add_argument_group("hyperparameters (default: the preset's value, listed at the end)")
    for option in experiment.CONFIG_OPTIONS.values():
        add_option(config, option, option.help_text(show_default=False))
    group = p.add_argument_group("method options")
    for option, names in declared_method_options().items():
        add_option(group, option, f"{option.help_text()} [--method {', '.join(names)}]")
    p.add_argument("--validation", type=float, help="fraction of each task's training images held out as "
                                                    "validation data, stratified by class (default 0)")
    p.add_argument("--workers", type=int, help="seeds run in parallel on this many worker processes (default 1)")
    p.add_argument("--threads", type=int, help="threads for Numba and BLAS in a single-process run (default: all "
                                               "cores; with --workers, each worker uses one)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="run the seeds on an existing Dask cluster "
                                                          "(tcp://HOST:PORT)")
    p.add_argument("--checkpoint-every", choices=["task", "none"],
                   help="save each seed's learner after every task (OUT/checkpoints/seedS.ckpt; default), or never")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoints")
    p.add_argument("--overwrite", action="store_true", help="replace another run's files in --out")
    p.add_argument("--data-dir", help="dataset folder (default: $SPACENET_DATA, then ./data)")
    p.add_argument("--out", help="output folder (default: runs/TASK-METHOD)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-task lines")
    return p


def task_name(text):
    """A known stream name or ``npz:PATH`` (argparse type)."""
    if text in STREAMS or npz_stream.is_npz_task(text):
        return text
    raise argparse.ArgumentTypeError(f"unknown task {text!r}; choose from {', '.join(sorted(STREAMS))}, or npz:PATH")


def declared_method_options():
    """Every method option, once, with the methods that declare it: {Option: [method names]}."""
    options = {}
    for name in sorted(METHODS):
        for option in METHODS[name].OPTIONS:
            options.setdefault(option, []).append(name)
    return options


def add_option(group, option, help_text):
    """A declared option as an argument that is None unless given (so a given value is never replaced)."""
    def parse(text):
        try:
            return option.parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    group.add_argument(option.flag, dest=option.name, type=parse, nargs="+" if option.per_layer else None,
                       metavar=option.type.__name__.upper(), help=help_text)


def given(args):
    """The names of the arguments set on the command line (everything defaults to None or False)."""
    return [name for name, value in vars(args).items() if value not in (None, False)]


def parse_args(argv):
    """The parsed arguments; SystemExit(2) with a message for a bad combination."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_threads_arg(parser, args)
    if args.resume is not None:
        extra = [name for name in given(args) if name not in RESUME_KEEPS]
        if extra:
            parser.error(f"--resume continues a run with its own arguments; refused: "
                         f"{', '.join('--' + n.replace('_', '-') for n in extra)}")
        return args
    if args.task is None:
        parser.error("--task is required (or --resume RUN_DIR)")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed; each seed is one run")
    if args.seeds is not None and min(args.seeds) < 0:
        parser.error("--seeds must be integers >= 0")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers {args.workers} must be >= 1")
    check_stream_args(parser, args)
    method = args.method or "spacenet"
    foreign = [name for name in method_option_names() - set(method_options(METHODS[method]))
               if getattr(args, name) is not None]
    if foreign:
        parser.error(f"{', '.join('--' + n.replace('_', '-') for n in foreign)} do not apply to --method {method}")
    return args


def check_threads_arg(parser, args):
    """SystemExit(2) for --threads out of [1, cores] or with worker processes (--workers, --scheduler)."""
    if args.threads is None:
        return
    if (args.workers or 1) > 1 or args.scheduler is not None:
        parser.error("--threads sets the threads of a single-process run; with --workers or --scheduler each "
                     "worker uses one thread")
    try:
        threads.check_threads(args.threads)
    except ValueError as err:
        parser.error(f"--threads: {err}")


def check_stream_args(parser, args):
    """SystemExit(2) for stream options without an npz task."""
    stream_args = [flag for flag, value in (("--classes-per-task", args.classes_per_task),
                                            ("--class-order", args.class_order)) if value is not None]
    if stream_args and not npz_stream.is_npz_task(args.task):
        parser.error(f"{', '.join(stream_args)} apply to npz:PATH tasks only, not --task {args.task}")


def method_option_names():
    return {option.name for cls in METHODS.values() for option in cls.OPTIONS}


def base_spec(args):
    """The run's spec with seed 0, from the preset and the given arguments. SpecError naming a bad value."""
    method = args.method or "spacenet"
    config = {name: one_for_all(getattr(args, name)) for name in experiment.CONFIG_OPTIONS
              if getattr(args, name) is not None}
    options = {name: getattr(args, name) for name in method_options(METHODS[method])
               if getattr(args, name) is not None}
    return experiment.make_spec(args.task, method, 0, args.preset or "paper", config, options,
                                0.0 if args.validation is None else args.validation, args.data_dir,
                                args.arch or "auto", args.width or "standard", args.hidden, stream_options(args))


def one_for_all(value):
    """A per-layer flag given one value: that value for every layer (``make_spec`` broadcasts it)."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def stream_options(args):
    """The npz stream options given on the command line (None for a built-in stream)."""
    if not npz_stream.is_npz_task(args.task):
        return None
    given_options = {"classes_per_task": args.classes_per_task, "class_order": args.class_order}
    return {name: value for name, value in given_options.items() if value is not None}


# ----- progress -----
class Progress:
    """A tqdm bar per epoch (images/s and the epoch's ETA) when stderr is a terminal, and a line per task; silent
    when ``quiet``. Without a terminal (a log file, a pipe, a cluster job) there is no bar: a closed bar left only a
    line at 0 % per epoch in the log, and without a bar an epoch trains in one kernel call (the same numbers)."""

    def __init__(self, quiet, n_tasks, epochs):
        self.quiet, self.n_tasks, self.epochs = quiet, n_tasks, epochs
        self.bars = not quiet and sys.stderr is not None and sys.stderr.isatty()
        self.bar = None

    @property
    def shows_batches(self):
        return self.bars

    def start_epoch(self, task, epoch, n_images):
        if not self.bars:
            return
        from tqdm import tqdm
        self.bar = tqdm(total=n_images, desc=f"task {task + 1}/{self.n_tasks} epoch {epoch + 1}/{self.epochs}",
                        unit="img", unit_scale=True, leave=False, mininterval=0.5, file=sys.stderr)

    def batch(self, loss, n_images):
        if self.bar is not None:
            self.bar.update(n_images)
            if self.bar.n % 50 == 1:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def end_epoch(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def line(self, text):
        if not self.quiet:
            print(text, flush=True)


# ----- running -----
class Session:
    """One invocation: the run folder, the specs per seed, what has finished, and the results file."""

    def __init__(self, folder, spec, seeds, checkpoint_every, quiet, argv):
        self.folder, self.spec, self.seeds = folder, spec, list(seeds)
        self.checkpoint_every, self.quiet, self.argv = checkpoint_every, quiet, argv
        self.runs, self.tasks_done = {}, {}

    def seed_spec(self, seed):
        return {**self.spec, "seed": seed}

    def checkpoint_path(self, seed):
        return self.folder.checkpoint(seed) if self.checkpoint_every == "task" else None

    def run_seed(self, seed, n_tasks):
        """One seed in this process, with progress, snapshots for the report (MLP) and checkpoints."""
        spec = self.seed_spec(seed)
        progress = Progress(self.quiet, n_tasks, spec["config"]["epochs"])
        observers, recorder = self.recorder(seed, spec)

        def on_task(learner, matrix):
            self.tasks_done[seed] = learner.tasks_learned
            if recorder is not None and self.checkpoint_every == "task":
                recorder.save(self.folder.snapshots(seed))

        record = experiment.run(spec, self.checkpoint_path(seed), progress, observers, on_task)
        if recorder is not None and self.checkpoint_every != "task":
            recorder.save(self.folder.snapshots(seed))
        self.finish_seed(seed, record)

    def recorder(self, seed, spec):
        """A Recorder of snapshots for the report's figures (MLPs only), resumed from its file if any."""
        if spec["arch"] != "mlp":
            return (), None
        probes = probe_set(experiment.spec_stream(spec).tasks)
        path = self.folder.snapshots(seed)
        checkpoint = self.checkpoint_path(seed)
        resumed = checkpoint is not None and checkpoint.exists() and path.exists()
        recorder = Recorder.load(path) if resumed else Recorder(*probes)
        recorder.probe_images, recorder.probe_labels = probes
        return (recorder,), recorder

    def finish_seed(self, seed, record):
        """Keep a finished seed's record, print it, and write the results so far (marked incomplete)."""
        self.runs[seed] = record
        print(f"seed {seed}: accuracy matrix (percent)\n{format_matrix(record['accuracy_matrix'])}\n"
              f"seed {seed}: final average accuracy {record['final_average_accuracy']:.2f} % "
              f"({record['wall_time_s']:.1f} s)", flush=True)
        if len(self.runs) < len(self.seeds):
            atomic_write_json(self.folder.results, self.results())

    def results(self):
        """results.json: the runs finished so far, in seed order, and their mean and std (ddof 0)."""
        runs = [self.runs[s] for s in self.seeds if s in self.runs]
        finals = [r["final_average_accuracy"] for r in runs]
        spec = self.spec
        stream = experiment.spec_stream(spec)
        results = {
            "task": spec["task"], "method": spec["method"], "preset": spec["preset"],
            "complete": len(runs) == len(self.seeds), "seeds": self.seeds,
            "spec": {**spec, "seed": None},
            "preset_values": presets.preset_values(spec["preset"], spec["arch"], spec["width"], spec["hidden"],
                                                   spec["task"], spec["method"]),
            "config": {**spec["config"], "architecture": experiment.build_model(spec, stream).spec(),
                       "hidden": spec["hidden"], "seeds": self.seeds, "method_options": spec["method_options"],
                       "input_mean": stream.mean, "input_std": stream.std},
            "runs": [{k: v for k, v in r.items() if k != "spec"} for r in runs],
            "mean_final_average_accuracy": float(np.mean(finals)) if finals else None,
            "std_final_average_accuracy": float(np.std(finals)) if finals else None,
        }
        if runs and "val_final_average_accuracy" in runs[0]:
            vals = [r["val_final_average_accuracy"] for r in runs]
            results.update(mean_val_final_average_accuracy=float(np.mean(vals)),
                           std_val_final_average_accuracy=float(np.std(vals)))
        return results

    def status(self, n_tasks):
        """What has finished, for an interruption message."""
        parts = []
        for seed in self.seeds:
            if seed in self.runs:
                parts.append(f"seed {seed} finished")
            elif self.tasks_done.get(seed):
                parts.append(f"seed {seed}: tasks 1-{self.tasks_done[seed]} of {n_tasks} finished")
        return "; ".join(parts) or "no task finished"


def run_parallel(session, workers, scheduler=None):
    """The seeds on ``workers`` worker processes through the Dask engine; results as the sequential run's."""
    from . import engine
    jobs = [(seed, session.seed_spec(seed), session.checkpoint_path(seed)) for seed in session.seeds
            if seed not in session.runs]
    failures = {}

    def on_result(seed, outcome):
        if "error" in outcome:
            failures[seed] = outcome["error"]
        else:
            session.finish_seed(seed, outcome)

    engine.execute(jobs, workers=None if scheduler else workers, scheduler=scheduler, on_result=on_result)
    if failures:
        raise SeedsFailed(failures)


class SeedsFailed(RuntimeError):
    def __init__(self, failures):
        super().__init__("; ".join(f"seed {s}: {e}" for s, e in sorted(failures.items())))


def format_matrix(matrix):
    """The accuracy matrix as aligned text rows."""
    return "\n".join(f"  after task {i + 1}: " + " ".join(f"{a:6.2f}" for a in row) for i, row in enumerate(matrix))


CSV_FIELDS = ("task", "method", "seed", "final_average_accuracy", "backward_transfer", "average_forgetting",
              "final_per_task_std", "final_per_task_accuracy", "val_final_average_accuracy", "parameter_count",
              "model_size_bytes", "wall_time_s", "config")


def csv_rows(results):
    """One CSV row per run, with a header, so files from many invocations can be concatenated."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for run in results["runs"]:
        row = {key: run.get(key) for key in CSV_FIELDS}
        row.update(task=results["task"], method=results["method"], config=json.dumps(results["config"]),
                   final_per_task_accuracy=" ".join(f"{a:.2f}" for a in run["final_per_task_accuracy"]))
        writer.writerow(row)
    return buffer.getvalue()


def write_results(session):
    """results.json and runs.csv; if they cannot be written, the results go to a file in the temp folder (and
    its path is printed) so that finished runs are never lost silently. Returns the exit code."""
    results = session.results()
    try:
        atomic_write_json(session.folder.results, results)
        atomic_write_bytes(session.folder.csv, csv_rows(results).encode())
        return 0
    except WriteError as err:
        print(f"error: {err}", file=sys.stderr)
        fd, rescue = tempfile.mkstemp(prefix="spacenet_np-results-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(results, f, indent=2)
        print(f"error: the results of {len(results['runs'])} finished run(s) were written to {rescue} instead",
              file=sys.stderr)
        return 1


def start_session(args, argv):
    """The session of a new run (folder checked, locked and cleared) or of a resumed one (run.json read)."""
    if args.resume is not None:
        folder = RunFolder(args.resume)
        run = folder.read_run()
        spec = experiment.check_spec({**run["spec"], "seed": 0, "data_dir": args.data_dir or run["spec"]["data_dir"]})
        folder.lock()
        return Session(folder, spec, run["seeds"], run["checkpoint_every"], args.quiet, run["argv"])
    spec = base_spec(args)
    experiment.prepare(spec)  # data and budget checked before the folder is touched
    folder = RunFolder(args.out or default_out(spec))
    folder.check_new(args.overwrite)
    folder.lock()
    folder.clear()
    session = Session(folder, spec, args.seeds or [0], args.checkpoint_every or "task", args.quiet, argv)
    folder.write_run({"spec": {**spec, "seed": None}, "seeds": session.seeds,
                      "checkpoint_every": session.checkpoint_every, "argv": argv})
    return session


def default_out(spec):
    """runs/TASK-METHOD; for an npz task, runs/npz-STEM-METHOD with the file's name without its suffix."""
    task = spec["task"]
    if npz_stream.is_npz_task(task):
        task = "npz-" + npz_stream.npz_path(task).stem
    return f"runs/{task}-{spec['method']}"


def execute(session, workers, scheduler=None):
    spec = session.spec
    n_tasks = len(experiment.spec_stream(spec).tasks)
    try:
        if workers > 1 or scheduler:
            run_parallel(session, workers, scheduler)
        else:
            for seed in session.seeds:
                session.run_seed(seed, n_tasks)
    except (KeyboardInterrupt, Stopped) as err:
        signum = err.signum if isinstance(err, Stopped) else signal.SIGINT
        resume = (f"resume with: python -m spacenet_np.train --resume {session.folder.path}"
                  if session.checkpoint_every == "task" else
                  "no checkpoints were kept (--checkpoint-every none): --resume reruns the unfinished seeds from "
                  "their first task")
        print(f"interrupted by {signal.Signals(signum).name}: {session.status(n_tasks)}. {resume}", file=sys.stderr)
        if session.runs:
            atomic_write_json(session.folder.results, session.results())
        return EXIT_SIGNAL[signum]
    code = write_results(session)
    if code == 0:
        results = session.results()
        print(f"{spec['task']} {spec['method']}: final average accuracy {results['mean_final_average_accuracy']:.2f} "
              f"+/- {results['std_final_average_accuracy']:.2f} % (std ddof 0) over {len(results['runs'])} seed(s); "
              f"results in {session.folder.results}")
    return code


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, raise_stopped)
    session = None
    try:
        session = start_session(args, [a for a in argv if a != "--quiet"])
        with threads.limited(args.threads):
            return execute(session, args.workers or 1, args.scheduler)
    except (DataError, FileNotFoundError, experiment.SpecError, RunFolderError, CheckpointError, WriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, (experiment.SpecError, RunFolderError)) else 1
    except TrainingDiverged as err:
        print(f"error: training diverged: {err}. {kept(session)}", file=sys.stderr)
        return 1
    except SeedsFailed as err:
        print(f"error: {err}. {kept(session)}", file=sys.stderr)
        return 1
    except ValueError as err:  # a hyperparameter that becomes impossible at a later task
        print(f"error: {err}. {kept(session)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Stopped) as err:  # before training started
        signum = err.signum if isinstance(err, Stopped) else signal.SIGINT
        print(f"interrupted by {signal.Signals(signum).name} before training started", file=sys.stderr)
        return EXIT_SIGNAL[signum]
    finally:
        signal.signal(signal.SIGTERM, previous)
        if session is not None:
            session.folder.unlock()


def kept(session):
    if session is None or not session.runs:
        return "No results were written."
    return f"The finished seeds {sorted(session.runs)} are in {session.folder.results}."


def raise_stopped(signum, frame):
    raise Stopped(signum)


if __name__ == "__main__":
    run_main(main)
