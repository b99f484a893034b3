"""The Numba kernels, serial and parallel builds, against dense NumPy references on random sparse matrices."""
from types import SimpleNamespace

import numba
import numpy as np
import pytest
import scipy.sparse
from hypothesis import example, given, settings
from hypothesis import strategies as st

from spacenet_np import kernels
from spacenet_np.layers import NeuronIndex, SparseLinear
from spacenet_np.network import standardize_batch

BUILDS = [pytest.param(0, id="serial"), pytest.param(1, id="parallel")]
SETTINGS = settings(max_examples=25, deadline=None)

# float32 with fastmath (reassociation, FMA): relative errors of a few ulp per accumulated term.
RTOL = 1e-5
ATOL = 1e-5

shapes = st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(1, 17))  # n_out, n_in, batch
densities = st.sampled_from([0.0, 0.05, 0.2, 0.5, 1.0])
seeds = st.integers(0, 2**32 - 1)


def random_csr(rng, n_out, n_in, density, empty_rows=0):
    """A random float32 canonical CSR matrix (as the engine keeps it) with ``empty_rows`` empty rows."""
    W = scipy.sparse.random(n_out, n_in, density=density, format="csr", dtype=np.float32, random_state=rng,
                            data_rvs=lambda k: rng.uniform(-1.0, 1.0, size=k))
    W = W.tolil()
    for i in rng.choice(n_out, size=min(empty_rows, n_out), replace=False):
        W.rows[i] = []
        W.data[i] = []
    W = scipy.sparse.csr_array(W.tocsr())
    W.sum_duplicates()
    W.sort_indices()
    return W


def csc_view(W):
    """Hand-built CSC view of a CSR matrix: (rows, col_ptr, col_order), independent of SparseLinear."""
    n_out, n_in = W.shape
    rows = np.repeat(np.arange(n_out), np.diff(W.indptr)).astype(np.int32)
    col_order = np.concatenate([np.flatnonzero(W.indices == j) for j in range(n_in)]
                               + [np.zeros(0, np.int64)])
    col_ptr = np.zeros(n_in + 1, dtype=np.int64)
    col_ptr[1:] = np.cumsum([np.count_nonzero(W.indices == j) for j in range(n_in)])
    return rows, col_ptr, col_order.astype(np.int64)


def dense_linear_layer(W):
    """A SparseLinear between two dense NeuronIndex objects holding exactly the connections of ``W``."""
    n_out, n_in = W.shape
    layer = SparseLinear(NeuronIndex(n_in, dense=True), NeuronIndex(n_out, dense=True))
    coo = W.tocoo()
    layer.add_connections(coo.row, coo.col, coo.data, owner=0)
    return layer


# ----- csr_forward -----
@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("relu", [False, True])
@SETTINGS
@given(shape=shapes, density=densities, empty_rows=st.integers(0, 5),
       active_fraction=st.sampled_from([1.0, 0.5, 0.0]), seed=seeds)
def test_csr_forward_matches_dense(build, relu, shape, density, empty_rows, active_fraction, seed):
    n_out, n_in, batch = shape
    rng = np.random.default_rng(seed)
    W = random_csr(rng, n_out, n_in, density, empty_rows)
    bias = rng.normal(size=n_out).astype(np.float32)
    x = rng.normal(size=(n_in, batch)).astype(np.float32)
    active_rows = np.sort(rng.permutation(n_out)[:int(round(active_fraction * n_out))]).astype(np.int64)
    out = np.full((n_out, batch), np.nan, dtype=np.float32)

    kernels.csr_forward[build](active_rows, W.indptr, W.indices, W.data, bias, x, out, relu)

    expected = W.toarray().astype(np.float64) @ x.astype(np.float64) + bias[:, None]
    if relu:
        expected = np.maximum(expected, 0.0)
    scale = 1.0 + np.abs(W.toarray()).astype(np.float64) @ np.abs(x) + np.abs(bias)[:, None]
    computed = out[active_rows]
    assert np.all(np.abs(computed - expected[active_rows]) <= RTOL * scale[active_rows] + ATOL)
    if relu:
        assert np.all(computed >= 0.0)
    # Rows outside active_rows are not touched.
    assert np.all(np.isnan(np.delete(out, active_rows, axis=0)))
    # An empty row outputs its bias exactly (through the ReLU if any).
    empty = np.intersect1d(np.flatnonzero(np.diff(W.indptr) == 0), active_rows)
    expected_empty = np.maximum(bias[empty], 0) if relu else bias[empty]
    assert np.array_equal(out[empty], np.broadcast_to(expected_empty[:, None], (empty.size, batch)))


