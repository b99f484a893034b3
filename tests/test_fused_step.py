"""The fused training step of a ``SparseMLP`` (``kernels.mlp_train_step``, one call per batch) against the per-layer
path of ``Learner.train_step`` (forward, NumPy softmax, backward calling ``sgd_update`` per layer).

The sparse products are the same kernels and the loss and bias steps reproduce NumPy's float32 operations, so with
the per-layer path's softmax swapped for the kernel's the two paths agree bit for bit: loss, activations, gradients,
weights, biases and Omega. With NumPy's softmax they differ only through ``exp`` and ``log`` (NumPy's SIMD versions
against libm's, up to 2 ulp), which these tests bound tightly.
"""
import contextlib
import copy
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import make_blobs, pair_tasks, task_split
from hypothesis import given, settings
from hypothesis import strategies as st

from spacenet_np import kernels, strategy
from spacenet_np.methods import METHODS
from spacenet_np.network import SparseCNN, SparseMLP, input_lookup, softmax_cross_entropy
from spacenet_np.spacenet import SpaceNet, SpaceNetConfig
from spacenet_np.strategy import Learner

SETTINGS = settings(max_examples=40, deadline=None)
seeds = st.integers(0, 2**32 - 1)


def kernel_softmax(logits, labels, classes=None):
    """``network.softmax_cross_entropy`` computed by ``kernels.softmax_cross_entropy`` (libm's exp and log)."""
    delta = np.empty_like(logits)
    scratch = np.empty((2, logits.shape[1]), np.float32)
    masked = classes is not None
    loss = kernels.softmax_cross_entropy(logits, labels, masked, classes if masked else np.zeros(0, bool), delta,
                                         scratch[0], scratch[1])
    return float(loss), delta


