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
from .data import DataError
from .fileio import atomic_write_bytes, atomic_write_json
from .methods import METHODS
from .network import SparseCNN, SparseMLP
from .recorder import Recorder, probe_set
from .spacenet import INIT_FANS, SpaceNetConfig
from .strategy import TrainingDiverged
from .streams import STREAMS, get_stream

CNN_TASKS = ("split_cifar10", "cifar10_100")
CNN_WIDTHS = {"standard": (32, 32, 64, 64), "wide": (64, 64, 128, 128)}


def build_parser():
    defaults = SpaceNetConfig()
    p = argparse.ArgumentParser(prog="python -m spacenet_np.train", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=sorted(STREAMS), help="task stream (required unless --resume)")
    p.add_argument("--method", default="spacenet", choices=sorted(METHODS), help="continual-learning method")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed")
    p.add_argument("--arch", default="auto", choices=["auto", "mlp", "cnn"],
                   help="network: auto is the paper's CNN for the CIFAR streams and the MLP otherwise")
    p.add_argument("--width", default="standard", choices=sorted(CNN_WIDTHS),
                   help="CNN feature maps: standard 32-32-64-64 or wide 64-64-128-128")
    p.add_argument("--epochs", type=int, default=None, help="epochs per task (default: MLP 4, CNN 20)")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: MLP 0.01, CNN 0.1)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--hidden", type=int, nargs="+", default=None,
                   help="fully connected hidden layer widths (default: MLP 400 400, CNN 512)")
    p.add_argument("--connections", type=float, nargs="+", default=None,
                   help="connections (CNN: kernels) per task per layer: counts (>= 1) or densities of the full "
                        "layer (< 1); default MLP 10000 1640 80 (the middle value repeated for extra hidden "
                        "layers), CNN 0.12 for every layer")
    p.add_argument("--selected", type=selection, nargs="+", default=None,
                   help="selected neurons (CNN: maps) per task per hidden layer, or 'all' for every one (reserved "
                        "ones only as inputs) "
                        "(default: MLP 80 each, CNN all)")
    p.add_argument("--reserved", type=int, nargs="+", default=None,
                   help="reserved neurons (CNN: maps) per task per hidden layer (default: MLP 40 each, CNN "
                        "2 2 5 6 30)")
    p.add_argument("--rewire-ratio", type=float, default=defaults.rewire_ratio, help="fraction r rewired per epoch")
    p.add_argument("--init-fan", default=None, choices=list(INIT_FANS),
                   help="Xavier bound from the full layer shape (paper; the MLP default), the selected-neuron "
                        "block, or the average new connections per neuron (the CNN default)")
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


def selection(text):
    """``--selected`` values: a positive int, or 'all' (None: every neuron)."""
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an int nor 'all'") from None


def architecture(args):
    """'cnn' or 'mlp' for the parsed arguments."""
    if args.arch != "auto":
        return args.arch
    return "cnn" if args.task in CNN_TASKS else "mlp"


def hidden_widths(args):
    return args.hidden or ([512] if architecture(args) == "cnn" else [400, 400])


def build_model(stream, args):
    """The network for ``stream``: the paper's CNN (Sec. 5.3.1) or the MLP (Sec. 5.1)."""
    if architecture(args) == "cnn":
        if stream.image_shape is None:
            raise SystemExit(f"error: --arch cnn needs images; {stream.name} has no image shape")
        return SparseCNN(stream.image_shape, CNN_WIDTHS[args.width], hidden_widths(args), stream.n_classes)
    return SparseMLP(stream.n_features, hidden_widths(args), stream.n_classes)


def config_from_args(args):
    """A ``SpaceNetConfig`` from the parsed arguments, with the paper's values for what is not given: Sec. 5.1
    for the MLP, Sec. 5.3.1 for the CNN (lr 0.1, 20 epochs, 12 % of every layer per task, every map
    selected, 2 2 5 6 30 reserved; Xavier bounds from the connections per neuron, see ``SpaceNetConfig``)."""
    n_hidden = len(hidden_widths(args))
    if architecture(args) == "cnn":
        n_conv = len(CNN_WIDTHS[args.width])
        connections, selected = [0.12] * (n_conv + n_hidden + 1), [None] * (n_conv + n_hidden)
        reserved = ([2, 2, 5, 6] + [30] * n_hidden) if n_conv == 4 else None
        epochs, lr, init_fan = 20, 0.1, "connections"
    else:
        connections = [10000] + [1640] * (n_hidden - 1) + [80]
        selected, reserved, epochs, lr, init_fan = [80] * n_hidden, [40] * n_hidden, 4, 0.01, "layer"
    if args.connections is not None:
        connections = [int(c) if c >= 1 else float(c) for c in args.connections]
    return SpaceNetConfig(
        connections_per_task=tuple(connections),
        selected_neurons=tuple(args.selected or selected),
        reserved_neurons=tuple(args.reserved or reserved),
        rewire_ratio=args.rewire_ratio, epochs=args.epochs or epochs, batch_size=args.batch_size,
        lr=args.lr or lr, init_fan=args.init_fan or init_fan)


