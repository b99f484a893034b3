"""The ablation switches of ``SpaceNetConfig`` (issue 11): each documented deviation can be turned, the defaults
keep today's behaviour, and invalid or unsupported values are refused.

Three tasks of two classes on a 16-40-6 network (one 16-40-30-6 for the importance reference, a tiny CNN for a
smoke test). The tests drive the real ``learn`` and wrap instance methods (``begin_task``, ``rewire``, ``drop``,
``reserve``, ``sgd_update``, ``train_step``) to look at each step.
"""
import numpy as np
import pytest
from helpers import connection_table, make_blobs, task_split, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from spacenet_np import spacenet
from spacenet_np.checkpoint import load, restore_learner, save_learner
from spacenet_np.layers import FREE
from spacenet_np.methods import METHODS
from spacenet_np.network import SparseCNN, SparseMLP, softmax_cross_entropy
from spacenet_np.spacenet import SWITCHES, SpaceNet, SpaceNetConfig, balance_head_norms, head_statistics, task_heads

N_FEATURES, HIDDEN, N_CLASSES = 16, [40], 6
TASKS = [[0, 1], [2, 3], [4, 5]]
MEAN, STD = 0.5, 0.25
PROPERTY = settings(max_examples=10, deadline=None)
DEFAULTS = dict(bias_scope="free", softmax_scope="all", rewire_output=False, rewire_last_epoch=False,
                importance="paper", balance_heads="none")
ALL_ON = dict(bias_scope="selected", softmax_scope="seen", rewire_output=True, rewire_last_epoch=True,
              importance="official_sum", balance_heads="norm")


def config(**overrides):
    return tiny_config(**{"connections_per_task": (60, 16), **overrides})


def build(name="spacenet", seed=0, hidden=HIDDEN, **overrides):
    options = {"total_tasks": len(TASKS)} if name in ("finetune", "joint", "ewc") else {}
    return METHODS[name](SparseMLP(N_FEATURES, hidden, N_CLASSES), config(**overrides), seed=seed,
                         input_mean=MEAN, input_std=STD, **options)


@pytest.fixture(scope="module")
def data():
    """Per task: (images uint8, labels), 30 samples per class."""
    images, labels = make_blobs(N_CLASSES, N_FEATURES, 30, seed=3)
    return [task_split(images, labels, classes) for classes in TASKS]


def learn(learner, data, tasks=range(len(TASKS))):
    for t in tasks:
        learner.learn(*data[t], TASKS[t])
    return learner


def capture_states(learner):
    """Record every ``TaskState`` that ``begin_task`` returns; returns the list."""
    states, begin = [], learner.begin_task

    def spy(classes):
        states.append(begin(classes))
        return states[-1]

    learner.begin_task = spy
    return states


def biases(learner):
    return [n.bias.copy() for n in learner.model.neurons]


def all_images(data):
    return np.concatenate([images for images, _ in data])


# ----- defaults and validation -----
@PROPERTY
@given(seed=st.integers(0, 10**6), name=st.sampled_from(sorted(METHODS)))
def test_explicit_defaults_are_bit_identical_to_the_implicit_ones(data, seed, name):
    implicit, explicit = build(name, seed), build(name, seed, **DEFAULTS)
    learn(implicit, data)
    learn(explicit, data)
    for l in range(len(implicit.model.layers)):
        a, b = connection_table(implicit.model, l), connection_table(explicit.model, l)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for u, v in zip(biases(implicit), biases(explicit), strict=True):
        assert np.array_equal(u, v)


@pytest.mark.parametrize("name, value", [
    ("bias_scope", "all"), ("bias_scope", None), ("softmax_scope", "learned"), ("softmax_scope", 1),
    ("rewire_output", "true"), ("rewire_output", 1), ("rewire_last_epoch", None), ("importance", "official"),
    ("balance_heads", "mean"), ("balance_heads", True)])
def test_invalid_switch_values_are_refused_naming_the_field_and_the_choices(name, value):
    choices = dict(SpaceNetConfig.__dataclass_fields__[name].metadata)["choices"]
    with pytest.raises(ValueError, match=f"{name}=.*must be one of {', '.join(map(repr, choices))}"):
        build(**{name: value})