@pytest.mark.parametrize("build", BUILDS)
def test_csr_forward_all_rows_empty_gives_bias(build):
    n_out, n_in, batch = 5, 3, 4
    indptr = np.zeros(n_out + 1, dtype=np.int32)
    all_rows = np.arange(n_out, dtype=np.int64)
    bias = np.array([1.5, -2.0, 0.0, 3.0, -0.5], dtype=np.float32)
    out = np.full((n_out, batch), np.nan, dtype=np.float32)
    x = np.ones((n_in, batch), dtype=np.float32)
    no_indices, no_weights = np.zeros(0, np.int32), np.zeros(0, np.float32)
    kernels.csr_forward[build](all_rows, indptr, no_indices, no_weights, bias, x, out, False)
    assert np.array_equal(out, np.repeat(bias[:, None], batch, axis=1))
    kernels.csr_forward[build](all_rows, indptr, no_indices, no_weights, bias, x, out, True)
    assert np.array_equal(out, np.repeat(np.maximum(bias, 0)[:, None], batch, axis=1))


# ----- csc_backward_input -----
def backward_reference(W, delta, activation):
    return (W.toarray().T.astype(np.float64) @ delta.astype(np.float64)) * (activation > 0)


def relu_like_activation(rng, n_in, batch):
    """Activations with exact zeros (inactive ReLU), positives, and a few negatives (must be masked too)."""
    a = rng.normal(size=(n_in, batch)).astype(np.float32)
    a[rng.random(a.shape) < 0.3] = 0.0
    return a


@pytest.mark.parametrize("build", BUILDS)
@SETTINGS
@given(shape=shapes, density=densities, empty_rows=st.integers(0, 5), seed=seeds)
def test_csc_backward_input_hand_built_view(build, shape, density, empty_rows, seed):
    n_out, n_in, batch = shape
    rng = np.random.default_rng(seed)
    W = random_csr(rng, n_out, n_in, density, empty_rows)
    rows, col_ptr, col_order = csc_view(W)
    delta = rng.normal(size=(n_out, batch)).astype(np.float32)
    activation = relu_like_activation(rng, n_in, batch)
    out = np.full((n_in, batch), np.nan, dtype=np.float32)

    kernels.csc_backward_input[build](col_ptr, col_order, rows, W.data, delta, activation, out)

    assert_backward_close(out, W, delta, activation)
    assert np.all(out[activation <= 0] == 0.0)


def assert_backward_close(out, W, delta, activation):
    """``out`` equals ``(W.T @ delta) * (activation > 0)`` within float32 tolerance scaled by the magnitudes."""
    expected = backward_reference(W, delta, activation)
    scale = 1.0 + np.abs(W.toarray().T).astype(np.float64) @ np.abs(delta)
    assert np.all(np.abs(out - expected) <= RTOL * scale + ATOL)


@pytest.mark.parametrize("build", BUILDS)
@SETTINGS
@given(shape=shapes, density=densities, seed=seeds)
def test_csc_backward_input_with_sparse_linear_view(build, shape, density, seed):
    """The CSC view that SparseLinear builds (col_ptr, col_order, rows) drives the kernel correctly."""
    n_out, n_in, batch = shape
    rng = np.random.default_rng(seed)
    W = random_csr(rng, n_out, n_in, density)
    layer = dense_linear_layer(W)
    assert np.array_equal(layer.W.toarray(), W.toarray())
    delta = rng.normal(size=(n_out, batch)).astype(np.float32)
    activation = relu_like_activation(rng, n_in, batch)
    out = np.full((n_in, batch), np.nan, dtype=np.float32)

    kernels.csc_backward_input[build](layer.col_ptr, layer.col_order, layer.rows, layer.weights, delta,
                                      activation, out)

    assert_backward_close(out, W, delta, activation)


