"""A dense-masked NumPy implementation of SpaceNet: the reference that spacenet_np is benchmarked against.

It follows the approach of the official (PyTorch) SpaceNet code, on NumPy:

- every layer is a dense float32 weight matrix ``W[l]`` of shape (fan_out, fan_in), as ``torch.nn.Linear``, with a
  dense float32 mask of the current task's connections (``mask``), a dense boolean mask of every task's
  connections (``occupied``, the official ``mask + previous_mask``) and a dense float32 importance matrix
  (``omega``, Eq. 3); absent connections are stored as zeros;
- activations are batch-major ``(batch, neurons)``; forward and backward are dense matmuls (BLAS), the weight
  gradient is the full dense ``delta.T @ h`` multiplied by the task mask;
- allocation, drop and grow work on whole dense matrices: candidate positions are found with ``flatnonzero`` over
  a dense mask, drop is ``argpartition`` of the importance with ``+inf`` outside the task's connections, grow is
  ``argpartition`` of the dense ``G = a_l a_{l-1}^T`` with ``-inf`` at forbidden positions.

The algorithmic choices are those of spacenet_np (see the docstring of ``spacenet_np/spacenet.py``): neuron
importance is paper Eq. 4 on the current task's Omega, computed once per rewiring before any layer drops; a
connection dropped in a rewiring is not grown back in that rewiring unless the selected block has too few other
empty positions to keep the task's connection count (then the best just-dropped positions are regrown); grown
connections start at weight 0 and Omega 0; only hidden layers are rewired (not the output layer); biases of free
hidden neurons and of the current task's classes are trained; old output heads are set aside while a task trains
and restored after it; predictions are restricted to the classes learned so far; allocated weights are
Xavier-uniform over the full layer shape; plain SGD. Ties among equal importances may be broken differently
from spacenet_np (``argpartition`` here, a stable sort there), and the random draws differ, so the two agree in
distribution, not run by run.

Memory is O(sum of fan_in * fan_out): see :func:`estimate_peak_bytes`. This module is a benchmark reference only;
it is not part of the spacenet_np package.

CLI (same shape as ``python -m spacenet_np.train``):
``python -m benchmarks.dense_reference --task split_mnist --hidden 400 400 --seeds 0 --quiet --out DIR``
"""
if __name__ == "__main__" and not __package__:  # run as a file: python benchmarks/dense_reference.py
    import sys
    from pathlib import Path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from spacenet_np import metrics
from spacenet_np.fileio import atomic_write_json
from spacenet_np.process import run_main
from spacenet_np.spacenet import SpaceNetConfig
from spacenet_np.streams import STREAMS, get_stream

# Bytes per matrix entry: W, omega, mask (float32), occupied (bool), the gradient and a scratch buffer (float32) in
# every layer; at the peak (the grow phase of a rewiring, in the largest layer) also the score G (float64), its
# negated copy for argpartition (float64), the argpartition indices (int64), two boolean masks and the masked Omega
# of the neuron importance (float32). Checked against the measured peak RSS at width 4000 (about 10 % under).
BYTES_PER_ENTRY_TRAINING = 4 + 4 + 4 + 1 + 4 + 4
BYTES_PER_ENTRY_REWIRING = 8 + 8 + 8 + 1 + 1 + 4
BASE_PROCESS_BYTES = 200 * 2**20  # interpreter, NumPy/SciPy, the MNIST arrays


