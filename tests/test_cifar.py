"""Tests for the CIFAR-10/100 readers (spacenet_np.data) and the split_cifar10 / cifar10_100 streams, on tiny
generated canonical files (one optional test uses the real CIFAR-10)."""

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    C10_ARCHIVE,
    C10_FOLDER,
    C10_NAMES,
    C10_TRAIN,
    C100_ARCHIVE,
    C100_FOLDER,
    N10_BATCH,
    N100_TEST,
    N100_TRAIN,
    make_images,
    py2_pickle,
    sample_ids,
    shuffled_labels,
    write_cifar10,
    write_cifar100,
    write_pickle,
)

from spacenet_np import data
from spacenet_np.data import (
    DataError,
    cifar_folder,
    load_cifar,
    load_cifar_label_names,
    load_mnist_like,
    read_cifar_batch,
    read_cifar_pickle,
    verify_checksums,
)
from spacenet_np.streams import STREAMS, Stream, cifar10_100, get_stream, split_cifar10

# --- writing canonical files ----------------------------------------------------------------------


def make_tar_gz(path: Path, source_root: Path, folder: str, extra=()) -> Path:
    """A .tar.gz of ``source_root/folder`` (as ``folder/...``) plus ``extra`` TarInfo members (with content
    b"evil" for files)."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(source_root / folder, arcname=folder)
        for info in extra:
            payload = b"evil" if info.isfile() else None
            if payload is not None:
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(root: Path) -> list[str]:
    return sorted(os.listdir(root))


@pytest.fixture(autouse=True)
def tiny_counts(monkeypatch):
    """Register the tiny file sizes, and make sure no test reaches the real mirrors."""
    monkeypatch.setitem(data.CIFAR_COUNTS, "cifar-10", {**{name: N10_BATCH for name in C10_TRAIN},
                                                         "test_batch": N10_BATCH})
    monkeypatch.setitem(data.CIFAR_COUNTS, "cifar-100", {"train": N100_TRAIN, "test": N100_TEST})
    monkeypatch.setitem(data.MIRRORS, "cifar-10", [])
    monkeypatch.setitem(data.MIRRORS, "cifar-100", [])


@pytest.fixture
def cifar_root(tmp_path):
    """A data root holding both tiny extracted folders; yields (root, cifar10 arrays, cifar100 arrays)."""
    root = tmp_path / "root"
    return root, write_cifar10(root), write_cifar100(root)


@pytest.fixture
def archive_source(tmp_path, monkeypatch):
    """A tiny CIFAR-10 folder in ``source/`` and its .tar.gz in ``mirror/``, registered with its sha256."""
    source = tmp_path / "source"
    arrays = write_cifar10(source)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    archive = make_tar_gz(mirror / C10_ARCHIVE, source, C10_FOLDER)
    monkeypatch.setitem(data.SHA256, "cifar-10", {C10_ARCHIVE: sha256_of(archive)})
    return archive, arrays


# --- reading --------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_read_cifar_batch(tmp_path, style):
    rng = np.random.default_rng(0)
    x, y = make_images(np.arange(7), rng), shuffled_labels(7, 10, rng)
    path = write_pickle(tmp_path / "batch", {b"batch_label": b"b", b"labels": y.tolist(), b"data": x}, style)
    images, labels = read_cifar_batch(path, expected_count=7)
    assert images.dtype == np.uint8 and images.shape == (7, 3072) and images.flags.c_contiguous
    assert labels.dtype == np.int64 and labels.shape == (7,)
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, y)


def test_py2_pickle_matches_plain_pickle():
    """The test's Python-2-style writer produces what pickle itself reads back (numpy.core names included)."""
    x = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    raw = py2_pickle({b"labels": [1, 2], b"data": x})
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    loaded = pickle.loads(raw, encoding="bytes")
    assert loaded[b"labels"] == [1, 2]
    np.testing.assert_array_equal(loaded[b"data"], x)


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_load_cifar10(tmp_path, style):
    arrays = write_cifar10(tmp_path, style)
    x_train, y_train, x_test, y_test = load_cifar("cifar-10", tmp_path)
    assert x_train.shape == (5 * N10_BATCH, 3072) and x_test.shape == (N10_BATCH, 3072)
    assert {x_train.dtype, x_test.dtype} == {np.dtype(np.uint8)}
    assert {y_train.dtype, y_test.dtype} == {np.dtype(np.int64)}
    assert 0 <= y_train.min() and y_train.max() <= 9 and set(y_test) == set(range(10))
    np.testing.assert_array_equal(x_train, arrays["x_train"])  # batches 1..5 in file order
    np.testing.assert_array_equal(y_train, arrays["y_train"])
    np.testing.assert_array_equal(x_test, arrays["x_test"])
    np.testing.assert_array_equal(y_test, arrays["y_test"])
    for array in (x_train, y_train, x_test, y_test):
        assert not array.flags.writeable


