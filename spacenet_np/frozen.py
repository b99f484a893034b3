"""The outputs of a SparseMLP's frozen rows, recorded in one epoch and copied in the task's later epochs.

While a task trains, a row (an output neuron of a layer) is *frozen* when none of its connections trains, its bias
does not train (mask 0) and every neuron it reads is an input feature or a frozen row of the layer below: its
output is a function of the sample alone. In SpaceNet these are neurons of earlier tasks, which the current task's
neurons still read through old connections; from the fourth task of split MNIST on they hold over half of the
forward pass's work (21,000 of the 32,000 connections into the first hidden layer in task 5).

``FrozenOutputs`` keeps their outputs for every sample of the task's training set. The fused training step
(``kernels.mlp_train_step``) computes every row and records them during the first epoch, then copies a batch's
values instead of computing them: the values are the ones the step computed, so training gives the same bits
either way. ``Learner.train_epoch`` checks at every epoch that they still hold (``holds``: the same samples,
frozen rows, connections, weights and biases) and starts over when anything changed; within an epoch a step
checks again after any change of structure (``current``). A frozen weight changed in place between two steps of
one epoch (a callback editing the network) is seen at the next epoch.
"""
import numpy as np

MAX_BYTES = 1 << 25  # nothing kept above 32 MB of values (memory stays O(connections + neurons))


def frozen_rows(model, trainable, bias_masks):
    """Per layer of ``model`` (a SparseMLP), (out slots,) bool: the rows that reach the output and are frozen.

    trainable[l] (m_l,) connection ids and bias_masks[l] (out slots,) float32 as ``Learner`` keeps them. A row
    that reaches the output reads only rows that reach the output, so checking the inputs of those suffices.
    """
    model.update_active_rows()
    below = None
    result = []
    for layer, connections, mask in zip(model.layers, trainable, bias_masks):
        frozen = np.zeros(layer.out_index.n_slots, dtype=bool)
        frozen[layer.active_rows] = True
        frozen &= mask == 0
        frozen[layer.rows[connections]] = False
        if below is not None:
            frozen[layer.rows[~below[layer.indices]]] = False
        result.append(frozen)
        below = frozen
    return result


class FrozenOutputs:
    """The outputs of the frozen rows that have connections, for every sample of a training set.

    Per layer: ``cached_rows`` (r_l,) int64 the rows whose outputs are kept, ``values`` (n, r_l) float32 (sample
    major: a batch reads one short row per sample) and ``compute_rows`` (k_l,) int64 the other rows that reach the
    output, computed per batch once the values are known (frozen rows without connections only copy their bias).
    ``rows``: the total of kept rows (0: nothing to gain, or more than MAX_BYTES of values). The values are
    recorded by the fused steps of one epoch, which compute every row (``recording``), then copied by the later
    epochs' steps.
    """

    def __init__(self, model, images, trainable, bias_masks):
        frozen = frozen_rows(model, trainable, bias_masks)
        self.images, self.n_samples, self.signature = images, images.shape[0], _signature(model, frozen)
        self.cached_rows = [np.flatnonzero(rows & (np.diff(layer.indptr) > 0))
                            for layer, rows in zip(model.layers, frozen)]
        self.rows = sum(r.size for r in self.cached_rows)
        if self.n_samples * self.rows * 4 > MAX_BYTES:
            self.cached_rows, self.rows = [r[:0] for r in self.cached_rows], 0
        self.values = [np.empty((self.n_samples, r.size), np.float32) for r in self.cached_rows]
        self.recorded = 0  # samples whose values the current epoch's steps have recorded
        self.valid = True
        self._follow(model)

    def _follow(self, model):
        """Derive ``compute_rows`` from the layers' rows that reach the output now, noting their versions."""
        self.versions = tuple(layer.version for layer in model.layers)
        self.compute_rows = [np.setdiff1d(layer.active_rows, cached, assume_unique=True)
                             for layer, cached in zip(model.layers, self.cached_rows)]

    @property
    def recording(self):
        """Whether the steps still record (some sample's values are not known yet)."""
        return self.recorded < self.n_samples

    def start_epoch(self):
        """Record again unless a whole epoch (every sample once) has recorded."""
        if self.recording:
            self.recorded = 0

    def holds(self, model, images, trainable, bias_masks):
        """Whether the kept values hold for ``images`` and the network and trainable parameters as they are now
        (the frozen rows, their connections, weights and biases unchanged); if so, ``compute_rows`` follows the
        network's current rows."""
        self.valid = images is self.images and _same(self.signature,
                                                     _signature(model, frozen_rows(model, trainable, bias_masks)))
        if self.valid:
            self._follow(model)
        return self.valid

    def current(self, model, trainable, bias_masks):
        """``holds``, checked only when a layer's structure changed since the last check (a step calls this)."""
        if self.valid and self.versions != tuple(layer.version for layer in model.layers):
            self.holds(model, self.images, trainable, bias_masks)
        return self.valid


def _signature(model, frozen):
    """What the frozen rows compute from: per layer the rows, their connection counts, inputs, weights (as bits)
    and biases."""
    parts = []
    for layer, rows in zip(model.layers, frozen):
        slots = np.flatnonzero(rows)
        inside = rows[layer.rows]
        parts += [slots, np.diff(layer.indptr)[slots], layer.indices[inside],
                  layer.weights[inside].view(np.uint32), layer.bias[slots].view(np.uint32)]
    return parts


def _same(a, b):
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))
