"""Helpers shared by the test modules: synthetic data, small configs, network tables, tiny dataset files.

Test modules import them with ``from helpers import ...`` (``pythonpath = tests`` in setup.cfg), never from
another test module or from ``conftest``, so the tests run under every pytest import mode (also
``--import-mode=importlib``) and in subprocesses that put ``tests/`` on ``PYTHONPATH``.

The synthetic data are class-dependent Gaussian blobs mapped to uint8 "images": every class has a random
centre in pixel space, samples are the centre plus Gaussian noise, clipped to [0, 255]. Blobs far apart (small
``spread``) give an easy problem for the end-to-end tests; the property tests only need data to train on.
"""
import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np

from spacenet_np.data import FILES
from spacenet_np.layers import FREE
from spacenet_np.spacenet import SpaceNetConfig


def make_blobs(n_classes, n_features, n_per_class, seed=0, spread=25.0, centre_seed=None):
    """Class-dependent Gaussian blobs as uint8 images.

    Returns (images (n_classes * n_per_class, n_features) uint8, labels (n,) int64), shuffled. The class
    centres depend only on ``centre_seed`` (default ``seed``), so train and test sets drawn with different
    ``seed`` and the same ``centre_seed`` come from the same distribution.
    """
    centre_rng = np.random.default_rng(seed if centre_seed is None else centre_seed)
    centres = centre_rng.uniform(30.0, 225.0, size=(n_classes, n_features))
    rng = np.random.default_rng(seed + 7919)
    labels = np.repeat(np.arange(n_classes, dtype=np.int64), n_per_class)
    pixels = centres[labels] + rng.normal(0.0, spread, size=(labels.size, n_features))
    images = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    order = rng.permutation(labels.size)
    return images[order], labels[order]


def task_split(images, labels, classes):
    """The samples of ``images``/``labels`` whose label is in ``classes``."""
    keep = np.isin(labels, classes)
    return images[keep], labels[keep]


def tiny_config(**overrides):
    """A small SpaceNetConfig for a 16-40-4 network; keyword arguments override fields."""
    values = dict(connections_per_task=(120, 20), selected_neurons=(12,), reserved_neurons=(4,),
                  rewire_ratio=0.3, epochs=2, batch_size=16, lr=0.02)
    values.update(overrides)
    return SpaceNetConfig(**values)


def connection_table(model, layer_index):
    """Every connection of a layer keyed by (owner, out neuron id, in neuron id) -> (weight, importance).

    Keys use neuron ids (via ``slot_ids``), so they do not depend on the connection order in ``W.data``.
    """
    layer = model.layers[layer_index]
    out_ids = model.neurons[layer_index + 1].slot_ids[layer.rows]
    in_ids = model.neurons[layer_index].slot_ids[layer.indices]
    return {(int(o), int(r), int(c)): (layer.weights[k], layer.importance[k])
            for k, (o, r, c) in enumerate(zip(layer.owner, out_ids, in_ids))}


def reserved_ids(neurons):
    """Neuron ids of a NeuronIndex that are reserved, as a dict id -> task."""
    mask = neurons.reserved_by != FREE
    return dict(zip(neurons.slot_ids[mask].tolist(), neurons.reserved_by[mask].tolist()))


def pair_tasks(n_classes, n_features, per_class, seed=0, spread=25.0):
    """``make_blobs`` data split into tasks of two consecutive classes: a list of (images, labels, classes)."""
    images, labels = make_blobs(n_classes, n_features, per_class, seed=seed, spread=spread)
    tasks = []
    for first in range(0, n_classes, 2):
        classes = np.arange(first, min(first + 2, n_classes))
        tasks.append((*task_split(images, labels, classes), classes))
    return tasks


# ----- tiny canonical dataset files (IDX for MNIST-like datasets, pickles for CIFAR) -----

N_TINY = 12


