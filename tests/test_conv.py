"""3 x 3 convolutions: the Numba conv kernels (serial and parallel builds), ``SparseConv2d``'s sparse and
dense paths and ``SparseCNN``'s backpropagation, against float64 NumPy references and finite differences.

Layout under test: maps are (maps, H, W, batch) float32, C-contiguous; the conv kernels take them as
(maps, H, W * batch) views. A kernel's weight t multiplies x[c, h + dy, w + dx] with dy = t // 3 - 1,
dx = t % 3 - 1 (zero padding 1, stride 1). The references below are written from that definition alone: padded
slicing in float64, checked once against explicit loops.
"""
import numba
import numpy as np
import pytest
import scipy.sparse
from hypothesis import given, settings
from hypothesis import strategies as st

from spacenet_np import kernels
from spacenet_np.layers import NeuronIndex, SparseConv2d, SparseLinear
from spacenet_np.network import SparseCNN, softmax_cross_entropy, standardize_batch

BUILDS = [pytest.param(0, id="serial"), pytest.param(1, id="parallel")]
PATHS = ["sparse", "dense"]
SETTINGS = settings(max_examples=15, deadline=None)
TAPS = [(t // 3 - 1, t % 3 - 1) for t in range(9)]  # (dy, dx) of tap t

# float32 with fastmath: a few ulp per accumulated term, relative to the sum of the terms' magnitudes.
RTOL = 1e-5
ATOL = 1e-5

maps_st = st.tuples(st.integers(1, 5), st.integers(1, 5))   # n_out, n_in
image_st = st.tuples(st.integers(1, 6), st.integers(2, 7))  # height, width (the kernels need width >= 2)
batch_st = st.integers(1, 5)
density_st = st.sampled_from([0.0, 0.3, 0.7, 1.0])
seed_st = st.integers(0, 2**32 - 1)


# ----- float64 NumPy references -----
def shifted(x, dy, dx):
    """``s[c, h, w, b] = x[c, h + dy, w + dx, b]``, 0 outside the map. x (c, H, W, batch) -> float64."""
    _, height, width, _ = x.shape
    padded = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    return padded[:, 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]


def conv_ref(x, K, bias=None, relu=False):
    """``out[o] = sum_{c, t} K[o, c, t] x[c, h + dy_t, w + dx_t] + bias[o]``, then ReLU; K (n_out, n_in, 9)"""
    out = sum(np.einsum("oc,chwb->ohwb", np.asarray(K, np.float64)[:, :, t], shifted(x, dy, dx))
              for t, (dy, dx) in enumerate(TAPS))
    if bias is not None:
        out = out + np.asarray(bias, np.float64)[:, None, None, None]
    return np.maximum(out, 0.0) if relu else out


def conv_transpose_ref(delta, K):
    """The adjoint of ``conv_ref`` (without bias):
    ``out[c, h, w] = sum_{o, t} K[o, c, t] delta[o, h - dy_t, w - dx_t]``."""
    return sum(np.einsum("oc,ohwb->chwb", np.asarray(K, np.float64)[:, :, t], shifted(delta, -dy, -dx))
               for t, (dy, dx) in enumerate(TAPS))


def weight_grad_ref(delta, x):
    """``g[o, c, t] = sum_{h, w, b} delta[o, h, w, b] x[c, h + dy_t, w + dx_t, b]``: (n_out, n_in, 9)."""
    d = np.asarray(delta, np.float64)
    return np.stack([np.einsum("ohwb,chwb->oc", d, shifted(x, dy, dx)) for dy, dx in TAPS], axis=-1)


def im2col_ref(x):
    """``cols[9 c + t] = shifted(x[c], dy_t, dx_t)``. Returns (9 n_in, H, W, batch) float64."""
    n_in = x.shape[0]
    return np.stack([shifted(x, dy, dx) for dy, dx in TAPS], axis=1).reshape(9 * n_in, *x.shape[1:])


def conv_loop_ref(x, K, bias):
    """``conv_ref`` written as plain loops over every output element and tap (only for tiny sizes)."""
    n_in, height, width, batch = x.shape
    out = np.zeros((K.shape[0], height, width, batch))
    for o in range(K.shape[0]):
        for h in range(height):
            for w in range(width):
                for b in range(batch):
                    s = float(bias[o])
                    for c in range(n_in):
                        for t in range(9):
                            hh, ww = h + t // 3 - 1, w + t % 3 - 1
                            if 0 <= hh < height and 0 <= ww < width:
                                s += float(K[o, c, t]) * float(x[c, hh, ww, b])
                    out[o, h, w, b] = s
    return out


def max_pool_ref(x):
    """2 x 2 max pooling of x (C, H, W, batch) over the even part of the map. Returns (values, argmax) with
    the winner's position coded 2 dy + dx, the first of equal values winning (``np.argmax``)."""
    n_maps, height, width, batch = x.shape
    h2, w2 = height // 2, width // 2
    windows = np.stack([x[:, dy:2 * h2:2, dx:2 * w2:2] for dy in range(2) for dx in range(2)], axis=-1)
    return windows.max(axis=-1), np.argmax(windows, axis=-1)


def max_pool_backward_ref(delta, argmax):
    """Route delta (C, h, w, batch) to the winners of a (C, 2h, 2w, batch) map."""
    n_maps, h2, w2, batch = delta.shape
    out = np.zeros((n_maps, 2 * h2, 2 * w2, batch))
    for dy in range(2):
        for dx in range(2):
            out[:, dy::2, dx::2] = np.where(argmax == 2 * dy + dx, delta, 0.0)
    return out


def flat_rows(maps):
    """(maps, H, W, batch) -> the (maps, H, W * batch) view the conv kernels take (must not copy)."""
    view = maps.reshape(maps.shape[0], maps.shape[1], -1)
    assert np.shares_memory(view, maps)
    return view


def assert_close(computed, expected, scale, rtol=RTOL, atol=ATOL):
    """|computed - expected| <= rtol * scale + atol everywhere (scale: the sum of the terms' magnitudes)."""
    computed = np.asarray(computed, np.float64)
    assert computed.shape == expected.shape
    assert np.all(np.isfinite(computed))
    error = np.abs(computed - expected)
    bound = rtol * scale + atol
    assert np.all(error <= bound), f"max excess {np.max(error - bound)}"


# ----- random kernel sets -----
class KernelSet:
    """A random CSR set of 3 x 3 kernels from n_in to n_out maps (sorted by output map, then input map), its
    CSC view built by hand, and the dense float64 (n_out, n_in, 9) kernel tensor ``K``."""

    def __init__(self, rng, n_out, n_in, density, empty_rows=0):
        mask = rng.random((n_out, n_in)) < density
        mask[rng.permutation(n_out)[:empty_rows]] = False
        rows, cols = np.nonzero(mask)  # row-major order: CSR order
        self.n_out, self.n_in = n_out, n_in
        self.rows = rows.astype(np.int32)
        self.indices = cols.astype(np.int32)
        self.indptr = np.zeros(n_out + 1, np.int32)
        self.indptr[1:] = np.cumsum(mask.sum(axis=1))
        self.weights = rng.uniform(-1.0, 1.0, size=(rows.size, 9)).astype(np.float32)
        self.col_order = np.argsort(cols, kind="stable").astype(np.int64)
        self.col_ptr = np.zeros(n_in + 1, np.int64)
        self.col_ptr[1:] = np.cumsum(mask.sum(axis=0))
        self.K = np.zeros((n_out, n_in, 9))
        self.K[rows, cols] = self.weights
        self.empty_rows = np.flatnonzero(~mask.any(axis=1))

    @property
    def nnz(self):
        return self.rows.size


def relu_like(rng, shape):
    """Activations with exact zeros (inactive ReLU), positives and a few negatives (to be masked as well)."""
    a = rng.normal(size=shape).astype(np.float32)
    a[rng.random(shape) < 0.3] = 0.0
    return a


# ----- the references themselves -----
def test_reference_conv_matches_loops_and_tap_convention():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4, 2))
    K = rng.normal(size=(3, 2, 9))
    bias = rng.normal(size=3)
    np.testing.assert_allclose(conv_ref(x, K, bias), conv_loop_ref(x, K, bias), rtol=1e-12, atol=1e-12)
    # A single tap t with weight 1 reads x[h + dy, w + dx]: e.g. t = 5 (dy 0, dx +1) shifts the map left.
    one_tap = np.zeros((1, 1, 9))
    one_tap[0, 0, 5] = 1.0
    expected = np.zeros_like(x[:1])
    expected[:, :, :-1] = x[:1, :, 1:]
    assert np.array_equal(conv_ref(x[:1], one_tap), expected)
    # The transposed reference is the adjoint of the forward one.
    d = rng.normal(size=(3, 3, 4, 2))
    assert np.sum(conv_ref(x, K) * d) == pytest.approx(np.sum(x * conv_transpose_ref(d, K)), rel=1e-12)


