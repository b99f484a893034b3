"""The baseline methods (spacenet_np.methods) on small synthetic blobs: what each one protects, replays and shares.

Three tasks of two classes on a 16-40-6 network. SpaceNet-Rehearsal must keep old connections and old heads
bit-identical while it replays old data; FineTune and Joint train one static network; EWC's penalty is checked
against its formula, and EWC with lambda=0 must be FineTune bit for bit. Every method must be deterministic for a
seed and restorable from ``extra_state`` + ``extra_options``.
"""
import copy

import numpy as np
import pytest
from helpers import connection_table, make_blobs, task_split, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from spacenet_np.methods import EWC, METHODS, FineTune, Joint, SpaceNetRehearsal
from spacenet_np.network import SparseMLP, softmax_cross_entropy
from spacenet_np.strategy import TaskState

N_FEATURES, HIDDEN, N_CLASSES = 16, [40], 6
TASKS = [[0, 1], [2, 3], [4, 5]]
STATIC = ("finetune", "joint", "ewc")  # the methods with one static network sized for ``total_tasks``
PROPERTY = settings(max_examples=15, deadline=None)


def config(**overrides):
    # 3 tasks x 60 input connections fit the 16 x 12 selected block of SpaceNet's allocation
    return tiny_config(**{"connections_per_task": (60, 16), **overrides})


def build(name, seed=0, hidden=HIDDEN, cfg=None, **options):
    if name in STATIC:
        options.setdefault("total_tasks", len(TASKS))
    return METHODS[name](SparseMLP(N_FEATURES, hidden, N_CLASSES), cfg or config(), seed=seed, input_mean=0.5,
                         input_std=0.25, **options)


@pytest.fixture(scope="module")
def data():
    """Per task: (images uint8, labels) with 30 samples per class."""
    images, labels = make_blobs(N_CLASSES, N_FEATURES, 30, seed=3)
    return [task_split(images, labels, classes) for classes in TASKS]


def learn(learner, data, tasks):
    for t in tasks:
        learner.learn(*data[t], TASKS[t])


def record_labels(learner):
    """Make ``learner.train_step`` record the labels of every batch; returns the list it appends to."""
    seen = []
    train_step = learner.train_step

    def spy(x, labels):
        seen.append(labels.copy())
        return train_step(x, labels)

    learner.train_step = spy
    return seen


def parameters(model):
    """Everything that defines the network: per layer (rows, cols, weights, importance, owner), per layer biases."""
    layers = [(layer.rows.copy(), layer.indices.copy(), layer.weights.copy(), layer.importance.copy(),
               layer.owner.copy()) for layer in model.layers]
    return layers, [n.bias.copy() for n in model.neurons], [n.slot_ids.copy() for n in model.neurons]


def assert_same_parameters(a, b):
    (layers_a, bias_a, slots_a), (layers_b, bias_b, slots_b) = parameters(a), parameters(b)
    for u, v in zip([x for layer in layers_a for x in layer] + bias_a + slots_a,
                    [x for layer in layers_b for x in layer] + bias_b + slots_b, strict=True):
        assert np.array_equal(u, v)


def class_counts(labels):
    return np.bincount(np.concatenate(labels) if isinstance(labels, list) else labels, minlength=N_CLASSES)


# ----- SpaceNet-Rehearsal -----
def test_rehearsal_keeps_old_connections_and_old_heads_bit_identical(data):
    learner = build("rehearsal")
    out = learner.model.layers[-1]
    heads_in_network = []
    train_epoch = learner.train_epoch

    def checked_train_epoch(state, *args, **kwargs):
        heads_in_network.append(set(np.unique(out.owner).tolist()) == set(range(state.task + 1)))
        assert np.array_equal(learner.trainable[-1], out.connections_of(state.task)), "old heads must be frozen"
        train_epoch(state, *args, **kwargs)

    learner.train_epoch = checked_train_epoch
    learn(learner, data, [0])
    old = [{k: v for k, v in connection_table(learner.model, l).items() if k[0] == 0} for l in range(2)]
    old_head_bias = out.bias[TASKS[0]].copy()
    for t in (1, 2):
        learn(learner, data, [t])
        for l in range(2):
            now = {k: v for k, v in connection_table(learner.model, l).items() if k[0] == 0}
            assert now.keys() == old[l].keys(), f"layer {l}: task 0's connections moved after task {t}"
            for key, (weight, importance) in old[l].items():
                assert now[key][0] == weight and now[key][1] == importance, f"layer {l}: {key} changed"
        assert np.array_equal(out.bias[TASKS[0]], old_head_bias), "old output biases must stay fixed"
    assert all(heads_in_network), "old heads stay in the network while a task trains"
    assert len(heads_in_network) == 3 * learner.config.epochs


