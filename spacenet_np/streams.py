"""Class-incremental task streams (Split MNIST, Split Fashion-MNIST, Split CIFAR-10, CIFAR-10/100).

Images stay uint8 in the stream to keep memory small; they are standardized per batch as
``(x / 255 - stream.mean) / stream.std``, or per feature with ``stream.feature_mean``/``stream.feature_std``
when the stream has them (the CIFAR streams: per-channel statistics); see :meth:`Stream.standardize`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass

import numpy as np

from spacenet_np.data import CIFAR10, CIFAR100, CIFAR_IMAGE_SHAPE, load_cifar, load_mnist_like, release_pages

__all__ = [
    "STREAMS",
    "Stream",
    "Task",
    "channel_mean_std",
    "cifar10_100",
    "get_stream",
    "pixel_mean_std",
    "split_cifar10",
    "split_fashion_mnist",
    "split_mnist",
    "stream_fingerprint",
    "validation_split",
]

N_CLASSES = 10
CLASSES_PER_TASK = 2
MNIST_IMAGE_SHAPE = (1, 28, 28)

# cifar10_100: task 1 is all of CIFAR-10 (labels 0-9); then CIFAR100_TASKS tasks of CIFAR100_CLASSES_PER_TASK
# consecutive CIFAR-100 fine classes from 0 on, whose labels are shifted by CIFAR100_LABEL_OFFSET.
CIFAR100_TASKS = 5
CIFAR100_CLASSES_PER_TASK = 10
CIFAR100_LABEL_OFFSET = N_CLASSES

# The standardization of the official SpaceNet/PyTorch MNIST code (pixel / 255).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

# The validation split's seed: fixed and independent of the run seed, so every run and trial sees the same split.
VALIDATION_SEED = 20211101

# Rows per bincount call in pixel_mean_std: bincount widens its input to int64, so chunks keep the
# temporary small (1024 rows = 6 MB) instead of 8x the whole training set.
STATS_CHUNK_ROWS = 1024


# eq=False: the fields are arrays, so the generated __eq__/__hash__ would fail; identity is what we want.
@dataclass(frozen=True, eq=False)
class Task:
    """One task of a stream: the samples of ``classes`` (global labels), grouped by class in the dataset's
    order (a task holding a whole dataset, like task 1 of ``cifar10_100``, keeps the file order).

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

    ``mean``/``std`` are scalar statistics of pixel / 255 values. ``feature_mean``/``feature_std``, when
    given, are ``(n_features,)`` per-feature statistics (for the CIFAR streams, each channel's training mean
    and std repeated over its 1024 pixels) and take precedence in :meth:`standardize`. ``image_shape`` is the
    ``(channels, height, width)`` of a feature row, e.g. ``(1, 28, 28)`` or ``(3, 32, 32)`` (channel-major
    rows), or None if unknown.
    """

    name: str
    tasks: tuple[Task, ...]
    n_classes: int
    n_features: int
    mean: float
    std: float
    feature_mean: np.ndarray | None = None
    feature_std: np.ndarray | None = None
    image_shape: tuple[int, ...] | None = None

    def __post_init__(self):
        if (self.feature_mean is None) != (self.feature_std is None):
            raise ValueError("feature_mean and feature_std must be given together")
        if self.feature_mean is not None:
            for name in ("feature_mean", "feature_std"):
                values = np.array(getattr(self, name), dtype=np.float64)  # a private read-only copy
                if values.shape != (self.n_features,) or not np.all(np.isfinite(values)):
                    raise ValueError(
                        f"{name} must be {self.n_features} finite values, got shape {values.shape}"
                    )
                values.flags.writeable = False
                object.__setattr__(self, name, values)
            if np.any(self.feature_std <= 0):
                raise ValueError("feature_std must be positive")
        if self.image_shape is not None:
            shape = tuple(int(d) for d in self.image_shape)
            if len(shape) != 3 or math.prod(shape) != self.n_features:
                raise ValueError(f"image_shape {shape} must be (channels, height, width) with "
                                 f"{self.n_features} values in all")
            object.__setattr__(self, "image_shape", shape)

    @property
    def n_channels(self) -> int | None:
        """Channels of an image (``image_shape[0]``), or None if the image shape is unknown."""
        return None if self.image_shape is None else self.image_shape[0]

    def standardize(self, x_uint8: np.ndarray) -> np.ndarray:
        """``(x / 255 - mean) / std`` as float32, same shape as ``x_uint8`` (e.g. ``(n, 784)``); per feature
        (the last axis) with ``feature_mean``/``feature_std`` when the stream has them. Float features (an npz
        stream's) are already standardized: returned as float32 values as they are, as ``Learner`` uses them."""
        if x_uint8.dtype != np.uint8:
            return np.asarray(x_uint8, dtype=np.float32)
        x = x_uint8.astype(np.float32) / np.float32(255.0)
        if self.feature_mean is not None:
            return (x - self.feature_mean.astype(np.float32)) / self.feature_std.astype(np.float32)
        return (x - np.float32(self.mean)) / np.float32(self.std)


def pixel_mean_std(x_uint8: np.ndarray) -> tuple[float, float]:
    """Exact mean and (population) std of all ``x_uint8 / 255`` values, for any shape such as ``(n, 784)``.

    Counts each of the 256 pixel values instead of converting the array to float, which would need a
    376 MB temporary for 60000 x 784 pixels.
    """
    return _mean_std_from_counts(_pixel_counts(x_uint8.reshape(len(x_uint8), -1)))


def _pixel_counts(rows: np.ndarray) -> np.ndarray:
    """How often each value 0..255 occurs in the 2-d uint8 array ``rows`` (may be a strided view)."""
    counts = np.zeros(256, dtype=np.int64)
    for start in range(0, len(rows), STATS_CHUNK_ROWS):
        counts += np.bincount(rows[start : start + STATS_CHUNK_ROWS].ravel(), minlength=256)
    return counts


def _mean_std_from_counts(counts: np.ndarray) -> tuple[float, float]:
    """Mean and population std of pixel / 255 values given the count of each value 0..255."""
    values = np.arange(256) / 255.0
    n = counts.sum()
    mean = (counts * values).sum() / n
    variance = (counts * (values - mean) ** 2).sum() / n
    return float(mean), float(np.sqrt(variance))


def channel_mean_std(arrays, n_channels: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Per-channel and overall mean and (population) std of pixel / 255 values over all rows of ``arrays``.

    Each array is uint8 ``(n, n_channels * pixels)`` with channel-major rows (all pixels of channel 0, then of
    channel 1, ...). Returns ``(channel_means (C,), channel_stds (C,), mean, std)``, counting pixel values as
    :func:`pixel_mean_std` does.
    """
    counts = np.zeros((n_channels, 256), dtype=np.int64)
    for x in arrays:
        planes = x.reshape(len(x), n_channels, -1)
        for channel in range(n_channels):
            counts[channel] += _pixel_counts(planes[:, channel])
    if not counts.sum():
        raise ValueError("cannot compute pixel statistics of empty data")
    stats = np.array([_mean_std_from_counts(c) for c in counts])
    mean, std = _mean_std_from_counts(counts.sum(axis=0))
    return stats[:, 0], stats[:, 1], mean, std


def _class_slice(labels: np.ndarray, classes: tuple[int, ...]) -> slice:
    """The slice of ``labels`` (sorted by label) holding exactly ``classes`` (consecutive ints)."""
    return slice(int(np.searchsorted(labels, classes[0], "left")), int(np.searchsorted(labels, classes[-1], "right")))


def _class_groups(first: int, n_tasks: int, per_task: int) -> list[tuple[int, ...]]:
    """``n_tasks`` tuples of ``per_task`` consecutive classes from ``first`` on."""
    return [tuple(range(first + i * per_task, first + (i + 1) * per_task)) for i in range(n_tasks)]


def _split_tasks(
    x_train, y_train, x_test, y_test, class_groups=None, first_index: int = 0
) -> tuple[Task, ...]:
    """Split data sorted by label into tasks of the classes in ``class_groups`` (default [0, 1], [2, 3], ...,
    [8, 9]), numbered from ``first_index``, keeping the original order in a class.

    Takes uint8 images ``(n, n_features)`` and labels ``(n,)`` for each split. Task arrays are read-only
    views, so the stream holds the images once.
    """
    if class_groups is None:
        class_groups = _class_groups(0, N_CLASSES // CLASSES_PER_TASK, CLASSES_PER_TASK)
    y_train64, y_test64 = y_train.astype(np.int64), y_test.astype(np.int64)
    for labels in (y_train64, y_test64):
        labels.flags.writeable = False
    tasks = []
    for index, classes in enumerate(class_groups, start=first_index):
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
        image_shape=MNIST_IMAGE_SHAPE,
    )


def _image_stream(
    name: str, tasks: tuple[Task, ...], n_classes: int, image_shape: tuple[int, int, int]
) -> Stream:
    """A Stream standardized per channel with the statistics of all its tasks' training images."""
    n_channels = image_shape[0]
    pixels = math.prod(image_shape[1:])
    channel_means, channel_stds, mean, std = channel_mean_std([task.x_train for task in tasks], n_channels)
    return Stream(
        name=name,
        tasks=tasks,
        n_classes=n_classes,
        n_features=n_channels * pixels,
        mean=mean,
        std=std,
        feature_mean=np.repeat(channel_means, pixels),
        feature_std=np.repeat(channel_stds, pixels),
        image_shape=image_shape,
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


def split_cifar10(data_dir: str | os.PathLike | None = None) -> Stream:
    """Split CIFAR-10: 5 tasks of 2 consecutive classes each, standardized per channel with the
    training-pixel statistics (about 0.4914 0.4822 0.4465 / 0.2470 0.2435 0.2616). Images are uint8
    ``(n, 3072)``, channel-major (``image_shape`` (3, 32, 32))."""
    data = load_cifar(CIFAR10, data_dir, group_by_label=True)
    return _image_stream("split_cifar10", _split_tasks(*data), N_CLASSES, CIFAR_IMAGE_SHAPE)


def cifar10_100(data_dir: str | os.PathLike | None = None) -> Stream:
    """CIFAR-10/100: task 1 is all of CIFAR-10 (labels 0-9, file order); tasks 2-6 are the CIFAR-100 fine
    classes 0-9, 10-19, ..., 40-49 with labels 10-59 (fine label + 10). 60 classes; standardized per channel
    with the statistics of all the stream's training images (CIFAR-10 train plus the 25000 CIFAR-100 training
    images used).
    """
    # CIFAR-100 first: if it is missing, fail before spending time on CIFAR-10.
    n_cifar100 = CIFAR100_TASKS * CIFAR100_CLASSES_PER_TASK
    x100_train, y100_train, x100_test, y100_test = load_cifar(
        CIFAR100, data_dir, group_by_label=True, classes=range(n_cifar100)
    )
    x_train, y_train, x_test, y_test = load_cifar(CIFAR10, data_dir)
    first = Task(index=0, classes=tuple(range(N_CLASSES)), x_train=x_train, y_train=y_train,
                 x_test=x_test, y_test=y_test)
    groups = _class_groups(CIFAR100_LABEL_OFFSET, CIFAR100_TASKS, CIFAR100_CLASSES_PER_TASK)
    offset = CIFAR100_LABEL_OFFSET
    rest = _split_tasks(x100_train, y100_train + offset, x100_test, y100_test + offset, groups, first_index=1)
    return _image_stream("cifar10_100", (first, *rest), CIFAR100_LABEL_OFFSET + n_cifar100, CIFAR_IMAGE_SHAPE)


STREAMS = {
    "split_mnist": split_mnist,
    "split_fashion_mnist": split_fashion_mnist,
    "split_cifar10": split_cifar10,
    "cifar10_100": cifar10_100,
}


def get_stream(name: str, data_dir: str | os.PathLike | None = None, **options) -> Stream:
    """The stream called ``name`` (a key of :data:`STREAMS`), or ``npz:PATH`` (your own data, see
    ``npz_stream``; ``options``: ``classes_per_task``, ``class_order``). ValueError listing the known names."""
    if name.startswith("npz:"):
        from .npz_stream import load_npz_stream  # npz_stream imports this module
        return load_npz_stream(name, **options)
    if name not in STREAMS:
        raise ValueError(f"unknown stream {name!r}; known streams: {', '.join(sorted(STREAMS))}, or npz:PATH")
    if options:
        raise ValueError(f"stream {name!r} takes no options (given: {', '.join(sorted(options))}); "
                         f"classes_per_task and class_order apply to npz:PATH streams")
    return STREAMS[name](data_dir)


def validation_split(stream: Stream, fraction: float, seed: int = VALIDATION_SEED) -> tuple[Stream, tuple, dict]:
    """Hold out ``fraction`` of each task's training images, stratified by class, as validation data.

    In every class, ``round(fraction * n)`` images drawn with ``default_rng([seed, class])`` are held out, so the
    split depends only on the data, the fraction and ``seed``, never on the run seed. Both parts keep the file
    order. Returns ``(train_stream, validation_tasks, record)``: the stream with the remaining training images;
    one ``Task`` per task whose ``x_test``/``y_test`` are its validation images (its ``x_train`` is empty), so
    ``metrics.evaluate_tasks`` applies to it; and ``{"fraction", "seed", "train_counts", "validation_counts"}``.
    ValueError if ``fraction`` is not in [0, 1) or leaves a class with no image on either side.
    """
    if not (isinstance(fraction, (int, float)) and 0.0 <= fraction < 1.0):
        raise ValueError(f"validation fraction {fraction!r} must be in [0, 1)")
    if fraction == 0:
        return stream, (), {"fraction": 0.0, "seed": seed, "train_counts": [len(t.y_train) for t in stream.tasks],
                            "validation_counts": [0] * len(stream.tasks)}
    train_tasks, val_tasks = [], []
    for task in stream.tasks:
        held = np.zeros(task.y_train.size, dtype=bool)
        for label in np.unique(task.y_train):
            ids = np.flatnonzero(task.y_train == label)
            n_held = int(round(fraction * ids.size))
            if not 0 < n_held < ids.size:
                raise ValueError(f"validation fraction {fraction} holds out {n_held} of the {ids.size} training "
                                 f"images of class {label} in {stream.name}: each side needs at least one")
            rng = np.random.default_rng([seed, int(label)])
            held[rng.choice(ids, size=n_held, replace=False)] = True
        train_tasks.append(dataclasses.replace(task, x_train=_frozen(task.x_train[~held]),
                                               y_train=_frozen(task.y_train[~held])))
        val_tasks.append(Task(index=task.index, classes=task.classes, x_train=task.x_train[:0],
                              y_train=task.y_train[:0], x_test=_frozen(task.x_train[held]),
                              y_test=_frozen(task.y_train[held])))
    record = {"fraction": float(fraction), "seed": seed, "train_counts": [len(t.y_train) for t in train_tasks],
              "validation_counts": [len(t.y_test) for t in val_tasks]}
    return dataclasses.replace(stream, tasks=tuple(train_tasks)), tuple(val_tasks), record


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def stream_fingerprint(stream: Stream) -> str:
    """A sha256 (hex) of the stream's name, classes, statistics and every task's arrays: two runs with the same
    fingerprint trained and tested on the same data."""
    h = hashlib.sha256()
    h.update(repr((stream.name, stream.n_classes, stream.n_features, stream.mean, stream.std,
                   stream.image_shape)).encode())
    for stats in (stream.feature_mean, stream.feature_std):
        if stats is not None:
            h.update(np.ascontiguousarray(stats).tobytes())
    for task in stream.tasks:
        h.update(repr((task.index, tuple(task.classes))).encode())
        for array in (task.x_train, task.y_train, task.x_test, task.y_test):
            h.update(repr((array.dtype.str, array.shape)).encode())
            h.update(hashlib.blake2b(np.ascontiguousarray(array).data, digest_size=32).digest())
            release_pages(array)  # hashing must not keep every image of the stream in memory
    return h.hexdigest()