# ----- conv_forward -----
@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("relu", [False, True])
@SETTINGS
@given(maps=maps_st, image=image_st, batch=batch_st, density=density_st, empty_rows=st.integers(0, 2),
       seed=seed_st)
def test_conv_forward_matches_reference(build, relu, maps, image, batch, density, empty_rows, seed):
    (n_out, n_in), (height, width) = maps, image
    rng = np.random.default_rng(seed)
    ks = KernelSet(rng, n_out, n_in, density, empty_rows)
    x = rng.normal(size=(n_in, height, width, batch)).astype(np.float32)
    bias = rng.normal(size=n_out).astype(np.float32)
    out = np.full((n_out, height, width, batch), np.nan, np.float32)

    kernels.conv_forward[build](ks.indptr, ks.indices, ks.weights, bias, flat_rows(x), flat_rows(out), batch,
                                relu, *kernels.NO_POOL)

    expected = conv_ref(x, ks.K, bias, relu)
    assert_close(out, expected, conv_ref(np.abs(x), np.abs(ks.K)) + np.abs(bias)[:, None, None, None])
    if relu:
        assert np.all(out >= 0.0)
    # Maps without kernels get only their bias, exactly (through the ReLU if any).
    empty_bias = np.maximum(bias[ks.empty_rows], 0.0) if relu else bias[ks.empty_rows]
    assert np.array_equal(out[ks.empty_rows], np.broadcast_to(empty_bias[:, None, None, None],
                                                              (ks.empty_rows.size, height, width, batch)))


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("height", [1, 2, 3])
@pytest.mark.parametrize("t", range(9))
def test_conv_forward_single_tap_is_an_exact_shift(build, height, t):
    """One kernel with weight 1 at tap t: out[h, w] = x[h + dy, w + dx] exactly, 0 in the padding."""
    width, batch = 2, 3
    rng = np.random.default_rng(t)
    x = rng.normal(size=(1, height, width, batch)).astype(np.float32)
    weights = np.zeros((1, 9), np.float32)
    weights[0, t] = 1.0
    out = np.full((1, height, width, batch), np.nan, np.float32)
    kernels.conv_forward[build](np.array([0, 1], np.int32), np.array([0], np.int32), weights,
                                np.zeros(1, np.float32), flat_rows(x), flat_rows(out), batch, False,
                                *kernels.NO_POOL)
    dy, dx = TAPS[t]
    expected = shifted(x, dy, dx)
    assert np.array_equal(out, expected)
    assert np.any(out != 0.0) or height == 1 and dy != 0


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("relu", [False, True])
def test_conv_forward_without_kernels_gives_bias(build, relu):
    n_out, height, width, batch = 4, 3, 2, 2
    bias = np.array([1.5, -2.0, 0.0, 0.25], np.float32)
    out = np.full((n_out, height, width, batch), np.nan, np.float32)
    x = np.ones((3, height, width, batch), np.float32)
    no_kernels = np.zeros((0, 9), np.float32)
    kernels.conv_forward[build](np.zeros(n_out + 1, np.int32), np.zeros(0, np.int32), no_kernels, bias,
                                flat_rows(x), flat_rows(out), batch, relu, *kernels.NO_POOL)
    expected = np.maximum(bias, 0.0) if relu else bias
    assert np.array_equal(out, np.broadcast_to(expected[:, None, None, None], out.shape))


@pytest.mark.parametrize("build", BUILDS)
@SETTINGS
@given(maps=maps_st, image=st.tuples(st.integers(2, 7), st.integers(2, 7)), batch=batch_st, density=density_st,
       levels=st.sampled_from([2, 1000]), seed=seed_st)
