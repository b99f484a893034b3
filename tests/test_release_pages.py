"""``data.release_pages``: a finished task's memory-mapped images leave the process's memory, values unchanged."""
import mmap
import sys

import numpy as np
import pytest

from spacenet_np.data import release_pages


def resident_bytes():
    """Resident set size now (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


def mapped_array(tmp_path, n_bytes):
    path = tmp_path / "images.bin"
    values = (np.arange(n_bytes) % 251).astype(np.uint8)
    path.write_bytes(values.tobytes())
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mapped, np.uint8).reshape(-1, 1000), values.reshape(-1, 1000)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_release_drops_resident_pages_and_keeps_values(tmp_path):
    images, expected = mapped_array(tmp_path, 64_000_000)
    task = images[5000:60000]  # a view, like a task's slice of the cache
    assert int(task.sum(dtype=np.int64)) == int(expected[5000:60000].sum(dtype=np.int64))  # maps every page
    before = resident_bytes()
    release_pages(task)
    assert before - resident_bytes() > 0.8 * task.nbytes
    np.testing.assert_array_equal(task, expected[5000:60000])  # pages come back from the file


def test_release_leaves_ordinary_arrays_alone():
    array = np.arange(1 << 16, dtype=np.uint8)
    release_pages(array)
    release_pages(array[::2])
    np.testing.assert_array_equal(array, np.arange(1 << 16, dtype=np.uint8))