@pytest.mark.parametrize("build", BUILDS)
@SETTINGS
@given(shape=shapes, density=densities, seed=seeds)
def test_csc_backward_input_with_active_rows_view(build, shape, density, seed):
    """After ``set_active_rows(mask)`` the CSC view holds only the active rows' connections."""
    n_out, n_in, batch = shape
    rng = np.random.default_rng(seed)
    W = random_csr(rng, n_out, n_in, density)
    layer = dense_linear_layer(W)
    active = rng.random(n_out) < 0.5
    layer.set_active_rows(active)
    assert np.array_equal(layer.active_rows, np.flatnonzero(active))
    delta = rng.normal(size=(n_out, batch)).astype(np.float32)
    activation = relu_like_activation(rng, n_in, batch)
    out = np.full((n_in, batch), np.nan, dtype=np.float32)

    kernels.csc_backward_input[build](layer.col_ptr, layer.col_order, layer.rows, layer.weights, delta,
                                      activation, out)

    W_active = W.toarray() * active[:, None]
    expected = (W_active.T.astype(np.float64) @ delta.astype(np.float64)) * (activation > 0)
    scale = 1.0 + np.abs(W_active.T).astype(np.float64) @ np.abs(delta)
    assert np.all(np.abs(out - expected) <= RTOL * scale + ATOL)


@pytest.mark.parametrize("build", BUILDS)
@SETTINGS
@given(shape=shapes, density=densities, seed=seeds)
def test_sparse_linear_backward_input_gives_the_kernels_bits_and_follows_weight_changes(build, shape, density,
                                                                                       seed):
    """``SparseLinear.backward_input`` gathers the weights into CSC order first: the same bits as the kernel on
    the layer's own CSC view, also after the weights change in place (the gathered copy is not stale)."""
    n_out, n_in, batch = shape
    rng = np.random.default_rng(seed)
    layer = dense_linear_layer(random_csr(rng, n_out, n_in, density))
    layer.set_active_rows(rng.random(n_out) < 0.7)
    delta = rng.normal(size=(n_out, batch)).astype(np.float32)
    activation = relu_like_activation(rng, n_in, batch)
    kernels.PARALLEL_MIN_WORK, previous = (0 if build else 1 << 62), kernels.PARALLEL_MIN_WORK
    try:
        for _ in range(2):
            expected = np.full((n_in, batch), np.nan, dtype=np.float32)
            kernels.csc_backward_input[build](layer.col_ptr, layer.col_order, layer.rows, layer.weights, delta,
                                              activation, expected)
            out = np.full((n_in, batch), np.nan, dtype=np.float32)
            layer.backward_input(delta, activation, out)
            assert np.array_equal(out.view(np.uint32), expected.view(np.uint32))
            layer.weights[:] = rng.normal(size=layer.nnz).astype(np.float32)
    finally:
        kernels.PARALLEL_MIN_WORK = previous


@pytest.mark.parametrize("build", BUILDS)
@SETTINGS
@given(n=st.integers(0, 50), m=st.integers(0, 80), seed=seeds)
def test_gather_matches_numpy_take(build, n, m, seed):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=n).astype(np.float32)
    order = rng.integers(0, n, size=m if n else 0)
    out = np.full(order.size, np.nan, np.float32)
    kernels.gather[build](values, order, out)
    assert np.array_equal(out, values[order])


# ----- sampled_weight_grad -----
@pytest.mark.parametrize("build", BUILDS)
@SETTINGS
@given(shape=shapes, density=densities, fraction=st.floats(0.0, 1.0), seed=seeds)
def test_sampled_weight_grad_at_live_positions(build, shape, density, fraction, seed):
    n_out, n_in, batch = shape
    rng = np.random.default_rng(seed)
    W = random_csr(rng, n_out, n_in, density)
    rows = np.repeat(np.arange(n_out), np.diff(W.indptr)).astype(np.int32)
    connections = rng.permutation(W.nnz)[:int(round(fraction * W.nnz))].astype(np.int64)  # a shuffled subset
    delta = rng.normal(size=(n_out, batch)).astype(np.float32)
    x = rng.normal(size=(n_in, batch)).astype(np.float32)
    grad = np.full(connections.size, np.nan, dtype=np.float32)

    kernels.sampled_weight_grad[build](connections, rows, W.indices, delta, x, grad)

    full = delta.astype(np.float64) @ x.astype(np.float64).T  # within float32 rounding of the dense product
    expected = full[rows[connections], W.indices[connections]]
    scale = (np.abs(delta) @ np.abs(x).T)[rows[connections], W.indices[connections]]
    assert np.all(np.abs(grad - expected) <= RTOL * scale + ATOL)


