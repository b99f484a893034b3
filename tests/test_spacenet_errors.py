"""Bad inputs and hyperparameters raise ValueError naming them; a diverging loss raises TrainingDiverged."""
import re

import numpy as np
import pytest
from helpers import make_blobs, task_split, tiny_config

from spacenet_np.network import SparseMLP
from spacenet_np.spacenet import SpaceNet, SpaceNetConfig, TrainingDiverged


@pytest.fixture
def task0():
    images, labels = make_blobs(4, 16, 20, seed=0)
    return task_split(images, labels, [0, 1])


def spacenet(hidden=(40,), n_classes=4, **config):
    return SpaceNet(SparseMLP(16, list(hidden), n_classes), tiny_config(**config), seed=0)


def raises_naming(name):
    """pytest.raises(ValueError) whose message contains ``name`` as a whole word."""
    return pytest.raises(ValueError, match=rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])")


# ----- inputs of learn -----
@pytest.mark.parametrize("images", [
    pytest.param(np.zeros((40, 15), np.uint8), id="too-few-features"),
    pytest.param(np.zeros((40, 17), np.uint8), id="too-many-features"),
    pytest.param(np.zeros(40 * 16, np.uint8), id="flat"),
    pytest.param(np.zeros((40, 4, 4), np.uint8), id="3d"),
    pytest.param([[0] * 16] * 40, id="list"),
])
def test_images_of_wrong_shape(images):
    with raises_naming("images"):
        spacenet().learn(images, np.zeros(40, np.int64), [0, 1])


@pytest.mark.parametrize("dtype", [np.int32, np.int64, object, bool, np.complex64])
def test_images_of_wrong_dtype(task0, dtype):
    images, labels = task0
    with raises_naming("images"):
        spacenet().learn(images.astype(dtype), labels, [0, 1])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_images_with_nan_or_inf(task0, bad, dtype):
    images, labels = task0
    images = images.astype(dtype) / 255
    images[3, 5] = bad
    with raises_naming("images"):
        spacenet().learn(images, labels, [0, 1])


@pytest.mark.parametrize("labels", [
    pytest.param(lambda y: y[:-1], id="too-short"),
    pytest.param(lambda y: np.concatenate([y, y[:1]]), id="too-long"),
    pytest.param(lambda y: y[:, None], id="2d"),
    pytest.param(lambda y: y.astype(np.float64), id="float"),
])
def test_labels_of_wrong_shape_or_dtype(task0, labels):
    images, y = task0
    with raises_naming("labels"):
        spacenet().learn(images, labels(y), [0, 1])


def test_labels_outside_the_task_classes(task0):
    images, labels = task0
    labels = labels.copy()
    labels[0] = 2
    with raises_naming("labels"):
        spacenet().learn(images, labels, [0, 1])


@pytest.mark.parametrize("classes", [[0, 1, 4], [-1, 0, 1], [], [0, 1, 7]])
def test_classes_outside_the_output_layer(task0, classes):
    images, labels = task0
    with raises_naming("classes") as info:
        spacenet().learn(images, labels, classes)
    assert "labels" not in str(info.value), "the error must be about the classes, not the labels"


def test_predict_checks_images(task0):
    sn = spacenet()
    sn.learn(*task0, [0, 1])
    with raises_naming("images"):
        sn.predict(np.zeros((3, 15), np.uint8))
    with raises_naming("images"):
        sn.predict(np.full((3, 16), np.nan, np.float32))


# ----- hyperparameters -----
def test_selected_neurons_larger_than_the_width():
    with raises_naming("selected_neurons[0]"):
        spacenet(hidden=(10,), selected_neurons=(11,), reserved_neurons=(2,))
    with raises_naming("selected_neurons[1]"):
        spacenet(hidden=(40, 10), connections_per_task=(50, 50, 10), selected_neurons=(12, 11),
                 reserved_neurons=(2, 2))


def test_selected_neurons_zero():
    with raises_naming("selected_neurons[0]"):
        spacenet(selected_neurons=(0,), reserved_neurons=(0,))


def test_selected_neurons_more_than_the_free_neurons_of_a_later_task():
    images, labels = make_blobs(4, 16, 20, seed=0)
    sn = spacenet(hidden=(10,), connections_per_task=(40, 8), selected_neurons=(8,), reserved_neurons=(5,))
    sn.learn(*task_split(images, labels, [0, 1]), [0, 1])
    assert sn.model.neurons[1].n_free == 5
    with raises_naming("selected_neurons[0]"):
        sn.learn(*task_split(images, labels, [2, 3]), [2, 3])


