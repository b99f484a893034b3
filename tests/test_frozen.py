"""Frozen rows and their recorded outputs (``spacenet_np.frozen``): which rows are frozen, and training that copies
their outputs gives the same bits as training that computes them."""
import tracemalloc

import numpy as np
import pytest
from helpers import pair_tasks
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fused_step import random_learner, random_mlp, small_learner, state

from spacenet_np import frozen as frozen_module
from spacenet_np.frozen import FrozenOutputs, frozen_rows
from spacenet_np.network import SparseMLP

SETTINGS = settings(max_examples=40, deadline=None)
mlps = st.fixed_dictionaries(dict(
    n_features=st.integers(1, 10), hidden=st.lists(st.integers(1, 8), min_size=1, max_size=3),
    n_classes=st.integers(2, 5), density=st.sampled_from([0.1, 0.4, 1.0]), seed=st.integers(0, 2**32 - 1)))


def frozen_by_definition(model, trainable, bias_masks):
    """Row by row: reaches the output, no trainable connection, bias mask 0, every input frozen (or a feature)."""
    result, below = [], None
    for l, layer in enumerate(model.layers):
        trained = set(layer.rows[trainable[l]].tolist())
        rows = np.zeros(layer.out_index.n_slots, bool)
        for i in layer.active_rows:
            inputs = layer.indices[layer.indptr[i]:layer.indptr[i + 1]]
            rows[i] = (i not in trained and bias_masks[l][i] == 0
                       and (below is None or all(below[j] for j in inputs)))
        result.append(rows)
        below = rows
    return result


def random_case(p):
    rng = np.random.default_rng(p["seed"])
    model = random_mlp(rng, p["n_features"], p["hidden"], p["n_classes"], p["density"])
    learner = random_learner(rng, model, 0.1, masked=False)
    for l, layer in enumerate(model.layers):  # fewer trainable parameters, so that some rows are frozen
        learner.trainable[l] = learner.trainable[l][rng.random(learner.trainable[l].size) < 0.3]
        learner.bias_trainable[l] *= rng.random(layer.out_index.n_slots) < 0.3
    return rng, model, learner


@SETTINGS
@given(p=mlps)
def test_frozen_rows_are_the_definition_and_a_function_of_the_sample(p):
    rng, model, learner = random_case(p)
    frozen = frozen_rows(model, learner.trainable, learner.bias_trainable)
    for got, expected in zip(frozen, frozen_by_definition(model, learner.trainable, learner.bias_trainable)):
        assert np.array_equal(got, expected)
    x = rng.normal(size=(model.n_features, 5)).astype(np.float32)
    before = [a[rows].copy() for a, rows in zip(model.forward(x, reaching_output_only=True)[1:], frozen)]
    for l, layer in enumerate(model.layers):  # change everything that trains: frozen outputs stay
        layer.weights[learner.trainable[l]] += rng.normal(size=learner.trainable[l].size).astype(np.float32)
        layer.bias[:] += learner.bias_trainable[l] * rng.normal(size=layer.bias.size).astype(np.float32)
    after = [a[rows] for a, rows in zip(model.forward(x, reaching_output_only=True)[1:], frozen)]
    for a, b in zip(before, after):
        assert np.array_equal(a, b)


@pytest.fixture
def observed(monkeypatch):
    """Record on each learner how many rows its FrozenOutputs kept and how many steps copied them."""
    steps, batches = SparseMLP.train_step, SparseMLP.train_batches

    def counting(self, *args):
        frozen = args[6] if len(args) > 6 else None
        if frozen is not None and not frozen.recording:
            counting.copies += 1
        return steps(self, *args)

    def counting_batches(self, *args):
        frozen = args[9] if len(args) > 9 else None
        copying = frozen is not None and not frozen.recording
        losses = batches(self, *args)
        counting.copies += losses.size if copying else 0
        return losses

    counting.copies = 0
    made = FrozenOutputs.__init__

    def init(self, model, images, trainable, bias_masks):
        made(self, model, images, trainable, bias_masks)
        init.rows.append(self.rows)

    init.rows = []
    monkeypatch.setattr(SparseMLP, "train_step", counting)
    monkeypatch.setattr(SparseMLP, "train_batches", counting_batches)
    monkeypatch.setattr(FrozenOutputs, "__init__", init)
    return counting, init


@pytest.mark.parametrize("overrides", [{}, {"batch_size": 7, "epochs": 3, "softmax_scope": "seen"}])
def test_copying_frozen_outputs_gives_the_same_bits(observed, overrides):
    counting, init = observed
    tasks = pair_tasks(8, 16, 25, seed=4, spread=30.0)
    cached, accuracy_c = learn_bits(True, tasks, **overrides)
    assert max(init.rows) > 0 and counting.copies > 0, "the test must exercise copied rows"
    counting.copies = 0
    computed, accuracy_n = learn_bits(False, tasks, **overrides)
    assert counting.copies == 0
    assert accuracy_c == accuracy_n
    for a, b in zip(state(cached.model), state(computed.model)):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def owned_by(model, owner):
    return [np.flatnonzero(layer.owner == owner).astype(np.int64) for layer in model.layers]