def estimate_peak_bytes(sizes, batch=128):
    """Estimated peak RSS of a dense run for layer ``sizes`` (input, hidden..., output), in bytes."""
    entries = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
    activations = 4 * batch * sum(sizes) * 3 + 4 * 1000 * sum(sizes)  # training + 1000-sample evaluation batches
    return (BASE_PROCESS_BYTES + BYTES_PER_ENTRY_TRAINING * sum(entries) + BYTES_PER_ENTRY_REWIRING * max(entries)
            + activations)


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy and dL/dlogits for batch-major logits (batch, classes). Returns (loss, delta float32)."""
    batch = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sum_exp = exp.sum(axis=1, keepdims=True)
    rows = np.arange(batch)
    loss = float(np.mean(np.log(sum_exp[:, 0]) - shifted[rows, labels]))
    delta = exp / sum_exp
    delta[rows, labels] -= 1.0
    delta /= batch
    return loss, delta.astype(np.float32, copy=False)


class DenseSpaceNet:
    """SpaceNet (Algorithms 1-4) on dense masked matrices. Same interface as spacenet_np's ``SpaceNet``:
    ``learn(images, labels, classes, on_batch=None, on_epoch=None)`` and ``predict(images)``."""

    def __init__(self, sizes, config=None, seed=0, input_mean=0.0, input_std=1.0):
        self.sizes = [int(s) for s in sizes]
        self.config = config or SpaceNetConfig()
        self.rng = np.random.default_rng(seed)
        self.scale = np.float32(1.0 / (255.0 * input_std))
        self.shift = np.float32(-input_mean / input_std)
        shapes = [(b, a) for a, b in zip(self.sizes[:-1], self.sizes[1:])]  # (fan_out, fan_in)
        self.W = [np.zeros(s, np.float32) for s in shapes]
        self.b = [np.zeros(s[0], np.float32) for s in shapes]
        self.omega = [np.zeros(s, np.float32) for s in shapes]
        self.mask = [np.zeros(s, np.float32) for s in shapes]
        self.occupied = [np.zeros(s, bool) for s in shapes]
        self.grad = [np.empty(s, np.float32) for s in shapes]
        self.scratch = [np.empty(s, np.float32) for s in shapes]
        self.free = [np.ones(h, bool) for h in self.sizes[1:-1]]  # h_l^free of the hidden layers
        self.known_classes = np.zeros(self.sizes[-1], bool)
        self.tasks_learned = 0
        self.selected = []
        self.bias_trainable = []

    @property
    def n_layers(self):
        return len(self.W)

    # ----- Algorithm 1 -----
    def learn(self, images, labels, classes, on_batch=None, on_epoch=None):
        classes = np.unique(np.asarray(classes, dtype=np.int64))
        labels = np.asarray(labels, dtype=np.int64)
        self.allocate(classes)
        # Algorithm 1, lines 14-15: the old heads leave the output layer while this task trains.
        old_heads = self.occupied[-1] & (self.mask[-1] == 0)
        saved = self.W[-1][old_heads]
        self.W[-1][old_heads] = 0.0
        self.bias_trainable = [f.astype(np.float32) for f in self.free]
        out_mask = np.zeros(self.sizes[-1], np.float32)
        out_mask[classes] = 1.0
        self.bias_trainable.append(out_mask)
        try:
            for epoch in range(self.config.epochs):
                self.train_epoch(images, labels, on_batch, epoch)
                if self.config.rewire and epoch < self.config.epochs - 1:
                    self.rewire()
                if on_epoch is not None:
                    on_epoch(epoch)
            self.reserve()
        finally:
            self.W[-1][old_heads] = saved
        self.tasks_learned += 1
        self.known_classes[classes] = True

    # ----- Algorithm 2 -----
    def allocate(self, classes):
        """Select free neurons, then place random connections in the empty positions between them."""
        cfg = self.config
        selected = [np.arange(self.sizes[0])]
        for h, free in enumerate(self.free):
            selected.append(np.sort(self.rng.choice(np.flatnonzero(free), size=cfg.selected_neurons[h],
                                                    replace=False)))
        selected.append(classes)
        self.selected = selected
        for l in range(self.n_layers):
            fan_out, fan_in = self.W[l].shape
            rows = np.zeros(fan_out, bool)
            rows[selected[l + 1]] = True
            cols = np.zeros(fan_in, bool)
            cols[selected[l]] = True
            candidates = np.flatnonzero(~self.occupied[l] & np.outer(rows, cols))
            chosen = self.rng.choice(candidates, size=cfg.connections_per_task[l], replace=False)
            bound = np.sqrt(6.0 / (fan_in + fan_out))  # Xavier-uniform over the full layer shape
            self.mask[l].fill(0.0)
            self.mask[l].flat[chosen] = 1.0
            self.occupied[l].flat[chosen] = True
            self.W[l].flat[chosen] = self.rng.uniform(-bound, bound, size=chosen.size).astype(np.float32)
            self.omega[l].flat[chosen] = 0.0

    # ----- Algorithm 3 -----
    def standardize(self, images, ids):
        """uint8 rows ``images[ids]`` to standardized float32 (batch, features)."""
        x = images[ids].astype(np.float32)
        x *= self.scale
        x += self.shift
        return x

    def train_epoch(self, images, labels, on_batch, epoch):
        order = self.rng.permutation(images.shape[0])
        for start in range(0, order.size, self.config.batch_size):
            ids = order[start:start + self.config.batch_size]
            loss = self.train_step(self.standardize(images, ids), labels[ids])
            if not np.isfinite(loss):
                raise FloatingPointError(f"training loss {loss} in task {self.tasks_learned}, epoch {epoch}")
            if on_batch is not None:
                on_batch(epoch, loss)

    def forward(self, x):
        """Activations of every layer for x (batch, features); logits last."""
        h = [x]
        last = self.n_layers - 1
        for l in range(self.n_layers):
            z = h[-1] @ self.W[l].T
            z += self.b[l]
            if l < last:
                np.maximum(z, 0.0, out=z)
            h.append(z)
        return h

    def train_step(self, x, labels):
        """Dense forward, backward with masked gradients, SGD and Omega (Eq. 3) for one batch. Returns the loss."""
        h = self.forward(x)
        loss, delta = softmax_cross_entropy(h[-1], labels)
        lr = np.float32(self.config.lr)
        for l in range(self.n_layers - 1, -1, -1):
            grad, scratch = self.grad[l], self.scratch[l]
            np.matmul(delta.T, h[l], out=grad)           # dense dL/dW
            bias_grad = delta.sum(axis=0)
            below = None
            if l > 0:                                     # input gradient with the weights before this update
                below = delta @ self.W[l]
                below *= h[l] > 0
            grad *= self.mask[l]                          # only the current task's connections learn
            np.multiply(grad, grad, out=scratch)          # |I| = |dW * g| = lr * g^2
            scratch *= lr
            self.omega[l] += scratch
            grad *= lr
            self.W[l] -= grad
            self.b[l] -= lr * bias_grad * self.bias_trainable[l]
            delta = below
        return loss

    def neuron_importance(self):
        """Eq. 4 per neuron layer from the current task's Omega: ingoing sums, outgoing for the input layer."""
        current = [np.multiply(o, m) for o, m in zip(self.omega, self.mask)]
        importance = [current[0].sum(axis=0, dtype=np.float64)]
        importance += [c.sum(axis=1, dtype=np.float64) for c in current]
        return importance

    def rewire(self):
        """Drop the fraction r of least important task connections per hidden layer, grow as many by G."""
        importance = self.neuron_importance()
        for l in range(self.n_layers - 1):
            fan_out, fan_in = self.W[l].shape
            free_before_drop = ~self.occupied[l]
            # drop
            mine = self.mask[l] > 0
            count = int(self.config.rewire_ratio * int(mine.sum()))
            if count == 0:
                continue
            key = np.where(mine, self.omega[l], np.float32(np.inf)).ravel()
            dropped = np.argpartition(key, count - 1)[:count]
            del key
            for array, value in ((self.W[l], 0.0), (self.mask[l], 0.0), (self.omega[l], 0.0),
                                 (self.occupied[l], False)):
                array.flat[dropped] = value
            # grow at the empty (before the drop) positions between selected neurons with the largest G
            rows = np.zeros(fan_out, bool)
            rows[self.selected[l + 1]] = True
            cols = np.zeros(fan_in, bool)
            cols[self.selected[l]] = True
            allowed = free_before_drop & np.outer(rows, cols)
            del free_before_drop
            score = np.outer(importance[l + 1], importance[l])
            score[~allowed] = -np.inf
            fresh = min(count, int(allowed.sum()))
            del allowed
            grown = np.argpartition(-score.ravel(), fresh - 1)[:fresh] if fresh else np.zeros(0, np.int64)
            del score
            if fresh < count:  # too few fresh positions in the block: regrow the best just-dropped ones
                refill_score = importance[l + 1][dropped // fan_in] * importance[l][dropped % fan_in]
                refill = dropped[np.argsort(-refill_score, kind="stable")[:count - fresh]]
                grown = np.concatenate([grown, refill])
            for array, value in ((self.W[l], 0.0), (self.mask[l], 1.0), (self.omega[l], 0.0),
                                 (self.occupied[l], True)):
                array.flat[grown] = value

    # ----- Algorithm 4 -----
    def reserve(self):
        """The spec most important selected neurons of each hidden layer leave the free list."""
        importance = self.neuron_importance()
        for h, free in enumerate(self.free):
            selected = self.selected[h + 1]
            order = np.argsort(-importance[h + 1][selected], kind="stable")
            free[selected[order[:self.config.reserved_neurons[h]]]] = False

    # ----- inference -----
    def predict(self, images, batch_size=1000):
        """Predicted class per sample, among the classes learned so far. images (n, features) uint8."""
        predictions = np.empty(images.shape[0], dtype=np.int64)
        for start in range(0, images.shape[0], batch_size):
            ids = np.arange(start, min(start + batch_size, images.shape[0]))
            logits = self.forward(self.standardize(images, ids))[-1]
            if self.known_classes.any():
                logits = np.where(self.known_classes[None, :], logits, -np.inf)
            predictions[ids] = logits.argmax(axis=1)
        return predictions

    def connection_counts(self):
        return [int(o.sum()) for o in self.occupied]


def default_config(hidden):
    """The paper's configuration for ``hidden`` layers (middle connection count repeated for deeper nets)."""
    n = len(hidden)
    return SpaceNetConfig(connections_per_task=tuple([10000] + [1640] * (n - 1) + [80]),
                       selected_neurons=tuple([80] * n), reserved_neurons=tuple([40] * n))


def run_seed(stream, hidden, seed, config=None, quiet=True):
    """Train one dense model over the stream; returns an entry like spacenet_np.train's results.json runs."""
    config = config or default_config(hidden)
    start = time.perf_counter()
    learner = DenseSpaceNet([stream.n_features, *hidden, stream.n_classes], config, seed=seed,
                            input_mean=stream.mean, input_std=stream.std)
    matrix = []
    for task in stream.tasks:
        task_start = time.perf_counter()
        learner.learn(task.x_train, task.y_train, task.classes)
        matrix.append(metrics.evaluate_tasks(learner.predict, stream.tasks[:task.index + 1]))
        if not quiet:
            print(f"seed {seed} task {task.index + 1}/{len(stream.tasks)} ({time.perf_counter() - task_start:.1f} s)"
                  f": accuracy " + " ".join(f"{a:.2f}" for a in matrix[-1]), flush=True)
    return {"seed": seed, "accuracy_matrix": matrix, "final_average_accuracy": metrics.final_average_accuracy(matrix),
            "wall_time_s": time.perf_counter() - start, "connections_per_layer": learner.connection_counts(),
            "free_neurons_per_layer": [int(f.sum()) for f in learner.free]}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.dense_reference", description=__doc__.splitlines()[0])
    p.add_argument("--task", default="split_mnist", choices=sorted(STREAMS))
    p.add_argument("--hidden", type=int, nargs="+", default=[400, 400])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="folder for results.json (default: runs/TASK-dense)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--estimate-memory", action="store_true", help="print the estimated peak memory and exit")
    args = p.parse_args(argv)
    sizes = [784, *args.hidden, 10]
    if args.estimate_memory:
        print(f"estimated peak memory for sizes {sizes}: {estimate_peak_bytes(sizes) / 2**30:.2f} GiB")
        return 0
    stream = get_stream(args.task, args.data_dir)
    config = default_config(args.hidden)
    runs = [run_seed(stream, args.hidden, seed, config, quiet=args.quiet) for seed in args.seeds]
    for run in runs:
        print(f"seed {run['seed']}: final average accuracy {run['final_average_accuracy']:.2f} % "
              f"({run['wall_time_s']:.1f} s)", flush=True)
    finals = [r["final_average_accuracy"] for r in runs]
    out_dir = Path(args.out or f"runs/{args.task}-dense")
    atomic_write_json(out_dir / "results.json", {
        "task": args.task, "method": "dense_reference",
        "config": {**config.to_dict(), "hidden": list(args.hidden), "seeds": list(args.seeds),
                   "input_mean": stream.mean, "input_std": stream.std},
        "runs": runs, "mean_final_average_accuracy": float(np.mean(finals)),
        "std_final_average_accuracy": float(np.std(finals))})
    print(f"{args.task} dense reference: final average accuracy {np.mean(finals):.2f} +/- {np.std(finals):.2f} % "
          f"over {len(finals)} seed(s); results in {out_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    run_main(main)  # as the spacenet_np CLIs run: the same process exit for both implementations
