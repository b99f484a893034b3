"""The fused MLP training step against the per-layer one on split MNIST, in one process, alternating.

Each round runs one CLI seed in-process, ``spacenet_np.train.main(["--task", "split_mnist", "--seeds", SEED,
"--quiet", "--out", TMP])`` (the paper configuration: 784-400-400-10, batch 128, 4 epochs x 5 tasks), once per
path (``PATHS``): *fused* (the default: an epoch's whole batches in one ``kernels.mlp_train_batches`` call, the
last partial batch by one ``kernels.mlp_train_step`` call; frozen rows' outputs recorded in a task's first epoch
and copied afterwards, ``spacenet_np.frozen``), *fused per batch* (``Learner.fused_batches = False``: one
``mlp_train_step`` call per batch), *fused, frozen rows computed* (``Learner.cache_frozen = False``) and
*per-layer* (``Learner.fused_step = False``: forward, NumPy softmax, backward with ``sgd_update``). Each path goes
first in turn, so that load from other processes falls on all; the medians are reported with the ratio to the
fused path. Timed: the whole ``main`` call, the training loop (``train_epoch``, per batch) and the step kernels'
Python calls (``Learner.train_step`` and ``SparseMLP.train_batches``, per batch).

A last round per path times every kernel call with the useful work it does: the forward pass
``2 * batch * (connections into the rows it computes)``, the input gradient ``2 * batch * (connections of the
CSC view)``, the weight gradient ``2 * batch * (trainable connections)``, in GFLOP/s (the fused kernels: their
whole call, softmax, SGD, copied rows and, for ``mlp_train_batches``, the batches' gathering included in the time,
not in the work).

Run: ``python -m benchmarks.fused_step [--rounds 5] [--seed 0]``. Writes ``results/fused_step.{json,md}``.
"""
if __name__ == "__main__":
    import sys
    if not __package__:  # run as a file: python benchmarks/fused_step.py
        from pathlib import Path
        sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.common import batches_trained, machine_info, reproduce_command, write_results
from spacenet_np import kernels, train
from spacenet_np.network import SparseMLP
from spacenet_np.strategy import Learner


def cli_argv(seed, out):
    return ["--task", "split_mnist", "--seeds", str(seed), "--quiet", "--out", str(out)]


class Timers:
    """Wrappers around ``Learner.train_epoch``, ``Learner.train_step`` and ``SparseMLP.train_batches`` (class
    attributes: the learner's own methods stay Learner's, so the fused paths and the reused input buffer stay on).
    ``batches``: the batches trained, one per ``train_step`` call plus the losses ``train_batches`` returns."""

    TIMED = ((Learner, "train_epoch"), (Learner, "train_step"), (SparseMLP, "train_batches"))

    def __init__(self):
        self.seconds, self.calls = defaultdict(float), defaultdict(int)
        self.batches = 0
        self.saved = {}

    def _wrap(self, name, method):
        timers = self

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                result = method(*args, **kwargs)
                timers.batches += batches_trained(name, result)
                return result
            finally:
                timers.seconds[name] += time.perf_counter() - start
                timers.calls[name] += 1
        return timed

    def install(self):
        for owner, name in self.TIMED:
            self.saved[owner, name] = getattr(owner, name)
            setattr(owner, name, self._wrap(name, self.saved[owner, name]))

    def remove(self):
        for (owner, name), method in self.saved.items():
            setattr(owner, name, method)


def forward_work(args):
    active_rows, indptr, batch = args[0], args[1], args[5].shape[1]
    return 2 * batch * int(np.sum(indptr[active_rows + 1] - indptr[active_rows]))


def fused_work(args):
    """Useful multiply-adds x 2 of one ``mlp_train_step`` call: forward (the rows it computes; rows copied from
    ``FrozenOutputs`` are not work), input gradient, weight gradient."""
    layers, activations = args[0], args[1]
    batch, total = activations[0].shape[1], {"forward": 0, "input_grad": 0, "weight_grad": 0}
    for l, layer in enumerate(layers):
        compute_rows, indptr, col_order, connections = layer[0], layer[1], layer[7], layer[9]
        total["forward"] += 2 * batch * int(np.sum(indptr[compute_rows + 1] - indptr[compute_rows]))
        total["input_grad"] += 2 * batch * col_order.size if l > 0 else 0
        total["weight_grad"] += 2 * batch * connections.size
    return total


def batches_work(args):
    """``fused_work`` of each batch of one ``mlp_train_batches`` call (all of them: the runs do not diverge)."""
    return {part: value * args[-1].shape[0] for part, value in fused_work(args).items()}


WORK = {"csr_forward": forward_work,
        "csc_backward_input": lambda a: 2 * a[4].shape[1] * a[1].size,
        "sampled_weight_grad": lambda a: 2 * a[4].shape[1] * a[0].size}