def idx_bytes(array: np.ndarray) -> bytes:
    """The uncompressed IDX encoding of a uint8 array: header (magic, big-endian dims) then payload."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_gz(path: Path, payload: bytes) -> Path:
    """Gzip ``payload`` into ``path`` (creating its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload))
    return path


def tiny_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images ``(n, 28, 28)`` and labels ``(n,)`` covering all 10 classes when n >= 10."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    return images, labels


def write_tiny_dataset(root: Path, dataset: str, n_train: int = N_TINY, n_test: int = N_TINY) -> dict:
    """Write the four canonical files of a tiny dataset under ``root/dataset``; return the arrays by name."""
    x_train, y_train = tiny_split(n_train, seed=0)
    x_test, y_test = tiny_split(n_test, seed=1)
    arrays = dict(zip(FILES, (x_train, y_train, x_test, y_test)))
    for filename, array in arrays.items():
        write_gz(root / dataset / filename, idx_bytes(array))
    return arrays


N10_BATCH = 20  # images per tiny CIFAR-10 batch file (5 train batches + 1 test batch)
N100_TRAIN, N100_TEST = 300, 200  # tiny CIFAR-100: 3 / 2 images per fine class
C10_FOLDER, C100_FOLDER = "cifar-10-batches-py", "cifar-100-python"
C10_ARCHIVE, C100_ARCHIVE = "cifar-10-python.tar.gz", "cifar-100-python.tar.gz"
C10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
C10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship",
             b"truck"]


def _py2_emit(obj, out: bytearray) -> None:
    """Append the protocol-2 opcodes Python 2's cPickle writes for ``obj`` (dict, list, bytes as str, int, or
    a uint8 ndarray, pickled as NumPy 1.x did: ``numpy.core.multiarray._reconstruct`` then BUILD)."""
    if isinstance(obj, dict):
        out += b"}"
        for key, value in obj.items():
            _py2_emit(key, out)
            _py2_emit(value, out)
            out += b"s"
    elif isinstance(obj, list):
        out += b"]"
        for value in obj:
            _py2_emit(value, out)
            out += b"a"
    elif isinstance(obj, bytes):
        out += (b"U" + bytes([len(obj)]) if len(obj) < 256 else b"T" + struct.pack("<i", len(obj))) + obj
    elif isinstance(obj, (int, np.integer)):
        out += b"K" + bytes([int(obj)]) if 0 <= obj < 256 else b"J" + struct.pack("<i", int(obj))
    elif isinstance(obj, np.ndarray) and obj.dtype == np.uint8:
        out += b"cnumpy.core.multiarray\n_reconstruct\nq\x00cnumpy\nndarray\nq\x01K\x00\x85U\x01b\x87R(K\x01"
        for dim in obj.shape:
            _py2_emit(dim, out)
        out += {1: b"\x85", 2: b"\x86"}[obj.ndim]
        out += b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R"  # dtype('u1', False, True)
        out += b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"  # its state, then BUILD
        out += b"\x89"  # not Fortran-ordered
        _py2_emit(np.ascontiguousarray(obj).tobytes(), out)
        out += b"tb"
    else:
        raise TypeError(f"cannot emit {type(obj).__name__}")


def py2_pickle(obj) -> bytes:
    """``obj`` pickled like the original CIFAR files (Python 2, protocol 2, str for bytes)."""
    out = bytearray(b"\x80\x02")
    _py2_emit(obj, out)
    return bytes(out + b".")


def write_pickle(path: Path, obj, style: str = "py3") -> Path:
    """Pickle ``obj`` into ``path``: ``"py3"`` as the rebuilt CIFAR-10 in /work/shared/data (protocol 4,
    ``numpy._core``), ``"py2"`` as the original archives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=4) if style == "py3" else py2_pickle(obj))
    return path


def make_images(ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Images (n, 3072) whose three channels have different ranges (R 0-127, G 64-191, B 128-255), with the
    sample id in the first two red pixels (low byte, high byte) to check orders."""
    n = len(ids)
    planes = [rng.integers(low, low + 128, size=(n, 1024), dtype=np.uint8) for low in (0, 64, 128)]
    images = np.concatenate(planes, axis=1)
    images[:, 0], images[:, 1] = ids % 256, ids // 256
    return images


