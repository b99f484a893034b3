"""Neuron index and sparse layer: the data structures that make cost follow live connections, not width.

A layer of ``width`` neurons stores state only for the neurons that ever received a connection. Each such neuron
gets a compact *slot* the first time it is selected; activations, biases and importances are indexed by slot.
A neuron without a slot has no connections and a zero bias, so it outputs ReLU(0) = 0 and costs nothing.
"""
import numpy as np
import scipy.sparse

from . import buffers, kernels

FREE = -1  # ``reserved_by`` value of a free neuron


class NeuronIndex:
    """The neurons of one layer: compact slots, biases and the free list (Algorithm 1's ``h_l^free``).

    ``slot_ids`` maps slot -> neuron id; ``reserved_by`` holds, per slot, the task a neuron is reserved for (or
    ``FREE``). The free list is the complement of the reserved neurons, never materialized for the whole width.
    With ``dense=True`` every neuron has a slot equal to its id (the input and output layers).
    """

    def __init__(self, width, dense=False):
        if int(width) < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.width = int(width)
        self.dense = dense
        n = self.width if dense else 0
        self.slot_ids = np.arange(n, dtype=np.int64)
        self.reserved_by = np.full(n, FREE, dtype=np.int16)
        self.bias = np.zeros(n, dtype=np.float32)
        self._slot_of = None if dense else {}

    @property
    def n_slots(self):
        return self.slot_ids.shape[0]

    @property
    def n_free(self):
        """Number of free (not reserved) neurons, slotted or not."""
        return self.width - int(np.count_nonzero(self.reserved_by != FREE))

    def free_slots(self):
        """Slots of the free neurons that have a slot. Returns (k,) int64."""
        return np.flatnonzero(self.reserved_by == FREE)

    def slots_for(self, neuron_ids):
        """Slots of ``neuron_ids``, creating slots for neurons that have none yet. Returns (k,) int64."""
        neuron_ids = np.asarray(neuron_ids, dtype=np.int64)
        if self.dense:
            return neuron_ids.copy()
        new_ids = [int(n) for n in neuron_ids if int(n) not in self._slot_of]
        for n in new_ids:
            self._slot_of[n] = len(self._slot_of)
        if new_ids:
            k = len(new_ids)
            self.slot_ids = np.concatenate([self.slot_ids, np.asarray(new_ids, dtype=np.int64)])
            self.reserved_by = np.concatenate([self.reserved_by, np.full(k, FREE, dtype=np.int16)])
            self.bias = np.concatenate([self.bias, np.zeros(k, dtype=np.float32)])
        return np.fromiter((self._slot_of[int(n)] for n in neuron_ids), dtype=np.int64, count=neuron_ids.size)

    def sample_free(self, count, rng):
        """Draw ``count`` distinct free neuron ids uniformly at random (Algorithm 2, line 4).

        Rejection sampling over ``[0, width)`` keeps this O(count + reserved) for wide layers; when few neurons are
        free the free ids are listed explicitly, which then costs O(width) = O(reserved).
        Returns (count,) int64 neuron ids.
        """
        if count > self.n_free:
            raise ValueError(f"cannot select {count} neurons: only {self.n_free} of {self.width} are free")
        reserved = set(self.slot_ids[self.reserved_by != FREE].tolist())
        if 4 * len(reserved) > 3 * self.width:
            free_ids = np.setdiff1d(np.arange(self.width), np.fromiter(reserved, np.int64, len(reserved)))
            return rng.choice(free_ids, size=count, replace=False)
        chosen = {}
        while len(chosen) < count:
            for n in rng.integers(0, self.width, size=2 * (count - len(chosen)) + 8).tolist():
                if n not in reserved and n not in chosen and len(chosen) < count:
                    chosen[n] = None
        return np.fromiter(chosen, dtype=np.int64, count=count)

    def truncate(self, n_slots):
        """Forget the slots from ``n_slots`` on (undoing a failed task); they must carry no connections."""
        if not self.dense:
            for neuron in self.slot_ids[n_slots:].tolist():
                del self._slot_of[neuron]
        self.slot_ids = self.slot_ids[:n_slots]
        self.reserved_by = self.reserved_by[:n_slots]
        self.bias = self.bias[:n_slots]

    def reserve(self, slots, task):
        """Reserve the neurons at ``slots`` for ``task`` (Algorithm 4, lines 6-7)."""
        if np.any(self.reserved_by[slots] != FREE):
            raise ValueError("a neuron can be reserved only once")
        self.reserved_by[slots] = task


