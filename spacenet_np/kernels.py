"""Numba kernels of the sparse engine.

Activations are stored neuron-major, ``(neurons, batch)`` and C-contiguous: one connection ``i <- j`` is then a
multiply-add over two contiguous rows of ``batch`` floats. A sparse layer is CSR over its output neurons
(``indptr``, ``indices``, ``weights``); ``rows`` repeats each connection's output row, and ``col_ptr``/``col_order``
list the connections grouped by input neuron (the CSC view used to go backward without write conflicts).

Every kernel has a serial and a parallel build of the same code. ``pick`` chooses one by the amount of work,
because starting threads costs more than small products (an output layer with 80 connections) take, and by the
threads Numba may use.
Each kernel writes every output element from one thread in a fixed order, so results do not depend on the number
of threads.

``mlp_train_step`` is a whole SGD step of a ``SparseMLP`` in one call (forward, softmax cross-entropy, then per
layer the input gradient, dL/dW, SGD with Omega and the bias step), built from the kernels above; its loss and bias
steps are compiled without fastmath to reproduce NumPy's float32 roundings and summation order.

Kernels are compiled on first use and cached on disk (``cache=True``). ``numba_cache.configure`` picks the cache
folder before numba is imported: ``$NUMBA_CACHE_DIR`` if set, else the package's ``__pycache__``, else a user or
temporary folder, so that a read-only installation imports; with no writable folder at all caching is off
(``CACHE``), with one warning. A process whose kernels are all in the cache loads them without Numba's compiler
set-up (``numba_cache.load_without_registries``, applied to every kernel at the end of this module).

Allocation and growth inside a task's block of positions, without materializing the block:

A layer's block is ``rows x cols`` (sorted slot arrays: the task's target neurons and its selected inputs); its
position ``p = i * cols.size + j`` is the connection ``rows[i] <- cols[j]``. With every neuron selected, the CNN's
4096 -> 512 layer has a block of 2M positions while a rewire moves a few ten thousand connections, so these cost
O(connections in the block + positions considered) time and memory, never O(block):

- ``occupied_positions``: the block's connections, as sorted positions, read from the layer's CSR;
- ``free_positions``: the empty positions of given ranks (allocation draws ranks among the empty positions);
- ``top_positions``: the empty positions of largest ``a_out[i] * a_in[j]`` (Eq. 5), walked in decreasing order.

Output buffers are allocated by NumPy (so ``tracemalloc`` sees them), the kernels allocate nothing.
"""
import types

from . import numba_cache

CACHE = numba_cache.configure()  # before numba is imported: Numba reads NUMBA_CACHE_DIR once, at import

import numba  # noqa: E402
import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import prange  # noqa: E402
from numba.core.compiler import Compiler  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

_U = np.uint64  # unsigned indices: Numba adds no negative-index fix, which would stop vectorization
_U1, _U2, _U3, _U4 = _U(1), _U(2), _U(3), _U(4)  # (Numba types uint64 + int as float64)
PARALLEL_MIN_WORK = 1 << 23  # multiply-adds below which the serial build is faster on 2 cores (benchmarks/)
# What one element of a kernel that only moves or compares values (SGD steps, pooling, pixel lookups, bias adds)
# counts as in ``pick``: their parallel builds win from 4K-131K elements on 2 cores, depending on the kernel
# (benchmarks/memory_kernels.py); from PARALLEL_MIN_WORK / ELEMENT_WORK = 131,072 elements on, they always do.
ELEMENT_WORK = 64


@intrinsic
def _float_bits(typingctx, value):
    """The int32 whose bits are those of the float32 ``value`` (an LLVM bitcast: no instruction). Used instead of
    an int32 view of the array, whose implementation is a Numba function that brings ``numba.np.arrayobj`` into
    every process loading the kernel from the cache (about 40 ms)."""
    if value == numba.float32:
        return numba.int32(value), lambda context, builder, signature, args: builder.bitcast(args[0], ir.IntType(32))


@intrinsic
def _bits_float(typingctx, bits):
    """The float32 whose bits are the int32 ``bits`` (an LLVM bitcast)."""
    if bits == numba.int32:
        return numba.float32(bits), lambda context, builder, signature, args: builder.bitcast(args[0], ir.FloatType())


# ReLU and its mask, on float32 bits. The float forms (``if v < 0: v = 0``, ``max(v, 0)``) do not vectorize in these
# loops (Numba lowers them with a branch): a ReLU pass took 5-8x an add's time. The same choices made by integer
# operations on the bits vectorize, and give the same bits (-0.0 and NaN included; tests/test_kernels.py).
@numba.njit(cache=CACHE, nogil=True, inline="always")
def _relu(v):
    """``0.0 if v < 0 else v`` for a float32, bit for bit."""
    t = _float_bits(v)
    below = (t & 0x7FFFFFFF) - 1  # -1 for +-0.0, >= 0x7F800000 for NaN
    negative = (t >> 31) & (((below - 0x7F800000) & ~below) >> 31)  # -1 where v < 0, else 0
    return _bits_float(np.int32(t & ~negative))


@numba.njit(cache=CACHE, nogil=True, inline="always")
def _masked(g, a):
    """``0.0 if a <= 0 else g`` for float32 g and a, bit for bit."""
    a_bits = _float_bits(a)
    magnitude = a_bits & 0x7FFFFFFF
    at_most_zero = ((magnitude - 1) >> 31) | ((a_bits >> 31) & ((magnitude - 0x7F800001) >> 31))  # -1 or 0
    return _bits_float(np.int32(_float_bits(g) & ~at_most_zero))


# fastmath without reassociation, for kernels whose sums run across the products of one pass, not along the vector
# loop: each sum keeps its written order in the vectorized loop and in its scalar remainder alike, so the serial and
# parallel builds agree on every CPU target (with reassociation, LLVM's generic x86 target gave 1-ulp differences
# between them at batches of 4-7 samples, where one build ran the loop vectorized and the other scalar).
IN_ORDER = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}


class NoAliasCompiler(Compiler):
    """Numba's compiler with every pointer argument marked ``noalias`` (a ``Flags`` option that ``njit`` does not
    expose): LLVM then vectorizes a loop that writes one array while reading others without first checking, at
    every loop entry, that they do not overlap. Same machine arithmetic, so the same bits: 1.13-1.19x for
    ``csr_forward`` and 1.07-1.13x for ``csc_backward_input`` at split MNIST's shapes, 1.10x for
    ``transpose_lookup`` (Zen 3, one thread). Only for kernels whose written arrays never overlap the arrays they
    read; their Python callers check it (``check_no_overlap``)."""

    def __init__(self, typingctx, targetctx, library, args, return_type, flags, locals):
        flags = flags.copy()
        flags.noalias = True
        super().__init__(typingctx, targetctx, library, args, return_type, flags, locals)


def check_no_overlap(written, *read):
    """ValueError if the array ``written`` may share memory with one of ``read``: the no-alias kernels'
    precondition."""
    if any(np.may_share_memory(written, array) for array in read):
        raise ValueError("an output array overlaps an input array of the same kernel call: pass separate arrays")


def _build(func, fastmath=True, noalias=False):
    """Compile ``func`` twice: serial and parallel (``prange`` runs as ``range`` in the serial build).

    The parallel build compiles a renamed twin of ``func``: Numba's on-disk cache is keyed by the function's
    qualified name, not by ``parallel=``, so one name would let the two builds overwrite each other's cache.
    ``fastmath``: True (every flag) or a set of LLVM fast-math flags (``IN_ORDER``). ``noalias``: the serial build
    is compiled by ``NoAliasCompiler``. Not the parallel build: Numba compiles its loop body as a separate
    function and marks that one ``noalias`` itself where its own analysis finds that the arrays it gets do not
    alias (views of one array, say), while the flag set here would be carried over to it even where they do.
    """
    options = dict(fastmath=fastmath, cache=CACHE, nogil=True, boundscheck=False)
    twin = types.FunctionType(func.__code__, func.__globals__, func.__name__ + "_parallel", func.__defaults__,
                              func.__closure__)
    twin.__qualname__ = func.__qualname__ + "_parallel"
    serial_options = dict(options, pipeline_class=NoAliasCompiler) if noalias else options
    return numba.njit(parallel=False, **serial_options)(func), numba.njit(parallel=True, **options)(twin)


