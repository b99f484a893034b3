"""Tests for spacenet_np.data on tiny generated IDX files (one optional test uses the real MNIST)."""

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    C10_FOLDER,
    C10_TRAIN,
    N10_BATCH,
    N_TINY,
    idx_bytes,
    tiny_split,
    write_cifar10,
    write_gz,
    write_tiny_dataset,
)

from spacenet_np import data
from spacenet_np.data import (
    FILES,
    DataError,
    fetch,
    load_mnist_like,
    read_idx,
    resolve_data_root,
    verify_checksums,
)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A file:// mirror holding a tiny MNIST, registered (with its hashes) as the only MNIST mirror."""
    mirror_dir = tmp_path / "mirror"
    write_tiny_dataset(mirror_dir, "mnist")
    files = mirror_dir / "mnist"
    monkeypatch.setitem(data.MIRRORS, "mnist", [files.as_uri() + "/"])
    monkeypatch.setitem(data.SHA256, "mnist", {name: sha256_of(files / name) for name in FILES})
    return files


# --- read_idx -------------------------------------------------------------------------------------


def test_read_idx_round_trip(tmp_path):
    images, labels = tiny_split(N_TINY, seed=3)
    read_images = read_idx(write_gz(tmp_path / "img.gz", idx_bytes(images)))
    read_labels = read_idx(write_gz(tmp_path / "lab.gz", idx_bytes(labels)))
    assert read_images.dtype == np.uint8 and read_images.shape == (N_TINY, 28, 28)
    assert read_labels.dtype == np.uint8 and read_labels.shape == (N_TINY,)
    np.testing.assert_array_equal(read_images, images)
    np.testing.assert_array_equal(read_labels, labels)


def test_read_idx_accepts_multi_member_gzip(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    encoded = idx_bytes(labels)
    path = tmp_path / "two-members.gz"
    path.write_bytes(gzip.compress(encoded[:7]) + gzip.compress(encoded[7:]))
    np.testing.assert_array_equal(read_idx(path), labels)


@pytest.mark.parametrize(
    "payload, message",
    [
        pytest.param(b"\x00\x00\x09\x01" + struct.pack(">I", 2) + b"ab", "magic", id="wrong-dtype-code"),
        pytest.param(b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"ab", "magic", id="nonzero-magic-prefix"),
        pytest.param(b"\x00\x00\x08\x02" + struct.pack(">II", 1, 2) + b"ab", "magic", id="ndim-2"),
        pytest.param(b"\x00\x00\x08", "too short", id="short-header"),
        pytest.param(b"\x00\x00\x08\x03" + struct.pack(">I", 5), "header is truncated", id="truncated-dims"),
        pytest.param(idx_bytes(np.zeros((2, 28, 28), np.uint8))[:-5], "1563", id="truncated-payload"),
        pytest.param(idx_bytes(np.zeros(4, np.uint8)) + b"junk", "8 bytes", id="trailing-garbage"),
    ],
)
def test_read_idx_rejects_bad_idx(tmp_path, payload, message):
    path = write_gz(tmp_path / "bad-file.gz", payload)
    with pytest.raises(DataError, match=message) as err:
        read_idx(path)
    assert "bad-file.gz" in str(err.value)


def test_read_idx_payload_error_gives_both_lengths(tmp_path):
    path = write_gz(tmp_path / "short.gz", idx_bytes(np.zeros(10, np.uint8))[:-3])
    with pytest.raises(DataError, match=r"has 7 bytes .* needs 10"):
        read_idx(path)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(idx_bytes(np.zeros(4, np.uint8)), id="not-gzip"),
        pytest.param(b"", id="empty"),
        pytest.param(gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)))[:-12], id="truncated-gzip"),
        pytest.param(gzip.compress(idx_bytes(np.zeros(4, np.uint8))) + b"garbage!", id="junk-after-gzip"),
    ],
)
def test_read_idx_rejects_bad_gzip(tmp_path, raw):
    path = tmp_path / "broken.gz"
    path.write_bytes(raw)
    with pytest.raises(DataError, match="broken.gz"):
        read_idx(path)