@contextlib.contextmanager
def kernel_softmax_everywhere():
    """The per-layer path with the fused kernel's softmax: the two paths must then agree bit for bit."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(strategy, "softmax_cross_entropy", kernel_softmax)
        yield


# ----- random sparse MLPs -----
def random_mlp(rng, n_features, hidden, n_classes, density):
    """A SparseMLP with random slots, connections (some hidden neurons feed nothing: inactive rows), weights,
    biases and Omega."""
    model = SparseMLP(n_features, hidden, n_classes)
    for neurons in model.neurons[1:-1]:
        neurons.slots_for(rng.permutation(neurons.width)[:rng.integers(1, neurons.width + 1)])
        neurons.bias[:] = rng.normal(0.0, 0.3, neurons.n_slots)
    model.neurons[-1].bias[:] = rng.normal(0.0, 0.3, n_classes)
    for layer in model.layers:
        layer.resize_to_indices()
        n_out, n_in = layer.out_index.n_slots, layer.in_index.n_slots
        keys = np.flatnonzero(rng.random(n_out * n_in) < density)
        layer.add_connections(keys // n_in, keys % n_in, rng.normal(0.0, 0.6, keys.size).astype(np.float32),
                              rng.integers(0, 2, keys.size), rng.uniform(0.0, 1.0, keys.size).astype(np.float32))
    return model


def random_learner(rng, model, lr, masked):
    """A bare Learner on ``model``: random trainable connections (none in some layers) and bias masks."""
    learner = Learner.__new__(Learner)
    learner.model, learner.config = model, SimpleNamespace(lr=lr)
    learner.trainable = [np.flatnonzero(rng.random(layer.nnz) < rng.choice([0.0, 0.5, 1.0]))
                         for layer in model.layers]
    learner.bias_trainable = [(rng.random(layer.out_index.n_slots) < 0.6).astype(np.float32)
                              for layer in model.layers]
    learner.loss_classes = None
    if masked:
        learner.loss_classes = rng.random(model.n_classes) < 0.6
        learner.loss_classes[rng.integers(model.n_classes)] = True
    return learner


def random_batch(rng, learner, batch):
    classes = np.arange(learner.model.n_classes)
    if learner.loss_classes is not None:
        classes = classes[learner.loss_classes]
    x = rng.normal(0.0, 1.0, (learner.model.n_features, batch)).astype(np.float32)
    return x, rng.choice(classes, size=batch)


def state(model):
    """Everything a step changes: weights, Omega and biases of every layer."""
    return [a.copy() for layer in model.layers for a in (layer.weights, layer.importance, layer.bias)]


def run_steps(learner, batches, fused):
    """``train_step`` on each (x, labels); returns the losses and, per step, the active activations and deltas."""
    learner.fused_step = fused
    losses, inside = [], []
    for x, labels in batches:
        assert learner.fused_step_applies(x, labels) == fused
        losses.append(learner.train_step(x.copy(), labels))
        activations, deltas = learner.model.buffers(x.shape[1])
        inside.append([a[layer.active_rows].copy() for a, layer in zip(activations[1:], learner.model.layers)]
                      + [d.copy() for d in deltas[1:-1]])
    return losses, inside


mlps = st.fixed_dictionaries(dict(
    n_features=st.integers(1, 12), hidden=st.lists(st.integers(1, 10), min_size=1, max_size=3),
    n_classes=st.integers(2, 6), density=st.sampled_from([0.1, 0.4, 1.0]), batch=st.integers(1, 20),
    last=st.integers(1, 20), masked=st.booleans(), lr=st.floats(0.01, 0.5), seed=seeds))


def two_paths(p):
    """The same random MLP, learner and batches (two of ``batch`` samples, then a last one of ``last``), once
    per path."""
    rng = np.random.default_rng(p["seed"])
    model = random_mlp(rng, p["n_features"], p["hidden"], p["n_classes"], p["density"])
    learner = random_learner(rng, model, p["lr"], p["masked"])
    batches = [random_batch(rng, learner, b) for b in (p["batch"], p["batch"], p["last"])]
    return learner, copy.deepcopy(learner), batches


@SETTINGS
@given(p=mlps)
def test_fused_step_is_bit_identical_with_the_same_softmax(p):
    fused, layered, batches = two_paths(p)
    with kernel_softmax_everywhere():
        loss_f, inside_f = run_steps(fused, batches, True)
        loss_l, inside_l = run_steps(layered, batches, False)
    assert loss_f == loss_l
    for a, b in zip(state(fused.model) + sum(inside_f, []), state(layered.model) + sum(inside_l, [])):
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def assert_close(a, b, before):
    """Equal up to the last bits of the step: 1e-5 of the largest change, 4 ulp of the value."""
    change = np.max(np.abs(np.asarray(b, np.float64) - before), initial=0.0)
    tolerance = 1e-5 * change + 4 * np.finfo(np.float32).eps * np.abs(b) + 1e-30
    assert np.all(np.abs(np.asarray(a, np.float64) - b) <= tolerance)


@SETTINGS
@given(p=mlps)
def test_fused_step_matches_the_per_layer_path(p):
    fused, layered, batches = two_paths(p)
    before = state(fused.model)
    loss_f, _ = run_steps(fused, batches, True)
    loss_l, _ = run_steps(layered, batches, False)
    np.testing.assert_allclose(loss_f, loss_l, rtol=2e-6, atol=1e-6)
    for a, b, b0 in zip(state(fused.model), state(layered.model), before):
        assert_close(a, b, b0)


def test_untrainable_parameters_do_not_move():
    rng = np.random.default_rng(3)
    model = random_mlp(rng, 8, [6, 5], 4, 0.5)
    learner = random_learner(rng, model, 0.3, masked=False)
    learner.trainable[1] = np.zeros(0, np.int64)
    learner.bias_trainable[2][:] = 0.0
    before = state(model)
    learner.train_step(*random_batch(rng, learner, 9))
    after = state(model)
    assert np.array_equal(after[3], before[3]) and np.array_equal(after[4], before[4]), "layer 1 had nothing to train"
    assert np.array_equal(after[8], before[8]), "masked biases moved"
    frozen = np.setdiff1d(np.arange(model.layers[0].nnz), learner.trainable[0])
    assert np.array_equal(after[0][frozen], before[0][frozen])
    assert not np.array_equal(after[0], before[0]) or learner.trainable[0].size == 0


def test_a_step_that_needs_the_parallel_builds_takes_the_per_layer_path(monkeypatch):
    """The fused kernel runs the serial builds only; where ``pick`` would choose a parallel build the per-layer
    path runs instead (here with the threshold lowered so that a small network crosses it), with the same bits."""
    rng = np.random.default_rng(5)
    model = random_mlp(rng, 12, [10, 8], 4, 0.6)
    fused = random_learner(rng, model, 0.1, masked=False)
    layered = copy.deepcopy(fused)
    x, labels = random_batch(rng, fused, 16)
    with kernel_softmax_everywhere():
        loss_f, _ = run_steps(fused, [(x, labels)], True)
        monkeypatch.setattr(kernels, "PARALLEL_MIN_WORK", 64)
        layered.fused_step = True
        assert not layered.fused_step_applies(x, labels)
        assert kernels.pick(kernels.csr_forward, model.layers[0].nnz * 16) is kernels.csr_forward[1]
        loss_l, _ = run_steps(layered, [(x, labels)], False)
    assert loss_f == loss_l
    for a, b in zip(state(fused.model), state(layered.model)):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("sizes", [(1000, 10, 128), (65536, 10, 128), (100, 131072, 1), (65535, 65535, 128)])
def test_fused_step_is_serial_where_pick_chooses_the_serial_builds(sizes):
    nnz, trainable, batch = sizes
    works = [(kernels.csr_forward, nnz * batch), (kernels.csc_backward_input, nnz * batch),
             (kernels.sampled_weight_grad, trainable * batch),
             (kernels.sgd_step_with_importance, trainable * kernels.ELEMENT_WORK)]
    expected = all(kernels.pick(pair, work) is pair[0] for pair, work in works)
    assert kernels.fused_step_is_serial([nnz, 5], [trainable, 5], batch) == expected


CACHED_STEP_SCRIPT = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from test_fused_step import random_batch, random_learner, random_mlp
rng = np.random.default_rng(0)
learner = random_learner(rng, random_mlp(rng, 6, [5] * int(sys.argv[1]), 3, 0.5), 0.1, masked=False)
learner.fused_step = True
x, labels = random_batch(rng, learner, 4)
assert learner.fused_step_applies(x, labels)
print(learner.train_step(x, labels))
"""