def sampled_grad_reference(connections, rows, indices, delta, x):
    """``delta[rows[k]] . x[indices[k]]`` in float64, one connection at a time."""
    return np.array([np.dot(delta[rows[k]].astype(np.float64), x[indices[k]].astype(np.float64))
                     for k in connections])


# Row patterns of hand-picked connection lists (one letter per connection, blocks of four): rows repeated out of
# order, which the four-at-a-time same-row path must not take for one row.
ROW_PATTERNS = ["AABA", "ABAA", "BAAA", "AAAB", "ABCA", "ABAB", "ABBA", "AAAA BBBB", "AAAA ABAA AA", "CABA AAAC B",
                "AAAA AAAA AAAA", "BBAA AABB", "A"]


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("pattern", ROW_PATTERNS)
def test_sampled_weight_grad_on_unsorted_connections_with_repeated_rows(build, pattern):
    """Connections of rows A, B, C in the given order, each at a different column (shuffled within a row)."""
    rng = np.random.default_rng(len(pattern) * 31 + ord(pattern[0]))
    pattern = pattern.replace(" ", "")
    n_in, batch = 16, 5
    row_of = {"A": 2, "B": 0, "C": 1}
    rows_list, cols_list = [], []
    for letter in pattern:  # a new column for every connection of the row, in random order
        taken = [c for r, c in zip(rows_list, cols_list) if r == row_of[letter]]
        cols_list.append(int(rng.choice(np.setdiff1d(np.arange(n_in), taken))))
        rows_list.append(row_of[letter])
    W = scipy.sparse.csr_array((np.ones(len(pattern), np.float32), (rows_list, cols_list)), shape=(3, n_in))
    W.sort_indices()
    rows = np.repeat(np.arange(3), np.diff(W.indptr)).astype(np.int32)
    position = {(int(r), int(c)): k for k, (r, c) in enumerate(zip(rows, W.indices))}
    connections = np.array([position[rc] for rc in zip(rows_list, cols_list)], dtype=np.int64)
    assert [row_of[letter] for letter in pattern] == rows[connections].tolist()
    delta = rng.normal(size=(3, batch)).astype(np.float32)
    x = rng.normal(size=(n_in, batch)).astype(np.float32)
    grad = np.full(connections.size, np.nan, dtype=np.float32)

    kernels.sampled_weight_grad[build](connections, rows, W.indices, delta, x, grad)

    expected = sampled_grad_reference(connections, rows, W.indices, delta, x)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


# ----- sgd_step_with_importance -----
@pytest.mark.parametrize("build", BUILDS)
@SETTINGS
@given(nnz=st.integers(0, 300), fraction=st.floats(0.0, 1.0), lr=st.floats(1e-4, 1.0), seed=seeds)
def test_sgd_step_with_importance_only_listed_connections(build, nnz, fraction, lr, seed):
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=nnz).astype(np.float32)
    importance = rng.uniform(0.0, 2.0, size=nnz).astype(np.float32)
    connections = np.sort(rng.permutation(nnz)[:int(round(fraction * nnz))]).astype(np.int64)
    grad = rng.normal(size=connections.size).astype(np.float32)
    lr32 = np.float32(lr)
    w0, i0 = weights.copy(), importance.copy()

    kernels.sgd_step_with_importance[build](connections, grad, lr32, weights, importance)

    g = grad.astype(np.float64)
    np.testing.assert_allclose(weights[connections], w0[connections] - float(lr32) * g, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(importance[connections], i0[connections] + float(lr32) * g ** 2, rtol=1e-6,
                               atol=1e-7)
    assert np.all(importance[connections] >= i0[connections])
    others = np.setdiff1d(np.arange(nnz), connections)
    assert np.array_equal(weights[others].view(np.uint32), w0[others].view(np.uint32))
    assert np.array_equal(importance[others].view(np.uint32), i0[others].view(np.uint32))


# ----- transpose_lookup (batch standardization) -----
@pytest.mark.parametrize("build", BUILDS)
@SETTINGS
@given(n=st.integers(1, 50), n_features=st.integers(1, 70), batch=st.integers(1, 40),
       mean=st.floats(-1.0, 1.0), std=st.floats(0.05, 5.0), seed=seeds)
def test_transpose_lookup_standardizes(build, n, n_features, batch, mean, std, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, n_features), dtype=np.uint8)
    images[0, 0], images[-1, -1] = 0, 255
    sample_ids = rng.integers(0, n, size=batch).astype(np.int64)  # repeats allowed
    lut = ((np.arange(256) / 255.0 - mean) / std).astype(np.float32)
    out = np.full((n_features, batch), np.nan, dtype=np.float32)

    assert kernels.transpose_lookup[build](images, sample_ids, lut, out)

    np.testing.assert_array_equal(out, lut[images[sample_ids]].T)  # every value the table's, in its place
    expected = (images[sample_ids].T.astype(np.float64) / 255.0 - mean) / std
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * (1.0 + abs(mean) / std))