@PROPERTY
@given(replay_per_task=st.one_of(st.none(), st.integers(0, 80)), seed=st.integers(0, 2**16))
def test_rehearsal_buffer_size_and_training_set(data, replay_per_task, seed):
    learner = build("rehearsal", seed=seed, cfg=config(epochs=1, rewire=False), replay_per_task=replay_per_task)
    seen = record_labels(learner)
    at_task_end = []
    learner.observers.append(type("Observer", (), {
        "task_end": staticmethod(lambda lrn, state: at_task_end.append(lrn.replay_labels.size))})())
    expected_size = 0
    for t in range(3):
        images, labels = data[t]
        buffer_labels = learner.replay_labels.copy()
        seen.clear()
        learner.learn(images, labels, TASKS[t])
        # one epoch runs over the task's data and the whole buffer, old labels included
        assert np.array_equal(class_counts(seen), class_counts(np.concatenate([buffer_labels, labels])))
        kept = labels.size if replay_per_task is None else min(replay_per_task, labels.size)
        expected_size += kept
        assert learner.replay_labels.size == learner.replay_images.shape[0] == expected_size
        assert at_task_end[-1] == expected_size, "observers see the buffer with the task just learned"
        new_images = learner.replay_images[expected_size - kept:]
        new_labels = learner.replay_labels[expected_size - kept:]
        assert learner.replay_images.dtype == np.uint8
        rows = {row.tobytes(): label for row, label in zip(images, labels)}
        assert all(rows.get(row.tobytes()) == label for row, label in zip(new_images, new_labels)), \
            "the buffer holds samples of the task with their labels"
        assert len({row.tobytes() for row in new_images}) == kept, "samples are drawn without replacement"


def test_rehearsal_training_set_of_a_later_task_holds_old_labels(data):
    learner = build("rehearsal", replay_per_task=5)
    learn(learner, data, [0, 1])
    images, labels = learner.training_data(TaskState(task=2, classes=np.array(TASKS[2]), images=data[2][0],
                                                     labels=data[2][1]))
    assert images.shape == (10 + data[2][0].shape[0], N_FEATURES) and images.dtype == np.uint8
    assert set(np.unique(labels).tolist()) == set(range(6))


def test_replay_refuses_a_task_of_another_dtype(data):
    learner = build("rehearsal")
    learn(learner, data, [0])
    images, labels = data[1]
    with pytest.raises(ValueError, match="dtype"):
        learner.learn(images.astype(np.float32) / 255, labels, TASKS[1])


# ----- FineTune and Joint -----
def test_finetune_trains_every_connection_on_every_task_with_a_fixed_count(data):
    learner = build("finetune")
    budget = [60 * 3, 16 * 3]
    learn(learner, data, [0])
    assert learner.model.connection_counts() == budget
    assert learner.model.neurons[1].n_slots == HIDDEN[0], "a narrow hidden layer slots all its neurons"
    before = parameters(learner.model)
    for t in (1, 2):
        learn(learner, data, [t])
        assert learner.model.connection_counts() == budget
    after = parameters(learner.model)
    for l, (old, new) in enumerate(zip(before[0], after[0])):
        assert np.array_equal(old[0], new[0]) and np.array_equal(old[1], new[1]), "the structure is static"
        changed = np.mean(old[2] != new[2])
        assert changed > 0.5, f"layer {l}: only {changed:.0%} of the old weights changed (no protection expected)"
    assert not np.array_equal(before[1][-1][TASKS[0]], after[1][-1][TASKS[0]]), "old output biases train too"
    for layer in learner.model.layers:
        keys = layer.rows.astype(np.int64) * layer.in_index.n_slots + layer.indices
        assert np.unique(keys).size == layer.nnz, "two connections at one position"