def pick(kernel_pair, work):
    """The serial build of ``kernel_pair`` for fewer than ``PARALLEL_MIN_WORK`` multiply-adds (``ELEMENT_WORK`` per
    element for a kernel that only moves values: ``pick_by_elements``) or where Numba runs one thread
    (``NUMBA_NUM_THREADS=1``, ``numba.set_num_threads(1)`` as sweep workers do; the two builds give the same bits),
    else the parallel build."""
    if work < PARALLEL_MIN_WORK or numba.config.NUMBA_NUM_THREADS == 1 or numba.get_num_threads() == 1:
        return kernel_pair[0]
    return kernel_pair[1]


def pick_by_elements(kernel_pair, n_elements):
    """``pick`` for a kernel that only moves or compares values, by the number of elements it touches."""
    return pick(kernel_pair, n_elements * ELEMENT_WORK)


def _csr_forward(active_rows, indptr, indices, weights, bias, x, out, relu):
    """``out[i] = W[i] @ x + bias[i]`` for ``i`` in ``active_rows``, then ReLU if ``relu``; other rows untouched.

    active_rows (m,), indptr (n_out + 1,), indices (nnz,), weights (nnz,), bias (n_out,), x (n_in, batch),
    out (n_out, batch).
    Four connections are added per pass over the output row, which quarters its loads and stores. Rows and
    connection positions are indexed with unsigned integers (``_U``), rows not taken as row views: no
    negative-index fix, no view per connection (rows: 1.15-1.2x on two threads at the CNN's 4096 -> 512 layer,
    1.0-1.1x serial at split MNIST's; positions: 1.08-1.2x serial there).
    """
    batch = _U(x.shape[1])
    for q in prange(active_rows.shape[0]):
        i = _U(active_rows[q])
        b_i = bias[i]
        for b in range(batch):
            out[i, b] = b_i
        k = _U(indptr[i])
        end = _U(indptr[i + _U1])
        while k + _U4 <= end:
            w0, w1, w2, w3 = weights[k], weights[k + _U1], weights[k + _U2], weights[k + _U3]
            j0, j1, j2, j3 = _U(indices[k]), _U(indices[k + _U1]), _U(indices[k + _U2]), _U(indices[k + _U3])
            for b in range(batch):
                out[i, b] += w0 * x[j0, b] + w1 * x[j1, b] + w2 * x[j2, b] + w3 * x[j3, b]
            k += _U4
        while k < end:
            w = weights[k]
            j = _U(indices[k])
            for b in range(batch):
                out[i, b] += w * x[j, b]
            k += _U1
        if relu:
            for b in range(batch):
                out[i, b] = _relu(out[i, b])


def _csc_backward_input(col_ptr, col_order, rows, weights, delta, activation, out):
    """``out = (W.T @ delta) * (activation > 0)``: the loss gradient at the layer input, through its ReLU.

    col_ptr (n_in + 1,), col_order (nnz,) connection ids grouped by input neuron, rows (nnz,), weights (nnz,),
    delta (n_out, batch), activation (n_in, batch) the ReLU output of the input layer, out (n_in, batch).
    A row starts from its first connections' products (no pass writing zeros first); an input with no
    connection gets zeros and no ReLU pass. Rows and positions are indexed as in ``_csr_forward``.
    """
    batch = _U(delta.shape[1])
    for q in prange(out.shape[0]):
        j = _U(q)
        p = _U(col_ptr[j])
        end = _U(col_ptr[j + _U1])
        if p == end:
            for b in range(batch):
                out[j, b] = 0.0
            continue
        if p + _U4 <= end:
            k0, k1, k2, k3 = _U(col_order[p]), _U(col_order[p + _U1]), _U(col_order[p + _U2]), _U(col_order[p + _U3])
            w0, w1, w2, w3 = weights[k0], weights[k1], weights[k2], weights[k3]
            i0, i1, i2, i3 = _U(rows[k0]), _U(rows[k1]), _U(rows[k2]), _U(rows[k3])
            for b in range(batch):
                out[j, b] = w0 * delta[i0, b] + w1 * delta[i1, b] + w2 * delta[i2, b] + w3 * delta[i3, b]
            p += _U4
        else:
            k = _U(col_order[p])
            w = weights[k]
            i = _U(rows[k])
            for b in range(batch):
                out[j, b] = w * delta[i, b]
            p += _U1
        while p + _U4 <= end:
            k0, k1, k2, k3 = _U(col_order[p]), _U(col_order[p + _U1]), _U(col_order[p + _U2]), _U(col_order[p + _U3])
            w0, w1, w2, w3 = weights[k0], weights[k1], weights[k2], weights[k3]
            i0, i1, i2, i3 = _U(rows[k0]), _U(rows[k1]), _U(rows[k2]), _U(rows[k3])
            for b in range(batch):
                out[j, b] += w0 * delta[i0, b] + w1 * delta[i1, b] + w2 * delta[i2, b] + w3 * delta[i3, b]
            p += _U4
        while p < end:
            k = _U(col_order[p])
            w = weights[k]
            i = _U(rows[k])
            for b in range(batch):
                out[j, b] += w * delta[i, b]
            p += _U1
        for b in range(batch):
            out[j, b] = _masked(out[j, b], activation[j, b])


def _sampled_weight_grad(connections, rows, indices, delta, x, grad):
    """``grad[q] = delta[rows[k]] . x[indices[k]]`` for ``k = connections[q]``: dL/dW only at live connections.

    connections (m,), rows (nnz,), indices (nnz,), delta (n_out, batch), x (n_in, batch), grad (m,).
    Four connections of the same output row (the usual case: CSR order) share one pass over ``delta[row]``.
    Rows and positions are indexed as in ``_csr_forward``.
    """
    batch = _U(x.shape[1])
    n_blocks = (connections.shape[0] + 3) // 4
    for block in prange(n_blocks):
        q = _U4 * _U(block)
        end = min(q + _U4, _U(connections.shape[0]))
        k0 = _U(connections[q])
        same_row = end - q == _U4
        for p in range(q + _U1, end):
            same_row = same_row and rows[_U(connections[p])] == rows[k0]
        if same_row:
            i = _U(rows[k0])
            j0, j1 = _U(indices[k0]), _U(indices[_U(connections[q + _U1])])
            j2, j3 = _U(indices[_U(connections[q + _U2])]), _U(indices[_U(connections[q + _U3])])
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for b in range(batch):
                d = delta[i, b]
                s0 += d * x[j0, b]
                s1 += d * x[j1, b]
                s2 += d * x[j2, b]
                s3 += d * x[j3, b]
            grad[q], grad[q + _U1], grad[q + _U2], grad[q + _U3] = s0, s1, s2, s3
        else:
            for p in range(q, end):
                k = _U(connections[p])
                i, j = _U(rows[k]), _U(indices[k])
                s = np.float32(0.0)
                for b in range(batch):
                    s += delta[i, b] * x[j, b]
                grad[p] = s


def _gather(values, order, out):
    """``out[p] = values[order[p]]``. values (n,), order (m,) ints in [0, n), out (m,)."""
    for p in prange(order.shape[0]):
        out[p] = values[order[p]]


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


@numba.njit(cache=CACHE, nogil=True)
def ids_in_range(sample_ids, n):
    """Whether every id is in ``[0, n)``: checked before samples are gathered (``standardize_batch``)."""
    for b in range(sample_ids.shape[0]):
        if sample_ids[b] < 0 or sample_ids[b] >= n:
            return False
    return True


def _transpose_lookup(images, sample_ids, lut, out):
    """``out[f, b] = lut[images[sample_ids[b], f]]``: a uint8 batch gathered, to float32 through a 256-entry
    table, transposed. Returns False, writing nothing, if an id is outside ``[0, n)``.

    images (n, n_features) uint8, sample_ids (batch,) int, lut (256,) float32, out (n_features, batch) float32.
    Eight samples per pass over the features: each output row gets eight adjacent values at a time (at batch 512
    1.7x faster than four, which was 2.2x faster than 32 x 32 tiles at batch 128); threads split the samples.
    """
    if not ids_in_range(sample_ids, images.shape[0]):
        return False
    batch, n_features = sample_ids.shape[0], images.shape[1]
    octets = batch // 8
    for q in prange(octets):
        b = 8 * q
        r0, r1 = images[sample_ids[b]], images[sample_ids[b + 1]]
        r2, r3 = images[sample_ids[b + 2]], images[sample_ids[b + 3]]
        r4, r5 = images[sample_ids[b + 4]], images[sample_ids[b + 5]]
        r6, r7 = images[sample_ids[b + 6]], images[sample_ids[b + 7]]
        for f in range(n_features):
            o = out[f]
            o[b] = lut[r0[f]]
            o[b + 1] = lut[r1[f]]
            o[b + 2] = lut[r2[f]]
            o[b + 3] = lut[r3[f]]
            o[b + 4] = lut[r4[f]]
            o[b + 5] = lut[r5[f]]
            o[b + 6] = lut[r6[f]]
            o[b + 7] = lut[r7[f]]
    for b in range(8 * octets, batch):
        r = images[sample_ids[b]]
        for f in range(n_features):
            out[f, b] = lut[r[f]]
    return True


