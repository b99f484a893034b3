"""The reusable arrays of a network stay bounded: arrays of an old structure or of batch sizes no longer in use are
dropped, and prediction never makes gradient arrays (one seed's peak memory, issue 12)."""
import gc
import weakref

import numpy as np

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
