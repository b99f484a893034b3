"""Baseline continual-learning methods on the same sparse engine as SpaceNet.

- ``SpaceNetRehearsal`` ("rehearsal"): SpaceNet (allocation, rewiring, reservation) whose batches mix the current
  task's data with a replay buffer of old tasks' samples (paper, Sec. 5.1.2). Old connections stay fixed; the old
  output heads stay in the network (old classes are trained against) and stay frozen.
- ``FineTune`` ("finetune"): the lower bound. One static sparse network holding the connections SpaceNet has after
  ``total_tasks`` tasks, allocated at random over every layer at the first task; every connection and bias trains on
  every task; nothing is reserved or set aside.
- ``Joint`` ("joint"): the upper bound. FineTune's network trained at task t on the union of the training data of
  tasks 1..t (shuffled together, ``config.epochs`` epochs), continuing from the current weights. This cumulative
  form gives a full accuracy matrix (one row per task) at the cost of retraining on old data; its last row is the
  usual joint-training upper bound.
- ``EWC`` ("ewc"): Elastic Weight Consolidation (Kirkpatrick et al., 2017) on FineTune's network: after each task
  the diagonal empirical Fisher (mean squared per-sample gradient of the loss at the true labels) of every
  connection and bias is added to a running sum F, and the parameters are kept as theta*. Later tasks add
  ``ewc_lambda * F * (theta - theta*)`` to every gradient, with ``ewc_lambda * F`` capped at ``1 / lr`` (plain SGD
  diverges beyond ``2 / lr``; see ``EWC``).

The replay buffer, the Fisher and theta* arrays are the methods' ``extra_state()``; ``OPTIONS`` names the constructor
options that ``extra_options()`` returns (see ``Learner``). ``METHODS`` maps names to classes, plugin methods of
the ``spacenet_np.methods`` entry-point group included (see ``plugins``).

``SWITCHES`` names the config's ablation switches a method honours (see ``spacenet``): SpaceNet-Rehearsal all of
SpaceNet's; FineTune, Joint and EWC only ``softmax_scope`` (they select no neurons and own no per-task heads;
EWC's Fisher uses the full softmax). Non-default values of the others are refused.
"""
from collections.abc import MutableMapping

import numpy as np

from . import plugins
from .options import Option
from .spacenet import SpaceNet, StaticSparseNN
from .strategy import Learner, TaskState


