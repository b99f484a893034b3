"""The base of every continual-learning method: one task at a time, SGD on chosen connections, prediction.

A method subclasses ``Learner`` and fills in the task life cycle:

- ``begin_task(classes) -> TaskState``: prepare the network (allocate connections, choose what trains);
  must set ``self.trainable`` (connection ids per layer) and ``self.bias_trainable`` (0/1 mask per layer);
- ``training_data(state) -> (images, labels)``: what the task trains on, once per task (default: the task's data;
  replay methods add their buffer);
- ``end_epoch(state, epoch)``: after each epoch (SpaceNet rewires here);
- ``end_task(state)``: after the last epoch (SpaceNet reserves neurons here);
- ``finish_task(state)``: always runs, also after an error (SpaceNet restores the output heads here).

Penalty methods add to the gradients in ``weight_grad`` and ``bias_grad``; ``check_task`` refuses a task before
anything changes. A method with training state beyond the model and the rng (a replay buffer, a Fisher) returns it
from ``extra_state`` and takes it back in ``load_extra_state``; ``OPTIONS`` names its constructor options, which
``extra_options`` returns. Checkpoints rely on these three.

Observers (``learner.observers``) get ``task_begin(learner, state)`` and ``task_end(learner, state)`` calls, which
the report uses to record snapshots without the method knowing about it.
"""
from dataclasses import dataclass, field

import numpy as np

from .buffers import aligned_empty
from .frozen import FrozenOutputs
from .layers import SparseLinear
from .network import SparseCNN, SparseMLP, SparseNetwork, input_lookup, softmax_cross_entropy, standardize_batch


class TrainingDiverged(RuntimeError):
    """The training loss became NaN, infinite, or larger than ``diverged_loss(n_classes)``."""


DIVERGED_LOSS_FACTOR = 1e4


def diverged_loss(n_classes):
    """The loss above which training counts as diverged: ``1e4 * log(n_classes)`` (at least ``1e4 * log 2``).

    The mean cross-entropy of a sane network is O(log C): log C at the start (uniform softmax), a few times that
    when it is confidently wrong. 1e4 times it needs logit gaps of thousands, which only exploding weights give:
    such a loss never comes back, and stopping there names the cause before it reaches inf or NaN.
    """
    return DIVERGED_LOSS_FACTOR * np.log(max(int(n_classes), 2))


@dataclass
class TaskState:
    """What a task needs while it trains: its id, its classes, its data, and method-specific fields.

    ``images`` (n, n_features) uint8 or standardized float and ``labels`` (n,) are the task's own training data,
    set by ``Learner.learn``.
    """
    task: int
    classes: np.ndarray
    images: np.ndarray = None
    labels: np.ndarray = None
    selected: list = field(default_factory=list)  # SpaceNet: sorted slot arrays, one per NeuronIndex
    set_aside: tuple = None  # SpaceNet: output connections of old tasks, out of the network while training


