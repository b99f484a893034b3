"""The SpaceNet strategy (Sokar et al., 2021): Algorithms 1-4 on a ``SparseMLP`` or a ``SparseCNN``.

Choices where the paper's text and the official code differ, or where both are silent:

- Neuron importance (Eq. 4) is the sum of the current task's Omega over a neuron's ingoing connections (outgoing
  for the input layer). The official code sums this quantity again over all training steps; we follow the paper.
- In each rewiring, neuron importances are computed once from the Omega accumulated so far, before any layer
  drops, as the official code does.
- A connection dropped in a rewiring is not grown back at the same position in that rewiring (the official code
  masks those positions too), unless the selected block has too few other empty positions to keep the task's
  connection count. Grown connections start with weight 0 and Omega 0.
- Rewiring applies to every layer except the output layer (as in the official code).
- Biases of free (not reserved) hidden neurons and of the current task's output classes are trained; the
  biases of reserved neurons and of other classes stay fixed (official code).
- Convolutions (paper, Sec. 4): a connection is a whole 3 x 3 kernel, its Omega the sum over its nine weights; a
  feature map's importance is the sum over its ingoing kernels, like a neuron's. The flattened features between
  the last convolution and the first fully connected layer are used by every task, like the input, and their
  importance is the Omega of their outgoing connections.
"""
from dataclasses import asdict, dataclass

import numpy as np

from . import kernels
from .layers import FREE
from .strategy import Learner, TaskState, TrainingDiverged, check_inputs, predict  # noqa: F401 (re-exported)

INIT_FANS = ("layer", "selected", "connections")