def test_conv_forward_pools_as_max_pool2(build, maps, image, batch, density, levels, seed):
    """With ``pooled`` and ``argmax``, conv_forward also writes max_pool2 of its output (ties included: few
    distinct input levels and ReLU zeros make them frequent; an odd last row or column is not pooled), and the
    output itself is unchanged."""
    (n_out, n_in), (height, width) = maps, image
    rng = np.random.default_rng(seed)
    ks = KernelSet(rng, n_out, n_in, density)
    x = (rng.integers(0, levels, size=(n_in, height, width, batch)) - levels // 2).astype(np.float32)
    bias = rng.normal(size=n_out).astype(np.float32)
    plain, fused = (np.full((n_out, height, width, batch), np.nan, np.float32) for _ in range(2))
    pooled_shape = (n_out, height // 2, width // 2, batch)
    pooled = np.full(pooled_shape, np.nan, np.float32)
    argmax = np.full(pooled_shape, 255, np.uint8)
    conv = kernels.conv_forward[build]
    conv(ks.indptr, ks.indices, ks.weights, bias, flat_rows(x), flat_rows(plain), batch, True, *kernels.NO_POOL)
    conv(ks.indptr, ks.indices, ks.weights, bias, flat_rows(x), flat_rows(fused), batch, True, flat_rows(pooled),
         flat_rows(argmax))

    assert np.array_equal(fused, plain)
    values, where = max_pool_ref(plain)
    assert np.array_equal(pooled, values)
    assert np.array_equal(argmax, where)
    # Without storing the maps (kernels.NO_MAPS: each item keeps its row pair): the same pooling, bit for bit.
    pooled[:], argmax[:] = np.nan, 255
    conv(ks.indptr, ks.indices, ks.weights, bias, flat_rows(x), kernels.NO_MAPS, batch, True, flat_rows(pooled),
         flat_rows(argmax))
    assert np.array_equal(pooled, values)
    assert np.array_equal(argmax, where)


# ----- conv_backward_input -----
def backward_input_problem(seed, n_out, n_in, height, width, batch, density):
    """Random kernels, a delta (n_out, H, W, batch) and a ReLU-like input activation (n_in, H, W, batch)."""
    rng = np.random.default_rng(seed)
    ks = KernelSet(rng, n_out, n_in, density)
    delta = rng.normal(size=(n_out, height, width, batch)).astype(np.float32)
    return ks, delta, relu_like(rng, (n_in, height, width, batch))


@pytest.mark.parametrize("build", BUILDS)
@SETTINGS
@given(maps=maps_st, image=image_st, batch=batch_st, density=density_st, seed=seed_st)
def test_conv_backward_input_matches_transposed_reference(build, maps, image, batch, density, seed):
    (n_out, n_in), (height, width) = maps, image
    ks, delta, activation = backward_input_problem(seed, n_out, n_in, height, width, batch, density)
    out = np.full((n_in, height, width, batch), np.nan, np.float32)

    kernels.conv_backward_input[build](ks.col_ptr, ks.col_order, ks.rows, ks.weights, flat_rows(delta),
                                       flat_rows(activation), flat_rows(out), batch, kernels.NO_LEAVES,
                                       kernels.NO_SKIP)

    expected = conv_transpose_ref(delta, ks.K) * (activation > 0)
    assert_close(out, expected, conv_transpose_ref(np.abs(delta), np.abs(ks.K)))
    assert np.all(out[activation <= 0] == 0.0)


@pytest.mark.parametrize("build", BUILDS)
@SETTINGS
@given(maps=maps_st, image=image_st, batch=batch_st, density=density_st, seed=seed_st)
def test_conv_backward_input_gives_unused_maps_zeros_and_the_others_their_bits(build, maps, image, batch, density,
                                                                               seed):
    (n_out, n_in), (height, width) = maps, image
    ks, delta, activation = backward_input_problem(seed, n_out, n_in, height, width, batch, density)
    unused = np.random.default_rng(seed).random(n_in) < 0.5
    full, partial = (np.full((n_in, height, width, batch), np.nan, np.float32) for _ in range(2))
    for out, skip in ((full, kernels.NO_SKIP), (partial, unused)):
        kernels.conv_backward_input[build](ks.col_ptr, ks.col_order, ks.rows, ks.weights, flat_rows(delta),
                                           flat_rows(activation), flat_rows(out), batch, kernels.NO_LEAVES, skip)
    assert np.array_equal(partial[~unused], full[~unused])
    assert np.all(partial[unused] == 0.0)


# ----- conv_weight_grad -----
@pytest.mark.parametrize("build", BUILDS)
@SETTINGS
@given(maps=maps_st, image=image_st, batch=batch_st, density=density_st, fraction=st.floats(0.0, 1.0),
       seed=seed_st)
def test_conv_weight_grad_at_a_subset_of_kernels(build, maps, image, batch, density, fraction, seed):
    (n_out, n_in), (height, width) = maps, image
    rng = np.random.default_rng(seed)
    ks = KernelSet(rng, n_out, n_in, density)
    connections = rng.permutation(ks.nnz)[:int(round(fraction * ks.nnz))].astype(np.int64)
    delta = rng.normal(size=(n_out, height, width, batch)).astype(np.float32)
    x = rng.normal(size=(n_in, height, width, batch)).astype(np.float32)
    grad = np.full((connections.size, 9), np.nan, np.float32)

    kernels.conv_weight_grad[build](connections, ks.rows, ks.indices, flat_rows(delta), flat_rows(x), grad,
                                    batch)

    o, c = ks.rows[connections], ks.indices[connections]
    assert_close(grad, weight_grad_ref(delta, x)[o, c], weight_grad_ref(np.abs(delta), np.abs(x))[o, c])


# ----- im2col / col2im -----
@pytest.mark.parametrize("build", BUILDS)
@SETTINGS
@given(n_in=st.integers(1, 4), image=image_st, batch=batch_st, seed=seed_st)
def test_im2col_col2im_against_slicing_and_adjoint(build, n_in, image, batch, seed):
    height, width = image
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_in, height, width, batch)).astype(np.float32)
    cols = np.full((9 * n_in, height, width, batch), np.nan, np.float32)
    kernels.im2col[build](x, cols)
    assert np.array_equal(cols, im2col_ref(x))  # copies and zeros: exact

    y = rng.normal(size=cols.shape).astype(np.float32)
    back = np.full(x.shape, np.nan, np.float32)
    kernels.col2im[build](y, np.ones(x.shape, np.float32), back)
    # <im2col(x), y> == <x, col2im(y)>: col2im is the adjoint of im2col (without the ReLU mask).
    lhs = np.sum(cols.astype(np.float64) * y)
    rhs = np.sum(x.astype(np.float64) * back)
    assert lhs == pytest.approx(rhs, rel=1e-5, abs=1e-5 * float(np.sum(np.abs(cols) * np.abs(y))))
    # col2im sums the nine shifted planes of its input map: the transposed convolution with unit kernels.
    planes = y.astype(np.float64).reshape(n_in, 9, height, width, batch)
    expected = sum(shifted(planes[:, t], -dy, -dx) for t, (dy, dx) in enumerate(TAPS))
    magnitude = sum(shifted(np.abs(planes[:, t]), -dy, -dx) for t, (dy, dx) in enumerate(TAPS))
    assert_close(back, expected, magnitude)

    # Masking by activation <= 0 (zeros and negatives).
    activation = relu_like(rng, x.shape)
    masked = np.full(x.shape, np.nan, np.float32)
    kernels.col2im[build](y, activation, masked)
    assert np.all(masked[activation <= 0] == 0.0)
    assert np.array_equal(masked[activation > 0], back[activation > 0])


# ----- max pooling -----
@pytest.mark.parametrize("build", BUILDS)
@SETTINGS
@given(n_maps=st.integers(1, 4), half=st.tuples(st.integers(1, 4), st.integers(1, 4)), odd=st.tuples(
    st.booleans(), st.booleans()), batch=batch_st, levels=st.sampled_from([2, 3, 1000]), seed=seed_st)
