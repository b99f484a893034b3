"""The reusable arrays of a network stay bounded: arrays of an old structure or of batch sizes no longer in use are
dropped, and prediction never makes gradient arrays (one seed's peak memory, issue 12)."""
import gc
import weakref

import numpy as np
import pytest

from spacenet_np.network import SparseMLP


def mlp_with_slots():
    model = SparseMLP(20, [30, 30], 4)
    for neurons in model.neurons[1:-1]:
        neurons.slots_for(np.arange(10))
    for layer in model.layers:
        layer.resize_to_indices()
    return model


def alive(refs):
    gc.collect()
    return sum(ref() is not None for ref in refs)


def test_a_forward_pass_makes_no_gradient_arrays():
    model = mlp_with_slots()
    x = np.zeros((20, 8), np.float32)
    logits = model.forward(x)[-1]
    assert logits.shape == (4, 8)
    activations, deltas = model.buffers(8, deltas=False)
    assert deltas is None and activations[-1] is logits
    activations, deltas = model.buffers(8)
    assert [d.shape for d in deltas] == [(20, 8), (10, 8), (10, 8), (4, 8)]
    assert model.buffers(8)[0][-1] is logits  # the activations are kept when the gradients are added


def test_arrays_of_an_older_structure_are_dropped():
    model = mlp_with_slots()
    old = [weakref.ref(a) for pair in [model.buffers(8)] for arrays in pair for a in arrays]
    assert alive(old) == len(old)
    model.neurons[1].slots_for(np.arange(10, 15))  # the first hidden layer gains slots
    activations, deltas = model.buffers(8)
    assert activations[1].shape == deltas[1].shape == (15, 8)
    assert alive(old) == 0


def test_at_most_three_batch_sizes_keep_arrays():
    model = mlp_with_slots()
    refs = []
    for batch in range(1, 11):
        refs.append(weakref.ref(model.buffers(batch)[0][1]))
    assert 1 <= alive(refs) <= 3
    assert refs[-1]() is not None  # the batch size just asked for


def cnn_learner_after_one_task():
    from helpers import make_blobs, task_split

    from spacenet_np.network import SparseCNN
    from spacenet_np.spacenet import SpaceNet, SpaceNetConfig
    model = SparseCNN((2, 8, 8), (6, 6, 6, 6), (12,), 4)
    config = SpaceNetConfig(connections_per_task=(0.2,) * 6, selected_neurons=(None,) * 5,
                            reserved_neurons=(1, 1, 1, 1, 2), rewire_ratio=0.3, epochs=1, batch_size=8, lr=0.05,
                            init_fan="connections")
    learner = SpaceNet(model, config, seed=3, input_mean=0.45, input_std=0.25)
    images, labels = make_blobs(4, 128, 40, seed=2, spread=30.0)
    learner.learn(*task_split(images, labels, [0, 1]), [0, 1])
    return learner, images


def test_a_cnn_predicts_with_its_training_batch_arrays():
    """No second set of CNN arrays for prediction (hundreds of MB for the paper's CNN at batch 1000): a learner
    predicts in batches of its training batch, with the same predictions as any other batch size."""
    import tracemalloc
    learner, images = cnn_learner_after_one_task()
    assert learner.model.prediction_batch(learner.config.batch_size) == 8
    learner.predict(images[:8])  # the arrays for 8 samples exist from training; this one is the reference
    tracemalloc.start()
    try:
        default = learner.predict(images)
        peak_default = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        large = learner.predict(images, batch_size=160)
        peak_large = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(default, large)
    assert np.array_equal(default, learner.predict(images, batch_size=7))
    assert peak_default < peak_large / 4


def test_an_mlp_predicts_in_batches_of_at_least_512():
    assert SparseMLP(4, [3], 2).prediction_batch(128) == 512
    assert SparseMLP(4, [3], 2).prediction_batch(4096) == 4096


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True, "8"])
def test_a_bad_prediction_batch_is_refused_by_name(batch_size):
    learner, images = cnn_learner_after_one_task()
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        learner.predict(images, batch_size=batch_size)