class Learner:
    """Learns tasks one after another on a ``SparseNetwork`` with plain SGD (``config.lr``, ``config.batch_size``).

    Pixels are standardized as ``(pixel / 255 - input_mean) / input_std``, with scalars or per-feature
    (n_features,) statistics (per-channel statistics repeated over each channel's pixels).

    ``rng`` is the only source of randomness (allocation, shuffling), so a seed fixes every number.
    ``uses_neuron_selection``: whether the method reads ``config.selected_neurons``/``reserved_neurons`` (only then
    does the constructor check them).
    """

    name = "learner"
    uses_neuron_selection = False
    SWITCHES = ("softmax_scope",)  # the config's ablation switches this method honours (see spacenet.SWITCHES)
    OPTIONS = ()  # declared constructor options (``options.Option``) beyond (model, config, seed, mean, std)
    fused_step = True  # False: never run train_step as one kernel call (tests and benchmarks compare the two)
    cache_frozen = True  # False: the fused step computes the frozen rows too (``FrozenOutputs``; tests compare)
    fused_batches = True  # False: one fused step call per batch, never an epoch's batches in one call

    def __init__(self, model: SparseNetwork, config, seed=0, input_mean=0.0, input_std=1.0):
        config.validate(model, neuron_selection=self.uses_neuron_selection, switches=self.SWITCHES)
        self.model = model
        self.config = config
        self.rng = np.random.default_rng(seed)
        self.input_mean, self.input_std = input_statistics(input_mean, input_std, model.n_features)
        self.tasks_learned = 0
        self.trainable = []
        self.bias_trainable = []
        self.loss_classes = None  # (n_classes,) bool: the classes in the training softmax; None: all
        self.observers = []

    def learn(self, images, labels, classes, on_batch=None, on_epoch=None):
        """Learn one task from ``images`` (n, n_features) uint8 or standardized float and ``labels`` (n,).

        ``classes`` are the task's global class labels. ``on_batch(epoch, batch_index, n_batches, loss)`` and
        ``on_epoch(epoch)`` are optional progress callbacks. Returns the task's ``TaskState``. If the task fails
        (an impossible allocation, a diverging loss, an interrupt), the network is restored to its state before
        the task, so it can be learned again, e.g. with a lower learning rate.
        """
        classes = self.check_task(images, labels, classes)
        before = self.model.snapshot()
        try:
            state = self.begin_task(classes)
            state.images, state.labels = images, labels
            self._notify("task_begin", state)
            try:
                self.train_epochs(state, on_batch, on_epoch)
                self.end_task(state)
            finally:
                self.finish_task(state)
        except BaseException:  # a failed or interrupted task leaves the network as it was before it
            self.model.restore(before)
            self.trainable, self.bias_trainable = [], []
            raise
        self.tasks_learned += 1
        self.model.known_classes[classes] = True
        self._notify("task_end", state)
        return state

    # ----- the task life cycle (override in methods) -----
    def begin_task(self, classes):
        raise NotImplementedError

    def training_data(self, state):
        """What the task trains on: (images (n, n_features), labels (n,)). Default: the task's own data."""
        return state.images, state.labels

    def end_epoch(self, state, epoch):
        pass

    def end_task(self, state):
        pass

    def finish_task(self, state):
        pass

    # ----- training -----
    def train_epochs(self, state, on_batch=None, on_epoch=None):
        """``config.epochs`` epochs over ``training_data(state)``, each followed by ``end_epoch``.

        The training data live only while the epochs run, so ``end_task`` does not hold them.
        """
        images, labels = self.training_data(state)
        self.loss_classes = self.softmax_classes(state)
        try:
            for epoch in range(self.config.epochs):
                self.train_epoch(state, images, labels, epoch, on_batch)
                self.end_epoch(state, epoch)
                if on_epoch is not None:
                    on_epoch(epoch)
        finally:
            self._frozen_outputs = None

    def train_epoch(self, state, images, labels, epoch, on_batch=None):
        """One epoch of SGD over ``images`` (n, n_features) and ``labels`` (n,) in a random order, on
        ``self.trainable``. Calls ``on_batch(epoch, batch_index, n_batches, loss)`` after each batch; without it
        the batches may run in one or two kernel calls (``train_batches_fused``)."""
        batch_size = self.config.batch_size
        self.epoch_size = images.shape[0]
        order = self.rng.permutation(images.shape[0])
        n_batches = -(-order.size // batch_size)
        reuse_input = images.dtype == np.uint8 and not self._replaced("input_batch", "train_step")
        frozen, limit, done = None, diverged_loss(self.model.n_classes), 0
        if reuse_input and on_batch is None:
            done, frozen = self.train_batches_fused(state, images, labels, order, epoch, limit)
        for batch in range(done, n_batches):
            ids = order[batch * batch_size:(batch + 1) * batch_size]
            batch_labels = labels[ids]
            if not reuse_input:
                loss = self.train_step(self.input_batch(images, ids), batch_labels)
            else:
                x = self._reused_input(images, ids)
                if batch == 0:
                    frozen = self.frozen_outputs(images, x, batch_labels)
                loss = self.train_step(x, batch_labels, None if frozen is None else (frozen, ids))
            self._check_loss(state, epoch, batch, loss, limit)
            if on_batch is not None:
                on_batch(epoch, batch, n_batches, loss)

    def train_batches_fused(self, state, images, labels, order, epoch, limit):
        """An epoch's batches in ``SparseMLP.train_batches`` calls (the whole batches in one, a last partial batch in
        another), where that is what ``train_epoch``'s loop computes: uint8 images, scalar input statistics and
        ``fused_step_applies``. Returns (the batches trained, the epoch's ``frozen_outputs``); (0, None) where it
        does not apply."""
        batch_size = self.config.batch_size
        if not self.fused_batches or np.ndim(self.input_mean) != 0 or order.size == 0:
            return 0, None
        whole = order.size // batch_size * batch_size
        parts = [(size, ids) for size, ids in ((batch_size, order[:whole]), (order.size - whole, order[whole:]))
                 if size]
        x = self._input_buffer(images.shape[1], parts[0][0])
        first_labels = labels[order[:x.shape[1]]]
        if not self.fused_step_applies(x, first_labels):  # a smaller last batch is then fused too
            return 0, None
        frozen = self.frozen_outputs(images, x, first_labels)
        lut = input_lookup(float(self.input_mean), float(self.input_std))
        done = 0
        for size, ids in parts:
            losses = self.model.train_batches(images, ids, lut, labels, self._input_buffer(images.shape[1], size),
                                              self.config.lr, self.trainable, self.bias_trainable, self.loss_classes,
                                              frozen, limit)
            done += losses.size
            self._check_loss(state, epoch, done - 1, float(losses[-1]), limit)  # the calls stop at a bad loss
        return done, frozen

    def _check_loss(self, state, epoch, batch, loss, limit):
        """TrainingDiverged unless ``loss`` is finite and at most ``limit`` (NaN compares False)."""
        if not -np.inf < loss <= limit:
            raise TrainingDiverged(f"the training loss became {loss} in task {state.task}, epoch {epoch}, "
                                   f"batch {batch}: lower the learning rate (lr={self.config.lr})")

    def input_batch(self, images, ids):
        """Standardized batch for samples ``ids``. Returns (n_features, batch) float32."""
        if images.dtype == np.uint8:
            return standardize_batch(images, ids, self.input_mean, self.input_std)
        return np.ascontiguousarray(images[ids].T, dtype=np.float32)

    def _reused_input(self, images, ids):
        """``input_batch`` of uint8 ``images`` into an array reused by the next call: for ``train_epoch`` when only
        ``Learner.train_step`` sees the batch (neither method replaced), which keeps no reference to it."""
        return standardize_batch(images, ids, self.input_mean, self.input_std,
                                 self._input_buffer(images.shape[1], ids.shape[0]))

    def _input_buffer(self, n_features, batch):
        """The (n_features, batch) float32 array that ``_reused_input`` writes batches of this shape into."""
        key, buffers = (n_features, batch), vars(self).setdefault("_input_buffers", {})
        if key not in buffers:
            if len(buffers) > 2:
                buffers.clear()
            buffers[key] = aligned_empty(key)
        return buffers[key]

    def frozen_outputs(self, images, x, labels):
        """The ``FrozenOutputs`` of the training set ``images`` for the epoch that starts with the batch ``x``,
        ``labels`` (the current one, or a new one when the network or the set changed), or None: ``cache_frozen``
        off, the batch not trained by the fused step, or no frozen row with connections."""
        if not (self.cache_frozen and self.fused_step_applies(x, labels)):
            self._frozen_outputs = None
            return None
        current = getattr(self, "_frozen_outputs", None)
        if current is None or not current.holds(self.model, images, self.trainable, self.bias_trainable):
            current = FrozenOutputs(self.model, images, self.trainable, self.bias_trainable)
        current.start_epoch()
        self._frozen_outputs = current
        return current if current.rows else None

    def _replaced(self, *names):
        """Whether any of the methods ``names`` is not ``Learner``'s own: overridden by the class or set on the
        instance (as tests and profilers wrap them)."""
        return any(getattr(type(self), name) is not getattr(Learner, name) or name in vars(self) for name in names)

    def train_step(self, x, labels, frozen=None):
        """Forward, loss, backward and SGD update for one batch. x (n_features, batch). Returns the loss.

        Runs as one kernel call (``SparseMLP.train_step``) when ``fused_step_applies``, else layer by layer with
        ``sgd_update`` as the backward pass's step. Both do the same float32 operations in the same order, except
        the loss's exp and log (libm's in the kernel, NumPy's SIMD ones here: up to 2 ulp apart). ``frozen``:
        (``frozen_outputs``, the batch's sample ids in it), which the fused step copies the frozen rows from.
        With a plain step (``plain_step``), a ``SparseCNN`` leaves out the input gradients that nothing reads
        (``SparseCNN.unused_input_gradients``).
        """
        if self.fused_step_applies(x, labels):
            outputs, ids = (None, None) if frozen is None else frozen
            return self.model.train_step(x, labels, self.config.lr, self.trainable, self.bias_trainable,
                                         self.loss_classes, outputs, ids)
        activations = self.model.forward(x, reaching_output_only=True)
        loss, delta = softmax_cross_entropy(activations[-1], labels, self.loss_classes)
        if type(self.model) is SparseCNN and self.plain_step():
            unused = self.model.unused_input_gradients(self.trainable, self.bias_trainable)
            self.model.backward(activations, delta, self.sgd_update, unused)
        else:
            self.model.backward(activations, delta, self.sgd_update)
        return loss

    def fused_step_applies(self, x, labels):
        """Whether ``train_step`` may run as ``SparseMLP.train_step``: only where that computes exactly what the
        per-layer path does. The model is a ``SparseMLP`` of ``SparseLinear`` layers (not subclasses); this
        learner's ``sgd_update``, ``weight_grad`` and ``bias_grad`` are plain (``PLAIN_STEP_METHODS``: a method
        that adds a penalty or a hook overrides one of them) and none is replaced on the instance; no per-step
        hook is on (SpaceNet's ``official_importance``); ``config.lr`` is a Python float or int (a NumPy scalar
        would change the bias step's precision); and the arrays are of the kernel's types
        (``SparseMLP.fused_step_supported``: a float32 batch, int64 connection ids, float32 bias masks).
        """
        model, lr = self.model, self.config.lr
        if not self.fused_step or type(model) is not SparseMLP:
            return False
        return (self.plain_step() and (type(lr) is float or type(lr) is int)
                and all(type(layer) is SparseLinear for layer in model.layers)
                and model.fused_step_supported(x, labels, self.trainable, self.bias_trainable, self.loss_classes))

    def plain_step(self):
        """Whether a training step is ``Learner``'s own: ``sgd_update``, ``weight_grad`` and ``bias_grad`` are
        plain (``PLAIN_STEP_METHODS``) and none is replaced on the instance, and no per-step hook is on
        (SpaceNet's ``official_importance``). Such a step reads the gradients of trainable connections and
        biases only."""
        if getattr(self, "official_importance", None) is not None:
            return False
        cls = type(self)
        plain = _PLAIN_CLASSES.get(cls)
        if plain is None:
            plain = _PLAIN_CLASSES[cls] = all(getattr(cls, name) in functions
                                              for name, functions in PLAIN_STEP_METHODS.items())
        return plain and PLAIN_STEP_METHODS.keys().isdisjoint(vars(self))

    def softmax_classes(self, state):
        """``softmax_scope="seen"``: (n_classes,) bool of the classes learned so far and ``state``'s; None (all
        classes) for ``"all"``."""
        if self.config.softmax_scope == "all":
            return None
        seen = self.model.known_classes.copy()
        seen[state.classes] = True
        return seen

    def sgd_update(self, l, delta, inputs):
        """SGD on layer ``l``'s trainable connections (accumulating Omega, Eq. 3) and trainable biases."""
        layer = self.model.layers[l]
        connections = self.trainable[l]
        layer.sgd_step(connections, self.weight_grad(l, connections, delta, inputs), self.config.lr)
        mask = self.bias_trainable[l]
        changed = np.flatnonzero(mask)  # a frozen bias stays exactly as it is, whatever its gradient
        layer.bias[changed] -= self.config.lr * self.bias_grad(l, delta)[changed] * mask[changed]

    def weight_grad(self, l, connections, delta, inputs):
        """dL/dW of layer ``l`` at ``connections``: (m,) float32, or (m, 9) for a convolution; methods add penalty
        gradients here."""
        return self.model.layers[l].weight_grad(connections, delta, inputs)

    def bias_grad(self, l, delta):
        """dL/db of layer ``l`` from its delta (out slots, batch), or (out maps, H, W, batch). Returns (out slots,)
        float32; methods add penalty gradients here."""
        return self.model.bias_grad(l, delta)

    def init_weights(self, layer, rows, cols, count):
        """``count`` Xavier-uniform weights for new connections of ``layer`` between the slots ``rows`` x ``cols``.

        The bound comes from the full layer shape (``config.init_fan == "layer"``), from the ``rows`` x ``cols``
        block (``"selected"``), or from the average number of new connections per neuron (``"connections"``,
        which keeps the scale of a neuron's input independent of the density); a convolution's fans count its
        kernels' taps too. Draws from ``self.rng``.
        Returns (count,) float32, or (count, taps) for a convolution.
        """
        taps = layer.taps
        if self.config.init_fan == "layer":
            bound = xavier_bound(layer.in_index.width * taps, layer.out_index.width * taps)
        elif self.config.init_fan == "selected":
            bound = xavier_bound(cols.size * taps, rows.size * taps)
        else:  # "connections": the average fan-in and fan-out of the new sparse connections
            bound = xavier_bound(count / rows.size * taps, count / cols.size * taps)
        return self.rng.uniform(-bound, bound, size=layer.weight_shape(count)).astype(np.float32)

    # ----- method state, for checkpoints -----
    def extra_options(self):
        """The constructor options named in ``OPTIONS``, with their values. Returns a dict."""
        return {option.name: getattr(self, option.name) for option in self.OPTIONS}

    def extra_state(self):
        """Training state beyond the model, the rng and ``tasks_learned``, as named arrays. Default: none."""
        return {}

    def load_extra_state(self, state):
        """Restore what ``extra_state`` returned (arrays are copied); a method without extra state takes only {}."""
        if state:
            raise ValueError(f"{self.name} has no extra state, got keys {sorted(state)}")

    # ----- inference -----
    def predict(self, images, batch_size=None):
        """Predicted class per sample. images (n, n_features). Returns (n,) int64. ``batch_size``: samples per
        forward pass, by default ``model.prediction_batch(config.batch_size)``."""
        if batch_size is None:
            batch_size = self.model.prediction_batch(self.config.batch_size)
        return predict(self.model, images, self.input_mean, self.input_std, batch_size)

    def _notify(self, event, state):
        for observer in self.observers:
            handler = getattr(observer, event, None)
            if handler is not None:
                handler(self, state)

    def check_task(self, images, labels, classes):
        """Raise ValueError for an impossible task, before anything changes: bad images or labels, no samples,
        classes learned in an earlier task or without samples. Returns the sorted unique classes."""
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
        if labels.size == 0:
            raise ValueError("images and labels hold 0 samples: a task needs at least one sample per class")
        learned = classes[self.model.known_classes[classes]]
        if learned.size:
            raise ValueError(f"classes {learned.tolist()} were learned in an earlier task: every task must bring "
                             f"new classes (class-incremental learning)")
        absent = np.setdiff1d(classes, labels)
        if absent.size:
            raise ValueError(f"classes {absent.tolist()} have no sample in labels: every class of a task needs "
                             f"training data")
        return classes


# The implementations of the per-batch methods that ``SparseMLP.train_step`` computes in one kernel call; a module
# adds its own when they compute the same (SpaceNet's ``sgd_update``, whose hook is checked separately).
PLAIN_STEP_METHODS = {"sgd_update": {Learner.sgd_update}, "weight_grad": {Learner.weight_grad},
                      "bias_grad": {Learner.bias_grad}}
_PLAIN_CLASSES = {}  # Learner subclass -> whether its methods are all in PLAIN_STEP_METHODS


def input_statistics(mean, std, n_features):
    """Validated standardization statistics: two floats, or two read-only (n_features,) float64 arrays."""
    if np.ndim(mean) == 0 and np.ndim(std) == 0:
        mean, std = float(mean), float(std)
    else:
        mean, std = (np.array(np.broadcast_to(v, (n_features,)), np.float64) if np.ndim(v) <= 1 and
                     np.size(v) in (1, n_features) else None for v in (mean, std))
        if mean is None or std is None:
            raise ValueError(f"input_mean and input_std must be scalars or have {n_features} values (one per "
                             f"feature)")
        mean.flags.writeable = std.flags.writeable = False
    if not np.all(np.isfinite(mean)):
        raise ValueError(f"input_mean must be finite, got {mean}")
    if not np.all(np.isfinite(std) & (np.asarray(std) > 0)):
        raise ValueError(f"input_std={std} must be a positive finite number")
    return mean, std


def xavier_bound(fan_in, fan_out):
    """The Xavier-uniform (Glorot) bound ``sqrt(6 / (fan_in + fan_out))``."""
    return np.sqrt(6.0 / (fan_in + fan_out))


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
    connections, and its constant logit would otherwise win whenever the learned logits are negative. ValueError
    before any task is learned: there is no class to predict.
    """
    if not model.known_classes.any():
        raise ValueError("no task has been learned yet: the model knows no class to predict; learn a task first")
    check_inputs(images, model.n_features, "images")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    predictions = np.empty(images.shape[0], dtype=np.int64)
    pixels = images.dtype == np.uint8
    if pixels:  # one array for every batch's standardized inputs
        inputs = aligned_empty(model.n_features * min(batch_size, images.shape[0]))
    for start in range(0, images.shape[0], batch_size):
        ids = np.arange(start, min(start + batch_size, images.shape[0]))
        if pixels:
            x = inputs[:model.n_features * ids.size].reshape(model.n_features, ids.size)
            standardize_batch(images, ids, mean, std, out=x)
        else:
            x = np.ascontiguousarray(images[ids].T, dtype=np.float32)
        logits = np.where(model.known_classes[:, None], model.logits(x), -np.inf)
        predictions[ids] = logits.argmax(axis=0)
    return predictions
