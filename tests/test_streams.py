"""Tests for spacenet_np.streams on tiny generated datasets."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from spacenet_np.data import FILES
from spacenet_np.streams import (
    MNIST_MEAN,
    MNIST_STD,
    STREAMS,
    Stream,
    get_stream,
    pixel_mean_std,
    split_fashion_mnist,
    split_mnist,
)

EXPECTED_CLASSES = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped IDX file (big-endian header: magic then dims)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def make_split(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(n, 28, 28)`` whose first pixel is the sample index (to check order) and shuffled labels
    covering all 10 classes."""
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(n)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    return images, labels


@pytest.fixture
def tiny_root(tmp_path) -> tuple[Path, dict]:
    """A data root with tiny mnist/ and fashion-mnist/ folders (40 train, 20 test samples each)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for dataset in ("mnist", "fashion-mnist"):
        split_arrays = (*make_split(40, rng), *make_split(20, rng))
        arrays[dataset] = split_arrays
        for filename, array in zip(FILES, split_arrays):
            write_idx_gz(tmp_path / dataset / filename, array)
    return tmp_path, arrays


def test_split_mnist_tasks(tiny_root):
    root, arrays = tiny_root
    x_train, y_train, x_test, y_test = arrays["mnist"]
    stream = split_mnist(root)
    assert isinstance(stream, Stream)
    assert stream.name == "split_mnist"
    assert (stream.n_classes, stream.n_features) == (10, 784)
    assert [task.index for task in stream.tasks] == [0, 1, 2, 3, 4]
    assert [task.classes for task in stream.tasks] == EXPECTED_CLASSES
    for task in stream.tasks:
        splits = [(task.x_train, task.y_train, x_train, y_train), (task.x_test, task.y_test, x_test, y_test)]
        for x, y, all_x, all_y in splits:
            assert x.dtype == np.uint8 and x.shape == (len(y), 784)
            assert y.dtype == np.int64
            assert set(np.unique(y)) == set(task.classes)
            # Grouped by class, the file order kept within a class: the first pixel encodes the index.
            expected_indices = np.concatenate([np.flatnonzero(all_y == c) for c in task.classes])
            np.testing.assert_array_equal(x[:, 0], expected_indices)
            np.testing.assert_array_equal(x, all_x.reshape(len(all_x), 784)[expected_indices])
            np.testing.assert_array_equal(y, all_y[expected_indices])
    assert sum(len(task.y_train) for task in stream.tasks) == len(y_train)


def test_task_arrays_are_read_only(tiny_root):
    root, _ = tiny_root
    task = split_mnist(root).tasks[0]
    with pytest.raises(ValueError):
        task.x_train[0, 0] = 1


def test_mnist_uses_official_standardization(tiny_root):
    root, _ = tiny_root
    stream = split_mnist(root)
    assert (stream.mean, stream.std) == (MNIST_MEAN, MNIST_STD) == (0.1307, 0.3081)


def test_fashion_mean_std_from_training_pixels(tiny_root):
    root, arrays = tiny_root
    stream = split_fashion_mnist(root)
    assert stream.name == "split_fashion_mnist"
    train_pixels = arrays["fashion-mnist"][0] / 255.0
    assert stream.mean == pytest.approx(train_pixels.mean(), rel=1e-12)
    assert stream.std == pytest.approx(train_pixels.std(), rel=1e-12)
    assert [task.classes for task in stream.tasks] == EXPECTED_CLASSES


def test_pixel_mean_std_spans_chunks(monkeypatch):
    monkeypatch.setattr("spacenet_np.streams.STATS_CHUNK_ROWS", 3)
    x = np.random.default_rng(1).integers(0, 256, size=(10, 784), dtype=np.uint8)
    mean, std = pixel_mean_std(x)
    assert mean == pytest.approx((x / 255.0).mean(), rel=1e-12)
    assert std == pytest.approx((x / 255.0).std(), rel=1e-12)


def test_standardize(tiny_root):
    root, _ = tiny_root
    stream = split_fashion_mnist(root)
    x = stream.tasks[1].x_test
    standardized = stream.standardize(x)
    assert standardized.dtype == np.float32 and standardized.shape == x.shape
    np.testing.assert_allclose(standardized, (x / 255.0 - stream.mean) / stream.std, rtol=1e-5, atol=1e-5)


def test_get_stream(tiny_root):
    root, _ = tiny_root
    assert {"split_mnist", "split_fashion_mnist", "split_cifar10", "cifar10_100"} <= set(STREAMS)
    assert get_stream("split_mnist", root).name == "split_mnist"


def test_unknown_stream_name():
    with pytest.raises(ValueError, match=r"'split_cifar'.*split_fashion_mnist, split_mnist"):
        get_stream("split_cifar")
