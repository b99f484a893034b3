"""Cache-line aligned arrays for the kernels' activations and gradients.

NumPy's large arrays start 16 bytes past a page boundary (glibc's block header), so every other 32-byte vector
load of a kernel's row crosses a cache line, and every such array sits at the same offset from a 4 KB boundary,
so a kernel's loads from one array and stores to another may alias in the CPU's store forwarding. On a Zen 3
EPYC (AVX2) the convolution kernels ran 1.12-1.38x faster on these arrays (``benchmarks/conv_alignment.py``), with
the same bits: the arithmetic does not depend on where the arrays are.
"""
import itertools

import numpy as np

ALIGNMENT = 64  # bytes: one cache line
STAGGER = 1088  # bytes between the page offsets of consecutive arrays (17 cache lines: 4096 / 64 = 64 offsets)
_next_offset = itertools.count()


def empty_at(shape, dtype, page_offset):
    """An uninitialized C-contiguous array of ``shape`` whose data start ``page_offset`` bytes (0-4095) past a page
    boundary. Allocated by NumPy (tracemalloc sees it): a view of a slightly larger uint8 array, kept alive by it."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(size + 2 * 4096, np.uint8)
    start = -raw.ctypes.data % 4096 + page_offset
    return raw[start:start + size].view(dtype).reshape(shape)


def aligned_empty(shape, dtype=np.float32):
    """``empty_at`` a cache line, at a page offset other than those of the last 63 arrays made here."""
    return empty_at(shape, dtype, next(_next_offset) * STAGGER % 4096 // ALIGNMENT * ALIGNMENT)


def aligned_zeros(shape, dtype=np.float32):
    """``aligned_empty`` filled with zeros."""
    array = aligned_empty(shape, dtype)
    array.fill(0)
    return array


def aligned_copy(array):
    """``aligned_empty`` holding a copy of ``array``."""
    copied = aligned_empty(array.shape, array.dtype)
    copied[...] = array
    return copied