@SETTINGS
@given(p=mlps, change=st.integers(0, 2**32 - 1))
def test_after_a_structure_change_the_outputs_are_dropped_or_follow_the_rows_that_reach_the_output(p, change):
    """Connections owned by 1 train. A new connection somewhere (trained or not) may change which rows reach the
    output and which are frozen: ``current`` then either gives the outputs up or computes exactly the rows that
    reach the output and are not kept, keeping only rows that are still frozen with the same inputs."""
    rng, model, learner = random_case(p)
    masks = learner.bias_trainable
    outputs = FrozenOutputs(model, np.zeros((3, model.n_features), np.uint8), owned_by(model, 1), masks)
    rng = np.random.default_rng(change)
    layer = model.layers[rng.integers(len(model.layers))]
    n_out, n_in = layer.out_index.n_slots, layer.in_index.n_slots
    empty = np.setdiff1d(np.arange(n_out * n_in), layer.rows.astype(np.int64) * n_in + layer.indices)
    if empty.size:
        key = rng.choice(empty)
        layer.add_connections([key // n_in], [key % n_in], np.float32([0.5]), owner=int(rng.integers(2)))
    trainable = owned_by(model, 1)
    if outputs.current(model, trainable, masks):
        frozen = frozen_rows(model, trainable, masks)
        for layer, rows, cached, compute in zip(model.layers, frozen, outputs.cached_rows, outputs.compute_rows):
            assert np.all(rows[cached])
            assert np.array_equal(compute, np.setdiff1d(layer.active_rows, cached))
    else:
        assert empty.size


def learn_bits(cache, tasks, **overrides):
    learner = small_learner(model=SparseMLP(16, [40, 30], 8), connections_per_task=(80, 40, 12), **overrides)
    learner.cache_frozen = cache
    accuracy = []
    for images, labels, classes in tasks:
        learner.learn(images, labels, classes)
        assert getattr(learner, "_frozen_outputs", None) is None, "released when the task ends"
        accuracy.append(learner.predict(images).tolist())
    return learner, accuracy


def test_a_changed_frozen_weight_is_noticed(observed):
    """A hook that halves a frozen connection's weight after a task's first epoch: the second epoch records again
    (a new FrozenOutputs), the third copies, and the run equals one that computes every row."""
    counting, init = observed
    tasks = pair_tasks(8, 16, 25, seed=4, spread=30.0)

    def halve_a_frozen_weight(learner):
        end_epoch = learner.end_epoch

        def hooked(state, epoch):
            end_epoch(state, epoch)
            layer = learner.model.layers[0]
            rows = np.flatnonzero(frozen_rows(learner.model, learner.trainable, learner.bias_trainable)[0]
                                  & (np.diff(layer.indptr) > 0))
            if epoch == 0 and rows.size:
                layer.weights[layer.indptr[rows[0]]] *= np.float32(0.5)
        learner.end_epoch = hooked

    results = []
    for cache in (True, False):
        learner = small_learner(model=SparseMLP(16, [40, 30], 8), connections_per_task=(80, 40, 12), epochs=3)
        learner.cache_frozen = cache
        halve_a_frozen_weight(learner)
        for images, labels, classes in tasks:
            learner.learn(images, labels, classes)
        results.append(state(learner.model))
    assert counting.copies > 0
    assert len(init.rows) > len(tasks), "a new FrozenOutputs after a change, not only one per task"
    for a, b in zip(*results):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_nothing_is_kept_above_the_memory_bound(monkeypatch, observed):
    counting, init = observed
    monkeypatch.setattr(frozen_module, "MAX_BYTES", 64)
    tasks = pair_tasks(8, 16, 25, seed=4, spread=30.0)
    learn_bits(True, tasks)
    assert init.rows and max(init.rows) == 0 and counting.copies == 0


def test_a_step_that_copies_frozen_outputs_allocates_nothing():
    """Like test_fused_step's check: once the buffers exist, a step copying frozen rows allocates no array."""
    tasks = pair_tasks(8, 16, 25, seed=4, spread=30.0)
    learner = small_learner(model=SparseMLP(16, [40, 30], 8), connections_per_task=(80, 40, 12))
    for images, labels, classes in tasks[:3]:
        learner.learn(images, labels, classes)
    images, labels, classes = tasks[3]  # the fourth task reads frozen rows (the third does not)
    state = learner.begin_task(np.asarray(classes))
    learner.loss_classes = learner.softmax_classes(state)
    ids = np.arange(16)
    x = learner._reused_input(images, ids)
    outputs = learner.frozen_outputs(images, x, labels[ids])
    assert outputs is not None and outputs.rows > 0
    outputs.recorded = outputs.n_samples  # as after a recording epoch: the step copies
    learner.train_step(x, labels[ids], (outputs, ids))
    tracemalloc.start()
    try:
        x = learner._reused_input(images, ids)
        learner.train_step(x, labels[ids], (outputs, ids))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4096, peak
