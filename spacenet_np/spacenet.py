"""The SpaceNet strategy (Sokar et al., 2021): Algorithms 1-4 on a ``SparseMLP``.

Choices where the paper's text and the official code differ, or where both are silent:

- Neuron importance (Eq. 4) is the sum of the current task's Omega over a neuron's ingoing connections (outgoing
  for the input layer). The official code sums this quantity again over all training steps; we follow the paper.
- In each rewiring, neuron importances are computed once from the Omega accumulated so far, before any layer
  drops, as the official code does.
- A connection dropped in a rewiring is not grown back at the same position in that rewiring (the official code
  masks those positions too). Grown connections start with weight 0 and Omega 0.
- Rewiring applies to every layer except the output layer (as in the official code).
- Biases of free (not reserved) hidden neurons and of the current task's output classes are trained; the
  biases of reserved neurons and of other classes stay fixed (official code).
"""
from dataclasses import asdict, dataclass, field

import numpy as np

from . import kernels
from .layers import FREE
from .network import SparseMLP, softmax_cross_entropy, standardize_batch


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class SpaceNetConfig:
    """Hyperparameters of SpaceNet. Defaults are the paper's split MNIST configuration.

    ``connections_per_task[l]`` is the number of connections a task allocates in layer ``l`` (an int), or a
    fraction of that layer's full ``fan_in * fan_out`` (a float in (0, 1)). ``selected_neurons[h]`` and
    ``reserved_neurons[h]`` are ``sel_l^t`` and ``spec_l^t`` for hidden layer ``h``. ``init_fan`` sets the
    Xavier-uniform bound of new connections: ``"layer"`` uses the full layer shape (paper, official code);
    ``"selected"`` uses the selected-neuron block, which keeps the scale of a neuron's input independent of the
    layer width when the per-task budget is fixed (for very wide layers).
    """
    connections_per_task: tuple = (10000, 1640, 80)
    selected_neurons: tuple = (80, 80)
    reserved_neurons: tuple = (40, 40)
    rewire_ratio: float = 0.2
    epochs: int = 4
    batch_size: int = 128
    lr: float = 0.01
    rewire: bool = True
    init_fan: str = "layer"

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def validate(self, model):
        """Raise ValueError naming the first impossible hyperparameter for ``model``."""
        n_hidden = len(model.sizes) - 2
        for name in ("connections_per_task", "selected_neurons", "reserved_neurons"):
            expected = n_hidden + 1 if name == "connections_per_task" else n_hidden
            if len(getattr(self, name)) != expected:
                raise ValueError(f"{name} needs {expected} values for {n_hidden} hidden layers, "
                                 f"got {list(getattr(self, name))}")
        for h, (sel, spec) in enumerate(zip(self.selected_neurons, self.reserved_neurons)):
            width = model.sizes[h + 1]
            if not 1 <= sel <= width:
                raise ValueError(f"selected_neurons[{h}]={sel} must be in [1, {width}] (hidden layer {h} width)")
            if not 0 <= spec <= sel:
                raise ValueError(f"reserved_neurons[{h}]={spec} must be in [0, selected_neurons[{h}]={sel}]")
        for l, value in enumerate(self.connections_per_task):
            if not (isinstance(value, (int, np.integer)) and value >= 1) and not (
                    isinstance(value, float) and 0.0 < value < 1.0):
                raise ValueError(f"connections_per_task[{l}]={value!r} must be an int >= 1 or a float in (0, 1)")
        if not 0.0 <= self.rewire_ratio < 1.0:
            raise ValueError(f"rewire_ratio={self.rewire_ratio} must be in [0, 1)")
        if not (self.lr > 0.0 and np.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr} must be a positive finite number")
        if self.init_fan not in ("layer", "selected"):
            raise ValueError(f"init_fan={self.init_fan!r} must be 'layer' or 'selected'")
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")

    def connection_count(self, layer, fan_in, fan_out):
        """Connections per task in ``layer``: the int as given, or the density times the full layer shape."""
        value = self.connections_per_task[layer]
        return int(value) if not isinstance(value, float) else max(1, int(round(value * fan_in * fan_out)))