def test_max_pool2_and_backward_match_reference(build, n_maps, half, odd, batch, levels, seed):
    """Few distinct values (levels 2 or 3) make ties frequent: the first of equal values (2 dy + dx) wins."""
    (h2, w2), rng = half, np.random.default_rng(seed)
    height, width = 2 * h2 + odd[0], 2 * w2 + odd[1]  # an odd last row/column is ignored
    x = (rng.integers(0, levels, size=(n_maps, height, width, batch)) - levels // 2).astype(np.float32)
    out = np.full((n_maps, h2, w2, batch), np.nan, np.float32)
    argmax = np.full((n_maps, h2, w2, batch), 255, np.uint8)

    kernels.max_pool2[build](x, out, argmax)

    values, where = max_pool_ref(x)
    assert np.array_equal(out, values)
    assert np.array_equal(argmax, where)

    delta = rng.normal(size=out.shape).astype(np.float32)
    routed = np.full((n_maps, 2 * h2, 2 * w2, batch), np.nan, np.float32)
    kernels.max_pool2_backward[build](delta, argmax, routed, kernels.NO_LEAVES)
    assert np.array_equal(routed, max_pool_backward_ref(delta, argmax))
    # Every window passes its delta to exactly one position.
    per_window = np.count_nonzero(routed.reshape(n_maps, h2, 2, w2, 2, batch), axis=(2, 4))
    assert np.array_equal(per_window, (delta != 0).astype(per_window.dtype))


@pytest.mark.parametrize("build", BUILDS)
def test_max_pool2_tie_rule_and_position_code(build):
    """Positions are coded 2 dy + dx; among equal maxima the first in that order wins."""
    windows = {  # 2 x 2 window [[p0, p1], [p2, p3]] -> expected code
        (1.0, 1.0, 1.0, 1.0): 0, (0.0, 2.0, 0.0, 2.0): 1, (0.0, 0.0, 3.0, 3.0): 2, (0.0, 0.0, 0.0, 4.0): 3,
        (-1.0, -2.0, -1.0, -3.0): 0, (5.0, 6.0, 6.0, 1.0): 1, (0.0, 0.0, 0.0, 0.0): 0,
    }
    batch = len(windows)
    x = np.zeros((1, 2, 2, batch), np.float32)
    for b, p in enumerate(windows):
        x[0, :, :, b] = np.reshape(p, (2, 2))
    out = np.empty((1, 1, 1, batch), np.float32)
    argmax = np.empty((1, 1, 1, batch), np.uint8)
    kernels.max_pool2[build](x, out, argmax)
    assert argmax[0, 0, 0].tolist() == list(windows.values())
    assert out[0, 0, 0].tolist() == [max(p) for p in windows]
    routed = np.full(x.shape, np.nan, np.float32)
    kernels.max_pool2_backward[build](np.full((1, 1, 1, batch), 7.0, np.float32), argmax, routed,
                                      kernels.NO_LEAVES)
    for b, code in enumerate(windows.values()):
        expected = np.zeros(4)
        expected[code] = 7.0
        assert routed[0, :, :, b].ravel().tolist() == expected.tolist()


# ----- sgd_step_kernels -----
@pytest.mark.parametrize("build", BUILDS)
@SETTINGS
@given(nnz=st.integers(0, 40), fraction=st.floats(0.0, 1.0), lr=st.floats(1e-4, 1.0), seed=seed_st)
def test_sgd_step_kernels(build, nnz, fraction, lr, seed):
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(nnz, 9)).astype(np.float32)
    importance = rng.uniform(0.0, 2.0, size=nnz).astype(np.float32)
    connections = rng.permutation(nnz)[:int(round(fraction * nnz))].astype(np.int64)
    grad = rng.normal(size=(connections.size, 9)).astype(np.float32)
    lr32 = np.float32(lr)
    w0, i0 = weights.copy(), importance.copy()

    kernels.sgd_step_kernels[build](connections, grad, lr32, weights, importance)

    g = grad.astype(np.float64)
    np.testing.assert_allclose(weights[connections], w0[connections] - float(lr32) * g, rtol=1e-6, atol=1e-6)
    expected_importance = i0[connections] + float(lr32) * np.sum(g ** 2, axis=1)
    np.testing.assert_allclose(importance[connections], expected_importance, rtol=1e-5, atol=1e-7)
    assert np.all(importance[connections] >= i0[connections])
    others = np.setdiff1d(np.arange(nnz), connections)
    assert np.array_equal(weights[others].view(np.uint32), w0[others].view(np.uint32))
    assert np.array_equal(importance[others].view(np.uint32), i0[others].view(np.uint32))


# ----- per-feature standardization -----
@pytest.mark.parametrize("build", BUILDS)
@SETTINGS
@given(n=st.integers(1, 20), n_features=st.integers(1, 70), batch=st.integers(1, 40), seed=seed_st)
def test_transpose_standardize_per_feature(build, n, n_features, batch, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, n_features), dtype=np.uint8)
    images[0, 0], images[-1, -1] = 0, 255
    mean = rng.uniform(0.0, 1.0, size=n_features)
    std = rng.uniform(0.05, 2.0, size=n_features)
    ids = rng.integers(0, n, size=batch).astype(np.int64)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    shift = (-mean / std).astype(np.float32)
    out = np.full((n_features, batch), np.nan, np.float32)

    kernels.transpose_standardize[build](images[ids], scale, shift, out)

    expected = (images[ids].T / 255.0 - mean[:, None]) / std[:, None]
    tol = 1e-5 * (1.0 + (1.0 + mean) / std)[:, None]
    assert np.all(np.abs(out - expected) <= tol)

    # The public entry point with per-feature statistics gives the same formula.
    via_api = standardize_batch(images, ids, mean, std)
    assert via_api.shape == (n_features, batch) and via_api.dtype == np.float32
    assert np.all(np.abs(via_api - expected) <= tol)
    # Its affine coefficients are cached: statistics changed in place must not be served stale.
    mean[:] = mean[::-1].copy() + 0.5
    expected = (images[ids].T / 255.0 - mean[:, None]) / std[:, None]
    tol = 1e-5 * (1.0 + (1.0 + mean) / std)[:, None]
    assert np.all(np.abs(standardize_batch(images, ids, mean, std) - expected) <= tol)