csr_forward = _build(_csr_forward, IN_ORDER, noalias=True)
csc_backward_input = _build(_csc_backward_input, IN_ORDER, noalias=True)
sampled_weight_grad = _build(_sampled_weight_grad)
sgd_step_with_importance = _build(_sgd_step_with_importance)
gather = _build(_gather)
transpose_lookup = _build(_transpose_lookup, noalias=True)


# ----- the fused training step of a SparseMLP -----
# One call per batch: forward, softmax cross-entropy, then per layer (top first) the input gradient, dL/dW at the
# trainable connections, SGD with Omega and the bias step, in the order of ``Learner.train_step``. The sparse
# products call the serial builds of the kernels above (``fused_step_is_serial``), so they give the same bits as
# the per-layer path. They must be those very kernels: a fastmath dot product's summation order is the compiler's
# choice for the CPU, so a differently written kernel for the same sums (dL/dW taken input by input, in an earlier
# version) gave the same bits on one CPU (Zen 4) and not on another (Zen 3). The loss and the bias step are compiled
# without fastmath and reproduce NumPy's float32 operations and summation order; only ``exp`` and ``log`` (libm's
# here, NumPy's own SIMD versions there) can differ in the last bit.
# No fastmath: NumPy's roundings, operation by operation. Said explicitly: a function that does not set fastmath
# inherits its caller's, so the block sums of a fastmath convolution kernel would be reassociated.
_EXACT = dict(cache=CACHE, nogil=True, boundscheck=False, fastmath=False)
_csr_forward_serial = csr_forward[0]
_csc_backward_input_serial = csc_backward_input[0]
_sampled_weight_grad_serial = sampled_weight_grad[0]
_sgd_step_serial = sgd_step_with_importance[0]


@numba.njit(**_EXACT)
def _pairwise_block(a, start, n):
    """NumPy's float32 sum of ``a[start:start + n]``, n <= 128: below 8 values in order, else eight interleaved
    accumulators combined as a tree, then the rest in order. (Unsigned offsets: about 2x faster than signed ones,
    whose negative-index fix comes with every load.)"""
    first, end = _U(start), _U(start) + _U(n)
    if n < 8:
        res = np.float32(0.0)
        for i in range(first, end):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[first], a[first + _U(1)], a[first + _U(2)], a[first + _U(3)]
    r4, r5, r6, r7 = a[first + _U(4)], a[first + _U(5)], a[first + _U(6)], a[first + _U(7)]
    whole = end - _U(n % 8)
    for p in range(first + _U(8), whole, _U(8)):
        r0 += a[p]
        r1 += a[p + _U(1)]
        r2 += a[p + _U(2)]
        r3 += a[p + _U(3)]
        r4 += a[p + _U(4)]
        r5 += a[p + _U(5)]
        r6 += a[p + _U(6)]
        r7 += a[p + _U(7)]
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for p in range(whole, end):
        res += a[p]
    return res


@numba.njit(**_EXACT)
def pairwise_sum(a, start, n, work):
    """``a[start:start + n].sum()`` for float32 ``a`` (1-d), bit for bit as NumPy sums a contiguous float32 run.

    Up to 128 values: ``_pairwise_block``. Above, NumPy sums the two halves (the first a multiple of 8 long)
    recursively and adds them. Numba cannot load a cached caller of a recursive function, so the leaves are
    summed here from left to right, each found by walking down from the root (``rights``: the depths where the
    walk went right), and folded into its left siblings on the way back up; a left sibling's sum waits in
    work[its depth]. work: float32 scratch of at least log2(n) values (n always suffice), not used up to 128
    values. The caller adds the result to 0, as NumPy's reduction does.
    """
    if n <= 128:
        return _pairwise_block(a, start, n)
    p, total = 0, np.float32(0.0)
    while p < n:
        offset, size, depth, rights = 0, n, 0, 0
        while size > 128:
            half = size // 2 - size // 2 % 8
            if p < offset + half:
                size = half
            else:
                offset, size, rights = offset + half, size - half, rights | 1 << depth
            depth += 1
        total = _pairwise_block(a, start + offset, size)
        while depth > 0:
            depth -= 1
            if not rights >> depth & 1:
                work[depth] = total
                break
            total = work[depth] + total
        p = offset + size
    return total


@numba.njit(**_EXACT)
def softmax_cross_entropy(logits, labels, masked, classes, delta, sum_exp, losses):
    """Mean softmax cross-entropy of ``logits`` and its gradient, as ``network.softmax_cross_entropy`` computes them.

    logits (n_classes, batch) float32, labels (batch,) int; with ``masked`` only the classes where ``classes``
    (n_classes,) bool is True are in the softmax (the others' logits count as -inf: exp 0, gradient exactly 0).
    Writes dL/dlogits of the batch mean into delta (n_classes, batch) float32; sum_exp and losses (batch,) float32
    are scratch. Returns the loss (float32).
    """
    n_classes, batch = logits.shape
    column_max = losses
    for b in range(batch):
        column_max[b] = -np.inf
        sum_exp[b] = 0.0
    for c in range(n_classes):
        if masked and not classes[c]:
            continue
        row = logits[c]
        for b in range(batch):
            if row[b] > column_max[b] or row[b] != row[b]:  # NaN propagates, as in np.max
                column_max[b] = row[b]
    for c in range(n_classes):
        row, out = logits[c], delta[c]
        for b in range(batch):
            e = np.float32(0.0) if masked and not classes[c] else np.exp(row[b] - column_max[b])
            out[b] = e
            sum_exp[b] += e
    for b in range(batch):
        label = labels[b]
        losses[b] = np.log(sum_exp[b]) - (logits[label, b] - column_max[b])
    fbatch = np.float32(batch)
    for c in range(n_classes):
        out = delta[c]
        for b in range(batch):
            d = out[b] / sum_exp[b]
            if labels[b] == c:
                d -= np.float32(1.0)
            out[b] = d / fbatch
    return (np.float32(0.0) + pairwise_sum(losses, 0, batch, sum_exp)) / fbatch


@numba.njit(**_EXACT)
def bias_step(delta, lr, mask, bias, work, rows):
    """``bias -= lr * delta.sum(axis=1) * mask`` in float32 on the rows of ``rows`` where ``mask`` is not 0 (the
    others stay exactly as they are, and are not summed), each row summed as NumPy does (``pairwise_sum``).

    delta (n_out, batch) float32, lr float32, mask and bias (n_out,) float32, work (batch,) float32 scratch, rows
    (k,) int64: every row, or only those whose delta may be nonzero (``mlp_train_step``).
    """
    for r in range(rows.shape[0]):
        i = rows[r]
        if mask[i] == 0:
            continue
        grad = np.float32(0.0) + pairwise_sum(delta[i], 0, delta.shape[1], work)
        bias[i] -= lr * grad * mask[i]


@numba.njit(**_EXACT)
def copy_cached_rows(cached_rows, cached_values, sample_ids, out, record):
    """``out[cached_rows[q], b] = cached_values[sample_ids[b], q]``, or the other way with ``record``.
    cached_rows (r,), cached_values (n, r), sample_ids (batch,), out (slots, batch)."""
    for q in range(cached_rows.shape[0]):
        row = out[cached_rows[q]]
        for b in range(sample_ids.shape[0]):
            if record:
                cached_values[sample_ids[b], q] = row[b]
            else:
                row[b] = cached_values[sample_ids[b], q]


