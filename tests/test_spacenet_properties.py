"""Invariants of SpaceNet (Algorithms 1-4) over random layer sizes, neuron and connection counts, and seeds.

Most tests drive the real ``SpaceNet.learn`` and wrap the instance's ``allocate``, ``rewire``,
``train_epoch``, ``drop`` and ``reserve`` methods to inspect the network at each step; the drop test runs
one task by hand.
"""
import time
from dataclasses import dataclass

import numpy as np
from helpers import connection_table, make_blobs, reserved_ids, task_split
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from spacenet_np.layers import FREE
from spacenet_np.network import SparseMLP
from spacenet_np.spacenet import SpaceNet, SpaceNetConfig, StaticSparseNN, smallest_first

CLASSES_PER_TASK = 2


@dataclass
class Setup:
    n_features: int
    widths: list
    n_tasks: int
    config: SpaceNetConfig
    seed: int

    @property
    def n_classes(self):
        return CLASSES_PER_TASK * self.n_tasks

    def task_classes(self, t):
        return np.arange(CLASSES_PER_TASK * t, CLASSES_PER_TASK * (t + 1))

    def model(self):
        return SparseMLP(self.n_features, self.widths, self.n_classes)

    def spacenet(self, seed=None, cls=SpaceNet):
        return cls(self.model(), self.config, seed=self.seed if seed is None else seed)

    def data(self):
        """Per task: (images uint8, labels)."""
        images, labels = make_blobs(self.n_classes, self.n_features, 24, seed=self.seed % 1000)
        return [task_split(images, labels, self.task_classes(t)) for t in range(self.n_tasks)]