class _Replay:
    """Trains each task on its data together with a buffer of earlier tasks' samples, shuffled together.

    After a task's last epoch (``end_task``, before observers see ``task_end``), ``replay_per_task`` of its samples
    drawn with the learner's rng (all of them when None) join the buffer, stored as given (uint8 stays uint8).
    """

    def __init__(self, *args, replay_per_task=None, **options):
        super().__init__(*args, **options)
        if replay_per_task is not None and not (isinstance(replay_per_task, (int, np.integer))
                                                and replay_per_task >= 0):
            raise ValueError(f"replay_per_task={replay_per_task!r} must be None (all samples) or an int >= 0")
        self.replay_per_task = None if replay_per_task is None else int(replay_per_task)
        self.replay_images = np.zeros((0, self.model.n_features), dtype=np.uint8)
        self.replay_labels = np.zeros(0, dtype=np.int64)

    def check_task(self, images, labels, classes):
        """Learner's checks, and images of the buffer's dtype."""
        classes = super().check_task(images, labels, classes)
        if self.replay_labels.size and images.dtype != self.replay_images.dtype:
            raise ValueError(f"images have dtype {images.dtype} but the replay buffer holds "
                             f"{self.replay_images.dtype}: every task must give images of the same dtype")
        return classes

    def training_data(self, state):
        """The replay buffer followed by the task's data: (images (n, n_features), labels (n,) int64)."""
        labels = np.asarray(state.labels, dtype=np.int64)
        if not self.replay_labels.size:
            return state.images, labels
        return np.concatenate([self.replay_images, state.images]), np.concatenate([self.replay_labels, labels])

    def end_task(self, state):
        super().end_task(state)
        self.remember(state.images, state.labels)

    def remember(self, images, labels):
        """Add ``replay_per_task`` random samples (or all) of a finished task to the buffer."""
        n = images.shape[0]
        if self.replay_per_task is None or self.replay_per_task >= n:
            ids = np.arange(n)
        else:
            ids = np.sort(self.rng.choice(n, size=self.replay_per_task, replace=False))
        if not self.replay_labels.size:
            self.replay_images = self.replay_images.astype(images.dtype)
        self.replay_images = np.concatenate([self.replay_images, images[ids]])
        self.replay_labels = np.concatenate([self.replay_labels, np.asarray(labels, dtype=np.int64)[ids]])

    def extra_state(self):
        return {**super().extra_state(), "replay_images": self.replay_images.copy(),
                "replay_labels": self.replay_labels.copy()}

    def load_extra_state(self, state):
        state = dict(state)
        if "replay_images" not in state or "replay_labels" not in state:
            raise ValueError(f"{self.name} state needs replay_images and replay_labels, got keys {sorted(state)}")
        images, labels = np.asarray(state.pop("replay_images")), np.asarray(state.pop("replay_labels"))
        if images.ndim != 2 or images.shape[1] != self.model.n_features:
            raise ValueError(f"replay_images must have shape (n, {self.model.n_features}), got {images.shape}")
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"replay_labels must be ({images.shape[0]},) integers, got {labels.shape} {labels.dtype}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.model.n_classes):
            raise ValueError(f"replay_labels must be within [0, {self.model.n_classes})")
        super().load_extra_state(state)
        self.replay_images = np.array(images)
        self.replay_labels = labels.astype(np.int64)


class SpaceNetRehearsal(_Replay, SpaceNet):
    """SpaceNet-Rehearsal (paper, Sec. 5.1.2): SpaceNet with the old tasks' data replayed in every batch.

    Allocation, rewiring and reservation are SpaceNet's, and only the current task's connections (and the biases
    SpaceNet trains) change. Because old classes appear in the batches, the old output heads stay in the network
    while a task trains (they are not set aside) and stay frozen. ``replay_per_task``: samples kept per finished
    task (default None = all of its training data, the paper's setting).
    """

    name = "rehearsal"
    OPTIONS = (Option("replay_per_task", int, None, "samples kept per old task ('all': all of them, the paper)",
                      low=0, nullable=True, null_text="all"),)

    def __init__(self, model, config, seed=0, input_mean=0.0, input_std=1.0, replay_per_task=None):
        super().__init__(model, config, seed, input_mean, input_std, replay_per_task=replay_per_task)

    def begin_task(self, classes):
        """SpaceNet's allocation with every output head kept in the network."""
        state = self.allocate(classes)
        self.refresh_trainable(state)
        return state

    def finish_task(self, state):
        super().finish_task(state)
        self.refresh_trainable(None)


TOTAL_TASKS = Option("total_tasks", int, None, "tasks the static network is sized for ('none': the stream's)",
                     low=1, nullable=True, from_stream="n_tasks")


