"""Tests of the decode cache of the IDX images (spacenet_np.data) on tiny generated datasets.

The cache must give the same bytes as decoding, be used (not rebuilt) on the second load, be rebuilt whenever it
does not match its gz (corrupt, truncated, another dataset's, a changed gz), fall back to the user cache folder
when the data folder is read-only, and never make a load fail.
"""
import json
import logging
import mmap
import os
import shutil

import numpy as np
import pytest
from helpers import N_TINY, idx_bytes, tiny_split, write_gz, write_tiny_dataset

from spacenet_np import data
from spacenet_np.data import FILES, DataError, load_mnist_like
from spacenet_np.streams import get_stream, stream_fingerprint

TRAIN_IMAGES = FILES[0]
N_OTHER = N_TINY + 4  # another dataset's size, so that its cache differs in shape and bytes


def write_other_dataset(root):
    """A tiny Fashion-MNIST with MNIST's labels and other training images: its train-images cache has the same
    shape and row order, so only its source and bytes tell it apart."""
    write_tiny_dataset(root, "fashion-mnist")
    write_gz(root / "fashion-mnist" / TRAIN_IMAGES, idx_bytes(tiny_split(N_TINY, seed=9)[0]))


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A data root with a tiny MNIST; the user cache folder in ``tmp_path/xdg``; no $SPACENET_CACHE."""
    monkeypatch.delenv(data.CACHE_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    write_tiny_dataset(tmp_path / "root", "mnist")
    return tmp_path / "root"


def cache_files(folder, gz=TRAIN_IMAGES, variant="by-label"):
    """The .npy and sidecar of ``gz``'s cache beside it."""
    stem = folder / f"{gz.removesuffix('.gz')}.{variant}"
    return stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".json")


def identity(path):
    """What changes when a file is rewritten (atomically or not): inode and mtime."""
    info = path.stat()
    return info.st_ino, info.st_mtime_ns


def is_mapped(array):
    """Whether ``array``'s memory is a file mapping (follows the chain of bases)."""
    base = array
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.obj if isinstance(base, memoryview) else base.base
    return isinstance(base, mmap.mmap)


def assert_same_arrays(got, expected):
    """Same type, dtype, shape, strides, read-only flag and bytes, array by array."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert type(a) is type(b) is np.ndarray
        assert (a.dtype, a.shape, a.strides) == (b.dtype, b.shape, b.strides)
        assert not a.flags.writeable and not b.flags.writeable and a.flags.c_contiguous
        assert a.tobytes() == b.tobytes()


def grouped_by_label(arrays):
    """The tiny dataset's (x_train, y_train, x_test, y_test) as load_mnist_like(group_by_label=True) returns it."""
    out = []
    for images, labels in ((arrays[FILES[0]], arrays[FILES[1]]), (arrays[FILES[2]], arrays[FILES[3]])):
        order = np.argsort(labels, kind="stable")
        out += [images[order].reshape(len(labels), -1), labels[order]]
    return out


# --- what the cache returns -----------------------------------------------------------------------------------


@pytest.mark.parametrize("group_by_label", [False, True])
def test_cached_arrays_are_byte_identical_to_decoding(root, group_by_label):
    uncached = load_mnist_like("mnist", root, group_by_label, cache=False)
    first = load_mnist_like("mnist", root, group_by_label)  # builds the cache
    second = load_mnist_like("mnist", root, group_by_label)  # maps it
    assert_same_arrays(first, uncached)
    assert_same_arrays(second, uncached)
    assert is_mapped(second[0]) and is_mapped(second[2]) and not is_mapped(uncached[0])


def test_grouped_arrays_match_the_files(root):
    expected = grouped_by_label(write_tiny_dataset(root, "mnist"))
    for _ in range(2):
        got = load_mnist_like("mnist", root, group_by_label=True)
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)


def test_second_load_uses_the_cache_without_rebuilding_it(root, caplog):
    load_mnist_like("mnist", root, group_by_label=True)
    npy, sidecar = cache_files(root / "mnist")
    before = identity(npy), identity(sidecar)
    with caplog.at_level(logging.INFO, logger="spacenet_np.data"):
        x_train = load_mnist_like("mnist", root, group_by_label=True)[0]
    assert (identity(npy), identity(sidecar)) == before
    assert is_mapped(x_train) and not caplog.records
    record = json.loads(sidecar.read_text())
    gz = root / "mnist" / TRAIN_IMAGES
    assert record["source"]["size"] == gz.stat().st_size
    assert record["source"]["sha256"] == data._sha256_of_file(gz)


def test_stream_arrays_stay_read_only_and_identical(root, monkeypatch):
    cached = get_stream("split_mnist", root)
    cached_again = get_stream("split_mnist", root)
    monkeypatch.setenv(data.CACHE_ENV_VAR, "off")
    uncached = get_stream("split_mnist", root)
    assert stream_fingerprint(cached) == stream_fingerprint(cached_again) == stream_fingerprint(uncached)
    task = cached_again.tasks[0]
    assert is_mapped(task.x_train) and not task.x_train.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        task.x_train[0, 0] = 1