def test_load_cifar10_grouped_by_label(tmp_path):
    arrays = write_cifar10(tmp_path)
    x_train, y_train, x_test, y_test = load_cifar("cifar-10", tmp_path, group_by_label=True)
    for x, y, key in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        order = np.argsort(arrays[f"y_{key}"], kind="stable")
        np.testing.assert_array_equal(y, arrays[f"y_{key}"][order])
        np.testing.assert_array_equal(x, arrays[f"x_{key}"][order])


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_load_cifar100_uses_fine_labels(tmp_path, style):
    arrays = write_cifar100(tmp_path, style)
    x_train, y_train, x_test, y_test = load_cifar("cifar-100", tmp_path)
    assert x_train.shape == (N100_TRAIN, 3072) and x_test.shape == (N100_TEST, 3072)
    assert y_train.dtype == np.int64 and set(y_train) == set(range(100))
    np.testing.assert_array_equal(y_train, arrays["y_train"])
    np.testing.assert_array_equal(x_test, arrays["x_test"])


def test_load_cifar100_class_subset(tmp_path):
    arrays = write_cifar100(tmp_path)
    x_train, y_train, _, y_test = load_cifar("cifar-100", tmp_path, group_by_label=True, classes=range(5, 15))
    keep = np.flatnonzero((arrays["y_train"] >= 5) & (arrays["y_train"] < 15))
    keep = keep[np.argsort(arrays["y_train"][keep], kind="stable")]
    np.testing.assert_array_equal(y_train, arrays["y_train"][keep])
    np.testing.assert_array_equal(x_train, arrays["x_train"][keep])
    assert set(y_test) == set(range(5, 15))
    with pytest.raises(ValueError, match="0..99"):
        load_cifar("cifar-100", tmp_path, classes=[100])


def test_gather_rows_in_place():
    rng = np.random.default_rng(5)
    for n in (0, 1, 2, 17, 200):
        rows = rng.integers(0, 256, size=(n, 6), dtype=np.uint8)
        for order in (np.arange(n), rng.permutation(n)):
            permuted = rows.copy()
            data._gather_rows_in_place(permuted, order)
            np.testing.assert_array_equal(permuted, rows[order])


def test_label_names(cifar_root):
    root, _, _ = cifar_root
    assert load_cifar_label_names("cifar-10", root)[:3] == ("airplane", "automobile", "bird")
    names = load_cifar_label_names("cifar-100", root)
    assert len(names) == 100 and names[42] == "c42"


def test_unknown_cifar_dataset(tmp_path):
    with pytest.raises(ValueError, match="cifar-10, cifar-100"):
        load_cifar("mnist", tmp_path)
    with pytest.raises(ValueError, match="fashion-mnist, mnist"):
        load_mnist_like("cifar-10", tmp_path)


# --- bad files ------------------------------------------------------------------------------------


def _valid_batch(n=N10_BATCH):
    rng = np.random.default_rng(1)
    return {b"batch_label": b"b", b"labels": shuffled_labels(n, 10, rng).tolist(),
            b"data": make_images(np.arange(n), rng)}


def _with(**changes):
    batch = _valid_batch()
    for key, value in changes.items():
        if value is None:
            del batch[key.encode()]
        else:
            batch[key.encode()] = value
    return batch


