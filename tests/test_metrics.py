"""Metrics on hand-computed accuracy matrices, and the model size."""
import numpy as np
import pytest

from spacenet_np import metrics
from spacenet_np.network import SparseMLP

R = [[90.0],
     [80.0, 70.0],
     [60.0, 75.0, 50.0]]


def test_final_average_accuracy():
    assert metrics.final_average_accuracy(R) == pytest.approx((60 + 75 + 50) / 3)


def test_backward_transfer():
    # (R[2][0] - R[0][0] + R[2][1] - R[1][1]) / 2 = (-30 + 5) / 2
    assert metrics.backward_transfer(R) == pytest.approx(-12.5)


def test_average_forgetting_uses_the_best_earlier_accuracy():
    # task 0: best of 90, 80 minus 60 = 30; task 1: best of 70 minus 75 = -5
    assert metrics.average_forgetting(R) == pytest.approx(12.5)
    assert metrics.average_forgetting([[90.0], [95.0, 70.0], [91.0, 80.0, 50.0]]) == pytest.approx((4 - 10) / 2)


def test_single_task_has_no_transfer_or_forgetting():
    assert metrics.backward_transfer([[88.0]]) == 0.0
    assert metrics.average_forgetting([[88.0]]) == 0.0


def test_run_metrics_collects_everything():
    m = metrics.run_metrics(R)
    assert m["final_per_task_accuracy"] == [60.0, 75.0, 50.0]
    assert m["final_per_task_std"] == pytest.approx(np.std([60.0, 75.0, 50.0]))
    assert m["backward_transfer"] == pytest.approx(-12.5)


def test_accuracy_checks_shapes():
    assert metrics.accuracy(np.array([1, 2, 3]), np.array([1, 0, 3])) == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="shape"):
        metrics.accuracy(np.array([1, 2]), np.array([1, 2, 3]))


def test_model_size_counts_live_weights_indices_and_biases():
    model = SparseMLP(6, [5], 3)
    hidden = model.neurons[1]
    hidden.slots_for([4, 1])
    for layer in model.layers:
        layer.resize_to_indices()
    model.layers[0].add_connections([0, 0, 1], [2, 3, 5], [0.1, 0.2, 0.3], 0)
    model.layers[1].add_connections([2], [1], [0.5], 0)
    size = metrics.model_size(model)
    assert size["parameters"] == 3 + 1 + 2 + 3  # connections + biases of 2 hidden slots and 3 outputs
    index_bytes = sum(l.indices.nbytes + l.indptr.nbytes for l in model.layers)
    assert size["bytes"] == 4 * 4 + index_bytes + 4 * (2 + 3)
