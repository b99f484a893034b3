"""Numba kernels of the sparse engine.

Activations are stored neuron-major, ``(neurons, batch)`` and C-contiguous: one connection ``i <- j`` is then a
multiply-add over two contiguous rows of ``batch`` floats. A sparse layer is CSR over its output neurons
(``indptr``, ``indices``, ``weights``); ``rows`` repeats each connection's output row, and ``col_ptr``/``col_order``
list the connections grouped by input neuron (the CSC view used to go backward without write conflicts).

Every kernel has a serial and a parallel build of the same code. ``pick`` chooses one by the amount of work,
because starting threads costs more than small products (an output layer with 80 connections) take.
Each kernel writes every output element from one thread in a fixed order, so results do not depend on the number
of threads.
"""
import types

import numba
import numpy as np
from numba import prange

PARALLEL_MIN_WORK = 1 << 23  # multiply-adds below which the serial build is faster on 2 cores (benchmarks/)


def _build(func):
    """Compile ``func`` twice: serial and parallel (``prange`` runs as ``range`` in the serial build).

    The parallel build compiles a renamed twin of ``func``: Numba's on-disk cache is keyed by the function's
    qualified name, not by ``parallel=``, so one name would let the two builds overwrite each other's cache.
    """
    options = dict(fastmath=True, cache=True, nogil=True, boundscheck=False)
    twin = types.FunctionType(func.__code__, func.__globals__, func.__name__ + "_parallel", func.__defaults__,
                              func.__closure__)
    twin.__qualname__ = func.__qualname__ + "_parallel"
    return numba.njit(parallel=False, **options)(func), numba.njit(parallel=True, **options)(twin)


def pick(kernel_pair, work):
    """Return the serial build of ``kernel_pair`` for fewer than ``PARALLEL_MIN_WORK`` multiply-adds."""
    return kernel_pair[1] if work >= PARALLEL_MIN_WORK else kernel_pair[0]


def _csr_forward(active_rows, indptr, indices, weights, bias, x, out, relu):
    """``out[i] = W[i] @ x + bias[i]`` for ``i`` in ``active_rows``, then ReLU if ``relu``; other rows untouched.

    active_rows (m,), indptr (n_out + 1,), indices (nnz,), weights (nnz,), bias (n_out,), x (n_in, batch),
    out (n_out, batch).
    Four connections are added per pass over the output row, which quarters its loads and stores.
    """
    batch = x.shape[1]
    for q in prange(active_rows.shape[0]):
        i = active_rows[q]
        acc = out[i]
        b_i = bias[i]
        for b in range(batch):
            acc[b] = b_i
        k = indptr[i]
        end = indptr[i + 1]
        while k + 4 <= end:
            w0, w1, w2, w3 = weights[k], weights[k + 1], weights[k + 2], weights[k + 3]
            x0, x1, x2, x3 = x[indices[k]], x[indices[k + 1]], x[indices[k + 2]], x[indices[k + 3]]
            for b in range(batch):
                acc[b] += w0 * x0[b] + w1 * x1[b] + w2 * x2[b] + w3 * x3[b]
            k += 4
        while k < end:
            w = weights[k]
            xj = x[indices[k]]
            for b in range(batch):
                acc[b] += w * xj[b]
            k += 1
        if relu:
            for b in range(batch):
                if acc[b] < 0.0:
                    acc[b] = 0.0


def _csc_backward_input(col_ptr, col_order, rows, weights, delta, activation, out):
    """``out = (W.T @ delta) * (activation > 0)``: the loss gradient at the layer input, through its ReLU.

    col_ptr (n_in + 1,), col_order (nnz,) connection ids grouped by input neuron, rows (nnz,), weights (nnz,),
    delta (n_out, batch), activation (n_in, batch) the ReLU output of the input layer, out (n_in, batch).
    """
    batch = delta.shape[1]
    for j in prange(out.shape[0]):
        acc = out[j]
        for b in range(batch):
            acc[b] = 0.0
        p = col_ptr[j]
        end = col_ptr[j + 1]
        while p + 4 <= end:
            k0, k1, k2, k3 = col_order[p], col_order[p + 1], col_order[p + 2], col_order[p + 3]
            w0, w1, w2, w3 = weights[k0], weights[k1], weights[k2], weights[k3]
            d0, d1, d2, d3 = delta[rows[k0]], delta[rows[k1]], delta[rows[k2]], delta[rows[k3]]
            for b in range(batch):
                acc[b] += w0 * d0[b] + w1 * d1[b] + w2 * d2[b] + w3 * d3[b]
            p += 4
        while p < end:
            k = col_order[p]
            w = weights[k]
            d = delta[rows[k]]
            for b in range(batch):
                acc[b] += w * d[b]
            p += 1
        act = activation[j]
        for b in range(batch):
            if act[b] <= 0.0:
                acc[b] = 0.0


