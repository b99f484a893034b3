"""The sparse multilayer perceptron: forward pass, loss and backpropagation over plain arrays.

All activations are neuron-major, ``(slots, batch)`` float32. Hidden layers use ReLU; the output layer gives
logits over every class of the stream (one shared head).
"""
import functools
import math

import numpy as np

from . import buffers, kernels
from .layers import NeuronIndex, SparseConv2d, SparseLinear


def softmax_cross_entropy(logits, labels, classes=None):
    """Mean softmax cross-entropy and its gradient, with a numerically stable log-sum-exp.

    logits (n_classes, batch) float32, labels (batch,) int. Returns (loss: float, delta (n_classes, batch) float32),
    where delta is dL/dlogits of the batch mean. ``classes`` (n_classes,) bool restricts the softmax to those
    classes (the labels must be among them): the others' logits count as -inf and get a gradient of exactly 0.
    """
    if classes is not None:
        logits = np.where(classes[:, None], logits, np.float32(-np.inf))
    batch = logits.shape[1]
    shifted = logits - logits.max(axis=0, keepdims=True)
    exp = np.exp(shifted)
    sum_exp = exp.sum(axis=0, keepdims=True)
    columns = np.arange(batch)
    loss = float(np.mean(np.log(sum_exp[0]) - shifted[labels, columns]))
    delta = exp / sum_exp
    delta[labels, columns] -= 1.0
    delta /= batch
    return loss, delta.astype(np.float32, copy=False)


_ALL_CLASSES = np.zeros(0, dtype=bool)  # the ``classes`` argument of kernels.mlp_train_step when none are masked
_NO_ROWS = np.zeros(0, dtype=np.int64)  # kernels.mlp_train_step's cached rows and sample ids without FrozenOutputs
_NO_VALUES = np.zeros((0, 0), dtype=np.float32)


class SparseNetwork:
    """What every sparse network shares: neuron layers, weight layers, known classes, snapshots.

    ``neurons`` is a list of ``NeuronIndex`` (input first, output last); ``layers[l]`` maps
    ``neurons[layers[l].in_pos]`` to ``neurons[layers[l].out_pos]``. ``hidden_positions`` lists the neuron layers
    whose neurons SpaceNet selects and reserves (``config.selected_neurons[h]`` is for ``hidden_positions[h]``);
    the others (the input, a flattened feature layer, the output) are fully used by every task. Subclasses
    implement ``forward``, ``backward`` and ``spec``.
    """

    def _link(self, neurons, layers, hidden_positions):
        self.neurons, self.layers, self.hidden_positions = neurons, layers, list(hidden_positions)
        for layer in layers:
            layer.in_pos, layer.out_pos = neurons.index(layer.in_index), neurons.index(layer.out_index)
        self.known_classes = np.zeros(neurons[-1].width, dtype=bool)
        self._buffers = {}
        self._fresh_sums = {}  # layer -> (its delta, block sums written with it), during a backward pass

    @property
    def n_features(self):
        return self.neurons[0].width

    @property
    def n_classes(self):
        return self.neurons[-1].width

    def prediction_batch(self, training_batch):
        """Samples per forward pass when a learner predicts: its training batch, whose arrays exist already (a
        larger one would hold a second set of activation arrays, for a CNN hundreds of MB)."""
        return training_batch

    def update_active_rows(self):
        """Hook run before a forward pass (``SparseMLP`` restricts layers to neurons that reach the output)."""

    def logits(self, x):
        """Logits for a standardized batch x (n_features, batch) float32. Returns (n_classes, batch) float32,
        a buffer that the next forward pass overwrites."""
        return self.forward(x, reaching_output_only=True)[-1]

    def gradients(self, x, labels):
        """Loss and dL/dW at every connection and dL/db for every slot, without changing the network.

        x (n_features, batch) float32, labels (batch,). Returns (loss, [weight grads (nnz,)], [bias grads (slots,)]),
        lists with one entry per layer. Used by tests (finite differences) and by methods that need full gradients.
        """
        activations = self.forward(x)
        loss, delta_out = softmax_cross_entropy(activations[-1], labels)
        weight_grads = [None] * len(self.layers)
        bias_grads = [None] * len(self.layers)

        def record(l, delta, inputs):
            layer = self.layers[l]
            weight_grads[l] = layer.weight_grad(np.arange(layer.nnz), delta, inputs)
            bias_grads[l] = self.bias_grad(l, delta)

        self.backward(activations, delta_out, record)
        return loss, weight_grads, bias_grads

    def bias_grad(self, l, delta):
        """dL/db of layer ``l``: its delta (out slots, batch) or (out maps, H, W, batch) summed per slot, NumPy's
        float32 sum bit for bit. Returns (out slots,) float32. Inside ``backward``'s ``step(l, delta, x)``, the
        CNN's convolutions take the sums from block sums computed as delta was written (delta as written)."""
        fresh = self._fresh_sums.get(l)
        if fresh is not None and fresh[0] is delta:
            return kernels.tree_sums(fresh[1])
        return delta.reshape(delta.shape[0], -1).sum(axis=1)

    def snapshot(self):
        """Copies of everything a task can change: connections, slots, reserved lists, biases, known classes.

        O(connections + neurons); taken once per task so that a failed task can be undone with ``restore``.
        """
        return ([layer.connection_arrays() for layer in self.layers],
                [(n.n_slots, n.reserved_by.copy(), n.bias.copy()) for n in self.neurons],
                self.known_classes.copy())

    def restore(self, snapshot):
        """Put the network back into the state of ``snapshot`` (from ``snapshot()``)."""
        connections, neurons, known_classes = snapshot
        for index, (n_slots, reserved_by, bias) in zip(self.neurons, neurons):
            index.truncate(n_slots)
            index.reserved_by, index.bias = reserved_by.copy(), bias.copy()
        for layer, arrays in zip(self.layers, connections):
            layer.set_connection_arrays(arrays)
        self.known_classes = known_classes.copy()

    def connection_counts(self):
        """Live connections per layer. Returns a list of ints."""
        return [layer.nnz for layer in self.layers]