@pytest.mark.parametrize("mean, std", [(0.5, 0.25), (np.full(6, 0.5), np.full(6, 0.25))], ids=["table", "per-feature"])
@pytest.mark.parametrize("bad", [-1, 4, 2**40])
def test_standardize_batch_refuses_ids_out_of_range_and_writes_nothing(mean, std, bad):
    images = np.arange(24, dtype=np.uint8).reshape(4, 6)
    out = np.full((6, 3), 7.0, np.float32)
    with pytest.raises(IndexError, match=r"sample ids must be in \[0, 4\)"):
        standardize_batch(images, np.array([0, bad, 1]), mean, std, out=out)
    assert np.all(out == 7.0)
    good = standardize_batch(images, np.array([3, 0, 3]), mean, std, out=out)
    np.testing.assert_allclose(good, (images[[3, 0, 3]].T / 255.0 - 0.5) / 0.25, rtol=1e-6)


def test_standardize_batch_matches_the_formula():
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(300, 784), dtype=np.uint8)
    ids = rng.permutation(300)[:128]
    out = standardize_batch(images, ids, 0.1307, 0.3081)
    np.testing.assert_allclose(out, (images[ids].T / 255.0 - 0.1307) / 0.3081, rtol=1e-5, atol=1e-5)


def test_standardize_batch_refuses_an_output_overlapping_the_images():
    memory = np.zeros(4 * 6 * 4, np.uint8)  # float32 (6, 4) output laid over the uint8 images
    images, out = memory.reshape(16, 6), memory.view(np.float32).reshape(6, 4)
    with pytest.raises(ValueError, match="overlaps"):
        standardize_batch(images, np.arange(4), 0.5, 0.25, out=out)


# ----- the no-alias builds -----
def _definition_line(dispatcher):
    """The ``define`` line of the compiled function itself (not its Python wrappers) in its LLVM IR."""
    llvm = next(iter(dispatcher.inspect_llvm().values()))
    return next(line for line in llvm.splitlines()
                if line.startswith("define") and "cpython" not in line and "cfunc" not in line)


def test_no_alias_compiler_marks_the_array_arguments():
    def double_into(x, out):
        for i in range(x.shape[0]):
            out[i] = 2.0 * x[i]

    plain = numba.njit(cache=False)(double_into)
    marked = numba.njit(cache=False, pipeline_class=kernels.NoAliasCompiler)(double_into)
    x = np.arange(8, dtype=np.float32)
    for function in (plain, marked):
        out = np.zeros(8, np.float32)
        function(x, out)
        np.testing.assert_array_equal(out, 2 * x)
    # Numba marks its return and exception pointers noalias in both; the marked build adds the arrays' pointers
    assert _definition_line(marked).count("noalias") >= _definition_line(plain).count("noalias") + 2


@pytest.mark.parametrize("name", ["csr_forward", "csc_backward_input", "transpose_lookup"])
def test_only_the_serial_builds_of_the_no_alias_kernels_use_the_compiler(name):
    serial, parallel = getattr(kernels, name)
    assert serial._compiler.pipeline_class is kernels.NoAliasCompiler
    assert parallel._compiler.pipeline_class is not kernels.NoAliasCompiler  # Numba decides for its loop bodies


