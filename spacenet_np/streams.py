"""Class-incremental task streams (Split MNIST, Split Fashion-MNIST).

Images stay uint8 in the stream to keep memory small; the engine standardizes each batch as
``(x / 255 - stream.mean) / stream.std`` (see :meth:`Stream.standardize`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from spacenet_np.data import load_mnist_like

__all__ = ["STREAMS", "Stream", "Task", "get_stream", "split_fashion_mnist", "split_mnist"]

N_CLASSES = 10
CLASSES_PER_TASK = 2

# The standardization of the official SpaceNet/PyTorch MNIST code (pixel / 255).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

# Rows per bincount call in pixel_mean_std: bincount widens its input to int64, so chunks keep the
# temporary small (1024 rows = 6 MB) instead of 8x the whole training set.
STATS_CHUNK_ROWS = 1024


# eq=False: the fields are arrays, so the generated __eq__/__hash__ would fail; identity is what we want.
@dataclass(frozen=True, eq=False)
class Task:
    """One task of a stream: the samples of ``classes`` (global labels), in the dataset's order.

    ``x_train`` is uint8 ``(n_train, n_features)``, ``y_train`` int64 ``(n_train,)`` with global labels;
    likewise ``x_test``/``y_test``. The arrays are read-only.
    """

    index: int
    classes: tuple[int, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True, eq=False)
class Stream:
    """A sequence of class-incremental tasks plus the pixel standardization to apply to its images.

    ``mean``/``std`` are statistics of pixel / 255 values.
    """

    name: str
    tasks: tuple[Task, ...]
    n_classes: int
    n_features: int
    mean: float
    std: float

    def standardize(self, x_uint8: np.ndarray) -> np.ndarray:
        """``(x / 255 - mean) / std`` as float32, same shape as ``x_uint8`` (e.g. ``(n, 784)``)."""
        x = x_uint8.astype(np.float32) / np.float32(255.0)
        return (x - np.float32(self.mean)) / np.float32(self.std)


def pixel_mean_std(x_uint8: np.ndarray) -> tuple[float, float]:
    """Exact mean and (population) std of all ``x_uint8 / 255`` values, for any shape such as ``(n, 784)``.

    Counts each of the 256 pixel values instead of converting the array to float, which would need a
    376 MB temporary for 60000 x 784 pixels.
    """
    rows = x_uint8.reshape(len(x_uint8), -1)
    counts = np.zeros(256, dtype=np.int64)
    for start in range(0, len(rows), STATS_CHUNK_ROWS):
        counts += np.bincount(rows[start : start + STATS_CHUNK_ROWS].ravel(), minlength=256)
    values = np.arange(256) / 255.0
    n = counts.sum()
    mean = (counts * values).sum() / n
    variance = (counts * (values - mean) ** 2).sum() / n
    return float(mean), float(np.sqrt(variance))


def _class_slice(labels: np.ndarray, classes: tuple[int, ...]) -> slice:
    """The slice of ``labels`` (sorted by label) holding exactly ``classes`` (consecutive ints)."""
    return slice(int(np.searchsorted(labels, classes[0], "left")), int(np.searchsorted(labels, classes[-1], "right")))


def _split_tasks(x_train, y_train, x_test, y_test) -> tuple[Task, ...]:
    """Split data sorted by label into tasks of classes [0, 1], [2, 3], ..., keeping the original order in a class.

    Takes uint8 images ``(n, n_features)`` and labels ``(n,)`` for each split. Task arrays are read-only views,
    so the stream holds the images once.
    """
    y_train64, y_test64 = y_train.astype(np.int64), y_test.astype(np.int64)
    for labels in (y_train64, y_test64):
        labels.flags.writeable = False
    tasks = []
    for index, first in enumerate(range(0, N_CLASSES, CLASSES_PER_TASK)):
        classes = tuple(range(first, first + CLASSES_PER_TASK))
        train, test = _class_slice(y_train, classes), _class_slice(y_test, classes)
        tasks.append(Task(index=index, classes=classes, x_train=x_train[train], y_train=y_train64[train],
                          x_test=x_test[test], y_test=y_test64[test]))
    return tuple(tasks)


def _build_stream(name: str, data, mean: float, std: float) -> Stream:
    """A Stream from ``data = (x_train, y_train, x_test, y_test)`` as returned by load_mnist_like."""
    x_train = data[0]
    return Stream(
        name=name,
        tasks=_split_tasks(*data),
        n_classes=N_CLASSES,
        n_features=x_train.shape[1],
        mean=mean,
        std=std,
    )


def split_mnist(data_dir: str | os.PathLike | None = None) -> Stream:
    """Split MNIST: 5 tasks of 2 digits each, standardized with the usual 0.1307 / 0.3081."""
    data = load_mnist_like("mnist", data_dir, group_by_label=True)
    return _build_stream("split_mnist", data, MNIST_MEAN, MNIST_STD)


def split_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Stream:
    """Split Fashion-MNIST: 5 tasks of 2 classes each, standardized with its own training-pixel statistics
    (about 0.2860 / 0.3530)."""
    data = load_mnist_like("fashion-mnist", data_dir, group_by_label=True)
    mean, std = pixel_mean_std(data[0])
    return _build_stream("split_fashion_mnist", data, mean, std)


STREAMS = {"split_mnist": split_mnist, "split_fashion_mnist": split_fashion_mnist}


def get_stream(name: str, data_dir: str | os.PathLike | None = None) -> Stream:
    """The stream called ``name`` (a key of :data:`STREAMS`); ValueError listing the known names otherwise."""
    if name not in STREAMS:
        raise ValueError(f"unknown stream {name!r}; known streams: {', '.join(sorted(STREAMS))}")
    return STREAMS[name](data_dir)