@pytest.mark.parametrize("name, switch, value", [
    ("finetune", "bias_scope", "none"), ("ewc", "importance", "official_sum"), ("joint", "balance_heads", "norm"),
    ("finetune", "rewire_output", True), ("static", "rewire_output", True), ("static", "rewire_last_epoch", True)])
def test_a_method_refuses_a_switch_it_does_not_honour(name, switch, value):
    with pytest.raises(ValueError, match=f"{switch}=.*not supported by this method"):
        build(name, **{switch: value})


@pytest.mark.parametrize("switch", ["rewire_output", "rewire_last_epoch"])
def test_rewiring_switches_need_rewiring(switch):
    with pytest.raises(ValueError, match=f"{switch}=True needs rewire=True"):
        build(rewire=False, **{switch: True})


def test_each_method_declares_the_switches_it_honours():
    assert all(set(METHODS[name].SWITCHES) == set(SWITCHES) for name in ("spacenet", "rehearsal"))
    assert set(METHODS["static"].SWITCHES) == set(SWITCHES) - {"rewire_output", "rewire_last_epoch"}
    assert all(METHODS[name].SWITCHES == ("softmax_scope",) for name in ("finetune", "ewc", "joint"))
    for name, cls in METHODS.items():
        build(name, **{s: ALL_ON[s] for s in cls.SWITCHES})  # every honoured switch is accepted


def test_every_switch_declares_help_and_choices_that_include_its_default():
    for name in SWITCHES:
        field = SpaceNetConfig.__dataclass_fields__[name]
        assert field.metadata["help"] and field.default in field.metadata["choices"]


# ----- bias_scope -----
def record_masks(learner):
    """Wrap ``train_step`` to keep, at each task's first batch, the bias masks and every layer's ``reserved_by``.

    Returns the list it appends (hidden masks, output mask, reserved_by per neuron layer) to, one per task."""
    step, records = learner.train_step, []

    def spy(x, labels):
        if len(records) == learner.tasks_learned:
            records.append(([m.copy() for m in learner.bias_trainable[:-1]], learner.bias_trainable[-1].copy(),
                            [n.reserved_by.copy() for n in learner.model.neurons]))
        return step(x, labels)

    learner.train_step = spy
    return records


@PROPERTY
@given(seed=st.integers(0, 10**6), scope=st.sampled_from(spacenet.BIAS_SCOPES),
       name=st.sampled_from(["spacenet", "rehearsal", "static"]))
def test_bias_scope_decides_which_biases_train(data, seed, scope, name):
    learner = build(name, seed, bias_scope=scope)
    states, records = capture_states(learner), record_masks(learner)
    for t in range(len(TASKS)):
        before = biases(learner)
        learner.learn(*data[t], TASKS[t])
        (hidden, out, reserved), state, after = records[t], states[t], biases(learner)
        for mask, position in zip(hidden, learner.model.hidden_positions, strict=True):
            expected = {"free": np.flatnonzero(reserved[position] == FREE), "selected": state.selected[position],
                        "output": [], "none": []}[scope]
            assert np.array_equal(np.flatnonzero(mask), expected)
            old = before[position]
            changed = np.flatnonzero(after[position][:old.size] != old)
            assert set(changed.tolist()) <= set(np.flatnonzero(mask).tolist())
            assert not np.any(after[position][old.size:][mask[old.size:] == 0])  # untrained new slots stay 0
        assert np.array_equal(np.flatnonzero(out), [] if scope == "none" else TASKS[t])
        assert set(np.flatnonzero(after[-1] != before[-1]).tolist()) <= set(np.flatnonzero(out).tolist())


def test_bias_scope_none_and_output_keep_hidden_biases_bit_identical(data):
    for scope in ("none", "output"):
        learner = build(bias_scope=scope)
        for t in range(len(TASKS)):
            before = biases(learner)
            learner.learn(*data[t], TASKS[t])
            for position in learner.model.hidden_positions:
                assert not np.any(learner.model.neurons[position].bias)  # new slots start at 0 and stay there
            changed = np.flatnonzero(learner.model.neurons[-1].bias != before[-1])
            assert changed.size == 0 if scope == "none" else set(changed.tolist()) == set(TASKS[t])


