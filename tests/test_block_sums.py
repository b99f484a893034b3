"""A convolution's bias gradient from block sums taken while its delta maps are written (kernels.leaf_count,
tree_sums): NumPy's float32 sum, bit for bit, in the kernels and in the CNN's backward pass."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_conv import BUILDS, PATHS, backward_input_problem, build_cnn, flat_rows, set_path

from spacenet_np import kernels
from spacenet_np.network import softmax_cross_entropy


def bits(a):
    return np.asarray(a, np.float32).view(np.int32)


def numpy_sums(maps):
    return maps.reshape(maps.shape[0], -1).sum(axis=1)


def awkward_values(rng, shape):
    """float32 values over many magnitudes, with +0.0, -0.0 and whole rows of -0.0: sums that any other order
    of additions rounds differently."""
    values = (rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 6, size=shape)).astype(np.float32)
    values[rng.random(shape) < 0.3] = 0.0
    values[rng.random(shape) < 0.1] = -0.0
    values[0] = -0.0
    return values


@pytest.mark.parametrize("plane, row, expected", [
    (128, 128, 1), (1024 * 128, 32 * 128, 1024), (256 * 128, 16 * 128, 256), (2048, 256, 16), (2048, 64, 0),
    (384, 128, 0), (64, 64, 0), (100, 100, 0)])
def test_leaf_count_only_where_numpy_splits_a_map_into_those_blocks(plane, row, expected):
    assert kernels.leaf_count(plane, row) == expected


@pytest.mark.parametrize("build", BUILDS)
@settings(max_examples=25, deadline=None)
@given(n_maps=st.integers(1, 5), log_leaves=st.integers(0, 10), seed=st.integers(0, 2**32 - 1))
def test_block_sums_folded_by_tree_sums_are_numpys_sums(build, n_maps, log_leaves, seed):
    maps = awkward_values(np.random.default_rng(seed), (n_maps, 128 << log_leaves))
    leaves = np.full((n_maps, 1 << log_leaves), np.nan, np.float32)
    kernels.map_block_sums[build](maps, leaves)
    assert np.array_equal(bits(kernels.tree_sums(leaves)), bits(numpy_sums(maps)))


@pytest.mark.parametrize("build", BUILDS)
@settings(max_examples=15, deadline=None)
@given(maps=st.tuples(st.integers(1, 5), st.integers(1, 5)), height=st.sampled_from([1, 2, 4, 8]),
       shape=st.sampled_from([(2, 64), (4, 32), (8, 16), (16, 16), (4, 128)]), density=st.sampled_from([0.3, 1.0]),
       seed=st.integers(0, 2**32 - 1))
def test_conv_backward_input_writes_the_block_sums_of_its_output(build, maps, height, shape, density, seed):
    (n_out, n_in), (width, batch) = maps, shape
    ks, delta, activation = backward_input_problem(seed, n_out, n_in, height, width, batch, density)
    count = kernels.leaf_count(height * width * batch, width * batch)
    assert count > 0
    outputs = []
    for leaves in (kernels.NO_LEAVES, np.full((n_in, count), np.nan, np.float32)):
        out = np.full((n_in, height, width, batch), np.nan, np.float32)
        kernels.conv_backward_input[build](ks.col_ptr, ks.col_order, ks.rows, ks.weights, flat_rows(delta),
                                           flat_rows(activation), flat_rows(out), batch, leaves,
                                           kernels.NO_SKIP)
        outputs.append(out)
    assert np.array_equal(outputs[0], outputs[1])  # the sums change nothing in the gradient
    assert np.array_equal(bits(kernels.tree_sums(leaves)), bits(numpy_sums(out)))


@pytest.mark.parametrize("build", BUILDS)
@settings(max_examples=15, deadline=None)
@given(n_maps=st.integers(1, 4), height=st.sampled_from([1, 2, 4]),
       shape=st.sampled_from([(1, 64), (2, 32), (4, 16), (8, 64)]), seed=st.integers(0, 2**32 - 1))
def test_max_pool2_backward_writes_the_block_sums_of_its_output(build, n_maps, height, shape, seed):
    (width, batch), rng = shape, np.random.default_rng(seed)
    delta = awkward_values(rng, (n_maps, height, width, batch))
    argmax = rng.integers(0, 4, size=delta.shape).astype(np.uint8)
    count = kernels.leaf_count(4 * height * width * batch, 2 * width * batch)
    assert count > 0
    plain = np.full((n_maps, 2 * height, 2 * width, batch), np.nan, np.float32)
    kernels.max_pool2_backward[build](delta, argmax, plain, kernels.NO_LEAVES)
    routed, leaves = np.full_like(plain, np.nan), np.full((n_maps, count), np.nan, np.float32)
    kernels.max_pool2_backward[build](delta, argmax, routed, leaves)
    assert np.array_equal(routed, plain)
    assert np.array_equal(bits(kernels.tree_sums(leaves)), bits(numpy_sums(routed)))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("seed", [0, 1])
def test_cnn_bias_gradients_inside_the_backward_pass_are_numpys_sums(path, seed):
    """Batch 32 of 8 x 8 maps: every convolution's delta comes with block sums (the layer above's input gradient
    or max pooling's backward pass), on the sparse and the dense path."""
    model, x, labels = build_cnn(seed, batch=32)
    set_path(model, path)
    convolutions = [l for l, leaves in enumerate(model.buffers(32)[4]) if leaves is not None]
    assert convolutions == [0, 1, 2, 3]
    activations = model.forward(x)
    _, delta_out = softmax_cross_entropy(activations[-1], labels)
    seen = []

    def step(l, delta, inputs):
        from_blocks = model.bias_grad(l, delta)
        assert np.array_equal(bits(from_blocks), bits(numpy_sums(delta))), f"layer {l}"
        if l in convolutions:  # the sums came from the blocks: poisoning them changes the result
            leaves = model.buffers(32)[4][l]
            saved = leaves.copy()
            leaves[:] = np.nan
            assert np.all(np.isnan(model.bias_grad(l, delta)))
            leaves[:] = saved
        seen.append(l)

    model.backward(activations, delta_out, step)
    assert seen == list(range(len(model.layers) - 1, -1, -1))


def test_cnn_bias_grad_outside_the_backward_pass_sums_the_delta_it_is_given():
    model, x, labels = build_cnn(0, batch=32)
    activations = model.forward(x)
    _, delta_out = softmax_cross_entropy(activations[-1], labels)
    deltas = {}
    model.backward(activations, delta_out, lambda l, delta, inputs: deltas.setdefault(l, delta))
    delta = deltas[1]
    delta *= np.float32(3.0)  # changed after the pass: its block sums are stale, and not used
    assert np.array_equal(bits(model.bias_grad(1, delta)), bits(numpy_sums(delta)))
    copy = deltas[2].copy()  # another array than the one the pass wrote
    assert np.array_equal(bits(model.bias_grad(2, copy)), bits(numpy_sums(copy)))
