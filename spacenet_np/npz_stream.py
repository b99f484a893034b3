"""Your own data as a class-incremental stream: from arrays (``make_stream``) or from a ``.npz`` file (``npz:PATH``).

The ``.npz`` holds ``x_train``, ``y_train``, ``x_test`` and ``y_test``, and optionally ``image_shape``::

    np.savez("mydata.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    python -m spacenet_np.train --task npz:mydata.npz --classes-per-task 2 --class-order 3 1 4 0 2 5

- Features: ``(n, n_features)`` rows, or images ``(n, C, H, W)`` / ``(n, H, W)`` flattened row-major (the image
  shape, for the CNN, then comes from the array unless ``image_shape`` is given). uint8 features are pixels,
  standardized as ``(x / 255 - mean) / std`` with the training pixels' statistics (per channel when the image
  shape has several channels); float features are used as they are (standardize them yourself), and the stream's
  ``mean``/``std`` are then 0 and 1 and unused.
- Labels: any integers. The network's output has one unit per class, so labels are mapped to indices 0..C-1 in
  sorted order (the i-th smallest label is index i; labels 0..C-1 keep their values). Tasks, results and
  checkpoints use these indices; ``class_order`` and the error messages use the original labels.
- Tasks: the classes in ``class_order`` (default: sorted), ``classes_per_task`` at a time. Every class needs at
  least one training and one test sample, and the class count must be divisible by ``classes_per_task``.

Every problem raises ``StreamDataError`` (a ``ValueError``) naming the array (and the file).
"""
from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import numpy as np

from .streams import Stream, Task, channel_mean_std, pixel_mean_std

PREFIX = "npz:"
ARRAYS = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL = ("image_shape",)
OPTION_NAMES = ("classes_per_task", "class_order")
DEFAULT_CLASSES_PER_TASK = 2


class StreamDataError(ValueError):
    """Arrays that cannot form a stream: a missing array, mismatched lengths, bad labels or values, bad options."""


def is_npz_task(name) -> bool:
    """Whether the task name is ``npz:PATH``."""
    return isinstance(name, str) and name.startswith(PREFIX)


def npz_path(name: str) -> Path:
    """The file of an ``npz:PATH`` task name; StreamDataError for an empty path."""
    path = name[len(PREFIX):]
    if not path:
        raise StreamDataError(f"task {name!r} names no file: write npz:PATH, e.g. npz:data/mine.npz")
    return Path(path)


def normalize_task(name: str) -> str:
    """``npz:PATH`` with PATH absolute, so a run resumes (and a sweep's workers load) from any folder."""
    return PREFIX + str(npz_path(name).expanduser().resolve())


def stream_options(classes_per_task=None, class_order=None) -> dict:
    """The complete, checked stream options of an npz task: ``{"classes_per_task": int, "class_order": list or
    None}`` (None: the default, sorted order). StreamDataError naming a bad value; the labels are checked when
    the data load."""
    cpt = DEFAULT_CLASSES_PER_TASK if classes_per_task is None else classes_per_task
    if isinstance(cpt, bool) or not isinstance(cpt, (int, np.integer)) or cpt < 1:
        raise StreamDataError(f"classes_per_task={classes_per_task!r} must be an integer >= 1")
    order = None
    if class_order is not None:
        if isinstance(class_order, (str, bytes)) or not hasattr(class_order, "__iter__"):
            raise StreamDataError(f"class_order={class_order!r} must be a list of integer labels")
        order = list(class_order)
        bad = [c for c in order if isinstance(c, bool) or not isinstance(c, (int, np.integer))]
        if bad or not order:
            raise StreamDataError(f"class_order={order!r} must be a non-empty list of integer labels")
        order = [int(c) for c in order]
    return {"classes_per_task": int(cpt), "class_order": order}


# ----- from arrays -----
def make_stream(x_train, y_train, x_test, y_test, classes_per_task=2, class_order=None, image_shape=None,
                name="arrays") -> Stream:
    """A class-incremental ``Stream`` from arrays.

    ``x_*``: (n, n_features) uint8 pixels or finite floats, or images (n, C, H, W) / (n, H, W); ``y_*``: (n,)
    integer labels. Tasks hold ``classes_per_task`` classes each, in ``class_order`` (original labels; default
    sorted). Labels become indices 0..C-1 in sorted order. ``image_shape`` (C, H, W) is optional (for the CNN).
    ``name`` names the stream in errors and results. Raises StreamDataError naming the array.
    """
    options = stream_options(classes_per_task, class_order)
    where = f" in {name}"
    x_train, shape_train = check_features(x_train, "x_train", where)
    x_test, shape_test = check_features(x_test, "x_test", where)
    if x_train.shape[1] != x_test.shape[1]:
        raise StreamDataError(f"x_train has {x_train.shape[1]} features but x_test has {x_test.shape[1]}{where}")
    if (x_train.dtype == np.uint8) != (x_test.dtype == np.uint8):
        raise StreamDataError(f"x_train is {x_train.dtype} but x_test is {x_test.dtype}{where}: both must be uint8 "
                              f"pixels or both floats")
    y_train = check_labels(y_train, "y_train", x_train.shape[0], "x_train", where)
    y_test = check_labels(y_test, "y_test", x_test.shape[0], "x_test", where)
    labels = class_labels(y_train, y_test, where)
    groups = task_groups(labels, options["classes_per_task"], options["class_order"], where)
    image_shape = check_image_shape(image_shape if image_shape is not None else shape_train or shape_test,
                                    x_train.shape[1], where)
    index_train, index_test = np.searchsorted(labels, y_train), np.searchsorted(labels, y_test)
    tasks = tuple(build_task(i, classes, x_train, index_train, x_test, index_test) for i, classes in enumerate(
        [np.searchsorted(labels, group) for group in groups]))
    return stream_from_tasks(name, tasks, labels.size, x_train, image_shape)