def test_standardize_batch_per_channel_statistics_of_an_image():
    """Per-channel statistics expanded to (channel, row, column) features, as the CIFAR streams use them."""
    rng = np.random.default_rng(3)
    channels, height, width = 3, 4, 5
    images = rng.integers(0, 256, size=(30, channels * height * width), dtype=np.uint8)
    mean = np.repeat([0.49, 0.48, 0.45], height * width)
    std = np.repeat([0.25, 0.24, 0.26], height * width)
    ids = np.array([4, 0, 29, 4, 17], np.int64)
    out = standardize_batch(images, ids, mean, std)
    expected = (images[ids].T / 255.0 - mean[:, None]) / std[:, None]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # Viewed as maps, the features are channel-major: feature (c, h, w) is channel c's pixel (h, w).
    maps = out.reshape(channels, height, width, ids.size)
    pixel = images[0, 2 * 20 + 3 * 5 + 1]  # sample 1 of the batch is image 0; channel 2, row 3, column 1
    np.testing.assert_allclose(maps[2, 3, 1, 1], (pixel / 255.0 - 0.45) / 0.26, rtol=1e-5)


# ----- SparseConv2d -----
def conv_layer(rng, n_in, n_out, height, width, density, empty_rows=0):
    """A SparseConv2d between dense NeuronIndex objects with a random KernelSet, inserted in a shuffled order,
    and random biases. Returns (layer, KernelSet)."""
    ks = KernelSet(rng, n_out, n_in, density, empty_rows)
    layer = SparseConv2d(NeuronIndex(n_in, dense=True), NeuronIndex(n_out, dense=True), height, width)
    order = rng.permutation(ks.nnz)
    layer.add_connections(ks.rows[order], ks.indices[order], ks.weights[order], owner=0)
    layer.bias[:] = rng.normal(size=n_out)
    return layer, ks


