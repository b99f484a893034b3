"""Command line: ``python -m spacenet_np.train --task split_mnist``.

Wires a task stream, a strategy and the metrics together: trains one model per seed, prints the accuracy on every
task seen so far after each task, and writes ``OUT/results.json`` atomically.
"""
import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import checkpoint, metrics
from .fileio import atomic_write_bytes, atomic_write_json
from .methods import METHODS
from .network import SparseMLP
from .recorder import Recorder, probe_set
from .spacenet import SpaceNetConfig
from .strategy import TrainingDiverged
from .streams import STREAMS, get_stream


def build_parser():
    defaults = SpaceNetConfig()
    p = argparse.ArgumentParser(prog="python -m spacenet_np.train", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=sorted(STREAMS), help="task stream (required unless --resume)")
    p.add_argument("--method", default="spacenet", choices=sorted(METHODS), help="continual-learning method")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs per task")
    p.add_argument("--lr", type=float, default=defaults.lr, help="SGD learning rate")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--hidden", type=int, nargs="+", default=[400, 400], help="hidden layer widths")
    p.add_argument("--connections", type=float, nargs="+", default=None,
                   help="connections per task per layer: counts (>= 1) or densities of the full layer (< 1); "
                        "default 10000 1640 80, the middle value repeated for extra hidden layers")
    p.add_argument("--selected", type=int, nargs="+", default=None,
                   help="selected neurons per task per hidden layer (default 80 each)")
    p.add_argument("--reserved", type=int, nargs="+", default=None,
                   help="reserved neurons per task per hidden layer (default 40 each)")
    p.add_argument("--rewire-ratio", type=float, default=defaults.rewire_ratio, help="fraction r rewired per epoch")
    p.add_argument("--init-fan", default="layer", choices=["layer", "selected"],
                   help="Xavier bound from the full layer shape (paper) or from the selected-neuron block")
    p.add_argument("--replay-per-task", type=int, default=None,
                   help="rehearsal: samples kept per old task (default: all of them, as in the paper)")
    p.add_argument("--ewc-lambda", type=float, default=5000.0, help="ewc: penalty strength")
    p.add_argument("--fisher-samples", type=int, default=600, help="ewc: samples for the Fisher estimate")
    p.add_argument("--checkpoint-every", default="task", choices=["task", "none"],
                   help="save the learner after every task (OUT/checkpoints/seedS.ckpt), or never")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue an interrupted run from its last finished task, with the run's own arguments")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: $SPACENET_DATA, then ./data)")
    p.add_argument("--out", default=None, help="output folder for results.json (default: runs/TASK-METHOD)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-task lines")
    return p


def config_from_args(args):
    """A ``SpaceNetConfig`` from the parsed arguments, with the paper's values for what is not given."""
    n_hidden = len(args.hidden)
    if args.connections is None:
        connections = [10000] + [1640] * (n_hidden - 1) + [80]
    else:
        connections = [int(c) if c >= 1 else float(c) for c in args.connections]
    return SpaceNetConfig(
        connections_per_task=tuple(connections),
        selected_neurons=tuple(args.selected or [80] * n_hidden),
        reserved_neurons=tuple(args.reserved or [40] * n_hidden),
        rewire_ratio=args.rewire_ratio, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        init_fan=args.init_fan)