@st.composite
def setups(draw, n_tasks=st.integers(2, 3), full_block=False, roomy=False, epochs=st.integers(2, 3)):
    """A random network and config that SpaceNet can learn ``n_tasks`` tasks with.

    Connection counts fit the selected block of every task (``count * n_tasks <= block`` leaves room for the
    old tasks' connections inside a later block). ``full_block`` draws counts up to the whole block (one
    task); ``roomy`` keeps ``count * (1 + rewire_ratio)`` within the block so that regrowth always has room.
    """
    n_tasks = draw(n_tasks)
    n_features = draw(st.integers(8, 24))
    n_hidden = draw(st.integers(1, 2))
    widths = [draw(st.integers(20, 200)) for _ in range(n_hidden)]
    selected, reserved = [], []
    for width in widths:
        sel = draw(st.integers(2, width if n_tasks == 1 else width - (n_tasks - 1)))  # blocks >= 4 >= n_tasks
        max_res = sel if n_tasks == 1 else min(sel, (width - sel) // (n_tasks - 1))
        selected.append(sel)
        reserved.append(draw(st.integers(0, max_res)))
    ratio = draw(st.floats(0.0, 0.9))
    sizes = [n_features, *selected, CLASSES_PER_TASK]
    counts = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        block = fan_in * fan_out
        if full_block:
            counts.append(draw(st.integers(max(1, block // 2), block)))
            continue
        if roomy:
            high = max(1, int(block / (n_tasks * (1.0 + ratio))))
        else:
            high = max(1, block // n_tasks)
        counts.append(draw(st.integers(1, high)))
    config = SpaceNetConfig(connections_per_task=tuple(counts), selected_neurons=tuple(selected),
                            reserved_neurons=tuple(reserved), rewire_ratio=ratio, epochs=draw(epochs),
                            batch_size=draw(st.sampled_from([8, 16, 32])), lr=0.05,
                            init_fan=draw(st.sampled_from(["layer", "selected"])))
    return Setup(n_features, widths, n_tasks, config, draw(st.integers(0, 2**32 - 1)))


PROPERTY = settings(max_examples=15, deadline=None)


# ----- helpers -----
def mine(layer, task):
    k = layer.connections_of(task)
    return k, layer.rows[k].astype(np.int64), layer.indices[k].astype(np.int64)


def positions(layer):
    """Every connection of a layer by (row slot, col slot) -> (owner, weight, importance)."""
    return {(int(r), int(c)): (int(o), w, i) for r, c, o, w, i in
            zip(layer.rows, layer.indices, layer.owner, layer.weights, layer.importance)}


def assert_no_duplicates_and_canonical(layer):
    keys = layer.rows.astype(np.int64) * layer.in_index.n_slots + layer.indices
    assert np.unique(keys).size == layer.nnz, "two connections at one (row, col) position"
    for i in range(layer.W.shape[0]):
        row = layer.indices[layer.indptr[i]:layer.indptr[i + 1]]
        assert np.all(np.diff(row) > 0), "CSR row not strictly increasing"
    assert layer.owner.size == layer.importance.size == layer.rows.size == layer.nnz
    assert np.array_equal(layer.rows, np.repeat(np.arange(layer.W.shape[0]), np.diff(layer.indptr)))
    assert layer.col_ptr[-1] == layer.nnz
    by_column = layer.indices[layer.col_order]
    assert np.all(np.diff(by_column) >= 0), "col_order must group the connections by input neuron"


def assert_task_structure(sn, state):
    """The current task's connections stay inside its selected block and never touch a reserved neuron."""
    model = sn.model
    last = len(model.layers) - 1
    for h in range(1, len(model.neurons) - 1):
        sel = state.selected[h]
        assert np.unique(sel).size == sel.size == sn.config.selected_neurons[h - 1]
        assert np.all(model.neurons[h].reserved_by[sel] == FREE), "a reserved neuron was selected"
    for l, layer in enumerate(model.layers):
        _, rows, cols = mine(layer, state.task)
        assert np.all(np.isin(rows, state.selected[l + 1])), f"layer {l}: row outside the selected neurons"
        assert np.all(np.isin(cols, state.selected[l])), f"layer {l}: column outside the selected neurons"
        if l < last:
            assert np.all(model.neurons[l + 1].reserved_by[rows] == FREE), f"layer {l}: row is reserved"
        if l > 0:
            assert np.all(model.neurons[l].reserved_by[cols] == FREE), f"layer {l}: column is reserved"
        assert_no_duplicates_and_canonical(layer)


def reference_importance(model, task):
    """Eq. 4 from a dense Omega matrix per layer (built with np.add.at from rows, indices, importance, owner):
    per neuron, the row sum (ingoing connections); the column sum (outgoing) for a neuron layer that no layer
    feeds (the input). Returns a list of (slots,) float64, one per neuron layer."""
    importance = [None] * len(model.neurons)
    for l, layer in enumerate(model.layers):
        omega = np.zeros((layer.out_index.n_slots, layer.in_index.n_slots))
        mine = layer.owner == task
        np.add.at(omega, (layer.rows[mine], layer.indices[mine]), layer.importance[mine].astype(np.float64))
        importance[l + 1] = omega.sum(axis=1)
        if l == 0:
            importance[0] = omega.sum(axis=0)
    return importance


def learn_all(sn, setup, data, after_task=None):
    states = []
    for t in range(setup.n_tasks):
        images, labels = data[t]
        states.append(sn.learn(images, labels, setup.task_classes(t)))
        if after_task is not None:
            after_task(t, states[-1])
    return states


# ----- allocation and rewiring structure -----
@PROPERTY
@given(setup=setups())
def test_allocation_and_rewiring_stay_in_the_selected_free_block(setup):
    sn = setup.spacenet()
    data = setup.data()
    checks = {"allocate": 0, "rewire": 0, "train": 0}
    allocate, rewire, train_epoch = sn.allocate, sn.rewire, sn.train_epoch

    def checked_allocate(classes):
        state = allocate(classes)
        assert_task_structure(sn, state)
        counts = [layer.connections_of(state.task).size for layer in sn.model.layers]
        assert counts == list(setup.config.connections_per_task)
        for l, layer in enumerate(sn.model.layers):  # Xavier-uniform weights, Omega 0
            k = layer.connections_of(state.task)
            fans = (layer.in_index.width + layer.out_index.width if setup.config.init_fan == "layer"
                    else state.selected[l].size + state.selected[l + 1].size)
            assert np.all(np.abs(layer.weights[k]) <= np.float32(np.sqrt(6.0 / fans)))
            assert np.all(layer.importance[k] == 0.0)
            if k.size > 3:
                assert np.unique(layer.weights[k]).size > 1
        checks["allocate"] += 1
        return state

    def checked_rewire(state):
        before = [layer.connections_of(state.task).size for layer in sn.model.layers]
        rewire(state)
        assert_task_structure(sn, state)
        after = [layer.connections_of(state.task).size for layer in sn.model.layers]
        assert after == before, "a rewire keeps the task's connection count in every layer"
        checks["rewire"] += 1

    def checked_train_epoch(state, *args, **kwargs):
        out = sn.model.layers[-1]
        assert np.all(out.owner == state.task), "old heads must be set aside while a task trains"
        assert np.array_equal(sn.trainable[-1], out.connections_of(state.task))
        train_epoch(state, *args, **kwargs)
        checks["train"] += 1

    sn.allocate, sn.rewire, sn.train_epoch = checked_allocate, checked_rewire, checked_train_epoch
    learn_all(sn, setup, data)
    assert checks == {"allocate": setup.n_tasks, "rewire": setup.n_tasks * (setup.config.epochs - 1),
                      "train": setup.n_tasks * setup.config.epochs}
    # After learning, every head is back in the output layer.
    assert set(np.unique(sn.model.layers[-1].owner).tolist()) == set(range(setup.n_tasks))


@settings(max_examples=25, deadline=None)
@given(setup=setups(n_tasks=st.just(1), full_block=True, epochs=st.just(2)))
@example(setup=Setup(n_features=8, widths=[20, 20], n_tasks=1, seed=0, config=SpaceNetConfig(
    connections_per_task=(1, 4, 1), selected_neurons=(2, 2), reserved_neurons=(0, 0), rewire_ratio=0.5,
    epochs=2, batch_size=8, lr=0.05)))
def test_rewire_keeps_the_task_connection_count(setup):
    """Algorithm 3: drop r of W_l^t, grow as many back. Counts up to the full selected block."""
    sn = setup.spacenet()
    (images, labels), = setup.data()
    counts = []
    rewire = sn.rewire

    def counting_rewire(state):
        before = [layer.connections_of(state.task).size for layer in sn.model.layers]
        rewire(state)
        counts.append((before, [layer.connections_of(state.task).size for layer in sn.model.layers]))

    sn.rewire = counting_rewire
    sn.learn(images, labels, setup.task_classes(0))
    assert len(counts) == 1
    before, after = counts[0]
    assert after == before, f"rewire changed the connection counts {before} -> {after} " \
                            f"(rewire_ratio={setup.config.rewire_ratio})"


@PROPERTY
@given(setup=setups(roomy=True))
def test_rewire_keeps_the_task_connection_count_when_the_block_has_room(setup):
    sn = setup.spacenet()
    data = setup.data()
    expected = list(setup.config.connections_per_task)
    rewire = sn.rewire
    seen = []

    def counting_rewire(state):
        rewire(state)
        seen.append([layer.connections_of(state.task).size for layer in sn.model.layers])

    sn.rewire = counting_rewire
    learn_all(sn, setup, data)
    assert len(seen) == setup.n_tasks * (setup.config.epochs - 1)
    assert all(counts == expected for counts in seen), (seen, expected)


def test_float_connections_per_task_is_a_density_of_the_full_layer():
    images, labels = make_blobs(2, 16, 20, seed=0)
    config = SpaceNetConfig(connections_per_task=(0.1, 0.125), selected_neurons=(12,), reserved_neurons=(4,),
                            epochs=1, batch_size=16)
    sn = SpaceNet(SparseMLP(16, [40], 4), config, seed=0)
    sn.learn(images, labels, [0, 1])
    assert sn.model.connection_counts() == [round(0.1 * 16 * 40), round(0.125 * 40 * 4)]


# ----- drop and grow -----
@PROPERTY
@given(setup=setups(n_tasks=st.just(2)))
def test_drop_removes_exactly_the_least_important_connections(setup):
    """Second task, by hand: allocate, set old heads aside, train an epoch, then drop in each rewired layer."""
    sn = setup.spacenet()
    data = setup.data()
    sn.learn(*data[0], setup.task_classes(0))
    images, labels = data[1]
    state = sn.allocate(np.asarray(setup.task_classes(1)))
    sn.set_aside_old_heads(state.task)
    sn.refresh_trainable(state)
    sn.train_epoch(state, images, labels, 0)
    ratio = setup.config.rewire_ratio
    for layer in sn.model.layers[:-1]:
        before = positions(layer)
        ids, rows, cols = mine(layer, state.task)
        importance = layer.importance.copy()

        dropped = sn.drop(layer, state.task)

        assert dropped.size == int(ratio * ids.size)
        assert np.all(np.isin(dropped, ids)), "only the current task's connections can be dropped"
        kept = np.setdiff1d(ids, dropped)
        if dropped.size and kept.size:
            assert importance[dropped].max() <= importance[kept].min()
        after = positions(layer)
        gone = np.isin(ids, dropped)
        dropped_keys = {(int(r), int(c)) for r, c in zip(rows[gone], cols[gone])}
        assert set(after) == set(before) - dropped_keys
        for key, value in after.items():  # everything else untouched, bit for bit
            assert value[0] == before[key][0] and value[1] == before[key][1] and value[2] == before[key][2]
        assert_no_duplicates_and_canonical(layer)


@settings(max_examples=300, deadline=None)
@given(values=arrays(np.float32, st.integers(0, 60),
                     elements=st.sampled_from([0.0, -0.0, 0.5, 1.0, np.inf, -np.inf, np.nan]) | st.floats(width=32)),
       count=st.integers(-2, 70))
def test_smallest_first_is_the_stable_argsort_prefix(values, count):
    """The drop phase's selection: the same positions in the same order as a stable sort (ties by position,
    -0.0 equal to 0.0, NaN last), which the official-importance sums add up in."""
    expected = np.argsort(values, kind="stable")[:max(count, 0)]
    chosen = smallest_first(values, count)
    assert chosen.dtype == np.int64 and np.array_equal(chosen, expected)


@PROPERTY
@given(setup=st.one_of(setups(), setups(n_tasks=st.just(1), full_block=True)))
def test_grow_adds_zero_weights_at_the_most_important_empty_positions(setup):
    """Grow (Eq. 5): as many zero weights (Omega 0) as were dropped, at the empty positions of the selected
    block with the largest a_out * a_in; positions empty before the drop come first, and just-dropped
    positions are regrown (the best ones) only when the block has too few of those."""
    sn = setup.spacenet()
    data = setup.data()
    rewire, drop = sn.rewire, sn.drop
    dropped_keys = {}
    refilled = [0]

    def recording_drop(layer, task):
        rows, cols = layer.rows.copy(), layer.indices.copy()
        dropped = drop(layer, task)
        dropped_keys[id(layer)] = {(int(rows[k]), int(cols[k])) for k in dropped}
        return dropped

    def checked_rewire(state):
        model = sn.model
        importance = reference_importance(sn.model, state.task)
        before = [positions(layer) for layer in model.layers]
        dropped_keys.clear()
        rewire(state)
        for l, layer in enumerate(model.layers):
            after = positions(layer)
            if l == len(model.layers) - 1:
                assert after == before[l], "the output layer is not rewired"
                continue
            old_mine = {k for k, v in before[l].items() if v[0] == state.task}
            new_mine = {k for k, v in after.items() if v[0] == state.task}
            dropped = dropped_keys[id(layer)]
            assert dropped <= old_mine
            assert len(dropped) == int(setup.config.rewire_ratio * len(old_mine))
            kept = old_mine - dropped
            assert kept <= new_mine
            for key in kept:
                assert after[key] == before[l][key], "kept connections must not change in a rewire"
            for key, value in before[l].items():
                if value[0] != state.task:
                    assert after.get(key) == value, "other tasks' connections must not change"
            grown = new_mine - kept
            assert len(grown) == len(dropped), "grow must add back as many connections as were dropped"
            for key in grown:
                assert after[key][1] == 0.0 and after[key][2] == 0.0, "grown weight and Omega must be 0"
            # Where: inside the selected block, at empty positions; fresh ones (empty before the drop) first.
            rows, cols = state.selected[l + 1], state.selected[l]
            block = {(int(r), int(c)) for r in rows for c in cols}
            fresh = block - set(before[l])
            assert grown <= fresh | dropped
            grown_fresh, regrown = grown & fresh, grown & dropped
            assert len(grown_fresh) == min(len(dropped), len(fresh))
            refilled[0] += len(regrown)

            def score(key):
                return importance[l + 1][key[0]] * importance[l][key[1]]

            if grown_fresh and fresh - grown_fresh:
                assert min(map(score, grown_fresh)) >= max(map(score, fresh - grown_fresh))
            if regrown and dropped - regrown:
                assert min(map(score, regrown)) >= max(map(score, dropped - regrown))

    sn.drop, sn.rewire = recording_drop, checked_rewire
    learn_all(sn, setup, data)
    event(f"regrew just-dropped positions: {refilled[0] > 0}")


@PROPERTY
@given(setup=setups())
def test_neuron_importance_is_eq4_of_the_tasks_omega(setup):
    """After every task: Eq. 4 of every task so far equals the dense reference (a task's Omega stays frozen)."""
    sn = setup.spacenet()

    def after_task(t, state):
        for task in range(t + 1):
            for computed, expected in zip(sn.neuron_importance(task), reference_importance(sn.model, task)):
                np.testing.assert_allclose(computed, expected, rtol=1e-12, atol=0)
        event(f"task {t} accumulated Omega: {any(np.any(a > 0) for a in sn.neuron_importance(t))}")

    learn_all(sn, setup, setup.data(), after_task)


# ----- reservation and free lists -----
@PROPERTY
@given(setup=setups())
def test_free_lists_only_shrink_and_reservations_only_grow(setup):
    sn = setup.spacenet()
    data = setup.data()
    hidden = sn.model.neurons[1:-1]
    history = [(list(n.n_free for n in hidden), [reserved_ids(n) for n in hidden])]
    reserve = sn.reserve
    reserve_checks = [0]

    def checked_reserve(state):
        importance = reference_importance(sn.model, state.task)
        free_before = [set(n.slot_ids[n.reserved_by == FREE].tolist()) for n in hidden]
        reserve(state)
        for h, neurons in enumerate(hidden):
            selected = state.selected[h + 1]
            now = neurons.reserved_by[selected] == state.task
            assert np.count_nonzero(now) == setup.config.reserved_neurons[h]
            assert np.count_nonzero(neurons.reserved_by == state.task) == setup.config.reserved_neurons[h]
            # Algorithm 4: the reserved neurons are the most important of the selected ones.
            if now.any() and (~now).any():
                assert importance[h + 1][selected[now]].min() >= importance[h + 1][selected[~now]].max()
            assert set(neurons.slot_ids[selected[now]].tolist()) <= free_before[h]
        reserve_checks[0] += 1

    def after_task(t, state):
        n_free = [n.n_free for n in hidden]
        reserved = [reserved_ids(n) for n in hidden]
        previous_free, previous_reserved = history[-1]
        for h, neurons in enumerate(hidden):
            assert n_free[h] <= previous_free[h]
            assert n_free[h] == neurons.width - (t + 1) * setup.config.reserved_neurons[h]
            assert previous_reserved[h].items() <= reserved[h].items(), "a reservation changed or vanished"
            new = {k: v for k, v in reserved[h].items() if k not in previous_reserved[h]}
            assert len(new) == setup.config.reserved_neurons[h] and set(new.values()) <= {t}
        history.append((n_free, reserved))

    sn.reserve = checked_reserve
    learn_all(sn, setup, data, after_task)
    assert reserve_checks[0] == setup.n_tasks


# ----- old tasks are frozen -----
@PROPERTY
@given(setup=setups(), static=st.booleans())
def test_old_tasks_weights_and_reserved_biases_are_bit_identical(setup, static):
    sn = setup.spacenet(cls=StaticSparseNN if static else SpaceNet)
    data = setup.data()
    model = sn.model
    snapshots = []

    def frozen_part():
        tables = [connection_table(model, l) for l in range(len(model.layers))]
        reserved_bias = [{int(i): b for i, b, r in zip(n.slot_ids, n.bias, n.reserved_by) if r != FREE}
                         for n in model.neurons[1:-1]]
        return tables, reserved_bias, model.layers[-1].bias.copy()

    def after_task(t, state):
        tables, reserved_bias, out_bias = frozen_part()
        for earlier_t, (old_tables, old_reserved_bias, old_out_bias) in enumerate(snapshots):
            for l, (old, new) in enumerate(zip(old_tables, tables)):
                old_keys = {k for k in old if k[0] <= earlier_t}
                new_keys = {k for k in new if k[0] <= earlier_t}
                assert old_keys == new_keys, f"layer {l}: old connections changed"
                for key in old_keys:
                    assert new[key][0] == old[key][0], f"layer {l}: weight of {key} changed"
                    assert new[key][1] == old[key][1], f"layer {l}: Omega of {key} changed"
            for h, old in enumerate(old_reserved_bias):
                for neuron, bias in old.items():
                    assert reserved_bias[h][neuron] == bias, f"bias of reserved neuron {neuron} changed"
            learned = np.arange(CLASSES_PER_TASK * (earlier_t + 1))  # the classes of tasks <= earlier_t
            assert np.array_equal(out_bias[learned], old_out_bias[learned]), "an old class's bias changed"
        snapshots.append((tables, reserved_bias, out_bias))

    learn_all(sn, setup, data, after_task)
    assert len(snapshots) == setup.n_tasks
    # Old tasks do own weights in every layer (so the comparison above compared something).
    for l in range(len(model.layers)):
        assert all(np.count_nonzero(model.layers[l].owner == t) > 0 for t in range(setup.n_tasks))


@PROPERTY
@given(setup=setups())
def test_output_connections_only_go_into_the_task_classes(setup):
    sn = setup.spacenet()
    learn_all(sn, setup, setup.data())
    out = sn.model.layers[-1]
    last_hidden = sn.model.neurons[-2]
    for t in range(setup.n_tasks):
        k = out.connections_of(t)
        assert k.size == setup.config.connections_per_task[-1]
        assert np.all(np.isin(out.rows[k], setup.task_classes(t)))
        # ... from neurons that task could use: never from a neuron reserved by an earlier task.
        owners = last_hidden.reserved_by[out.indices[k]]
        assert np.all((owners == FREE) | (owners >= t))
    assert np.array_equal(np.flatnonzero(sn.model.known_classes), np.arange(setup.n_classes))


# ----- determinism -----
def network_state(model):
    parts = []
    for layer in model.layers:
        parts += [layer.weights, layer.indices, layer.indptr, layer.owner, layer.importance]
    for neurons in model.neurons:
        parts += [neurons.slot_ids, neurons.bias, neurons.reserved_by]
    return [np.array(p, copy=True) for p in parts]


@settings(max_examples=8, deadline=None)
@given(setup=setups(n_tasks=st.just(2)))
def test_same_seed_same_network_other_seed_other_network(setup):
    data = setup.data()
    runs = []
    for seed in (setup.seed, setup.seed, setup.seed + 1):
        sn = setup.spacenet(seed=seed)
        learn_all(sn, setup, data)
        runs.append((network_state(sn.model), sn.predict(data[0][0])))
    (a, pa), (b, pb), (c, _) = runs
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8))
    assert np.array_equal(pa, pb)
    assert any(x.shape != z.shape or not np.array_equal(x, z) for x, z in zip(a[:5], c[:5])), \
        "a different seed gave the same first layer"


# ----- compact neuron index -----
@PROPERTY
@given(setup=setups())
def test_slots_never_exceed_tasks_times_selected(setup):
    sn = setup.spacenet()

    def after_task(t, state):
        for h, neurons in enumerate(sn.model.neurons[1:-1]):
            assert neurons.n_slots <= (t + 1) * setup.config.selected_neurons[h]
            assert neurons.n_slots == np.unique(neurons.slot_ids).size
            assert neurons.bias.shape == neurons.reserved_by.shape == (neurons.n_slots,)
        for layer in sn.model.layers:
            assert layer.W.shape == (layer.out_index.n_slots, layer.in_index.n_slots)

    learn_all(sn, setup, setup.data(), after_task)


def model_nbytes(model):
    total = 0
    for layer in model.layers:
        total += sum(a.nbytes for a in (layer.W.data, layer.W.indices, layer.W.indptr, layer.owner,
                                        layer.importance, layer.rows, layer.col_ptr, layer.col_order))
    for neurons in model.neurons:
        total += neurons.slot_ids.nbytes + neurons.bias.nbytes + neurons.reserved_by.nbytes
    return total


def test_a_very_wide_layer_costs_like_a_narrow_one():
    images, labels = make_blobs(4, 16, 40, seed=3, spread=15.0)
    config = SpaceNetConfig(connections_per_task=(200, 150, 30), selected_neurons=(20, 20),
                            reserved_neurons=(6, 6), rewire_ratio=0.2, epochs=2, batch_size=32, lr=0.05)
    results = {}
    for width in (100, 10**6):
        model = SparseMLP(16, [width, width], 4)
        sn = SpaceNet(model, config, seed=4)
        sn.learn(*task_split(images, labels, [0, 1]), [0, 1])  # warm-up of every code path
        start = time.perf_counter()
        sn.learn(*task_split(images, labels, [2, 3]), [2, 3])
        results[width] = (time.perf_counter() - start, model)
    narrow_time, narrow = results[100]
    wide_time, wide = results[10**6]
    for neurons in wide.neurons[1:-1]:
        assert neurons.width == 10**6
        assert neurons.n_slots <= 40
        assert neurons.n_free == 10**6 - 12
    assert wide.connection_counts() == narrow.connection_counts()
    activations, deltas = wide.buffers(32)
    assert max(a.shape[0] for a in activations + deltas) <= 40
    assert model_nbytes(wide) <= 2 * model_nbytes(narrow) + 4096
    assert wide_time < 5 * narrow_time + 1.0, (wide_time, narrow_time)
    predictions = SpaceNet(wide, config).predict(images)
    assert set(np.unique(predictions).tolist()) <= {0, 1, 2, 3}
