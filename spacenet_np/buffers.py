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


def aligned_empty(shape, dtype=np.float32):
    """An uninitialized C-contiguous array of ``shape`` whose data start on a cache line, at a page offset that
    differs from the last few arrays made here. Allocated by NumPy (tracemalloc sees it); a view of a slightly
    larger uint8 array, which it keeps alive."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    offset = next(_next_offset) * STAGGER % 4096 // ALIGNMENT * ALIGNMENT
    raw = np.empty(size + 4096 + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT + offset
    return raw[start:start + size].view(dtype).reshape(shape)


def aligned_zeros(shape, dtype=np.float32):
    """``aligned_empty`` filled with zeros."""
    array = aligned_empty(shape, dtype)
    array.fill(0)
    return array