@numba.njit(**_EXACT)
def mlp_train_step(layers, activations, deltas, grads, labels, masked, classes, lr, sum_exp, losses, sample_ids,
                   record):
    """One SGD step of a ``SparseMLP`` on a batch, as ``Learner.train_step`` does it. Returns the loss (float32).

    ``layers[l]``: (compute_rows, indptr, indices, weights, bias, rows, col_ptr, col_order, importance,
    connections, bias_mask, cached_rows, cached_values, bias_rows) of layer l: the rows to
    compute (the active rows, or ``FrozenOutputs.compute_rows``), the arrays of ``SparseLinear`` (the CSR over output
    slots, its CSC view restricted to active rows, Omega), the trainable connection ids (m_l,) int64, the bias mask
    (out slots,) float32, the rows whose outputs are copied, (r_l,) int64, from cached_values (n, r_l) float32 at
    ``sample_ids`` (batch,) int64, or with ``record`` (then every row is among the compute rows) into it after
    they are computed (``FrozenOutputs``; without it r_l = 0 and (0, 0) arrays), and the rows whose bias step
    is computed (k,) int64: every row, or with lr > 0 finite only the rows whose delta can be nonzero (below the
    top layer, those that an active connection of the next layer reads: the input gradient writes exact zeros for
    the others, and ``bias - lr * 0.0`` is ``bias``, bit for bit; ``SparseMLP.bias_step_rows``).
    activations[0] (n_features, batch) is the input, activations[l + 1] (slots, batch) layer l's output (ReLU
    for hidden layers; only active rows are written); deltas[l] (slots, batch) receives the gradient at
    activations[l] (l >= 1; deltas[-1] the logits'); grads[l] (m_l,) float32 receives dL/dW. labels, masked,
    classes: see ``softmax_cross_entropy``; lr (rounded to float32, as NumPy rounds a Python float against
    float32 arrays); sum_exp, losses (batch,) float32 scratch.

    Forward (cached rows copied, the others computed), the loss, then from the top layer down: the gradient at
    the layer's input (through the ReLU below) before the layer changes, dL/dW at its trainable connections, SGD
    with Omega (Eq. 3) and the bias step. It runs the serial builds only (``fused_step_is_serial`` says where
    that is what ``pick`` chooses): a cached kernel that calls a parallel one can crash when it is loaded from
    Numba's cache (numba issue 8578; seen here with a second network depth).
    """
    n = len(layers)
    lr32 = np.float32(lr)
    for l in range(n):
        compute_rows, indptr, indices, weights, bias = layers[l][:5]
        if not record:
            copy_cached_rows(layers[l][11], layers[l][12], sample_ids, activations[l + 1], False)
        _csr_forward_serial(compute_rows, indptr, indices, weights, bias, activations[l], activations[l + 1],
                            l < n - 1)
        if record:
            copy_cached_rows(layers[l][11], layers[l][12], sample_ids, activations[l + 1], True)
    loss = softmax_cross_entropy(activations[n], labels, masked, classes, deltas[n], sum_exp, losses)
    for l in range(n - 1, -1, -1):
        _, _, indices, weights, bias, rows, col_ptr, col_order, importance, connections, bias_mask = layers[l][:11]
        bias_rows = layers[l][13]
        delta, x = deltas[l + 1], activations[l]
        if l > 0:
            _csc_backward_input_serial(col_ptr, col_order, rows, weights, delta, x, deltas[l])
        _sampled_weight_grad_serial(connections, rows, indices, delta, x, grads[l])
        _sgd_step_serial(connections, grads[l], lr32, weights, importance)
        bias_step(delta, lr32, bias_mask, bias, sum_exp, bias_rows)
    return loss


_transpose_lookup_serial = transpose_lookup[0]


@numba.njit(**_EXACT)
def mlp_train_batches(layers, activations, deltas, grads, images, order, lut, labels, batch_labels, masked, classes,
                      lr, sum_exp, losses, record, loss_limit, batch_losses):
    """``mlp_train_step`` on consecutive batches of ``order`` in one call: what ``Learner.train_epoch`` does per
    batch, without a Python round trip per batch. Returns the number of batches trained.

    Batch t is the samples ``order[t * batch:(t + 1) * batch]`` (batch = activations[0].shape[1]) for t below
    batch_losses.shape[0]: gathered from images (n, n_features) uint8 through lut (256,) float32 into
    activations[0] (``_transpose_lookup``), their labels (n,) into batch_labels (batch,), then one step with the
    other arguments as ``mlp_train_step`` takes them (the batch's ids are its ``sample_ids``). batch_losses[t]
    receives the loss; the batches stop after the first loss outside ``(-inf, loss_limit]``. Returns -1, training
    nothing, if an id of ``order`` is outside ``[0, n)``.
    """
    batch = activations[0].shape[1]
    if not ids_in_range(order[:batch_losses.shape[0] * batch], images.shape[0]):
        return -1
    for t in range(batch_losses.shape[0]):
        ids = order[t * batch:(t + 1) * batch]
        _transpose_lookup_serial(images, ids, lut, activations[0])
        for b in range(batch):
            batch_labels[b] = labels[ids[b]]
        loss = mlp_train_step(layers, activations, deltas, grads, batch_labels, masked, classes, lr, sum_exp, losses,
                              ids, record)
        batch_losses[t] = loss
        if not -np.inf < loss <= loss_limit:
            return t + 1
    return batch_losses.shape[0]


def fused_step_is_serial(layer_connections, trainable_connections, batch):
    """Whether every product of ``mlp_train_step`` on a batch is below ``PARALLEL_MIN_WORK``, which is where the
    per-layer path runs the serial builds too. ``layer_connections``, ``trainable_connections``: per layer."""
    return all(max(m, t) * batch < PARALLEL_MIN_WORK and t * ELEMENT_WORK < PARALLEL_MIN_WORK
               for m, t in zip(layer_connections, trainable_connections))


def group_by_input(kept, indices, n_in):
    """The CSC view of the connections ``kept`` (m,) int64: ``kept`` grouped by input slot ``indices[kept]``,
    in their order within a group (what ``kept[np.argsort(indices[kept], kind="stable")]`` gives), by a counting
    sort in O(m + n_in). Returns (col_ptr (n_in + 1,) int64, col_order (m,) int64)."""
    col_ptr = np.zeros(n_in + 1, np.int64)
    col_order = np.empty(kept.shape[0], np.int64)
    _group_by_input(kept, indices, col_ptr, np.empty(n_in, np.int64), col_order)
    return col_ptr, col_order


@numba.njit(cache=CACHE, nogil=True)
def _group_by_input(kept, indices, col_ptr, cursor, col_order):
    """Count per input slot, prefix-sum into ``col_ptr``, then place each connection at its group's cursor."""
    for q in range(kept.shape[0]):
        col_ptr[indices[kept[q]] + 1] += 1
    for j in range(cursor.shape[0]):
        col_ptr[j + 1] += col_ptr[j]
        cursor[j] = col_ptr[j]
    for q in range(kept.shape[0]):
        j = indices[kept[q]]
        col_order[cursor[j]] = kept[q]
        cursor[j] += 1


def segment_sum(values, segment_ids, n_segments):
    """Sum of ``values`` per segment id: ``out[s] = values[segment_ids == s].sum()``. Returns (n_segments,) float64."""
    return np.bincount(segment_ids, weights=values, minlength=n_segments).astype(np.float64, copy=False)


# ----- convolution (3 x 3, stride 1, zero padding 1) -----
# Feature maps are stored (channels, height, width, batch), C-contiguous: every pixel of a map is a contiguous row
# of ``batch`` floats and a map row is a contiguous (width * batch,) vector: a kernel row is three shifted
# multiply-adds over whole map rows, and flattening the last maps for the fully connected layers is a free
# reshape. A kernel's nine weights are stored row-major over (dy, dx) in {-1, 0, 1}^2.


_FAST = dict(cache=CACHE, fastmath=True, nogil=True, boundscheck=False)


@numba.njit(**_FAST)
def _oriented(w, flip):
    """A kernel's nine weights w (9,) in tap order, or rotated by 180 degrees with ``flip`` (the transposed
    convolution). Returns a 9-tuple of float32."""
    if flip:
        return w[8], w[7], w[6], w[5], w[4], w[3], w[2], w[1], w[0]
    return w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8]


