"""Backpropagation of SparseMLP against central finite differences, and the softmax cross-entropy."""
import numpy as np
import pytest
import scipy.special
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from spacenet_np.network import SparseMLP, softmax_cross_entropy

MARGIN = 0.15  # no hidden pre-activation closer than this to the ReLU kink
EPS = 1e-2     # finite-difference step on float32 parameters


def build_network(seed, n_features=12, hidden=(7, 6), n_classes=4, connections=(20, 15, 12), slotted=None,
                  batch=5):
    """A small SparseMLP with random connections, its inputs, labels, and biases chosen away from ReLU kinks.

    ``slotted[h]`` neurons of hidden layer ``h`` get slots (in a random order, so slot != neuron id); the
    others have none. Biases are drawn per neuron until every pre-activation of the batch is at least MARGIN
    from 0.
    Returns (model, x (n_features, batch) float32, labels (batch,)).
    """
    rng = np.random.default_rng(seed)
    model = SparseMLP(n_features, list(hidden), n_classes)
    for h, width in enumerate(hidden):
        count = width if slotted is None else slotted[h]
        model.neurons[h + 1].slots_for(rng.permutation(width)[:count])
    for layer in model.layers:
        layer.resize_to_indices()
    for l, layer in enumerate(model.layers):
        n_out, n_in = layer.out_index.n_slots, layer.in_index.n_slots
        positions = rng.choice(n_out * n_in, size=min(connections[l], n_out * n_in), replace=False)
        weights = rng.uniform(-1.0, 1.0, size=positions.size) * 1.2
        layer.add_connections(positions // n_in, positions % n_in, weights, owner=0)
    x = rng.uniform(-1.0, 1.0, size=(n_features, batch)).astype(np.float32)
    labels = rng.integers(0, n_classes, size=batch)

    a = x.astype(np.float64)
    for l, layer in enumerate(model.layers):
        v = layer.W.toarray().astype(np.float64) @ a
        bias = layer.bias
        for i in range(v.shape[0]):
            for _ in range(1000):
                b = np.float32(rng.uniform(-0.7, 1.5))  # mostly active neurons, some dead
                if l == len(model.layers) - 1 or np.min(np.abs(v[i] + b)) >= MARGIN:
                    break
            else:
                raise AssertionError("could not place a bias away from the ReLU kink")
            bias[i] = b
        a = v + bias[:, None].astype(np.float64)
        if l < len(model.layers) - 1:
            a = np.maximum(a, 0.0)
    return model, x, labels


def loss_of(model, x, labels):
    return softmax_cross_entropy(model.logits(x).astype(np.float64), labels)[0]


def relu_pattern(model, x):
    return [(a > 0).copy() for a in model.forward(x)[1:-1]]


def central_difference(model, x, labels, array, k):
    """dL/d array[k] by central differences, restoring ``array[k]`` bit-for-bit."""
    original = array[k].copy()
    array[k] = original + np.float32(EPS)
    plus_value = float(array[k])
    loss_plus = loss_of(model, x, labels)
    pattern_plus = relu_pattern(model, x)
    array[k] = original - np.float32(EPS)
    minus_value = float(array[k])
    loss_minus = loss_of(model, x, labels)
    pattern_minus = relu_pattern(model, x)
    array[k] = original
    for p, q in zip(pattern_plus, pattern_minus):
        assert np.array_equal(p, q), "test setup: the step crossed a ReLU kink"
    return (loss_plus - loss_minus) / (plus_value - minus_value)


def assert_close_to_finite_differences(analytic, numeric):
    numeric = np.asarray(numeric)
    assert np.all(np.isfinite(analytic))
    assert np.all(np.abs(analytic - numeric) <= 2e-2 * np.abs(numeric) + 2e-4), (analytic, numeric)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_weight_and_bias_gradients_match_finite_differences(seed):
    model, x, labels = build_network(seed)
    weights_before = [layer.weights.copy() for layer in model.layers]
    biases_before = [n.bias.copy() for n in model.neurons]

    loss, weight_grads, bias_grads = model.gradients(x, labels)

    assert loss == pytest.approx(loss_of(model, x, labels), rel=1e-5)
    for before, layer in zip(weights_before, model.layers):
        assert np.array_equal(before, layer.weights), "gradients() must not change the weights"
    for before, neurons in zip(biases_before, model.neurons):
        assert np.array_equal(before, neurons.bias), "gradients() must not change the biases"
    n_checked = 0
    for l, layer in enumerate(model.layers):
        assert weight_grads[l].shape == (layer.nnz,)
        assert bias_grads[l].shape == (layer.out_index.n_slots,)
        numeric_w = [central_difference(model, x, labels, layer.weights, k) for k in range(layer.nnz)]
        assert_close_to_finite_differences(weight_grads[l], numeric_w)
        numeric_b = [central_difference(model, x, labels, layer.bias, i) for i in range(layer.bias.size)]
        assert_close_to_finite_differences(bias_grads[l], numeric_b)
        n_checked += np.count_nonzero(np.abs(numeric_w) > 1e-3)
    assume(n_checked > 0)  # a rare draw where every path to the output is dead checks nothing: draw again


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_gradients_with_compact_slots(seed):
    """Hidden layers much wider than their slots (slot order != neuron id): gradients still match."""
    model, x, labels = build_network(seed, n_features=10, hidden=(40, 30), n_classes=5,
                                     connections=(30, 25, 15), slotted=(8, 6), batch=4)
    assert [n.n_slots for n in model.neurons] == [10, 8, 6, 5]
    _, weight_grads, bias_grads = model.gradients(x, labels)
    for l, layer in enumerate(model.layers):
        numeric_w = [central_difference(model, x, labels, layer.weights, k) for k in range(layer.nnz)]
        assert_close_to_finite_differences(weight_grads[l], numeric_w)
        numeric_b = [central_difference(model, x, labels, layer.bias, i) for i in range(layer.bias.size)]
        assert_close_to_finite_differences(bias_grads[l], numeric_b)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_forward_matches_dense_network_over_neuron_ids(seed):
    """logits == the dense float64 MLP from ``to_scipy`` (neuron-id space, biases scattered by slot_ids)."""
    model, x, _ = build_network(seed, n_features=10, hidden=(40, 30), n_classes=5, connections=(30, 25, 15),
                                slotted=(8, 6), batch=6)
    logits = model.logits(x).copy()
    a = x.astype(np.float64)
    for l, layer in enumerate(model.layers):
        dense_w = layer.to_scipy().toarray().astype(np.float64)
        assert dense_w.shape == (model.sizes[l + 1], model.sizes[l])
        bias = np.zeros(model.sizes[l + 1])
        bias[model.neurons[l + 1].slot_ids] = model.neurons[l + 1].bias
        z = dense_w @ a + bias[:, None]
        a = np.maximum(z, 0.0) if l < len(model.layers) - 1 else z
    np.testing.assert_allclose(logits, a, rtol=1e-5, atol=1e-5)


def clone(model):
    """A fresh SparseMLP with the same slots, biases and connections (no cached buffers or derived state)."""
    copy = SparseMLP(model.sizes[0], model.sizes[1:-1], model.sizes[-1])
    for source, target in zip(model.neurons[1:-1], copy.neurons[1:-1]):
        target.slots_for(source.slot_ids)
    for source, target in zip(model.neurons, copy.neurons):
        target.bias[:] = source.bias
    for source, target in zip(model.layers, copy.layers):
        target.resize_to_indices()
        target.add_connections(source.rows, source.indices, source.weights.copy(), source.owner,
                               source.importance)
    return copy


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_results_do_not_depend_on_earlier_structures(seed):
    """Remove and add connections between passes (neurons become dead ends and come back): loss, logits and
    gradients equal those of a freshly built network with the final structure."""
    model, x, labels = build_network(seed, n_features=10, hidden=(40, 30), n_classes=5,
                                     connections=(30, 25, 15), slotted=(8, 6), batch=6)
    rng = np.random.default_rng(seed)
    for _ in range(4):
        model.gradients(x, labels)  # fill every buffer with this structure's values
        l = int(rng.integers(0, len(model.layers)))
        layer = model.layers[l]
        if layer.nnz and rng.random() < 0.6:
            layer.remove_connections(rng.choice(layer.nnz, size=max(1, layer.nnz // 3), replace=False))
        else:
            n_in = layer.in_index.n_slots
            taken = set((layer.rows.astype(np.int64) * n_in + layer.indices).tolist())
            empty = [p for p in range(layer.out_index.n_slots * n_in) if p not in taken]
            new = rng.choice(empty, size=min(4, len(empty)), replace=False)
            layer.add_connections(new // n_in, new % n_in, rng.uniform(-1, 1, size=new.size), owner=0)
        loss, weight_grads, bias_grads = model.gradients(x, labels)
        logits = model.logits(x).copy()
        fresh = clone(model)
        fresh_loss, fresh_weight_grads, fresh_bias_grads = fresh.gradients(x, labels)
        np.testing.assert_allclose(logits, fresh.logits(x), rtol=1e-6, atol=1e-6)
        assert loss == pytest.approx(fresh_loss, rel=1e-6, abs=1e-7)
        for a, b in zip(weight_grads, fresh_weight_grads):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        for a, b in zip(bias_grads, fresh_bias_grads):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ----- softmax cross-entropy -----
def reference_loss_and_delta(logits, labels):
    z = logits.astype(np.float64)
    batch = z.shape[1]
    log_p = z - scipy.special.logsumexp(z, axis=0, keepdims=True)
    loss = -np.mean(log_p[labels, np.arange(batch)])
    onehot = np.zeros_like(z)
    onehot[labels, np.arange(batch)] = 1.0
    return loss, (np.exp(log_p) - onehot) / batch


@settings(max_examples=40, deadline=None)
@given(n_classes=st.integers(2, 12), batch=st.integers(1, 30), scale=st.floats(0.01, 60.0),
       seed=st.integers(0, 2**32 - 1))
def test_softmax_cross_entropy_matches_float64_formula(n_classes, batch, scale, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(n_classes, batch)) * scale).astype(np.float32)
    labels = rng.integers(0, n_classes, size=batch)
    logits_before = logits.copy()

    loss, delta = softmax_cross_entropy(logits, labels)

    expected_loss, expected_delta = reference_loss_and_delta(logits, labels)
    assert isinstance(loss, float)
    assert loss == pytest.approx(expected_loss, rel=1e-5, abs=1e-5 * (1 + scale))
    assert delta.dtype == np.float32 and delta.shape == (n_classes, batch)
    np.testing.assert_allclose(delta, expected_delta, rtol=1e-4, atol=1e-6)
    # delta is (softmax - onehot) / batch: every column sums to 0, only the label's entry is negative.
    np.testing.assert_allclose(delta.sum(axis=0), 0.0, atol=1e-6)
    assert np.all(delta[labels, np.arange(batch)] <= 0)
    assert np.array_equal(logits, logits_before), "the logits must not be modified"


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4, 1e4],
                       [0.0, 1e4, 1e4, 1e4 - 2.0]], dtype=np.float32)
    labels = np.array([0, 0, 0, 1])
    loss, delta = softmax_cross_entropy(logits, labels)
    # per sample: ~0, 1e4, 2e4, 2 + log(1 + e^-2)
    expected = (0.0 + 1e4 + 2e4 + 2.0 + np.log1p(np.exp(-2.0))) / 4
    assert np.isfinite(loss)
    assert loss == pytest.approx(expected, rel=1e-6)
    assert np.all(np.isfinite(delta))
    expected_delta = np.array([[0.0, -1.0, -1.0, 1 / (1 + np.exp(-2.0))],
                               [0.0, 1.0, 1.0, -1 / (1 + np.exp(-2.0))]]) / 4
    np.testing.assert_allclose(delta, expected_delta, atol=1e-6)


def test_softmax_cross_entropy_uniform_logits():
    logits = np.zeros((5, 3), dtype=np.float32)
    loss, delta = softmax_cross_entropy(logits, np.array([4, 0, 2]))
    assert loss == pytest.approx(np.log(5.0), rel=1e-6)
    expected = np.full((5, 3), 0.2)
    expected[[4, 0, 2], [0, 1, 2]] -= 1.0
    np.testing.assert_allclose(delta, expected / 3, atol=1e-7)