def test_sparse_linear_refuses_an_output_overlapping_its_inputs():
    layer = dense_linear_layer(random_csr(np.random.default_rng(0), 6, 6, 0.5))
    x, delta = np.ones((6, 4), np.float32), np.ones((6, 4), np.float32)
    with pytest.raises(ValueError, match="overlaps"):
        layer.forward(x, x, relu=True)
    with pytest.raises(ValueError, match="overlaps"):
        layer.backward_input(delta, x, x[:, ::-1])


# ----- segment_sum -----
@SETTINGS
@given(n=st.integers(1, 200), n_segments=st.integers(1, 30), seed=seeds)
def test_segment_sum(n, n_segments, seed):
    rng = np.random.default_rng(seed)
    values = rng.uniform(0.0, 3.0, size=n).astype(np.float32)
    segment_ids = rng.integers(0, n_segments, size=n).astype(np.int32)
    out = kernels.segment_sum(values, segment_ids, n_segments)
    assert out.shape == (n_segments,)
    assert out.dtype == np.float64
    expected = np.array([values[segment_ids == s].astype(np.float64).sum() for s in range(n_segments)])
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=0)
    assert np.all(out[np.setdiff1d(np.arange(n_segments), segment_ids)] == 0.0)


def test_segment_sum_of_nothing_is_float64_zeros():
    """A task with no connections in a layer sums an empty selection: still (n_segments,) float64 zeros."""
    out = kernels.segment_sum(np.zeros(0, np.float32), np.zeros(0, np.int32), 4)
    assert out.shape == (4,)
    assert np.all(out == 0.0)
    assert out.dtype == np.float64


# ----- group_by_input -----
@SETTINGS
@given(nnz=st.integers(0, 300), n_in=st.integers(1, 40), fraction=st.sampled_from([0.0, 0.3, 1.0]),
       index_dtype=st.sampled_from([np.int32, np.int64]), seed=seeds)
def test_group_by_input_is_a_stable_sort_by_input(nnz, n_in, fraction, index_dtype, seed):
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, n_in, size=nnz).astype(index_dtype)
    kept = np.flatnonzero(rng.random(nnz) < fraction).astype(np.int64)
    col_ptr, col_order = kernels.group_by_input(kept, indices, n_in)
    np.testing.assert_array_equal(col_order, kept[np.argsort(indices[kept], kind="stable")])
    np.testing.assert_array_equal(col_ptr, np.r_[0, np.cumsum(np.bincount(indices[kept], minlength=n_in))])
    assert col_ptr.dtype == np.int64 and col_order.dtype == np.int64


# ----- copy_cached_rows (frozen outputs) -----
@SETTINGS
@given(n=st.integers(1, 30), slots=st.integers(1, 12), batch=st.integers(1, 20), seed=seeds)
def test_copy_cached_rows_both_ways(n, slots, batch, seed):
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(slots, size=rng.integers(0, slots + 1), replace=False)).astype(np.int64)
    values = rng.normal(size=(n, rows.size)).astype(np.float32)
    ids = rng.permutation(n)[:batch].astype(np.int64) if batch <= n else rng.integers(0, n, batch)
    out = rng.normal(size=(slots, ids.size)).astype(np.float32)
    expected = out.copy()
    expected[rows] = values[ids].T
    kernels.copy_cached_rows(rows, values, ids, out, False)
    assert np.array_equal(out, expected)
    out[rows] = rng.normal(size=(rows.size, ids.size)).astype(np.float32)
    recorded = values.copy()
    recorded[ids] = out[rows].T  # repeated ids: NumPy keeps the last, as the kernel does
    kernels.copy_cached_rows(rows, values, ids, out, True)
    assert np.array_equal(values, recorded)


# ----- pick and thread-count independence -----
PAIRS = (kernels.csr_forward, kernels.csc_backward_input, kernels.sampled_weight_grad, kernels.sgd_step_with_importance,
         kernels.transpose_lookup, kernels.gather)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs at least 2 Numba threads")