@SETTINGS
@given(maps=maps_st, image=image_st, density=density_st, empty_rows=st.integers(0, 2), seed=seed_st)
def test_sparse_conv2d_structure_and_to_scipy(maps, image, density, empty_rows, seed):
    (n_out, n_in), (height, width) = maps, image
    rng = np.random.default_rng(seed)
    layer, ks = conv_layer(rng, n_in, n_out, height, width, density, empty_rows)

    assert layer.nnz == ks.nnz
    assert layer.weights.shape == (ks.nnz, 9) and layer.weights.dtype == np.float32
    assert np.array_equal(layer.rows, ks.rows) and np.array_equal(layer.indices, ks.indices)  # CSR order
    assert np.array_equal(layer.weights, ks.weights)  # each kernel moved with its position
    assert np.array_equal(layer.indptr, ks.indptr)

    dense = layer.dense_weights()
    assert dense.shape == (n_out, 9 * n_in) and dense.dtype == np.float32
    assert np.array_equal(dense.reshape(n_out, n_in, 9), ks.K)  # column 9 c + t holds tap t of kernel (o, c)

    W = layer.to_scipy()
    assert isinstance(W, scipy.sparse.bsr_array)
    assert W.shape == (n_out, 9 * n_in) and W.blocksize == (1, 9)
    assert W.nnz == 9 * ks.nnz
    assert np.array_equal(W.toarray(), dense)
    assert np.array_equal(W.data.reshape(-1, 9), layer.weights)
    # A copy: changing it leaves the layer alone.
    if ks.nnz:
        W.data[0, 0, 0] += 1.0
        assert np.array_equal(layer.dense_weights(), dense)

    # dense_weights in im2col's column order: dense @ im2col(x) is the convolution.
    x = rng.normal(size=(n_in, height, width, 2)).astype(np.float32)
    cols = np.empty((9 * n_in, height, width, 2), np.float32)
    kernels.im2col[0](x, cols)
    product = (dense.astype(np.float64) @ cols.reshape(9 * n_in, -1)).reshape(n_out, height, width, 2)
    np.testing.assert_allclose(product, conv_ref(x, ks.K), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("relu", [False, True])
@SETTINGS
@given(maps=maps_st, image=image_st, batch=batch_st, density=density_st, empty_rows=st.integers(0, 2),
       seed=seed_st)
def test_sparse_conv2d_paths_agree_with_reference(relu, maps, image, batch, density, empty_rows, seed):
    """forward, backward_input and weight_grad: sparse path == dense path == float64 reference."""
    (n_out, n_in), (height, width) = maps, image
    rng = np.random.default_rng(seed)
    layer, ks = conv_layer(rng, n_in, n_out, height, width, density, empty_rows)
    x = rng.normal(size=(n_in, height, width, batch)).astype(np.float32)
    x_other = rng.normal(size=x.shape).astype(np.float32)
    delta = rng.normal(size=(n_out, height, width, batch)).astype(np.float32)
    activation = relu_like(rng, x.shape)
    connections = rng.permutation(ks.nnz)[:max(0, ks.nnz - 1)].astype(np.int64)
    bias = layer.bias.astype(np.float64)
    o, c = layer.rows[connections], layer.indices[connections]

    expected_out = conv_ref(x, ks.K, bias, relu)
    out_scale = conv_ref(np.abs(x), np.abs(ks.K)) + np.abs(bias)[:, None, None, None]
    expected_back = conv_transpose_ref(delta, ks.K) * (activation > 0)
    back_scale = conv_transpose_ref(np.abs(delta), np.abs(ks.K))
    full_grad, grad_scale = weight_grad_ref(delta, x), weight_grad_ref(np.abs(delta), np.abs(x))
    other_grad, other_scale = weight_grad_ref(delta, x_other), weight_grad_ref(np.abs(delta), np.abs(x_other))

    results = {}
    for path in PATHS:
        layer.force_path = path
        assert layer.dense_path() == (path == "dense")
        out = np.full((n_out, height, width, batch), np.nan, np.float32)
        assert layer.forward(x, out, relu) is out
        back = np.full(x.shape, np.nan, np.float32)
        assert layer.backward_input(delta, activation, back) is back
        grad = layer.weight_grad(connections, delta, x)  # the dense path reuses the forward pass's im2col
        grad_other = layer.weight_grad(connections, delta, x_other)  # ... but not for another input
        assert grad.shape == (connections.size, 9) and grad.dtype == np.float32

        assert_close(out, expected_out, out_scale)
        assert_close(back, expected_back, back_scale)
        assert np.all(back[activation <= 0] == 0.0)
        assert_close(grad, full_grad[o, c], grad_scale[o, c])
        assert_close(grad_other, other_grad[o, c], other_scale[o, c])
        results[path] = out, back, grad
    for a, b in zip(results["sparse"], results["dense"]):
        assert np.allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_sparse_conv2d_without_kernels(path):
    n_in, n_out, height, width, batch = 3, 2, 2, 2, 3
    layer = SparseConv2d(NeuronIndex(n_in, dense=True), NeuronIndex(n_out, dense=True), height, width)
    layer.force_path = path
    layer.bias[:] = [0.5, -0.5]
    x = np.random.default_rng(0).normal(size=(n_in, height, width, batch)).astype(np.float32)
    out = np.full((n_out, height, width, batch), np.nan, np.float32)
    layer.forward(x, out, relu=False)
    assert np.array_equal(out, np.broadcast_to(layer.bias[:, None, None, None], out.shape))
    layer.forward(x, out, relu=True)
    assert np.array_equal(out[0], np.full((height, width, batch), 0.5, np.float32)) and np.all(out[1] == 0.0)
    back = np.full(x.shape, np.nan, np.float32)
    layer.backward_input(np.ones_like(out), np.ones_like(x), back)
    assert np.all(back == 0.0)
    assert layer.weight_grad(np.zeros(0, np.int64), np.ones_like(out), x).shape == (0, 9)
    W = layer.to_scipy()
    assert W.shape == (n_out, 9 * n_in) and W.nnz == 0
    assert np.array_equal(layer.dense_weights(), np.zeros((n_out, 9 * n_in), np.float32))


def test_maps_narrower_than_two_are_refused():
    """The conv kernels need rows of at least two pixels (width >= 2): a layer or a network that would run
    them on narrower maps is refused instead of reading out of bounds."""
    with pytest.raises(ValueError, match="width >= 2"):
        SparseConv2d(NeuronIndex(2, dense=True), NeuronIndex(3, dense=True), 3, 1)
    with pytest.raises(ValueError):
        SparseCNN((1, 2, 2), (2, 2, 2), (3,), 2)  # the third convolution would run on 1 x 1 maps
    SparseConv2d(NeuronIndex(2, dense=True), NeuronIndex(3, dense=True), 1, 2)  # the smallest allowed maps


def test_sparse_conv2d_sgd_step_updates_kernels_and_importance():
    rng = np.random.default_rng(1)
    layer, ks = conv_layer(rng, 3, 4, 4, 4, 0.7)
    connections = np.array([ks.nnz - 1, 0], np.int64)
    grad = rng.normal(size=(2, 9)).astype(np.float32)
    w0 = layer.weights.copy()
    layer.sgd_step(connections, grad, 0.1)
    lr = np.float32(0.1)
    np.testing.assert_allclose(layer.weights[connections], w0[connections] - lr * grad, rtol=1e-6)
    expected_importance = float(lr) * np.sum(grad.astype(np.float64) ** 2, axis=1)
    np.testing.assert_allclose(layer.importance[connections], expected_importance, rtol=1e-5)
    untouched = np.setdiff1d(np.arange(ks.nnz), connections)
    assert np.array_equal(layer.weights[untouched], w0[untouched])
    assert np.all(layer.importance[untouched] == 0)
    # The update is visible through W (weights is a view of the bsr data).
    dense = layer.to_scipy().toarray().reshape(4, 3, 9)
    assert np.array_equal(dense[layer.rows, layer.indices], layer.weights)


def test_conv_kernel_pairs_are_serial_and_parallel_builds():
    for pair in (kernels.conv_forward, kernels.conv_backward_input, kernels.conv_weight_grad,
                 kernels.add_bias, kernels.im2col, kernels.col2im, kernels.max_pool2,
                 kernels.max_pool2_backward, kernels.sgd_step_kernels, kernels.transpose_standardize):
        assert pair[0] is not pair[1]
        assert kernels.pick(pair, kernels.PARALLEL_MIN_WORK - 1) is pair[0]
        assert kernels.pick(pair, kernels.PARALLEL_MIN_WORK) is pair[1]
        assert pair[0].targetoptions.get("parallel", False) is False
        assert pair[1].targetoptions.get("parallel") is True



def conv_kernel_outputs(build, ks, x, delta, batch):
    """Forward (with ReLU), input gradient and weight gradient at every kernel, from one build."""
    n_out, n_in, shape = ks.n_out, ks.n_in, x.shape[1:]
    bias = np.linspace(-0.5, 0.5, n_out, dtype=np.float32)
    out = np.full((n_out,) + shape, np.nan, np.float32)
    grad_in = np.full((n_in,) + shape, np.nan, np.float32)
    grad = np.full((ks.nnz, 9), np.nan, np.float32)
    kernels.conv_forward[build](ks.indptr, ks.indices, ks.weights, bias, flat_rows(x), flat_rows(out), batch, True,
                                *kernels.NO_POOL)
    kernels.conv_backward_input[build](ks.col_ptr, ks.col_order, ks.rows, ks.weights, flat_rows(delta),
                                       flat_rows(x), flat_rows(grad_in), batch, kernels.NO_LEAVES,
                                       kernels.NO_SKIP)
    kernels.conv_weight_grad[build](np.arange(ks.nnz), ks.rows, ks.indices, flat_rows(delta), flat_rows(x), grad,
                                    batch)
    return out, grad_in, grad


@settings(max_examples=10, deadline=None)
@given(maps=st.tuples(st.integers(1, 12), st.integers(1, 12)), height=st.integers(1, 19), width=st.integers(2, 5),
       batch=st.integers(1, 9), seed=seed_st)
def test_conv_kernels_give_the_same_bits_in_both_builds_and_on_any_thread_count(maps, height, width, batch, seed):
    """The convolutions split the work into pairs of rows x groups of maps, a split that depends on the map size
    (``kernels.MIN_WORK_ITEMS``) and threads take in any order; each output is still computed by one thread in one
    order, so the serial build, the parallel one on one thread and on all threads agree bit for bit."""
    (n_out, n_in), rng = maps, np.random.default_rng(seed)
    ks = KernelSet(rng, n_out, n_in, 0.6)
    x = relu_like(rng, (n_in, height, width, batch))
    delta = rng.normal(size=(n_out, height, width, batch)).astype(np.float32)
    runs = [conv_kernel_outputs(0, ks, x, delta, batch)]
    previous = numba.get_num_threads()
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            runs.append(conv_kernel_outputs(1, ks, x, delta, batch))
    finally:
        numba.set_num_threads(previous)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert not np.isnan(b).any()
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32))

# ----- SparseCNN -----
IMAGE, CONV, HIDDEN, N_CLASSES = (2, 8, 8), (3, 4, 5, 6), (7,), 4
# Finite-difference step on float32 parameters: the loss's float32 noise / (2 EPS) stays ~1e-4 of the
# gradients, and few of the ~1000 ReLU and pooling kinks of a batch of 2 lie within one step.
EPS = 3e-3


def build_cnn(seed, batch=3, density=0.6):
    """A tiny SparseCNN (2 x 8 x 8 -> conv 3, 4, pool, conv 5, 6, pool -> 24 -> 7 -> 4) with random kernels
    and connections added by hand in a shuffled order (every output map or neuron gets at least one input),
    He-scaled weights so that the logits are O(1), small random biases, a standardized-like input, labels."""
    rng = np.random.default_rng(seed)
    model = SparseCNN(IMAGE, CONV, HIDDEN, N_CLASSES)
    for layer in model.layers:
        n_out, n_in = layer.out_index.n_slots, layer.in_index.n_slots
        mask = rng.random((n_out, n_in)) < density
        mask[np.arange(n_out), rng.integers(0, n_in, size=n_out)] = True
        rows, cols = np.nonzero(mask)
        order = rng.permutation(rows.size)
        fan_in = layer.taps * max(1.0, density * n_in)
        weights = rng.normal(size=layer.weight_shape(rows.size)) * np.sqrt(2.0 / fan_in)
        layer.add_connections(rows[order], cols[order], weights[order], owner=0)
        layer.bias[:] = rng.uniform(-0.1, 0.3, size=n_out)
    x = rng.normal(size=(model.n_features, batch)).astype(np.float32)
    labels = rng.integers(0, N_CLASSES, size=batch)
    return model, x, labels


