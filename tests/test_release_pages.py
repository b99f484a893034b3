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


def mapped_file_rss(folder, name_part):
    """(number of mappings, resident bytes) of this process's mappings of files under ``folder`` whose path
    contains ``name_part`` (/proc/self/smaps)."""
    count, total, inside = 0, 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
                inside = len(fields) > 5 and fields[5].startswith(f"{folder}/") and name_part in fields[5]
                count += inside
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return count, total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_a_run_leaves_no_image_pages_resident(tmp_path):
    """experiment.run releases each task's training images after the task and every test set after evaluating it:
    at the end only the pages that two tasks' slices share (one or two per task) may stay."""
    from helpers import write_tiny_dataset

    from spacenet_np import experiment
    write_tiny_dataset(tmp_path, "mnist", n_train=8000, n_test=3000)  # 6.3 MB and 2.4 MB of images
    spec = experiment.make_spec("split_mnist", data_dir=tmp_path, hidden=[30, 30],
                                config={"connections_per_task": [300, 50, 20], "selected_neurons": 10,
                                        "reserved_neurons": 4, "epochs": 1})
    assert len(experiment.run(spec)["accuracy_matrix"]) == 5
    for images in ("train-images", "t10k-images"):
        mappings, resident = mapped_file_rss(tmp_path, f"{images}-idx3-ubyte")
        assert mappings >= 1, f"the {images} cache is not memory-mapped"
        assert resident <= 10 * mmap.PAGESIZE, f"{resident} bytes of {images} stay resident"