@dataclass
class TaskState:
    """What a task needs while it trains: its id, classes and the selected slots per neuron layer."""
    task: int
    classes: np.ndarray
    selected: list = field(default_factory=list)  # sorted slot arrays, one per NeuronIndex


class SpaceNet:
    """SpaceNet for class-incremental learning (Algorithm 1) on a ``SparseMLP``.

    ``learn(images, labels, classes)`` runs one task: connections allocation (Algorithm 2), adaptive sparse
    training (Algorithm 3) and neurons reservation (Algorithm 4). Between tasks the network holds every task's
    output connections, so ``model`` can predict directly.
    """

    rewires = True

    def __init__(self, model: SparseMLP, config: SpaceNetConfig, seed=0, input_mean=0.0, input_std=1.0):
        config.validate(model)
        if not (np.isfinite(input_std) and input_std > 0):
            raise ValueError(f"input_std={input_std} must be a positive finite number")
        self.model = model
        self.config = config
        self.rng = np.random.default_rng(seed)
        self.input_mean = float(input_mean)
        self.input_std = float(input_std)
        self.tasks_learned = 0
        self.trainable = []
        self.bias_trainable = []

    # ----- Algorithm 1 -----
    def learn(self, images, labels, classes, on_batch=None, on_epoch=None):
        """Learn one task from ``images`` (n, n_features) uint8 or standardized float and ``labels`` (n,).

        ``classes`` are the task's global class labels. ``on_batch(epoch, loss)`` and ``on_epoch(epoch)`` are
        optional progress callbacks.
        """
        classes = self._check_task(images, labels, classes)
        state = self.allocate(classes)
        set_aside = self.set_aside_old_heads(state.task)
        self._refresh_trainable(state)
        try:
            for epoch in range(self.config.epochs):
                self.train_epoch(state, images, labels, epoch, on_batch)
                if self.rewires and self.config.rewire and epoch < self.config.epochs - 1:
                    self.rewire(state)
                if on_epoch is not None:
                    on_epoch(epoch)
            self.reserve(state)
        finally:
            self.restore_heads(set_aside)
        self.tasks_learned += 1
        self.model.known_classes[classes] = True
        return state

    # ----- Algorithm 2 -----
    def allocate(self, classes):
        """Connections allocation: select free neurons, then place random connections between them."""
        model, cfg = self.model, self.config
        state = TaskState(task=self.tasks_learned, classes=classes)
        state.selected.append(model.neurons[0].free_slots())
        for h, neurons in enumerate(model.neurons[1:-1]):
            if cfg.selected_neurons[h] > neurons.n_free:
                raise ValueError(f"selected_neurons[{h}]={cfg.selected_neurons[h]} exceeds the {neurons.n_free} "
                                 f"free neurons left in hidden layer {h} before task {state.task}")
            ids = neurons.sample_free(cfg.selected_neurons[h], self.rng)
            state.selected.append(np.sort(neurons.slots_for(ids)))
        state.selected.append(np.sort(classes.astype(np.int64)))
        for layer in model.layers:
            layer.resize_to_indices()
        for l, layer in enumerate(model.layers):
            self._allocate_layer(l, layer, state)
        return state

    def _allocate_layer(self, l, layer, state):
        rows, cols = state.selected[l + 1], state.selected[l]
        count = self.config.connection_count(l, layer.in_index.width, layer.out_index.width)
        free_positions = np.flatnonzero(self._free_block(layer, rows, cols))
        if count > free_positions.size:
            raise ValueError(f"connections_per_task[{l}]={count} exceeds the {free_positions.size} empty positions "
                             f"between the {cols.size} x {rows.size} selected neurons of layer {l}")
        chosen = np.sort(self.rng.choice(free_positions, size=count, replace=False))
        fans = (layer.in_index.width + layer.out_index.width if self.config.init_fan == "layer"
                else rows.size + cols.size)
        bound = np.sqrt(6.0 / fans)  # Xavier-uniform
        weights = self.rng.uniform(-bound, bound, size=count).astype(np.float32)
        layer.add_connections(rows[chosen // cols.size], cols[chosen % cols.size], weights, state.task)

    @staticmethod
    def _free_block(layer, rows, cols):
        """Empty positions of the block ``rows x cols`` (sorted slot arrays). Returns (rows * cols,) bool."""
        free = np.ones(rows.size * cols.size, dtype=bool)
        in_block = np.isin(layer.rows, rows) & np.isin(layer.indices, cols)
        local = (np.searchsorted(rows, layer.rows[in_block]) * cols.size
                 + np.searchsorted(cols, layer.indices[in_block]))
        free[local] = False
        return free

    def set_aside_old_heads(self, task):
        """Algorithm 1, lines 14-15: old tasks' output connections leave the network while ``task`` trains."""
        out = self.model.layers[-1]
        return out.remove_connections(np.flatnonzero(out.owner != task))

    def restore_heads(self, set_aside):
        """Return the set-aside output connections to the network (deployment form, all heads)."""
        rows, cols, weights, owner, importance = set_aside
        out = self.model.layers[-1]
        out.add_connections(rows, cols, weights, owner, importance)
        self._refresh_trainable(None)

    def _refresh_trainable(self, state):
        """Connection ids of the current task per layer, and which biases may change."""
        if state is None:
            self.trainable, self.bias_trainable = [], []
            return
        self.trainable = [layer.connections_of(state.task) for layer in self.model.layers]
        self.bias_trainable = [(n.reserved_by == FREE).astype(np.float32) for n in self.model.neurons[1:-1]]
        out_mask = np.zeros(self.model.n_classes, dtype=np.float32)
        out_mask[state.classes] = 1.0
        self.bias_trainable.append(out_mask)

    # ----- Algorithm 3 -----
    def train_epoch(self, state, images, labels, epoch, on_batch=None):
        """One epoch of SGD on the current task's connections, accumulating Omega (Eq. 3)."""
        order = self.rng.permutation(images.shape[0])
        for start in range(0, order.size, self.config.batch_size):
            ids = order[start:start + self.config.batch_size]
            loss = self.train_step(self.input_batch(images, ids), labels[ids])
            if not np.isfinite(loss):
                raise TrainingDiverged(f"the training loss became {loss} in task {state.task}, epoch {epoch}, "
                                       f"batch {start // self.config.batch_size}: lower the learning rate "
                                       f"(lr={self.config.lr})")
            if on_batch is not None:
                on_batch(epoch, loss)

    def input_batch(self, images, ids):
        """Standardized batch for samples ``ids``. Returns (n_features, batch) float32."""
        if images.dtype == np.uint8:
            return standardize_batch(images, ids, self.input_mean, self.input_std)
        return np.ascontiguousarray(images[ids].T, dtype=np.float32)

    def train_step(self, x, labels):
        """Forward, loss, backward and SGD update for one batch. x (n_features, batch). Returns the loss."""
        activations = self.model.forward(x)
        loss, delta = softmax_cross_entropy(activations[-1], labels)
        self.model.backward(activations, delta, self._sgd_update)
        return loss

    def _sgd_update(self, l, delta, inputs):
        layer = self.model.layers[l]
        connections = self.trainable[l]
        grad = layer.weight_grad(connections, delta, inputs)
        kernel = kernels.pick(kernels.sgd_step_with_importance, connections.size * 64)
        kernel(connections, grad, np.float32(self.config.lr), layer.weights, layer.importance)
        layer.bias[:] -= self.config.lr * delta.sum(axis=1) * self.bias_trainable[l]

    def neuron_importance(self, task):
        """Eq. 4 for every neuron layer: per slot, the sum of ``task``'s Omega over its ingoing connections.

        The input layer uses outgoing connections. Returns a list of (slots,) float64, one per NeuronIndex.
        """
        layers = self.model.layers
        first = layers[0]
        mine = first.owner == task
        importance = [kernels.segment_sum(first.importance[mine], first.indices[mine], first.in_index.n_slots)]
        for layer in layers:
            mine = layer.owner == task
            importance.append(kernels.segment_sum(layer.importance[mine], layer.rows[mine], layer.out_index.n_slots))
        return importance

    def rewire(self, state):
        """Drop the fraction r of least important connections per layer, then grow as many where G is highest."""
        importance = self.neuron_importance(state.task)
        for l, layer in enumerate(self.model.layers[:-1]):
            rows, cols = state.selected[l + 1], state.selected[l]
            free_before_drop = self._free_block(layer, rows, cols)
            dropped = self.drop(layer, state.task)
            self.grow(layer, state.task, rows, cols, importance[l + 1], importance[l], free_before_drop,
                      dropped.size)
        self._refresh_trainable(state)

    def drop(self, layer, task):
        """Drop phase: remove the ``r`` fraction of ``task``'s connections with the least Omega (stable order)."""
        mine = layer.connections_of(task)
        count = int(self.config.rewire_ratio * mine.size)
        least = mine[np.argsort(layer.importance[mine], kind="stable")[:count]]
        layer.remove_connections(least)
        return least

    @staticmethod
    def grow(layer, task, rows, cols, row_importance, col_importance, free_block, count):
        """Grow phase: add ``count`` zero weights at the empty positions with the largest ``a_{l-1} a_l^T`` (Eq. 5).

        rows/cols are the selected slots (sorted), free_block (rows * cols,) bool marks the allowed positions.
        """
        if count == 0:
            return
        score = np.outer(row_importance[rows], col_importance[cols]).ravel()
        score[~free_block] = -np.inf
        count = min(count, int(free_block.sum()))
        top = np.argpartition(-score, count - 1)[:count]
        layer.add_connections(rows[top // cols.size], cols[top % cols.size], np.zeros(count, np.float32), task)

    # ----- Algorithm 4 -----
    def reserve(self, state):
        """Neurons reservation: the ``spec`` most important selected neurons of each hidden layer leave the free list."""
        importance = self.neuron_importance(state.task)
        for h, neurons in enumerate(self.model.neurons[1:-1]):
            selected = state.selected[h + 1]
            order = np.argsort(-importance[h + 1][selected], kind="stable")
            neurons.reserve(selected[order[:self.config.reserved_neurons[h]]], state.task)

    # ----- inference -----
    def predict(self, images, batch_size=1000):
        """Predicted class per sample. images (n, n_features). Returns (n,) int64."""
        return predict(self.model, images, self.input_mean, self.input_std, batch_size)

    def _check_task(self, images, labels, classes):
        check_inputs(images, self.model.n_features, "images")
        classes = np.unique(np.asarray(classes, dtype=np.int64))
        if classes.size == 0 or classes.min() < 0 or classes.max() >= self.model.n_classes:
            raise ValueError(f"classes {classes.tolist()} must be non-empty and within [0, {self.model.n_classes})")
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        outside = ~np.isin(labels, classes)
        if outside.any():
            raise ValueError(f"labels contain {np.unique(labels[outside]).tolist()}, outside the task's classes "
                             f"{classes.tolist()}")
        return classes


def check_inputs(images, n_features, name):
    """Raise ValueError unless ``images`` is (n, n_features) uint8, or finite float."""
    if not isinstance(images, np.ndarray) or images.ndim != 2 or images.shape[1] != n_features:
        shape = getattr(images, "shape", None)
        raise ValueError(f"{name} must be an array of shape (n, {n_features}), got shape {shape}")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"{name} must be uint8 pixels or standardized floats, got dtype {images.dtype}")
        if not np.all(np.isfinite(images)):
            raise ValueError(f"{name} contain NaN or infinite values")


def predict(model, images, mean, std, batch_size=1000):
    """Predicted class per sample of ``images`` (n, n_features) uint8 or standardized float. Returns (n,) int64.

    Only the classes learned so far (``model.known_classes``) can be predicted: an unseen class has no
    connections, and its constant logit would otherwise win whenever the learned logits are negative.
    """
    check_inputs(images, model.n_features, "images")
    predictions = np.empty(images.shape[0], dtype=np.int64)
    for start in range(0, images.shape[0], batch_size):
        ids = np.arange(start, min(start + batch_size, images.shape[0]))
        if images.dtype == np.uint8:
            x = standardize_batch(images, ids, mean, std)
        else:
            x = np.ascontiguousarray(images[ids].T, dtype=np.float32)
        logits = model.logits(x)
        if model.known_classes.any():
            logits = np.where(model.known_classes[:, None], logits, -np.inf)
        predictions[ids] = logits.argmax(axis=0)
    return predictions


class StaticSparseNN(SpaceNet):
    """The paper's Static-SparseNN baseline: SpaceNet's allocation and reservation, with no drop or grow."""

    rewires = False