class Progress:
    """A tqdm bar per epoch (images/s and the epoch's ETA) and a line per task; silent when ``quiet``."""

    def __init__(self, quiet, n_tasks, epochs):
        self.quiet, self.n_tasks, self.epochs = quiet, n_tasks, epochs
        self.bar = None

    def start_epoch(self, task, epoch, n_images):
        if self.quiet:
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
    """A learner, its accuracy matrix so far, the time already spent and its recorder (None for a CNN: the
    snapshots for the report's figures describe MLPs): fresh or resumed."""
    probes = probe_set(stream.tasks)
    if args.resume and files.checkpoint(seed).exists():
        saved = checkpoint.load(files.checkpoint(seed))
        learner = checkpoint.restore_learner(saved, METHODS)
        snapshots = files.snapshots(seed)
        recorder = None
        if isinstance(learner.model, SparseMLP):
            recorder = Recorder.load(snapshots) if snapshots.exists() else Recorder(*probes)
            recorder.probe_images, recorder.probe_labels = probes
        return learner, saved.progress["accuracy_matrix"], saved.progress["wall_time_s"], recorder
    mean, std = input_statistics(stream)
    learner = METHODS[args.method](build_model(stream, args), config, seed=seed, input_mean=mean, input_std=std,
                                   **method_options(args, len(stream.tasks)))
    return learner, [], 0.0, Recorder(*probes) if isinstance(learner.model, SparseMLP) else None


def input_statistics(stream):
    """The stream's standardization: per feature (per channel) when it has it, else its scalar mean and std."""
    if stream.feature_mean is not None:
        return stream.feature_mean, stream.feature_std
    return stream.mean, stream.std


def run_seed(stream, args, config, seed, progress, files):
    """Train one model over the whole stream (or what is left of it). Returns the run's entry of results.json."""
    start = time.perf_counter()
    learner, matrix, time_before, recorder = start_seed(stream, args, config, seed, files)
    if recorder is not None:
        learner.observers.append(recorder)
    for task in stream.tasks[learner.tasks_learned:]:
        task_start = time.perf_counter()

        def on_batch(epoch, batch, n_batches, loss):  # n_batches: of what the method trains on (replay included)
            if batch == 0:
                progress.end_epoch()
                progress.start_epoch(task.index, epoch, learner.epoch_size)
            progress.batch(loss, min(config.batch_size, learner.epoch_size - batch * config.batch_size))

        try:
            learner.learn(task.x_train, task.y_train, task.classes, on_batch=on_batch)
        finally:
            progress.end_epoch()
        matrix.append(metrics.evaluate_tasks(learner.predict, stream.tasks[:task.index + 1]))
        if args.checkpoint_every == "task":
            if recorder is not None:
                recorder.save(files.snapshots(seed))
            checkpoint.save_learner(files.checkpoint(seed), learner, {
                "seed": seed, "accuracy_matrix": matrix, "wall_time_s": time_before + time.perf_counter() - start})
        progress.line(f"seed {seed} task {task.index + 1}/{len(stream.tasks)} classes {list(task.classes)} "
                      f"({time.perf_counter() - task_start:.1f} s): accuracy "
                      + " ".join(f"{a:.2f}" for a in matrix[-1]) + f" | average {np.mean(matrix[-1]):.2f}")
    if args.checkpoint_every != "task" and recorder is not None:
        recorder.save(files.snapshots(seed))
    size = metrics.model_size(learner.model)
    return {
        "seed": seed,
        "accuracy_matrix": matrix,
        **metrics.run_metrics(matrix),
        "wall_time_s": time_before + time.perf_counter() - start,
        "connections_per_layer": learner.model.connection_counts(),
        "free_neurons_per_layer": [learner.model.neurons[p].n_free for p in learner.model.hidden_positions],
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
    try:
        stream = get_stream(args.task, args.data_dir)
    except (DataError, OSError) as err:  # missing, corrupt or unreachable data: the message says what and where
        raise SystemExit(f"error: {err}") from None
    try:
        network = build_model(stream, args)  # the architecture every seed trains, for the checks and results.json
        config.validate(network, neuron_selection=METHODS[args.method].uses_neuron_selection)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
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
        "config": {**config.to_dict(), "architecture": network.spec(),
                   "hidden": hidden_widths(args), "seeds": list(args.seeds),
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