def test_read_idx_detects_corrupt_gzip_crc(tmp_path):
    compressed = bytearray(gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8))))
    compressed[-8] ^= 0xFF  # the CRC32 of the trailer
    path = tmp_path / "crc.gz"
    path.write_bytes(bytes(compressed))
    with pytest.raises(DataError, match="crc.gz"):
        read_idx(path)


# --- resolve_data_root ----------------------------------------------------------------------------


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPACENET_DATA", raising=False)
    assert resolve_data_root() == tmp_path / "data"
    (tmp_path / "from-env").mkdir()
    (tmp_path / "from-arg").mkdir()
    monkeypatch.setenv("SPACENET_DATA", str(tmp_path / "from-env"))
    assert resolve_data_root() == tmp_path / "from-env"
    assert resolve_data_root(tmp_path / "from-arg") == tmp_path / "from-arg"
    assert resolve_data_root(str(tmp_path / "from-arg")) == tmp_path / "from-arg"


def test_empty_env_var_means_unset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPACENET_DATA", "")
    assert resolve_data_root() == tmp_path / "data"


# --- load_mnist_like ------------------------------------------------------------------------------


def test_load_mnist_like_shapes_and_values(tmp_path):
    arrays = write_tiny_dataset(tmp_path, "mnist", n_train=12, n_test=10)
    x_train, y_train, x_test, y_test = load_mnist_like("mnist", tmp_path)
    assert x_train.shape == (12, 784) and x_test.shape == (10, 784)
    assert y_train.shape == (12,) and y_test.shape == (10,)
    assert {a.dtype for a in (x_train, y_train, x_test, y_test)} == {np.dtype(np.uint8)}
    np.testing.assert_array_equal(x_train, arrays[FILES[0]].reshape(12, 784))
    np.testing.assert_array_equal(y_train, arrays[FILES[1]])
    np.testing.assert_array_equal(x_test, arrays[FILES[2]].reshape(10, 784))
    np.testing.assert_array_equal(y_test, arrays[FILES[3]])


def test_load_uses_env_var(tmp_path, monkeypatch):
    write_tiny_dataset(tmp_path, "fashion-mnist")
    monkeypatch.setenv("SPACENET_DATA", str(tmp_path))
    assert load_mnist_like("fashion-mnist")[0].shape == (N_TINY, 784)


def test_label_out_of_range(tmp_path):
    write_tiny_dataset(tmp_path, "mnist")
    labels = np.full(N_TINY, 3, np.uint8)
    labels[5] = 10
    write_gz(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", idx_bytes(labels))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz.*label 10"):
        load_mnist_like("mnist", tmp_path)