def check_features(x, name, where):
    """``x`` as a read-only (n, n_features) uint8 or float array, and the image shape its dimensions give (or
    None). StreamDataError naming ``name`` for another dtype, shape, or a non-finite value."""
    x = np.asarray(x)
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise StreamDataError(f"{name} has dtype {x.dtype}{where}: features must be uint8 pixels or floats")
    if x.ndim not in (2, 3, 4) or x.shape[0] == 0 or 0 in x.shape[1:]:
        raise StreamDataError(f"{name} has shape {x.shape}{where}: it needs (n, n_features), (n, H, W) or "
                              f"(n, C, H, W) with n >= 1 samples and at least one feature")
    shape = None if x.ndim == 2 else ((1,) + x.shape[1:] if x.ndim == 3 else x.shape[1:])
    x = x.reshape(x.shape[0], -1)
    if x.dtype != np.uint8:
        finite = np.isfinite(x)
        if not finite.all():
            row, column = np.argwhere(~finite)[0]
            raise StreamDataError(f"{name} holds {int((~finite).sum())} NaN or infinite values{where} (the first "
                                  f"at sample {row}, feature {column}): features must be finite")
    return frozen(x), shape


def check_labels(y, name, n, x_name, where):
    """``y`` as read-only (n,) int64; StreamDataError naming ``name`` for non-integers, a wrong shape or length."""
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise StreamDataError(f"{name} has dtype {y.dtype}{where}: labels must be integers (cast them, e.g. "
                              f"y.astype(int), after checking they are whole numbers)")
    if y.ndim != 1:
        raise StreamDataError(f"{name} has shape {y.shape}{where}: labels must be one-dimensional (n,)")
    if y.shape[0] != n:
        raise StreamDataError(f"{name} has {y.shape[0]} labels but {x_name} has {n} samples{where}")
    return frozen(y.astype(np.int64))


def class_labels(y_train, y_test, where):
    """The sorted original labels (C,); StreamDataError for a test label unseen in training or a class without
    test samples."""
    labels = np.unique(y_train)
    unseen = np.setdiff1d(y_test, labels)
    if unseen.size:
        raise StreamDataError(f"y_test holds labels {unseen.tolist()} that y_train does not have{where}")
    untested = np.setdiff1d(labels, y_test)
    if untested.size:
        raise StreamDataError(f"classes {untested.tolist()} have no sample in y_test{where}: every class needs test "
                              f"samples to measure its accuracy")
    return labels


def task_groups(labels, classes_per_task, class_order, where):
    """The original labels of each task: a list of (classes_per_task,) arrays. StreamDataError for a class order
    that is not a permutation of ``labels`` or a class count not divisible by ``classes_per_task``."""
    if class_order is None:
        order = labels
    else:
        order = np.asarray(class_order, dtype=np.int64)
        unknown = np.setdiff1d(order, labels)
        if unknown.size:
            raise StreamDataError(f"class_order holds {unknown.tolist()}, which are not classes of y_train{where}; "
                                  f"its classes: {labels.tolist()}")
        values, counts = np.unique(order, return_counts=True)
        if (counts > 1).any():
            raise StreamDataError(f"class_order repeats {values[counts > 1].tolist()}{where}: each class comes once")
        missing = np.setdiff1d(labels, order)
        if missing.size:
            raise StreamDataError(f"class_order lacks the classes {missing.tolist()} of y_train{where}: give every "
                                  f"class once")
    if order.size % classes_per_task:
        divisors = [d for d in range(1, order.size + 1) if order.size % d == 0]
        raise StreamDataError(f"{order.size} classes cannot be split into tasks of {classes_per_task} classes"
                              f"{where}; classes_per_task must divide {order.size}: one of {divisors}")
    return [order[i:i + classes_per_task] for i in range(0, order.size, classes_per_task)]