class FineTune(Learner):
    """Fine-tuning on a static sparse network: the lower bound of class-incremental learning.

    At the first task (when the network has no connections) every layer ``l`` gets
    ``config.connection_count(l) * total_tasks`` connections, as many as SpaceNet has after ``total_tasks`` tasks,
    at uniformly random positions with Xavier-uniform weights (bound from the full layer shape, or from the block
    with ``config.init_fan == "selected"``, as SpaceNet). A hidden layer slots all its neurons unless it is wider
    than the larger connection count of its two adjacent layers; then that many random neurons are slotted, enough
    to hold the connections, which keeps memory O(connections). Every connection and every bias trains on every
    task; nothing is reserved or set aside. ``config.selected_neurons`` and ``reserved_neurons`` are not used.
    """

    name = "finetune"
    OPTIONS = (TOTAL_TASKS,)

    def __init__(self, model, config, seed=0, input_mean=0.0, input_std=1.0, total_tasks=5):
        super().__init__(model, config, seed, input_mean, input_std)
        if not (isinstance(total_tasks, (int, np.integer)) and total_tasks >= 1):
            raise ValueError(f"total_tasks={total_tasks!r} must be an int >= 1")
        self.total_tasks = int(total_tasks)
        for l, (count, layer) in enumerate(zip(self.connection_budget(), model.layers)):
            if count > layer.in_index.width * layer.out_index.width:
                raise ValueError(f"connections_per_task[{l}] * total_tasks = {count} exceeds the "
                                 f"{layer.in_index.width * layer.out_index.width} positions of layer {l}")

    def begin_task(self, classes):
        if not any(self.model.connection_counts()):
            self.allocate()
        self.trainable = [np.arange(layer.nnz) for layer in self.model.layers]
        self.bias_trainable = [np.ones(layer.out_index.n_slots, dtype=np.float32) for layer in self.model.layers]
        return TaskState(task=self.tasks_learned, classes=classes)

    def finish_task(self, state):
        self.trainable, self.bias_trainable = [], []

    def connection_budget(self):
        """Connections per layer of the static network: SpaceNet's per-task count times ``total_tasks``."""
        return [self.config.connection_count(l, layer.in_index.width, layer.out_index.width) * self.total_tasks
                for l, layer in enumerate(self.model.layers)]

    def allocate(self):
        """Slot the hidden neurons and place every layer's connections at random (owner: task 0).

        A hidden layer slotting ``n < width`` neurons has ``n >= count`` of both adjacent layers, so each block
        holds its layer's connections whenever the full layer does.
        """
        model, rng = self.model, self.rng
        counts = self.connection_budget()
        selected = [np.arange(neurons.width) for neurons in model.neurons]  # dense neuron layers: every neuron
        for position in model.hidden_positions:
            neurons = model.neurons[position]
            if neurons.dense:
                continue
            n = min(neurons.width, max(c for c, layer in zip(counts, model.layers)
                                       if position in (layer.in_pos, layer.out_pos)))
            ids = np.arange(n) if n == neurons.width else np.sort(rng.choice(neurons.width, size=n, replace=False))
            selected[position] = np.sort(neurons.slots_for(ids))
        for layer in model.layers:
            layer.resize_to_indices()
        for l, layer in enumerate(model.layers):
            rows, cols = selected[layer.out_pos], selected[layer.in_pos]  # holds counts[l] (checked in __init__)
            keys = np.sort(rng.choice(rows.size * cols.size, size=counts[l], replace=False))
            weights = self.init_weights(layer, rows, cols, counts[l])
            layer.add_connections(rows[keys // cols.size], cols[keys % cols.size], weights, 0)


class Joint(_Replay, FineTune):
    """Joint training, the upper bound: at task t, FineTune's network trains on the data of tasks 1..t.

    The data of all tasks seen so far are shuffled together for ``config.epochs`` epochs, continuing from the
    current weights (cumulative joint training), so the method has a full accuracy matrix like the others.
    """

    name = "joint"
    OPTIONS = (TOTAL_TASKS,)

    def __init__(self, model, config, seed=0, input_mean=0.0, input_std=1.0, total_tasks=5):
        super().__init__(model, config, seed, input_mean, input_std, total_tasks=total_tasks, replay_per_task=None)


class EWC(FineTune):
    """Elastic Weight Consolidation on FineTune's static sparse network.

    After each task: ``F += mean over fisher_samples training samples of (dL/dtheta)**2`` (per-sample gradients of
    the cross-entropy at the true labels, the empirical Fisher, for every connection and bias) and
    ``theta* = theta``. Training later tasks adds ``k * (theta - theta*)`` to every gradient, the gradient of
    ``1/2 * sum k (theta - theta*)**2``, with the stiffness ``k = min(ewc_lambda * F, 1 / lr)``.

    The cap ``1 / lr`` keeps plain SGD stable: the penalty alone moves a parameter by ``lr * k * (theta - theta*)``
    per step, so ``lr * k > 2`` oscillates with growing amplitude (at the default ``ewc_lambda=5000`` and
    ``lr=0.01``, about 0.3 % of the output connections and some output biases exceed it after the first split MNIST
    task, and training diverges within the third task). At ``lr * k = 1`` a step puts the parameter back at theta*,
    the strongest pull that does not overshoot; below the cap the penalty is exactly ``ewc_lambda * F``.

    The Fisher samples are drawn from a jumped copy of the learner's rng (``rng.bit_generator.jumped()``): a
    function of the rng's state that does not advance it. Allocation and batch order are then those of FineTune
    with the same seed, and ``ewc_lambda=0`` reproduces FineTune's per-layer step bit for bit (FineTune's default
    fused step, ``SparseMLP.train_step``, differs in the last bits of the loss's exp and log).
    """

    name = "ewc"
    OPTIONS = (TOTAL_TASKS, Option("ewc_lambda", float, 5000.0, "penalty strength", low=0.0),
               Option("fisher_samples", int, 600, "samples for the Fisher estimate", low=1))
    KEYS = ("fisher_weights", "fisher_bias", "theta_weights", "theta_bias")  # per layer, aligned with weights/bias

    def __init__(self, model, config, seed=0, input_mean=0.0, input_std=1.0, total_tasks=5, ewc_lambda=5000.0,
                 fisher_samples=600):
        super().__init__(model, config, seed, input_mean, input_std, total_tasks=total_tasks)
        if not (np.isfinite(ewc_lambda) and ewc_lambda >= 0):
            raise ValueError(f"ewc_lambda={ewc_lambda!r} must be a finite number >= 0")
        if not (isinstance(fisher_samples, (int, np.integer)) and fisher_samples >= 1):
            raise ValueError(f"fisher_samples={fisher_samples!r} must be an int >= 1")
        self.ewc_lambda = float(ewc_lambda)
        self.fisher_samples = int(fisher_samples)
        self._set_anchor(None, None, None, None)

    # ----- consolidation -----
    def end_task(self, state):
        super().end_task(state)
        self.consolidate(state.images, state.labels)

    def consolidate(self, images, labels):
        """Add the task's Fisher to F and keep the current parameters as theta*."""
        weights, bias = self.fisher(images, labels)
        if self.fisher_weights is not None:
            weights = [f + g for f, g in zip(self.fisher_weights, weights)]
            bias = [f + g for f, g in zip(self.fisher_bias, bias)]
        self._set_anchor(weights, bias, [layer.weights.copy() for layer in self.model.layers],
                         [layer.bias.copy() for layer in self.model.layers])

    def fisher(self, images, labels):
        """Empirical diagonal Fisher: the mean squared gradient of single samples (batch size 1).

        Returns ([per layer (nnz,) float32], [per layer (out slots,) float32]).
        """
        rng = np.random.Generator(self.rng.bit_generator.jumped())
        n = min(self.fisher_samples, images.shape[0])
        ids = rng.choice(images.shape[0], size=n, replace=False)
        labels = np.asarray(labels, dtype=np.int64)
        weights = [np.zeros(layer.weights.shape) for layer in self.model.layers]
        bias = [np.zeros(layer.bias.shape[0]) for layer in self.model.layers]
        for i in ids:
            one = np.array([i])
            _, weight_grads, bias_grads = self.model.gradients(self.input_batch(images, one), labels[one])
            for l in range(len(weights)):
                weights[l] += np.square(weight_grads[l], dtype=np.float64)
                bias[l] += np.square(bias_grads[l], dtype=np.float64)
        return [(w / n).astype(np.float32) for w in weights], [(b / n).astype(np.float32) for b in bias]

    def _set_anchor(self, fisher_weights, fisher_bias, theta_weights, theta_bias):
        """Set F and theta* (lists per layer, or all None) and the stiffness ``min(ewc_lambda * F, 1 / lr)``."""
        self.fisher_weights, self.fisher_bias = fisher_weights, fisher_bias
        self.theta_weights, self.theta_bias = theta_weights, theta_bias
        if fisher_weights is None:
            self.stiffness_weights = self.stiffness_bias = None
            return
        lam, cap = np.float32(self.ewc_lambda), np.float32(1.0 / self.config.lr)
        self.stiffness_weights = [np.minimum(lam * f, cap) for f in fisher_weights]
        self.stiffness_bias = [np.minimum(lam * f, cap) for f in fisher_bias]

    # ----- the penalty -----
    def weight_grad(self, l, connections, delta, inputs):
        grad = super().weight_grad(l, connections, delta, inputs)
        if self.stiffness_weights is not None:
            grad += self.stiffness_weights[l][connections] * (self.model.layers[l].weights[connections]
                                                              - self.theta_weights[l][connections])
        return grad

    def bias_grad(self, l, delta):
        """dL/db plus the penalty ``k * (b - b*)``. Returns (out slots,) float32."""
        grad = super().bias_grad(l, delta)
        if self.stiffness_bias is not None:
            grad += self.stiffness_bias[l] * (self.model.layers[l].bias - self.theta_bias[l])
        return grad

    # ----- checkpoints -----
    def extra_state(self):
        if self.fisher_weights is None:
            return {}
        return {f"{key}_{l}": array.copy() for key in self.KEYS for l, array in enumerate(getattr(self, key))}

    def load_extra_state(self, state):
        if not state:
            self._set_anchor(None, None, None, None)
            return
        layers = self.model.layers
        expected = {f"{key}_{l}": (layer.weights.shape if key.endswith("weights") else layer.bias.shape)
                    for key in self.KEYS for l, layer in enumerate(layers)}
        if set(state) != set(expected):
            raise ValueError(f"EWC state must have the keys {sorted(expected)}, got {sorted(state)}")
        for name, shape in expected.items():
            if np.shape(state[name]) != shape:
                raise ValueError(f"{name} must have shape {shape} (the network's), got {np.shape(state[name])}")
        self._set_anchor(*([np.array(state[f"{key}_{l}"], dtype=np.float32) for l in range(len(layers))]
                           for key in self.KEYS))


class MethodRegistry(MutableMapping):
    """Method name -> Learner class: the built-in methods, then the plugins of the ``spacenet_np.methods``
    entry-point group (see ``plugins``), discovered at the first lookup, not at import. ``refused`` maps the
    names of plugins left out to the reason; ``reload()`` discovers again (after installing a plugin)."""

    def __init__(self, builtins):
        self._builtins = dict(builtins)
        self._methods = None
        self._loading = False
        self.refused = {}

    def _all(self):
        if self._methods is None:
            if self._loading:  # a plugin that looks up a method while it is imported sees the built-ins
                return self._builtins
            self._loading = True
            try:
                found, self.refused = plugins.discover(self._builtins)
            finally:
                self._loading = False
            self._methods = {**self._builtins, **found}
        return self._methods

    def reload(self):
        """Discover the plugins again; methods set by hand are dropped."""
        self._methods = None
        self._all()

    def unknown(self, name):
        """The message for a name that is not a method, with the reason when it is a refused plugin."""
        reason = f"; the plugin {self.refused[name]}" if name in self.refused else ""
        return f"unknown method {name!r}; known methods: {', '.join(sorted(self))}{reason}"

    def __getitem__(self, name):
        return self._all()[name]

    def __setitem__(self, name, cls):
        self._all()[name] = cls

    def __delitem__(self, name):
        del self._all()[name]

    def __iter__(self):
        return iter(self._all())

    def __len__(self):
        return len(self._all())

    def __repr__(self):
        return f"MethodRegistry({self._all()!r})"


METHODS = MethodRegistry({"spacenet": SpaceNet, "static": StaticSparseNN, "rehearsal": SpaceNetRehearsal,
                          "finetune": FineTune, "joint": Joint, "ewc": EWC})

