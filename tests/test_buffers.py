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


@pytest.mark.parametrize("shape, dtype", [((3, 5), np.float32), ((2, 4, 4, 7), np.uint8), ((1, 128), np.float32),
                                          ((1 << 18,), np.float64)])
def test_aligned_arrays_start_on_a_cache_line(shape, dtype):
    from spacenet_np.buffers import ALIGNMENT, aligned_empty, aligned_zeros
    for make in (aligned_empty, aligned_zeros):
        array = make(shape, dtype)
        assert array.shape == shape and array.dtype == dtype and array.flags.c_contiguous and array.flags.writeable
        assert array.ctypes.data % ALIGNMENT == 0
    assert not aligned_zeros(shape, dtype).any()


def test_large_aligned_arrays_land_at_different_page_offsets():
    """NumPy's large arrays all start at the same page offset; these are staggered (no 4K aliasing between a
    kernel's input and output arrays)."""
    from spacenet_np.buffers import aligned_empty
    offsets = [aligned_empty((64, 4096)).ctypes.data % 4096 for _ in range(4)]
    assert len(set(offsets)) == 4


def cnn_training_bits(monkeypatch, placement):
    """The weights, Omega and biases after one task of a small CNN learner, its arrays placed by ``placement``."""
    from spacenet_np import buffers, strategy
    monkeypatch.setattr(buffers, "aligned_empty", placement)
    monkeypatch.setattr(strategy, "aligned_empty", placement)
    learner, _ = cnn_learner_after_one_task()
    outputs = learner.model.buffers(learner.config.batch_size)[0]
    return ({a.ctypes.data % 64 for a in outputs if a is not None},
            [a for layer in learner.model.layers for a in (layer.weights, layer.importance, layer.bias)])


def test_training_gives_the_same_bits_wherever_the_arrays_are(monkeypatch):
    """Aligned arrays only change speed: on arrays 16 bytes past a cache line (NumPy's usual start) a CNN learner
    trains to the same bits."""
    from spacenet_np.buffers import aligned_empty, empty_at

    def off_by_16(shape, dtype=np.float32):
        return empty_at(shape, dtype, 16)

    starts, aligned = cnn_training_bits(monkeypatch, aligned_empty)
    shifted_starts, shifted = cnn_training_bits(monkeypatch, off_by_16)
    assert starts == {0} and shifted_starts == {16}
    assert len(aligned) == len(shifted) and all(np.array_equal(a, b) for a, b in zip(aligned, shifted))