# ----- softmax_scope -----
@PROPERTY
@given(n_classes=st.integers(2, 8), batch=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_seen_softmax_is_the_softmax_over_the_allowed_classes_with_zero_gradient_elsewhere(n_classes, batch, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(n_classes, batch)).astype(np.float32)
    allowed = rng.random(n_classes) < 0.5
    allowed[rng.integers(n_classes)] = True
    labels = rng.choice(np.flatnonzero(allowed), size=batch)
    loss, delta = softmax_cross_entropy(logits, labels, allowed)
    sub = logits[allowed].astype(np.float64)
    p = np.exp(sub - sub.max(axis=0)) / np.exp(sub - sub.max(axis=0)).sum(axis=0)
    where = np.searchsorted(np.flatnonzero(allowed), labels)
    assert loss == pytest.approx(-np.mean(np.log(p[where, np.arange(batch)])), rel=1e-5, abs=1e-6)  # float32
    expected = p.copy()
    expected[where, np.arange(batch)] -= 1.0
    np.testing.assert_allclose(delta[allowed], expected / batch, rtol=1e-5, atol=1e-7)
    assert np.all(delta[~allowed] == 0.0)


def output_deltas(learner):
    """Wrap ``sgd_update`` to keep a copy of every output-layer delta; returns the list."""
    deltas, update, last = [], learner.sgd_update, len(learner.model.layers) - 1

    def spy(l, delta, inputs):
        if l == last:
            deltas.append((learner.tasks_learned, delta.copy()))
        return update(l, delta, inputs)

    learner.sgd_update = spy
    return deltas


@pytest.mark.parametrize("name", ["spacenet", "rehearsal", "finetune", "ewc", "joint"])
def test_seen_softmax_gives_unseen_classes_exactly_zero_gradient(data, name):
    learner = build(name, softmax_scope="seen")
    deltas = output_deltas(learner)
    for t in range(2):
        before = biases(learner)[-1]
        learner.learn(*data[t], TASKS[t])
        unseen = [c for task in TASKS[t + 1:] for c in task]
        assert all(np.all(d[unseen] == 0.0) and np.any(d[TASKS[t]] != 0.0) for task, d in deltas if task == t)
        assert np.array_equal(learner.model.neurons[-1].bias[unseen], before[unseen])


def test_seen_softmax_leaves_unseen_classes_of_finetune_alone_where_all_moves_them(data):
    unseen = [c for task in TASKS[1:] for c in task]
    for scope in ("seen", "all"):
        learner = build("finetune", softmax_scope=scope)
        learner.learn(*data[0], TASKS[0])  # allocates the whole static network first
        initial = build("finetune", softmax_scope=scope)
        initial.begin_task(np.array(TASKS[0]))
        out, start = learner.model.layers[-1], initial.model.layers[-1]
        rows = np.isin(out.rows, unseen)
        same = (np.array_equal(out.weights[rows], start.weights[rows])
                and not np.any(learner.model.neurons[-1].bias[unseen]))
        assert same == (scope == "seen")


# ----- rewire_output and rewire_last_epoch -----
def record_rewires(learner):
    """Wrap ``rewire`` to keep the output layer's (rows, cols) of the task before and after each rewiring."""
    records, rewire = [], learner.rewire

    def positions(state):
        out = learner.model.layers[-1]
        mine = out.owner == state.task
        return set(zip(out.rows[mine].tolist(), out.indices[mine].tolist()))

    def spy(state):
        before = positions(state)
        rewire(state)
        records.append((state, before, positions(state)))

    learner.rewire = spy
    return records


@PROPERTY
@given(seed=st.integers(0, 10**6), name=st.sampled_from(["spacenet", "rehearsal"]), on=st.booleans())
def test_rewire_output_moves_output_connections_within_the_block_and_keeps_their_count(data, seed, name, on):
    learner = build(name, seed, rewire_output=on)
    records = record_rewires(learner)
    learn(learner, data)
    count = learner.config.connections_per_task[-1]
    assert len(records) == len(TASKS) * (learner.config.epochs - 1)
    for state, before, after in records:
        assert len(before) == len(after) == count
        assert (before != after) == on  # 4 of 16 dropped, 8 fresh positions of the 2 x 12 block to grow into
        rows, cols = zip(*after)
        assert set(rows) <= set(state.classes.tolist()) and set(cols) <= set(state.selected[-2].tolist())


@pytest.mark.parametrize("name", ["spacenet", "rehearsal"])
@pytest.mark.parametrize("on", [False, True])
def test_rewire_last_epoch_rewires_after_every_epoch(data, name, on):
    learner = build(name, epochs=3, rewire_last_epoch=on)
    records = record_rewires(learner)
    reserve, order = learner.reserve, []
    learner.reserve = lambda state: (order.append(len(records)), reserve(state))
    learn(learner, data)
    per_task = 3 if on else 2
    assert len(records) == len(TASKS) * per_task
    assert order == [per_task * (t + 1) for t in range(len(TASKS))]  # reservation comes after the last rewiring


# ----- importance -----
class OfficialReference:
    """The official code's neuron importance in dense NumPy, kept beside a learner by wrapping its methods.

    Per layer a dense (out slots, in slots) Omega of the task: live connections' Omega plus what dropped positions
    held (never cleared, as in the official code). After every training step each neuron layer's importance grows
    by the row sums of the layer below it (column sums of the first layer for the input). ``checks`` counts the
    comparisons with the learner's sums (before every rewiring and reservation)."""

    def __init__(self, learner):
        self.learner, self.checks = learner, 0
        for name in ("begin_task", "train_step", "drop", "rewire", "reserve"):
            setattr(learner, name, getattr(self, name)(getattr(learner, name)))

    def begin_task(self, begin):
        def run(classes):
            state = begin(classes)
            self.task = state.task
            self.dropped = [np.zeros((l.out_index.n_slots, l.in_index.n_slots)) for l in self.learner.model.layers]
            self.sums = [np.zeros(n.n_slots) for n in self.learner.model.neurons]
            return state
        return run

    def omega(self, l):
        layer = self.learner.model.layers[l]
        mine = layer.owner == self.task
        dense = self.dropped[l].copy()
        dense[layer.rows[mine], layer.indices[mine]] += layer.importance[mine]
        return dense

    def train_step(self, step):
        def run(x, labels):
            loss = step(x, labels)
            for l, layer in enumerate(self.learner.model.layers):
                dense = self.omega(l)
                self.sums[layer.out_pos] += dense.sum(axis=1)
                if l == 0:
                    self.sums[0] += dense.sum(axis=0)
            return loss
        return run

    def drop(self, drop):
        def run(layer, task):
            l = self.learner.model.layers.index(layer)
            before = self.omega(l) - self.dropped[l]
            dropped = drop(layer, task)
            self.dropped[l] += before - (self.omega(l) - self.dropped[l])
            return dropped
        return run

    def compare(self):
        for mine, reference in zip(self.learner.official_importance.sums, self.sums, strict=True):
            np.testing.assert_allclose(mine, reference, rtol=1e-9, atol=1e-300)
        self.checks += 1

    def rewire(self, rewire):
        return lambda state: (self.compare(), rewire(state))[1]

    def reserve(self, reserve):
        def run(state):
            self.compare()
            targets = {p: self.learner.targets(state, position=p) for p in self.learner.model.hidden_positions}
            reserve(state)
            for p, selected in targets.items():
                chosen = self.learner.model.neurons[p].reserved_by[selected] == state.task
                if chosen.any() and (~chosen).any():
                    assert self.sums[p][selected[chosen]].min() >= self.sums[p][selected[~chosen]].max()
        return run


@PROPERTY
@given(seed=st.integers(0, 10**6), ratio=st.sampled_from([0.0, 0.3, 0.6]), epochs=st.integers(1, 3),
       rewire_output=st.booleans())
def test_official_sum_matches_a_dense_numpy_reference(data, seed, ratio, epochs, rewire_output):
    learner = METHODS["spacenet"](
        SparseMLP(N_FEATURES, [40, 30], N_CLASSES),
        config(connections_per_task=(60, 40, 16), selected_neurons=(12, 10), reserved_neurons=(4, 3),
               rewire_ratio=ratio, epochs=epochs, rewire_output=rewire_output, importance="official_sum"),
        seed=seed, input_mean=MEAN, input_std=STD)
    reference = OfficialReference(learner)
    learn(learner, data, range(2))
    assert reference.checks == 2 * epochs  # epochs - 1 rewirings and one reservation per task
    assert learner.official_importance is None  # dropped after the task


def test_paper_importance_is_eq4_and_official_sum_changes_the_network(data):
    paper, official = build(seed=5), build(seed=5, importance="official_sum")
    reserved = []
    for learner in (paper, official):
        reserve = learner.reserve

        def spy(state, learner=learner, reserve=reserve):
            if learner is paper:
                eq4 = learner.neuron_importance(state.task)
                assert all(np.array_equal(a, b) for a, b in zip(learner.task_importance(state), eq4))
            reserve(state)

        learner.reserve = spy
        learn(learner, data)
        reserved.append(learner.model.neurons[1].reserved_by.copy())
    tables = [connection_table(learner.model, 0) for learner in (paper, official)]
    assert tables[0].keys() != tables[1].keys() or not np.array_equal(*reserved)


# ----- balance_heads and head_statistics -----
def head_norms(model):
    out = model.layers[-1]
    return [np.linalg.norm(out.weights[ids].astype(np.float64)) for _, ids in task_heads(model).values()]


@PROPERTY
@given(seed=st.integers(0, 10**6), name=st.sampled_from(["spacenet", "rehearsal", "static"]))
def test_balanced_heads_have_equal_norms_after_every_task(data, seed, name):
    learner = build(name, seed, balance_heads="norm")
    for t in range(len(TASKS)):
        learner.learn(*data[t], TASKS[t])
        norms = head_norms(learner.model)
        assert len(norms) == t + 1 and learner.model.layers[-1].nnz == (t + 1) * 16  # every head is back
        np.testing.assert_allclose(norms, np.mean(norms), rtol=1e-5)


@PROPERTY
@given(seed=st.integers(0, 10**6), name=st.sampled_from(["spacenet", "rehearsal"]))
def test_balancing_scales_each_task_logits_and_keeps_its_own_ranking(data, seed, name):
    learner = learn(build(name, seed), data)
    images = all_images(data)
    x = learner.input_batch(images, np.arange(images.shape[0]))
    before, norms = learner.model.logits(x).copy(), head_norms(learner.model)
    factors = balance_head_norms(learner.model)
    after = learner.model.logits(x)
    assert sorted(factors) == list(range(len(TASKS)))
    np.testing.assert_allclose([factors[t] * n for t, n in enumerate(norms)], np.mean(norms), rtol=1e-6)
    for t, classes in enumerate(TASKS):
        np.testing.assert_allclose(after[classes], factors[t] * before[classes], rtol=1e-5, atol=1e-6)
        margin = np.abs(before[classes[0]] - before[classes[1]]) > 1e-4
        assert np.array_equal(np.argmax(after[classes], axis=0)[margin], np.argmax(before[classes], axis=0)[margin])
    again = balance_head_norms(learner.model)  # idempotent
    np.testing.assert_allclose(list(again.values()), 1.0, rtol=1e-6)


def test_balancing_leaves_heads_of_norm_zero_alone(data):
    learner = learn(build(), data, range(2))
    out = learner.model.layers[-1]
    out.weights[out.owner == 0] = 0.0
    bias = learner.model.neurons[-1].bias.copy()
    factors = balance_head_norms(learner.model)
    assert factors[0] == 1.0 and factors[1] == pytest.approx(1.0)
    assert np.array_equal(learner.model.neurons[-1].bias[TASKS[0]], bias[TASKS[0]])


def dense_logits(model, images):
    """Logits from dense float64 copies of the weights over neuron ids. Returns (n_classes, n)."""
    h = ((images / 255.0 - MEAN) / STD).T
    for l, layer in enumerate(model.layers):
        bias = np.zeros(layer.out_index.width)
        bias[layer.out_index.slot_ids] = layer.bias
        h = layer.to_scipy().toarray().astype(np.float64) @ h + bias[:, None]
        h = np.maximum(h, 0.0) if l < len(model.layers) - 1 else h
    return h


@pytest.mark.parametrize("name", ["spacenet", "rehearsal", "finetune"])
def test_head_statistics_match_a_dense_reference(data, name):
    learner = learn(build(name), data)
    images = all_images(data)
    task_classes = TASKS if name == "finetune" else None
    stats = head_statistics(learner, images, task_classes=task_classes, batch_size=64)
    logits, out = dense_logits(learner.model, images), learner.model.layers[-1]
    assert [s["task"] for s in stats] == [0, 1, 2] and [s["classes"] for s in stats] == TASKS
    for s, classes in zip(stats, TASKS):
        into = np.isin(out.rows, classes)
        assert s["weight_norm"] == pytest.approx(np.sqrt(np.sum(out.weights[into].astype(np.float64) ** 2)))
        assert s["bias_mean"] == pytest.approx(np.mean(learner.model.neurons[-1].bias[classes]))
        np.testing.assert_allclose(s["class_mean_logits"], logits[classes].mean(axis=1), rtol=1e-4, atol=1e-5)
        assert s["mean_logit"] == pytest.approx(logits[classes].mean(), rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="at least one image"):
        head_statistics(learner, images[:0])


# ----- checkpoints -----
def test_a_checkpoint_config_without_the_switches_restores_the_defaults(tmp_path, data):
    learner = learn(build(), data, range(1))
    ckpt = load(save_learner(tmp_path / "ckpt.npz", learner))
    ckpt.config = {k: v for k, v in ckpt.config.items() if k not in SWITCHES}  # a checkpoint from before them
    restored = restore_learner(ckpt)
    assert all(getattr(restored.config, k) == v for k, v in DEFAULTS.items())
    learn(learner, data, range(1, 3))
    learn(restored, data, range(1, 3))
    for l in range(len(learner.model.layers)):
        a, b = connection_table(learner.model, l), connection_table(restored.model, l)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_non_default_switches_survive_a_checkpoint(tmp_path, data):
    learner = learn(build(**ALL_ON), data, range(1))
    restored = restore_learner(load(save_learner(tmp_path / "ckpt.npz", learner)))
    assert restored.config == learner.config
    learn(learner, data, range(1, 3))
    learn(restored, data, range(1, 3))
    assert np.array_equal(learner.predict(all_images(data)), restored.predict(all_images(data)))


# ----- every switch at once -----
def test_every_switch_at_once_on_a_tiny_cnn():
    images, labels = make_blobs(4, 2 * 64, 12, seed=1)
    tasks = [[0, 1], [2, 3]]
    cfg = SpaceNetConfig(connections_per_task=(0.25, 0.25, 0.05, 0.1), selected_neurons=(None, None, 6),
                         reserved_neurons=(1, 1, 2), epochs=2, batch_size=8, lr=0.05, init_fan="connections",
                         **ALL_ON)
    learner = SpaceNet(SparseCNN((2, 8, 8), (4, 4), (12,), 4), cfg, seed=0, input_mean=MEAN, input_std=STD)
    records = record_rewires(learner)
    for classes in tasks:
        learner.learn(*task_split(images, labels, classes), classes)
    assert len(records) == 2 * cfg.epochs and any(before != after for _, before, after in records)
    norms = head_norms(learner.model)
    np.testing.assert_allclose(norms, np.mean(norms), rtol=1e-5)
    assert np.all(np.isin(learner.predict(images), [0, 1, 2, 3]))
    assert all(np.isfinite(s["mean_logit"]) for s in head_statistics(learner, images))
