"""One ``Learner.train_step`` inside a real task: every trainable weight and bias moves by exactly ``-lr * dL/dW``
at the pre-update weights, computed here by a dense float64 NumPy forward and backward pass from the layers'
arrays (rows, indices, weights, biases); Omega grows by ``lr * g**2``; nothing else changes. An MLP is checked on
both paths of ``train_step``: the fused kernel (the default) and the per-layer one. And the memory one step
allocates does not grow with the layer width; the fused step allocates no array at all.
"""
import tracemalloc

import numpy as np
import pytest
from helpers import make_blobs, task_split

from spacenet_np.layers import SparseConv2d
from spacenet_np.network import SparseCNN, SparseMLP
from spacenet_np.spacenet import SpaceNet, SpaceNetConfig

TAPS = [(t // 3 - 1, t % 3 - 1) for t in range(9)]  # (dy, dx) of a kernel's tap t


# ----- dense float64 references -----
def shifted(x, dy, dx):
    """``s[c, h, w, b] = x[c, h + dy, w + dx, b]``, 0 outside the map. x (c, H, W, batch)."""
    _, height, width, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return padded[:, 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]


def dense_weights(layer):
    """(out slots, in slots) for a fully connected layer, (out maps, in maps, 9) for a convolution; float64."""
    dense = np.zeros((layer.out_index.n_slots, layer.in_index.n_slots, layer.taps))
    dense[layer.rows, layer.indices] = layer.weights.reshape(layer.nnz, layer.taps)
    return dense[..., 0] if layer.taps == 1 else dense


def apply(layer, W, a):
    """The layer's pre-activation for input a (no bias)."""
    if isinstance(layer, SparseConv2d):
        return sum(np.einsum("oc,chwb->ohwb", W[:, :, t], shifted(a, dy, dx)) for t, (dy, dx) in enumerate(TAPS))
    return W @ a


def apply_transpose(layer, W, d):
    if isinstance(layer, SparseConv2d):
        return sum(np.einsum("oc,ohwb->chwb", W[:, :, t], shifted(d, -dy, -dx)) for t, (dy, dx) in enumerate(TAPS))
    return W.T @ d


def weight_gradient(layer, d, a):
    """dL/dW over every (out, in) position: (out, in) or (out, in, 9)."""
    if isinstance(layer, SparseConv2d):
        return np.stack([np.einsum("ohwb,chwb->oc", d, shifted(a, dy, dx)) for dy, dx in TAPS], axis=-1)
    return d @ a.T


def pool(a):
    """2 x 2 max pooling of (C, H, W, batch): (values, winner 2 dy + dx, the first of equal values)."""
    windows = np.stack([a[:, dy::2, dx::2] for dy in range(2) for dx in range(2)], axis=-1)
    return windows.max(axis=-1), windows.argmax(axis=-1)


def unpool(d, winner):
    out = np.zeros((d.shape[0], 2 * d.shape[1], 2 * d.shape[2], d.shape[3]))
    for t in range(4):
        out[:, t // 2::2, t % 2::2] = np.where(winner == t, d, 0.0)
    return out


def reference_gradients(model, x, labels, loss_classes=None):
    """Loss, dL/dW (dense, per layer) and dL/db of ``model`` (SparseMLP or SparseCNN) in float64.

    x (n_features, batch); ``loss_classes`` (n_classes,) bool restricts the softmax like the engine's."""
    batch = x.shape[1]
    cnn = isinstance(model, SparseCNN)
    a = x.astype(np.float64).reshape(*model.image_shape, batch) if cnn else x.astype(np.float64)
    weights = [dense_weights(layer) for layer in model.layers]
    inputs, pre, winners = [], [], []
    for l, layer in enumerate(model.layers):
        winners.append(None)
        if cnn and model.pooled_input[l]:
            a, winners[l] = pool(a)
        if not isinstance(layer, SparseConv2d):
            a = a.reshape(-1, batch)
        inputs.append(a)
        z = apply(layer, weights[l], a) + layer.bias.astype(np.float64).reshape(-1, *[1] * (a.ndim - 1))
        pre.append(z)
        a = np.maximum(z, 0.0)
    logits = np.where(loss_classes[:, None], pre[-1], -np.inf) if loss_classes is not None else pre[-1]
    log_p = logits - logits.max(axis=0) - np.log(np.exp(logits - logits.max(axis=0)).sum(axis=0))
    loss = -np.mean(log_p[labels, np.arange(batch)])
    d = np.exp(log_p)
    d[labels, np.arange(batch)] -= 1.0
    d /= batch
    weight_grads, bias_grads = [None] * len(model.layers), [None] * len(model.layers)
    for l in range(len(model.layers) - 1, -1, -1):
        layer = model.layers[l]
        weight_grads[l] = weight_gradient(layer, d, inputs[l])
        bias_grads[l] = d.reshape(d.shape[0], -1).sum(axis=1)
        if l == 0:
            break
        d = apply_transpose(layer, weights[l], d)
        if winners[l] is not None:
            d = unpool(d.reshape(winners[l].shape), winners[l])
        d = d.reshape(pre[l - 1].shape) * (pre[l - 1] > 0)
    return loss, weight_grads, bias_grads


# ----- one step inside a task -----
def assert_moved(after, before, step, scale):
    """``after - before == step`` up to float32 rounding: of the update (relative 1e-3), of ``before`` (a few ulp)
    and of the float32 gradient (1e-5 of ``scale``, the layer's largest step)."""
    moved = np.asarray(after, np.float64) - before
    tolerance = 1e-3 * np.abs(step) + 1e-5 * scale + 4 * np.finfo(np.float32).eps * np.abs(before)
    excess = np.abs(moved - step) - tolerance
    assert np.all(excess <= 0), f"max excess {np.max(excess)} over a step scale {scale}"


def check_steps(learner, images, labels, classes, n_checked=3, fused=False):
    """Learn the task, the first ``n_checked`` calls of ``train_step`` compared with the reference (each on the fused
    path if ``fused``, else on the per-layer one). Returns the largest weight step checked."""
    model, lr = learner.model, learner.config.lr
    original, largest, steps = learner.train_step, [], []

    def compared_step(x, batch_labels):
        if len(steps) == n_checked:
            return original(x, batch_labels)
        assert learner.fused_step_applies(x, batch_labels) == fused
        ref_loss, ref_w, ref_b = reference_gradients(model, x, batch_labels, getattr(learner, "loss_classes", None))
        before = [(layer.weights.copy(), layer.bias.copy(), layer.importance.copy()) for layer in model.layers]
        trainable, masks = [t.copy() for t in learner.trainable], [m.copy() for m in learner.bias_trainable]
        loss = original(x, batch_labels)
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
        for l, layer in enumerate(model.layers):
            w0, b0, omega0 = before[l]
            k = trainable[l]
            g = ref_w[l][layer.rows[k], layer.indices[k]].reshape(layer.weight_shape(k.size))
            scale = lr * max(np.max(np.abs(ref_w[l]), initial=0.0), np.max(np.abs(ref_b[l]), initial=0.0))
            assert_moved(layer.weights[k], w0[k], -lr * g, scale)
            frozen = np.setdiff1d(np.arange(layer.nnz), k)
            assert np.array_equal(layer.weights[frozen], w0[frozen]), f"layer {l}: a frozen weight moved"
            omega = lr * (g ** 2).reshape(k.size, -1).sum(axis=1)
            np.testing.assert_allclose(layer.importance[k] - omega0[k], omega, rtol=1e-3, atol=1e-5 * scale ** 2)
            assert_moved(layer.bias, b0, -lr * ref_b[l] * masks[l], scale)
            largest.append(float(lr * np.max(np.abs(g), initial=0.0)))
        steps.append(loss)
        return loss

    learner.train_step = compared_step
    learner.learn(images, labels, classes)
    learner.train_step = original
    assert len(steps) == n_checked
    return max(largest)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("softmax_scope", ["all", "seen"])
def test_train_step_is_exact_sgd_on_an_mlp(fused, softmax_scope):
    images, labels = make_blobs(6, 16, 30, seed=2, spread=40.0)
    config = SpaceNetConfig(connections_per_task=(60, 40, 12), selected_neurons=(10, 8), reserved_neurons=(3, 3),
                            rewire_ratio=0.3, epochs=2, batch_size=16, lr=0.2, softmax_scope=softmax_scope)
    learner = SpaceNet(SparseMLP(16, [30, 25], 6), config, seed=1)
    learner.fused_step = fused
    for classes in ([0, 1], [2, 3], [4, 5]):  # later tasks: frozen old weights, reserved biases
        assert check_steps(learner, *task_split(images, labels, classes), classes, fused=fused) > 1e-4


@pytest.mark.parametrize("conv", [(3, 3), (3,)], ids=["pooled", "unpooled"])  # (3,): the FC layer reads the conv
@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_train_step_is_exact_sgd_on_a_cnn(path, conv):
    images, labels = make_blobs(4, 32, 12, seed=4, spread=40.0)
    config = SpaceNetConfig(connections_per_task=(2, 3)[:len(conv)] + (20, 6),
                            selected_neurons=(None,) * (len(conv) + 1),
                            reserved_neurons=(1, 1)[:len(conv)] + (2,), rewire_ratio=0.3, epochs=2, batch_size=8,
                            lr=0.1, init_fan="connections")
    model = SparseCNN((2, 4, 4), conv, (6,), 4)
    for layer in model.layers:
        if isinstance(layer, SparseConv2d):
            layer.force_path = path
    learner = SpaceNet(model, config, seed=5)
    for classes in ([0, 1], [2, 3]):
        assert check_steps(learner, *task_split(images, labels, classes), classes) > 1e-4


# ----- memory per step does not follow the width -----
def step_peak_bytes(width, fused, step=2):
    """tracemalloc peak of one train_step of the 2nd task (``step``: 2, the 3rd, the first batch of 16 samples after
    two of 32; 5, the same batch in the second epoch) of an MLP with hidden layers of ``width``."""
    images, labels = make_blobs(4, 16, 40, seed=3, spread=15.0)
    config = SpaceNetConfig(connections_per_task=(200, 150, 30), selected_neurons=(20, 20), reserved_neurons=(6, 6),
                            rewire_ratio=0.2, epochs=2, batch_size=32, lr=0.05, init_fan="selected")
    learner = SpaceNet(SparseMLP(16, [width, width], 4), config, seed=4)
    learner.fused_step = fused
    learner.learn(*task_split(images, labels, [0, 1]), [0, 1])
    original, peaks = learner.train_step, []

    def measured_step(x, batch_labels):
        if len(peaks) != step:
            peaks.append(None)
            return original(x, batch_labels)
        tracemalloc.start()
        try:
            loss = original(x, batch_labels)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        return loss

    learner.train_step = measured_step
    learner.learn(*task_split(images, labels, [2, 3]), [2, 3])
    return peaks[step]


@pytest.mark.parametrize("fused", [True, False])
def test_memory_of_a_step_does_not_grow_with_the_width(fused):
    narrow, wide = step_peak_bytes(400, fused), step_peak_bytes(1_000_000, fused)
    assert 0 < narrow and wide < 1.5 * narrow + 4096, (narrow, wide)
    if fused:  # once the buffers of the last batch's size exist: no array, only Python objects (argument tuples,
        # Numba's dispatch), the same at any width
        narrow, wide = step_peak_bytes(400, fused, step=5), step_peak_bytes(1_000_000, fused, step=5)
        assert narrow == wide and narrow < 4096, (narrow, wide)