def test_pick_chooses_serial_below_threshold_and_parallel_above_with_threads():
    previous = numba.get_num_threads()
    try:
        for threads, above in ((2, 1), (1, 0)):
            numba.set_num_threads(threads)
            for pair in PAIRS:
                assert pair[0] is not pair[1]
                assert kernels.pick(pair, 0) is pair[0]
                assert kernels.pick(pair, kernels.PARALLEL_MIN_WORK - 1) is pair[0]
                assert kernels.pick(pair, kernels.PARALLEL_MIN_WORK) is pair[above]
                assert kernels.pick(pair, 100 * kernels.PARALLEL_MIN_WORK) is pair[above]
                assert pair[0].targetoptions.get("parallel", False) is False
                assert pair[1].targetoptions.get("parallel") is True
    finally:
        numba.set_num_threads(previous)


def sparse_problem(rng, n_out, n_in, batch, density):
    """A random layer with its CSC view, an input, a delta, a ReLU activation and biases."""
    W = random_csr(rng, n_out, n_in, density)
    rows, col_ptr, col_order = csc_view(W)
    return SimpleNamespace(W=W, rows=rows, col_ptr=col_ptr, col_order=col_order,
                           x=rng.normal(size=(n_in, batch)).astype(np.float32),
                           delta=rng.normal(size=(n_out, batch)).astype(np.float32),
                           activation=relu_like_activation(rng, n_in, batch),
                           bias=rng.normal(size=n_out).astype(np.float32))


def sparse_products(build, p):
    """The forward pass, input gradient and weight gradient of ``p`` with the serial (0) or parallel (1) build."""
    W, (n_in, batch) = p.W, p.x.shape
    fwd = np.empty((W.shape[0], batch), np.float32)
    kernels.csr_forward[build](np.arange(W.shape[0], dtype=np.int64), W.indptr, W.indices, W.data, p.bias, p.x, fwd,
                               True)
    back = np.empty((n_in, batch), np.float32)
    kernels.csc_backward_input[build](p.col_ptr, p.col_order, p.rows, W.data, p.delta, p.activation, back)
    grad = np.empty(W.nnz, np.float32)
    kernels.sampled_weight_grad[build](np.arange(W.nnz, dtype=np.int64), p.rows, W.indices, p.delta, p.x, grad)
    return fwd, back, grad


@settings(max_examples=25, deadline=None)
@given(n_out=st.integers(1, 300), n_in=st.integers(1, 300), batch=st.integers(1, 200),
       density=st.floats(0.01, 0.6), seed=st.integers(0, 2**32 - 1))
@example(n_out=2, n_in=5, batch=5, density=0.5625, seed=0)  # compiled for the generic x86 CPU (test_cpu_targets),
@example(n_out=262, n_in=204, batch=7, density=0.14, seed=3025977259)  # these differed in 1 ulp with reassociation
def test_serial_and_parallel_builds_give_the_same_bits(n_out, n_in, batch, density, seed):
    """What lets ``pick`` choose a build by the thread count: both compute each output the same way."""
    rng = np.random.default_rng(seed)
    p = sparse_problem(rng, n_out, n_in, batch, density)
    images = rng.integers(0, 256, size=(batch + 3, n_in), dtype=np.uint8)
    lut = rng.normal(size=256).astype(np.float32)
    ids = rng.permutation(batch + 3)[:batch]
    results = []
    for build in (0, 1):
        fwd, back, grad = sparse_products(build, p)
        weights, importance = p.W.data.copy(), np.zeros(p.W.nnz, np.float32)
        kernels.sgd_step_with_importance[build](np.arange(p.W.nnz, dtype=np.int64), grad, np.float32(0.1), weights,
                                                importance)
        standardized = np.empty((n_in, batch), np.float32)
        kernels.transpose_lookup[build](images, ids, lut, standardized)
        results.append((fwd, back, grad, weights, importance, standardized))
    for a, b in zip(*results):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs at least 2 Numba threads")
def test_parallel_results_do_not_depend_on_thread_count():
    """The module promises thread-count independent results: compare 1 thread against all threads, bitwise."""
    p = sparse_problem(np.random.default_rng(5), 300, 200, 64, 0.1)
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = sparse_products(1, p)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = sparse_products(1, p)
    finally:
        numba.set_num_threads(previous)
    for a, b in zip(one, many):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ----- layer structure: merged inserts and order-keeping removals give the fully sorted rebuild -----