def set_path(model, path):
    for layer in model.layers:
        if isinstance(layer, SparseConv2d):
            layer.force_path = path


def reference_forward(model, x):
    """The network in float64 from its weights alone: conv_ref + ReLU, max_pool_ref every two convolutions,
    flatten in (map, row, column) order, dense fully connected layers. Returns the inputs of every layer,
    logits last."""
    batch = x.shape[1]
    a = x.astype(np.float64).reshape(*IMAGE, batch)
    inputs = [a]
    for l, layer in enumerate(model.layers):
        last = l == len(model.layers) - 1
        if isinstance(layer, SparseConv2d):
            K = np.zeros((layer.out_index.n_slots, layer.in_index.n_slots, 9))
            K[layer.rows, layer.indices] = layer.weights
            a = conv_ref(a, K, layer.bias, relu=True)
            if l % 2 == 1:  # pool after every two convolutions
                a = max_pool_ref(a)[0]
            if not isinstance(model.layers[l + 1], SparseConv2d):
                a = a.reshape(-1, batch)
        else:
            dense = np.zeros((layer.out_index.n_slots, layer.in_index.n_slots))
            dense[layer.rows, layer.indices] = layer.weights
            a = dense @ a + layer.bias.astype(np.float64)[:, None]
            if not last:
                a = np.maximum(a, 0.0)
        inputs.append(a)
    return inputs


def test_sparse_cnn_forward_shapes_flatten_order_and_reference():
    model, x, _ = build_cnn(0, batch=3)
    assert model.n_features == 128 and model.flat_shape == (6, 2, 2)
    assert [type(layer) for layer in model.layers] == [SparseConv2d] * 4 + [SparseLinear] * 2
    assert [(layer.height, layer.width) for layer in model.layers[:4]] == [(8, 8), (8, 8), (4, 4), (4, 4)]
    for path in PATHS:
        set_path(model, path)
        acts = model.forward(x)
        assert [a.shape for a in acts] == [(2, 8, 8, 3), (3, 8, 8, 3), (4, 4, 4, 3), (5, 4, 4, 3), (24, 3),
                                           (7, 3), (4, 3)]
        assert all(a.dtype == np.float32 for a in acts)
        assert np.array_equal(acts[0], x.reshape(2, 8, 8, 3)) and np.shares_memory(acts[0], x)
        assert acts[0][1, 2, 3, 1] == x[1 * 64 + 2 * 8 + 3, 1]  # features in (channel, row, column) order
        expected = reference_forward(model, x)
        for a, e in zip(acts, expected):
            np.testing.assert_allclose(a, e.reshape(a.shape), rtol=1e-4, atol=1e-5)
        # The flattened features are the last pooled maps in (map, row, column) order.
        pooled = max_pool_ref(conv_ref(expected[3], dense_kernels(model.layers[3]), model.layers[3].bias,
                                       relu=True))[0]
        flat = acts[4]
        for m in range(6):
            for r in range(2):
                for c in range(2):
                    np.testing.assert_allclose(flat[m * 4 + r * 2 + c], pooled[m, r, c], rtol=1e-4, atol=1e-5)
        assert np.any(flat > 0), "test setup: the last maps are all dead"
    # The pooled inputs never hold a negative value (max of ReLU outputs).
    assert np.all(acts[2] >= 0) and np.all(acts[4] >= 0)


def dense_kernels(layer):
    K = np.zeros((layer.out_index.n_slots, layer.in_index.n_slots, 9))
    K[layer.rows, layer.indices] = layer.weights
    return K


def pattern(model, batch):
    """Every piecewise-linear choice of the last forward pass that reaches the loss: the ReLU signs of the
    hidden outputs that feed the next layer directly; for pooled outputs, the winners and the pooled signs."""
    outputs, argmax, _, pooled, _ = model.buffers(batch)
    choices = []
    for l in range(len(model.layers) - 1):
        if model.pooled_input[l + 1]:
            choices += [argmax[l + 1].copy(), (pooled[l + 1] > 0).copy()]
        else:
            choices.append((outputs[l] > 0).copy())
    return choices


def loss_of(model, x, labels):
    return softmax_cross_entropy(model.forward(x)[-1].astype(np.float64), labels)[0]


def central_difference(model, x, labels, array, k):
    """dL/d array[k] by central differences (restoring array[k] bit-for-bit), or None when the step changes a
    ReLU sign or a pooling winner (a kink between the two evaluations)."""
    batch = x.shape[1]
    original = array[k].copy()
    array[k] = original + np.float32(EPS)
    plus_value = float(array[k])
    loss_plus, pattern_plus = loss_of(model, x, labels), pattern(model, batch)
    array[k] = original - np.float32(EPS)
    minus_value = float(array[k])
    loss_minus, pattern_minus = loss_of(model, x, labels), pattern(model, batch)
    array[k] = original
    if not all(np.array_equal(p, q) for p, q in zip(pattern_plus, pattern_minus)):
        return None
    return (loss_plus - loss_minus) / (plus_value - minus_value)


def numeric_gradients(model, x, labels):
    """Central differences of the loss for every weight and bias: per layer (weights shaped like
    layer.weights, biases), NaN where a kink was crossed."""
    weights, biases = [], []
    for layer in model.layers:
        flat_weights = layer.weights.reshape(-1)  # a view: writes reach the layer
        assert np.shares_memory(flat_weights, layer.W.data)
        w = [central_difference(model, x, labels, flat_weights, k) for k in range(flat_weights.size)]
        b = [central_difference(model, x, labels, layer.bias, i) for i in range(layer.bias.size)]
        weights.append(np.array([np.nan if v is None else v for v in w]).reshape(layer.weights.shape))
        biases.append(np.array([np.nan if v is None else v for v in b]))
    return weights, biases


def gradient_mismatch(analytic, numeric, scale):
    """Largest |analytic - numeric| over the checked (non-NaN) entries, in units of the tolerance
    ``1e-2 |numeric| + 1e-3 scale`` (scale: the largest gradient magnitude of the layer): <= 1 passes."""
    checked = ~np.isnan(numeric)
    error = np.abs(np.asarray(analytic, np.float64)[checked] - numeric[checked])
    return float(np.max(error / (1e-2 * np.abs(numeric[checked]) + 1e-3 * scale), initial=0.0))