@pytest.mark.parametrize(
    "batch, message",
    [
        pytest.param(_with(data=None), "b'data'.*missing", id="no-data"),
        pytest.param(_with(labels=None), "b'labels'.*missing", id="no-labels"),
        pytest.param(_with(data=np.zeros((N10_BATCH, 3072), np.float32)), "uint8", id="float-data"),
        pytest.param(_with(data=np.zeros((N10_BATCH, 3071), np.uint8)), r"3072", id="short-rows"),
        pytest.param(_with(data=np.zeros((N10_BATCH, 32, 32, 3), np.uint8)), r"\(n, 3072\)", id="hwc-data"),
        pytest.param(_with(data=b"\0" * (N10_BATCH * 3072)), "bytes", id="raw-bytes-data"),
        pytest.param(_with(labels=[3] * (N10_BATCH - 1) + [10]), "label 10", id="label-10"),
        pytest.param(_with(labels=[3] * (N10_BATCH - 1) + [-1]), "label -1", id="label-negative"),
        pytest.param(_with(labels=[3] * (N10_BATCH - 1) + [2**70]), "outside", id="label-huge"),
        pytest.param(_with(labels=[3.0] * N10_BATCH), "ints", id="float-labels"),
        pytest.param(_with(labels=np.full(N10_BATCH, 12, np.uint8)), "label 12", id="array-label-12"),
        pytest.param(_with(labels=[1] * (N10_BATCH + 1)), "21 labels", id="label-count"),
        pytest.param(_valid_batch(N10_BATCH + 2), "canonical file has 20", id="image-count"),
        pytest.param([1, 2, 3], "dict", id="not-a-dict"),
    ],
)
def test_bad_batch_names_the_file(tmp_path, batch, message):
    write_cifar10(tmp_path)
    path = write_pickle(tmp_path / C10_FOLDER / "data_batch_3", batch)
    with pytest.raises(DataError, match=message) as err:
        load_cifar("cifar-10", tmp_path)
    assert str(path) in str(err.value)


def test_cifar100_label_out_of_range(tmp_path):
    write_cifar100(tmp_path)
    arrays = _valid_batch(N100_TEST)
    path = write_pickle(tmp_path / C100_FOLDER / "test", {b"fine_labels": [100] * N100_TEST,
                                                         b"coarse_labels": [0] * N100_TEST,
                                                         b"data": arrays[b"data"]}, "py2")
    with pytest.raises(DataError, match=r"label 100 in b'fine_labels' is outside 0..99") as err:
        load_cifar("cifar-100", tmp_path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "mangle, message",
    [
        pytest.param(lambda raw: raw[: len(raw) // 2], "truncated or corrupt", id="truncated"),
        pytest.param(lambda raw: raw[:-1], "truncated or corrupt", id="no-stop"),
        pytest.param(lambda raw: b"", "truncated or corrupt", id="empty"),
        pytest.param(lambda raw: b"this is not a pickle", "truncated or corrupt", id="garbage"),
        pytest.param(lambda raw: raw + b"junk", "after the end", id="trailing-bytes"),
    ],
)
def test_corrupt_pickle(tmp_path, mangle, message):
    write_cifar10(tmp_path)
    path = tmp_path / C10_FOLDER / "test_batch"
    path.write_bytes(mangle(path.read_bytes()))
    with pytest.raises(DataError, match=message) as err:
        load_cifar("cifar-10", tmp_path)
    assert str(path) in str(err.value)


class _Evil:
    """Unpickling this object would run ``command`` in a shell."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _EvilOpen:
    """Unpickling this object would create ``path`` through builtins.open."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.mark.parametrize("make_evil, name", [(lambda marker: _Evil(f"touch {marker}"), "system"),
                                             (_EvilOpen, r"io\.open")])