class SparseLinear:
    """A sparse fully connected layer ``out = W @ x + bias`` between two ``NeuronIndex`` objects.

    ``W`` is a ``scipy.sparse.csr_array`` of shape (out slots, in slots). Per-connection state is aligned with
    ``W.data``: ``owner`` (the task that allocated the connection, int16) and ``importance`` (Omega of Eq. 3,
    float32). ``rows`` and the CSC view (``col_ptr``, ``col_order``) are derived from the structure and rebuilt
    together with it. ``taps`` is the number of weights per connection (1 here; 9 for a 3 x 3 kernel).
    """

    taps = 1

    def __init__(self, in_index, out_index):
        self.in_index = in_index
        self.out_index = out_index
        empty = np.zeros(0, dtype=np.int64)
        self._set_connections(empty, empty, np.zeros(self.weight_shape(0), np.float32), np.zeros(0, np.int16),
                              np.zeros(0, np.float32))

    def weight_shape(self, count):
        """Shape of the weights of ``count`` connections: (count,), or (count, taps) for a convolution."""
        return (count,) if self.taps == 1 else (count, self.taps)

    # ----- structure -----
    @property
    def nnz(self):
        return self.W.data.shape[0]

    @property
    def weights(self):
        return self.W.data

    @property
    def indices(self):
        return self.W.indices

    @property
    def indptr(self):
        return self.W.indptr

    @property
    def bias(self):
        return self.out_index.bias

    def connections_of(self, task):
        """Connection ids (positions in ``W.data``) owned by ``task``. Returns (m,) int64."""
        return np.flatnonzero(self.owner == task)

    def add_connections(self, rows, cols, weights, owner, importance=None):
        """Insert connections at (row slot, column slot) positions that must be empty.

        weights (m,) for a fully connected layer, (m, taps) for a convolution. The new connections are sorted and
        merged into the CSR order: O(nnz + m log m), no sort of the whole layer."""
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        if importance is None:
            importance = np.zeros(rows.shape[0], dtype=np.float32)
        n_in = self.in_index.n_slots
        new_keys = rows * n_in + cols
        new_order = np.argsort(new_keys, kind="stable")
        # new connection i (sorted) lands at insert[i] + i, the old ones fill the other places in their order
        insert = np.searchsorted(self.rows.astype(np.int64) * n_in + self.indices, new_keys[new_order])
        is_new = np.zeros(self.nnz + rows.size, dtype=bool)
        is_new[insert + np.arange(rows.size)] = True
        order = np.empty(is_new.size, dtype=np.int64)
        order[~is_new] = np.arange(self.nnz)
        order[is_new] = self.nnz + new_order
        self._set_connections(
            np.concatenate([self.rows, rows])[order], np.concatenate([self.indices.astype(np.int64), cols])[order],
            np.concatenate([self.weights, np.asarray(weights, np.float32)])[order],
            np.concatenate([self.owner, np.broadcast_to(np.asarray(owner, np.int16), rows.shape)])[order],
            np.concatenate([self.importance, np.asarray(importance, np.float32)])[order], presorted=True)

    def remove_connections(self, connection_ids):
        """Delete the connections at ``connection_ids``. Returns their (rows, cols, weights, owner, importance)."""
        keep = np.ones(self.nnz, dtype=bool)
        keep[connection_ids] = False
        removed = (self.rows[~keep].astype(np.int64), self.indices[~keep].astype(np.int64), self.weights[~keep],
                   self.owner[~keep], self.importance[~keep])
        self._set_connections(self.rows[keep], self.indices[keep], self.weights[keep], self.owner[keep],
                              self.importance[keep], presorted=True)
        return removed

    def _set_connections(self, rows, cols, weights, owner, importance, presorted=False):
        """Rebuild the CSR (sorted by row, then column; ``presorted``: the arrays already are), its aligned arrays
        and the CSC view."""
        n_out = self.out_index.n_slots
        if not presorted:
            order = np.lexsort((cols, rows))
            rows, cols, weights, owner, importance = (rows[order], cols[order], weights[order], owner[order],
                                                      importance[order])
        index_dtype = np.int32 if rows.size < 2**31 else np.int64  # half the index traffic in the kernels
        indptr = np.zeros(n_out + 1, dtype=index_dtype)
        np.cumsum(np.bincount(rows, minlength=n_out), out=indptr[1:])
        self._build_matrix(np.ascontiguousarray(weights, np.float32), cols.astype(index_dtype), indptr)
        self.owner = np.ascontiguousarray(owner, np.int16)
        self.importance = np.ascontiguousarray(importance, np.float32)
        self.rows = rows.astype(np.int32)
        self.version = getattr(self, "version", 0) + 1
        self.set_active_rows(None)

    def _build_matrix(self, weights, indices, indptr):
        """Set ``W`` from sorted CSR arrays; weights (nnz,)."""
        shape = (self.out_index.n_slots, self.in_index.n_slots)
        self.W = scipy.sparse.csr_array((weights, indices, indptr), shape=shape)

    def set_active_rows(self, active):
        """Compute only the output rows in ``active`` ((out slots,) bool, or None for all).

        Rows that feed nothing downstream do not change the loss, so the forward pass skips them and the CSC view
        used by the backward pass keeps only the connections of active rows. Builds ``active_rows``,
        ``col_ptr``, ``col_order`` and ``read_inputs`` (the input slots that an active row reads, (k,) int64:
        the gradient at every other input is exactly 0).
        """
        n_in = self.in_index.n_slots
        self.all_rows = np.arange(self.out_index.n_slots, dtype=np.int64)
        if active is None:
            self.active_rows = self.all_rows
            kept = np.arange(self.nnz, dtype=np.int64)
        else:
            self.active_rows = np.flatnonzero(active)
            kept = np.flatnonzero(active[self.rows])
        self.col_ptr, self.col_order = kernels.group_by_input(kept, self.indices, n_in)
        self.read_inputs = np.flatnonzero(np.diff(self.col_ptr))
        self._csc_arrays = None  # backward_input's, built on its first call

    def connection_arrays(self):
        """Copies of (rows, cols, weights, owner, importance) of every connection, for ``set_connection_arrays``."""
        return (self.rows.astype(np.int64), self.indices.astype(np.int64), self.weights.copy(), self.owner.copy(),
                self.importance.copy())

    def set_connection_arrays(self, arrays):
        """Replace every connection by ``arrays`` from ``connection_arrays``."""
        self._set_connections(*arrays)

    def resize_to_indices(self):
        """Follow new slots of the neuron indices (slots are only appended, so positions stay valid)."""
        self._set_connections(self.rows.astype(np.int64), self.indices.astype(np.int64), self.weights, self.owner,
                              self.importance, presorted=True)

    # ----- computation -----
    def forward(self, x, out, relu, active_only=False):
        """``out = W @ x + bias`` (then ReLU). x (in slots, batch), out (out slots, batch).

        With ``active_only`` only the active rows are computed (see ``set_active_rows``); the others keep their
        old values.
        """
        kernels.check_no_overlap(out, x)
        rows = self.active_rows if active_only else self.all_rows
        kernel = kernels.pick(kernels.csr_forward, self.nnz * x.shape[1])
        kernel(rows, self.indptr, self.indices, self.weights, self.bias, x, out, relu)
        return out

    def backward_input(self, delta, input_activation, out):
        """Gradient at the input through its ReLU. delta (out slots, batch), input_activation/out (in slots, batch).

        The weights are first gathered into CSC order, so that the product reads weights and rows in sequence
        (``col_order`` is then the identity): 1.3-1.6x at the CNN's 4096 -> 512 layer with the gather included,
        the same bits."""
        kernels.check_no_overlap(out, delta, input_activation)
        if self._csc_arrays is None:  # (the identity, rows and a buffer for the weights, in CSC order)
            n = self.col_order.size
            self._csc_arrays = (np.arange(n), self.rows[self.col_order], np.empty(n, np.float32))
        identity, col_rows, col_weights = self._csc_arrays
        work = self.nnz * delta.shape[1]
        kernels.pick(kernels.gather, work)(self.weights, self.col_order, col_weights)
        kernel = kernels.pick(kernels.csc_backward_input, work)
        kernel(self.col_ptr, identity, col_rows, col_weights, delta, input_activation, out)
        return out

    def weight_grad(self, connections, delta, x):
        """dL/dW at ``connections``. delta (out slots, batch), x (in slots, batch). Returns (m,) float32."""
        grad = np.empty(connections.shape[0], dtype=np.float32)
        kernel = kernels.pick(kernels.sampled_weight_grad, connections.shape[0] * x.shape[1])
        kernel(connections, self.rows, self.indices, delta, x, grad)
        return grad

    def sgd_step(self, connections, grad, lr):
        """``W[connections] -= lr * grad`` and Omega (Eq. 3) ``+= |lr * grad**2|`` in one pass. grad (m,)."""
        kernel = kernels.pick_by_elements(kernels.sgd_step_with_importance, connections.size)
        kernel(connections, grad, np.float32(lr), self.weights, self.importance)

    def to_scipy(self):
        """The weights over neuron ids: a ``csr_array`` of shape (out width, in width), built on request."""
        coo = self.W.tocoo()
        return scipy.sparse.csr_array(
            (coo.data, (self.out_index.slot_ids[coo.row], self.in_index.slot_ids[coo.col])),
            shape=(self.out_index.width, self.in_index.width))