# --- stale and corrupt caches are rebuilt ---------------------------------------------------------------------


def flip_last_byte(npy, sidecar, other):
    payload = bytearray(npy.read_bytes())
    payload[-1] ^= 0xFF
    npy.write_bytes(bytes(payload))


def truncate(npy, sidecar, other):
    npy.write_bytes(npy.read_bytes()[:-7])


def empty(npy, sidecar, other):
    npy.write_bytes(b"")


def append(npy, sidecar, other):
    npy.write_bytes(npy.read_bytes() + b"\0")


def remove_npy(npy, sidecar, other):
    npy.unlink()


def garbage_sidecar(npy, sidecar, other):
    sidecar.write_text("{not json")


def malformed_sidecar(npy, sidecar, other):
    sidecar.write_text(json.dumps({"format": data.CACHE_FORMAT, "version": data.CACHE_VERSION}))


def another_datasets_npy(npy, sidecar, other):
    shutil.copyfile(other[0], npy)


def another_datasets_cache(npy, sidecar, other):
    shutil.copyfile(other[0], npy)
    shutil.copyfile(other[1], sidecar)


def consistent_but_wrong(npy, sidecar, converted):
    """Replace the .npy by ``converted`` of its array, with a sidecar that matches the new file's bytes."""
    array = np.load(npy)
    np.save(npy, converted(array))
    record = json.loads(sidecar.read_text())
    payload = npy.read_bytes()
    record["array"].update(bytes=len(payload), sha256=data.hashlib.sha256(payload).hexdigest())
    sidecar.write_text(json.dumps(record))


def wrong_dtype(npy, sidecar, other):
    consistent_but_wrong(npy, sidecar, lambda a: a.astype(np.int16))


def wrong_shape(npy, sidecar, other):
    consistent_but_wrong(npy, sidecar, lambda a: a.reshape(len(a), -1))


def fortran_order(npy, sidecar, other):
    consistent_but_wrong(npy, sidecar, np.asfortranarray)


CORRUPTIONS = [flip_last_byte, truncate, empty, append, remove_npy, garbage_sidecar, malformed_sidecar,
               another_datasets_npy, another_datasets_cache, wrong_dtype, wrong_shape, fortran_order]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=[c.__name__ for c in CORRUPTIONS])
def test_corrupt_or_foreign_cache_is_detected_and_rebuilt(root, corrupt, caplog):
    write_other_dataset(root)
    load_mnist_like("fashion-mnist", root, group_by_label=True)
    expected = load_mnist_like("mnist", root, group_by_label=True, cache=False)
    load_mnist_like("mnist", root, group_by_label=True)
    npy, sidecar = cache_files(root / "mnist")
    good = npy.read_bytes(), json.loads(sidecar.read_text())
    corrupt(npy, sidecar, cache_files(root / "fashion-mnist"))

    with caplog.at_level(logging.WARNING, logger="spacenet_np.data"):
        got = load_mnist_like("mnist", root, group_by_label=True)
    assert_same_arrays(got, expected)
    assert [r.getMessage() for r in caplog.records if str(npy) in r.getMessage()], "the rebuild was not reported"
    assert npy.read_bytes() == good[0]
    assert json.loads(sidecar.read_text())["array"] == good[1]["array"]
    rebuilt = identity(npy)
    assert_same_arrays(load_mnist_like("mnist", root, group_by_label=True), expected)
    assert identity(npy) == rebuilt  # valid again: used, not rebuilt


def test_missing_sidecar_is_a_plain_miss(root, caplog):
    load_mnist_like("mnist", root)
    npy, sidecar = cache_files(root / "mnist", variant="file-order")
    sidecar.unlink()
    with caplog.at_level(logging.WARNING, logger="spacenet_np.data"):
        got = load_mnist_like("mnist", root)
    assert_same_arrays(got, load_mnist_like("mnist", root, cache=False))
    assert sidecar.exists() and not caplog.records


def test_another_row_order_is_not_served(root):
    """The by-label cache of the train images must not serve other labels: the order is part of the key."""
    load_mnist_like("mnist", root, group_by_label=True)
    labels = tiny_split(N_TINY, seed=5)[1]
    write_gz(root / "mnist" / FILES[1], idx_bytes(labels))
    got = load_mnist_like("mnist", root, group_by_label=True)
    assert_same_arrays(got, load_mnist_like("mnist", root, group_by_label=True, cache=False))
    assert np.array_equal(got[1], np.sort(labels, kind="stable"))


