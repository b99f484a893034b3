"""Readers for the canonical MNIST-style IDX files, with checked downloads.

A dataset lives in ``<data root>/<dataset>/`` as the four canonical gzipped IDX files. The data root is
chosen by :func:`resolve_data_root`; missing files are downloaded from the mirrors in :data:`MIRRORS`
and checked against :data:`SHA256` before they are moved into place.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import logging
import math
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np

__all__ = [
    "DataError",
    "FILES",
    "MIRRORS",
    "SHA256",
    "fetch",
    "load_mnist_like",
    "read_idx",
    "resolve_data_root",
    "verify_checksums",
]

log = logging.getLogger(__name__)

DATA_ENV_VAR = "SPACENET_DATA"

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

# sha256 of each published .gz file (see /work/shared/data/README.md).
SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        TRAIN_IMAGES: "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        TRAIN_LABELS: "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        TEST_IMAGES: "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        TEST_LABELS: "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        TRAIN_IMAGES: "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        TRAIN_LABELS: "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        TEST_IMAGES: "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        TEST_LABELS: "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}

# Base URLs tried in order; each ends with "/" and the file name is appended. Module-level so that
# tests (or users behind a proxy) can point it elsewhere, e.g. at file:// URLs.
MIRRORS: dict[str, list[str]] = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ],
    "fashion-mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ],
}

IMAGE_SIDE = 28
N_CLASSES = 10

IDX_UBYTE = 0x08
IDX_NDIMS = (1, 3)  # labels, images
GZIP_WBITS = 16 + zlib.MAX_WBITS  # accept only a gzip header and trailer
DOWNLOAD_TIMEOUT_S = 60
CHUNK_BYTES = 1 << 20

# A network error: URLError and socket timeouts are OSErrors; a dropped connection mid-body is an
# http.client.IncompleteRead.
NETWORK_ERRORS = (OSError, http.client.HTTPException)


class DataError(ValueError):
    """A dataset file is corrupt, truncated, inconsistent or fails its checksum. Names the file."""


def resolve_data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The data root: ``data_dir`` if given, else ``$SPACENET_DATA``, else ``./data`` in the cwd."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    from_env = os.environ.get(DATA_ENV_VAR)
    if from_env:
        return Path(from_env).expanduser()
    return Path.cwd() / "data"


def _check_dataset(dataset: str) -> None:
    """Raise ValueError unless ``dataset`` is in the registry."""
    if dataset not in SHA256:
        raise ValueError(f"unknown dataset {dataset!r}; known datasets: {', '.join(sorted(SHA256))}")


def _gunzip_pieces(path: Path):
    """Yield the decompressed bytes of the gzip file ``path`` (all members) piece by piece.

    Streaming keeps memory at the size of the result rather than twice it. Raises DataError, naming the file,
    for data that is not gzip, a truncated or empty stream, or a bad CRC.
    """
    try:
        with path.open("rb") as f:
            decompressor = zlib.decompressobj(GZIP_WBITS)
            in_member, seen_any = False, False
            while chunk := f.read(CHUNK_BYTES):
                data = chunk
                while data:
                    in_member = seen_any = True
                    yield decompressor.decompress(data)
                    data = b""
                    if decompressor.eof:  # a member ends; the rest of the chunk starts the next one
                        data, in_member = decompressor.unused_data, False
                        decompressor = zlib.decompressobj(GZIP_WBITS)
    except zlib.error as err:
        raise DataError(f"{path}: not a valid gzip file ({err})") from err
    if in_member or not seen_any:
        raise DataError(f"{path}: gzip stream is truncated or empty")


def _parse_idx_header(path: Path, head: bytes) -> tuple[int, tuple[int, ...]] | None:
    """(header length, shape) from the first bytes of an IDX file, or None if more bytes are needed."""
    if len(head) < 4:
        return None
    zero0, zero1, dtype_code, ndim = head[:4]
    if zero0 or zero1 or dtype_code != IDX_UBYTE or ndim not in IDX_NDIMS:
        magic = int.from_bytes(head[:4], "big")
        raise DataError(
            f"{path}: bad IDX magic {magic} (0x{magic:08x}); expected 2049 (labels) or 2051 (images)"
        )
    header_len = 4 + 4 * ndim
    if len(head) < header_len:
        return None
    return header_len, tuple(int(d) for d in np.frombuffer(head, dtype=">u4", count=ndim, offset=4))


def read_idx(path: str | os.PathLike, row_order: np.ndarray | None = None) -> np.ndarray:
    """Read a gzipped IDX file of uint8 data: labels as ``(n,)`` or images as ``(n, rows, cols)``.

    With ``row_order`` (a permutation of ``range(n)``) the result is ``data[row_order]``, written in place while
    decompressing, so no second copy of the data is ever held. Raises DataError, naming the file, for bad gzip
    data, a magic other than 2049/2051, or a payload whose length differs from the product of the header's
    dimensions.
    """
    path = Path(path)
    pieces = _gunzip_pieces(path)
    head = b""
    header = None
    for piece in pieces:
        head += piece
        header = _parse_idx_header(path, head)
        if header is not None:
            break
    if header is None:
        if len(head) < 4:
            raise DataError(f"{path}: {len(head)} bytes is too short for an IDX header")
        raise DataError(f"{path}: IDX header is truncated ({len(head)} bytes)")
    header_len, shape = header
    out = np.empty(shape, dtype=np.uint8)
    n_rows = shape[0]
    rows = out.reshape(n_rows, -1)
    destination = np.arange(n_rows) if row_order is None else _inverse_permutation(path, row_order, n_rows)
    carry = head[header_len:]
    written, received = 0, len(carry)
    for piece in itertools.chain([b""], pieces):
        carry += piece
        received += len(piece)
        whole = min(len(carry) // max(rows.shape[1], 1), n_rows - written) if rows.shape[1] else 0
        if whole:
            block = np.frombuffer(carry, dtype=np.uint8, count=whole * rows.shape[1]).reshape(whole, -1)
            rows[destination[written:written + whole]] = block
            carry = carry[whole * rows.shape[1]:]
            written += whole
    expected = math.prod(shape)
    if received != expected:
        raise DataError(
            f"{path}: IDX payload has {received} bytes but the header shape {shape} needs {expected}"
        )
    out.flags.writeable = False
    return out


def _inverse_permutation(path: Path, row_order: np.ndarray, n_rows: int) -> np.ndarray:
    """Destination row of each source row for ``data[row_order]``; ValueError if not a permutation."""
    row_order = np.asarray(row_order)
    if row_order.shape != (n_rows,) or not np.array_equal(np.sort(row_order), np.arange(n_rows)):
        raise ValueError(f"row_order for {path} must be a permutation of range({n_rows})")
    destination = np.empty(n_rows, dtype=np.int64)
    destination[row_order] = np.arange(n_rows)
    return destination


def _sha256_of_file(path: Path) -> str:
    """The hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _download_to(url: str, target: Path, expected_sha256: str) -> None:
    """Stream ``url`` into ``target`` atomically, checking its sha256.

    Writes to a temporary file next to ``target`` and renames it into place only if the hash matches, so
    a crash or failure never leaves a partial ``target``; the temporary file is removed on any failure.
    Network errors propagate; a hash mismatch raises DataError.
    """
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            while chunk := response.read(CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
        actual = digest.hexdigest()
        if actual != expected_sha256:
            raise DataError(
                f"{target}: sha256 mismatch for the download from {url}: "
                f"expected {expected_sha256}, got {actual}"
            )
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _missing_file_message(dataset: str, filename: str, target: Path, tried: list[str]) -> str:
    """Explain which file is missing, where to put it and how to choose another data folder."""
    lines = [
        f"{dataset} file {filename!r} is missing and could not be downloaded.",
        f"Put it at: {target}",
    ]
    lines += [f"  tried {url}: {reason}" for url, reason in tried]
    lines.append(f"Use --data-dir or the {DATA_ENV_VAR} environment variable to select another data folder.")
    return "\n".join(lines)


def fetch(root: str | os.PathLike, dataset: str, filename: str) -> Path:
    """The path of ``root/dataset/filename``, downloading it from the mirrors first if it is missing.

    An existing file is returned as is (not re-hashed; see :func:`verify_checksums`). A download is checked
    against :data:`SHA256` (DataError on mismatch). If every mirror fails with a network error, raises
    FileNotFoundError saying where the file should be put.
    """
    _check_dataset(dataset)
    target = Path(root) / dataset / filename
    if target.exists():
        return target
    expected_sha256 = SHA256[dataset][filename]
    target.parent.mkdir(parents=True, exist_ok=True)
    tried = []
    for base_url in MIRRORS.get(dataset, []):
        url = base_url + filename
        log.info("downloading %s to %s", url, target)
        try:
            _download_to(url, target, expected_sha256)
        except NETWORK_ERRORS as err:
            tried.append((url, err))
            continue
        return target
    raise FileNotFoundError(_missing_file_message(dataset, filename, target, tried))


def verify_checksums(dataset: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Hash the four files of ``dataset`` already on disk; DataError on a mismatch, naming the file.

    Returns the verified paths. Missing files raise FileNotFoundError (nothing is downloaded).
    """
    _check_dataset(dataset)
    folder = resolve_data_root(data_dir) / dataset
    verified = []
    for filename, expected in SHA256[dataset].items():
        path = folder / filename
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; cannot verify its checksum")
        actual = _sha256_of_file(path)
        if actual != expected:
            raise DataError(f"{path}: sha256 mismatch: expected {expected}, got {actual}")
        verified.append(path)
    return verified


def _load_split(images_path: Path, labels_path: Path, group_by_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """Read and check one split: images ``(n, 784)`` uint8 and labels ``(n,)`` uint8 in 0..9.

    With ``group_by_label`` the samples are stably sorted by label (the file order within a label is kept).
    """
    labels = read_idx(labels_path)
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected labels of shape (n,), got {labels.shape}")
    if len(labels) and labels.max() >= N_CLASSES:
        raise DataError(f"{labels_path}: label {labels.max()} is outside 0..{N_CLASSES - 1}")
    order = np.argsort(labels, kind="stable") if group_by_label else None
    try:
        images = read_idx(images_path, row_order=order)
    except ValueError as err:
        if isinstance(err, DataError):
            raise
        images = read_idx(images_path)  # the count differs from the labels: the check below names both files
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(f"{images_path}: expected images of shape (n, 28, 28), got {images.shape}")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    if order is not None:
        labels = labels[order]
        labels.flags.writeable = False
    return images.reshape(len(images), IMAGE_SIDE * IMAGE_SIDE), labels


def load_mnist_like(
    dataset: str, data_dir: str | os.PathLike | None = None, group_by_label: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load ``"mnist"`` or ``"fashion-mnist"`` as ``(x_train, y_train, x_test, y_test)``.

    Images are uint8 ``(n, 784)`` (rows of the 28x28 image, raw 0..255 pixels) and labels uint8 ``(n,)``;
    all four are read-only. With ``group_by_label`` each split is stably sorted by label, so that a subset of
    consecutive classes is a slice (a view, no copy). Missing files are downloaded into the data root (see
    :func:`fetch`).
    """
    _check_dataset(dataset)
    root = resolve_data_root(data_dir)
    paths = {filename: fetch(root, dataset, filename) for filename in FILES}
    x_train, y_train = _load_split(paths[TRAIN_IMAGES], paths[TRAIN_LABELS], group_by_label)
    x_test, y_test = _load_split(paths[TEST_IMAGES], paths[TEST_LABELS], group_by_label)
    return x_train, y_train, x_test, y_test