def check_image_shape(shape, n_features, where):
    """``shape`` as a (C, H, W) tuple of ints whose product is ``n_features``, or None; StreamDataError."""
    if shape is None:
        return None
    values = np.asarray(shape)
    if values.ndim != 1 or values.size != 3 or not np.issubdtype(values.dtype, np.integer) or (values < 1).any():
        raise StreamDataError(f"image_shape {values.tolist()}{where} must be three integers >= 1: "
                              f"(channels, height, width)")
    shape = tuple(int(v) for v in values)
    if math.prod(shape) != n_features:
        raise StreamDataError(f"image_shape {shape}{where} has {math.prod(shape)} values, but a sample has "
                              f"{n_features} features")
    return shape


def build_task(index, classes, x_train, y_train, x_test, y_test):
    """Task ``index`` with the samples of ``classes`` (sorted indices (k,)), grouped by class, file order kept
    within a class. Labels are indices. Arrays are read-only."""
    classes = np.sort(classes)
    parts = []
    for x, y in ((x_train, y_train), (x_test, y_test)):
        ids = np.flatnonzero(np.isin(y, classes))
        ids = ids[np.argsort(y[ids], kind="stable")]
        parts += [frozen(x[ids]), frozen(y[ids])]
    return Task(index, tuple(int(c) for c in classes), *parts)


def stream_from_tasks(name, tasks, n_classes, x_train, image_shape):
    """The Stream with the standardization the features need: pixel statistics for uint8 (per channel for a
    multi-channel image shape), none (mean 0, std 1, unused) for floats."""
    common = dict(name=name, tasks=tasks, n_classes=int(n_classes), n_features=x_train.shape[1],
                  image_shape=image_shape)
    if x_train.dtype != np.uint8:
        return Stream(mean=0.0, std=1.0, **common)
    if image_shape is None or image_shape[0] == 1:
        mean, std = pixel_mean_std(x_train)
        check_spread(np.array([std]), name)
        return Stream(mean=mean, std=std, **common)
    channel_means, channel_stds, mean, std = channel_mean_std([x_train], image_shape[0])
    check_spread(channel_stds, name)
    pixels = math.prod(image_shape[1:])
    return Stream(mean=mean, std=std, feature_mean=np.repeat(channel_means, pixels),
                  feature_std=np.repeat(channel_stds, pixels), **common)


def check_spread(stds, name):
    """StreamDataError if a channel of the training pixels is constant: standardizing it divides by 0."""
    if (stds <= 0).any():
        bad = np.flatnonzero(stds <= 0).tolist()
        what = "the training pixels" if stds.size == 1 else f"channels {bad} of x_train"
        raise StreamDataError(f"{what} in {name} are constant (std 0): uint8 pixels cannot be standardized; give "
                              f"float features instead")


def frozen(array):
    """A read-only C-contiguous view of ``array`` (a copy only if it is not contiguous); the caller's array stays
    writable."""
    view = np.ascontiguousarray(array).view()
    view.flags.writeable = False
    return view


# ----- from a file -----
def load_npz_stream(name, classes_per_task=None, class_order=None) -> Stream:
    """The stream of the task ``npz:PATH`` (see the module docstring). StreamDataError naming the file and the
    array for bad contents; FileNotFoundError for a missing file."""
    path = npz_path(name)
    options = stream_options(classes_per_task, class_order)
    arrays = read_npz(path)
    return make_stream(*(arrays[key] for key in ARRAYS), image_shape=arrays.get("image_shape"),
                       name=name, **options)


def read_npz(path: Path) -> dict:
    """The arrays of ``path`` by name; StreamDataError for a missing or unknown array or an unreadable file."""
    if not path.is_file():
        raise FileNotFoundError(f"npz file {os.fspath(path)!r} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise StreamDataError(f"{path} is not a readable .npz file: {err}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise StreamDataError(f"{path} holds a single array, not an .npz archive of the named arrays "
                              f"{', '.join(ARRAYS)}")
    with data:
        return read_members(data, path)


def read_members(data, path):
    """The arrays of an open NpzFile by name; StreamDataError for a missing, unknown or object array."""
    names = set(data.files)
    missing = [key for key in ARRAYS if key not in names]
    unknown = sorted(names - set(ARRAYS) - set(OPTIONAL))
    if missing or unknown:
        problems = ([f"missing array {', '.join(missing)}"] if missing else []) + (
            [f"unknown array {', '.join(unknown)}"] if unknown else [])
        raise StreamDataError(f"{path}: {'; '.join(problems)} (an npz stream holds {', '.join(ARRAYS)} and "
                              f"optionally image_shape; found {', '.join(sorted(names)) or 'none'})")
    arrays = {}
    for key in sorted(names):
        try:
            arrays[key] = data[key]
        except ValueError as err:  # e.g. an object array: it needs pickle, which is never allowed
            raise StreamDataError(f"{path}: array {key} cannot be read: {err} (save numeric arrays: object arrays "
                                  f"need pickle, which npz streams refuse)") from None
        except (OSError, EOFError, zipfile.BadZipFile) as err:
            raise StreamDataError(f"{path}: array {key} is unreadable: {err}") from None
    return arrays
