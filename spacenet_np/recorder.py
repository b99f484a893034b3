"""Snapshots for the report's analysis figures (paper Figs. 4-6), recorded by a learner observer.

``Recorder`` is attached with ``learner.observers.append(recorder)``. The learner calls it at
``task_begin`` (the task's connections are allocated, nothing trained yet) and at ``task_end`` (training and
reservation done, the output heads restored). It keeps only small integer/float arrays, never a copy of a
weight matrix:

- per task, at begin and end: the (out neuron id, in neuron id) pairs of the task's connections in one layer
  (``pair_layer``, the hidden-to-hidden layer 1 by default; Fig. 5), and the number of the task's layer-0
  connections per input pixel (Fig. 6);
- per task, at end: per hidden layer the neurons reserved, shared (have a slot, not reserved) and unused (no
  slot), and the width;
- per task, at end: the hidden activations of fixed probe samples, for the neurons that have slots (Fig. 4),
  computed from the weights (``learner.input_batch``, then ReLU(W x + b) per layer), not read from the
  forward pass's buffers.

"The task's connections" are those whose ``owner`` is ``state.task``; only ``state.task``, ``state.classes``,
the model and ``learner.input_batch`` are used, so the recorder works for every ``Learner``. Recording
neither draws from the learner's generator nor changes the network, so a run gives the same numbers with or
without it.

``save(path)`` writes one ``.npz`` (no pickle) atomically; ``Recorder.load(path)`` reads it back.
"""
import io
import re

import numpy as np

from .fileio import atomic_write_encoded, signals_deferred
from .layers import FREE

STATUS_COLUMNS = ("width", "reserved", "shared", "unused")
WHEN = ("begin", "end")