@pytest.mark.parametrize("reserved", [(13,), (-1,)])
def test_reserved_neurons_outside_zero_to_selected(reserved):
    with raises_naming("reserved_neurons[0]"):
        spacenet(selected_neurons=(12,), reserved_neurons=reserved)


def test_connections_per_task_larger_than_the_selected_block(task0):
    # input block: 16 features x 12 selected = 192 positions
    with raises_naming("connections_per_task[0]"):
        spacenet(connections_per_task=(193, 10)).learn(*task0, [0, 1])
    # output block: 12 selected x 2 classes = 24 positions
    with raises_naming("connections_per_task[1]"):
        spacenet(connections_per_task=(100, 25)).learn(*task0, [0, 1])


@pytest.mark.parametrize("counts", [(100,), (100, 10, 10), ()])
def test_connections_per_task_with_the_wrong_number_of_values(counts):
    with raises_naming("connections_per_task"):
        spacenet(connections_per_task=counts)


@pytest.mark.parametrize("counts", [(0, 10), (100, -3), (1.5, 10), (100, "10")])
def test_connections_per_task_invalid_values(counts):
    with raises_naming("connections_per_task"):
        spacenet(connections_per_task=counts)


@pytest.mark.parametrize("name", ["selected_neurons", "reserved_neurons"])
def test_neuron_counts_with_the_wrong_number_of_values(name):
    with raises_naming(name):
        spacenet(**{name: (12, 12)})


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_rewire_ratio_outside_zero_one(ratio):
    with raises_naming("rewire_ratio"):
        spacenet(rewire_ratio=ratio)


@pytest.mark.parametrize("lr", [0.0, -0.01, float("nan"), float("inf")])
def test_lr_not_positive_finite(lr):
    with raises_naming("lr"):
        spacenet(lr=lr)


@pytest.mark.parametrize("epochs", [0, -1])
def test_epochs_below_one(epochs):
    with raises_naming("epochs"):
        spacenet(epochs=epochs)


@pytest.mark.parametrize("batch_size", [0, -5])
def test_batch_size_below_one(batch_size):
    with raises_naming("batch_size"):
        spacenet(batch_size=batch_size)


@pytest.mark.parametrize("std", [0.0, -1.0, float("nan")])
def test_input_std_not_positive(std):
    with raises_naming("input_std"):
        SpaceNet(SparseMLP(16, [40], 4), tiny_config(), input_std=std)


def test_valid_config_is_accepted(task0):
    """The baseline configuration of these tests is valid: the errors above come from the one bad value."""
    sn = spacenet()
    sn.learn(*task0, [0, 1])
    assert sn.tasks_learned == 1


def test_failed_allocation_leaves_the_network_unchanged(task0):
    """connections_per_task[1] does not fit: the error must not leave layer 0's new connections behind."""
    sn = spacenet(connections_per_task=(100, 25))
    with raises_naming("connections_per_task[1]"):
        sn.learn(*task0, [0, 1])
    assert sn.model.connection_counts() == [0, 0]
    # Once the budget fits, the task gets exactly its budget.
    sn.config.connections_per_task = (100, 20)
    sn.learn(*task0, [0, 1])
    assert sn.model.connection_counts() == [100, 20]


# ----- divergence -----
def diverging_setup():
    rng = np.random.default_rng(0)
    images = (rng.normal(size=(256, 16)) * 100).astype(np.float32)
    labels = rng.integers(0, 2, size=256)
    model = SparseMLP(16, [20], 4)
    config = SpaceNetConfig(connections_per_task=(100, 20), selected_neurons=(10,), reserved_neurons=(3,),
                            rewire_ratio=0.2, epochs=3, batch_size=16, lr=1e6)
    return SpaceNet(model, config, seed=0), images, labels


def test_diverging_loss_raises_training_diverged_naming_the_learning_rate():
    sn, images, labels = diverging_setup()
    with np.errstate(all="ignore"), pytest.raises(TrainingDiverged, match=r"lr=1000000\.0") as info:
        sn.learn(images, labels, [0, 1])
    assert "learning rate" in str(info.value)
    # The failed task is not counted.
    assert sn.tasks_learned == 0
    assert not sn.model.known_classes.any()


def test_after_training_diverged_a_lower_learning_rate_can_learn_the_task():
    """The error tells the user to lower the learning rate: doing so and learning the task again must work."""
    sn, images, labels = diverging_setup()
    with np.errstate(all="ignore"), pytest.raises(TrainingDiverged):
        sn.learn(images, labels, [0, 1])
    sn.config.lr = 1e-4
    sn.learn(images, labels, [0, 1])
    assert sn.tasks_learned == 1
    assert sn.model.connection_counts() == [100, 20]
    assert all(np.all(np.isfinite(layer.weights)) for layer in sn.model.layers)