@numba.njit(**_FAST)
def _taps2(out, a0, a1, x, r0, r1, r2, r3, left, right, lo, hi,
           w0, w1, w2, w3, w4, w5, w6, w7, w8, e0, e1, e2, g0, g1, g2):
    """Two output rows at once, over the flattened positions j in [lo, hi):
    ``out[a0 + j] += w . (row r0, r1, r2 at j - left, j, j + right)`` and
    ``out[a1 + j] += (e, w3..w5, g) . (row r1, r2, r3 at the same shifts)``.

    out and x are flat float32 arrays; a0/a1/r0-r3 are the offsets (uint64) of map rows of ``width * batch``
    floats. ``left``/``right`` are ``batch`` (one pixel) inside a row and 0 where the dx = -1 or +1 tap falls into
    the padding (its weight is then 0 and it reads the centre pixel). The middle rows' loads are shared.
    """
    for j in range(lo, hi):
        jl = j - left
        jr = j + right
        u1, v1, s1 = x[r1 + jl], x[r1 + j], x[r1 + jr]
        u2, v2, s2 = x[r2 + jl], x[r2 + j], x[r2 + jr]
        out[a0 + j] += (w0 * x[r0 + jl] + w1 * x[r0 + j] + w2 * x[r0 + jr] + w3 * u1 + w4 * v1 + w5 * s1
                        + w6 * u2 + w7 * v2 + w8 * s2)
        out[a1 + j] += (e0 * u1 + e1 * v1 + e2 * s1 + w3 * u2 + w4 * v2 + w5 * s2
                        + g0 * x[r3 + jl] + g1 * x[r3 + j] + g2 * x[r3 + jr])


@numba.njit(**_FAST)
def _taps2_inside(out, a0, a1, x, r0, r1, r2, r3, left, right, lo, hi, w0, w1, w2, w3, w4, w5, w6, w7, w8):
    """``_taps2`` for rows r0-r3 all inside the map, where both output rows take the same nine weights: the
    same arithmetic, with 9 weights fewer to keep in registers (1.15-1.2x on AVX2, which has 16)."""
    for j in range(lo, hi):
        jl = j - left
        jr = j + right
        u1, v1, s1 = x[r1 + jl], x[r1 + j], x[r1 + jr]
        u2, v2, s2 = x[r2 + jl], x[r2 + j], x[r2 + jr]
        out[a0 + j] += (w0 * x[r0 + jl] + w1 * x[r0 + j] + w2 * x[r0 + jr] + w3 * u1 + w4 * v1 + w5 * s1
                        + w6 * u2 + w7 * v2 + w8 * s2)
        out[a1 + j] += (w0 * u1 + w1 * v1 + w2 * s1 + w3 * u2 + w4 * v2 + w5 * s2
                        + w6 * x[r3 + jl] + w7 * x[r3 + j] + w8 * x[r3 + jr])


@numba.njit(**_FAST)
def _taps1(out, a0, x, r0, r1, r2, left, right, lo, hi, w0, w1, w2, w3, w4, w5, w6, w7, w8):
    """``_taps2`` for one output row: ``out[a0 + j] += w . (rows r0, r1, r2 at j - left, j, j + right)``."""
    for j in range(lo, hi):
        jl = j - left
        jr = j + right
        out[a0 + j] += (w0 * x[r0 + jl] + w1 * x[r0 + j] + w2 * x[r0 + jr] + w3 * x[r1 + jl] + w4 * x[r1 + j]
                        + w5 * x[r1 + jr] + w6 * x[r2 + jl] + w7 * x[r2 + j] + w8 * x[r2 + jr])


@numba.njit(**_FAST)
def _kernel_rows(out, a0, a1, x, r0, r1, r2, r3, w, flip, has_r0, has_r3, paired, batch, n):
    """Add one kernel's contribution to output rows a0 (input rows r0-r2) and, if ``paired``, a1 (rows r1-r3).
    A row outside the map (``has_r0``/``has_r3`` False) may be any row: its weights count as 0. The first and the
    last pixel of a row lose their dx = -1 and dx = +1 taps (zero padding). w (9,); ``flip`` rotates it by 180
    degrees (the transposed convolution). Offsets and n (= width * batch) are uint64."""
    a_0, a_1, a_2, b0, b1, b2, c0, c1, c2 = _oriented(w, flip)
    zero = np.float32(0.0)
    e0, e1, e2, g0, g1, g2 = a_0, a_1, a_2, c0, c1, c2  # a1's weights for rows r1 and r3
    if not has_r0:
        a_0 = a_1 = a_2 = zero
    if not has_r3:
        g0 = g1 = g2 = zero
    if not paired:  # row r2 is then outside the map as well
        c0 = c1 = c2 = zero
    b, first, last = _U(batch), _U(0), n - _U(batch)
    if paired and has_r0 and has_r3:
        _taps2_inside(out, a0, a1, x, r0, r1, r2, r3, b, b, b, last, a_0, a_1, a_2, b0, b1, b2, c0, c1, c2)
        _taps2_inside(out, a0, a1, x, r0, r1, r2, r3, first, b, first, b, zero, a_1, a_2, zero, b1, b2, zero, c1,
                      c2)
        _taps2_inside(out, a0, a1, x, r0, r1, r2, r3, b, first, last, n, a_0, a_1, zero, b0, b1, zero, c0, c1,
                      zero)
    elif paired:
        _taps2(out, a0, a1, x, r0, r1, r2, r3, b, b, b, last, a_0, a_1, a_2, b0, b1, b2, c0, c1, c2,
               e0, e1, e2, g0, g1, g2)
        _taps2(out, a0, a1, x, r0, r1, r2, r3, first, b, first, b, zero, a_1, a_2, zero, b1, b2, zero, c1, c2,
               zero, e1, e2, zero, g1, g2)
        _taps2(out, a0, a1, x, r0, r1, r2, r3, b, first, last, n, a_0, a_1, zero, b0, b1, zero, c0, c1, zero,
               e0, e1, zero, g0, g1, zero)
    else:
        _taps1(out, a0, x, r0, r1, r2, b, b, b, last, a_0, a_1, a_2, b0, b1, b2, c0, c1, c2)
        _taps1(out, a0, x, r0, r1, r2, first, b, first, b, zero, a_1, a_2, zero, b1, b2, zero, c1, c2)
        _taps1(out, a0, x, r0, r1, r2, b, first, last, n, a_0, a_1, zero, b0, b1, zero, c0, c1, zero)


@numba.njit(**_FAST)
def _row_offsets(map_offset, h, height, n):
    """Offsets (uint64) of rows h - 1, h, h + 1, h + 2 of the map at ``map_offset``, each clamped into the map
    (a clamped row is a placeholder, weighted 0 by ``_kernel_rows``)."""
    r1 = map_offset + _U(h) * n
    r0 = r1 - n if h > 0 else r1
    r2 = r1 + n if h + 1 < height else r1
    r3 = r2 + n if h + 2 < height else r2
    return r0, r1, r2, r3


# ----- a map's sum, block by block, while the map is written -----
# A convolution's dL/db is its delta map summed over pixels and batch. NumPy sums a contiguous float32 run of
# 128 * 2**k values as a balanced tree over blocks of 128 (``_pairwise_block`` each), so the kernels that write the
# delta maps sum every 128-float block while it is in cache, and ``tree_sums`` folds the blocks into NumPy's own
# sums: no second pass over the maps (16 MB per batch for conv 2 of the paper's CNN).
LEAF = 128
NO_LEAVES = np.zeros((0, 0), np.float32)  # no block sums wanted


def leaf_count(plane, row):
    """Blocks per map for block sums of maps of ``plane`` floats written ``row`` floats at a time; 0 where NumPy's
    tree does not split a map at those blocks (the map is not 128 * 2**k floats long, or a row not whole blocks)."""
    leaves = plane // LEAF
    if plane % LEAF or row % LEAF or leaves & (leaves - 1):
        return 0
    return leaves