def test_finetune_on_a_very_wide_layer_slots_only_what_the_connections_need(data):
    learner = build("finetune", hidden=[10**7], cfg=config(epochs=1))
    learn(learner, data, [0])
    hidden = learner.model.neurons[1]
    assert hidden.n_slots == 180 and np.unique(hidden.slot_ids).size == 180
    assert learner.model.connection_counts() == [180, 48]


@st.composite
def static_networks(draw):
    """(sizes, per-task counts, total_tasks, init_fan) that fit: count * total_tasks <= fan_in * fan_out."""
    sizes = [draw(st.integers(1, 30)), *draw(st.lists(st.integers(1, 10**6), min_size=1, max_size=2)),
             draw(st.integers(1, 12))]
    total_tasks = draw(st.integers(1, 5))
    counts = tuple(draw(st.integers(1, max(1, min(fan_in * fan_out // total_tasks, 2000))))
                   for fan_in, fan_out in zip(sizes[:-1], sizes[1:]))
    if any(c * total_tasks > a * b for c, a, b in zip(counts, sizes[:-1], sizes[1:])):
        total_tasks = 1
    return sizes, counts, total_tasks, draw(st.sampled_from(["layer", "selected"]))


@PROPERTY
@given(network=static_networks(), seed=st.integers(0, 2**16))
def test_finetune_allocation_over_random_shapes(network, seed):
    sizes, counts, total_tasks, init_fan = network
    n_hidden = len(sizes) - 2
    cfg = config(connections_per_task=counts, selected_neurons=(1,) * n_hidden, reserved_neurons=(0,) * n_hidden,
                 init_fan=init_fan)
    model = SparseMLP(sizes[0], sizes[1:-1], sizes[-1])
    learner = FineTune(model, cfg, seed=seed, total_tasks=total_tasks)
    learner.begin_task(np.array([0]))
    budget = [c * total_tasks for c in counts]
    assert model.connection_counts() == budget
    for h, neurons in enumerate(model.neurons[1:-1]):
        assert neurons.n_slots == min(neurons.width, max(budget[h], budget[h + 1]))
        assert np.unique(neurons.slot_ids).size == neurons.n_slots and neurons.slot_ids.max() < neurons.width
    for l, layer in enumerate(model.layers):
        keys = layer.rows.astype(np.int64) * layer.in_index.n_slots + layer.indices
        assert np.unique(keys).size == layer.nnz, "two connections at one position"
        fans = sizes[l] + sizes[l + 1] if init_fan == "layer" else layer.in_index.n_slots + layer.out_index.n_slots
        assert np.all(np.abs(layer.weights) <= np.sqrt(6.0 / fans) * (1 + 1e-6))
        assert np.all(layer.owner == 0)
        assert learner.trainable[l].size == layer.nnz and np.all(learner.bias_trainable[l] == 1)


@pytest.mark.parametrize("name", STATIC)
def test_finetune_refuses_more_connections_than_a_layer_holds(name):
    with pytest.raises(ValueError, match=r"connections_per_task\[0\] \* total_tasks"):
        build(name, cfg=config(connections_per_task=(300, 16)))  # 3 x 300 > 16 x 40


@pytest.mark.parametrize("name", ["joint", "rehearsal"])
def test_joint_and_full_rehearsal_train_on_all_the_data_seen_so_far(data, name):
    learner = build(name, cfg=config(epochs=2))
    seen = record_labels(learner)
    for t in range(3):
        seen.clear()
        learn(learner, data, [t])
        all_so_far = np.concatenate([data[s][1] for s in range(t + 1)])
        assert np.array_equal(class_counts(seen), 2 * class_counts(all_so_far)), f"task {t}"
        assert max(labels.size for labels in seen) == learner.config.batch_size


def test_joint_continues_from_the_current_weights(data):
    learner = build("joint")
    learn(learner, data, [0])
    weights = [layer.weights.copy() for layer in learner.model.layers]
    begin_task = learner.begin_task

    def checked_begin_task(classes):
        state = begin_task(classes)
        for w, layer in zip(weights, learner.model.layers):
            assert np.array_equal(w, layer.weights), "joint training must not reinitialize the network"
        return state

    learner.begin_task = checked_begin_task
    learn(learner, data, [1])


def test_forgetting_and_remembering_on_easy_blobs(data):
    """After three tasks, fine-tuning has forgotten old tasks; joint training and rehearsal remember them.

    Observed over seeds 0-11 (this data, 10 epochs, lr 0.1), average test accuracy over the six classes: finetune
    0.50-0.72, joint 0.94-1.00, rehearsal 0.91-1.00.
    """
    images, labels = make_blobs(N_CLASSES, N_FEATURES, 30, seed=4, centre_seed=3)
    accuracy = {}
    for name in ("finetune", "joint", "rehearsal"):
        learner = build(name, cfg=config(epochs=10, lr=0.1))
        learn(learner, data, range(3))
        accuracy[name] = np.mean(learner.predict(images) == labels)
    assert accuracy["finetune"] < 0.8, accuracy
    assert accuracy["joint"] > 0.85 and accuracy["rehearsal"] > 0.85, accuracy


# ----- EWC -----
def ewc_after_one_task(data, **options):
    learner = build("ewc", **options)
    learn(learner, data, [0])
    return learner


@PROPERTY
@given(ewc_lambda=st.floats(0.0, 1e4), seed=st.integers(0, 2**16))
def test_ewc_penalty_gradient_is_lambda_f_times_the_distance(data, ewc_lambda, seed):
    learner = build("ewc", ewc_lambda=ewc_lambda)
    learner.begin_task(np.array(TASKS[0]))  # allocates the network
    rng = np.random.default_rng(seed)
    layers, lr = learner.model.layers, learner.config.lr
    fisher = [rng.uniform(0, 1.0 / (lr * max(ewc_lambda, 1.0)), layer.nnz).astype(np.float32) for layer in layers]
    fisher_bias = [rng.uniform(0, 1.0 / (lr * max(ewc_lambda, 1.0)), layer.bias.size).astype(np.float32)
                   for layer in layers]
    theta = [(layer.weights + rng.normal(0, 0.1, layer.nnz)).astype(np.float32) for layer in layers]
    theta_bias = [rng.normal(0, 0.1, layer.bias.size).astype(np.float32) for layer in layers]
    learner.load_extra_state({**{f"fisher_weights_{l}": f for l, f in enumerate(fisher)},
                              **{f"fisher_bias_{l}": f for l, f in enumerate(fisher_bias)},
                              **{f"theta_weights_{l}": f for l, f in enumerate(theta)},
                              **{f"theta_bias_{l}": f for l, f in enumerate(theta_bias)}})
    for l, layer in enumerate(layers):
        delta = rng.normal(size=(layer.out_index.n_slots, 5)).astype(np.float32)
        inputs = rng.normal(size=(layer.in_index.n_slots, 5)).astype(np.float32)
        connections = np.sort(rng.choice(layer.nnz, size=layer.nnz // 2, replace=False))
        got = learner.weight_grad(l, connections, delta, inputs)
        expected = (layer.weight_grad(connections, delta, inputs).astype(np.float64) + ewc_lambda
                    * fisher[l][connections] * (layer.weights[connections].astype(np.float64) - theta[l][connections]))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
        # biases: one SGD step moves them by -lr * (dL/db + lambda F (b - b*))
        bias = layer.bias.copy()
        learner.sgd_update(l, delta, inputs)
        step = delta.sum(axis=1) + ewc_lambda * fisher_bias[l] * (bias.astype(np.float64) - theta_bias[l])
        np.testing.assert_allclose(layer.bias, bias - lr * step, rtol=1e-4, atol=1e-6)


def test_ewc_stiffness_is_capped_at_one_over_lr(data):
    learner = ewc_after_one_task(data)
    cap = np.float32(1.0 / learner.config.lr)
    for f, k in zip(learner.fisher_weights + learner.fisher_bias, learner.stiffness_weights + learner.stiffness_bias):
        np.testing.assert_array_equal(k, np.minimum(np.float32(learner.ewc_lambda) * f, cap))
    layer = learner.model.layers[-1]
    learner._set_anchor([np.full(lay.nnz, 1e9, np.float32) for lay in learner.model.layers],
                        learner.fisher_bias, learner.theta_weights, learner.theta_bias)
    delta = np.zeros((layer.out_index.n_slots, 1), np.float32)
    inputs = np.zeros((layer.in_index.n_slots, 1), np.float32)
    layer.weights[:] += 1.0
    grad = learner.weight_grad(len(learner.model.layers) - 1, np.arange(layer.nnz), delta, inputs)
    np.testing.assert_allclose(grad, cap * (layer.weights - learner.theta_weights[-1]), rtol=1e-6)


def test_ewc_fisher_of_the_output_bias_is_the_mean_squared_softmax_error(data):
    images, labels = data[0]
    learner = ewc_after_one_task(data, fisher_samples=10**6)  # more than the task has: every sample
    model = learner.model
    weights = [layer.weights.copy() for layer in model.layers]
    _, fisher_bias = learner.fisher(images, labels)
    _, delta = softmax_cross_entropy(model.logits(learner.input_batch(images, np.arange(labels.size))), labels)
    per_sample = delta * labels.size  # the gradient of each sample's own loss
    np.testing.assert_allclose(fisher_bias[-1], np.mean(per_sample.astype(np.float64) ** 2, axis=1), rtol=1e-4,
                               atol=1e-7)
    assert all(np.array_equal(w, layer.weights) for w, layer in zip(weights, model.layers))


def test_ewc_consolidation_sums_fishers_keeps_theta_star_and_leaves_the_rng_alone(data):
    learner = ewc_after_one_task(data)
    first = [f.copy() for f in learner.fisher_weights]
    images, labels = data[1]
    state = copy.deepcopy(learner.rng.bit_generator.state)
    task_fisher, _ = learner.fisher(images, labels)
    assert learner.rng.bit_generator.state == state, "estimating the Fisher must not advance the learner's rng"
    learner.consolidate(images, labels)
    for f0, f1, f in zip(first, task_fisher, learner.fisher_weights):
        np.testing.assert_allclose(f, f0 + f1, rtol=1e-6)
    for theta, layer in zip(learner.theta_weights, learner.model.layers):
        assert np.array_equal(theta, layer.weights) and theta is not layer.weights


def test_ewc_with_lambda_zero_is_finetune_bit_for_bit(data):
    """Against FineTune's per-layer step, which EWC's penalty keeps (its fused step computes the same but with
    libm's exp and log in the loss, see tests/test_fused_step.py)."""
    ewc, finetune = build("ewc", ewc_lambda=0.0, seed=5), build("finetune", seed=5)
    finetune.fused_step = False
    learn(ewc, data, range(3))
    learn(finetune, data, range(3))
    assert ewc.fisher_weights is not None, "the Fisher was estimated (and the penalty ran, adding zero)"
    assert_same_parameters(ewc.model, finetune.model)
    assert ewc.rng.bit_generator.state == finetune.rng.bit_generator.state


def test_ewc_keeps_the_old_parameters_closer_than_finetune(data):
    distance = {}
    for ewc_lambda in (0.0, 5000.0):
        learner = ewc_after_one_task(data, ewc_lambda=ewc_lambda)
        fisher, theta = learner.fisher_weights, learner.theta_weights
        learn(learner, data, [1])
        distance[ewc_lambda] = sum(float(np.sum(f * (layer.weights - t) ** 2))
                                   for f, t, layer in zip(fisher, theta, learner.model.layers))
    assert distance[5000.0] < 0.5 * distance[0.0], distance


# ----- every method -----
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_is_deterministic_for_a_seed(data, name):
    runs = []
    for seed in (7, 7, 8):
        learner = build(name, seed=seed)
        learn(learner, data, range(3))
        runs.append((learner, learner.predict(np.concatenate([images for images, _ in data]))))
    assert_same_parameters(runs[0][0].model, runs[1][0].model)
    assert np.array_equal(runs[0][1], runs[1][1])
    for key, value in runs[0][0].extra_state().items():
        assert np.array_equal(value, runs[1][0].extra_state()[key])
    assert not np.array_equal(runs[0][0].model.layers[0].weights, runs[2][0].model.layers[0].weights)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_extra_state_and_options_rebuild_a_learner_that_continues_identically(data, name):
    options = {"rehearsal": {"replay_per_task": 9}, "ewc": {"ewc_lambda": 300.0, "fisher_samples": 20}}
    original = build(name, **options.get(name, {}))
    learn(original, data, [0, 1])
    state = original.extra_state()
    assert set(state) == {"rehearsal": {"replay_images", "replay_labels"}, "joint": {"replay_images",
                          "replay_labels"}, "ewc": {f"{k}_{l}" for k in EWC.KEYS for l in range(2)}}.get(name, set())
    assert all(isinstance(v, np.ndarray) for v in state.values())
    rebuilt = type(original)(copy.deepcopy(original.model), original.config, seed=123, input_mean=0.5,
                             input_std=0.25, **original.extra_options())
    assert rebuilt.extra_options() == original.extra_options()
    rebuilt.rng.bit_generator.state = original.rng.bit_generator.state
    rebuilt.tasks_learned = original.tasks_learned
    rebuilt.load_extra_state(state)
    for key, value in rebuilt.extra_state().items():
        assert np.array_equal(value, state[key]) and value.dtype == state[key].dtype
    for value in state.values():  # the learner copied the arrays
        value[...] = 0
    learn(original, data, [2])
    learn(rebuilt, data, [2])
    assert_same_parameters(original.model, rebuilt.model)


def test_extra_options_name_the_constructor_options():
    assert build("spacenet").extra_options() == {}
    assert build("rehearsal", replay_per_task=4).extra_options() == {"replay_per_task": 4}
    assert build("finetune", total_tasks=7).extra_options() == {"total_tasks": 7}
    assert build("joint").extra_options() == {"total_tasks": 3}
    assert build("ewc", ewc_lambda=2.5, fisher_samples=3).extra_options() == {
        "total_tasks": 3, "ewc_lambda": 2.5, "fisher_samples": 3}
    assert [METHODS[n].name for n in METHODS] == list(METHODS)
    assert issubclass(SpaceNetRehearsal, METHODS["spacenet"]) and issubclass(Joint, FineTune)
    assert issubclass(EWC, FineTune)


def test_load_extra_state_refuses_state_of_another_network(data):
    rehearsal = build("rehearsal")
    with pytest.raises(ValueError, match="replay_images"):
        rehearsal.load_extra_state({"replay_images": np.zeros((3, 5), np.uint8), "replay_labels": np.zeros(3)})
    with pytest.raises(ValueError, match="replay_labels"):
        rehearsal.load_extra_state({"replay_images": np.zeros((3, N_FEATURES), np.uint8),
                                    "replay_labels": np.full(3, N_CLASSES)})
    ewc = ewc_after_one_task(data)
    state = ewc.extra_state()
    state["fisher_weights_0"] = state["fisher_weights_0"][:-1]
    with pytest.raises(ValueError, match="fisher_weights_0"):
        ewc.load_extra_state(state)
    with pytest.raises(ValueError, match="no extra state"):
        build("finetune").load_extra_state({"x": np.zeros(1)})
    with pytest.raises(ValueError, match="no extra state"):
        build("spacenet").load_extra_state({"x": np.zeros(1)})


@pytest.mark.parametrize("name", ["joint", "rehearsal"])
def test_on_batch_counts_the_batches_of_the_replayed_training_set(data, name):
    learner = build(name)
    for t in range(3):
        calls = []
        learner.learn(*data[t], TASKS[t], on_batch=lambda *args: calls.append(args[:3]))
        n = sum(data[s][1].size for s in range(t + 1))
        n_batches = -(-n // learner.config.batch_size)
        assert calls == [(epoch, b, n_batches) for epoch in range(learner.config.epochs) for b in range(n_batches)]


@pytest.mark.parametrize("name", STATIC)
def test_static_methods_need_no_neuron_counts(name):
    cfg = config(selected_neurons=(), reserved_neurons=(99,))
    assert build(name, cfg=cfg).model.layers[0].nnz == 0
    with pytest.raises(ValueError, match="selected_neurons"):
        build("spacenet", cfg=cfg)


@pytest.mark.parametrize("name, options, word", [
    ("rehearsal", {"replay_per_task": -1}, "replay_per_task"),
    ("rehearsal", {"replay_per_task": 2.5}, "replay_per_task"),
    ("finetune", {"total_tasks": 0}, "total_tasks"),
    ("joint", {"total_tasks": 1.5}, "total_tasks"),
    ("ewc", {"ewc_lambda": -1.0}, "ewc_lambda"),
    ("ewc", {"ewc_lambda": float("nan")}, "ewc_lambda"),
    ("ewc", {"fisher_samples": 0}, "fisher_samples"),
])
def test_impossible_options_are_refused(name, options, word):
    with pytest.raises(ValueError, match=word):
        build(name, **options)