@dataclass
class SpaceNetConfig:
    """Hyperparameters of SpaceNet. Defaults are the paper's split MNIST configuration.

    ``connections_per_task[l]`` is the number of connections (kernels, in a convolution) a task allocates in layer
    ``l`` (an int), or a fraction of that layer's full ``fan_in * fan_out`` (a float in (0, 1)).
    ``selected_neurons[h]`` and ``reserved_neurons[h]`` are ``sel_l^t`` and ``spec_l^t`` for hidden layer ``h``
    (``model.hidden_positions[h]``); ``selected_neurons[h] = None`` selects every neuron of the layer (the paper's
    CNN setting, where every feature map is selected: reserved maps receive no new connections but feed the next
    layer). ``init_fan`` sets the
    Xavier-uniform bound of new connections: ``"layer"`` uses the full layer shape (paper, official code);
    ``"selected"`` uses the selected-neuron block, which keeps the scale of a neuron's input independent of the
    layer width when the per-task budget is fixed (for very wide layers); ``"connections"`` uses the average
    number of new connections per neuron, which also keeps it independent of the density (the CNN default: at
    12 % of the kernels, the full-layer bound shrinks the signal about 3x per layer).
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

    def validate(self, model, neuron_selection=True):
        """Raise ValueError naming the first impossible hyperparameter for ``model``.

        ``neuron_selection=False`` skips ``selected_neurons`` and ``reserved_neurons``, for methods without them.
        """
        n_hidden = len(model.hidden_positions)
        lengths = {"connections_per_task": len(model.layers)}
        if neuron_selection:
            lengths.update(selected_neurons=n_hidden, reserved_neurons=n_hidden)
        for name, expected in lengths.items():
            if len(getattr(self, name)) != expected:
                raise ValueError(f"{name} needs {expected} values for {len(model.layers)} layers and {n_hidden} "
                                 f"hidden layers, got {list(getattr(self, name))}")
        for h in range(n_hidden if neuron_selection else 0):
            sel, spec = self.selected_neurons[h], self.reserved_neurons[h]
            width = model.neurons[model.hidden_positions[h]].width
            if sel is None:
                sel = width
            elif not 1 <= sel <= width:
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
        if self.init_fan not in INIT_FANS:
            raise ValueError(f"init_fan={self.init_fan!r} must be one of {', '.join(map(repr, INIT_FANS))}")
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")

    def connection_count(self, layer, fan_in, fan_out):
        """Connections per task in ``layer``: the int as given, or the density times the full layer shape."""
        value = self.connections_per_task[layer]
        return int(value) if not isinstance(value, float) else max(1, int(round(value * fan_in * fan_out)))


class SpaceNet(Learner):
    """SpaceNet for class-incremental learning (Algorithm 1) on a ``SparseMLP`` or ``SparseCNN``.

    ``learn(images, labels, classes)`` runs one task: connections allocation (Algorithm 2), adaptive sparse
    training (Algorithm 3) and neurons reservation (Algorithm 4). Between tasks the network holds every task's
    output connections, so ``model`` can predict directly.
    """

    name = "spacenet"
    uses_neuron_selection = True
    rewires = True

    # ----- Algorithm 1 -----
    def begin_task(self, classes):
        """Allocate the task's connections and set the old output heads aside (lines 11, 14-15)."""
        state = self.allocate(classes)
        state.set_aside = self.set_aside_old_heads(state.task)
        self.refresh_trainable(state)
        return state

    def end_epoch(self, state, epoch):
        """Adaptive sparse training: rewire after every epoch but the last."""
        if self.rewires and self.config.rewire and epoch < self.config.epochs - 1:
            self.rewire(state)

    def end_task(self, state):
        self.reserve(state)

    def finish_task(self, state):
        if state.set_aside is not None:
            self.restore_heads(state.set_aside)
            state.set_aside = None

    # ----- Algorithm 2 -----
    def allocate(self, classes):
        """Connections allocation: select neurons, then place random connections between them.

        ``selected_neurons[h]`` free neurons are drawn at random (Algorithm 2); ``None`` selects every neuron of
        the layer (the paper's CNN, Sec. 5.3.1). New connections go only into free selected neurons (see
        ``targets``); reserved ones may still feed the next layer.
        """
        model, cfg = self.model, self.config
        state = TaskState(task=self.tasks_learned, classes=classes)
        state.selected = [neurons.free_slots() for neurons in model.neurons[:-1]]  # the input: every feature
        state.selected.append(np.sort(classes.astype(np.int64)))
        for h, position in enumerate(model.hidden_positions):
            neurons, count = model.neurons[position], cfg.selected_neurons[h]
            if count is None and neurons.n_free == 0 or count is not None and count > neurons.n_free:
                raise ValueError(f"selected_neurons[{h}]={count} exceeds the {neurons.n_free} free neurons left "
                                 f"in hidden layer {h} before task {state.task}")
            ids = np.arange(neurons.width) if count is None else neurons.sample_free(count, self.rng)
            state.selected[position] = np.sort(neurons.slots_for(ids))
        for layer in model.layers:
            layer.resize_to_indices()
        for l, layer in enumerate(model.layers):
            self._allocate_layer(l, layer, state)
        return state

    def _allocate_layer(self, l, layer, state):
        rows, cols = self.targets(state, layer), state.selected[layer.in_pos]
        count = self.config.connection_count(l, layer.in_index.width, layer.out_index.width)
        free_positions = np.flatnonzero(self._free_block(layer, rows, cols))
        if count > free_positions.size:
            raise ValueError(f"connections_per_task[{l}]={count} exceeds the {free_positions.size} empty positions "
                             f"between the {cols.size} x {rows.size} selected neurons of layer {l}")
        chosen = np.sort(self.rng.choice(free_positions, size=count, replace=False))
        weights = self.init_weights(layer, rows, cols, count)
        layer.add_connections(rows[chosen // cols.size], cols[chosen % cols.size], weights, state.task)

    def targets(self, state, layer=None, position=None):
        """The selected neurons that may receive new connections: the free ones among ``state.selected`` of
        ``layer``'s output (or of neuron layer ``position``). Returns (k,) sorted slots."""
        position = layer.out_pos if position is None else position
        selected = state.selected[position]
        return selected[self.model.neurons[position].reserved_by[selected] == FREE]

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
        self.refresh_trainable(None)

    def refresh_trainable(self, state):
        """Set ``trainable`` (the connection ids of ``state``'s task per layer) and ``bias_trainable`` (free hidden
        neurons and the task's classes); ``state=None`` clears both. Call it after the connections change."""
        if state is None:
            self.trainable, self.bias_trainable = [], []
            return
        self.trainable = [layer.connections_of(state.task) for layer in self.model.layers]
        self.bias_trainable = [(layer.out_index.reserved_by == FREE).astype(np.float32)
                               for layer in self.model.layers[:-1]]
        out_mask = np.zeros(self.model.n_classes, dtype=np.float32)
        out_mask[state.classes] = 1.0
        self.bias_trainable.append(out_mask)


    # ----- Algorithm 3 -----
    def neuron_importance(self, task):
        """Eq. 4 for every neuron layer: per slot, the sum of ``task``'s Omega over its ingoing connections.

        Neuron layers without ingoing connections (the input, flattened features) use their outgoing ones.
        Returns a list of (slots,) float64, one per NeuronIndex.
        """
        importance = [None] * len(self.model.neurons)
        for layer in self.model.layers:
            mine = layer.owner == task
            importance[layer.out_pos] = kernels.segment_sum(layer.importance[mine], layer.rows[mine],
                                                            layer.out_index.n_slots)
            if importance[layer.in_pos] is None:
                importance[layer.in_pos] = kernels.segment_sum(layer.importance[mine], layer.indices[mine],
                                                               layer.in_index.n_slots)
        return importance

    def rewire(self, state):
        """Drop the fraction r of least important connections per layer, then grow as many where G is highest."""
        importance = self.neuron_importance(state.task)
        for layer in self.model.layers[:-1]:
            rows, cols = self.targets(state, layer), state.selected[layer.in_pos]
            fresh = self._free_block(layer, rows, cols)
            dropped = self.drop(layer, state.task)
            self.grow(layer, state.task, rows, cols, importance[layer.out_pos], importance[layer.in_pos], fresh,
                      self._free_block(layer, rows, cols), dropped.size)
        self.refresh_trainable(state)

    def drop(self, layer, task):
        """Drop phase: remove the ``r`` fraction of ``task``'s connections with the least Omega (stable order)."""
        mine = layer.connections_of(task)
        count = int(self.config.rewire_ratio * mine.size)
        least = mine[np.argsort(layer.importance[mine], kind="stable")[:count]]
        layer.remove_connections(least)
        return least

    @staticmethod
    def grow(layer, task, rows, cols, row_importance, col_importance, fresh, empty, count):
        """Grow phase: add ``count`` zero weights at the empty positions with the largest ``a_{l-1} a_l^T`` (Eq. 5).

        rows/cols are the selected slots (sorted); ``fresh`` and ``empty`` (rows * cols,) bool mark the positions
        that were empty before the drop and those empty after it. Fresh positions come first; just-dropped ones
        are used only when the block has too few fresh positions to keep the connection count.
        """
        if count == 0:
            return
        score = np.outer(row_importance[rows], col_importance[cols]).ravel()
        rank = np.where(fresh, score, -np.inf)
        top = np.argpartition(-rank, count - 1)[:count] if count < rank.size else np.arange(rank.size)
        top = top[fresh[top]]
        if top.size < count:  # too few fresh positions: regrow the best just-dropped ones
            refill = np.flatnonzero(empty & ~fresh)
            refill = refill[np.argsort(-score[refill], kind="stable")[:count - top.size]]
            top = np.concatenate([top, refill])
        layer.add_connections(rows[top // cols.size], cols[top % cols.size],
                              np.zeros(layer.weight_shape(count), np.float32), task)

    # ----- Algorithm 4 -----
    def reserve(self, state):
        """Neurons reservation: the ``spec`` most important selected neurons of each hidden layer leave the free
        list."""
        importance = self.neuron_importance(state.task)
        for h, position in enumerate(self.model.hidden_positions):
            selected = self.targets(state, position=position)
            order = np.argsort(-importance[position][selected], kind="stable")
            self.model.neurons[position].reserve(selected[order[:self.config.reserved_neurons[h]]], state.task)



class StaticSparseNN(SpaceNet):
    """The paper's Static-SparseNN baseline: SpaceNet's allocation and reservation, with no drop or grow."""

    name = "static"
    rewires = False
