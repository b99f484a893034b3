"""The sparse multilayer perceptron: forward pass, loss and backpropagation over plain arrays.

All activations are neuron-major, ``(slots, batch)`` float32. Hidden layers use ReLU; the output layer gives
logits over every class of the stream (one shared head).
"""
import functools

import numpy as np

from . import kernels
from .layers import NeuronIndex, SparseLinear


def softmax_cross_entropy(logits, labels):
    """Mean softmax cross-entropy and its gradient, with a numerically stable log-sum-exp.

    logits (n_classes, batch) float32, labels (batch,) int. Returns (loss: float, delta (n_classes, batch) float32),
    where delta is dL/dlogits of the batch mean.
    """
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


class SparseMLP:
    """An MLP ``n_features -> hidden... -> n_classes`` whose layers are ``SparseLinear``.

    Attributes: ``neurons`` (one ``NeuronIndex`` per layer, input first; hidden layers are compact) and ``layers``
    (``layers[l]`` maps ``neurons[l]`` to ``neurons[l + 1]``). A new network has no connections.
    """

    def __init__(self, n_features, hidden, n_classes):
        sizes = [int(n_features), *[int(h) for h in hidden], int(n_classes)]
        if any(s < 1 for s in sizes):
            raise ValueError(f"layer sizes must be positive, got {sizes}")
        self.sizes = sizes
        self.neurons = ([NeuronIndex(sizes[0], dense=True)] + [NeuronIndex(h) for h in sizes[1:-1]]
                        + [NeuronIndex(sizes[-1], dense=True)])
        self.layers = [SparseLinear(a, b) for a, b in zip(self.neurons[:-1], self.neurons[1:])]
        self.known_classes = np.zeros(sizes[-1], dtype=bool)
        self._active_versions = None
        self._buffers = {}

    @property
    def n_features(self):
        return self.sizes[0]

    @property
    def n_classes(self):
        return self.sizes[-1]

    def buffers(self, batch):
        """Reusable activation and gradient arrays for ``batch`` samples: lists of (slots, batch) float32."""
        shapes = tuple(n.n_slots for n in self.neurons)
        key = (batch, shapes)
        if key not in self._buffers:
            if len(self._buffers) > 4:
                self._buffers.clear()
            # zeros: rows outside the active cone are read (times a zero gradient) but never written
            self._buffers[key] = ([np.zeros((s, batch), np.float32) for s in shapes],
                                  [np.zeros((s, batch), np.float32) for s in shapes])
        return self._buffers[key]

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
        activations, _ = self.buffers(x.shape[1])
        activations[0] = x
        last = len(self.layers) - 1
        for l, layer in enumerate(self.layers):
            layer.forward(activations[l], activations[l + 1], relu=l < last, active_only=reaching_output_only)
        return activations

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
            bias_grads[l] = delta.sum(axis=1)

        self.backward(activations, delta_out, record)
        return loss, weight_grads, bias_grads

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


@functools.lru_cache(maxsize=8)
def input_lookup(mean, std):
    """The standardized value of every uint8 pixel, ``(p / 255 - mean) / std``. Returns (256,) float32 (read-only)."""
    lut = ((np.arange(256) / 255.0 - mean) / std).astype(np.float32)
    lut.flags.writeable = False
    return lut


def standardize_batch(images, sample_ids, mean, std, out=None):
    """A uint8 batch to the network's input layout.

    images (n, n_features) uint8, sample_ids (batch,) int64. Returns (n_features, batch) float32 with
    ``(pixel / 255 - mean) / std``, computed through a 256-entry table.
    """
    if out is None:
        out = np.empty((images.shape[1], sample_ids.shape[0]), dtype=np.float32)
    lut = input_lookup(float(mean), float(std))
    rows = images[sample_ids]
    kernel = kernels.pick(kernels.transpose_lookup, images.shape[1] * sample_ids.shape[0])
    kernel(rows, lut, out)
    return out
