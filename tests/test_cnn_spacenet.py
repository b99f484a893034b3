"""SpaceNet on the sparse CNN (paper, Sec. 4): kernel-level (structured) sparsity in the convolutions.

A connection of a ``SparseConv2d`` is a whole 3 x 3 kernel (``weights`` (nnz, 9)), the unit of allocation,
drop, grow and reservation; its importance is the sum of its nine weights' Omega, and a map's importance the
sum of the task's ingoing kernel importances. The property tests drive the real ``SpaceNet.learn`` on tiny
networks (8 x 8 images of 1-2 channels, 3-6 maps per convolution) and wrap the instance's ``allocate``,
``rewire``, ``drop``, ``reserve``, ``train_epoch`` and ``weight_grad`` to inspect every step. Then FineTune
on a CNN, checkpoints of CNN learners and models, and the CLI on tiny generated CIFAR-10 and MNIST folders.
"""
import json
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
from helpers import (
    C10_TRAIN,
    N10_BATCH,
    N100_TEST,
    N100_TRAIN,
    interrupt_after,
    make_blobs,
    results_without_time,
    task_split,
    write_cifar10,
    write_cifar100,
    write_tiny_dataset,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from spacenet_np import data, train
from spacenet_np.checkpoint import load, predict_from_checkpoint, restore_learner, save_learner, save_model
from spacenet_np.layers import FREE, SparseConv2d
from spacenet_np.methods import METHODS, FineTune
from spacenet_np.network import SparseCNN
from spacenet_np.spacenet import SpaceNet, SpaceNetConfig, StaticSparseNN
from spacenet_np.strategy import predict, xavier_bound

CLASSES_PER_TASK = 2
SIDE = 8  # images are (channels, 8, 8)
TAPS = 9
PROPERTY = settings(max_examples=15, deadline=None)


# ----- a random tiny CNN and a config that fits it -----
@dataclass
class Setup:
    channels: int
    conv: tuple
    hidden: int
    n_tasks: int
    config: SpaceNetConfig
    seed: int

    @property
    def n_classes(self):
        return CLASSES_PER_TASK * self.n_tasks

    @property
    def n_features(self):
        return self.channels * SIDE * SIDE

    def task_classes(self, t):
        return np.arange(CLASSES_PER_TASK * t, CLASSES_PER_TASK * (t + 1))

    def model(self):
        return SparseCNN((self.channels, SIDE, SIDE), self.conv, (self.hidden,), self.n_classes)

    def learner(self, cls=SpaceNet):
        return cls(self.model(), self.config, seed=self.seed, input_mean=0.5, input_std=0.25)

    def data(self):
        """Per task: (images uint8 (n, channels * 64), labels)."""
        images, labels = make_blobs(self.n_classes, self.n_features, 12, seed=self.seed % 1000)
        return [task_split(images, labels, self.task_classes(t)) for t in range(self.n_tasks)]


def max_reserved(width, n_tasks, keep):
    """The largest per-task reservation that leaves ``max(spec, keep)`` free neurons for the last task."""
    return max(r for r in range(width + 1) if width - (n_tasks - 1) * r >= max(r, keep))


@st.composite
def setups(draw, n_tasks=st.integers(2, 3), epochs=st.integers(2, 3)):
    """A tiny CNN and a config SpaceNet can learn ``n_tasks`` tasks with.

    Every layer gets a density (a float) whose count ``round(density * fan_in * fan_out)`` fits ``n_tasks``
    times into the block of the last task (free out maps x free in maps), which also holds the old tasks'
    kernels that sit in maps left free; the output layer's block is the task's classes x the free hidden
    neurons.
    """
    n_tasks = draw(n_tasks)
    channels = draw(st.integers(1, 2))
    n_conv = draw(st.sampled_from([2, 4]))
    conv = tuple(draw(st.integers(3, 6)) for _ in range(n_conv))
    hidden = draw(st.integers(6, 12))
    reserved = [draw(st.integers(0, max_reserved(maps, n_tasks, n_tasks))) for maps in conv]
    reserved.append(draw(st.integers(0, min(3, max_reserved(hidden, n_tasks, 1)))))
    side = SIDE // 2 ** (n_conv // 2)
    flat = conv[-1] * side * side
    free_conv = [maps - (n_tasks - 1) * r for maps, r in zip(conv, reserved[:-1])]
    free_hidden = hidden - (n_tasks - 1) * reserved[-1]
    fans = zip([channels, *conv[:-1], flat, hidden], [*conv, hidden, CLASSES_PER_TASK * n_tasks])
    in_free = [channels, *free_conv[:-1], flat, free_hidden]  # per layer, at the last task
    out_free = [*free_conv, free_hidden, CLASSES_PER_TASK]
    densities = []
    for l, (fan_in, fan_out) in enumerate(fans):
        if l == n_conv + 1:  # output rows are the task's own classes: no old connections there
            high = out_free[l] * in_free[l]
        else:
            high = out_free[l] * in_free[l] // n_tasks
        count = draw(st.integers(1, min(high, fan_in * fan_out - 1, 300)))
        offset = draw(st.floats(-0.4, 0.4))
        densities.append((count + offset) / (fan_in * fan_out))
    config = SpaceNetConfig(connections_per_task=tuple(densities), selected_neurons=(None,) * len(reserved),
                            reserved_neurons=tuple(reserved), rewire_ratio=draw(st.floats(0.0, 0.8)),
                            epochs=draw(epochs), batch_size=draw(st.sampled_from([8, 16])), lr=0.05,
                            init_fan=draw(st.sampled_from(["connections", "connections", "layer",
                                                           "selected"])))
    return Setup(channels, conv, hidden, n_tasks, config, draw(st.integers(0, 2**32 - 1)))


# ----- helpers -----
def expected_count(config, l, layer):
    """Kernels (connections) per task in layer ``l``: round(density * fan_in * fan_out), at least 1."""
    return max(1, int(round(config.connections_per_task[l] * layer.in_index.width * layer.out_index.width)))


def is_conv(layer):
    return isinstance(layer, SparseConv2d)


def positions(layer):
    """Every connection by (out slot, in slot) -> (owner, weights bytes, importance); slots are map ids."""
    return {(int(r), int(c)): (int(o), w.tobytes(), float(i)) for r, c, o, w, i in
            zip(layer.rows, layer.indices, layer.owner, layer.weights, layer.importance)}


def kernel_weights(layer):
    """(out slot, in slot) -> the connection's weights, (9,) for a kernel."""
    return {(int(r), int(c)): w.copy() for r, c, w in zip(layer.rows, layer.indices, layer.weights)}


def assert_whole_kernels(layer):
    """A convolution stores whole kernels: (nnz, 9) weights over (1, 9) BSR blocks, aligned per-kernel arrays,
    one kernel per (out map, in map) position, canonical order."""
    assert layer.W.blocksize == (1, TAPS)
    assert layer.W.data.shape == (layer.nnz, 1, TAPS)
    assert layer.weights.shape == (layer.nnz, TAPS)
    assert layer.owner.shape == layer.importance.shape == layer.rows.shape == (layer.nnz,)
    keys = layer.rows.astype(np.int64) * layer.in_index.n_slots + layer.indices
    assert np.all(np.diff(keys) > 0), "kernels must be sorted by (out map, in map), without duplicates"
    assert layer.col_ptr[-1] == layer.nnz and np.all(np.diff(layer.indices[layer.col_order]) >= 0)


def not_reserved_before(neurons, slots, task):
    """Whether each slot is free or reserved by ``task`` or later (never by an earlier task)."""
    owner = neurons.reserved_by[slots]
    return (owner == FREE) | (owner >= task)


def learn_all(learner, setup, data, after_task=None):
    states = []
    for t in range(setup.n_tasks):
        states.append(learner.learn(*data[t], setup.task_classes(t)))
        if after_task is not None:
            after_task(t, states[-1])
    return states


@contextmanager
def sparse_path(model):
    """Force the direct sparse convolution, whose result per map depends only on that map's kernels."""
    saved = [layer.force_path for layer in model.layers if is_conv(layer)]
    for layer in model.layers:
        if is_conv(layer):
            layer.force_path = "sparse"
    try:
        yield
    finally:
        for layer, path in zip([layer for layer in model.layers if is_conv(layer)], saved):
            layer.force_path = path


# ----- Algorithm 2: allocation of whole kernels -----
@PROPERTY
@given(setup=setups())
def test_allocation_places_whole_kernels_only_into_free_maps(setup):
    sn = setup.learner()
    model, cfg = sn.model, setup.config
    last = len(model.layers) - 1
    allocate = sn.allocate
    seen = []

    def checked_allocate(classes):
        free_before = [neurons.reserved_by == FREE for neurons in model.neurons]
        before = [positions(layer) for layer in model.layers]
        state = allocate(classes)
        t = state.task
        for position in model.hidden_positions:  # selected_neurons None: every map / neuron (Sec. 5.3.1)
            assert np.array_equal(state.selected[position], np.arange(model.neurons[position].width))
            assert np.array_equal(sn.targets(state, position=position), np.flatnonzero(free_before[position]))
        for l, layer in enumerate(model.layers):
            k = layer.connections_of(t)
            count = expected_count(cfg, l, layer)
            assert k.size == count, f"layer {l}: {k.size} connections for the task, expected {count}"
            assert layer.nnz == len(before[l]) + count
            after = positions(layer)
            assert all(after[key] == value for key, value in before[l].items()), "old connections changed"
            rows, cols = layer.rows[k], layer.indices[k]
            if l < last:
                assert np.all(free_before[layer.out_pos][rows]), f"layer {l}: a kernel into a reserved map"
            else:
                assert np.all(np.isin(rows, state.classes)), "output connections go into the task's classes"
            assert np.all(np.isin(cols, state.selected[layer.in_pos])), f"layer {l}: an unselected input"
            assert np.all(layer.importance[k] == 0.0)
            taps = TAPS if is_conv(layer) else 1
            if is_conv(layer):
                assert_whole_kernels(layer)
                assert layer.weights[k].shape == (count, TAPS)
                assert np.all(layer.weights[k] != 0.0), "every new kernel has nine live weights"
            # Xavier-uniform over the kernels' taps.
            n_rows = state.classes.size if l == last else int(free_before[layer.out_pos].sum())
            n_cols = state.selected[layer.in_pos].size
            fans = {"layer": (layer.in_index.width * taps, layer.out_index.width * taps),
                    "selected": (n_cols * taps, n_rows * taps),
                    "connections": (count / n_rows * taps, count / n_cols * taps)}[cfg.init_fan]
            bound = xavier_bound(*fans)
            magnitude = np.abs(layer.weights[k])
            assert magnitude.max() <= bound * (1 + 1e-6)
            if magnitude.size >= 45:
                assert magnitude.max() > bound / 3
        seen.append(t)
        return state

    sn.allocate = checked_allocate
    learn_all(sn, setup, setup.data())
    assert seen == list(range(setup.n_tasks))
    for l, layer in enumerate(model.layers):  # one per-task count per task, nothing lost
        for t in range(setup.n_tasks):
            assert layer.connections_of(t).size == expected_count(setup.config, l, layer)


def test_density_is_rounded_over_the_full_layer_shape():
    """round(0.3 * in maps * out maps) kernels per convolution, for a (2, 8, 8) -> 3-4-5-6 -> 7 -> 4 CNN."""
    model = SparseCNN((2, 8, 8), (3, 4, 5, 6), (7,), 4)
    config = SpaceNetConfig(connections_per_task=(0.3,) * 6, selected_neurons=(None,) * 5,
                            reserved_neurons=(1, 1, 1, 1, 2), epochs=1, batch_size=8, lr=0.05,
                            init_fan="connections")
    sn = SpaceNet(model, config, seed=1, input_mean=0.5, input_std=0.25)
    images, labels = make_blobs(4, 128, 12, seed=2)
    sn.learn(*task_split(images, labels, [0, 1]), [0, 1])
    # 0.3 * (2*3, 3*4, 4*5, 5*6, 24*7, 7*4) = 1.8, 3.6, 6, 9, 50.4, 8.4
    assert model.connection_counts() == [2, 4, 6, 9, 50, 8]
    assert [layer.weights.shape for layer in model.layers] == [(2, 9), (4, 9), (6, 9), (9, 9), (50,), (8,)]
    sn.learn(*task_split(images, labels, [2, 3]), [2, 3])
    assert model.connection_counts() == [4, 8, 12, 18, 100, 16]


# ----- Algorithm 3: drop and grow whole kernels -----
@PROPERTY
@given(setup=setups())
def test_rewire_drops_and_grows_whole_kernels(setup):
    sn = setup.learner()
    model = sn.model
    last = len(model.layers) - 1
    rewire, drop = sn.rewire, sn.drop
    dropped_keys = {}
    rewires = [0]

    def recording_drop(layer, task):
        rows, cols = layer.rows.copy(), layer.indices.copy()
        dropped = drop(layer, task)
        assert layer.weights.shape[1:] == ((TAPS,) if is_conv(layer) else ())
        dropped_keys[id(layer)] = {(int(rows[k]), int(cols[k])) for k in dropped}
        return dropped

    def checked_rewire(state):
        t = state.task
        importance = sn.neuron_importance(t)
        before = [positions(layer) for layer in model.layers]
        dropped_keys.clear()
        rewire(state)
        rewires[0] += 1
        for l, layer in enumerate(model.layers):
            after = positions(layer)
            if l == last:
                assert after == before[l], "the output layer is not rewired"
                continue
            if is_conv(layer):
                assert_whole_kernels(layer)
            old_mine = {key for key, value in before[l].items() if value[0] == t}
            new_mine = {key for key, value in after.items() if value[0] == t}
            assert len(new_mine) == len(old_mine), f"layer {l}: the task's kernel count changed"
            dropped = dropped_keys[id(layer)]
            assert dropped <= old_mine and len(dropped) == int(setup.config.rewire_ratio * len(old_mine))
            kept = old_mine - dropped
            if dropped and kept:  # the least important of the task's kernels (kernel Omega) are dropped
                assert max(before[l][key][2] for key in dropped) <= min(before[l][key][2] for key in kept)
            for key in kept:
                assert after[key] == before[l][key], "kept kernels must not change in a rewire"
            for key, value in before[l].items():
                if value[0] != t:
                    assert after.get(key) == value, "other tasks' kernels must not change"
            grown = new_mine - kept
            assert len(grown) == len(dropped)
            zero = np.zeros(TAPS if is_conv(layer) else 1, np.float32).tobytes()
            for key in grown:
                assert after[key][1] == zero and after[key][2] == 0.0, "a grown kernel is all zero, Omega 0"
            # Into free maps, from any selected map (every map: reserved ones feed the next layer); fresh
            # positions (empty before the drop) first, best a_out * a_in.
            rows, cols = sn.targets(state, layer), state.selected[layer.in_pos]
            grown_rows = np.array([r for r, _ in grown], dtype=np.int64)
            grown_cols = np.array([c for _, c in grown], dtype=np.int64)
            assert np.all(np.isin(grown_rows, rows)) and np.all(np.isin(grown_cols, cols))
            assert np.all(model.neurons[layer.out_pos].reserved_by[grown_rows] == FREE)
            fresh = {(int(r), int(c)) for r in rows for c in cols} - set(before[l])
            assert grown <= fresh | dropped
            grown_fresh = grown & fresh
            assert len(grown_fresh) == min(len(dropped), len(fresh))

            def score(key):
                return importance[layer.out_pos][key[0]] * importance[layer.in_pos][key[1]]

            if grown_fresh and fresh - grown_fresh:
                assert min(map(score, grown_fresh)) >= max(map(score, fresh - grown_fresh))

    sn.rewire, sn.drop = checked_rewire, recording_drop
    learn_all(sn, setup, setup.data())
    assert rewires[0] == setup.n_tasks * (setup.config.epochs - 1)


@PROPERTY
@given(setup=setups(n_tasks=st.integers(1, 2)))
def test_kernel_importance_is_the_sum_of_its_nine_omegas_and_drop_takes_the_least(setup):
    """An independent float64 Omega per weight (sum over steps of lr * g**2, from the gradients SGD used): a
    kernel's importance is the sum of its nine, and every drop removes the kernels with the least of it."""
    sn = setup.learner()
    model, lr = sn.model, setup.config.lr
    omega = defaultdict(lambda: np.zeros(TAPS))  # (task, layer, out map, in map) -> per-weight Omega
    weight_grad, rewire, drop = sn.weight_grad, sn.rewire, sn.drop
    task = [0]
    checks = {"drops": 0, "kernels": 0}

    def recording_weight_grad(l, connections, delta, inputs):
        grad = weight_grad(l, connections, delta, inputs)
        layer = model.layers[l]
        if is_conv(layer):
            assert grad.shape == (connections.size, TAPS)
            g = grad.astype(np.float64)
            for q, k in enumerate(connections):
                omega[task[0], l, int(layer.rows[k]), int(layer.indices[k])] += lr * g[q] ** 2
        return grad

    def assert_importance_matches(t):
        for l, layer in enumerate(model.layers):
            if not is_conv(layer):
                continue
            k = layer.connections_of(t)
            reference = np.array([omega[t, l, int(r), int(c)].sum()
                                  for r, c in zip(layer.rows[k], layer.indices[k])])
            np.testing.assert_allclose(layer.importance[k], reference, rtol=2e-4, atol=1e-12)
            checks["kernels"] += k.size

    def checked_drop(layer, t):
        keys = [(int(r), int(c)) for r, c in zip(layer.rows, layer.indices)]
        mine = layer.connections_of(t)
        dropped = drop(layer, t)
        if is_conv(layer) and dropped.size:
            l = model.layers.index(layer)
            reference = {k: omega[t, l, keys[k][0], keys[k][1]].sum() for k in mine}
            kept = np.setdiff1d(mine, dropped)
            if kept.size:
                least_kept = min(reference[k] for k in kept)
                assert max(reference[k] for k in dropped) <= least_kept * (1 + 2e-4) + 1e-12
            for k in dropped:  # a regrown position starts over
                omega.pop((t, l, *keys[k]), None)
            checks["drops"] += 1
        return dropped

    def checked_rewire(state):
        assert_importance_matches(state.task)
        rewire(state)

    def after_task(t, state):
        assert_importance_matches(t)
        task[0] = t + 1

    sn.weight_grad, sn.rewire, sn.drop = recording_weight_grad, checked_rewire, checked_drop
    learn_all(sn, setup, setup.data(), after_task)
    assert checks["kernels"] > 0
    if setup.config.rewire_ratio * min(expected_count(setup.config, l, layer) for l, layer
                                       in enumerate(model.layers) if is_conv(layer)) >= 1:
        assert checks["drops"] > 0


def _second_task_by_hand(setup):
    """Learn task 0, then allocate task 1, set the old heads aside and train one epoch, as ``learn`` does."""
    sn = setup.learner()
    data = setup.data()
    sn.learn(*data[0], setup.task_classes(0))
    state = sn.allocate(setup.task_classes(1))
    sn.set_aside_old_heads(state.task)
    sn.refresh_trainable(state)
    sn.train_epoch(state, *data[1], 0)
    return sn, state


@settings(max_examples=8, deadline=None)
@given(setup=setups(n_tasks=st.just(2)), seed=st.integers(0, 2**16))
def test_drop_and_grow_called_directly_move_whole_kernels(setup, seed):
    """Drop and grow on each convolution, with distinct importances and a distinct weight pattern per kernel:
    the k least important kernels leave whole, every other kernel keeps its nine weights, and grow puts zero
    kernels at the empty positions of the free block with the largest a_out * a_in."""
    sn, state = _second_task_by_hand(setup)
    rng = np.random.default_rng(seed)
    importance = sn.neuron_importance(state.task)
    for layer in sn.model.layers:
        if not is_conv(layer):
            continue
        mine = layer.connections_of(state.task)
        layer.importance[mine] = rng.permutation(mine.size).astype(np.float32) + 1.0
        layer.weights[:] = (np.arange(layer.nnz)[:, None] * 16 + np.arange(TAPS)).astype(np.float32)
        before, pattern = positions(layer), kernel_weights(layer)
        rows, cols = state.selected[layer.out_pos], state.selected[layer.in_pos]
        occupied = sn._occupied(layer, rows, cols)
        count = int(setup.config.rewire_ratio * mine.size)
        least = {(int(layer.rows[k]), int(layer.indices[k]))
                 for k in mine[np.argsort(layer.importance[mine])[:count]]}

        dropped = sn.drop(layer, state.task)

        assert dropped.size == count
        assert set(positions(layer)) == set(before) - least, "exactly the least important kernels leave"
        assert_whole_kernels(layer)
        for key, w in kernel_weights(layer).items():
            assert np.array_equal(w, pattern[key]), "a kernel lost or mixed up some of its nine weights"
            assert positions(layer)[key] == before[key]

        sn.grow(layer, state.task, rows, cols, importance[layer.out_pos], importance[layer.in_pos], occupied,
                dropped.size)

        assert_whole_kernels(layer)
        after = positions(layer)
        assert layer.connections_of(state.task).size == mine.size
        grown = set(after) - (set(before) - least)
        assert len(grown) == count
        fresh_keys = {(int(rows[i // cols.size]), int(cols[i % cols.size])) for i in
                      np.setdiff1d(np.arange(rows.size * cols.size), occupied)}
        assert grown <= fresh_keys | least, "grown only where the block was empty before the drop, or regrown"
        for key in grown:
            assert after[key][0] == state.task and after[key][2] == 0.0
            assert not np.any(kernel_weights(layer)[key]), "a grown kernel has nine zero weights"
            assert key[0] in rows and key[1] in cols
        for key in set(before) - least:
            assert after[key] == before[key]
        score = np.outer(importance[layer.out_pos][rows], importance[layer.in_pos][cols]).ravel()
        local = {(int(rows[i // cols.size]), int(cols[i % cols.size])): score[i] for i in range(score.size)}
        grown_fresh = grown & fresh_keys
        other_fresh = fresh_keys - grown_fresh
        assert len(grown_fresh) == min(count, len(fresh_keys)), "fresh positions are used first"
        if grown_fresh and other_fresh:
            assert min(local[k] for k in grown_fresh) >= max(local[k] for k in other_fresh)


# ----- Algorithm 4: reservation of maps -----
def map_importance(layer, task):
    """Per out slot: the sum of ``task``'s ingoing kernel (connection) importances, in float64."""
    mine = layer.owner == task
    return np.bincount(layer.rows[mine], weights=layer.importance[mine].astype(np.float64),
                       minlength=layer.out_index.n_slots)


@PROPERTY
@given(setup=setups())
def test_reservation_takes_the_most_important_selected_maps(setup):
    sn = setup.learner()
    model, cfg = sn.model, setup.config
    reserve = sn.reserve
    layer_into = {layer.out_pos: layer for layer in model.layers}
    calls = [0]

    def checked_reserve(state):
        t = state.task
        free_before = [neurons.reserved_by == FREE for neurons in model.neurons]
        reserved_before = [neurons.reserved_by.copy() for neurons in model.neurons]
        reserve(state)
        for h, position in enumerate(model.hidden_positions):
            neurons = model.neurons[position]
            assert np.array_equal(state.selected[position], np.arange(neurons.width))  # every map is selected
            selected = np.flatnonzero(free_before[position])  # reservation candidates: the free ones
            now = neurons.reserved_by[selected] == t
            assert np.count_nonzero(now) == cfg.reserved_neurons[h]
            assert np.count_nonzero(neurons.reserved_by == t) == cfg.reserved_neurons[h]
            old = ~free_before[position]
            assert np.array_equal(neurons.reserved_by[old], reserved_before[position][old])
            importance = map_importance(layer_into[position], t)
            np.testing.assert_allclose(sn.neuron_importance(t)[position], importance, rtol=1e-5, atol=1e-30)
            if now.any() and (~now).any():
                assert importance[selected[now]].min() >= importance[selected[~now]].max() * (1 - 1e-5)
        calls[0] += 1

    def after_task(t, state):
        for h, position in enumerate(model.hidden_positions):
            owners = model.neurons[position].reserved_by
            for earlier in range(t + 1):
                assert np.count_nonzero(owners == earlier) == cfg.reserved_neurons[h]
            neurons = model.neurons[position]
            assert neurons.n_free == neurons.width - (t + 1) * cfg.reserved_neurons[h]

    sn.reserve = checked_reserve
    learn_all(sn, setup, setup.data(), after_task)
    assert calls[0] == setup.n_tasks


# ----- old tasks stay frozen -----
def probe_inputs(model, seed=0):
    """A fixed random input per layer: (in maps, H, W, 3) for a convolution, (in width, 3) otherwise."""
    rng = np.random.default_rng(seed)
    shapes = [(layer.in_index.width, layer.height, layer.width, 3) if is_conv(layer)
              else (layer.in_index.width, 3) for layer in model.layers]
    return [rng.normal(size=shape).astype(np.float32) for shape in shapes]


def layer_outputs(model, probes):
    """Every layer's output (ReLU but in the last) for its probe input."""
    outputs = []
    with sparse_path(model):
        for l, (layer, x) in enumerate(zip(model.layers, probes)):
            out = np.empty((layer.out_index.width,) + x.shape[1:], np.float32)
            layer.forward(x, out, relu=l < len(model.layers) - 1)
            outputs.append(out)
    return outputs


def frozen_activations(model, images):
    """(activations, frozen) per neuron layer for ``images`` through the whole network: a map or neuron is
    frozen when it is reserved and all its ingoing connections come from the input or from frozen maps, so
    nothing a later task may change reaches it. Activations are (width, -1) float32 (the flat features one row
    per feature), None for the last maps (seen as the flat features) and the logits."""
    x = np.ascontiguousarray(((images / 255.0 - 0.5) / 0.25).astype(np.float32).T)
    with sparse_path(model):
        inputs = model.forward(x)
    activations = [None] * len(model.neurons)
    for l, layer in enumerate(model.layers):
        activations[layer.in_pos] = np.array(inputs[l]).reshape(layer.in_index.width, -1)
    frozen = [None] * len(model.neurons)
    frozen[0] = np.ones(model.neurons[0].width, dtype=bool)
    for layer in model.layers[:-1]:
        if frozen[layer.in_pos] is None:  # the flat features: those of frozen last maps
            maps = model.neurons[layer.in_pos - 1].width
            frozen[layer.in_pos] = np.repeat(frozen[layer.in_pos - 1], layer.in_index.width // maps)
        open_rows = layer.rows[~frozen[layer.in_pos][layer.indices]]
        ok = model.neurons[layer.out_pos].reserved_by != FREE
        ok[open_rows] = False
        frozen[layer.out_pos] = ok
    return activations, frozen


@PROPERTY
@given(setup=setups(), static=st.booleans())
def test_old_kernels_reserved_maps_and_heads_are_untouched_by_later_tasks(setup, static):
    """After each later task (training and rewiring): old tasks' kernels are bit-identical (positions,
    weights, owner, Omega), a later task's kernels never enter or leave a map reserved by an earlier one, the
    ingoing kernels of reserved maps give the same outputs, reserved biases and old class biases are
    unchanged, and maps whose whole input cone is reserved compute the same activations on the same images."""
    sn = setup.learner(StaticSparseNN if static else SpaceNet)
    model = sn.model
    data = setup.data()
    images = np.concatenate([x for x, _ in data])[:20]
    probes = probe_inputs(model, setup.seed % 1000)
    snapshots = []
    compared = {"kernels": 0, "frozen_maps": 0}

    def after_task(t, state):
        tables = [positions(layer) for layer in model.layers]
        reserved = [neurons.reserved_by.copy() for neurons in model.neurons]
        biases = [neurons.bias.copy() for neurons in model.neurons]
        outputs = layer_outputs(model, probes)
        activations, frozen = frozen_activations(model, images)
        assert np.all(frozen[1] == (reserved[1] != FREE)), "reserved maps of the first convolution are frozen"
        for l, layer in enumerate(model.layers):
            for task in range(t + 1):  # no task's connection goes into a map an earlier task reserved
                k = layer.connections_of(task)  # (reserved maps may feed later tasks: every map is selected)
                if l < len(model.layers) - 1:
                    assert np.all(not_reserved_before(model.neurons[layer.out_pos], layer.rows[k], task))
        for earlier, (old_tables, old_reserved, old_biases, old_outputs, old_activations, old_frozen) \
                in enumerate(snapshots):
            for l, (old, new) in enumerate(zip(old_tables, tables)):
                old_part = {key: value for key, value in old.items() if value[0] <= earlier}
                new_part = {key: value for key, value in new.items() if value[0] <= earlier}
                assert new_part == old_part, f"layer {l}: kernels of tasks <= {earlier} changed"
                compared["kernels"] += len(old_part)
                layer = model.layers[l]
                if l < len(model.layers) - 1:
                    maps = np.flatnonzero(old_reserved[layer.out_pos] != FREE)
                    assert np.array_equal(reserved[layer.out_pos][maps], old_reserved[layer.out_pos][maps])
                    assert np.array_equal(biases[layer.out_pos][maps], old_biases[layer.out_pos][maps]), \
                        f"layer {l}: a reserved map's bias changed"
                    assert outputs[l][maps].tobytes() == old_outputs[l][maps].tobytes(), \
                        f"layer {l}: a reserved map's ingoing kernels compute something else"
            learned = np.arange(CLASSES_PER_TASK * (earlier + 1))
            assert np.array_equal(biases[-1][learned], old_biases[-1][learned]), "an old class's bias changed"
            for position, was_frozen in enumerate(old_frozen):
                if position == 0 or old_activations[position] is None or was_frozen is None:
                    continue  # the input; the last maps (compared as the flat features); the logits
                assert np.all(frozen[position][was_frozen]), "a frozen map thawed"
                now, then = activations[position][was_frozen], old_activations[position][was_frozen]
                assert now.tobytes() == then.tobytes(), f"neuron layer {position}: frozen output changed"
                compared["frozen_maps"] += int(np.count_nonzero(was_frozen))
        snapshots.append((tables, reserved, biases, outputs, activations, frozen))

    learn_all(sn, setup, data, after_task)
    assert compared["kernels"] > 0
    if setup.config.reserved_neurons[0]:
        assert compared["frozen_maps"] > 0


@settings(max_examples=8, deadline=None)
@given(setup=setups())
def test_old_heads_are_set_aside_and_reserved_biases_do_not_train(setup):
    sn = setup.learner()
    model = sn.model
    out = model.layers[-1]
    train_epoch = sn.train_epoch
    epochs = [0]

    def checked_train_epoch(state, *args, **kwargs):
        assert np.all(out.owner == state.task), "old heads must be out of the network while a task trains"
        assert out.nnz == expected_count(setup.config, len(model.layers) - 1, out)
        for l, layer in enumerate(model.layers):
            assert np.array_equal(sn.trainable[l], layer.connections_of(state.task))
        for l, layer in enumerate(model.layers[:-1]):
            free = (layer.out_index.reserved_by == FREE).astype(np.float32)
            assert np.array_equal(sn.bias_trainable[l], free), "only free maps' biases train"
        assert np.array_equal(np.flatnonzero(sn.bias_trainable[-1]), state.classes)
        train_epoch(state, *args, **kwargs)
        epochs[0] += 1

    def after_task(t, state):
        assert np.unique(out.owner).tolist() == list(range(t + 1)), "every head is back after the task"
        for task in range(t + 1):
            k = out.connections_of(task)
            assert k.size == expected_count(setup.config, len(model.layers) - 1, out)
            assert np.all(np.isin(out.rows[k], setup.task_classes(task)))
        assert sn.trainable == [] and sn.bias_trainable == []

    sn.train_epoch = checked_train_epoch
    learn_all(sn, setup, setup.data(), after_task)
    assert epochs[0] == setup.n_tasks * setup.config.epochs
    assert np.array_equal(np.flatnonzero(model.known_classes), np.arange(setup.n_classes))


# ----- FineTune on a CNN -----
@pytest.mark.parametrize("total_tasks", [1, 2, 3])
def test_finetune_allocates_every_layer_at_the_first_task_and_trains_every_kernel(total_tasks):
    model = SparseCNN((2, 8, 8), (3, 4, 5, 6), (7,), 6)
    config = SpaceNetConfig(connections_per_task=(0.3,) * 6, selected_neurons=(None,) * 5,
                            reserved_neurons=(1, 1, 1, 1, 2), epochs=2, batch_size=8, lr=0.05,
                            init_fan="connections")
    learner = FineTune(model, config, seed=3, input_mean=0.5, input_std=0.25, total_tasks=total_tasks)
    images, labels = make_blobs(6, 128, 12, seed=4)
    per_task = [2, 4, 6, 9, 50, 13]  # round(0.3 * (6, 12, 20, 30, 168, 42))
    budget = [c * total_tasks for c in per_task]
    train_epoch = learner.train_epoch
    epochs = [0]

    def checked_train_epoch(state, *args, **kwargs):
        for l, layer in enumerate(model.layers):
            assert np.array_equal(learner.trainable[l], np.arange(layer.nnz)), "every connection trains"
            assert np.all(learner.bias_trainable[l] == 1.0)
        train_epoch(state, *args, **kwargs)
        epochs[0] += 1

    learner.train_epoch = checked_train_epoch
    history = []
    for t in range(3):
        learner.learn(*task_split(images, labels, [2 * t, 2 * t + 1]), [2 * t, 2 * t + 1])
        assert model.connection_counts() == budget
        history.append([(layer.rows.copy(), layer.indices.copy(), layer.weights.copy(),
                         layer.importance.copy()) for layer in model.layers])
    assert epochs[0] == 3 * config.epochs
    for l, layer in enumerate(model.layers):
        assert np.all(layer.owner == 0)
        if is_conv(layer):
            assert_whole_kernels(layer)
        (rows0, cols0, w0, omega0), (rows2, cols2, w2, omega2) = history[0][l], history[2][l]
        assert np.array_equal(rows0, rows2) and np.array_equal(cols0, cols2), "the structure is static"
        assert np.any(w0 != w2) and np.all(omega2 >= omega0), f"layer {l}: old connections did not train"
    for neurons in model.neurons[1:-1]:
        assert np.all(neurons.reserved_by == FREE), "FineTune reserves nothing"


# ----- checkpoints of CNN learners and models -----
CKPT_CLASSES = [np.array([2 * t, 2 * t + 1]) for t in range(3)]
MEAN = np.repeat([0.42, 0.57], 64)  # per channel, repeated over the channel's 64 pixels
STD = np.repeat([0.21, 0.33], 64)


def new_cnn_learner(cls=SpaceNet, seed=7):
    model = SparseCNN((2, 8, 8), (6, 6, 6, 6), (12,), 6)
    config = SpaceNetConfig(connections_per_task=(0.12,) * 6, selected_neurons=(None,) * 5,
                            reserved_neurons=(1, 1, 1, 1, 2), rewire_ratio=0.3, epochs=2, batch_size=8,
                            lr=0.05, init_fan="connections")
    options = {"total_tasks": 3} if cls is FineTune else {}
    return cls(model, config, seed=seed, input_mean=MEAN, input_std=STD, **options)


@pytest.fixture(scope="module")
def cnn_tasks():
    images, labels = make_blobs(6, 128, 12, seed=9, spread=30.0)
    return [task_split(images, labels, c) for c in CKPT_CLASSES]


def learn_tasks(learner, tasks, first, stop):
    for t in range(first, stop):
        learner.learn(*tasks[t], CKPT_CLASSES[t])
    return learner


def cnn_arrays(model):
    """Every array of a CNN, derived ones included, by name."""
    spec = np.frombuffer(json.dumps(model.spec()).encode(), np.uint8)
    out = {"known_classes": model.known_classes, "spec": spec}
    for i, n in enumerate(model.neurons):
        out[f"n{i}.slot_ids"], out[f"n{i}.reserved_by"], out[f"n{i}.bias"] = n.slot_ids, n.reserved_by, n.bias
    for l, layer in enumerate(model.layers):
        for name in ("indptr", "indices", "data"):
            out[f"l{l}.W.{name}"] = getattr(layer.W, name)
        out[f"l{l}.W.shape"] = np.asarray(layer.W.shape)
        for name in ("owner", "importance", "rows", "col_ptr", "col_order", "active_rows"):
            out[f"l{l}.{name}"] = getattr(layer, name)
    return out


def assert_cnns_identical(a, b):
    arrays_a, arrays_b = cnn_arrays(a), cnn_arrays(b)
    assert arrays_a.keys() == arrays_b.keys()
    for name in arrays_a:
        x, y = arrays_a[name], arrays_b[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), f"{name} differs"


def assert_statistics_equal(mean, std):
    for got, expected in ((mean, MEAN), (std, STD)):
        assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (128,)
        assert got.tobytes() == expected.tobytes(), "per-feature statistics changed in the round trip"


def test_skipping_the_gradients_nothing_reads_changes_no_bit(cnn_tasks, monkeypatch):
    """From the second task on, SpaceNet's plain step leaves out the input gradient at the first convolution's
    reserved maps (their bias is frozen and no trainable kernel goes into them: nothing reads it); the run ends
    bit for bit where computing every gradient ends."""
    skipped, unused_maps = [], SparseCNN.unused_input_gradients

    def recording(model, trainable, bias_masks):
        unused = unused_maps(model, trainable, bias_masks)
        skipped.append(sum(int(u.sum()) for u in unused if u is not None))
        return unused

    passed_on, backward_input = [], SparseConv2d.backward_input

    def seeing(layer, delta, activation, out, leaf_sums=None, unused=None):
        passed_on.append(0 if unused is None else int(unused.sum()))
        return backward_input(layer, delta, activation, out, leaf_sums, unused)

    monkeypatch.setattr(SparseCNN, "unused_input_gradients", recording)
    monkeypatch.setattr(SparseConv2d, "backward_input", seeing)
    lean = learn_tasks(new_cnn_learner(), cnn_tasks, 0, 3)
    assert skipped[0] == 0 and max(skipped) > 0 and sum(passed_on) == sum(skipped)  # every mask reached a layer
    monkeypatch.setattr(SparseCNN, "unused_input_gradients", lambda model, *masks: [None] * len(model.layers))
    assert_cnns_identical(lean.model, learn_tasks(new_cnn_learner(), cnn_tasks, 0, 3).model)


@pytest.mark.parametrize("cls", [SpaceNet, StaticSparseNN, FineTune])
def test_cnn_learner_checkpoint_continues_bit_identically(tmp_path, cnn_tasks, cls):
    straight = learn_tasks(new_cnn_learner(cls), cnn_tasks, 0, 3)
    first = learn_tasks(new_cnn_learner(cls), cnn_tasks, 0, 1)
    path = save_learner(tmp_path / "ckpt.npz", first, {"seed": 7})
    ckpt = load(path)
    assert ckpt.method == cls.name and ckpt.tasks_learned == 1
    assert isinstance(ckpt.model, SparseCNN) and ckpt.model.spec() == first.model.spec()
    assert all(isinstance(a, type(b)) for a, b in zip(ckpt.model.layers, first.model.layers))
    assert_statistics_equal(ckpt.input_mean, ckpt.input_std)
    assert_cnns_identical(first.model, ckpt.model)

    resumed = restore_learner(ckpt, METHODS)
    assert type(resumed) is cls and resumed.rng.bit_generator.state == first.rng.bit_generator.state
    assert_statistics_equal(resumed.input_mean, resumed.input_std)
    learn_tasks(resumed, cnn_tasks, 1, 3)
    assert_cnns_identical(straight.model, resumed.model)
    assert resumed.rng.bit_generator.state == straight.rng.bit_generator.state
    all_images = np.concatenate([images for images, _ in cnn_tasks])
    np.testing.assert_array_equal(resumed.predict(all_images), straight.predict(all_images))


def test_cnn_model_checkpoint_predicts_the_same_labels(tmp_path, cnn_tasks):
    learner = learn_tasks(new_cnn_learner(), cnn_tasks, 0, 2)
    all_images = np.concatenate([images for images, _ in cnn_tasks])
    expected = learner.predict(all_images)
    path = save_model(tmp_path / "model.npz", learner.model, MEAN, STD)
    ckpt = load(path)
    assert not ckpt.is_learner and ckpt.model.spec() == learner.model.spec()
    assert_statistics_equal(ckpt.input_mean, ckpt.input_std)
    assert_cnns_identical(learner.model, ckpt.model)
    np.testing.assert_array_equal(predict_from_checkpoint(path, all_images), expected)
    np.testing.assert_array_equal(predict(ckpt.model, all_images, ckpt.input_mean, ckpt.input_std), expected)
    standardized = ((all_images / 255.0 - MEAN) / STD).astype(np.float32)
    np.testing.assert_array_equal(predict_from_checkpoint(path, standardized), learner.predict(standardized))
    x = np.ascontiguousarray(standardized.T)
    assert ckpt.model.logits(x).tobytes() == learner.model.logits(x).tobytes(), "the same logits, bit for bit"


# ----- the command line on a tiny CIFAR-10 -----
@pytest.fixture
def cifar_dir(tmp_path, monkeypatch):
    """A tiny canonical cifar-10-batches-py/ (10 training and 2 test images per class), no mirrors."""
    monkeypatch.setitem(data.CIFAR_COUNTS, "cifar-10", {**{name: N10_BATCH for name in C10_TRAIN},
                                                         "test_batch": N10_BATCH})
    monkeypatch.setitem(data.MIRRORS, "cifar-10", [])
    write_cifar10(tmp_path / "data")
    return tmp_path / "data"


def test_cli_split_cifar10_trains_the_paper_cnn(cifar_dir, tmp_path):
    out = tmp_path / "out"
    assert train.main(["--task", "split_cifar10", "--epochs", "1", "--width", "standard", "--batch-size", "8",
                       "--data-dir", str(cifar_dir), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    assert config["architecture"] == {"kind": "cnn", "image_shape": [3, 32, 32], "conv": [32, 32, 64, 64],
                                      "hidden": [512], "n_classes": 10, "pool_every": 2}
    assert config["connections_per_task"] == [0.12] * 6 and config["selected_neurons"] == [None] * 5
    assert config["reserved_neurons"] == [2, 2, 5, 6, 30] and config["init_fan"] == "connections"
    run, = results["runs"]
    assert [len(row) for row in run["accuracy_matrix"]] == [1, 2, 3, 4, 5]
    assert all(0.0 <= a <= 100.0 for row in run["accuracy_matrix"] for a in row)
    fans = [3 * 32, 32 * 32, 32 * 64, 64 * 64, 64 * 8 * 8 * 512, 512 * 10]
    assert run["connections_per_layer"] == [5 * round(0.12 * f) for f in fans]
    assert run["free_neurons_per_layer"] == [32 - 10, 32 - 10, 64 - 25, 64 - 30, 512 - 150]
    ckpt = load(out / "checkpoints" / "seed0.ckpt")
    assert isinstance(ckpt.model, SparseCNN) and ckpt.tasks_learned == 5
    assert [layer.weights.shape[1:] for layer in ckpt.model.layers[:4]] == [(TAPS,)] * 4
    mean = ckpt.input_mean  # per channel: three values, each over 1024 pixels
    assert isinstance(mean, np.ndarray) and mean.shape == (3072,)
    assert np.unique(mean).size == 3 and np.all(mean.reshape(3, 1024) == mean[::1024, None])


def test_cli_arch_cnn_forces_the_cnn_on_a_grey_stream(tmp_path):
    write_tiny_dataset(tmp_path / "data", "mnist", n_train=100, n_test=50)
    out = tmp_path / "out"
    assert train.main(["--task", "split_mnist", "--arch", "cnn", "--epochs", "1", "--hidden", "64",
                       "--reserved", "2", "2", "5", "6", "6", "--batch-size", "8",
                       "--data-dir", str(tmp_path / "data"), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["architecture"] == {"kind": "cnn", "image_shape": [1, 28, 28],
                                                 "conv": [32, 32, 64, 64], "hidden": [64], "n_classes": 10,
                                                 "pool_every": 2}
    run, = results["runs"]
    assert [len(row) for row in run["accuracy_matrix"]] == [1, 2, 3, 4, 5]
    fans = [1 * 32, 32 * 32, 32 * 64, 64 * 64, 64 * 7 * 7 * 64, 64 * 10]
    assert run["connections_per_layer"] == [5 * round(0.12 * f) for f in fans]
    assert run["free_neurons_per_layer"] == [32 - 10, 32 - 10, 64 - 25, 64 - 30, 64 - 30]


CNN_ARGS = ["--task", "split_cifar10", "--epochs", "2", "--width", "standard", "--hidden", "64", "--reserved",
            "2", "2", "5", "6", "6", "--batch-size", "8", "--seeds", "0", "--quiet"]


def test_cli_cnn_run_resumes_to_identical_results(cifar_dir, tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = CNN_ARGS + ["--data-dir", str(cifar_dir)]
    assert train.main(args + ["--out", str(full)]) == 0
    assert json.loads((full / "results.json").read_text())["config"]["architecture"]["kind"] == "cnn"

    resume_batches = interrupt_after(monkeypatch, tasks=3)  # in task 4
    assert train.main(args + ["--out", str(cut)]) == 130
    assert not (cut / "results.json").exists()
    assert load(cut / "checkpoints" / "seed0.ckpt").tasks_learned == 3
    resume_batches()
    assert train.main(["--resume", str(cut)]) == 0
    assert results_without_time(cut) == results_without_time(full)


def test_cli_cifar10_100_trains_six_tasks_with_a_60_way_head(tmp_path, monkeypatch):
    """CIFAR-10/100 (Zenke et al.): task 1 is CIFAR-10, tasks 2-6 are CIFAR-100 classes 0-49 as labels 10-59."""
    monkeypatch.setitem(data.CIFAR_COUNTS, "cifar-10", {**{name: N10_BATCH for name in C10_TRAIN},
                                                         "test_batch": N10_BATCH})
    monkeypatch.setitem(data.CIFAR_COUNTS, "cifar-100", {"train": N100_TRAIN, "test": N100_TEST})
    monkeypatch.setitem(data.MIRRORS, "cifar-10", [])
    monkeypatch.setitem(data.MIRRORS, "cifar-100", [])
    write_cifar10(tmp_path / "data")
    write_cifar100(tmp_path / "data")
    out = tmp_path / "out"
    assert train.main(["--task", "cifar10_100", "--epochs", "1", "--batch-size", "16", "--data-dir",
                       str(tmp_path / "data"), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["architecture"]["n_classes"] == 60
    run, = results["runs"]
    assert [len(row) for row in run["accuracy_matrix"]] == [1, 2, 3, 4, 5, 6]
    ckpt = load(out / "checkpoints" / "seed0.ckpt")
    assert ckpt.model.known_classes.tolist() == [True] * 60
    output = ckpt.model.layers[-1]
    assert set(np.unique(output.rows[output.owner == 0])) == set(range(10))  # task 1: the CIFAR-10 heads
    assert set(np.unique(output.rows[output.owner == 5])) == set(range(50, 60))