def test_forbidden_global_is_refused_without_running_it(tmp_path, make_evil, name):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    batch = {**_valid_batch(), b"labels": make_evil(marker)}
    path = write_pickle(tmp_path / C10_FOLDER / "data_batch_1", batch)
    assert name.split(".")[-1].encode() in path.read_bytes()  # the pickle really names the callable
    with pytest.raises(DataError, match=name) as err:
        load_cifar("cifar-10", tmp_path)
    assert str(path) in str(err.value)
    with pytest.raises(DataError):
        read_cifar_pickle(path)
    assert not marker.exists()


def test_missing_batch_file_in_folder(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / C10_FOLDER / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        load_cifar("cifar-10", tmp_path)


# --- archives -------------------------------------------------------------------------------------


def test_extracts_archive_in_data_root(tmp_path, archive_source):
    archive, arrays = archive_source
    root = tmp_path / "root"
    root.mkdir()
    (root / C10_ARCHIVE).write_bytes(archive.read_bytes())
    x_train, y_train, x_test, _ = load_cifar("cifar-10", root)
    np.testing.assert_array_equal(x_train, arrays["x_train"])
    np.testing.assert_array_equal(y_train, arrays["y_train"])
    np.testing.assert_array_equal(x_test, arrays["x_test"])
    assert leftovers(root) == sorted([C10_ARCHIVE, C10_FOLDER])  # no temporary folder left
    assert sorted(os.listdir(root / C10_FOLDER)) == sorted([*C10_TRAIN, "test_batch", "batches.meta"])
    assert verify_checksums("cifar-10", root) == [root / C10_ARCHIVE]
    # The extracted folder is used from now on, as is.
    (root / C10_ARCHIVE).unlink()
    assert cifar_folder("cifar-10", root) == root / C10_FOLDER


def test_downloads_archive_from_mirror(tmp_path, archive_source, monkeypatch):
    archive, arrays = archive_source
    monkeypatch.setitem(data.MIRRORS, "cifar-10", [(tmp_path / "nowhere").as_uri() + "/",
                                                   archive.parent.as_uri() + "/"])
    root = tmp_path / "root"
    root.mkdir()  # a given data folder must exist (only the default ./data is created)
    stream = split_cifar10(root)
    assert len(stream.tasks) == 5
    assert (root / C10_ARCHIVE).read_bytes() == archive.read_bytes()
    assert leftovers(root) == sorted([C10_ARCHIVE, C10_FOLDER])


def test_local_archive_checksum_mismatch(tmp_path, archive_source, monkeypatch):
    archive, _ = archive_source
    wrong = "0" * 64
    monkeypatch.setitem(data.SHA256, "cifar-10", {C10_ARCHIVE: wrong})
    root = tmp_path / "root"
    root.mkdir()
    (root / C10_ARCHIVE).write_bytes(archive.read_bytes())
    with pytest.raises(DataError, match="sha256 mismatch") as err:
        load_cifar("cifar-10", root)
    assert str(root / C10_ARCHIVE) in str(err.value) and wrong in str(err.value)
    assert sha256_of(archive) in str(err.value)
    assert leftovers(root) == [C10_ARCHIVE]


def test_downloaded_archive_checksum_mismatch(tmp_path, archive_source, monkeypatch):
    archive, _ = archive_source
    monkeypatch.setitem(data.SHA256, "cifar-10", {C10_ARCHIVE: "f" * 64})
    monkeypatch.setitem(data.MIRRORS, "cifar-10", [archive.parent.as_uri() + "/"])
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DataError, match="sha256 mismatch"):
        load_cifar("cifar-10", root)
    assert leftovers(root) == []