def test_fused_steps_of_several_depths_load_from_a_shared_cache(tmp_path):
    """Regression: the kernel once called the parallel builds, and a second network depth compiled into the same
    Numba cache then crashed (segmentation fault) whenever it was loaded from that cache (numba issue 8578)."""
    tests_dir = str(Path(__file__).resolve().parent)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"),
               PYTHONPATH=os.pathsep.join([str(Path(tests_dir).parent), tests_dir, os.environ.get("PYTHONPATH", "")]))
    for depth in (2, 1, 1, 2):  # compiled, compiled into the same cache, then both loaded from it
        done = subprocess.run([sys.executable, "-c", CACHED_STEP_SCRIPT, str(depth), tests_dir], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"depth {depth}: exit code {done.returncode}\n{done.stderr[-2000:]}"
        assert np.isfinite(float(done.stdout.split()[-1]))


# ----- the kernel's pieces against NumPy -----
@settings(max_examples=60, deadline=None)
@given(n=st.one_of(st.integers(1, 3000), st.integers(3000, 300_000)), start=st.integers(0, 9),
       scale=st.integers(0, 3), seed=seeds)
def test_pairwise_sum_is_numpys_float32_sum(n, start, scale, seed):
    """Bit for bit, at any offset, with scratch for log2(n) partial sums only (a deep tree above 128 values)."""
    rng = np.random.default_rng(seed)
    a = (rng.normal(size=start + n) * 10.0 ** rng.integers(-scale - 1, scale + 1, start + n)).astype(np.float32)
    work = np.full(max(1, int(np.log2(n))), np.nan, np.float32)
    assert np.float32(0.0) + kernels.pairwise_sum(a, start, n, work) == a[start:].sum()
    rows = np.stack([a[::-1], a])
    assert np.float32(0.0) + kernels.pairwise_sum(rows[1], start, n, work) == rows[:, start:].sum(axis=1)[1]


@SETTINGS
@given(n_classes=st.integers(1, 12), batch=st.integers(1, 300), masked=st.booleans(), spread=st.floats(0.1, 30.0),
       seed=seeds)
def test_softmax_kernel_matches_numpy(n_classes, batch, masked, spread, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, spread, (n_classes, batch)).astype(np.float32)
    classes = None
    if masked:
        classes = rng.random(n_classes) < 0.5
        classes[0] = True
        logits[~classes] += 1000.0  # excluded classes must not count, not even in the max that shifts the logits
    allowed = np.flatnonzero(classes) if masked else np.arange(n_classes)
    labels = rng.choice(allowed, size=batch)
    loss, delta = kernel_softmax(logits, labels, classes)
    ref_loss, ref_delta = softmax_cross_entropy(logits, labels, classes)
    assert loss == pytest.approx(ref_loss, rel=2e-6, abs=1e-6)  # log(sum of exp >= 1): a few ulp of 1
    np.testing.assert_allclose(delta, ref_delta, rtol=2e-6, atol=2e-7 / batch)
    if masked:
        assert np.all(delta[~classes] == 0.0) and not np.any(np.signbit(delta[~classes]))


@SETTINGS
@given(n_out=st.integers(1, 20), batch=st.integers(1, 300), seed=seeds)
def test_bias_step_is_numpys(n_out, batch, seed):
    rng = np.random.default_rng(seed)
    delta = rng.normal(0.0, 0.1, (n_out, batch)).astype(np.float32)
    mask = (rng.random(n_out) < 0.5).astype(np.float32)
    bias = rng.normal(size=n_out).astype(np.float32)
    lr = float(rng.uniform(0.001, 1.0))
    frozen = np.flatnonzero(mask == 0)
    bias[frozen[::2]] = -0.0  # a frozen bias keeps its bits: -0.0 - lr * g * 0 would be +0.0 for g < 0
    delta[frozen[1::2], 0] = np.nan  # and does not take a non-finite gradient
    rows = np.sort(rng.choice(n_out, size=rng.integers(0, n_out + 1), replace=False)) if seed % 2 else np.arange(n_out)
    expected = bias.copy()
    changed = np.intersect1d(np.flatnonzero(mask), rows)  # Learner.sgd_update's bias step, on the rows given
    expected[changed] -= lr * delta.reshape(n_out, -1).sum(axis=1)[changed] * mask[changed]
    kernels.bias_step(delta, np.float32(lr), mask, bias, np.empty(batch, np.float32), rows)
    assert np.array_equal(bias.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("lr", [0.2, -0.2, np.inf])
def test_the_bias_step_skips_only_rows_whose_step_keeps_their_bits(lr):
    """The fused step leaves out the bias rows that no active connection of the next layer reads (their gradient
    is exactly 0) only for lr > 0 finite: there ``bias - lr * 0.0`` is ``bias``; at lr < 0 a -0.0 bias becomes
    +0.0 and at lr = inf every bias becomes NaN, as in the per-layer path, so every row is stepped."""
    rng = np.random.default_rng(7)
    model = random_mlp(rng, 8, [6, 5], 4, 0.5)
    slots = np.arange(model.layers[0].out_index.n_slots)
    unread = np.setdiff1d(slots, model.layers[1].indices)
    if unread.size == 0:  # make one: the first hidden neuron feeds nothing
        model.layers[1].remove_connections(np.flatnonzero(model.layers[1].indices == 0))
        unread = np.array([0])
    model.layers[0].bias[unread] = -0.0
    learner = random_learner(rng, model, lr, masked=False)
    learner.bias_trainable[0][:] = 1.0
    model.update_active_rows()
    skipped = np.setdiff1d(slots, model.bias_step_rows(lr)[0])
    assert (skipped.size > 0) == (lr > 0 and np.isfinite(lr))
    layered = copy.deepcopy(learner)
    batches = [random_batch(rng, learner, 5)]
    with kernel_softmax_everywhere(), np.errstate(invalid="ignore", over="ignore"):
        run_steps(learner, batches, True)
        run_steps(layered, batches, False)
    for a, b in zip(state(learner.model), state(layered.model)):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ----- when the fused path runs -----
def small_learner(name="spacenet", model=None, **overrides):
    values = dict(connections_per_task=(60, 40, 12), selected_neurons=(10, 8), reserved_neurons=(3, 3),
                  rewire_ratio=0.3, epochs=2, batch_size=16, lr=0.2)
    values.update(overrides)
    options = {"total_tasks": 3} if name in ("finetune", "joint", "ewc") else {}
    return METHODS[name](model or SparseMLP(16, [30, 25], 6), SpaceNetConfig(**values), seed=1, **options)


def one_task(learner):
    images, labels = make_blobs(6, 16, 20, seed=2, spread=40.0)
    learner.learn(*task_split(images, labels, [0, 1]), [0, 1])
    return learner.input_batch(images, np.arange(8)), labels[:8]


def train_everything(learner):
    """Every connection and bias of the learner's network trainable."""
    learner.trainable = [np.arange(layer.nnz) for layer in learner.model.layers]
    learner.bias_trainable = [np.ones(layer.bias.shape, np.float32) for layer in learner.model.layers]


def fused_calls(monkeypatch):
    """A list that gets one entry per batch trained by the fused kernels (``train_step`` or ``train_batches``)."""
    calls = []
    step, batches = SparseMLP.train_step, SparseMLP.train_batches

    def counted(self, *args):
        calls.append(1)
        return step(self, *args)

    def counted_batches(self, *args):
        losses = batches(self, *args)
        calls.extend([1] * losses.size)
        return losses

    monkeypatch.setattr(SparseMLP, "train_step", counted)
    monkeypatch.setattr(SparseMLP, "train_batches", counted_batches)
    return calls


@pytest.mark.parametrize("name", ["spacenet", "static", "rehearsal", "finetune", "joint"])
def test_plain_methods_train_fused(monkeypatch, name):
    calls = fused_calls(monkeypatch)
    learner = small_learner(name)
    x, labels = one_task(learner)
    assert len(calls) == 2 * -(-40 // 16), "every batch of the task ran fused"
    train_everything(learner)
    assert learner.fused_step_applies(x, labels)


def test_methods_and_inputs_that_are_not_plain_keep_the_per_layer_path(monkeypatch):
    calls = fused_calls(monkeypatch)
    for learner in (small_learner("ewc"), small_learner(importance="official_sum")):
        one_task(learner)
    assert not calls
    learner = small_learner()
    x, labels = one_task(learner)
    calls.clear()
    train_everything(learner)
    assert learner.fused_step_applies(x, labels)
    assert not learner.fused_step_applies(x.astype(np.float64), labels)
    assert not learner.fused_step_applies(np.asfortranarray(x), labels)
    assert not learner.fused_step_applies(x, labels.astype(np.float32))
    learner.config.lr = np.float64(0.2)  # NumPy would do the bias step in float64
    assert not learner.fused_step_applies(x, labels)
    learner.config.lr = 0.2
    learner.sgd_update = learner.sgd_update  # replaced on the instance (a wrapper, a spy)
    assert not learner.fused_step_applies(x, labels)
    del learner.sgd_update
    learner.bias_trainable[0] = learner.bias_trainable[0].astype(np.float64)
    assert not learner.fused_step_applies(x, labels)

    class Penalized(SpaceNet):
        def weight_grad(self, l, connections, delta, inputs):
            return super().weight_grad(l, connections, delta, inputs) * np.float32(0.5)

    penalized = Penalized(SparseMLP(16, [30, 25], 6), learner.config, seed=1)
    one_task(penalized)
    assert not calls
    cnn = small_learner(model=SparseCNN((1, 4, 4), (2, 2), (6,), 6), connections_per_task=(2, 3, 12, 6),
                        selected_neurons=(None, None, 4), reserved_neurons=(1, 1, 2), init_fan="connections")
    cnn.learn(*task_split(*make_blobs(6, 16, 10, seed=2), [0, 1]), [0, 1])
    assert not calls


# ----- a whole run both ways -----
def learn_tasks(fused, tasks, **overrides):
    learner = small_learner(**overrides)
    learner.fused_step = fused
    images, labels = np.concatenate([t[0] for t in tasks]), np.concatenate([t[1] for t in tasks])
    accuracy = []
    for task_images, task_labels, classes in tasks:
        learner.learn(task_images, task_labels, classes)
        accuracy.append(np.mean(learner.predict(images) == labels))
    return learner, accuracy


@pytest.mark.parametrize("overrides", [{}, {"softmax_scope": "seen", "bias_scope": "selected", "batch_size": 7}])
def test_spacenet_run_is_bit_identical_both_ways_with_the_same_softmax(overrides):
    tasks = pair_tasks(6, 16, 25, seed=4, spread=30.0)
    with kernel_softmax_everywhere():
        fused, accuracy_f = learn_tasks(True, tasks, **overrides)
        layered, accuracy_l = learn_tasks(False, tasks, **overrides)
    assert accuracy_f == accuracy_l
    for a, b in zip(state(fused.model), state(layered.model)):
        assert np.array_equal(a, b)


def test_spacenet_run_matches_the_per_layer_path():
    tasks = pair_tasks(6, 16, 25, seed=4, spread=30.0)
    fused, accuracy_f = learn_tasks(True, tasks)
    layered, accuracy_l = learn_tasks(False, tasks)
    assert accuracy_f == accuracy_l
    for a, b in zip(state(fused.model), state(layered.model)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# ----- memory -----
def test_a_fused_step_allocates_nothing():
    """After a first step has made the buffers, a step (input included) allocates no array: what tracemalloc sees
    is Python objects (the argument tuples, Numba's dispatch), under 4 KB and the same for any batch or width."""
    peaks = []
    for width, batch in ((30, 16), (3000, 256)):
        learner, images, labels = trained_learner_and_batch(width, batch)
        ids = np.arange(batch) % labels.size
        y = labels[ids]
        x = learner._reused_input(images, ids)
        assert learner.fused_step_applies(x, y)
        learner.train_step(x, y)
        tracemalloc.start()
        try:
            x = learner._reused_input(images, ids)
            learner.train_step(x, y)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert peaks[0] == peaks[1] and peaks[0] < 4096, peaks


# ----- an epoch's whole batches in one call (SparseMLP.train_batches) -----
def learn_batched(batched, tasks, **overrides):
    """Four tasks on a network whose later tasks read frozen rows; with ``batched`` the epochs' whole batches run
    in one ``train_batches`` call each, else one ``train_step`` call per batch."""
    values = dict(connections_per_task=(80, 40, 12), epochs=3)
    values.update(overrides)
    learner = small_learner(model=SparseMLP(16, [40, 30], 8), **values)
    learner.fused_batches = batched
    for images, labels, classes in tasks:
        learner.learn(images, labels, classes)
    return learner


@pytest.mark.parametrize("overrides", [{}, {"softmax_scope": "seen", "bias_scope": "selected", "batch_size": 7},
                                       {"batch_size": 25}])
def test_batches_in_one_call_give_the_bits_of_one_call_per_batch(monkeypatch, overrides):
    """Frozen rows recorded and copied, a last partial batch (50 samples per task: 16 x 3 + 2, 7 x 7 + 1) in its
    own call, or none (25 x 2): weights, Omega and biases agree bit for bit."""
    calls = []
    batches = SparseMLP.train_batches

    def observed(self, *args):
        frozen = args[9]
        calls.append((frozen is not None and not frozen.recording, args[1].size, args[4].shape[1]))
        return batches(self, *args)

    monkeypatch.setattr(SparseMLP, "train_batches", observed)
    tasks = pair_tasks(8, 16, 25, seed=4, spread=30.0)
    batched = learn_batched(True, tasks, **overrides)
    batch_size = batched.config.batch_size
    whole, rest = 50 // batch_size * batch_size, 50 % batch_size
    assert calls[:1 + bool(rest)] == [(False, whole, batch_size)] + [(False, rest, rest)] * bool(rest)
    assert len(calls) == 4 * 3 * (1 + bool(rest)), "every epoch's batches in one call, or two"
    assert any(copying for copying, _, _ in calls), "the test must exercise copied frozen rows"
    calls.clear()
    per_batch = learn_batched(False, tasks, **overrides)
    assert not calls
    for a, b in zip(state(batched.model), state(per_batch.model)):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_the_three_paths_give_the_same_bits_at_split_mnist_shapes():
    """The other tests' networks and batches are small; the kernels' vector loops, and the roundings the compiler
    picks for them in each context, also run at the real shapes (784 -> 400 -> 400 -> 10, batch 128), where a
    kernel compiled inside the epoch call once gave another last bit than the same kernel called alone (35 of
    10,000 first-layer weight gradients, in an unmerged change). The epoch call, one fused call per batch and the
    per-layer path (with the kernel's softmax) end two tasks with the same weights, Omega and biases."""
    images, labels = make_blobs(4, 784, 300, seed=6, spread=40.0)
    config = SpaceNetConfig(connections_per_task=(8000, 3000, 120), selected_neurons=(80, 80),
                            reserved_neurons=(40, 40), rewire_ratio=0.2, epochs=2, batch_size=128, lr=0.05)
    states = []
    for switches in ({}, {"fused_batches": False}, {"fused_step": False}):  # epoch call, per batch, per layer
        learner = SpaceNet(SparseMLP(784, [400, 400], 10), config, seed=3, input_mean=0.5, input_std=0.3)
        for name, value in switches.items():
            setattr(learner, name, value)
        with kernel_softmax_everywhere():
            for classes in ([0, 1], [2, 3]):
                learner.learn(*task_split(images, labels, classes), classes)
        states.append(state(learner.model))
    for other in states[1:]:
        for a, b in zip(states[0], other):
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_a_diverging_loss_stops_both_ways_at_the_same_batch():
    messages = []
    for batched in (True, False):
        learner = small_learner(lr=1e4)
        learner.fused_batches = batched
        with pytest.raises(strategy.TrainingDiverged) as caught:
            one_task(learner)
        messages.append(str(caught.value))
        assert learner.model.layers[0].nnz == 0, "the failed task left the network as it was"
    assert messages[0] == messages[1] and "epoch 0, batch" in messages[0]


def test_a_batch_callback_gets_one_fused_step_per_batch(monkeypatch):
    calls = fused_calls(monkeypatch)
    whole = []
    batches = SparseMLP.train_batches
    monkeypatch.setattr(SparseMLP, "train_batches", lambda self, *args: whole.append(1) or batches(self, *args))
    learner, reported = small_learner(), []
    images, labels = make_blobs(6, 16, 20, seed=2, spread=40.0)
    learner.learn(*task_split(images, labels, [0, 1]), [0, 1], on_batch=lambda *args: reported.append(args[:3]))
    assert reported == [(epoch, batch, 3) for epoch in range(2) for batch in range(3)]
    assert len(calls) == 6 and not whole


def trained_learner_and_batch(width=30, batch=16):
    learner = small_learner(model=SparseMLP(16, [width, width], 6), batch_size=batch)
    one_task(learner)
    train_everything(learner)
    images, labels = make_blobs(6, 16, 40, seed=2, spread=40.0)
    return learner, images, labels % 6


def train_batches(learner, images, labels, order):
    x = learner._input_buffer(images.shape[1], learner.config.batch_size)
    return learner.model.train_batches(images, order, input_lookup(0.0, 1.0), labels, x, learner.config.lr,
                                       learner.trainable, learner.bias_trainable)


def test_train_batches_refuses_ids_it_cannot_train_on_by_name():
    learner, images, labels = trained_learner_and_batch()
    before = state(learner.model)
    with pytest.raises(ValueError, match="whole batches of 16"):
        train_batches(learner, images, labels, np.arange(20))
    with pytest.raises(ValueError, match="one label per image"):
        train_batches(learner, images, labels[:-1], np.arange(16))
    order = np.arange(32)
    order[20] = images.shape[0]
    with pytest.raises(IndexError, match=f"sample ids must be in \\[0, {images.shape[0]}\\)"):
        train_batches(learner, images, labels, order)
    for a, b in zip(before, state(learner.model)):
        assert np.array_equal(a, b), "nothing was trained"
    assert train_batches(learner, images, labels, np.arange(32)).shape == (2,)


def test_batches_in_one_call_allocate_nothing_per_batch():
    """What tracemalloc sees is the call's few small arrays (losses, labels) and Python objects, under 8 KB for 2
    or 14 batches of a 3000-wide network (one activation array would be 3 MB)."""
    peaks = []
    for n_batches in (2, 14):
        learner, images, labels = trained_learner_and_batch(width=3000, batch=16)
        order = np.arange(n_batches * 16) % images.shape[0]
        train_batches(learner, images, labels, order)
        tracemalloc.start()
        try:
            train_batches(learner, images, labels, order)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert max(peaks) < 8192, peaks