@pytest.mark.parametrize("trust_stat", [False, True])
def test_changed_gz_is_detected(root, monkeypatch, trust_stat):
    """A new gz (rewritten in place, or replaced by another file) is decoded again, never served stale.

    A freshly written gz's stat is not trusted (it could change again within one timestamp tick); with
    RACY_NS = 0 it is, and replacing the file still changes its inode.
    """
    if trust_stat:
        monkeypatch.setattr(data, "RACY_NS", 0)
    load_mnist_like("mnist", root)
    gz = root / "mnist" / TRAIN_IMAGES
    other = idx_bytes(tiny_split(N_TINY, seed=9)[0])
    if trust_stat:
        assert json.loads(cache_files(root / "mnist", variant="file-order")[1].read_text())["source"]["stat_trusted"]
        write_gz(root / "new.gz", other)
        os.replace(root / "new.gz", gz)
    else:
        write_gz(gz, other)
    x_train = load_mnist_like("mnist", root)[0]
    np.testing.assert_array_equal(x_train, tiny_split(N_TINY, seed=9)[0].reshape(N_TINY, -1))


def test_touched_gz_keeps_its_cache(root):
    """Same contents, new stat (a copy, a touch): the cache stays valid and its sidecar gets the new stat."""
    load_mnist_like("mnist", root)
    gz = root / "mnist" / TRAIN_IMAGES
    npy, sidecar = cache_files(root / "mnist", variant="file-order")
    before = identity(npy)
    os.utime(gz, ns=(1_000_000_000, 1_000_000_000))
    load_mnist_like("mnist", root)
    assert identity(npy) == before
    assert json.loads(sidecar.read_text())["source"]["stat"][3] == 1_000_000_000


def test_corrupt_gz_is_not_masked_by_its_cache(root):
    load_mnist_like("mnist", root)
    gz = root / "mnist" / TRAIN_IMAGES
    payload = bytearray(gz.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    gz.write_bytes(bytes(payload))
    with pytest.raises(DataError, match=TRAIN_IMAGES):
        load_mnist_like("mnist", root)


# --- where the cache goes --------------------------------------------------------------------------------------


def test_read_only_data_folder_falls_back_to_the_user_cache(root, tmp_path):
    """Permission bits that let nobody write are respected, also by root (who could write anyway)."""
    folder = root / "mnist"
    folder.chmod(0o555)
    try:
        expected = load_mnist_like("mnist", root, group_by_label=True, cache=False)
        assert_same_arrays(load_mnist_like("mnist", root, group_by_label=True), expected)
        assert sorted(os.listdir(folder)) == sorted(FILES)
        user = tmp_path / "xdg" / "spacenet_np" / "data"
        built = sorted(user.iterdir())
        assert [p.suffix for p in built] == [".json", ".npy", ".json", ".npy"]
        before = [identity(p) for p in built]
        second = load_mnist_like("mnist", root, group_by_label=True)
        assert_same_arrays(second, expected)
        assert is_mapped(second[0]) and [identity(p) for p in built] == before
    finally:
        folder.chmod(0o755)


def test_nothing_writable_decodes_without_cache(root, tmp_path, caplog):
    """The data folder read-only and the user cache folder under a regular file: the load still works."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    folder = root / "mnist"
    for env in ({"XDG_CACHE_HOME": str(blocker / "xdg")}, {data.CACHE_ENV_VAR: str(blocker / "cache")}):
        folder.chmod(0o555)
        try:
            with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.WARNING, logger="spacenet_np.data"):
                for name, value in env.items():
                    mp.setenv(name, value)
                got = load_mnist_like("mnist", root, group_by_label=True)
        finally:
            folder.chmod(0o755)
        assert_same_arrays(got, load_mnist_like("mnist", root, group_by_label=True, cache=False))
        assert not is_mapped(got[0]) and sorted(os.listdir(folder)) == sorted(FILES)
        assert any("cannot cache" in r.getMessage() or "no writable folder" in r.getMessage() for r in caplog.records)
        caplog.clear()


def test_spacenet_cache_folder_overrides(root, tmp_path, monkeypatch):
    cache = tmp_path / "my cache"
    monkeypatch.setenv(data.CACHE_ENV_VAR, str(cache))
    write_tiny_dataset(root, "fashion-mnist", n_train=N_OTHER)
    load_mnist_like("mnist", root)
    load_mnist_like("fashion-mnist", root)
    assert sorted(os.listdir(root / "mnist")) == sorted(FILES)
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == 8 and sum(n.startswith("mnist-") for n in names) == 4  # one set per dataset folder
    assert not (tmp_path / "xdg").exists()


def test_spacenet_cache_off(root, monkeypatch, caplog):
    monkeypatch.setenv(data.CACHE_ENV_VAR, "off")
    with caplog.at_level(logging.WARNING, logger="spacenet_np.data"):
        got = load_mnist_like("mnist", root)
    assert not is_mapped(got[0]) and not caplog.records
    assert sorted(os.listdir(root / "mnist")) == sorted(FILES)