class SparseMLP(SparseNetwork):
    """An MLP ``n_features -> hidden... -> n_classes`` whose layers are ``SparseLinear``.

    Attributes: ``neurons`` (one ``NeuronIndex`` per layer, input first; hidden layers are compact) and ``layers``
    (``layers[l]`` maps ``neurons[l]`` to ``neurons[l + 1]``). A new network has no connections.
    """

    def __init__(self, n_features, hidden, n_classes):
        sizes = [int(n_features), *[int(h) for h in hidden], int(n_classes)]
        if any(s < 1 for s in sizes):
            raise ValueError(f"layer sizes must be positive, got {sizes}")
        self.sizes = sizes
        neurons = ([NeuronIndex(sizes[0], dense=True)] + [NeuronIndex(h) for h in sizes[1:-1]]
                   + [NeuronIndex(sizes[-1], dense=True)])
        self._link(neurons, [SparseLinear(a, b) for a, b in zip(neurons[:-1], neurons[1:])],
                   range(1, len(sizes) - 1))
        self._active_versions = self._buffer_shapes = None
        self._step_buffers = {}

    def spec(self):
        """The architecture as a JSON-able dict (``build_network`` inverts it)."""
        return {"kind": "mlp", "sizes": list(self.sizes)}

    def prediction_batch(self, training_batch):
        """At least 512 samples per forward pass: on split MNIST's five test sets (paper network after task 5) a
        batch of 128 takes 1.2x the time of 512, and 1000 takes 1.05x with twice the arrays."""
        return max(training_batch, 512)

    def buffers(self, batch, deltas=True):
        """Reusable activation and gradient arrays for ``batch`` samples: lists of (slots, batch) float32.

        The gradient arrays are made only when asked for (``deltas``; prediction never needs them). The arrays of
        an older structure are dropped once a layer gains neuron slots: they would never be used again.
        """
        shapes = tuple(n.n_slots for n in self.neurons)
        if shapes != self._buffer_shapes:
            self._buffers.clear()
            self._buffer_shapes = shapes
        found = self._buffers.get(batch)
        if found is None:
            if len(self._buffers) > 2:  # the training batch, an epoch's last batch, the evaluation batch
                self._buffers.clear()
            # zeros: rows outside the active cone are read (times a zero gradient) but never written
            found = self._buffers[batch] = [[buffers.aligned_zeros((s, batch)) for s in shapes], None]
        if deltas and found[1] is None:
            found[1] = [buffers.aligned_zeros((s, batch)) for s in shapes]
        return found

    def update_active_rows(self):
        """Restrict every layer to the neurons that reach the output (dead-end neurons cannot change the loss).

        Walks down from the output layer (all rows active): a neuron is active if an active row of the layer
        above has a connection from it. Recomputed only when some layer's structure changed.
        """
        versions = tuple(layer.version for layer in self.layers)
        if versions == self._active_versions:
            return
        active = np.ones(self.layers[-1].out_index.n_slots, dtype=bool)
        for layer in reversed(self.layers):
            layer.set_active_rows(active)
            below = np.zeros(layer.in_index.n_slots, dtype=bool)
            below[layer.indices[active[layer.rows]]] = True
            active = below
        self._active_versions = versions

    def forward(self, x, reaching_output_only=False):
        """Activations of every layer. x (n_features, batch) float32 → list of (slots, batch), logits last.

        The arrays are reused by the next call. With ``reaching_output_only`` the rows of neurons that do not
        reach the output are not computed (they cannot change the logits or the loss; see ``update_active_rows``)
        and hold stale values: training and prediction use this, inspection of hidden activations must not.
        """
        self.update_active_rows()
        activations, _ = self.buffers(x.shape[1], deltas=False)
        activations[0] = x
        last = len(self.layers) - 1
        for l, layer in enumerate(self.layers):
            layer.forward(activations[l], activations[l + 1], relu=l < last, active_only=reaching_output_only)
        return activations

    def step_buffers(self, batch, trainable):
        """Reusable arrays of ``train_step``: (per layer (m_l,) float32 weight gradients, two (batch,) float32
        scratch rows); new ones only when the trainable counts or the batch size change."""
        key = (batch, tuple(connections.shape[0] for connections in trainable))
        found = self._step_buffers.get(key)
        if found is None:
            if len(self._step_buffers) > 4:
                self._step_buffers.clear()
            found = self._step_buffers[key] = (tuple(np.empty(m, np.float32) for m in key[1]),
                                               np.empty(batch, np.float32), np.empty(batch, np.float32))
        return found

    def fused_step_supported(self, x, labels, trainable, bias_masks, classes):
        """Whether ``train_step`` takes these arguments (the types its one compiled kernel is built for): x
        (n_features, batch) float32, C-contiguous and writeable; labels (batch,) integers; per layer int64
        connection ids and (out slots,) float32 bias masks, 1-d and contiguous; classes None or (n_classes,) bool;
        every layer with the same index dtype (int32, or int64 for more than 2**31 connections); and products
        small enough for the serial kernels (``kernels.fused_step_is_serial``)."""
        if not (type(x) is np.ndarray and x.dtype == np.float32 and x.ndim == 2 and x.flags.c_contiguous
                and x.flags.writeable and x.shape[0] == self.n_features and x.shape[1] >= 1
                and type(labels) is np.ndarray and labels.shape == (x.shape[1],) and labels.dtype.kind in "iu"):
            return False
        if classes is not None and not (type(classes) is np.ndarray and classes.dtype == np.bool_
                                        and classes.shape == (self.n_classes,)):
            return False
        if len(trainable) != len(self.layers) or len(bias_masks) != len(self.layers):
            return False
        index_dtype = self.layers[0].indices.dtype
        for layer, connections, mask in zip(self.layers, trainable, bias_masks):
            if not (type(connections) is np.ndarray and connections.dtype == np.int64 and connections.ndim == 1
                    and connections.flags.c_contiguous and type(mask) is np.ndarray and mask.dtype == np.float32
                    and mask.shape == layer.bias.shape and mask.flags.c_contiguous
                    and layer.indices.dtype == index_dtype):
                return False
        return kernels.fused_step_is_serial([layer.nnz for layer in self.layers], [c.shape[0] for c in trainable],
                                            x.shape[1])

    def train_step(self, x, labels, lr, trainable, bias_masks, classes=None, frozen=None, sample_ids=None):
        """One SGD step on a batch in one kernel call, ``kernels.mlp_train_step``: what ``Learner.train_step``
        computes with the plain ``sgd_update`` (see ``Learner.fused_step_applies``), without the per-layer calls.

        Forward over the rows that reach the output, the softmax cross-entropy (over ``classes``, (n_classes,)
        bool, if given), then from the top layer down: the gradient at the layer's input, SGD with Omega on the
        connections ``trainable[l]`` and ``bias -= lr * dL/db * bias_masks[l]`` where the mask is not 0.
        Arguments as ``fused_step_supported`` accepts them; with ``frozen`` (a ``FrozenOutputs`` of the training
        set) and ``sample_ids`` (batch,) int64 (the batch's samples in it), the frozen rows' outputs are recorded
        into it (``frozen.recording``) or copied from it, not computed, as long as it holds (``frozen.current``);
        the frozen rows' deltas are then not meaningful (nothing uses them). Returns the loss (float). Once the
        buffers for this structure and batch size exist (``buffers``, ``step_buffers``), nothing is allocated.
        """
        layers, activations, deltas, scratch, frozen, record = self._step_arguments(x, lr, trainable, bias_masks,
                                                                                  frozen)
        masked = classes is not None
        loss = kernels.mlp_train_step(layers, activations, deltas, scratch[0], labels, masked,
                                      classes if masked else _ALL_CLASSES, float(lr), scratch[1], scratch[2],
                                      _NO_ROWS if frozen is None else sample_ids, record)
        if record:
            frozen.recorded += x.shape[1]
        return float(loss)

    def train_batches(self, images, order, lut, labels, x, lr, trainable, bias_masks, classes=None, frozen=None,
                      loss_limit=np.inf):
        """``train_step`` on the batches ``order[t * batch:(t + 1) * batch]`` (batch = x.shape[1]) in one kernel
        call, ``kernels.mlp_train_batches``: each batch gathered from images (n, n_features) uint8 through lut
        (256,) float32 (``input_lookup``) into x, labels (n,) integers. ``order`` (k * batch,) int64 holds whole
        batches only; the other arguments as for ``train_step`` (x is the batch it would be given; ``frozen``
        covers ``images``). Stops after the first batch whose loss is outside ``(-inf, loss_limit]``.
        Returns the losses of the batches trained, (<= k,) float32.
        """
        batch = x.shape[1]
        if order.shape[0] % batch or labels.shape[0] != images.shape[0]:
            raise ValueError(f"train_batches takes whole batches of {batch} and one label per image, got "
                             f"{order.shape[0]} ids, {images.shape[0]} images and {labels.shape[0]} labels")
        layers, activations, deltas, scratch, frozen, record = self._step_arguments(x, lr, trainable, bias_masks,
                                                                                  frozen)
        masked = classes is not None
        batch_losses = np.empty(order.shape[0] // batch, np.float32)
        trained = kernels.mlp_train_batches(layers, activations, deltas, scratch[0], images, order, lut,
                                            labels, np.empty(batch, labels.dtype), masked,
                                            classes if masked else _ALL_CLASSES, float(lr), scratch[1], scratch[2],
                                            record, float(loss_limit), batch_losses)
        if trained < 0:
            raise IndexError(f"sample ids must be in [0, {images.shape[0]}), got {order.min()} to {order.max()}")
        if record:
            frozen.recorded += trained * batch
        return batch_losses[:trained]

    def _step_arguments(self, x, lr, trainable, bias_masks, frozen):
        """What ``kernels.mlp_train_step`` reads for the input batch x (n_features, batch) at learning rate ``lr``:
        (its per-layer tuples, the activations (x, then the buffers) and gradient buffers as tuples, (weight
        gradients, two scratch rows), ``frozen`` if it holds else None, whether the step records frozen outputs).
        ValueError if x overlaps a buffer (the no-alias kernels' precondition)."""
        self.update_active_rows()
        activations, deltas = self.buffers(x.shape[1])
        activations[0] = x
        kernels.check_no_overlap(x, *activations[1:], *deltas[1:])
        scratch = self.step_buffers(x.shape[1], trainable)
        if frozen is not None and not frozen.current(self, trainable, bias_masks):
            frozen = None
        n = len(self.layers)
        if frozen is None:
            record, cached, values = False, [_NO_ROWS] * n, [_NO_VALUES] * n
        else:
            record, cached, values = frozen.recording, frozen.cached_rows, frozen.values
        copying = frozen is not None and not record
        compute = frozen.compute_rows if copying else [layer.active_rows for layer in self.layers]
        layers = tuple((rows, layer.indptr, layer.indices, layer.weights, layer.bias, layer.rows, layer.col_ptr,
                        layer.col_order, layer.importance, connections, mask, cached_rows, cached_values, bias_rows)
                       for layer, rows, connections, mask, cached_rows, cached_values, bias_rows
                       in zip(self.layers, compute, trainable, bias_masks, cached, values, self.bias_step_rows(lr)))
        return layers, tuple(activations), tuple(deltas), scratch, frozen, record

    def bias_step_rows(self, lr):
        """Per layer, the rows whose bias an SGD step at ``lr`` computes (``kernels.bias_step``): with lr > 0 finite,
        below the top layer only the rows that the next layer's active connections read (every other row's
        gradient is exactly 0, and ``bias - lr * 0.0`` keeps its bits; in SpaceNet the free neurons that the task
        did not select), else every row. Returns a list of (k,) int64."""
        if not (lr > 0.0 and math.isfinite(lr)):
            return [layer.all_rows for layer in self.layers]
        return [above.read_inputs for above in self.layers[1:]] + [self.layers[-1].all_rows]

    def backward(self, activations, delta_out, step):
        """Backpropagate ``delta_out`` (n_classes, batch) from the top layer down.

        ``step(l, delta, x)`` is called for each layer, top first, with the gradient at the layer's output
        ``delta`` (out slots, batch) and its input ``x`` (in slots, batch); it may update the layer. The gradient
        at a layer's input is computed before ``step`` runs, so updates never leak into the backward pass.
        """
        _, deltas = self.buffers(delta_out.shape[1])
        delta = delta_out
        for l in range(len(self.layers) - 1, -1, -1):
            below = None
            if l > 0:
                below = self.layers[l].backward_input(delta, activations[l], deltas[l])
            step(l, delta, activations[l])
            delta = below

class SparseCNN(SparseNetwork):
    """The paper's convolutional network (Sec. 5.3.1): 3 x 3 convolutions with ReLU, 2 x 2 max pooling after every
    two of them, then sparse fully connected layers with ReLU and a shared output layer.

    image_shape (channels, height, width); ``conv`` maps per convolution (default 32-32-64-64); ``hidden`` widths of
    the fully connected hidden layers (default 512); ``pool_every`` convolutions per max pooling.
    Neuron layers: the input channels, each convolution's maps, the flattened features of the last pooling, the
    hidden fully connected neurons and the classes. Maps and hidden neurons are selected and reserved; the input
    and the flattened features are used by every task. Maps are stored (maps, height, width, batch), so the
    flattened features are a free reshape to (features, batch) in (map, row, column) order.
    """

    def __init__(self, image_shape=(3, 32, 32), conv=(32, 32, 64, 64), hidden=(512,), n_classes=10, pool_every=2):
        channels, height, width = (int(d) for d in image_shape)
        sizes = [channels, height, width, *conv, *hidden, n_classes, pool_every]
        if any(int(v) < 1 for v in sizes) or not conv:
            raise ValueError(f"image_shape, conv, hidden, n_classes and pool_every must be positive, got "
                             f"{image_shape}, {list(conv)}, {list(hidden)}, {n_classes}, {pool_every}")
        self.image_shape, self.conv, self.hidden = (channels, height, width), list(conv), list(hidden)
        self.pool_every = int(pool_every)
        neurons, layers, self.pooled_input = [NeuronIndex(channels, dense=True)], [], []
        pool_next = False
        for i, maps in enumerate(self.conv):
            if pool_next:
                height, width = _pooled_size(height, width, f"before conv {i}")
            neurons.append(NeuronIndex(int(maps), dense=True))
            layers.append(SparseConv2d(neurons[-2], neurons[-1], height, width))
            self.pooled_input.append(pool_next)
            pool_next = (i + 1) % self.pool_every == 0
        if pool_next:
            height, width = _pooled_size(height, width, "after the last conv")
        self.flat_shape = (int(self.conv[-1]), height, width)
        neurons.append(NeuronIndex(int(np.prod(self.flat_shape)), dense=True))
        hidden_positions = list(range(1, len(self.conv) + 1))
        for i, units in enumerate([*self.hidden, n_classes]):
            neurons.append(NeuronIndex(int(units), dense=True))
            layers.append(SparseLinear(neurons[-2], neurons[-1]))
            self.pooled_input.append(pool_next and i == 0)
            if i < len(self.hidden):
                hidden_positions.append(len(neurons) - 1)
        self._link(neurons, layers, hidden_positions)

    @property
    def n_features(self):
        return int(np.prod(self.image_shape))

    def spec(self):
        return {"kind": "cnn", "image_shape": list(self.image_shape), "conv": self.conv, "hidden": self.hidden,
                "n_classes": self.n_classes, "pool_every": self.pool_every}

    def _shapes(self, batch):
        """Per layer: (input shape, output shape, pre-pool shape of the input or None)."""
        shapes, maps = [], self.image_shape
        for l, layer in enumerate(self.layers):
            pre = None
            if isinstance(layer, SparseConv2d):
                if self.pooled_input[l]:
                    pre = (maps[0], 2 * layer.height, 2 * layer.width, batch)
                in_shape = (maps[0], layer.height, layer.width, batch)
                out_shape = (layer.out_index.width, layer.height, layer.width, batch)
                maps = out_shape[:3]
            else:
                if self.pooled_input[l]:
                    pre = (*maps[:1], maps[1], maps[2], batch)
                in_shape, out_shape = (layer.in_index.width, batch), (layer.out_index.width, batch)
            shapes.append((in_shape, out_shape, pre))
        return shapes

    def buffers(self, batch):
        """Reusable arrays for ``batch`` samples, per layer: outputs (None where the next layer pools them: the
        convolution pools its maps as it computes them), pooling winners, gradients (at the input and before its
        pooling), pooled inputs, and the block sums of the gradient at the output (``bias_grad``;
        None where no kernel writes them)."""
        if batch not in self._buffers:
            if len(self._buffers) > 2:  # the training batch, an epoch's last batch, the evaluation batch
                self._buffers.clear()
            outputs, argmax, grads, pooled_inputs, leaves = [], [], [], [], []
            for l, (in_shape, out_shape, pre) in enumerate(self._shapes(batch)):
                pooled_next = l + 1 < len(self.layers) and self.pooled_input[l + 1]
                outputs.append(None if pooled_next else buffers.aligned_empty(out_shape))  # pooled as computed
                pooled = None if pre is None else (pre[0], pre[1] // 2, pre[2] // 2, batch)
                argmax.append(None if pre is None else buffers.aligned_empty(pooled, np.uint8))
                pooled_inputs.append(None if pre is None else buffers.aligned_empty(pooled))
                grads.append((buffers.aligned_empty(in_shape), None if pre is None else buffers.aligned_empty(pre)))
                leaves.append(self._leaf_buffer(l, out_shape))
            self._buffers[batch] = outputs, argmax, grads, pooled_inputs, leaves
        return self._buffers[batch]

    def _leaf_buffer(self, l, out_shape):
        """Block sums for convolution ``l``'s delta where the layer above writes it as maps (its own input
        gradient, or max pooling's backward pass) in blocks NumPy's sum splits at; else None."""
        above = l + 1 < len(self.layers) and (isinstance(self.layers[l + 1], SparseConv2d) or self.pooled_input[l + 1])
        if not isinstance(self.layers[l], SparseConv2d) or not above:
            return None
        maps, height, width, batch = out_shape
        count = kernels.leaf_count(height * width * batch, width * batch)
        return buffers.aligned_empty((maps, count)) if count else None

    def forward(self, x, reaching_output_only=False):
        """Inputs of every layer, then the logits. x (n_features, batch) float32, features in (channel, row,
        column) order. Returns a list: (maps, H, W, batch) for convolutions, (features, batch) for the fully
        connected layers, logits (n_classes, batch) last. The arrays are reused by the next call."""
        batch = x.shape[1]
        outputs, argmax, _, pooled_inputs, _ = self.buffers(batch)
        inputs = [x.reshape(*self.image_shape, batch)]
        last = len(self.layers) - 1
        for l, layer in enumerate(self.layers):
            if l < last and self.pooled_input[l + 1]:  # only a convolution's output is pooled
                layer.forward(inputs[l], outputs[l], relu=True, pool=(pooled_inputs[l + 1], argmax[l + 1]))
                following = pooled_inputs[l + 1]
            else:
                layer.forward(inputs[l], outputs[l], relu=l < last)
                following = outputs[l]
            if l == last:
                break
            if not isinstance(self.layers[l + 1], SparseConv2d):
                following = following.reshape(-1, batch)
            inputs.append(following)
        return inputs + [outputs[last]]

    def backward(self, activations, delta_out, step, unused_inputs=None):
        """Backpropagate ``delta_out`` (n_classes, batch) from the top layer down; see ``SparseMLP.backward``.

        ``step(l, delta, x)`` gets the gradient at layer ``l``'s output and the layer's input (``activations[l]``).
        ``unused_inputs``: per layer, None or bool (in maps,) of a convolution's input maps whose gradient ``step``
        never reads (``unused_input_gradients``): they get zeros instead.
        """
        outputs, argmax, grads, _, leaves = self.buffers(delta_out.shape[1])
        delta, self._fresh_sums = delta_out, {}
        try:
            for l in range(len(self.layers) - 1, -1, -1):
                below, below_leaves = None, leaves[l - 1] if l > 0 else None
                if l > 0:
                    layer = self.layers[l]
                    if isinstance(layer, SparseConv2d):
                        written = None if self.pooled_input[l] else below_leaves  # else max pooling writes them
                        unused = None if unused_inputs is None else unused_inputs[l]
                        below = layer.backward_input(delta, activations[l], grads[l][0], written, unused)
                    else:
                        below = layer.backward_input(delta, activations[l], grads[l][0])
                step(l, delta, activations[l])
                if below is not None and self.pooled_input[l]:
                    pre = grads[l][1]
                    kernels.pick_by_elements(kernels.max_pool2_backward, pre.size)(
                        below.reshape(argmax[l].shape), argmax[l], pre,
                        kernels.NO_LEAVES if below_leaves is None else below_leaves)
                    below = pre
                if below is not None:
                    if not self.pooled_input[l]:  # a fully connected layer's input gradient, flat, to the maps below
                        below = below.reshape(outputs[l - 1].shape)
                    if below_leaves is not None:
                        self._fresh_sums[l - 1] = below, below_leaves
                delta = below
        finally:
            self._fresh_sums = {}

    def unused_input_gradients(self, trainable, bias_masks):
        """Per layer, the input maps of a convolution whose gradient a plain SGD step (``trainable`` connection
        ids and ``bias_masks`` per layer) never reads, bool (in maps,), or None. A map's gradient is read when its
        bias trains, when a trainable kernel goes into it, or when a kernel goes into it from a map below whose
        gradient is read (the backward pass computes that one from it). In SpaceNet: the maps of the first
        convolution that earlier tasks reserved."""
        unused, read = [None] * len(self.layers), None
        for l, layer in enumerate(self.layers):
            if not isinstance(layer, SparseConv2d):
                break
            now = bias_masks[l] != 0
            now[layer.rows[trainable[l]]] = True
            if read is not None:
                unused[l] = ~read
                now[layer.rows[read[layer.indices]]] = True
            read = now
        return unused


def _pooled_size(height, width, where):
    """The map size after 2 x 2 max pooling; ValueError for odd sizes."""
    if height % 2 or width % 2:
        raise ValueError(f"max pooling needs even map sizes, got {height} x {width} {where}")
    return height // 2, width // 2


def build_network(spec):
    """The network described by ``spec`` (a ``spec()`` dict): ``{"kind": "mlp", "sizes": [...]}`` or
    ``{"kind": "cnn", "image_shape": ..., "conv": ..., "hidden": ..., "n_classes": ..., "pool_every": ...}``."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "mlp":
        sizes = [int(s) for s in spec["sizes"]]
        if len(sizes) < 2:
            raise ValueError(f"an MLP needs at least 2 layer sizes, got {sizes}")
        return SparseMLP(sizes[0], sizes[1:-1], sizes[-1])
    if kind == "cnn":
        return SparseCNN(spec["image_shape"], spec["conv"], spec["hidden"], spec["n_classes"], spec["pool_every"])
    raise ValueError(f"unknown network spec {spec!r}: 'kind' must be 'mlp' or 'cnn'")


@functools.lru_cache(maxsize=8)
def input_lookup(mean, std):
    """The standardized value of every uint8 pixel, ``(p / 255 - mean) / std``. Returns (256,) float32 (read-only)."""
    lut = ((np.arange(256) / 255.0 - mean) / std).astype(np.float32)
    lut.flags.writeable = False
    return lut


def standardize_batch(images, sample_ids, mean, std, out=None):
    """A uint8 batch to the network's input layout.

    images (n, n_features) uint8, sample_ids (batch,) integers in ``[0, n)``, mean/std floats or (n_features,)
    arrays; out (n_features, batch) float32 to write into, or None for a new array. Returns (n_features, batch)
    float32 with ``(pixel / 255 - mean) / std``, computed through a 256-entry table for scalar statistics (whose
    kernel gathers the samples itself, no gathered copy). IndexError for an id outside ``[0, n)``.
    """
    sample_ids = np.asarray(sample_ids)
    if out is None:
        out = np.empty((images.shape[1], sample_ids.shape[0]), dtype=np.float32)
    kernels.check_no_overlap(out, images, sample_ids)
    if np.ndim(mean) == 0:
        kernel = kernels.pick_by_elements(kernels.transpose_lookup, out.size)
        in_range = kernel(images, sample_ids, input_lookup(float(mean), float(std)), out)
    else:  # gathered first: the tiled kernel reads a contiguous copy 1.3x faster than scattered image rows
        in_range = kernels.ids_in_range(sample_ids, images.shape[0])
        if in_range:
            scale, shift = feature_affine(mean, std)
            kernels.pick_by_elements(kernels.transpose_standardize, out.size)(images[sample_ids], scale, shift, out)
    if not in_range:
        raise IndexError(f"sample ids must be in [0, {images.shape[0]}), got {sample_ids.min()} to "
                         f"{sample_ids.max()}")
    return out


def feature_affine(mean, std):
    """Per-feature ``scale = 1 / (255 std)`` and ``shift = -mean / std`` (float32), cached for the last statistics
    (compared by value, so arrays changed in place are not served stale)."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    cached = _affine_cache.get("stats")
    if cached is None or not (np.array_equal(cached[0], mean) and np.array_equal(cached[1], std)):
        _affine_cache.update(stats=(mean.copy(), std.copy()), value=(
            (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)))
    return _affine_cache["value"]


_affine_cache = {}
