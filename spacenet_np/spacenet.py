"""The SpaceNet strategy (Sokar et al., 2021): Algorithms 1-4 on a ``SparseMLP`` or a ``SparseCNN``.

Choices where the paper's text and the official code differ, or where both are silent. Each one that can be
switched names its ``SpaceNetConfig`` field (default first: the behaviour the published results use):

- Neuron importance (Eq. 4) is the sum of the current task's Omega over a neuron's ingoing connections (outgoing
  for the input layer). The official code sums this quantity again over all training steps (a dropped
  connection's Omega still counting); we follow the paper. Switch: ``importance`` = "paper" | "official_sum"
  (rewiring and reservation both use it; see ``OfficialImportance``).
- In each rewiring, neuron importances are computed once from the Omega accumulated so far, before any layer
  drops, as the official code does.
- A connection dropped in a rewiring is not grown back at the same position in that rewiring (the official code
  masks those positions too), unless the selected block has too few other empty positions to keep the task's
  connection count. Grown connections start with weight 0 and Omega 0. Among positions of equal score, growth
  takes the lower one (by row slot, then column slot) first.
- Rewiring follows every epoch but the last (official code). Switch: ``rewire_last_epoch`` = False | True (then
  ``epochs`` rewirings, the last one right before reservation).
- Rewiring applies to every layer except the output layer (official code). Switch: ``rewire_output`` = False |
  True (the output layer is rewired within the task's classes x selected last-hidden block).
- Biases of free (not reserved) hidden neurons and of the current task's output classes are trained; the
  biases of reserved neurons and of other classes stay fixed (official code). Switch: ``bias_scope`` = "free" |
  "selected" (only the task's selected free neurons, and its classes) | "output" (only the task's classes) |
  "none" (no bias trains; every bias stays 0).
- The training softmax covers every class of the stream, unseen ones included (official code). Switch:
  ``softmax_scope`` = "all" | "seen" (the classes learned so far and the task's; the others are -inf in the loss
  and get zero gradient). This one lives in ``Learner.train_step`` and applies to every method.
- Output heads are used as trained. Switch: ``balance_heads`` = "none" | "norm": after each task, every task's
  output weights and class biases are scaled so that the heads' weight L2 norms equal their mean (the paper's
  future work, Sec. 6; ``balance_head_norms``). ``head_statistics`` measures head norms and mean logits.
- Convolutions (paper, Sec. 4): a connection is a whole 3 x 3 kernel, its Omega the sum over its nine weights; a
  feature map's importance is the sum over its ingoing kernels, like a neuron's. The flattened features between
  the last convolution and the first fully connected layer are used by every task, like the input, and their
  importance is the Omega of their outgoing connections.

Which method honours which switch is its ``SWITCHES``: SpaceNet and SpaceNet-Rehearsal all of them;
Static-SparseNN all but the two rewiring ones; fine-tuning, EWC and joint training only ``softmax_scope``.
A non-default value of a switch the method does not honour is refused by ``SpaceNetConfig.validate``.
"""
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from . import kernels, strategy
from .layers import FREE
from .strategy import Learner, TaskState, TrainingDiverged, check_inputs, predict  # noqa: F401 (re-exported)

