"""The dense reference for the CNN benchmarks: the paper's network with every weight present, trained with plain
SGD through im2col + BLAS.

Same architecture and layouts as ``spacenet_np.network.SparseCNN``: 3 x 3 convolutions (stride 1, zero padding
1) with ReLU, 2 x 2 max pooling after every two, fully connected layers with ReLU, one output layer; maps are
(maps, height, width, batch) float32. A convolution is ``im2col`` (the library's Numba kernel) followed by one
``np.matmul`` with the dense (out maps, 9 * in maps) weights; its input gradient is one ``np.matmul`` followed by
``col2im``; its weight gradient is one ``np.matmul`` with the im2col matrix of the forward pass. Fully connected
layers are dense ``np.matmul``. Buffers are reused between batches. There are no masks and no continual-learning
bookkeeping, so this is the cost of training the same network densely, a lower bound for any dense-masked
implementation (such as the official SpaceNet code). A benchmark reference only, not part of the package.
"""
import numpy as np

from spacenet_np import kernels
from spacenet_np.network import softmax_cross_entropy
from spacenet_np.strategy import xavier_bound


class DenseCNN:
    """The dense network: ``conv`` maps per 3 x 3 convolution, pooling after every ``pool_every``, ``hidden`` fully
    connected widths and ``n_classes`` outputs, Xavier-uniform weights drawn from ``seed``."""

    def __init__(self, image_shape=(3, 32, 32), conv=(32, 32, 64, 64), hidden=(512,), n_classes=10, pool_every=2,
                 seed=0):
        rng = np.random.default_rng(seed)
        channels, height, width = image_shape
        self.image_shape = tuple(image_shape)
        self.layers = []  # dicts: kind, W, b, and for convolutions the map size and whether the input is pooled
        pool_next = False
        for i, maps in enumerate(conv):
            if pool_next:
                height, width = height // 2, width // 2
            bound = xavier_bound(9 * channels, 9 * maps)
            self.layers.append({"kind": "conv", "pooled": pool_next, "hw": (height, width),
                                "W": rng.uniform(-bound, bound, (maps, 9 * channels)).astype(np.float32),
                                "b": np.zeros(maps, np.float32)})
            channels = maps
            pool_next = (i + 1) % pool_every == 0
        if pool_next:
            height, width = height // 2, width // 2
        fan_in = channels * height * width
        for i, units in enumerate([*hidden, n_classes]):
            bound = xavier_bound(fan_in, units)
            self.layers.append({"kind": "fc", "pooled": pool_next and i == 0,
                                "W": rng.uniform(-bound, bound, (units, fan_in)).astype(np.float32),
                                "b": np.zeros(units, np.float32)})
            fan_in = units
        self._buffers = {}

    def _buffer(self, name, shape, dtype=np.float32):
        if name not in self._buffers or self._buffers[name].shape != shape:
            self._buffers[name] = np.empty(shape, dtype)
        return self._buffers[name]

    def forward(self, x):
        """Logits (n_classes, batch) of x (n_features, batch) float32, and what the backward pass needs: each
        layer's input, im2col matrix and pooling winners."""
        batch = x.shape[1]
        inputs, cols, argmax = [], [], []
        h = x.reshape(*self.image_shape, batch)
        last = len(self.layers) - 1
        for l, layer in enumerate(self.layers):
            if layer["pooled"]:
                c, hh, ww, _ = h.shape
                pooled = self._buffer(f"pool{l}", (c, hh // 2, ww // 2, batch))
                winners = self._buffer(f"argmax{l}", pooled.shape, np.uint8)
                kernels.pick_by_elements(kernels.max_pool2, h.size)(h, pooled, winners)
                argmax.append(winners)
                h = pooled
            else:
                argmax.append(None)
            if layer["kind"] == "fc":
                h = h.reshape(-1, batch)
                inputs.append(h)
                cols.append(None)
                out = self._buffer(f"out{l}", (layer["W"].shape[0], batch))
                np.matmul(layer["W"], h, out=out)
            else:
                inputs.append(h)
                col = self._buffer(f"cols{l}", (9 * h.shape[0],) + h.shape[1:])
                kernels.pick(kernels.im2col, col.size)(h, col)
                cols.append(col)
                out = self._buffer(f"out{l}", (layer["W"].shape[0],) + h.shape[1:])
                np.matmul(layer["W"], col.reshape(col.shape[0], -1), out=out.reshape(out.shape[0], -1))
            flat = out.reshape(out.shape[0], -1)
            kernels.pick_by_elements(kernels.add_bias, flat.size)(flat, layer["b"], l < last)
            h = out
        return h, inputs, cols, argmax

    def train_step(self, x, labels, lr):
        """Forward, loss, backward and SGD on every weight. x (n_features, batch) float32. Returns the loss."""
        batch = x.shape[1]
        h, inputs, cols, argmax = self.forward(x)
        last = len(self.layers) - 1
        loss, delta = softmax_cross_entropy(h, labels)
        for l in range(last, -1, -1):
            layer = self.layers[l]
            flat_delta = delta.reshape(delta.shape[0], -1)
            below = None
            if layer["kind"] == "fc":
                if l > 0:
                    below = layer["W"].T @ delta
                    below *= inputs[l] > 0
                grad = delta @ inputs[l].T
            else:
                col = cols[l]
                if l > 0:
                    grad_cols = self._buffer(f"grad_cols{l}", col.shape)
                    np.matmul(layer["W"].T, flat_delta, out=grad_cols.reshape(col.shape[0], -1))
                    below = self._buffer(f"below{l}", inputs[l].shape)
                    kernels.pick(kernels.col2im, col.size)(grad_cols, inputs[l], below)
                grad = flat_delta @ col.reshape(col.shape[0], -1).T
            layer["b"] -= lr * flat_delta.sum(axis=1)
            layer["W"] -= lr * grad
            if below is not None and layer["pooled"]:
                winners = argmax[l]
                pre = self._buffer(f"pre{l}", (winners.shape[0], 2 * winners.shape[1], 2 * winners.shape[2], batch))
                kernels.pick_by_elements(kernels.max_pool2_backward, pre.size)(below.reshape(winners.shape), winners,
                                                                               pre, kernels.NO_LEAVES)
                below = pre
            delta = below
        return loss