@SETTINGS
@given(n_in=st.integers(1, 12), n_out=st.integers(1, 9), seed=st.integers(0, 10_000), conv=st.booleans())
def test_add_and_remove_keep_the_sorted_layout(n_in, n_out, seed, conv):
    """Random inserts and removals against a reference that sorts every connection by (row, column)."""
    from spacenet_np.layers import SparseConv2d

    rng = np.random.default_rng(seed)
    ins, outs = NeuronIndex(n_in, dense=True), NeuronIndex(n_out, dense=True)
    layer = SparseConv2d(ins, outs, 3, 3) if conv else SparseLinear(ins, outs)
    reference = {}  # (row, col) -> (weights, owner, importance)
    for step in range(6):
        free = [p for p in range(n_in * n_out) if (p // n_in, p % n_in) not in reference]
        if free and (step % 3 != 2 or not reference):
            chosen = rng.choice(free, size=rng.integers(1, len(free) + 1), replace=False)
            rows, cols = chosen // n_in, chosen % n_in
            weights = rng.standard_normal(layer.weight_shape(chosen.size)).astype(np.float32)
            importance = rng.random(chosen.size).astype(np.float32)
            layer.add_connections(rows, cols, weights, step, importance)
            for i in range(chosen.size):
                reference[(int(rows[i]), int(cols[i]))] = (weights[i], step, importance[i])
        else:
            gone = rng.choice(layer.nnz, size=rng.integers(1, layer.nnz + 1), replace=False)
            for k in gone:
                del reference[(int(layer.rows[k]), int(layer.indices[k]))]
            layer.remove_connections(gone)
        keys = sorted(reference)
        assert [(int(r), int(c)) for r, c in zip(layer.rows, layer.indices)] == keys
        np.testing.assert_array_equal(layer.weights, np.array([reference[k][0] for k in keys]).reshape(
            layer.weights.shape))
        np.testing.assert_array_equal(layer.owner, [reference[k][1] for k in keys])
        np.testing.assert_array_equal(layer.importance, np.array([reference[k][2] for k in keys], np.float32))
        np.testing.assert_array_equal(layer.indptr, np.searchsorted([k[0] for k in keys], np.arange(n_out + 1)))


# ----- ReLU on float32 bits -----
SPECIAL_FLOATS = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 3.4e38, -3.4e38],
                          np.float32).view(np.int32)
NAN_PAYLOADS = np.array([0x7F800001, 0x7FC00001, 0x7FFFFFFF, -1, -0x00400001, -0x007FFFFF], np.int32)


@numba.njit(fastmath=True)
def _relu_all(values):
    out = np.empty_like(values)
    for j in range(values.size):
        out[j] = kernels._relu(values[j])
    return out


@numba.njit(fastmath=True)
def _masked_all(grads, activations):
    out = np.empty_like(grads)
    for j in range(grads.size):
        out[j] = kernels._masked(grads[j], activations[j])
    return out


@settings(max_examples=60, deadline=None)
@given(words=st.lists(st.integers(-2**31, 2**31 - 1), max_size=40), seed=seeds)
def test_relu_and_its_mask_on_bits_are_the_float_definitions(words, seed):
    """``_relu`` is ``0.0 if v < 0 else v`` and ``_masked`` is ``0.0 if a <= 0 else g``, bit for bit (integer
    operations on bitcasts), on any float32 bits: -0.0 kept by the ReLU and masked by the mask, NaNs of either
    sign (and their payloads) kept; in a loop long enough to run vectorized."""
    bits = np.concatenate([np.array(words, np.int32), SPECIAL_FLOATS, NAN_PAYLOADS])
    bits = np.concatenate([bits, np.random.default_rng(seed).permutation(bits)])  # each word paired with others
    values = bits.view(np.float32)
    relu = np.where(values < 0, np.float32(0.0), values)
    assert np.array_equal(_relu_all(values).view(np.int32), relu.view(np.int32))
    grads = np.roll(bits, 1)
    masked = np.where(values <= 0, np.float32(0.0), grads.view(np.float32))
    assert np.array_equal(_masked_all(grads.view(np.float32), values).view(np.int32), masked.view(np.int32))