class Progress:
    """A tqdm bar per epoch and a line per task; silent when ``quiet``."""

    def __init__(self, quiet, n_tasks, epochs):
        self.quiet, self.n_tasks, self.epochs = quiet, n_tasks, epochs
        self.bar = None

    def start_epoch(self, task, epoch, n_batches):
        if self.quiet:
            return
        from tqdm import tqdm
        self.bar = tqdm(total=n_batches, desc=f"task {task + 1}/{self.n_tasks} epoch {epoch + 1}/{self.epochs}",
                        unit="batch", leave=False, mininterval=0.2, file=sys.stderr)

    def batch(self, loss):
        if self.bar is not None:
            self.bar.update(1)
            if self.bar.n % 50 == 1:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def end_epoch(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def line(self, text):
        if not self.quiet:
            print(text, flush=True)


def method_options(args, n_tasks):
    """Constructor options of ``args.method`` beyond the shared config."""
    if args.method == "rehearsal":
        return {"replay_per_task": args.replay_per_task}
    if args.method in ("finetune", "joint"):
        return {"total_tasks": n_tasks}
    if args.method == "ewc":
        return {"total_tasks": n_tasks, "ewc_lambda": args.ewc_lambda, "fisher_samples": args.fisher_samples}
    return {}


class RunFiles:
    """Where a run keeps its files: ``results.json``, ``runs.csv``, ``args.json``, per-seed checkpoints/snapshots."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.results = self.out_dir / "results.json"
        self.csv = self.out_dir / "runs.csv"
        self.args = self.out_dir / "args.json"

    def checkpoint(self, seed):
        return self.out_dir / "checkpoints" / f"seed{seed}.ckpt"

    def snapshots(self, seed):
        return self.out_dir / "snapshots" / f"seed{seed}.npz"


def start_seed(stream, args, config, seed, files):
    """A learner, its accuracy matrix so far, the time already spent and its recorder: fresh or resumed."""
    probes = probe_set(stream.tasks)
    if args.resume and files.checkpoint(seed).exists():
        saved = checkpoint.load(files.checkpoint(seed))
        learner = checkpoint.restore_learner(saved, METHODS)
        snapshots = files.snapshots(seed)
        recorder = Recorder.load(snapshots) if snapshots.exists() else Recorder(*probes)
        recorder.probe_images, recorder.probe_labels = probes
        return learner, saved.progress["accuracy_matrix"], saved.progress["wall_time_s"], recorder
    model = SparseMLP(stream.n_features, args.hidden, stream.n_classes)
    learner = METHODS[args.method](model, config, seed=seed, input_mean=stream.mean, input_std=stream.std,
                                   **method_options(args, len(stream.tasks)))
    return learner, [], 0.0, Recorder(*probes)


def run_seed(stream, args, config, seed, progress, files):
    """Train one model over the whole stream (or what is left of it). Returns the run's entry of results.json."""
    start = time.perf_counter()
    learner, matrix, time_before, recorder = start_seed(stream, args, config, seed, files)
    learner.observers.append(recorder)
    for task in stream.tasks[learner.tasks_learned:]:
        task_start = time.perf_counter()

        def on_batch(epoch, batch, n_batches, loss):  # n_batches: of what the method trains on (replay included)
            if batch == 0:
                progress.end_epoch()
                progress.start_epoch(task.index, epoch, n_batches)
            progress.batch(loss)

        try:
            learner.learn(task.x_train, task.y_train, task.classes, on_batch=on_batch)
        finally:
            progress.end_epoch()
        matrix.append(metrics.evaluate_tasks(learner.predict, stream.tasks[:task.index + 1]))
        if args.checkpoint_every == "task":
            recorder.save(files.snapshots(seed))
            checkpoint.save_learner(files.checkpoint(seed), learner, {
                "seed": seed, "accuracy_matrix": matrix, "wall_time_s": time_before + time.perf_counter() - start})
        progress.line(f"seed {seed} task {task.index + 1}/{len(stream.tasks)} classes {list(task.classes)} "
                      f"({time.perf_counter() - task_start:.1f} s): accuracy "
                      + " ".join(f"{a:.2f}" for a in matrix[-1]) + f" | average {np.mean(matrix[-1]):.2f}")
    if args.checkpoint_every != "task":
        recorder.save(files.snapshots(seed))
    size = metrics.model_size(learner.model)
    return {
        "seed": seed,
        "accuracy_matrix": matrix,
        **metrics.run_metrics(matrix),
        "wall_time_s": time_before + time.perf_counter() - start,
        "connections_per_layer": learner.model.connection_counts(),
        "free_neurons_per_layer": [n.n_free for n in learner.model.neurons[1:-1]],
        "parameter_count": size["parameters"],
        "model_size_bytes": size["bytes"],
    }


def format_matrix(matrix):
    """The accuracy matrix as aligned text rows."""
    return "\n".join(f"  after task {i + 1}: " + " ".join(f"{a:6.2f}" for a in row) for i, row in enumerate(matrix))


CSV_FIELDS = ("task", "method", "seed", "final_average_accuracy", "backward_transfer", "average_forgetting",
              "final_per_task_std", "final_per_task_accuracy", "parameter_count", "model_size_bytes", "wall_time_s",
              "config")


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


def parse_args(argv):
    """The arguments of a new run, or those saved in ``RUN_DIR/args.json`` for ``--resume RUN_DIR``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume is None:
        if args.task is None:
            parser.error("--task is required (or --resume RUN_DIR)")
        return args
    files = RunFiles(args.resume)
    if not files.args.exists():
        raise SystemExit(f"error: {files.args} not found: {args.resume} is not a run folder of this CLI")
    saved = json.loads(files.args.read_text())
    resumed = parser.parse_args(saved["argv"])
    resumed.resume, resumed.out = args.resume, args.resume
    resumed.quiet = resumed.quiet or args.quiet
    return resumed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    config = config_from_args(args)
    stream = get_stream(args.task, args.data_dir)
    try:
        config.validate(SparseMLP(stream.n_features, args.hidden, stream.n_classes),
                        neuron_selection=METHODS[args.method].uses_neuron_selection)
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    files = RunFiles(args.out or f"runs/{args.task}-{args.method}")
    if not args.resume:
        atomic_write_json(files.args, {"argv": [a for a in argv if a != "--quiet"]})
    progress = Progress(args.quiet, len(stream.tasks), config.epochs)
    runs = []
    for seed in args.seeds:
        try:
            runs.append(run_seed(stream, args, config, seed, progress, files))
        except TrainingDiverged as err:
            print(f"error: training diverged for seed {seed}: {err}. No results were written.", file=sys.stderr)
            return 1
        except ValueError as err:  # a hyperparameter that becomes impossible at a later task
            print(f"error: seed {seed}: {err}. No results were written.", file=sys.stderr)
            return 2
        run = runs[-1]
        print(f"seed {seed}: accuracy matrix (percent)\n{format_matrix(run['accuracy_matrix'])}\n"
              f"seed {seed}: final average accuracy {run['final_average_accuracy']:.2f} % "
              f"({run['wall_time_s']:.1f} s)", flush=True)
    finals = [r["final_average_accuracy"] for r in runs]
    results = {
        "task": args.task,
        "method": args.method,
        "config": {**config.to_dict(), "hidden": list(args.hidden), "seeds": list(args.seeds),
                   "method_options": method_options(args, len(stream.tasks)),
                   "input_mean": stream.mean, "input_std": stream.std},
        "runs": runs,
        "mean_final_average_accuracy": float(np.mean(finals)),
        "std_final_average_accuracy": float(np.std(finals)),
    }
    atomic_write_json(files.results, results)
    atomic_write_bytes(files.csv, csv_rows(results).encode())
    print(f"{args.task} {args.method}: final average accuracy {np.mean(finals):.2f} +/- {np.std(finals):.2f} % "
          f"over {len(finals)} seed(s); results in {files.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