@numba.njit(**_EXACT)
def _block_sums(x, map_start, first, count, leaf_sums, c):
    """``leaf_sums[c, b]`` = NumPy's float32 sum of block b (128 floats) of map c, for the ``count`` floats from
    offset ``first`` of the map that starts at ``map_start`` in the flat x (first and count whole blocks)."""
    first_block = np.int64(first) // LEAF
    for b in range(first_block, first_block + np.int64(count) // LEAF):
        leaf_sums[c, b] = _pairwise_block(x, np.int64(map_start) + b * LEAF, LEAF)


def _map_block_sums(x, leaf_sums):
    """``leaf_sums[c, b]`` = NumPy's sum of block b of map c. x (n_maps, plane) C-contiguous float32, leaf_sums
    (n_maps, plane // 128)."""
    plane = x.shape[1]
    xf = x.reshape(x.size)
    for c in prange(x.shape[0]):
        _block_sums(xf, c * plane, 0, plane, leaf_sums, c)


@numba.njit(**_EXACT)
def tree_sums(leaf_sums):
    """Each map's NumPy float32 sum from its block sums (n_maps, blocks), ``leaf_count`` of them: their balanced
    pairwise tree, added to 0 as NumPy's reduction does. Returns (n_maps,) float32."""
    n_maps, size = leaf_sums.shape
    out = np.empty(n_maps, np.float32)
    work = np.empty(size, np.float32)
    for c in range(n_maps):
        work[:] = leaf_sums[c]
        m = size
        while m > 1:  # pair neighbours, level by level
            m //= 2
            for i in range(m):
                work[i] = work[2 * i] + work[2 * i + 1]
        out[c] = np.float32(0.0) + work[0]
    return out


NO_POOL = (np.zeros((0, 0, 0), np.float32), np.zeros((0, 0, 0), np.uint8))  # conv_forward without pooling
NO_MAPS = NO_POOL[0]  # conv_forward with pooling, the maps before it not stored
NO_SKIP = np.zeros(0, np.bool_)  # conv_backward_input: every input map's gradient
MIN_WORK_ITEMS = 8  # row pairs x map groups per convolution call: enough for 8 threads


@numba.njit(**_FAST)
def _map_groups(row_pairs, n_maps):
    """How many groups to split the maps into so that (row pairs x groups) makes at least ``MIN_WORK_ITEMS``
    work items (1 for maps of 15 rows or more). Which items a thread gets changes nothing in the results."""
    return max(1, min(n_maps, (MIN_WORK_ITEMS + row_pairs - 1) // row_pairs))


@numba.njit(**_FAST)
def _work_item(item, groups, n_maps):
    """Work item ``item`` of (row pairs x ``groups`` groups of maps): its first row h (even) and its maps
    [first, end)."""
    per_group = (n_maps + groups - 1) // groups
    group = item % groups
    return 2 * (item // groups), group * per_group, min(n_maps, (group + 1) * per_group)


def _conv_forward(indptr, indices, weights, bias, x, out, batch, relu, pooled, argmax):
    """``out[o] = sum_k conv3x3(x[indices[k]], weights[k]) + bias[o]`` over the kernels k of row o, then ReLU,
    then, if ``pooled`` is not empty, 2 x 2 max pooling of ``out`` into ``pooled`` and ``argmax`` (``_max_pool2``).

    indptr (n_out + 1,), indices (nnz,) input maps, weights (nnz, 9), bias (n_out,), x (n_in, H, W * batch),
    out (n_out, H, W * batch): maps with the batch innermost, rows flattened (W >= 2), C-contiguous; pooled
    (n_out, H // 2, W // 2 * batch) float32 and argmax (the same shape, uint8), or ``NO_POOL``. With pooling,
    out may be ``NO_MAPS``: the maps are then kept a row pair at a time, never stored (nothing needs them
    after pooling, and storing them costs their write to memory: 16 MB per batch for conv 2 of the paper's CNN).
    Cost: 9 multiply-adds per kernel, pixel and sample. Work goes by pairs of output rows, every output map of
    one pair before the next, so that the few input rows a pair reads stay in cache for all the maps that read
    them; the two rows share the loads of their input rows, and are pooled while still in cache (no second pass
    over ``out``). Each output row is written by one thread, kernels in order: the result does not depend on the
    threads.
    """
    stored = out.size > 0
    n_out, height, row_size = (out.shape[0] if stored else pooled.shape[0]), x.shape[1], x.shape[2]
    n, plane = _U(row_size), _U(height * row_size)
    xf, outf = x.reshape(x.size), out.reshape(out.size)
    pooledf, argmaxf = pooled.reshape(pooled.size), argmax.reshape(argmax.size)
    half_width = _U(row_size // batch // 2)
    pool_row = half_width * _U(batch)
    pairs = (height + 1) // 2
    groups = _map_groups(pairs, n_out)
    for item in prange(pairs * groups):
        h, first, end = _work_item(item, groups, n_out)
        paired = h + 1 < height
        rows = outf if stored else np.empty(2 * row_size, np.float32)  # the item's row pair, in cache
        for o in range(first, end):
            a0 = _U(o) * plane + _U(h) * n if stored else _U(0)
            a1 = a0 + n if paired else a0  # rows a0 to a1 + n are the item's
            rows[a0:a1 + n] = bias[o]
            for k in range(indptr[o], indptr[o + 1]):
                r0, r1, r2, r3 = _row_offsets(_U(indices[k]) * plane, h, height, n)
                _kernel_rows(rows, a0, a1, xf, r0, r1, r2, r3, weights[k], False, h > 0, h + 2 < height, paired,
                             batch, n)
            if relu:
                for j in range(a0, a1 + n):
                    rows[j] = _relu(rows[j])
            if pooled.size and paired:
                p0 = (_U(o) * _U(height // 2) + _U(h // 2)) * pool_row
                _pool_pair(rows, a0, a1, pooledf, argmaxf, p0, half_width, _U(batch))


@numba.njit(**_FAST)
def _pool_pair(y, a0, a1, pooled, argmax, p0, half_width, batch):
    """2 x 2 max pooling of the map rows at offsets a0 and a1 of ``y`` (flat, ``width * batch`` floats each) into
    the row at offset p0 of ``pooled`` and ``argmax`` (``half_width * batch`` each), positions compared in the
    order 2 dy + dx (the first of equal values wins; argmax holds the winner's position). Offsets and sizes
    uint64. Shared by ``_max_pool2`` and ``_conv_forward``."""
    for w in range(half_width):
        s, q = _U(2) * w * batch, w * batch
        for b in range(batch):
            j = s + b
            best, where = y[a0 + j], np.uint8(0)
            v = y[a0 + j + batch]
            if v > best:
                best, where = v, np.uint8(1)
            v = y[a1 + j]
            if v > best:
                best, where = v, np.uint8(2)
            v = y[a1 + j + batch]
            if v > best:
                best, where = v, np.uint8(3)
            pooled[p0 + q + b] = best
            argmax[p0 + q + b] = where


def _add_bias(out, bias, relu):
    """``out[o] += bias[o]``, then ReLU if ``relu``. out (n_out, n) float32, bias (n_out,)."""
    for o in prange(out.shape[0]):
        row = out[o]
        b_o = bias[o]
        if relu:
            for i in range(row.shape[0]):
                row[i] = max(row[i] + b_o, np.float32(0.0))
        else:
            for i in range(row.shape[0]):
                row[i] += b_o


def _conv_backward_input(col_ptr, col_order, rows, weights, delta, activation, out, batch, leaf_sums, skip):
    """``out = conv3x3_transpose(delta) * (activation > 0)``: the loss gradient at the input maps, through ReLU.

    col_ptr (n_in + 1,), col_order (nnz,) kernel ids grouped by input map, rows (nnz,) output maps,
    weights (nnz, 9), delta (n_out, H, W * batch), activation and out (n_in, H, W * batch), C-contiguous. Input
    pixel (h, w) receives tap (dy, dx) from output pixel (h - dy, w - dx): the kernel rotated by 180 degrees.
    Work goes by pairs of rows, as in ``_conv_forward``. ``leaf_sums``: (n_in, ``leaf_count``) to receive out's
    block sums (``tree_sums``), or ``NO_LEAVES``. ``skip``: bool (n_in,), input maps whose gradient the caller
    does not use (they get zeros, and no work), or ``NO_SKIP``.
    """
    n_in, height, row_size = out.shape
    n, plane = _U(row_size), _U(height * row_size)
    deltaf, actf, outf = delta.reshape(delta.size), activation.reshape(activation.size), out.reshape(out.size)
    pairs = (height + 1) // 2
    groups = _map_groups(pairs, n_in)
    for item in prange(pairs * groups):
        h, first, end = _work_item(item, groups, n_in)
        paired = h + 1 < height
        for c in range(first, end):
            a0 = _U(c) * plane + _U(h) * n
            a1 = a0 + n if paired else a0
            outf[a0:a1 + n] = 0.0
            last = col_ptr[c] if skip.size and skip[c] else col_ptr[c + 1]  # an unused map: zeros, no kernels
            for p in range(col_ptr[c], last):
                k = col_order[p]
                r0, r1, r2, r3 = _row_offsets(_U(rows[k]) * plane, h, height, n)
                _kernel_rows(outf, a0, a1, deltaf, r0, r1, r2, r3, weights[k], True, h > 0, h + 2 < height,
                             paired, batch, n)
            for j in range(a0, a1 + n):
                outf[j] = _masked(outf[j], actf[j])
            if leaf_sums.size:
                _block_sums(outf, _U(c) * plane, _U(h) * n, a1 + n - a0, leaf_sums, c)


@numba.njit(**_FAST)
def _dot9(d, u0, u1, u2, m0, m1, m2, l0, l1, l2):
    """``d . r`` for the nine vectors r (equal lengths, float32) in one pass over d. Returns a 9-tuple."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = s8 = np.float32(0.0)
    for j in range(d.shape[0]):
        dj = d[j]
        s0 += dj * u0[j]
        s1 += dj * u1[j]
        s2 += dj * u2[j]
        s3 += dj * m0[j]
        s4 += dj * m1[j]
        s5 += dj * m2[j]
        s6 += dj * l0[j]
        s7 += dj * l1[j]
        s8 += dj * l2[j]
    return s0, s1, s2, s3, s4, s5, s6, s7, s8


@numba.njit(**_FAST)
def _add_tap_dots(d, up, mid, down, batch, g, has_up, has_down):
    """``g[t] += sum_x d[x] * r_dy[x + dx]`` for the nine taps t = (dy, dx), the rows r_-1, r_0, r_1 = up, mid,
    down (map rows flattened to (width * batch,)), zero padding at the row ends; taps of a row outside the map
    (``has_up``/``has_down`` False: that row is any placeholder) are left out. g (9,) float32. One pass over d
    for the nine sums (1.2-1.26x over a pass per row: d is loaded once)."""
    n = d.shape[0]
    a = _dot9(d[batch:n - batch], up[:n - 2 * batch], up[batch:n - batch], up[2 * batch:], mid[:n - 2 * batch],
              mid[batch:n - batch], mid[2 * batch:], down[:n - 2 * batch], down[batch:n - batch], down[2 * batch:])
    b = _dot9(d[:batch], up[:batch], up[:batch], up[batch:2 * batch], mid[:batch], mid[:batch],
              mid[batch:2 * batch], down[:batch], down[:batch], down[batch:2 * batch])
    e = _dot9(d[n - batch:], up[n - 2 * batch:n - batch], up[n - batch:], up[n - batch:],
              mid[n - 2 * batch:n - batch], mid[n - batch:], mid[n - batch:], down[n - 2 * batch:n - batch],
              down[n - batch:], down[n - batch:])
    for row in range(3):
        if (row == 0 and not has_up) or (row == 2 and not has_down):
            continue
        t = 3 * row
        g[t] += a[t] + e[t]  # dx = -1: the first pixel has no left neighbour
        g[t + 1] += a[t + 1] + b[t + 1] + e[t + 1]
        g[t + 2] += a[t + 2] + b[t + 2]  # dx = +1: the last pixel has no right neighbour


def _conv_weight_grad(connections, rows, indices, delta, x, grad, batch):
    """``grad[q, t] = sum_{h, w, b} delta[o, h, w, b] * x[c, h + dy_t, w + dx_t, b]`` for kernel
    ``k = connections[q]`` from map ``c = indices[k]`` to map ``o = rows[k]``: dL/dW only at live kernels.

    connections (m,), rows (nnz,), indices (nnz,), delta (n_out, H, W * batch), x (n_in, H, W * batch),
    grad (m, 9).
    """
    height = x.shape[1]
    for q in prange(connections.shape[0]):
        k = connections[q]
        o, c = rows[k], indices[k]
        g = np.zeros(9, np.float32)
        for h in range(height):
            up = x[c, h - 1] if h > 0 else x[c, h]
            down = x[c, h + 1] if h + 1 < height else x[c, h]
            _add_tap_dots(delta[o, h], up, x[c, h], down, batch, g, h > 0, h + 1 < height)
        grad[q] = g


def _im2col(x, cols):
    """``cols[9 c + t, h, w] = x[c, h + dy_t, w + dx_t]`` (0 in the padding): the input of the dense path.

    x (n_in, H, W, batch), cols (9 n_in, H, W, batch).
    """
    n_in, height, width, batch = x.shape
    for c in prange(n_in):
        for t in range(9):
            dy, dx = t // 3 - 1, t % 3 - 1
            for h in range(height):
                for w in range(width):
                    row = cols[9 * c + t, h, w]
                    if 0 <= h + dy < height and 0 <= w + dx < width:
                        src = x[c, h + dy, w + dx]
                        for b in range(batch):
                            row[b] = src[b]
                    else:
                        for b in range(batch):
                            row[b] = 0.0


def _col2im(cols, activation, out):
    """``out[c, h, w] = sum_t cols[9 c + t, h - dy_t, w - dx_t]``, then times ``activation > 0``: the adjoint of
    ``im2col`` followed by the ReLU derivative. cols (9 n_in, H, W, batch), activation/out (n_in, H, W, batch)."""
    n_in, height, width, batch = out.shape
    for c in prange(n_in):
        for h in range(height):
            for w in range(width):
                acc = out[c, h, w]
                for b in range(batch):
                    acc[b] = 0.0
                for t in range(9):
                    hs, ws = h - (t // 3 - 1), w - (t % 3 - 1)
                    if 0 <= hs < height and 0 <= ws < width:
                        src = cols[9 * c + t, hs, ws]
                        for b in range(batch):
                            acc[b] += src[b]
                act = activation[c, h, w]
                for b in range(batch):
                    if act[b] <= 0.0:
                        acc[b] = 0.0


def _max_pool2(x, out, argmax):
    """2 x 2 max pooling, stride 2. x (C, H, W, batch), out and argmax (C, H // 2, W // 2, batch), C-contiguous;
    argmax holds the winner's position 2 * dy + dx (uint8; the first of equal values wins). ``_pool_pair`` per
    pair of rows, as ``_conv_forward`` pools its own output."""
    n_maps, height, width, batch = x.shape
    n, pool_row = _U(width * batch), _U(out.shape[2] * batch)
    xf, outf, argmaxf = x.reshape(x.size), out.reshape(out.size), argmax.reshape(argmax.size)
    for c in prange(n_maps):
        for h in range(out.shape[1]):
            a0 = (_U(c) * _U(height) + _U(2 * h)) * n
            p0 = (_U(c) * _U(out.shape[1]) + _U(h)) * pool_row
            _pool_pair(xf, a0, a0 + n, outf, argmaxf, p0, _U(out.shape[2]), _U(batch))


def _max_pool2_backward(delta, argmax, out, leaf_sums):
    """Route ``delta`` (C, H // 2, W // 2, batch) to the winners: out (C, H, W, batch), zero elsewhere.

    One contiguous batch row of ``out`` at a time, so the inner loop vectorizes (4-10x over a loop over windows).
    ``leaf_sums``: (C, ``leaf_count``) to receive out's block sums (``tree_sums``), or ``NO_LEAVES``.
    """
    n_maps, height, width, batch = delta.shape
    row = 2 * width * batch  # floats per row of out
    outf = out.reshape(out.size)
    for c in prange(n_maps):
        for h in range(height):
            for w in range(width):
                d = delta[c, h, w]
                where = argmax[c, h, w]
                for t in range(4):
                    dst = out[c, 2 * h + t // 2, 2 * w + t % 2]
                    for b in range(batch):
                        dst[b] = d[b] if where[b] == t else np.float32(0.0)
            if leaf_sums.size:
                _block_sums(outf, c * 2 * height * row, 2 * h * row, 2 * row, leaf_sums, c)


def _sgd_step_kernels(connections, grad, lr, weights, importance):
    """SGD on whole kernels ``weights[connections]`` (nnz, 9) with grad (m, 9); a kernel's Omega (Eq. 3) grows by
    the sum of its nine elements' ``lr * g**2`` (the paper's kernel importance). importance (nnz,)."""
    for q in prange(connections.shape[0]):
        k = connections[q]
        total = np.float32(0.0)
        for t in range(weights.shape[1]):
            step = lr * grad[q, t]
            total += abs(step * grad[q, t])
            weights[k, t] -= step
        importance[k] += total


def _transpose_standardize(rows, scale, shift, out):
    """``out[f, b] = rows[b, f] * scale[f] + shift[f]``: a uint8 batch to float32 with per-feature statistics,
    transposed. rows (batch, n_features) uint8, scale/shift (n_features,) float32, out (n_features, batch)."""
    batch, n_features = rows.shape
    tile = 32
    for t in prange((n_features + tile - 1) // tile):
        f0 = t * tile
        f1 = min(f0 + tile, n_features)
        for b0 in range(0, batch, tile):
            for b in range(b0, min(b0 + tile, batch)):
                row = rows[b]
                for f in range(f0, f1):
                    out[f, b] = row[f] * scale[f] + shift[f]


conv_forward = _build(_conv_forward)
conv_backward_input = _build(_conv_backward_input)
conv_weight_grad = _build(_conv_weight_grad)
add_bias = _build(_add_bias)
im2col = _build(_im2col)
col2im = _build(_col2im)
max_pool2 = _build(_max_pool2)
max_pool2_backward = _build(_max_pool2_backward)
map_block_sums = _build(_map_block_sums)
sgd_step_kernels = _build(_sgd_step_kernels)
transpose_standardize = _build(_transpose_standardize)


# ----- allocation and growth in a task's block, without materializing it (see the module docstring) -----
_GROWTH_JIT = dict(cache=CACHE, nogil=True)  # no fastmath: scores must be the exact products np.outer computes


def occupied_positions(indptr, indices, n_in, rows, cols):
    """Positions of the CSR's connections (``indptr``, ``indices``; ``n_in`` input slots) inside the block
    ``rows x cols`` (sorted slot arrays). Returns (m,) int64, increasing (the CSR order)."""
    local = np.full(n_in, -1, np.int64)
    local[cols] = np.arange(cols.size)
    out = np.empty(_scan_block(indptr, indices, rows, local, cols.size, np.empty(0, np.int64)), np.int64)
    _scan_block(indptr, indices, rows, local, cols.size, out)
    return out


@numba.njit(**_GROWTH_JIT)
def _scan_block(indptr, indices, rows, local, n_cols, out):
    """Count the block's connections; also write their positions when ``out`` has room for them. Returns the
    count. ``local``: column of each input slot in the block, or -1."""
    n = 0
    for i in range(rows.size):
        for k in range(indptr[rows[i]], indptr[rows[i] + 1]):
            j = local[indices[k]]
            if j >= 0:
                if n < out.size:
                    out[n] = i * n_cols + j
                n += 1
    return n


def free_positions(occupied, ranks):
    """The empty positions of ``ranks`` (rank r: the r-th empty position of the block, counted from 0).

    occupied (m,) sorted int64 positions; ranks (k,) sorted int64. Returns (k,) int64, sorted.
    """
    out = np.empty(ranks.size, np.int64)
    _free_positions(occupied, np.asarray(ranks, np.int64), out)
    return out


@numba.njit(**_GROWTH_JIT)
def _free_positions(occupied, ranks, out):
    """One merge: ``occupied[k] - k`` empty positions lie before ``occupied[k]``, so rank r is at r + (how many
    occupied positions have at most r empty ones before them)."""
    k = 0
    for q in range(ranks.size):
        while k < occupied.size and occupied[k] - k <= ranks[q]:
            k += 1
        out[q] = ranks[q] + k


def top_positions(a_out, a_in, occupied, count):
    """The ``count`` positions of the block not in ``occupied`` with the largest score ``a_out[i] * a_in[j]``, ties
    to the lower position (all of them if fewer). a_out (rows,), a_in (cols,) non-negative; occupied (m,) sorted
    int64. Returns (k,) int64 positions, k = min(count, empty positions), in no particular order.

    Along each row, scores decrease with the columns sorted by decreasing ``a_in``: a max-heap over the rows pops
    positions in decreasing score, O(log rows) each, until ``count`` empty ones are found. The walk meets the
    positions of the last score T in any order; ``_lowest_ties`` then keeps the lowest empty positions of score T.
    """
    dtype = np.result_type(a_out, a_in)  # the dtype np.outer(a_out, a_in) computes in
    a_out, a_in = np.asarray(a_out, dtype), np.asarray(a_in, dtype)
    if count <= 0 or a_out.size == 0 or a_in.size == 0:
        return np.zeros(0, np.int64)
    order = np.argsort(-a_in, kind="stable")
    sorted_in = a_in[order]
    out, score = np.empty(count, np.int64), np.empty(count, dtype)
    found = _top(a_out, sorted_in, order, occupied, out, score, np.empty(a_out.size, dtype),
                 np.empty(a_out.size, np.int64), np.zeros(a_out.size, np.int64), np.zeros(a_in.size, np.bool_))
    return out[:found]


@numba.njit(**_GROWTH_JIT)
def _top(a_out, sorted_in, order, occupied, out, score, heap_score, heap_row, pointer, marked):
    """``_walk``, then ``_lowest_ties`` if ``out`` was filled (one compiled unit: one cache load). Returns how
    many positions were kept."""
    found = _walk(a_out, sorted_in, order, occupied, out, score, heap_score, heap_row, pointer)
    if found == out.size:
        _lowest_ties(a_out, sorted_in, order, occupied, out, score, marked)
    return found


@numba.njit(**_GROWTH_JIT)
def _contains(sorted_values, value):
    """Binary search (hand-written: np.searchsorted costs seconds of compilation)."""
    lo, hi = 0, sorted_values.size
    while lo < hi:
        mid = (lo + hi) // 2
        if sorted_values[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo < sorted_values.size and sorted_values[lo] == value


@numba.njit(**_GROWTH_JIT)
def _sift_down(heap_score, heap_row, k, size):
    """Restore the max-heap below ``k`` (the first ``size`` entries)."""
    while True:
        child = 2 * k + 1
        if child >= size:
            return
        if child + 1 < size and heap_score[child + 1] > heap_score[child]:
            child += 1
        if heap_score[child] <= heap_score[k]:
            return
        heap_score[k], heap_score[child] = heap_score[child], heap_score[k]
        heap_row[k], heap_row[child] = heap_row[child], heap_row[k]
        k = child


@numba.njit(**_GROWTH_JIT)
def _walk(a_out, sorted_in, order, occupied, out, score, heap_score, heap_row, pointer):
    """Pop positions in decreasing score, each row at its next column (``pointer``), and keep the empty ones in
    ``out``/``score`` until ``out`` is full. Returns how many were kept."""
    n_rows, n_cols = a_out.size, sorted_in.size
    for i in range(n_rows):
        heap_score[i], heap_row[i] = a_out[i] * sorted_in[0], i
    size = n_rows
    for k in range(size // 2 - 1, -1, -1):
        _sift_down(heap_score, heap_row, k, size)
    found = 0
    while size > 0 and found < out.size:
        i = heap_row[0]
        k = pointer[i]
        position = i * n_cols + order[k]
        if not _contains(occupied, position):
            out[found], score[found] = position, heap_score[0]
            found += 1
        pointer[i] = k + 1
        if k + 1 < n_cols:
            heap_score[0] = a_out[i] * sorted_in[k + 1]
        else:  # row exhausted
            size -= 1
            heap_score[0], heap_row[0] = heap_score[size], heap_row[size]
        _sift_down(heap_score, heap_row, 0, size)
    return found


@numba.njit(**_GROWTH_JIT)
def _count_above(a, sorted_in, t, strict):
    """How many of the (non-increasing) ``a * sorted_in`` are > t (``strict``) or >= t: a binary search."""
    lo, hi = 0, sorted_in.size
    while lo < hi:
        mid = (lo + hi) // 2
        s = a * sorted_in[mid]
        if s > t or (not strict and s == t):
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(**_GROWTH_JIT)
def _lowest_ties(a_out, sorted_in, order, occupied, out, score, marked):
    """Replace the kept positions of the last score T by the lowest empty positions of score T: rows ascending,
    then columns ascending. In each row the columns of score T are a run of ``order``: they are marked in
    ``marked`` ((cols,) bool, all False) and read back in column order."""
    t = score[out.size - 1]
    kept = 0
    while score[kept] > t:  # the walk kept scores > T first
        kept += 1
    n_cols = sorted_in.size
    for i in range(a_out.size):
        lo = _count_above(a_out[i], sorted_in, t, True)
        hi = _count_above(a_out[i], sorted_in, t, False)
        if lo == hi:
            continue
        first, last = n_cols, -1
        for k in range(lo, hi):
            marked[order[k]] = True
            first, last = min(first, order[k]), max(last, order[k])
        for j in range(first, last + 1):
            if marked[j]:
                marked[j] = False
                if kept < out.size and not _contains(occupied, i * n_cols + j):
                    out[kept] = i * n_cols + j
                    kept += 1
        if kept == out.size:
            return


numba_cache.load_without_registries(globals())
