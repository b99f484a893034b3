"""Profile of a whole split CIFAR-10 run of the paper's CNN: where the time goes, per task and per phase.

One seed runs through ``spacenet_np.experiment.run`` with the CLI's defaults for ``--task split_cifar10`` (the
paper preset: 20 epochs per task, batch 128, lr 0.1; ``--epochs`` shortens it for a quick look). Timers wrap, in
this process only, the layers' ``forward``, ``backward_input``, ``weight_grad`` and ``sgd_step`` (split into the
convolutions and the fully connected layers), the strategy's ``allocate``, ``rewire`` and ``reserve``, the CSR
rebuild of ``_set_connections`` and the evaluation (``predict``). "other training" is the rest of the training
steps: loss, pooling, batch standardization, bias updates and the Python between kernels. Phases are exclusive
except the CSR rebuild, which happens inside allocation, rewiring and the heads' set-aside.

Run: ``SPACENET_DATA=DIR python -m benchmarks.profile_cnn [--method spacenet] [--epochs 20] [--threads 1]``, DIR
holding ``cifar-10-batches-py/``. Writes ``results/profile_cnn_METHOD_tTHREADS[_eEPOCHS].{json,md}``.
"""
if __name__ == "__main__":
    import sys
    if not __package__:  # run as a file: python benchmarks/profile_cnn.py
        from pathlib import Path
        sys.path[0] = str(Path(__file__).resolve().parent.parent)
    from benchmarks.common import limit_threads_from_argv
    limit_threads_from_argv(1)  # before NumPy and Numba are imported

import argparse
import functools
import sys
import time
from collections import defaultdict

from benchmarks.common import machine_info, md_table, reproduce_command, write_results
from spacenet_np import experiment, spacenet, strategy
from spacenet_np.layers import SparseConv2d, SparseLinear

TIMERS = defaultdict(float)  # (task, phase) -> seconds, exclusive of nested timed calls
_stack = []  # [phase, start, nested seconds] of the timed calls in progress
_task = [0]

LAYER_PHASES = ("forward", "backward_input", "weight_grad", "sgd_step")
PHASE_ORDER = ("conv forward", "conv backward_input", "conv weight_grad", "conv sgd_step", "fc forward",
               "fc backward_input", "fc weight_grad", "fc sgd_step", "other training", "allocate", "rewire",
               "reserve", "evaluate", "csr rebuild (inside)")


def timed(phase_of, function):
    """``function`` with its time added to ``TIMERS[(task, phase_of(args))]``, minus the timed calls inside it."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if _stack and _stack[-1][0] == "evaluate":  # evaluation's forward passes count as evaluation
            return function(*args, **kwargs)
        phase = phase_of(args)
        _stack.append([phase, time.perf_counter(), 0.0])
        try:
            return function(*args, **kwargs)
        finally:
            name, start, nested = _stack.pop()
            elapsed = time.perf_counter() - start
            TIMERS[(_task[0], name)] += elapsed - nested
            if _stack:
                _stack[-1][2] += elapsed
    return wrapper


def install_timers():
    """Wrap the phases listed in the module docstring (class attributes, this process only)."""
    for name in LAYER_PHASES:
        for cls in (SparseLinear, SparseConv2d):
            setattr(cls, name, timed(lambda args, n=name: ("conv " if isinstance(args[0], SparseConv2d) else "fc ")
                                     + n, cls.__dict__.get(name, getattr(cls, name))))
    original_rebuild = SparseLinear._set_connections

    def rebuild(self, *args, **kwargs):  # not exclusive: reported inside the phase that called it
        start = time.perf_counter()
        original_rebuild(self, *args, **kwargs)
        TIMERS[(_task[0], "csr rebuild (inside)")] += time.perf_counter() - start
    SparseLinear._set_connections = rebuild
    strategy.Learner.train_epoch = timed(lambda a: "other training", strategy.Learner.train_epoch)
    for name in ("allocate", "rewire", "reserve"):
        setattr(spacenet.SpaceNet, name, timed(lambda a, n=name: n, getattr(spacenet.SpaceNet, name)))
    experiment_predict = strategy.predict
    strategy.predict = timed(lambda a: "evaluate", experiment_predict)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="spacenet")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per task (default: the preset's 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    argv = list(argv) if argv is not None else sys.argv[1:]
    machine = machine_info()
    install_timers()
    config = {} if args.epochs is None else {"epochs": args.epochs}
    spec = experiment.make_spec("split_cifar10", method=args.method, seed=args.seed, config=config,
                                data_dir=args.data_dir)
    task_walls = []
    start = [time.perf_counter()]

    def on_task(learner, matrix):
        task_walls.append(time.perf_counter() - start[0])
        start[0] = time.perf_counter()
        print(f"task {len(matrix)} done in {task_walls[-1]:.1f} s, accuracies {matrix[-1]}", flush=True)
        _task[0] = len(matrix)

    wall = time.perf_counter()
    record = experiment.run(spec, on_task=on_task)
    wall = time.perf_counter() - wall
    n_tasks = len(task_walls)
    per_task = {phase: [TIMERS.get((t, phase), 0.0) for t in range(n_tasks)] for phase in PHASE_ORDER}
    rows = [[phase, *(f"{s:.1f}" for s in per_task[phase]), f"{sum(per_task[phase]):.1f}",
             f"{100 * sum(per_task[phase]) / wall:.1f}"] for phase in PHASE_ORDER]
    rows.append(["task wall", *(f"{s:.1f}" for s in task_walls), f"{sum(task_walls):.1f}", "100.0"])
    epochs = spec["config"]["epochs"]
    md = "\n".join([
        f"# Where a split CIFAR-10 run goes ({args.method}, seed {args.seed}, {epochs} epochs per task, "
        f"{args.threads} thread(s))", "",
        md_table(["phase (s)", *(f"task {t + 1}" for t in range(n_tasks)), "total", "% of run"], rows), "",
        f"Whole run {wall:.1f} s (data loading included); final average accuracy "
        f"{record['final_average_accuracy']:.2f} %. Phases are exclusive except the CSR rebuild, which is part of "
        f"allocate, rewire and the rest."])
    name = f"profile_cnn_{args.method}_t{args.threads}" + ("" if args.epochs is None else f"_e{args.epochs}")
    write_results(name, {"spec": spec, "wall_s": wall, "task_wall_s": task_walls, "per_task_s": per_task,
                         "threads": args.threads, "final_average_accuracy": record["final_average_accuracy"]},
                  md, reproduce_command("profile_cnn", argv), machine)


if __name__ == "__main__":
    main()