def probe_set(tasks, per_task=20, seed=0):
    """Fixed probe samples from the test sets: ``per_task`` per task, split evenly over its classes.

    ``tasks`` are stream tasks (``x_test``, ``y_test``, ``classes``). Samples are drawn with their own
    generator (``seed``), so the choice does not depend on the run. Returns (images (n, n_features) uint8,
    labels (n,) int64), grouped by task and then by class.
    """
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for task in tasks:
        classes = list(task.classes)
        counts = [per_task // len(classes) + (i < per_task % len(classes)) for i in range(len(classes))]
        y = np.asarray(task.y_test)
        for c, k in zip(classes, counts):
            ids = np.flatnonzero(y == c)
            ids = np.sort(rng.choice(ids, size=min(k, ids.size), replace=False))
            images.append(np.asarray(task.x_test)[ids])
            labels.append(y[ids].astype(np.int64))
    if not images:
        return np.zeros((0, 0), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(images), np.concatenate(labels)


class Recorder:
    """A learner observer that records what the analysis figures need, as small arrays keyed by task.

    ``probe_images`` (n, n_features) uint8 (or standardized float) and ``probe_labels`` (n,) are the samples
    whose hidden activations are recorded after each task (none if not given). ``pair_layer`` is the layer
    whose connection pairs are kept (default 1, hidden-to-hidden; the last layer if the network is shallower).
    At most ``max_pairs`` pairs are kept per snapshot (a fixed-seed subsample beyond that); the exact totals
    and numbers of distinct neurons are kept anyway. ``probe_batch`` bounds the forward batch.
    """

    def __init__(self, probe_images=None, probe_labels=None, pair_layer=1, max_pairs=20000, probe_batch=500):
        if (probe_images is None) != (probe_labels is None):
            raise ValueError("give probe_images and probe_labels together")
        if probe_images is not None:
            probe_images = np.asarray(probe_images)
            probe_labels = np.asarray(probe_labels, dtype=np.int64)
            if probe_images.ndim != 2 or probe_labels.shape != (probe_images.shape[0],):
                raise ValueError(f"probe_images must be (n, n_features) and probe_labels (n,), got "
                                 f"{probe_images.shape} and {probe_labels.shape}")
        self.probe_images = probe_images
        self.probe_labels = probe_labels
        self.pair_layer = int(pair_layer)
        self.max_pairs = int(max_pairs)
        self.probe_batch = int(probe_batch)
        self.arrays = {}
        if probe_labels is not None:
            self.arrays["probe_labels"] = probe_labels.copy()

    # ----- observer interface -----
    def task_begin(self, learner, state):
        self._header(learner)
        self._record_connections(learner.model, state.task, "begin")
        self.arrays[f"t{state.task}_classes"] = np.asarray(state.classes, dtype=np.int64).copy()

    def task_end(self, learner, state):
        self._header(learner)
        model, task = learner.model, state.task
        self._record_connections(model, task, "end")
        self.arrays[f"t{task}_classes"] = np.asarray(state.classes, dtype=np.int64).copy()
        self.arrays[f"t{task}_status"] = neuron_status(model)
        if self.probe_images is not None and self.probe_images.shape[0] > 0:
            self._record_activations(learner, task)
        tasks = set(self.tasks) | {task}
        self.arrays["tasks"] = np.array(sorted(tasks), dtype=np.int64)

    # ----- recording -----
    def _header(self, learner):
        if "sizes" in self.arrays:
            return
        model = learner.model
        self.arrays["sizes"] = np.asarray(model.sizes, dtype=np.int64)
        self.arrays["method"] = np.array(str(getattr(learner, "name", type(learner).__name__)))
        self.arrays["pair_layer"] = np.array(min(self.pair_layer, len(model.layers) - 1), dtype=np.int64)
        self.arrays.setdefault("tasks", np.zeros(0, dtype=np.int64))

    def _record_connections(self, model, task, when):
        l = int(self.arrays["pair_layer"])
        layer = model.layers[l]
        mine = layer.owner == task
        out_ids = model.neurons[l + 1].slot_ids[layer.rows[mine]]
        in_ids = model.neurons[l].slot_ids[layer.indices[mine]]
        pairs = np.stack([out_ids, in_ids], axis=1).astype(np.int64)
        # exact totals: connections, distinct out neurons, distinct in neurons
        self.arrays[f"t{task}_{when}_touched"] = np.array(
            [pairs.shape[0], np.unique(out_ids).size, np.unique(in_ids).size], dtype=np.int64)
        if pairs.shape[0] > self.max_pairs:
            keep = np.sort(np.random.default_rng(task).choice(pairs.shape[0], self.max_pairs, replace=False))
            pairs = pairs[keep]
        dtype = np.int32 if max(model.sizes[l], model.sizes[l + 1]) < 2**31 else np.int64
        self.arrays[f"t{task}_{when}_pairs"] = pairs.astype(dtype)
        first = model.layers[0]
        pixels = model.neurons[0].slot_ids[first.indices[first.owner == task]]
        counts = np.bincount(pixels, minlength=model.n_features)
        self.arrays[f"t{task}_{when}_pixels"] = counts.astype(np.int32)

    def _record_activations(self, learner, task):
        """ReLU(W x + b) of every slotted hidden neuron, computed with SciPy rather than ``model.forward``:
        the forward pass skips neurons that do not reach the output and reuses its buffers, so its rows for
        those neurons are zeros or stale values, not their activations."""
        model = learner.model
        n = self.probe_images.shape[0]
        hidden = [[] for _ in model.neurons[1:-1]]
        for start in range(0, n, self.probe_batch):
            x = learner.input_batch(self.probe_images, np.arange(start, min(start + self.probe_batch, n)))
            for h, layer in enumerate(model.layers[:-1]):
                x = np.maximum(layer.W @ x + layer.bias[:, None], 0.0).astype(np.float32)
                hidden[h].append(x)
        # kept here too, so that a recorder loaded from a file and given probes saves them
        self.arrays["probe_labels"] = np.asarray(self.probe_labels, dtype=np.int64).copy()
        for h, neurons in enumerate(model.neurons[1:-1]):
            self.arrays[f"t{task}_act{h}"] = np.concatenate(hidden[h], axis=1)
            self.arrays[f"t{task}_act{h}_ids"] = neurons.slot_ids.astype(np.int64).copy()
            self.arrays[f"t{task}_act{h}_reserved_by"] = neurons.reserved_by.astype(np.int16).copy()

    # ----- reading -----
    @property
    def tasks(self):
        """The tasks recorded at their end, sorted. Returns a list of ints."""
        return [int(t) for t in self.arrays.get("tasks", [])]

    @property
    def method(self):
        return str(self.arrays["method"]) if "method" in self.arrays else None

    @property
    def sizes(self):
        return [int(s) for s in self.arrays["sizes"]] if "sizes" in self.arrays else None

    def has(self, key):
        return key in self.arrays

    def classes(self, task):
        return self.arrays[f"t{task}_classes"]

    def pairs(self, task, when="end"):
        """(m, 2) int array of (out neuron id, in neuron id) of ``task``'s connections in ``pair_layer``."""
        return self.arrays[f"t{task}_{_when(when)}_pairs"]

    def touched(self, task, when="end"):
        """Exact (connections, distinct out neurons, distinct in neurons) of ``task`` in ``pair_layer``."""
        return tuple(int(v) for v in self.arrays[f"t{task}_{_when(when)}_touched"])

    def pixel_counts(self, task, when="end"):
        """(n_features,) int32: ``task``'s layer-0 connections per input pixel."""
        return self.arrays[f"t{task}_{_when(when)}_pixels"]

    def neuron_status(self, task):
        """After ``task``: (n_hidden, 4) int64 rows (width, reserved, shared, unused), see STATUS_COLUMNS."""
        return self.arrays[f"t{task}_status"]

    def activations(self, task, hidden):
        """After ``task``, hidden layer ``hidden`` (0-based): (neuron ids (slots,), activations
        (slots, n_probe), reserved_by (slots,)), in slot order."""
        key = f"t{task}_act{hidden}"
        return self.arrays[key + "_ids"], self.arrays[key], self.arrays[key + "_reserved_by"]

    # ----- files -----
    def save(self, path):
        """Write every recorded array to ``path`` (.npz, no pickle) atomically."""
        def encode():
            buffer = io.BytesIO()
            np.savez(buffer, **self.arrays)
            return buffer.getvalue()
        atomic_write_encoded(path, encode)

    @classmethod
    def load(cls, path):
        """A Recorder holding the arrays of a file written by ``save`` (without probe images)."""
        recorder = cls()
        with signals_deferred(), np.load(path, allow_pickle=False) as data:
            recorder.arrays = {key: data[key] for key in data.files}
        if "pair_layer" in recorder.arrays:
            recorder.pair_layer = int(recorder.arrays["pair_layer"])
        recorder.probe_labels = recorder.arrays.get("probe_labels")
        return recorder


def neuron_status(model):
    """Per hidden layer: (width, reserved, shared, unused) counts. Returns (n_hidden, 4) int64.

    Reserved neurons have ``reserved_by != FREE``; shared ones have a slot (they received connections at some
    point) and are not reserved; unused ones have no slot. The three add up to the width.
    """
    rows = []
    for neurons in model.neurons[1:-1]:
        reserved = int(np.count_nonzero(neurons.reserved_by != FREE))
        shared = neurons.n_slots - reserved
        rows.append((neurons.width, reserved, shared, neurons.width - neurons.n_slots))
    return np.array(rows, dtype=np.int64).reshape(-1, len(STATUS_COLUMNS))


def _when(when):
    if when not in WHEN:
        raise ValueError(f"when must be one of {WHEN}, got {when!r}")
    return when


def snapshot_seed(path):
    """The seed in a snapshot file name ``seed{S}.npz``, or None."""
    match = re.fullmatch(r"seed(-?\d+)\.npz", str(path).replace("\\", "/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None