INIT_FANS = ("layer", "selected", "connections")
BIAS_SCOPES = ("free", "selected", "output", "none")
SOFTMAX_SCOPES = ("all", "seen")
IMPORTANCES = ("paper", "official_sum")
HEAD_BALANCES = ("none", "norm")
# The ablation switches (issue 11): each documented deviation, default = today's behaviour. A method honours the
# switches named in its ``SWITCHES``; ``SpaceNetConfig.validate`` refuses a non-default value of any other.
SWITCHES = ("bias_scope", "softmax_scope", "rewire_output", "rewire_last_epoch", "importance", "balance_heads")


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
    connections_per_task: tuple = field(default=(10000, 1640, 80), metadata=dict(
        type="count", per_layer=True, short="connections",
        help="connections (CNN: kernels) per task per layer: counts (>= 1) or fractions of the full layer (< 1)"))
    selected_neurons: tuple = field(default=(80, 80), metadata=dict(
        type="int", low=1, nullable=True, null_text="all", per_layer=True, short="selected",
        help="selected neurons (CNN: maps) per task per hidden layer, or 'all'"))
    reserved_neurons: tuple = field(default=(40, 40), metadata=dict(
        type="int", low=0, per_layer=True, short="reserved",
        help="reserved neurons (CNN: maps) per task per hidden layer"))
    rewire_ratio: float = field(default=0.2, metadata=dict(
        low=0.0, high=1.0, high_open=True, help="fraction r of a task's connections rewired per epoch"))
    epochs: int = field(default=4, metadata=dict(low=1, help="epochs per task"))
    batch_size: int = field(default=128, metadata=dict(low=1, help="SGD batch size"))
    lr: float = field(default=0.01, metadata=dict(low=0.0, low_open=True, help="SGD learning rate"))
    rewire: bool = field(default=True, metadata=dict(help="adaptive sparse training (drop and grow)"))
    init_fan: str = field(default="layer", metadata=dict(
        choices=INIT_FANS, help="Xavier bound of new connections from the full layer shape, the selected block, "
                                "or the average new connections per neuron"))
    bias_scope: str = field(default="free", metadata=dict(
        choices=BIAS_SCOPES, help="biases trained in a task: every free hidden neuron's and the task's classes' "
                                  "(free, official code), only the task's selected free neurons' and classes' "
                                  "(selected), only the task's classes' (output), or none"))
    softmax_scope: str = field(default="all", metadata=dict(
        choices=SOFTMAX_SCOPES, help="training softmax over every class of the stream (all) or over the classes "
                                     "seen so far and the task's (seen; the others get zero gradient)"))
    rewire_output: bool = field(default=False, metadata=dict(
        choices=(False, True), help="drop and grow the output layer's connections too (official code: no)"))
    rewire_last_epoch: bool = field(default=False, metadata=dict(
        choices=(False, True), help="rewire after the last epoch too, before reservation (official code: no)"))
    importance: str = field(default="paper", metadata=dict(
        choices=IMPORTANCES, help="neuron importance: Eq. 4 on the cumulative Omega (paper), or Eq. 4 summed "
                                  "again over every training step of the task (official_sum, official code)"))
    balance_heads: str = field(default="none", metadata=dict(
        choices=HEAD_BALANCES, help="after each task, scale each task's output weights and class biases so that "
                                    "every head's weight L2 norm is the mean norm (norm; paper Sec. 6), or not "
                                    "(none)"))

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def validate(self, model, neuron_selection=True, switches=None):
        """Raise ValueError naming the first impossible hyperparameter for ``model``.

        ``neuron_selection=False`` skips ``selected_neurons`` and ``reserved_neurons``, for methods without them.
        ``switches``: the ablation switches the method honours (its ``SWITCHES``; None: all); a non-default value
        of another one is refused, as are rewiring switches without ``rewire``.
        """
        self.validate_switches(switches)
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

    def validate_switches(self, honoured=None):
        """Raise ValueError for a switch value outside its choices, or non-default but not in ``honoured``."""
        declared = {f.name: f for f in fields(self)}
        for name in SWITCHES:
            value, choices = getattr(self, name), declared[name].metadata["choices"]
            if type(value) is not type(choices[0]) or value not in choices:
                raise ValueError(f"{name}={value!r} must be one of {', '.join(map(repr, choices))}")
            default = declared[name].default
            if honoured is not None and name not in honoured and value != default:
                raise ValueError(f"{name}={value!r} is not supported by this method (it honours "
                                 f"{', '.join(honoured) or 'no switch'}); use the default {default!r}")
        for name in ("rewire_output", "rewire_last_epoch"):
            if getattr(self, name) and not self.rewire:
                raise ValueError(f"{name}=True needs rewire=True")

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
    SWITCHES = SWITCHES
    official_importance = None  # the task's OfficialImportance with importance="official_sum"

    # ----- Algorithm 1 -----
    def begin_task(self, classes):
        """Allocate the task's connections and set the old output heads aside (lines 11, 14-15)."""
        state = self.allocate(classes)
        state.set_aside = self.set_aside_old_heads(state.task)
        self.refresh_trainable(state)
        return state

    def end_epoch(self, state, epoch):
        """Adaptive sparse training: rewire after every epoch but the last (all, with ``rewire_last_epoch``)."""
        last = epoch == self.config.epochs - 1
        if self.rewires and self.config.rewire and (not last or self.config.rewire_last_epoch):
            self.rewire(state)

    def end_task(self, state):
        self.reserve(state)
        if self.config.balance_heads == "norm":
            self.return_heads(state)
            balance_head_norms(self.model)

    def finish_task(self, state):
        self.official_importance = None
        self.return_heads(state)

    def return_heads(self, state):
        """Put the heads set aside for ``state``'s task back into the network (once)."""
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
        self.official_importance = OfficialImportance(model) if cfg.importance == "official_sum" else None
        return state

    def _allocate_layer(self, l, layer, state):
        """Algorithm 2, line 5: ``count`` connections at random empty positions of the block targets x sources."""
        rows, cols = self.targets(state, layer), state.selected[layer.in_pos]
        count = self.config.connection_count(l, layer.in_index.width, layer.out_index.width)
        occupied = self._occupied(layer, rows, cols)
        n_empty = rows.size * cols.size - occupied.size
        if count > n_empty:
            raise ValueError(f"connections_per_task[{l}]={count} exceeds the {n_empty} empty positions "
                             f"between the {cols.size} x {rows.size} selected neurons of layer {l}")
        # Choosing ranks draws exactly what choosing from the list of empty positions would (it depends only on
        # the list's length), without listing them.
        chosen = kernels.free_positions(occupied, np.sort(self.rng.choice(n_empty, size=count, replace=False)))
        weights = self.init_weights(layer, rows, cols, count)
        layer.add_connections(rows[chosen // cols.size], cols[chosen % cols.size], weights, state.task)

    def targets(self, state, layer=None, position=None):
        """The selected neurons that may receive new connections: the free ones among ``state.selected`` of
        ``layer``'s output (or of neuron layer ``position``). Returns (k,) sorted slots."""
        position = layer.out_pos if position is None else position
        selected = state.selected[position]
        return selected[self.model.neurons[position].reserved_by[selected] == FREE]

    @staticmethod
    def _occupied(layer, rows, cols):
        """The connections inside the block ``rows x cols`` (sorted slot arrays) as positions ``i * cols.size + j``.
        Returns (m,) int64, increasing."""
        return kernels.occupied_positions(layer.indptr, layer.indices, layer.in_index.n_slots, rows, cols)

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
        """Set ``trainable`` (the connection ids of ``state``'s task per layer) and ``bias_trainable`` (0/1 per
        slot, by ``config.bias_scope``); ``state=None`` clears both. Call it after the connections change."""
        if state is None:
            self.trainable, self.bias_trainable = [], []
            return
        self.trainable = [layer.connections_of(state.task) for layer in self.model.layers]
        self.bias_trainable = [self.hidden_bias_mask(state, layer) for layer in self.model.layers[:-1]]
        out_mask = np.zeros(self.model.n_classes, dtype=np.float32)
        out_mask[state.classes] = 0.0 if self.config.bias_scope == "none" else 1.0
        self.bias_trainable.append(out_mask)

    def hidden_bias_mask(self, state, layer):
        """Which biases of hidden ``layer``'s outputs train: every free neuron (``bias_scope="free"``), the task's
        free selected ones (``"selected"``; the same as "free" for a layer whose ``selected_neurons`` is None), or
        none (``"output"``, ``"none"``). Returns (out slots,) float32."""
        scope = self.config.bias_scope
        if scope == "free":
            return (layer.out_index.reserved_by == FREE).astype(np.float32)
        mask = np.zeros(layer.out_index.n_slots, dtype=np.float32)
        if scope == "selected":
            mask[self.targets(state, layer)] = 1.0
        return mask

    def sgd_update(self, l, delta, inputs):
        super().sgd_update(l, delta, inputs)
        if self.official_importance is not None:
            self.official_importance.step(self.model.layers[l], l, self.trainable[l])

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

    def task_importance(self, state):
        """The neuron importance that rewiring and reservation use: Eq. 4 (``importance="paper"``), or its sum
        over the task's training steps so far (``"official_sum"``). Returns a list of (slots,) float64."""
        if self.official_importance is not None:
            return [a.copy() for a in self.official_importance.sums]
        return self.neuron_importance(state.task)

    def rewire(self, state):
        """Drop the fraction r of least important connections per layer, then grow as many where G is highest.

        Every layer but the output layer, which is rewired too with ``config.rewire_output``."""
        importance = self.task_importance(state)
        layers = self.model.layers if self.config.rewire_output else self.model.layers[:-1]
        for layer in layers:
            rows, cols = self.targets(state, layer), state.selected[layer.in_pos]
            occupied = self._occupied(layer, rows, cols)
            dropped = self.drop(layer, state.task)
            self.grow(layer, state.task, rows, cols, importance[layer.out_pos], importance[layer.in_pos], occupied,
                      dropped.size)
        self.refresh_trainable(state)

    def drop(self, layer, task):
        """Drop phase: remove the ``r`` fraction of ``task``'s connections with the least Omega (stable order)."""
        mine = layer.connections_of(task)
        least = mine[smallest_first(layer.importance[mine], int(self.config.rewire_ratio * mine.size))]
        if self.official_importance is not None:
            self.official_importance.drop(layer, least)
        layer.remove_connections(least)
        return least

    @staticmethod
    def grow(layer, task, rows, cols, row_importance, col_importance, occupied, count):
        """Grow phase: add ``count`` zero weights at the empty positions with the largest ``a_{l-1} a_l^T`` (Eq. 5).

        rows/cols are the selected slots (sorted); ``occupied`` ((m,) sorted int64 positions ``i * cols.size + j``,
        see ``_occupied``) lists the block's connections before the drop. Fresh positions (empty before the drop)
        come first; just-dropped ones are used only when the block has too few fresh positions to keep the
        connection count. Best score first; equal scores: lower position first. Importances (neuron slots,) must be
        >= 0. Costs O(rows + cols + connections in the block + positions considered), not O(rows * cols).
        """
        if count == 0:
            return
        a_out, a_in = row_importance[rows], col_importance[cols]
        if not (np.all(a_out >= 0) and np.all(a_in >= 0)):
            raise ValueError("grow needs non-negative, non-NaN neuron importances")
        top = kernels.top_positions(a_out, a_in, occupied, count)
        if top.size < count:  # too few fresh positions: regrow the best just-dropped ones
            refill = np.setdiff1d(occupied, SpaceNet._occupied(layer, rows, cols), assume_unique=True)
            score = a_out[refill // cols.size] * a_in[refill % cols.size]
            top = np.concatenate([top, refill[smallest_first(-score, count - top.size)]])
        layer.add_connections(rows[top // cols.size], cols[top % cols.size],
                              np.zeros(layer.weight_shape(count), np.float32), task)

    # ----- Algorithm 4 -----
    def reserve(self, state):
        """Neurons reservation: the ``spec`` most important selected neurons of each hidden layer leave the free
        list."""
        importance = self.task_importance(state)
        for h, position in enumerate(self.model.hidden_positions):
            selected = self.targets(state, position=position)
            most = smallest_first(-importance[position][selected], self.config.reserved_neurons[h])
            self.model.neurons[position].reserve(selected[most], state.task)


strategy.PLAIN_STEP_METHODS["sgd_update"].add(SpaceNet.sgd_update)  # plain while official_importance is None


class OfficialImportance:
    """``importance="official_sum"``: per neuron, Eq. 4 on the cumulative Omega summed again over the task's
    training steps, as the official code does.

    ``sums[p]`` (slots,) float64 per neuron layer ``p``; each SGD step of layer ``l`` adds, for the neuron layers
    whose Eq. 4 comes from ``l`` (``sources[l]``: its outputs, ingoing; the input or flattened features, outgoing),
    the segmented sum of the task's current Omega. A dropped connection's Omega keeps counting in every later step
    (``dropped``), as in the official code, which never clears a dropped position's Omega. Costs
    O(trainable connections + slots) per layer and step, only when on.
    """

    def __init__(self, model):
        outputs = {layer.out_pos for layer in model.layers}
        self.sources, outgoing = [], set()
        for layer in model.layers:
            self.sources.append([(layer.out_pos, True)])
            if layer.in_pos not in outputs and layer.in_pos not in outgoing:
                outgoing.add(layer.in_pos)
                self.sources[-1].append((layer.in_pos, False))
        self.layers = list(model.layers)
        self.sums = [np.zeros(neurons.n_slots) for neurons in model.neurons]
        self.dropped = [np.zeros(neurons.n_slots) for neurons in model.neurons]

    def _segments(self, l, layer, connections):
        """(position, per-slot Omega sums of ``connections`` of layer ``l``) for each neuron layer it sources."""
        omega = layer.importance[connections]
        for position, ingoing in self.sources[l]:
            ids = layer.rows[connections] if ingoing else layer.indices[connections]
            yield position, kernels.segment_sum(omega, ids, self.sums[position].size)

    def step(self, layer, l, connections):
        """After an SGD step on ``connections`` (the task's, (m,) ids) of layer ``l``."""
        for position, total in self._segments(l, layer, connections):
            self.sums[position] += total + self.dropped[position]

    def drop(self, layer, connections):
        """Before ``connections`` of ``layer`` are removed: their Omega stays in the per-step sums."""
        for position, total in self._segments(self.layers.index(layer), layer, connections):
            self.dropped[position] += total


def smallest_first(values, count):
    """The positions of the ``count`` smallest of ``values`` (n,), smallest first, equal values by position: what
    ``np.argsort(values, kind="stable")[:count]`` gives (NaN last), in O(n + count log count) instead of
    O(n log n). Returns (min(count, n),) int64. The drop, regrowth and reservation selections all go through it
    (the largest first as ``smallest_first(-values, count)``)."""
    count = max(0, min(count, values.size))
    if count == 0:
        return np.zeros(0, np.int64)
    kth = np.partition(values, count - 1)[count - 1]
    if np.isnan(kth):  # NaNs among the chosen: sorting places them as argsort does
        return np.argsort(values, kind="stable")[:count]
    below = np.flatnonzero(values < kth)
    chosen = np.concatenate([below, np.flatnonzero(values == kth)[:count - below.size]])  # each by position
    return chosen[np.argsort(values[chosen], kind="stable")]


def task_heads(model, task_classes=None):
    """Each task's head in the output layer: {task: (classes (k,) int64, connection ids (m,) int64)}.

    By default the tasks and their classes come from the output connections' owners (the SpaceNet methods, whose
    task t owns exactly the connections into its classes); ``task_classes`` (a list of class arrays, one per task)
    defines heads by class instead, for methods whose connections all belong to task 0.
    """
    out = model.layers[-1]
    if task_classes is not None:
        return {t: (np.unique(np.asarray(c, np.int64)), np.flatnonzero(np.isin(out.rows, c)))
                for t, c in enumerate(task_classes)}
    return {int(t): (np.unique(out.rows[out.owner == t]).astype(np.int64), np.flatnonzero(out.owner == t))
            for t in np.unique(out.owner)}


def balance_head_norms(model):
    """``balance_heads="norm"``: scale each task's output connections and its classes' biases by
    ``mean norm / its norm``, so every head's weight L2 norm becomes the mean over the heads (heads of norm 0
    are left alone). A task's logits are scaled by a positive factor, so the ranking among its own classes does
    not change. Stores nothing. Returns {task: factor}."""
    out = model.layers[-1]
    heads = task_heads(model)
    norms = {t: np.linalg.norm(out.weights[ids].astype(np.float64)) for t, (_, ids) in heads.items()}
    nonzero = [n for n in norms.values() if n > 0]
    factors = {t: float(np.mean(nonzero) / n) if n > 0 else 1.0 for t, n in norms.items()}
    for t, (classes, ids) in heads.items():
        out.weights[ids] *= np.float32(factors[t])
        out.bias[classes] *= np.float32(factors[t])
    return factors


def head_statistics(learner, images, task_classes=None, batch_size=1000):
    """Where a bias towards a task sits (issue 11): per task head (see ``task_heads``), the L2 norm of its
    output weights, the mean of its classes' biases, and the mean logit of its classes over ``images``
    (n, n_features) uint8 or standardized float. Call between tasks, when every head is in the network.

    Returns a list of dicts (task, classes, weight_norm, bias_mean, mean_logit, class_mean_logits), by task.
    """
    model = learner.model
    check_inputs(images, model.n_features, "images")
    if images.shape[0] == 0:
        raise ValueError("head_statistics needs at least one image")
    totals = np.zeros(model.n_classes)
    for start in range(0, images.shape[0], batch_size):
        ids = np.arange(start, min(start + batch_size, images.shape[0]))
        totals += model.logits(learner.input_batch(images, ids)).sum(axis=1, dtype=np.float64)
    mean, out = totals / images.shape[0], model.layers[-1]
    return [{"task": t, "classes": classes.tolist(),
             "weight_norm": float(np.linalg.norm(out.weights[ids].astype(np.float64))),
             "bias_mean": float(out.bias[classes].mean()) if classes.size else 0.0,
             "mean_logit": float(mean[classes].mean()) if classes.size else 0.0,
             "class_mean_logits": mean[classes].tolist()}
            for t, (classes, ids) in task_heads(model, task_classes).items()]


class StaticSparseNN(SpaceNet):
    """The paper's Static-SparseNN baseline: SpaceNet's allocation and reservation, with no drop or grow (so it
    does not honour ``rewire_output`` or ``rewire_last_epoch``)."""

    name = "static"
    rewires = False
    SWITCHES = tuple(name for name in SWITCHES if not name.startswith("rewire_"))


def check_budget(model, config, n_tasks, classes_per_task=None):
    """Refuse, before training, a budget that no run of ``n_tasks`` SpaceNet tasks can fit: ValueError naming the
    parameter, the layer and the first task where it fails (the order in which ``allocate`` fails). Pure: no rng,
    ``model`` is only read (its widths).

    ``classes_per_task``: an int or one int per task (default ``n_classes // n_tasks``). Per task, as ``allocate``:
    hidden layer h selects ``selected_neurons[h]`` of its free neurons (None: every one; at least one must be free);
    layer l puts ``count`` connections into the block of its targets (the selected free neurons of its output; the
    task's classes in the output layer) x its sources (the selected neurons of its input: every neuron of the
    input, of the flattened features, and of a hidden layer selected with None, reserved ones included). After
    the task ``reserved_neurons[h]`` of the targets (all, if fewer) are reserved. Earlier tasks' connections may
    fill part of a block: at least ``old - (rows outside) * in_width - rows * (in_width - sources)`` of them (the
    rest fit in the reserved and unselected rows and the unselected columns), so only budgets that fail whatever
    the random draws are refused; a budget can still fail by chance when old connections crowd a block.
    """
    config.validate(model)
    n_classes, n_tasks = model.n_classes, int(n_tasks)
    if classes_per_task is None:
        classes_per_task = n_classes // max(n_tasks, 1)
    classes = [int(c) for c in np.broadcast_to(classes_per_task, (n_tasks,))] if n_tasks >= 1 else []
    if n_tasks < 1 or min(classes) < 1 or sum(classes) > n_classes:
        raise ValueError(f"{n_tasks} tasks of {classes} classes do not fit the {n_classes} outputs")
    hidden = dict(zip(model.hidden_positions, range(len(model.hidden_positions))))
    reserved, placed = dict.fromkeys(hidden, 0), [0] * len(model.layers)
    for t in range(n_tasks):
        targets = {}
        for position, h in hidden.items():
            free, sel = model.neurons[position].width - reserved[position], config.selected_neurons[h]
            if free == 0 or sel is not None and sel > free:
                raise ValueError(f"selected_neurons[{h}]={sel} exceeds the {free} free neurons left in hidden layer "
                                 f"{h} before task {t} ({config.reserved_neurons[h]} reserved per task)")
            targets[position] = free if sel is None else sel
        for l, layer in enumerate(model.layers):
            in_width, out_width = layer.in_index.width, layer.out_index.width
            h_in = hidden.get(layer.in_pos)
            sources = in_width if h_in is None or config.selected_neurons[h_in] is None else targets[layer.in_pos]
            rows = targets.get(layer.out_pos, classes[t])
            taken = 0 if layer.out_pos not in hidden else max(
                0, placed[l] - (out_width - rows) * in_width - rows * (in_width - sources))
            count = config.connection_count(l, in_width, out_width)
            if count > rows * sources - taken:
                raise ValueError(f"connections_per_task[{l}]={count} cannot fit layer {l} in task {t}: its block of "
                                 f"{sources} x {rows} selected neurons has {rows * sources} positions, of which "
                                 f"earlier tasks' connections take at least {taken}")
            placed[l] += count
        for position, h in hidden.items():
            reserved[position] += min(config.reserved_neurons[h], targets[position])