class KernelMeter:
    """Time and useful work of every call of the MLP kernels (the per-layer ones and ``mlp_train_step``)."""

    def __init__(self):
        self.seconds, self.flops, self.calls = defaultdict(float), defaultdict(int), defaultdict(int)
        self.saved = {}

    def _measured(self, name, kernel, work):
        meter = self

        def measured(*args):
            flops = work(args)
            start = time.perf_counter()
            result = kernel(*args)
            meter.seconds[name] += time.perf_counter() - start
            meter.calls[name] += 1
            if isinstance(flops, dict):
                for part, value in flops.items():
                    meter.flops[f"{name}.{part}"] += value
                meter.flops[name] += sum(flops.values())
            else:
                meter.flops[name] += flops
            return result
        return measured

    def install(self):
        for name, work in WORK.items():
            pair = self.saved[name] = getattr(kernels, name)
            setattr(kernels, name, tuple(self._measured(name, k, work) for k in pair))
        for name, work in (("mlp_train_step", fused_work), ("mlp_train_batches", batches_work)):
            self.saved[name] = getattr(kernels, name)
            setattr(kernels, name, self._measured(name, self.saved[name], work))

    def remove(self):
        for name, value in self.saved.items():
            setattr(kernels, name, value)


PATHS = {"fused": (True, True, True), "fused per batch": (True, True, False),
         "fused, frozen rows computed": (True, False, True), "per-layer": (False, True, True)}


def run_seed(seed, path, instrument):
    """One in-process CLI run on ``path`` (a key of PATHS: ``Learner.fused_step``, ``Learner.cache_frozen``,
    ``Learner.fused_batches``). Returns (seconds of main, results.json run entry)."""
    Learner.fused_step, Learner.cache_frozen, Learner.fused_batches = PATHS[path]
    instrument.install()
    try:
        with tempfile.TemporaryDirectory(prefix="fused_step_") as out, contextlib.redirect_stdout(io.StringIO()):
            start = time.perf_counter()
            code = train.main(cli_argv(seed, out))
            elapsed = time.perf_counter() - start
            run = json.loads((Path(out) / "results.json").read_text())["runs"][0]
    finally:
        instrument.remove()
        Learner.fused_step, Learner.cache_frozen, Learner.fused_batches = True, True, True
    if code != 0:
        raise RuntimeError(f"spacenet_np.train exited with {code}")
    return elapsed, run


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.fused_step", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    machine = machine_info()
    lines = []
    say = lines.append
    paths = list(PATHS)
    for path in paths:  # load the cached kernels and the data once
        run_seed(args.seed, path, Timers())
    rows, accuracy = {path: defaultdict(list) for path in paths}, {}
    for r in range(args.rounds):
        for path in paths[r % len(paths):] + paths[:r % len(paths)]:  # each path first in turn
            timers = Timers()
            elapsed, run = run_seed(args.seed, path, timers)
            batches = timers.batches
            rows[path]["main_s"].append(elapsed)
            rows[path]["seed_s"].append(run["wall_time_s"])
            rows[path]["batch_ms"].append(1e3 * timers.seconds["train_epoch"] / batches)
            rows[path]["step_ms"].append(1e3 * (timers.seconds["train_step"] + timers.seconds["train_batches"])
                                         / batches)
            accuracy[path] = run["final_average_accuracy"]
    say(f"split MNIST seed {args.seed}, {batches} batches, {args.rounds} rounds each (median, min; x: time / "
        "the fused path's)")
    say(f"{'':26s}" + "".join(f"{path:>36s}" for path in paths))
    for key, label in (("main_s", "CLI main (s)"), ("seed_s", "seed wall_time_s (s)"),
                       ("batch_ms", "training loop / batch (ms)"), ("step_ms", "step kernel call / batch (ms)")):
        fused = statistics.median(rows["fused"][key])
        cells = [f"{statistics.median(rows[p][key]):9.3f} ({min(rows[p][key]):6.3f}) "
                 f"{statistics.median(rows[p][key]) / fused:5.2f}x" for p in paths]
        say(f"{label:26s}" + "".join(f"{c:>36s}" for c in cells))
    say("final average accuracy: " + ", ".join(f"{p} {accuracy[p]:.4f} %" for p in paths))
    for path in paths:
        meter = KernelMeter()
        run_seed(args.seed, path, meter)
        say(f"kernels, {path} path (useful GFLOP/s; per training batch: ms, MFLOP; "
            f"csr_forward includes the evaluation's forward passes):")
        for name in sorted(meter.calls):
            gflops, per_batch = meter.flops[name] / meter.seconds[name] / 1e9, 1e3 * meter.seconds[name] / batches
            mflop = meter.flops[name] / batches / 1e6
            say(f"  {name:22s} {gflops:6.2f} GFLOP/s  {per_batch:.4f} ms  {mflop:.2f} MFLOP")
            for part in ("forward", "input_grad", "weight_grad"):
                if f"{name}.{part}" in meter.flops:
                    say(f"    {part:20s} {meter.flops[f'{name}.{part}'] / batches / 1e6:.2f} MFLOP")
    text = "\n".join(lines)
    print(text)
    medians = {path: {k: statistics.median(v) for k, v in rows[path].items()} for path in paths}
    write_results("fused_step", {"rounds": args.rounds, "seed": args.seed, "paths": PATHS, "medians": medians,
                                 "runs": {path: dict(rows[path]) for path in paths},
                                 "final_average_accuracy": accuracy},
                  "# The fused MLP step against the per-layer one (split MNIST, one seed, in-process)\n\n```\n"
                  + text + "\n```", reproduce_command("fused_step", argv), machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