def layer_scale(weight_numeric, bias_numeric):
    """The largest checked finite-difference gradient of a layer (weights and biases)."""
    values = np.concatenate([weight_numeric.ravel(), bias_numeric])
    return float(np.max(np.abs(values[~np.isnan(values)]), initial=0.0))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("seed", [0, 3])
def test_sparse_cnn_gradients_match_finite_differences(path, seed):
    model, x, labels = build_cnn(seed, batch=2)
    set_path(model, path)
    weights_before = [layer.weights.copy() for layer in model.layers]
    biases_before = [layer.bias.copy() for layer in model.layers]

    loss, weight_grads, bias_grads = model.gradients(x, labels)

    assert loss == pytest.approx(loss_of(model, x, labels), rel=1e-6)
    expected_loss = softmax_cross_entropy(reference_forward(model, x)[-1], labels)[0]
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    for layer, w, b in zip(model.layers, weights_before, biases_before):
        assert np.array_equal(layer.weights, w), "gradients() changed the weights"
        assert np.array_equal(layer.bias, b), "gradients() changed the biases"
    for layer, gw, gb in zip(model.layers, weight_grads, bias_grads):
        assert gw.shape == layer.weights.shape and gw.dtype == np.float32
        assert gb.shape == (layer.out_index.n_slots,)

    numeric_w, numeric_b = numeric_gradients(model, x, labels)
    for l in range(len(model.layers)):
        n_params = numeric_w[l].size + numeric_b[l].size
        n_checked = np.count_nonzero(~np.isnan(numeric_w[l])) + np.count_nonzero(~np.isnan(numeric_b[l]))
        assert n_checked >= n_params / 3, f"test setup: layer {l}: {n_params - n_checked} steps hit a kink"
        assert np.count_nonzero(np.abs(numeric_w[l]) > 1e-3) >= 3, f"test setup: layer {l} has ~no gradient"
        scale = layer_scale(numeric_w[l], numeric_b[l])
        assert gradient_mismatch(weight_grads[l], numeric_w[l], scale) <= 1.0, f"weights of layer {l}"
        assert gradient_mismatch(bias_grads[l], numeric_b[l], scale) <= 1.0, f"biases of layer {l}"

        # The tolerance catches the classic mistakes: a kernel rotated by 180 degrees (taps reversed), a
        # transposed kernel (dy <-> dx), a sign error, gradients of the neighbouring kernel or connection.
        g = weight_grads[l]
        wrong = {"negated": -g, "rolled": np.roll(g, 1, axis=0)}
        if g.ndim == 2:
            wrong.update(flipped=g[:, ::-1], transposed=g.reshape(-1, 3, 3).transpose(0, 2, 1).reshape(-1, 9))
        checked = ~np.isnan(numeric_w[l])
        for name, w in wrong.items():
            if np.max(np.abs(w - g)[checked]) > 0.05 * scale:  # only where the mistake changes something
                assert gradient_mismatch(w, numeric_w[l], scale) > 1.0, f"{name} gradient of layer {l} passed"
        if np.max(np.abs(bias_grads[l])) > 0.05 * scale:
            assert gradient_mismatch(-bias_grads[l], numeric_b[l], scale) > 1.0, f"negated biases, layer {l}"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_cnn_sparse_and_dense_paths_agree(seed):
    model, x, labels = build_cnn(seed, batch=4)
    results = {}
    for path in PATHS:
        set_path(model, path)
        loss, weight_grads, bias_grads = model.gradients(x, labels)
        logits = model.forward(x)[-1].copy()
        results[path] = loss, logits, [g.copy() for g in weight_grads], [g.copy() for g in bias_grads]
    (loss_s, logits_s, w_s, b_s), (loss_d, logits_d, w_d, b_d) = results["sparse"], results["dense"]
    assert loss_s == pytest.approx(loss_d, rel=1e-6)
    np.testing.assert_allclose(logits_s, logits_d, rtol=1e-5, atol=1e-6 * np.max(np.abs(logits_d)))
    scale = max(np.max(np.abs(g)) for g in w_d + b_d)
    for a, b in zip(w_s + b_s, w_d + b_d):
        assert a.shape == b.shape
        assert np.max(np.abs(a - b)) <= 1e-5 * scale


@pytest.mark.parametrize("path", PATHS)
def test_sparse_cnn_gradients_with_empty_maps(path):
    """A map without kernels outputs ReLU(bias): with a negative bias it is dead, its bias gets no gradient,
    and neither do the kernels that read it."""
    model, x, labels = build_cnn(3, batch=2)
    conv1 = model.layers[1]
    conv1.remove_connections(np.flatnonzero(conv1.rows == 2))  # map 2 of conv 1 has no kernels
    conv1.bias[2] = -0.5                                        # ... and a negative bias: dead everywhere
    set_path(model, path)
    acts = model.forward(x)
    assert np.all(acts[2][2] == 0.0)
    loss, weight_grads, bias_grads = model.gradients(x, labels)
    assert bias_grads[1][2] == 0.0
    reading_dead_map = model.layers[2].indices == 2
    assert np.all(weight_grads[2][reading_dead_map] == 0.0)
    # Everything else still matches finite differences at the biases of conv 1.
    numeric = [central_difference(model, x, labels, conv1.bias, i) for i in range(conv1.bias.size)]
    numeric = np.array([np.nan if v is None else v for v in numeric])
    assert np.count_nonzero(~np.isnan(numeric)) >= 3
    assert gradient_mismatch(bias_grads[1], numeric, layer_scale(numeric, numeric)) <= 1.0


@pytest.mark.parametrize("path", PATHS)
def test_a_convolution_pools_without_keeping_its_maps(path):
    """``SparseConv2d.forward(x, None, pool=...)`` (how the network runs a convolution whose maps are pooled)
    pools the same bits as with the maps kept; without ``pool`` it refuses, since nothing would keep the result."""
    model, x, _ = build_cnn(0, batch=4)
    set_path(model, path)
    layer, maps_in = model.layers[1], model.forward(x)[1]
    kept = np.empty((layer.out_index.n_slots,) + maps_in.shape[1:], np.float32)
    pooled_shape = (layer.out_index.n_slots, maps_in.shape[1] // 2, maps_in.shape[2] // 2, 4)
    results = []
    for out in (kept, None):
        pooled, argmax = np.full(pooled_shape, np.nan, np.float32), np.full(pooled_shape, 255, np.uint8)
        assert layer.forward(maps_in, out, relu=True, pool=(pooled, argmax)) is out
        results.append((pooled, argmax))
    assert np.array_equal(results[0][0], results[1][0]) and np.array_equal(results[0][1], results[1][1])
    assert np.array_equal(results[0][0], max_pool_ref(kept)[0])
    with pytest.raises(ValueError, match="out=None needs pool"):
        layer.forward(maps_in, None, relu=True)
