"""Three tasks of two classes on easy synthetic blobs: SpaceNet and Static-SparseNN learn and remember them.

Observed (seeds 0-11, this data and config): SpaceNet >= 0.97 average accuracy over the learned classes
after every task and 1.00 on the last task; Static-SparseNN >= 0.69 average and >= 0.80 on the last task.
Chance over six classes is 1/6; the thresholds below keep a wide margin.
"""
import numpy as np
import pytest
from helpers import make_blobs, task_split

from spacenet_np.network import SparseMLP
from spacenet_np.spacenet import SpaceNet, SpaceNetConfig, StaticSparseNN

TASKS = [[0, 1], [2, 3], [4, 5]]
THRESHOLDS = {SpaceNet: (0.85, 0.85), StaticSparseNN: (0.55, 0.65)}  # (average, last task)


def config():
    return SpaceNetConfig(connections_per_task=(250, 150, 30), selected_neurons=(20, 20),
                          reserved_neurons=(8, 8), rewire_ratio=0.2, epochs=10, batch_size=32, lr=0.1)


@pytest.fixture(scope="module")
def blobs32():
    x_train, y_train = make_blobs(6, 32, 100, seed=1, spread=30.0, centre_seed=5)
    x_test, y_test = make_blobs(6, 32, 60, seed=2, spread=30.0, centre_seed=5)
    return x_train, y_train, x_test, y_test


@pytest.fixture(scope="module", params=[SpaceNet, StaticSparseNN], ids=["SpaceNet", "StaticSparseNN"])
def learned(request, blobs32):
    """Learn the three tasks; record predictions on the test set after every task, and the training losses."""
    x_train, y_train, x_test, y_test = blobs32
    cls = request.param
    sn = cls(SparseMLP(32, [60, 60], 6), config(), seed=0, input_mean=0.5, input_std=0.25)
    stages, losses, epochs_seen = [], [], []
    for classes in TASKS:
        task_losses = []
        sn.learn(*task_split(x_train, y_train, classes), classes,
                 on_batch=lambda epoch, batch, n_batches, loss: task_losses.append((epoch, loss)),
                 on_epoch=epochs_seen.append)
        losses.append(task_losses)
        stages.append(sn.predict(x_test))  # directly after the task, no extra step
    return cls, sn, stages, losses, epochs_seen


def accuracy(predictions, labels, classes):
    mask = np.isin(labels, classes)
    return float(np.mean(predictions[mask] == labels[mask]))


def test_accuracy_after_each_task_is_well_above_chance(learned, blobs32):
    cls, _, stages, _, _ = learned
    _, _, _, y_test = blobs32
    average_min, last_min = THRESHOLDS[cls]
    for t, predictions in enumerate(stages):
        seen = sum(TASKS[:t + 1], [])
        average = accuracy(predictions, y_test, seen)
        last = accuracy(predictions, y_test, TASKS[t])
        assert average >= average_min, f"after task {t}: average accuracy {average:.3f}"
        assert last >= last_min, f"after task {t}: accuracy on the last task {last:.3f}"
    final_average = np.mean([accuracy(stages[-1], y_test, c) for c in TASKS])
    assert final_average >= average_min


def test_predict_returns_only_learned_classes(learned, blobs32):
    _, _, stages, _, _ = learned
    _, _, x_test, _ = blobs32
    for t, predictions in enumerate(stages):
        seen = sum(TASKS[:t + 1], [])
        assert predictions.shape == (x_test.shape[0],) and predictions.dtype == np.int64
        assert set(np.unique(predictions).tolist()) <= set(seen)
    # every learned class is predicted for some sample at the end
    assert set(np.unique(stages[-1]).tolist()) == set(range(6))


def test_predict_accepts_standardized_floats_like_uint8(learned, blobs32):
    _, sn, stages, _, _ = learned
    _, _, x_test, _ = blobs32
    floats = ((x_test / 255.0 - 0.5) / 0.25).astype(np.float32)
    assert np.mean(sn.predict(floats) == stages[-1]) >= 0.99
    assert np.array_equal(sn.predict(x_test, batch_size=7), stages[-1])


def test_training_loss_decreases_within_each_task(learned):
    _, sn, _, losses, epochs_seen = learned
    epochs = sn.config.epochs
    assert epochs_seen == list(range(epochs)) * len(TASKS)
    for task_losses in losses:
        assert all(np.isfinite(loss) for _, loss in task_losses)
        first = np.mean([loss for epoch, loss in task_losses if epoch == 0])
        last = np.mean([loss for epoch, loss in task_losses if epoch == epochs - 1])
        assert last < 0.5 * first, (first, last)


def test_every_task_is_recorded_in_the_network(learned):
    _, sn, _, _, _ = learned
    assert sn.tasks_learned == 3
    assert sn.model.known_classes.all()
    for layer, count in zip(sn.model.layers, sn.config.connections_per_task):
        for t in range(3):
            assert layer.connections_of(t).size == count  # allocation and every rewiring keep the budget