def _member(name, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize(
    "member, message",
    [
        pytest.param(_member("../escaped.txt"), r"'\.\.'", id="dotdot"),
        pytest.param(_member(f"{C10_FOLDER}/../../escaped.txt"), r"'\.\.'", id="dotdot-inside"),
        pytest.param(_member("/tmp/spacenet-cifar-test-escaped.txt"), "absolute", id="absolute"),
        pytest.param(_member(f"{C10_FOLDER}/link", tarfile.SYMTYPE, "/etc/passwd"), "link", id="symlink"),
        pytest.param(_member(f"{C10_FOLDER}/data_batch_6", tarfile.SYMTYPE, "data_batch_1"), "link",
                     id="relative-symlink"),
        pytest.param(_member(f"{C10_FOLDER}/hard", tarfile.LNKTYPE, f"{C10_FOLDER}/data_batch_1"), "link",
                     id="hardlink"),
        pytest.param(_member(f"{C10_FOLDER}/tty", tarfile.CHRTYPE), "device", id="char-device"),
        pytest.param(_member(f"{C10_FOLDER}/fifo", tarfile.FIFOTYPE), "device or special", id="fifo"),
        pytest.param(_member("other-folder/file.txt"), "outside the folder", id="outside-folder"),
    ],
)
def test_unsafe_archive_member_is_refused(tmp_path, archive_source, monkeypatch, member, message):
    source = tmp_path / "source"
    root = tmp_path / "root"
    root.mkdir()
    archive = make_tar_gz(root / C10_ARCHIVE, source, C10_FOLDER, extra=[member])
    with tarfile.open(archive) as tar:
        assert member.name in tar.getnames()  # the bad member really is in the archive
    monkeypatch.setitem(data.SHA256, "cifar-10", {C10_ARCHIVE: sha256_of(archive)})
    with pytest.raises(DataError, match=message) as err:
        load_cifar("cifar-10", root)
    assert str(archive) in str(err.value) and member.name in str(err.value)
    assert leftovers(root) == [C10_ARCHIVE]  # nothing extracted, no temporary folder
    assert not (tmp_path / "escaped.txt").exists() and not (root / "escaped.txt").exists()
    assert not Path("/tmp/spacenet-cifar-test-escaped.txt").exists()


def test_archive_without_required_file(tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_cifar10(source)
    (source / C10_FOLDER / "test_batch").unlink()
    root = tmp_path / "root"
    root.mkdir()
    archive = make_tar_gz(root / C10_ARCHIVE, source, C10_FOLDER)
    monkeypatch.setitem(data.SHA256, "cifar-10", {C10_ARCHIVE: sha256_of(archive)})
    with pytest.raises(DataError, match="lacks cifar-10-batches-py/test_batch"):
        load_cifar("cifar-10", root)
    assert leftovers(root) == [C10_ARCHIVE]


def test_corrupt_archive(tmp_path, archive_source, monkeypatch):
    archive, _ = archive_source
    root = tmp_path / "root"
    root.mkdir()
    truncated = root / C10_ARCHIVE
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    monkeypatch.setitem(data.SHA256, "cifar-10", {C10_ARCHIVE: sha256_of(truncated)})
    with pytest.raises(DataError, match="not a valid .tar.gz") as err:
        load_cifar("cifar-10", root)
    assert str(truncated) in str(err.value)
    assert leftovers(root) == [C10_ARCHIVE]


def test_missing_cifar100_message(tmp_path, monkeypatch):
    root = tmp_path / "root"
    write_cifar10(root)
    monkeypatch.setitem(data.MIRRORS, "cifar-100", [(tmp_path / "nowhere").as_uri() + "/"])
    with pytest.raises(FileNotFoundError) as err:
        get_stream("cifar10_100", root)
    message = str(err.value)
    assert "cifar-100 is missing" in message
    assert f"{root / C100_FOLDER}/" in message and str(root / C100_ARCHIVE) in message
    assert "cifar10_100 stream" in message
    assert "nowhere" in message and "--data-dir" in message and "SPACENET_DATA" in message
    assert leftovers(root) == [C10_FOLDER]


def test_missing_cifar10_message(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        split_cifar10(tmp_path / "empty")
    message = str(err.value)
    assert "cifar-10 is missing" in message
    assert "cifar-10-batches-py/" in message and "directly" in message and C10_ARCHIVE in message


# --- streams --------------------------------------------------------------------------------------


def test_streams_registered(cifar_root):
    root, _, _ = cifar_root
    assert {"split_cifar10", "cifar10_100"} <= set(STREAMS)
    assert get_stream("split_cifar10", root).name == "split_cifar10"


def test_split_cifar10_stream(cifar_root):
    root, arrays, _ = cifar_root
    stream = split_cifar10(root)
    assert isinstance(stream, Stream) and stream.name == "split_cifar10"
    assert (stream.n_classes, stream.n_features, stream.n_channels) == (10, 3072, 3)
    assert stream.image_shape == (3, 32, 32)
    assert [task.index for task in stream.tasks] == list(range(5))
    assert [task.classes for task in stream.tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    for task in stream.tasks:
        for x, y, all_x, all_y in ((task.x_train, task.y_train, arrays["x_train"], arrays["y_train"]),
                                   (task.x_test, task.y_test, arrays["x_test"], arrays["y_test"])):
            assert x.dtype == np.uint8 and x.shape == (len(y), 3072) and y.dtype == np.int64
            expected = np.concatenate([np.flatnonzero(all_y == c) for c in task.classes])
            np.testing.assert_array_equal(x, all_x[expected])
            np.testing.assert_array_equal(y, all_y[expected])
            assert not x.flags.writeable and not y.flags.writeable
    # The tasks are views into one array per split.
    first = stream.tasks[0].x_train
    assert all(np.shares_memory(task.x_train, first.base) for task in stream.tasks)


def test_cifar10_100_stream(cifar_root):
    root, c10, c100 = cifar_root
    stream = cifar10_100(root)
    assert stream.name == "cifar10_100"
    assert (stream.n_classes, stream.n_features, stream.image_shape) == (60, 3072, (3, 32, 32))
    assert [task.index for task in stream.tasks] == list(range(6))
    assert stream.tasks[0].classes == tuple(range(10))
    assert [task.classes for task in stream.tasks[1:]] == [tuple(range(f, f + 10)) for f in range(10, 60, 10)]
    first = stream.tasks[0]  # all of CIFAR-10, in file order
    np.testing.assert_array_equal(first.x_train, c10["x_train"])
    np.testing.assert_array_equal(first.y_train, c10["y_train"])
    np.testing.assert_array_equal(first.x_test, c10["x_test"])
    np.testing.assert_array_equal(first.y_test, c10["y_test"])
    for task in stream.tasks[1:]:
        for x, y, split in ((task.x_train, task.y_train, "train"), (task.x_test, task.y_test, "test")):
            assert y.dtype == np.int64 and set(y) == set(task.classes)
            fine = c100[f"y_{split}"]
            # label = fine label + 10
            expected = np.concatenate([np.flatnonzero(fine == c - 10) for c in task.classes])
            np.testing.assert_array_equal(sample_ids(x), expected)
            np.testing.assert_array_equal(x, c100[f"x_{split}"][expected])
            np.testing.assert_array_equal(y, fine[expected] + 10)
    n_used = sum(len(task.y_train) for task in stream.tasks[1:])
    assert n_used == np.count_nonzero(c100["y_train"] < 50) == N100_TRAIN // 2


def _channel_stats(images_list):
    planes = np.concatenate(images_list).reshape(-1, 3, 1024) / 255.0
    return planes.mean(axis=(0, 2)), planes.std(axis=(0, 2)), planes.mean(), planes.std()


def test_per_channel_statistics(cifar_root):
    root, c10, c100 = cifar_root
    for stream, train_images in (
        (split_cifar10(root), [c10["x_train"]]),
        (cifar10_100(root), [c10["x_train"], c100["x_train"][c100["y_train"] < 50]]),
    ):
        means, stds, mean, std = _channel_stats(train_images)
        assert stream.feature_mean.shape == stream.feature_std.shape == (3072,)
        np.testing.assert_allclose(stream.feature_mean.reshape(3, 1024), np.repeat(means[:, None], 1024, 1),
                                   rtol=1e-12)
        np.testing.assert_allclose(stream.feature_std.reshape(3, 1024), np.repeat(stds[:, None], 1024, 1),
                                   rtol=1e-12)
        assert stream.mean == pytest.approx(mean, rel=1e-12) and stream.std == pytest.approx(std, rel=1e-12)
        assert means[0] < means[1] < means[2]  # the channels really differ
        # Standardized training data: each channel has mean 0 and std 1.
        x = np.concatenate([stream.standardize(task.x_train) for task in stream.tasks])
        assert x.dtype == np.float32 and x.shape == (sum(len(t.x_train) for t in stream.tasks), 3072)
        planes = x.reshape(-1, 3, 1024).astype(np.float64)
        np.testing.assert_allclose(planes.mean(axis=(0, 2)), 0, atol=1e-5)
        np.testing.assert_allclose(planes.std(axis=(0, 2)), 1, atol=1e-5)
        expected = (stream.tasks[-1].x_test.reshape(-1, 3, 1024) / 255.0 - means[:, None]) / stds[:, None]
        np.testing.assert_allclose(stream.standardize(stream.tasks[-1].x_test), expected.reshape(-1, 3072),
                                   rtol=1e-5, atol=1e-5)


def test_stream_feature_fields():
    tasks = ()
    plain = Stream("s", tasks, 10, 4, 0.5, 0.25)  # the old constructor still works: scalar standardization
    assert plain.feature_mean is None and plain.image_shape is None and plain.n_channels is None
    np.testing.assert_allclose(plain.standardize(np.full((1, 4), 255, np.uint8)), 2.0)
    per_feature = Stream("s", tasks, 10, 4, 0.5, 0.25, feature_mean=[0, 0, 1, 1],
                         feature_std=[1, 1, 0.5, 0.5], image_shape=(2, 1, 2))
    assert per_feature.n_channels == 2 and not per_feature.feature_mean.flags.writeable
    np.testing.assert_allclose(per_feature.standardize(np.full((1, 4), 255, np.uint8)), [[1, 1, 0, 0]])
    with pytest.raises(ValueError, match="together"):
        Stream("s", tasks, 10, 4, 0.5, 0.25, feature_mean=np.zeros(4))
    with pytest.raises(ValueError, match="4 finite values"):
        Stream("s", tasks, 10, 4, 0.5, 0.25, feature_mean=np.zeros(3), feature_std=np.ones(3))
    with pytest.raises(ValueError, match="positive"):
        Stream("s", tasks, 10, 4, 0.5, 0.25, feature_mean=np.zeros(4), feature_std=np.zeros(4))
    with pytest.raises(ValueError, match="image_shape"):
        Stream("s", tasks, 10, 4, 0.5, 0.25, image_shape=(1, 28, 28))


# --- real data ------------------------------------------------------------------------------------

REAL_DATA = os.environ.get("SPACENET_DATA")


@pytest.mark.slow
@pytest.mark.skipif(
    not REAL_DATA or not (Path(REAL_DATA) / C10_FOLDER).is_dir(),
    reason="set SPACENET_DATA to a folder holding the extracted cifar-10-batches-py/",
)
def test_real_cifar10(monkeypatch):
    real_counts = {**{name: 10000 for name in C10_TRAIN}, "test_batch": 10000}
    monkeypatch.setitem(data.CIFAR_COUNTS, "cifar-10", real_counts)
    x_train, y_train, x_test, y_test = load_cifar("cifar-10", REAL_DATA)
    assert x_train.shape == (50000, 3072) and x_test.shape == (10000, 3072)
    assert np.bincount(y_train, minlength=10).tolist() == [5000] * 10
    assert np.bincount(y_test, minlength=10).tolist() == [1000] * 10
    assert y_train[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert y_test[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert load_cifar_label_names("cifar-10", REAL_DATA) == tuple(name.decode() for name in C10_NAMES)
    del x_train, x_test
    stream = split_cifar10(REAL_DATA)
    assert [(len(t.y_train), len(t.y_test)) for t in stream.tasks] == [(10000, 2000)] * 5
    np.testing.assert_allclose(stream.feature_mean[::1024], [0.4914, 0.4822, 0.4465], atol=5e-5)
    np.testing.assert_allclose(stream.feature_std[::1024], [0.2470, 0.2435, 0.2616], atol=5e-5)