def test_image_label_count_mismatch_names_both_files(tmp_path):
    write_tiny_dataset(tmp_path, "mnist")
    write_gz(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz", idx_bytes(np.zeros(N_TINY - 1, np.uint8)))
    with pytest.raises(DataError) as err:
        load_mnist_like("mnist", tmp_path)
    assert "train-images-idx3-ubyte.gz" in str(err.value)
    assert "train-labels-idx1-ubyte.gz" in str(err.value)


def test_wrong_image_size(tmp_path):
    write_tiny_dataset(tmp_path, "mnist")
    big_images = np.zeros((N_TINY, 32, 32), np.uint8)
    write_gz(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", idx_bytes(big_images))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz.*28, 28"):
        load_mnist_like("mnist", tmp_path)


def test_labels_file_where_images_expected(tmp_path):
    write_tiny_dataset(tmp_path, "mnist")
    write_gz(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", idx_bytes(np.zeros(N_TINY, np.uint8)))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_mnist_like("mnist", tmp_path)


def test_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="cifar.*fashion-mnist, mnist"):
        load_mnist_like("cifar", tmp_path)


# --- fetch ----------------------------------------------------------------------------------------


def test_fetch_existing_file_is_not_downloaded(tmp_path, monkeypatch):
    write_tiny_dataset(tmp_path, "mnist")
    monkeypatch.setitem(data.MIRRORS, "mnist", [])
    assert fetch(tmp_path, "mnist", FILES[0]) == tmp_path / "mnist" / FILES[0]


def test_fetch_downloads_from_file_mirror(tmp_path, mirror):
    root = tmp_path / "root"
    for filename in FILES:
        path = fetch(root, "mnist", filename)
        assert path == root / "mnist" / filename
        assert path.read_bytes() == (mirror / filename).read_bytes()
    assert sorted(os.listdir(root / "mnist")) == sorted(FILES)  # no temporary files left
    x_train, _, _, _ = load_mnist_like("mnist", root)
    assert x_train.shape == (N_TINY, 784)


def test_fetch_tries_next_mirror(tmp_path, mirror, monkeypatch):
    monkeypatch.setitem(data.MIRRORS, "mnist", [(tmp_path / "nowhere").as_uri() + "/", mirror.as_uri() + "/"])
    path = fetch(tmp_path / "root", "mnist", FILES[1])
    assert path.read_bytes() == (mirror / FILES[1]).read_bytes()


def test_load_mnist_like_downloads_missing_files(tmp_path, mirror, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPACENET_DATA", raising=False)
    monkeypatch.delenv(data.CACHE_ENV_VAR, raising=False)
    y_test = load_mnist_like("mnist")[3]
    assert y_test.shape == (N_TINY,)
    cache = [f"{images}-idx3-ubyte.file-order.{ext}" for images in ("train-images", "t10k-images")
             for ext in ("npy", "json")]  # the decoded images' cache, beside the gz files
    assert sorted(os.listdir(tmp_path / "data" / "mnist")) == sorted([*FILES, *cache])  # and no temporary files


def test_fetch_checksum_mismatch_leaves_nothing(tmp_path, mirror, monkeypatch):
    wrong = "0" * 64
    monkeypatch.setitem(data.SHA256["mnist"], FILES[2], wrong)
    root = tmp_path / "root"
    with pytest.raises(DataError) as err:
        fetch(root, "mnist", FILES[2])
    message = str(err.value)
    assert FILES[2] in message and wrong in message and sha256_of(mirror / FILES[2]) in message
    assert os.listdir(root / "mnist") == []


def test_fetch_without_reachable_mirror(tmp_path, monkeypatch):
    monkeypatch.setitem(data.MIRRORS, "mnist", [(tmp_path / "nowhere").as_uri() + "/"])
    root = tmp_path / "root"
    with pytest.raises(FileNotFoundError) as err:
        fetch(root, "mnist", FILES[3])
    message = str(err.value)
    assert FILES[3] in message
    assert str(root / "mnist" / FILES[3]) in message
    assert "nowhere" in message
    assert "--data-dir" in message and "SPACENET_DATA" in message
    assert os.listdir(root / "mnist") == []


# --- verify_checksums -----------------------------------------------------------------------------


def test_verify_checksums(tmp_path, mirror):
    root = tmp_path / "root"
    root.mkdir()
    load_mnist_like("mnist", root)
    assert verify_checksums("mnist", root) == [root / "mnist" / name for name in FILES]
    modified = root / "mnist" / FILES[0]
    modified.write_bytes(modified.read_bytes() + b"\0")
    with pytest.raises(DataError, match=FILES[0]):
        verify_checksums("mnist", root)


def test_verify_checksums_missing_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=FILES[0]):
        verify_checksums("mnist", tmp_path / "empty")


# --- real data ------------------------------------------------------------------------------------

REAL_DATA = os.environ.get("SPACENET_DATA")


@pytest.mark.slow
@pytest.mark.skipif(
    not REAL_DATA or not all((Path(REAL_DATA) / "mnist" / name).exists() for name in FILES),
    reason="set SPACENET_DATA to a folder holding the real mnist/ files",
)
def test_real_mnist():
    x_train, y_train, x_test, y_test = load_mnist_like("mnist", REAL_DATA)
    assert x_train.shape == (60000, 784) and x_test.shape == (10000, 784)
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    expected_counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(y_train, minlength=10).tolist() == expected_counts


def test_read_idx_row_order_writes_permuted_rows(tmp_path):
    images = np.random.default_rng(3).integers(0, 256, size=(9, 28, 28), dtype=np.uint8)
    path = write_gz(tmp_path / "img.gz", idx_bytes(images))
    order = np.random.default_rng(4).permutation(9)
    np.testing.assert_array_equal(read_idx(path, row_order=order), images[order])
    with pytest.raises(ValueError, match="permutation"):
        read_idx(path, row_order=np.zeros(9, np.int64))


def test_group_by_label_sorts_stably(tmp_path):
    arrays = write_tiny_dataset(tmp_path, "mnist", n_train=30, n_test=20)
    x_train, y_train, _, _ = load_mnist_like("mnist", tmp_path, group_by_label=True)
    order = np.argsort(arrays[FILES[1]], kind="stable")
    np.testing.assert_array_equal(y_train, arrays[FILES[1]][order])
    np.testing.assert_array_equal(x_train, arrays[FILES[0]].reshape(30, 784)[order])


# --- absurd headers, wrong kinds of paths, missing data folders (issue 9) ---------------------------


def idx_header(ndim_dims: tuple[int, ...]) -> bytes:
    """An IDX header (magic, big-endian dims) for a uint8 array with the dimensions ``ndim_dims``."""
    return struct.pack(">BBBB", 0, 0, 0x08, len(ndim_dims)) + struct.pack(f">{len(ndim_dims)}I", *ndim_dims)


@pytest.mark.parametrize(
    "dims, payload, message",
    [
        pytest.param((4_000_000_000, 28, 28), b"\0" * 784, "needs 3136000000000 bytes", id="4e9-images"),
        pytest.param((2**32 - 1,) * 3, b"\0" * 64, "needs", id="product-overflows-64-bits"),
        pytest.param((2**32 - 1,), b"\0" * 64, "needs 4294967295 bytes", id="4e9-labels"),
        pytest.param((0, 28, 28), b"", "no rows", id="zero-images"),
        pytest.param((0,), b"", "no rows", id="zero-labels"),
        pytest.param((5, 0, 28), b"", "zero dimension", id="zero-width"),
    ],
)
def test_absurd_or_empty_idx_header_is_a_data_error(tmp_path, dims, payload, message):
    """Refused from the header, before any allocation: never a MemoryError or a reshape error."""
    path = write_gz(tmp_path / "absurd.gz", idx_header(dims) + payload)
    with pytest.raises(DataError, match=message) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_header_larger_than_the_payload_but_within_the_gzip_bound(tmp_path):
    """A claim a gzip file of this size could hold, with fewer bytes in it: the payload check names both sizes."""
    path = write_gz(tmp_path / "short.gz", idx_header((1000,)) + bytes(range(10)))
    with pytest.raises(DataError, match=r"short\.gz.*has 10 bytes .* needs 1000"):
        read_idx(path)


def test_long_tail_after_the_payload_is_counted_not_kept(tmp_path):
    path = write_gz(tmp_path / "tail.gz", idx_bytes(np.zeros(3, np.uint8)) + b"\0" * (3 << 20))
    with pytest.raises(DataError, match=r"tail\.gz.*has 3145731 bytes .* needs 3"):
        read_idx(path)


def test_zero_image_dataset_is_refused_by_name(tmp_path):
    write_tiny_dataset(tmp_path, "mnist")
    write_gz(tmp_path / "mnist" / FILES[2], idx_header((0, 28, 28)))
    with pytest.raises(DataError, match=rf"{FILES[2]}.*no rows"):
        load_mnist_like("mnist", tmp_path)


def make_symlink_loop(path: Path) -> Path:
    """``path`` -> ``path.loop`` -> ``path``: following either never ends (ELOOP)."""
    other = path.with_name(path.name + ".loop")
    os.symlink(other, path)
    os.symlink(path, other)
    return path


@pytest.mark.parametrize("kind", ["directory", "symlink-loop", "broken-symlink"])
def test_a_non_file_where_an_idx_file_should_be_is_a_data_error(tmp_path, monkeypatch, kind):
    """Not "missing, could not be downloaded" (and nothing is downloaded over it): a DataError naming it."""
    write_tiny_dataset(tmp_path, "mnist")
    monkeypatch.setitem(data.SHA256, "mnist", {name: sha256_of(tmp_path / "mnist" / name) for name in FILES})
    target = tmp_path / "mnist" / FILES[1]
    target.unlink()
    if kind == "directory":
        target.mkdir()
    elif kind == "symlink-loop":
        make_symlink_loop(target)
    else:
        os.symlink(tmp_path / "nowhere", target)
    monkeypatch.setitem(data.MIRRORS, "mnist", [(tmp_path / "must-not-be-used").as_uri() + "/"])
    for call in (lambda: load_mnist_like("mnist", tmp_path), lambda: fetch(tmp_path, "mnist", FILES[1]),
                 lambda: read_idx(target), lambda: verify_checksums("mnist", tmp_path)):
        with pytest.raises(DataError) as err:
            call()
        assert str(target) in str(err.value)
        assert "could not be downloaded" not in str(err.value)


def test_a_file_where_the_dataset_folder_should_be_is_a_data_error(tmp_path):
    (tmp_path / "mnist").write_bytes(b"not a folder")
    with pytest.raises(DataError, match=r"mnist is a file, not a folder"):
        load_mnist_like("mnist", tmp_path)


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_a_given_data_folder_that_does_not_exist_is_refused_and_not_created(tmp_path, monkeypatch, mirror, how):
    """--data-dir / $SPACENET_DATA with a typo: a DataError naming it, and no folder (or download) appears."""
    missing = tmp_path / "typo" / "data"
    monkeypatch.chdir(tmp_path)
    if how == "argument":
        monkeypatch.delenv("SPACENET_DATA", raising=False)
        calls = [lambda: resolve_data_root(missing), lambda: load_mnist_like("mnist", missing),
                 lambda: data.load_cifar("cifar-10", missing)]
    else:
        monkeypatch.setenv("SPACENET_DATA", str(missing))
        calls = [resolve_data_root, lambda: load_mnist_like("mnist"), lambda: data.load_cifar("cifar-10")]
    for call in calls:
        with pytest.raises(DataError, match="does not exist") as err:
            call()
        assert str(missing) in str(err.value)
    assert not (tmp_path / "typo").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("kind", ["file", "symlink-loop"])
def test_a_given_data_folder_that_is_not_a_folder_is_refused(tmp_path, kind):
    root = tmp_path / "root"
    if kind == "file":
        root.write_bytes(b"")
    else:
        make_symlink_loop(root)
    with pytest.raises(DataError) as err:
        load_mnist_like("mnist", root)
    assert str(root) in str(err.value)


def test_the_default_data_folder_is_still_created_for_downloads(tmp_path, monkeypatch, mirror):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPACENET_DATA", raising=False)
    assert load_mnist_like("mnist")[0].shape == (N_TINY, 784)
    assert (tmp_path / "data" / "mnist" / FILES[0]).is_file()


@pytest.mark.parametrize("kind", ["directory", "symlink-loop"])
def test_a_non_file_in_the_cifar_folder_is_a_data_error(tmp_path, monkeypatch, kind):
    monkeypatch.setitem(data.CIFAR_COUNTS, "cifar-10", {**{name: N10_BATCH for name in C10_TRAIN},
                                                         "test_batch": N10_BATCH})
    monkeypatch.setitem(data.MIRRORS, "cifar-10", [])
    write_cifar10(tmp_path)
    target = tmp_path / C10_FOLDER / "data_batch_2"
    target.unlink()
    if kind == "directory":
        target.mkdir()
    else:
        make_symlink_loop(target)
    with pytest.raises(DataError) as err:
        data.load_cifar("cifar-10", tmp_path)
    assert str(target) in str(err.value)


def test_a_symlink_loop_instead_of_the_cifar_folder_is_a_data_error(tmp_path, monkeypatch):
    monkeypatch.setitem(data.MIRRORS, "cifar-10", [])
    make_symlink_loop(tmp_path / C10_FOLDER)
    with pytest.raises(DataError, match=C10_FOLDER) as err:
        data.load_cifar("cifar-10", tmp_path)
    assert "could not be downloaded" not in str(err.value)