def sample_ids(images: np.ndarray) -> np.ndarray:
    return images[:, 0].astype(np.int64) + 256 * images[:, 1].astype(np.int64)


def shuffled_labels(n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    labels = np.arange(n) % n_classes
    rng.shuffle(labels)
    return labels


def write_cifar10(root: Path, style: str = "py3") -> dict:
    """A tiny canonical cifar-10-batches-py/ in ``root``; returns the arrays (train in file order)."""
    rng = np.random.default_rng(10)
    folder = root / C10_FOLDER
    arrays = {"x_train": [], "y_train": []}
    for b, name in enumerate(C10_TRAIN):
        ids = np.arange(b * N10_BATCH, (b + 1) * N10_BATCH)
        x, y = make_images(ids, rng), shuffled_labels(N10_BATCH, 10, rng)
        batch = {b"batch_label": f"training batch {b + 1} of 5".encode(), b"labels": y.tolist(), b"data": x}
        write_pickle(folder / name, batch, style)
        arrays["x_train"].append(x)
        arrays["y_train"].append(y)
    arrays = {key: np.concatenate(value) for key, value in arrays.items()}
    x_test, y_test = make_images(np.arange(N10_BATCH), rng), shuffled_labels(N10_BATCH, 10, rng)
    write_pickle(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": y_test.tolist(),
                                         b"data": x_test, b"filenames": [b"x.png"] * N10_BATCH}, style)
    write_pickle(folder / "batches.meta", {b"label_names": C10_NAMES, b"num_cases_per_batch": 10000,
                                           b"num_vis": 3072}, style)
    arrays.update(x_test=x_test, y_test=y_test)
    return arrays


def write_cifar100(root: Path, style: str = "py2") -> dict:
    """A tiny canonical cifar-100-python/ in ``root``; returns the arrays (fine labels)."""
    rng = np.random.default_rng(100)
    folder = root / C100_FOLDER
    arrays = {}
    for split, n in (("train", N100_TRAIN), ("test", N100_TEST)):
        x, fine = make_images(np.arange(n), rng), shuffled_labels(n, 100, rng)
        batch = {b"filenames": [b"f.png"] * n, b"batch_label": f"{split}ing batch".encode(),
                 b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist(), b"data": x}
        write_pickle(folder / split, batch, style)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, fine
    write_pickle(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                                   b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}, style)
    return arrays


# ----- CLI runs -----
def results_without_time(run_dir):
    """A run folder's results.json without the wall times, which differ between otherwise identical runs."""
    results = json.loads((Path(run_dir) / "results.json").read_text())
    for run in results["runs"]:
        del run["wall_time_s"]
    return results


def interrupt_after(monkeypatch, tasks, seed=None):
    """Make the train CLI raise KeyboardInterrupt in the first batch after the learner of ``seed`` (any seed when
    None) has checkpointed ``tasks`` finished tasks. Returns a function that lets batches run again."""
    from spacenet_np import checkpoint, train
    saved = {"tasks": 0}
    original_save, original_batch = checkpoint.save_learner, train.Progress.batch

    def counting_save(path, learner, progress=None):
        if seed is None or progress["seed"] == seed:
            saved["tasks"] = learner.tasks_learned
        return original_save(path, learner, progress)

    def interrupting_batch(self, loss, n_images):
        if saved["tasks"] == tasks:
            raise KeyboardInterrupt
        original_batch(self, loss, n_images)

    monkeypatch.setattr(checkpoint, "save_learner", counting_save)
    monkeypatch.setattr(train.Progress, "batch", interrupting_batch)
    monkeypatch.setattr(train.Progress, "shows_batches", True)  # quiet runs too: batches are reported
    return lambda: monkeypatch.setattr(train.Progress, "batch", original_batch)
