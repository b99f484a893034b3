"""The whole split CIFAR-10 stream: SpaceNet on spacenet_np against the dense im2col + BLAS network, same run.

Both train the paper's CNN (32-32-64-64 convolutions, FC 512, 10 outputs) over the five tasks of split CIFAR-10,
``--epochs`` epochs per task (batch 128, lr 0.1, per-channel standardization) and evaluate on the test images of
every task seen so far after each task:

- ``spacenet``: ``spacenet_np.experiment.run`` with the CLI's paper preset for ``--task split_cifar10`` (only the
  epochs changed): allocation, training, rewiring, reservation, evaluation;
- ``dense``: ``benchmarks.cnn_reference.DenseCNN``, every weight present and trained (plain SGD, fine-tuning),
  evaluated in batches of 128 (its im2col buffers grow with the batch).

A SpaceNet epoch costs more in later tasks (every task adds kernels) while a dense epoch costs the same in every
task; both costs depend on the task, not on the epoch, so the ratio at a few epochs per task is the ratio of the
full 20-epoch stream up to the share of evaluation, which is larger at fewer epochs. The two run one after the
other in this process, with the same threads.

Run: ``SPACENET_DATA=DIR python -m benchmarks.cnn_stream [--epochs 2] [--threads 2]``, DIR holding
``cifar-10-batches-py/``. Writes ``results/cnn_stream_tTHREADS_eEPOCHS.{json,md}``.
"""
if __name__ == "__main__":
    import sys
    if not __package__:  # run as a file: python benchmarks/cnn_stream.py
        from pathlib import Path
        sys.path[0] = str(Path(__file__).resolve().parent.parent)
    from benchmarks.common import limit_threads_from_argv
    limit_threads_from_argv(2)  # before NumPy and Numba are imported

import argparse
import sys
import time

import numpy as np

from benchmarks.cnn_reference import DenseCNN
from benchmarks.common import machine_info, md_table, reproduce_command, write_results
from spacenet_np import experiment
from spacenet_np.network import standardize_batch
from spacenet_np.streams import split_cifar10

EVAL_BATCH = 128


def spacenet_stream(epochs, seed, data_dir):
    """Seconds per task (training + evaluation) of a SpaceNet run, and its final average accuracy."""
    spec = experiment.make_spec("split_cifar10", seed=seed, config={"epochs": epochs}, data_dir=data_dir)
    stamps = [time.perf_counter()]
    record = experiment.run(spec, on_task=lambda learner, matrix: stamps.append(time.perf_counter()))
    return np.diff(stamps).tolist(), record["final_average_accuracy"], spec["config"]["lr"]


def dense_accuracy(net, task, stream):
    """Test accuracy (%) of the dense network on ``task``, predicting among every class seen so far."""
    correct = 0
    for first in range(0, task.x_test.shape[0], EVAL_BATCH):
        ids = np.arange(first, min(first + EVAL_BATCH, task.x_test.shape[0]))
        x = standardize_batch(task.x_test, ids, stream.feature_mean, stream.feature_std)
        correct += int(np.sum(net.forward(x)[0].argmax(axis=0) == task.y_test[ids]))
    return 100.0 * correct / task.x_test.shape[0]


def dense_stream(stream, epochs, seed, lr):
    """Seconds per task (training + evaluation) of the dense network fine-tuned over the stream, its final average
    accuracy, and the task in which its loss first became NaN or infinite (None if never)."""
    net = DenseCNN(stream.image_shape, (32, 32, 64, 64), (512,), stream.n_classes, seed=seed)
    rng = np.random.default_rng(seed)
    seconds, accuracies, diverged = [], [], None
    for t, task in enumerate(stream.tasks):
        start = time.perf_counter()
        for _ in range(epochs):
            order = rng.permutation(task.x_train.shape[0])
            for first in range(0, order.size, 128):
                ids = order[first:first + 128]
                x = standardize_batch(task.x_train, ids, stream.feature_mean, stream.feature_std)
                loss = net.train_step(x, task.y_train[ids], lr)
                if not np.isfinite(loss) and diverged is None:
                    diverged = t + 1
        accuracies = [dense_accuracy(net, seen, stream) for seen in stream.tasks[:t + 1]]
        seconds.append(time.perf_counter() - start)
        print(f"dense task {t + 1}: {seconds[-1]:.1f} s", flush=True)
    return seconds, float(np.mean(accuracies)), diverged


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs per task (the paper: 20)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    argv = list(argv) if argv is not None else sys.argv[1:]
    machine = machine_info()
    stream = split_cifar10(args.data_dir)
    spacenet_stream(1, args.seed, args.data_dir)  # load or compile the kernels outside the timed run
    sparse_s, sparse_acc, lr = spacenet_stream(args.epochs, args.seed, args.data_dir)
    print(f"spacenet: {sum(sparse_s):.1f} s", flush=True)
    dense_s, dense_acc, diverged = dense_stream(stream, args.epochs, args.seed, lr)
    ratio = sum(dense_s) / sum(sparse_s)
    rows = [[name, *(f"{s:.1f}" for s in per_task), f"{sum(per_task):.1f}", f"{acc:.2f}"]
            for name, per_task, acc in (("spacenet", sparse_s, sparse_acc), ("dense", dense_s, dense_acc))]
    md = "\n".join([
        f"# The split CIFAR-10 stream, {args.epochs} epoch(s) per task, {args.threads} thread(s)", "",
        md_table(["implementation", *(f"task {t + 1} s" for t in range(len(sparse_s))), "stream s",
                  "final avg accuracy %"], rows), "",
        f"dense / spacenet = **{ratio:.2f}x** (target >= 3). Seconds per task include training and the evaluation "
        f"on the test images of every task seen so far. The dense network is fine-tuned (no continual-learning "
        f"method), so its accuracy is not comparable; it is the cost of training every weight."
        + ("" if diverged is None else f" Its loss diverged (NaN) in task {diverged} at lr {lr}; it kept "
                                       f"computing at the same cost per task.")])
    write_results(f"cnn_stream_t{args.threads}_e{args.epochs}",
                  {"epochs": args.epochs, "threads": args.threads, "seed": args.seed,
                   "spacenet_task_s": sparse_s, "dense_task_s": dense_s, "ratio_dense_over_spacenet": ratio,
                   "spacenet_final_average_accuracy": sparse_acc, "dense_final_average_accuracy": dense_acc,
                   "dense_diverged_in_task": diverged},
                  md, reproduce_command("cnn_stream", argv), machine)


if __name__ == "__main__":
    main()