def _sampled_weight_grad(connections, rows, indices, delta, x, grad):
    """``grad[q] = delta[rows[k]] . x[indices[k]]`` for ``k = connections[q]``: dL/dW only at live connections.

    connections (m,), rows (nnz,), indices (nnz,), delta (n_out, batch), x (n_in, batch), grad (m,).
    Four connections of the same output row (the usual case: CSR order) share one pass over ``delta[row]``.
    """
    batch = x.shape[1]
    n_blocks = (connections.shape[0] + 3) // 4
    for block in prange(n_blocks):
        q = 4 * block
        end = min(q + 4, connections.shape[0])
        k0 = connections[q]
        same_row = end - q == 4
        for p in range(q + 1, end):
            same_row = same_row and rows[connections[p]] == rows[k0]
        if same_row:
            d = delta[rows[k0]]
            x0, x1 = x[indices[k0]], x[indices[connections[q + 1]]]
            x2, x3 = x[indices[connections[q + 2]]], x[indices[connections[q + 3]]]
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for b in range(batch):
                s0 += d[b] * x0[b]
                s1 += d[b] * x1[b]
                s2 += d[b] * x2[b]
                s3 += d[b] * x3[b]
            grad[q], grad[q + 1], grad[q + 2], grad[q + 3] = s0, s1, s2, s3
        else:
            for p in range(q, end):
                k = connections[p]
                d = delta[rows[k]]
                xj = x[indices[k]]
                s = np.float32(0.0)
                for b in range(batch):
                    s += d[b] * xj[b]
                grad[p] = s


def _sgd_step_with_importance(connections, grad, lr, weights, importance):
    """Plain SGD on ``weights[connections]`` and the paper's Eq. 3 importance in the same pass.

    With ``dW = -lr * g`` the loss change of Eq. 2 is ``I = g * dW``, so ``|I| = lr * g**2`` is added to
    ``importance`` (Omega). connections (m,), grad (m,), weights (nnz,), importance (nnz,).
    """
    for q in prange(connections.shape[0]):
        k = connections[q]
        step = lr * grad[q]
        importance[k] += abs(step * grad[q])
        weights[k] -= step


def _transpose_lookup(rows, lut, out):
    """``out[f, b] = lut[rows[b, f]]``: a uint8 batch to float32 through a 256-entry table, transposed.

    rows (batch, n_features) uint8, lut (256,) float32, out (n_features, batch) float32. Works on 32 x 32 tiles
    so that reads and writes both stay in cache; threads split the features.
    """
    batch, n_features = rows.shape
    tile = 32
    for t in prange((n_features + tile - 1) // tile):
        f0 = t * tile
        f1 = min(f0 + tile, n_features)
        for b0 in range(0, batch, tile):
            for b in range(b0, min(b0 + tile, batch)):
                row = rows[b]
                for f in range(f0, f1):
                    out[f, b] = lut[row[f]]


csr_forward = _build(_csr_forward)
csc_backward_input = _build(_csc_backward_input)
sampled_weight_grad = _build(_sampled_weight_grad)
sgd_step_with_importance = _build(_sgd_step_with_importance)
transpose_lookup = _build(_transpose_lookup)


def segment_sum(values, segment_ids, n_segments):
    """Sum of ``values`` per segment id: ``out[s] = values[segment_ids == s].sum()``. Returns (n_segments,) float64."""
    return np.bincount(segment_ids, weights=values, minlength=n_segments).astype(np.float64, copy=False)