class SparseConv2d(SparseLinear):
    """A 3 x 3 convolution (stride 1, zero padding 1) between feature maps, sparse at the level of whole kernels.

    A connection is one 3 x 3 kernel from an input map (column slot) to an output map (row slot), the unit of
    allocation, drop, grow and reservation (paper, Sec. 4). ``W`` is a ``scipy.sparse.bsr_array`` of shape
    (out maps, 9 * in maps) with (1, 9) blocks: block CSR over kernels, ``W.data`` (nnz, 1, 9). ``weights`` is the
    (nnz, 9) view of it; ``owner`` and ``importance`` (a kernel's Omega, the sum over its nine weights) are aligned
    with the kernels. Maps are (maps, height, width, batch) float32.

    Two computation paths give the same result: direct sparse kernels whose cost is 9 multiply-adds per live
    kernel, pixel and sample, and a dense one (im2col, then one BLAS product with the weights scattered into a
    dense (out maps, 9 * in maps) matrix, a transient buffer of a few hundred KB at most). ``dense_path`` picks the
    dense one when the kernel density reaches ``DENSE_MIN_DENSITY`` (``FEW_MAPS_DENSE_MIN_DENSITY`` for layers with
    fewer than ``FEW_INPUT_MAPS`` input maps), the crossovers measured by ``benchmarks/conv_paths.py``;
    ``force_path`` ("sparse" or "dense") overrides it for benchmarks and tests.
    """

    taps = 9
    DENSE_MIN_DENSITY = 0.7  # measured crossover 0.6-0.75 for 32 and 64 input maps (benchmarks/results/conv_paths.md)
    FEW_INPUT_MAPS = 8  # below this (the 3 image channels: a 27-long GEMM) im2col pays off only near full density
    FEW_MAPS_DENSE_MIN_DENSITY = 0.95

    def __init__(self, in_index, out_index, height, width):
        self.height, self.width = int(height), int(width)
        if self.height < 1 or self.width < 2:
            raise ValueError(f"a 3 x 3 convolution needs maps of height >= 1 and width >= 2, got "
                             f"{self.height} x {self.width}")
        self.force_path = None
        self._cols = None  # (source x, im2col of x) of the last dense forward pass, reused by weight_grad
        self._buffers = {}
        super().__init__(in_index, out_index)

    def _build_matrix(self, weights, indices, indptr):
        shape = (self.out_index.n_slots, self.taps * self.in_index.n_slots)
        self.W = scipy.sparse.bsr_array((weights.reshape(-1, 1, self.taps), indices, indptr), shape=shape,
                                        blocksize=(1, self.taps))

    @property
    def weights(self):
        return self.W.data.reshape(-1, self.taps)

    @property
    def density(self):
        """Live kernels over all (in maps x out maps) positions."""
        return self._density(self.nnz)

    def _density(self, kernel_count):
        return kernel_count / max(1, self.in_index.n_slots * self.out_index.n_slots)

    def dense_path(self, kernel_count=None):
        """Whether the dense im2col + BLAS path is the faster one for ``kernel_count`` kernels (default: the
        layer's)."""
        if self.force_path is not None:
            return self.force_path == "dense"
        few_maps = self.in_index.n_slots < self.FEW_INPUT_MAPS
        threshold = self.FEW_MAPS_DENSE_MIN_DENSITY if few_maps else self.DENSE_MIN_DENSITY
        return self._density(self.nnz if kernel_count is None else kernel_count) >= threshold

    def dense_weights(self):
        """The kernels scattered into a dense (out maps, 9 * in maps) float32 matrix, im2col's column order."""
        dense = np.zeros((self.out_index.n_slots, self.in_index.n_slots, self.taps), np.float32)
        dense[self.rows, self.indices] = self.weights
        return dense.reshape(self.out_index.n_slots, -1)

    def forward(self, x, out, relu, active_only=False, pool=None):
        """``out = conv3x3(x, W) + bias`` (then ReLU). x (in maps, H, W, batch), out (out maps, H, W, batch).

        ``pool``: (pooled, argmax), both (out maps, H // 2, W // 2, batch) (float32, uint8), to also write the
        2 x 2 max pooling of ``out`` (``kernels.max_pool2``), which the sparse path does while ``out`` is in cache.
        With ``pool``, ``out`` may be None: the maps before pooling are then not kept (returns None).
        """
        self._cols = None
        if out is None and pool is None:
            raise ValueError("SparseConv2d.forward: out=None needs pool (nothing would keep the result)")
        if not self.dense_path():
            kernel = kernels.pick(kernels.conv_forward, self.nnz * 9 * x[0].size)
            pooled = kernels.NO_POOL if pool is None else (_rows(pool[0]), _rows(pool[1]))
            maps = kernels.NO_MAPS if out is None else _rows(out)
            kernel(self.indptr, self.indices, self.weights, self.bias, _rows(x), maps, x.shape[3], relu, *pooled)
            return out
        if out is None:  # the dense path computes whole maps, then pools them
            self.forward(x, self._workspace("maps", (self.out_index.n_slots,) + x.shape[1:]), relu, pool=pool)
            return None
        cols = self._im2col(x)
        flat = out.reshape(out.shape[0], -1)
        np.matmul(self.dense_weights(), cols.reshape(cols.shape[0], -1), out=flat)
        kernels.pick_by_elements(kernels.add_bias, flat.size)(flat, self.bias, relu)
        if pool is not None:
            kernels.pick_by_elements(kernels.max_pool2, out.size)(out, *pool)
        return out

    def _im2col(self, x):
        """im2col of x (in maps, H, W, batch) into a reused buffer, remembered for ``weight_grad``."""
        cols = self._workspace("cols", (9 * x.shape[0],) + x.shape[1:])
        kernels.pick(kernels.im2col, cols.size)(x, cols)
        self._cols = (x, cols)
        return cols

    def _workspace(self, name, shape):
        """A float32 buffer kept between batches (no page faults on every call)."""
        if name not in self._buffers or self._buffers[name].shape != shape:
            self._buffers[name] = buffers.aligned_empty(shape)
        return self._buffers[name]

    def backward_input(self, delta, input_activation, out, leaf_sums=None, unused=None):
        """Gradient at the input maps through their ReLU. delta (out maps, H, W, batch),
        input_activation/out (in maps, H, W, batch). ``leaf_sums``: (in maps, ``kernels.leaf_count``) float32 to
        receive the block sums of ``out`` that ``kernels.tree_sums`` turns into its per-map sums. ``unused``: bool
        (in maps,), maps whose gradient the caller does not read: the sparse path gives them zeros without
        computing them."""
        leaves = kernels.NO_LEAVES if leaf_sums is None else leaf_sums
        skip = kernels.NO_SKIP if unused is None else unused
        if not self.dense_path():
            kernel = kernels.pick(kernels.conv_backward_input, self.nnz * 9 * delta[0].size)
            kernel(self.col_ptr, self.col_order, self.rows, self.weights, _rows(delta), _rows(input_activation),
                   _rows(out), delta.shape[3], leaves, skip)
            return out
        cols = self._workspace("grad_cols", (9 * out.shape[0],) + out.shape[1:])
        np.matmul(self.dense_weights().T, delta.reshape(delta.shape[0], -1), out=cols.reshape(cols.shape[0], -1))
        kernels.pick(kernels.col2im, cols.size)(cols, input_activation, out)
        if leaves.size:
            kernels.pick_by_elements(kernels.map_block_sums, out.size)(out.reshape(out.shape[0], -1), leaves)
        return out

    def weight_grad(self, connections, delta, x):
        """dL/dW at the kernels ``connections``. delta (out maps, H, W, batch), x (in maps, H, W, batch).
        Returns (m, 9) float32."""
        m = connections.shape[0]
        if not self.dense_path(m):
            grad = np.empty((m, self.taps), np.float32)
            kernel = kernels.pick(kernels.conv_weight_grad, m * 9 * x[0].size)
            kernel(connections, self.rows, self.indices, _rows(delta), _rows(x), grad, x.shape[3])
            return grad
        cols = self._cols[1] if self._cols is not None and self._cols[0] is x else self._im2col(x)
        full = delta.reshape(delta.shape[0], -1) @ cols.reshape(cols.shape[0], -1).T
        full = full.reshape(self.out_index.n_slots, self.in_index.n_slots, self.taps)
        return full[self.rows[connections], self.indices[connections]]

    def sgd_step(self, connections, grad, lr):
        """SGD on whole kernels; a kernel's Omega grows by the sum over its weights. grad (m, 9)."""
        kernel = kernels.pick_by_elements(kernels.sgd_step_kernels, connections.size)
        kernel(connections, grad, np.float32(lr), self.weights, self.importance)

    def to_scipy(self):
        """The kernels over map slots (the map ids: ``SparseCNN`` indexes maps densely): a ``bsr_array`` of shape
        (out maps, 9 * in maps) with (1, 9) blocks, a copy."""
        return self.W.copy()


def _rows(maps):
    """(maps, H, W, batch) -> the (maps, H, W * batch) view the convolution kernels take."""
    return maps.reshape(maps.shape[0], maps.shape[1], -1)
