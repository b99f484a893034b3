"""Tests for spacenet_np.data on tiny generated IDX files (one optional test uses the real MNIST)."""

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import pytest

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
    y_test = load_mnist_like("mnist")[3]
    assert y_test.shape == (N_TINY,)
    assert sorted(os.listdir(tmp_path / "data" / "mnist")) == sorted(FILES)


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
    load_mnist_like("mnist", root)
    assert verify_checksums("mnist", root) == [root / "mnist" / name for name in FILES]
    modified = root / "mnist" / FILES[0]
    modified.write_bytes(modified.read_bytes() + b"\0")
    with pytest.raises(DataError, match=FILES[0]):
        verify_checksums("mnist", root)


def test_verify_checksums_missing_file(tmp_path):
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
