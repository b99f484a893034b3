"""One epoch of the first split CIFAR-10 task: SpaceNet on spacenet_np against the dense im2col + BLAS network.

Both train the paper's CNN (32-32-64-64 convolutions, FC 512, 10 outputs; ``--width wide`` for 64-64-128-128) on
the 10,000 training images of task 1 (airplane, automobile), batch 128, per-channel standardization, in this
process:

- ``spacenet``: a fresh ``SpaceNet`` learner with the CLI's CNN defaults (12 % of each layer per task, lr 0.1,
  every free map selected): allocation, one epoch of SGD and the rewiring that ends the epoch;
- ``dense``: ``benchmarks.cnn_reference.DenseCNN``, every weight present, one epoch of plain SGD through
  im2col + ``np.matmul`` (no masks, so a lower bound for a dense-masked implementation).

The two alternate for ``--rounds`` rounds (fresh models each round, the same images and batch order), and the
report gives the median epoch time of each, images per second and the ratio spacenet / dense.

Run: ``SPACENET_DATA=DIR python -m benchmarks.cnn_epoch`` where DIR holds ``cifar-10-batches-py/`` (about 2-3
minutes on 2 idle cores).
"""
if __name__ == "__main__" and not __package__:  # run as a file: python benchmarks/cnn_epoch.py
    import sys
    from pathlib import Path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import statistics
import sys
import time

import numpy as np

from benchmarks.cnn_reference import DenseCNN
from benchmarks.common import machine_info, md_table, reproduce_command, write_results
from spacenet_np.experiment import build_config, make_spec
from spacenet_np.network import SparseCNN, standardize_batch
from spacenet_np.presets import CNN_WIDTHS
from spacenet_np.spacenet import SpaceNet
from spacenet_np.streams import split_cifar10


def spacenet_epoch(stream, task, width, seed):
    """Seconds for allocation + one epoch + the rewiring of a fresh SpaceNet learner on ``task``; its loss."""
    config = build_config(make_spec("split_cifar10", width=width))  # the CLI's paper preset
    model = SparseCNN(stream.image_shape, CNN_WIDTHS[width], (512,), stream.n_classes)
    learner = SpaceNet(model, config, seed=seed, input_mean=stream.feature_mean, input_std=stream.feature_std)
    losses = []
    start = time.perf_counter()
    state = learner.begin_task(np.asarray(task.classes))
    learner.train_epoch(state, task.x_train, task.y_train, 0, lambda e, b, n, loss: losses.append(loss))
    learner.end_epoch(state, 0)
    elapsed = time.perf_counter() - start
    learner.finish_task(state)
    return elapsed, float(np.mean(losses[-10:])), config


def dense_epoch(stream, task, width, seed, lr):
    """Seconds for one epoch of the dense network on ``task`` (same batch size and order rule); its loss."""
    net = DenseCNN(stream.image_shape, CNN_WIDTHS[width], (512,), stream.n_classes, seed=seed)
    order = np.random.default_rng(seed).permutation(task.x_train.shape[0])
    losses = []
    start = time.perf_counter()
    for first in range(0, order.size, 128):
        ids = order[first:first + 128]
        x = standardize_batch(task.x_train, ids, stream.feature_mean, stream.feature_std)
        losses.append(net.train_step(x, task.y_train[ids], lr))
    return time.perf_counter() - start, float(np.mean(losses[-10:]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", default="standard", choices=sorted(CNN_WIDTHS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    argv = list(argv) if argv is not None else sys.argv[1:]
    machine = machine_info()
    stream = split_cifar10(args.data_dir)
    task = stream.tasks[0]
    spacenet_epoch(stream, task, args.width, 0)  # compile the kernels outside the timed rounds
    times = {"spacenet": [], "dense": []}
    losses = {"spacenet": [], "dense": []}
    config = None
    for r in range(args.rounds):
        seconds, loss, config = spacenet_epoch(stream, task, args.width, r)
        times["spacenet"].append(seconds)
        losses["spacenet"].append(loss)
        seconds, loss = dense_epoch(stream, task, args.width, r, config.lr)
        times["dense"].append(seconds)
        losses["dense"].append(loss)
        print(f"round {r + 1}: spacenet {times['spacenet'][-1]:.1f} s, dense {times['dense'][-1]:.1f} s",
              flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    n = task.x_train.shape[0]
    ratio = median["spacenet"] / median["dense"]
    rows = [[k, f"{median[k]:.1f}", f"{n / median[k]:.0f}", " ".join(f"{t:.1f}" for t in times[k]),
             f"{np.mean(losses[k]):.3f}"] for k in ("spacenet", "dense")]
    md = "\n".join([
        f"# One epoch of split CIFAR-10 task 1 ({args.width} CNN, {n} images, batch 128)", "",
        md_table(["implementation", "median epoch s", "images/s", "epochs s", "last-10-batch loss"], rows), "",
        f"spacenet / dense = **{ratio:.2f}** (target <= 2). SpaceNet's epoch includes the allocation and the "
        f"rewiring after the epoch; the dense network trains every weight with im2col + BLAS."])
    name = "cnn_epoch" + ("" if args.width == "standard" else f"_{args.width}")
    write_results(name, {"width": args.width, "images": n, "times_s": times, "median_s": median,
                         "ratio_spacenet_over_dense": ratio, "losses": losses, "config": config.to_dict()},
                  md, reproduce_command("cnn_epoch", argv), machine)


if __name__ == "__main__":
    main()
