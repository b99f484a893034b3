"""Readers for the canonical MNIST-style IDX files and CIFAR-10/100 python pickles, with checked downloads.

An IDX dataset lives in ``<data root>/<dataset>/`` as the four canonical gzipped IDX files. CIFAR-10 and
CIFAR-100 live in ``<data root>/`` as their canonical extracted folders (``cifar-10-batches-py/``,
``cifar-100-python/``); when a folder is missing, its canonical ``.tar.gz`` archive in the data root is
extracted safely (downloaded first if it is missing too). The data root is chosen by
:func:`resolve_data_root`; missing files are downloaded from the mirrors in :data:`MIRRORS` and checked
against :data:`SHA256` before they are moved into place.

A data folder given explicitly (``--data-dir``, ``$SPACENET_DATA``) must exist: only the default ``./data`` is
created, so a mistyped path is an error rather than a new folder filled with downloads. Where a file is expected,
a folder, a broken symbolic link or a link loop is a DataError naming the path; an IDX header whose shape has a
zero dimension, or needs more bytes than its gzip file can hold, is refused before anything is allocated.

The decoded MNIST-style images are cached as uncompressed ``.npy`` files (beside the gz files when that folder is
writable, else in the user cache folder; ``$SPACENET_CACHE`` overrides) and memory-mapped read-only on later
loads; every load checks the cache against its gz file and its own recorded hash, and rebuilds it on a mismatch.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import mmap
import os
import pickle
import shutil
import stat
import tempfile
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

import numpy as np

from .fileio import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:  # tarfile is imported where archives are opened: most runs never need it
    import tarfile

__all__ = [
    "CIFAR",
    "CIFAR10",
    "CIFAR100",
    "CIFAR_COUNTS",
    "CifarLayout",
    "DataError",
    "FILES",
    "MIRRORS",
    "SHA256",
    "cifar_folder",
    "extract_archive",
    "fetch",
    "load_cifar",
    "load_cifar_label_names",
    "load_mnist_like",
    "read_cifar_batch",
    "read_cifar_pickle",
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

CIFAR10 = "cifar-10"
CIFAR100 = "cifar-100"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"

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
    # The canonical archives of https://www.cs.toronto.edu/~kriz/cifar.html (kept in the data root itself).
    CIFAR10: {CIFAR10_ARCHIVE: "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"},
    CIFAR100: {CIFAR100_ARCHIVE: "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"},
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
    CIFAR10: ["https://www.cs.toronto.edu/~kriz/"],
    CIFAR100: ["https://www.cs.toronto.edu/~kriz/"],
}


@dataclass(frozen=True)
class CifarLayout:
    """Where the files of a CIFAR dataset are and which pickle keys they use.

    ``archive`` (in the data root) extracts to the folder ``folder`` (in the data root), which holds the
    pickled ``train_files``, ``test_files`` and ``meta_file``. Each batch is a dict with ``b"data"`` (uint8
    ``(n, 3072)``) and ``label_key`` (ints in ``0..n_classes - 1``); the meta file has ``label_names_key``.
    ``needed_for`` names what needs the dataset, for the missing-data message.
    """

    archive: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    label_names_key: bytes
    n_classes: int
    needed_for: str


CIFAR: dict[str, CifarLayout] = {
    CIFAR10: CifarLayout(
        archive=CIFAR10_ARCHIVE,
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key=b"labels",
        label_names_key=b"label_names",
        n_classes=10,
        needed_for="the split_cifar10 and cifar10_100 streams",
    ),
    CIFAR100: CifarLayout(
        archive=CIFAR100_ARCHIVE,
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key=b"fine_labels",
        label_names_key=b"fine_label_names",
        n_classes=100,
        needed_for="the cifar10_100 stream",
    ),
}

# Images in each CIFAR batch file. Module-level so that tests can use tiny files.
CIFAR_COUNTS: dict[str, dict[str, int]] = {
    CIFAR10: {**{f"data_batch_{i}": 10000 for i in range(1, 6)}, "test_batch": 10000},
    CIFAR100: {"train": 50000, "test": 10000},
}

CIFAR_IMAGE_SHAPE = (3, 32, 32)  # channel-major rows: 1024 red, 1024 green, 1024 blue values, each row-major
CIFAR_ROW_BYTES = math.prod(CIFAR_IMAGE_SHAPE)

IMAGE_SIDE = 28
N_CLASSES = 10

IDX_UBYTE = 0x08
IDX_NDIMS = (1, 3)  # labels, images
GZIP_WBITS = 16 + zlib.MAX_WBITS  # accept only a gzip header and trailer
MAX_DEFLATE_RATIO = 1032  # deflate's limit: a 258-byte match per 2 bits, so n gzip bytes inflate to < 1032 n
DOWNLOAD_TIMEOUT_S = 60
CHUNK_BYTES = 1 << 20


def _network_errors() -> tuple[type[BaseException], ...]:
    """A network error: URLError and socket timeouts are OSErrors; a dropped connection mid-body is an
    http.client.IncompleteRead."""
    import http.client  # here, not at the top: only a download needs it (saves ~5 ms of every run's imports)
    return (OSError, http.client.HTTPException)


class DataError(ValueError):
    """A dataset file is corrupt, truncated, inconsistent or fails its checksum. Names the file."""


def resolve_data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The data root: ``data_dir`` if given, else ``$SPACENET_DATA``, else ``./data`` in the cwd.

    A root given by ``data_dir`` or ``$SPACENET_DATA`` must be an existing folder (DataError naming it otherwise):
    it is never created. The default ``./data`` may not exist yet; downloads create it.
    """
    if data_dir is not None:
        root, origin = Path(data_dir).expanduser(), "the given data folder"
    elif os.environ.get(DATA_ENV_VAR):
        root, origin = Path(os.environ[DATA_ENV_VAR]).expanduser(), f"the data folder from ${DATA_ENV_VAR}"
    else:
        return Path.cwd() / "data"
    if not _existing_dir(root):
        raise DataError(f"{root}: {origin} does not exist; create it (or fix the path) and put the data there, "
                        f"or use --data-dir or ${DATA_ENV_VAR} to select another folder")
    return root


def _existing(path: Path, want_dir: bool) -> bool:
    """Whether ``path`` exists as a file (a folder with ``want_dir``), following links; False if nothing is there.

    Raises DataError naming the path for the wrong kind (a folder where a file should be, a device, ...), a
    broken symbolic link, a link loop, or a parent that is not a folder, so that none of them is mistaken for a
    missing file (which would be downloaded, or reported as missing).
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise DataError(f"{path}: a broken symbolic link (to {os.readlink(path)!r})") from None
        return False
    except NotADirectoryError:
        parent = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), path.parent)
        raise DataError(f"{path}: cannot exist because {parent} is a file, not a folder") from None
    except OSError as err:  # ELOOP (a symbolic link loop), EACCES, ...
        raise DataError(f"{path}: cannot be accessed ({err.strerror or err})") from None
    if want_dir and not stat.S_ISDIR(mode):
        raise DataError(f"{path}: expected a folder, found a file")
    if not want_dir and not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise DataError(f"{path}: expected a data file, found {kind}")
    return True


def _existing_file(path: Path) -> bool:
    """``_existing(path, want_dir=False)``."""
    return _existing(path, want_dir=False)


def _existing_dir(path: Path) -> bool:
    """``_existing(path, want_dir=True)``."""
    return _existing(path, want_dir=True)


def _check_readable_file(path: Path) -> None:
    """FileNotFoundError if nothing is at ``path``; DataError for anything but a regular file (see ``_existing``)."""
    if not _existing_file(path):
        raise FileNotFoundError(f"{path}: no such file")


def _check_dataset(dataset: str, known: Iterable[str] | None = None) -> None:
    """Raise ValueError unless ``dataset`` is in ``known`` (default: the whole registry)."""
    known = SHA256 if known is None else known
    if dataset not in known:
        raise ValueError(f"unknown dataset {dataset!r}; known datasets: {', '.join(sorted(known))}")


def _idx_datasets() -> list[str]:
    """The registered datasets stored as IDX files (not CIFAR)."""
    return [name for name in SHA256 if name not in CIFAR]


def _registry_path(root: Path, dataset: str, filename: str) -> Path:
    """Where a registered file lives: a CIFAR archive in the data root, IDX files in ``root/dataset/``."""
    return root / filename if dataset in CIFAR else root / dataset / filename


def _gunzip_pieces(path: Path):
    """Yield the decompressed bytes of the gzip file ``path`` (all members) piece by piece.

    Streaming keeps memory at the size of the result rather than twice it. Raises DataError, naming the file,
    for data that is not gzip, a truncated or empty stream, or a bad CRC.
    """
    try:
        with _open_data_file(path) as f:
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


def _open_data_file(path: Path):
    """``path`` opened for binary reading; DataError naming it if it is not a regular file or cannot be read."""
    _check_readable_file(path)
    try:
        return path.open("rb")
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None


def _check_idx_shape(path: Path, shape: tuple[int, ...], header_len: int) -> int:
    """The payload size of an IDX ``shape``; DataError for a zero dimension or more bytes than the file can hold.

    The bound is the file's gzip size times deflate's maximal ratio, so a header claiming billions of images (or
    dimensions whose product overflows 64 bits) is refused before any allocation. Python ints do not overflow.
    """
    if 0 in shape:
        what = "no rows" if shape[0] == 0 else "a zero dimension"
        raise DataError(f"{path}: the IDX header shape {shape} has {what}; the file holds no data")
    expected = math.prod(shape)
    most = MAX_DEFLATE_RATIO * path.stat().st_size
    if expected + header_len > most:
        raise DataError(f"{path}: the IDX header shape {shape} needs {expected} bytes, more than the "
                        f"{path.stat().st_size}-byte gzip file can hold (at most {most} bytes); corrupt header")
    return expected


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
    data, a magic other than 2049/2051, a header shape with a zero dimension or larger than the file can hold, a
    payload whose length differs from the product of the header's dimensions, or a path that is not a file.
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
    expected = _check_idx_shape(path, shape, header_len)
    try:
        out = np.empty(shape, dtype=np.uint8)
    except (MemoryError, ValueError) as err:
        raise DataError(f"{path}: cannot hold the IDX header shape {shape} ({expected} bytes) in memory: "
                        f"{err}") from None
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
        if written == n_rows:
            carry = b""  # surplus bytes are only counted: a long tail must not pile up in memory
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
    with _open_data_file(path) as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _download_to(url: str, target: Path, expected_sha256: str) -> None:
    """Stream ``url`` into ``target`` atomically, checking its sha256.

    Writes to a temporary file next to ``target`` and renames it into place only if the hash matches, so
    a crash or failure never leaves a partial ``target``; the temporary file is removed on any failure.
    Network errors propagate; a hash mismatch raises DataError.
    """
    import urllib.request  # only downloads need it (with http.client, ~7 ms of imports)
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


def _check_sha256(path: Path, expected: str) -> None:
    """Raise DataError, naming ``path``, unless the file's sha256 is ``expected``."""
    actual = _sha256_of_file(path)
    if actual != expected:
        raise DataError(f"{path}: sha256 mismatch: expected {expected}, got {actual}")


def _missing_file_message(dataset: str, filename: str, target: Path, tried: list[str]) -> str:
    """Explain which file is missing, where to put it and how to choose another data folder."""
    if dataset in CIFAR:
        layout = CIFAR[dataset]
        root = target.parent
        lines = [
            f"{dataset} is missing: the data folder {root} holds neither the extracted folder "
            f"{layout.folder}/ nor the archive {filename!r}, and the archive could not be downloaded.",
            f"Put the extracted folder there directly: {root / layout.folder}/ "
            f"(for example extracted with `tar -xf <archive> -C {root}`), or the archive at: {target}",
            f"{dataset} is needed for {layout.needed_for}.",
        ]
    else:
        lines = [
            f"{dataset} file {filename!r} is missing and could not be downloaded.",
            f"Put it at: {target}",
        ]
    lines += [f"  tried {url}: {reason}" for url, reason in tried]
    lines.append(f"Use --data-dir or the {DATA_ENV_VAR} environment variable to select another data folder.")
    return "\n".join(lines)


def fetch(root: str | os.PathLike, dataset: str, filename: str) -> Path:
    """The path of ``root/dataset/filename`` (``root/filename`` for a CIFAR archive), downloading it from the
    mirrors first if it is missing.

    An existing file is returned as is (not re-hashed; see :func:`verify_checksums`). A folder, a broken symbolic
    link or a link loop at its place is a DataError naming it (nothing is downloaded over it). A download is
    checked against :data:`SHA256` (DataError on mismatch). If every mirror fails with a network error, raises
    FileNotFoundError saying where the file should be put.
    """
    _check_dataset(dataset)
    target = _registry_path(Path(root), dataset, filename)
    if _existing_file(target):  # DataError for a folder, a broken link or a link loop: never downloaded over
        return target
    expected_sha256 = SHA256[dataset][filename]
    target.parent.mkdir(parents=True, exist_ok=True)
    tried = []
    for base_url in MIRRORS.get(dataset, []):
        url = base_url + filename
        log.info("downloading %s to %s", url, target)
        try:
            _download_to(url, target, expected_sha256)
        except _network_errors() as err:
            tried.append((url, err))
            continue
        return target
    raise FileNotFoundError(_missing_file_message(dataset, filename, target, tried))


def verify_checksums(dataset: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Hash the registered files of ``dataset`` already on disk (the four IDX files, or a CIFAR archive);
    DataError on a mismatch, naming the file.

    Returns the verified paths. Missing files raise FileNotFoundError (nothing is downloaded).
    """
    _check_dataset(dataset)
    root = resolve_data_root(data_dir)
    verified = []
    for filename, expected in SHA256[dataset].items():
        path = _registry_path(root, dataset, filename)
        if not _existing_file(path):
            raise FileNotFoundError(f"{path}: missing; cannot verify its checksum")
        _check_sha256(path, expected)
        verified.append(path)
    return verified


# --- the decode cache of the IDX images -------------------------------------------------------------------
#
# Inflating MNIST's gzipped images costs a few tenths of a second in every run. The decoded array (read_idx's
# result, in the order asked for) is kept as an uncompressed .npy and memory-mapped read-only on later runs. A
# JSON sidecar records what it was built from (the gz's sha256, size and stat, the row order) and the sha256 of
# the .npy file (twice as fast as blake2b where the CPU has SHA instructions); all of it is checked on every
# load, and a cache that does not match is rebuilt. The labels are not cached: their gz files are 5-30 kB and
# inflate in well under a millisecond.

CACHE_ENV_VAR = "SPACENET_CACHE"
CACHE_OFF = "off"
CACHE_FORMAT = "spacenet_np.idx_cache"
CACHE_VERSION = 2  # 1 recorded a blake2b of the .npy: such caches are rebuilt
# A gz changed this recently may change again within one timestamp tick with an identical stat (git's "racily
# clean" problem), so its stat is not trusted: its sha256 is computed again at the next load.
RACY_NS = 2_000_000_000


class _StaleCache(Exception):
    """A cache entry that must be rebuilt; the message says why."""


@dataclass(frozen=True)
class _CacheEntry:
    """The two files of a cached array: the .npy and its JSON sidecar."""

    array: Path
    sidecar: Path

    @classmethod
    def named(cls, folder: Path, stem: str) -> _CacheEntry:
        return cls(folder / f"{stem}.npy", folder / f"{stem}.json")


def _user_cache_folder() -> Path | None:
    """``$XDG_CACHE_HOME/spacenet_np/data``, else ``~/.cache/spacenet_np/data``; None without a home folder."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = Path.home() / ".cache"
        except RuntimeError:  # no home folder can be determined
            return None
    return Path(base) / "spacenet_np" / "data"


def _may_write(folder: Path) -> bool:
    """Whether to write into ``folder``: its permission bits let someone write, and this process may.

    The bits are checked because root may write anywhere: a data folder made read-only stays untouched.
    """
    try:
        mode = folder.stat().st_mode
    except OSError:
        return False
    return bool(mode & 0o222) and os.access(folder, os.W_OK)


def _folder_key(folder: Path) -> str:
    """A short hash of ``folder``'s absolute path: names its entries in a cache folder shared by many folders."""
    try:
        folder = folder.resolve()
    except (OSError, RuntimeError):  # a link loop: the absolute path still tells the folders apart
        folder = folder.absolute()
    return hashlib.blake2b(str(folder).encode(), digest_size=8).hexdigest()


def _cache_entries(gz: Path, variant: str) -> tuple[list[_CacheEntry], list[_CacheEntry]]:
    """Where the cache of ``gz`` in ``variant`` order may be read, and written, in order of preference.

    ``$SPACENET_CACHE`` (a folder, or ``off``) decides alone when set. Otherwise the cache is read beside the
    gz, then in the user cache folder; it is written beside the gz if that folder is writable (see
    :func:`_may_write`), else in the user cache folder.
    """
    stem = f"{gz.name.removesuffix('.gz')}.{variant}"
    shared_stem = f"{gz.parent.name}-{_folder_key(gz.parent)}.{stem}"
    override = os.environ.get(CACHE_ENV_VAR, "").strip()
    if override:
        if override.lower() == CACHE_OFF:
            return [], []
        entry = _CacheEntry.named(Path(os.path.expanduser(override)), shared_stem)  # never raises, unlike Path's
        return [entry], [entry]
    beside = _CacheEntry.named(gz.parent, stem)
    user_folder = _user_cache_folder()
    user = [] if user_folder is None else [_CacheEntry.named(user_folder, shared_stem)]
    return [beside, *user], ([beside] if _may_write(gz.parent) else []) + user


def _stat_signature(info: os.stat_result) -> list[int]:
    """What changes when a file is replaced or rewritten: device, inode, size, mtime and ctime."""
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def _source_record(gz: Path) -> dict:
    """The sidecar's record of ``gz``: sha256, size and stat (taken before hashing, so a change shows)."""
    info = gz.stat()
    trusted = time.time_ns() - max(info.st_mtime_ns, info.st_ctime_ns) > RACY_NS
    return {"path": str(gz.absolute()), "sha256": _sha256_of_file(gz), "size": info.st_size,
            "stat": _stat_signature(info), "stat_trusted": trusted}


def _check_source(gz: Path, recorded: dict) -> dict | None:
    """Raise _StaleCache unless ``gz`` has the recorded sha256 and size; a fresh record if the sidecar's is out
    of date (another stat, or a stat that can be trusted now), else None.

    The sha256 is computed only when the stat differs from the recorded one (or was too recent to trust).
    """
    info = gz.stat()
    if info.st_size != recorded["size"]:
        raise _StaleCache(f"{gz} has {info.st_size} bytes; the cache was built from a {recorded['size']}-byte file")
    if recorded["stat_trusted"] and _stat_signature(info) == recorded["stat"]:
        return None
    source = _source_record(gz)
    if source["sha256"] != recorded["sha256"]:
        raise _StaleCache(f"it was built from a file with sha256 {recorded['sha256']}, but {gz} has "
                          f"sha256 {source['sha256']}")
    same = (source["stat"], source["stat_trusted"]) == (recorded["stat"], recorded["stat_trusted"])
    return None if same else source


def _row_order_key(row_order: np.ndarray | None) -> str:
    """How the rows are ordered, for the sidecar: ``file``, or the blake2b of the permutation."""
    if row_order is None:
        return "file"
    order = np.ascontiguousarray(row_order, dtype=np.int64)
    return "blake2b:" + hashlib.blake2b(order.data, digest_size=32).hexdigest()


def _idx_shape(gz: Path) -> tuple[int, ...] | None:
    """The shape in ``gz``'s IDX header, inflating only its first bytes; None if it cannot be read."""
    try:
        with gz.open("rb") as f:
            head = zlib.decompressobj(GZIP_WBITS).decompress(f.read(4096), 64)
        header = _parse_idx_header(gz, head)
    except (OSError, zlib.error, DataError):
        return None
    return None if header is None else header[1]


def _map_npy(path: Path, recorded: dict, shape: tuple[int, ...], verify: bool = True) -> np.ndarray:
    """The uint8 C-order array of ``shape`` in the .npy at ``path``, memory-mapped read-only.

    With ``verify``, raise _StaleCache unless the file has the recorded size and sha256 and its header says
    uint8, C order and ``shape``. A plain ndarray over an mmap (rather than np.load's np.memmap subclass) keeps
    the arrays' type as read_idx returns it, and hashes the whole file through the same mapping.
    """
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != recorded["bytes"]:
            raise _StaleCache(f"{size} bytes, the sidecar records {recorded['bytes']} (truncated or appended to)")
        try:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                else np.lib.format.read_array_header_2_0
            header_shape, fortran_order, dtype = read_header(f)
        except ValueError as err:
            raise _StaleCache(f"not a valid .npy file ({err})") from None
        offset = f.tell()
        if dtype != np.uint8 or fortran_order or header_shape != shape or offset + math.prod(shape) != size:
            raise _StaleCache(f"holds a {dtype} {'Fortran' if fortran_order else 'C'}-order array of shape "
                              f"{header_shape} in {size} bytes; the gz holds uint8 {shape}")
        if verify:  # read through the file, not the mapping: pages are mapped into the process only when used
            f.seek(0)
            hasher = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                hasher.update(chunk)
            digest = hasher.hexdigest()
            if digest != recorded["sha256"]:
                raise _StaleCache(f"its contents are corrupt: sha256 {digest}, the sidecar records "
                                  f"{recorded['sha256']}")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mapped, dtype=np.uint8, count=math.prod(shape), offset=offset).reshape(shape)


def release_pages(array: np.ndarray) -> None:
    """Drop the pages of a memory-mapped cache array from this process's memory (``madvise(MADV_DONTNEED)``).

    For an array that views a cache mapping (``_map_npy``), such as a finished task's training images; its values
    do not change, a later read maps the pages again from the page cache. The whole pages inside the array are
    released; anything else (an array in ordinary memory, a system without madvise) is left as it is.
    """
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):  # np.frombuffer over an mmap
        base = base.obj
    if not isinstance(base, mmap.mmap) or not hasattr(base, "madvise") or not array.flags.c_contiguous:
        return
    start = array.__array_interface__["data"][0] - np.frombuffer(base, np.uint8).__array_interface__["data"][0]
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (start + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        base.madvise(mmap.MADV_DONTNEED, first, last - first)


def _cached_array(entry: _CacheEntry, gz: Path, order_key: str, shape: tuple[int, ...],
                  writable: bool) -> np.ndarray | None:
    """The array cached at ``entry`` for ``gz`` in ``order_key`` order; None if there is none.

    Raises _StaleCache (naming the reason) for an entry that exists but does not match. A gz whose stat
    changed but whose contents did not gets its sidecar refreshed if the entry is ``writable``.
    """
    try:
        record = json.loads(entry.sidecar.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as err:
        raise _StaleCache(f"its sidecar {entry.sidecar} cannot be read ({err})") from None
    try:
        if (record["format"], record["version"]) != (CACHE_FORMAT, CACHE_VERSION):
            raise _StaleCache(f"format {record['format']} version {record['version']} is not "
                              f"{CACHE_FORMAT} version {CACHE_VERSION}")
        if record["row_order"] != order_key:
            raise _StaleCache(f"its rows are in another order ({record['row_order']}, not {order_key})")
        refreshed = _check_source(gz, record["source"])
        array = _map_npy(entry.array, record["array"], shape)
    except (KeyError, TypeError) as err:
        raise _StaleCache(f"its sidecar {entry.sidecar} is malformed ({type(err).__name__}: {err})") from None
    except (OSError, DataError) as err:  # the .npy missing or unreadable, or the gz unreadable (read_idx says why)
        raise _StaleCache(f"it cannot be checked ({err})") from None
    if refreshed is not None and writable:
        try:
            atomic_write_json(entry.sidecar, {**record, "source": refreshed})
        except OSError:
            pass  # a read-only cache still serves; the gz is just hashed again next time
    return array


def _store(entry: _CacheEntry, array: np.ndarray, source: dict, order_key: str) -> np.ndarray:
    """Write ``array`` and its sidecar to ``entry`` atomically (the .npy first); return the mapped copy.

    Raises OSError (WriteError) if either cannot be written; the .npy is then removed again.
    """
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    with buffer.getbuffer() as payload:
        recorded = {"file": entry.array.name, "dtype": array.dtype.str, "shape": list(array.shape),
                    "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        atomic_write_bytes(entry.array, payload)
    buffer.close()
    record = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "source": source, "row_order": order_key,
              "array": recorded}
    try:
        atomic_write_json(entry.sidecar, record)
    except OSError:
        entry.array.unlink(missing_ok=True)
        raise
    return _map_npy(entry.array, recorded, array.shape, verify=False)


def _read_idx_cached(path: Path, row_order: np.ndarray | None, variant: str) -> np.ndarray:
    """``read_idx(path, row_order)`` through the decode cache: the same bytes, shape and dtype, read-only.

    ``variant`` names the order in the cache's file names (``file-order``, ``by-label``). A stale or corrupt
    cache is rebuilt (with a warning saying why); when no cache folder can be written, the decoded array is
    returned uncached (with a warning). The cache never makes a load fail: decoding errors are read_idx's own.
    """
    readable, writable = _cache_entries(path, variant)
    shape = _idx_shape(path) if readable else None
    if shape is None:  # caching is off, or the gz is unreadable: read_idx says why
        return read_idx(path, row_order)
    order_key = _row_order_key(row_order)
    for entry in readable:
        try:
            array = _cached_array(entry, path, order_key, shape, entry in writable)
        except _StaleCache as stale:
            log.warning("%s: not using this cache of %s: %s", entry.array, path.name, stale)
            continue
        if array is not None:
            return array
    source = _source_record(path)
    array = read_idx(path, row_order)
    if _stat_signature(path.stat()) != source["stat"]:
        log.warning("%s changed while it was decoded; its decoded images are not cached", path)
        return array
    for entry in writable:
        try:
            return _store(entry, array, source, order_key)
        except (OSError, _StaleCache) as err:  # _StaleCache: another process replaced it meanwhile
            log.warning("%s: cannot cache the decoded images of %s here (%s)", entry.array.parent, path.name, err)
    if not writable:
        log.warning("%s: no writable folder for the decoded images' cache (set $%s to one); they are decoded "
                    "again in every run", path, CACHE_ENV_VAR)
    return array


def _load_split(images_path: Path, labels_path: Path, group_by_label: bool,
                cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read and check one split: images ``(n, 784)`` uint8 and labels ``(n,)`` uint8 in 0..9.

    With ``group_by_label`` the samples are stably sorted by label (the file order within a label is kept).
    With ``cache`` the images go through the decode cache (see :func:`_read_idx_cached`).
    """
    labels = read_idx(labels_path)
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected labels of shape (n,), got {labels.shape}")
    if len(labels) and labels.max() >= N_CLASSES:
        raise DataError(f"{labels_path}: label {labels.max()} is outside 0..{N_CLASSES - 1}")
    order = np.argsort(labels, kind="stable") if group_by_label else None
    try:
        if cache:
            images = _read_idx_cached(images_path, order, "file-order" if order is None else "by-label")
        else:
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
    dataset: str, data_dir: str | os.PathLike | None = None, group_by_label: bool = False, cache: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load ``"mnist"`` or ``"fashion-mnist"`` as ``(x_train, y_train, x_test, y_test)``.

    Images are uint8 ``(n, 784)`` (rows of the 28x28 image, raw 0..255 pixels) and labels uint8 ``(n,)``;
    all four are read-only. With ``group_by_label`` each split is stably sorted by label, so that a subset of
    consecutive classes is a slice (a view, no copy). Missing files are downloaded into the data root (see
    :func:`fetch`).

    With ``cache`` (the default) the decoded images are kept as uncompressed, verified ``.npy`` files and
    memory-mapped on later loads: beside the gz files when their folder is writable, else in
    ``$XDG_CACHE_HOME/spacenet_np/data`` (``~/.cache/spacenet_np/data``); ``$SPACENET_CACHE`` names another
    folder, or ``off``. The arrays are the same bytes either way.
    """
    _check_dataset(dataset, _idx_datasets())
    root = resolve_data_root(data_dir)
    paths = {filename: fetch(root, dataset, filename) for filename in FILES}
    x_train, y_train = _load_split(paths[TRAIN_IMAGES], paths[TRAIN_LABELS], group_by_label, cache)
    x_test, y_test = _load_split(paths[TEST_IMAGES], paths[TEST_LABELS], group_by_label, cache)
    return x_train, y_train, x_test, y_test


# --- CIFAR-10 / CIFAR-100 -------------------------------------------------------------------------

try:  # NumPy >= 2 names the module numpy._core; both names occur in the pickles
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

# The only globals a CIFAR pickle may name: what NumPy needs to rebuild an array. Resolved here rather than
# imported by name at load time, so a pickle cannot even trigger an import.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}

# What a corrupt or truncated pickle can raise while loading.
_PICKLE_ERRORS = (
    pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
    OverflowError, UnicodeDecodeError, RecursionError,
)


class _RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only NumPy's array-rebuilding globals and refuses every other one.

    A pickle can call any global it names; CIFAR pickles need only :data:`_PICKLE_GLOBALS` (plain dicts,
    lists, bytes and ints need none), so anything else (``os.system``, ``builtins.eval``, ...) is refused
    before it is imported or called. Persistent ids are refused by the base class.
    """

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.path}: the pickle refers to the global {module}.{name}, which a CIFAR file never "
                "needs; refusing to load it"
            ) from None


def read_cifar_pickle(path: str | os.PathLike) -> dict:
    """Load the pickled dict of a CIFAR batch or meta file with the restricted unpickler.

    Keys stay bytes (``pickle.load(f, encoding="bytes")``). Raises DataError, naming the file, for a forbidden
    global, a truncated or corrupt pickle, trailing bytes after it, or a top-level object that is not a dict.
    """
    path = Path(path)
    with _open_data_file(path) as f:
        try:
            obj = _RestrictedUnpickler(f, path).load()
        except DataError:
            raise
        except _PICKLE_ERRORS as err:
            raise DataError(
                f"{path}: not a valid pickle; truncated or corrupt ({type(err).__name__}: {err})"
            ) from err
        if f.read(1):
            raise DataError(f"{path}: unexpected bytes after the end of the pickle")
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _cifar_labels(path: Path, raw, label_key: bytes, n_classes: int) -> np.ndarray:
    """The labels ``raw`` (a list or 1-d array of ints) as a new int64 array; DataError if out of range."""
    if isinstance(raw, list):
        if not all(type(value) is int for value in raw):
            raise DataError(f"{path}: {label_key!r} must hold only ints")
        try:
            labels = np.array(raw, dtype=np.int64)
        except OverflowError as err:
            raise DataError(f"{path}: {label_key!r} holds an int outside 0..{n_classes - 1}") from err
    elif type(raw) is np.ndarray and raw.ndim == 1 and raw.dtype.kind in "iu":
        if raw.size and raw.max() >= n_classes:  # before the cast, which could wrap huge unsigned values
            raise DataError(f"{path}: label {raw.max()} in {label_key!r} is outside 0..{n_classes - 1}")
        labels = raw.astype(np.int64)
    else:
        raise DataError(
            f"{path}: {label_key!r} must be a list or 1-d array of ints, got {type(raw).__name__}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        bad = labels[(labels < 0) | (labels >= n_classes)][0]
        raise DataError(f"{path}: label {bad} in {label_key!r} is outside 0..{n_classes - 1}")
    return labels


def read_cifar_batch(
    path: str | os.PathLike,
    label_key: bytes = b"labels",
    n_classes: int = 10,
    expected_count: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR batch file: images uint8 ``(n, 3072)`` (1024 red, 1024 green, 1024 blue values, each
    plane row-major) and labels int64 ``(n,)`` from ``label_key`` (``b"labels"`` for CIFAR-10,
    ``b"fine_labels"`` for CIFAR-100).

    Raises DataError, naming the file, unless ``b"data"`` is a uint8 array of shape ``(n, 3072)``, the labels
    are ``n`` ints in ``0..n_classes - 1``, and ``n == expected_count`` (when given).
    """
    path = Path(path)
    batch = read_cifar_pickle(path)
    for key in (b"data", label_key):
        if key not in batch:
            found = ", ".join(repr(k) for k in batch)
            raise DataError(f"{path}: the key {key!r} is missing (keys: {found or 'none'})")
    images = batch.pop(b"data")
    if type(images) is not np.ndarray or images.dtype != np.uint8 or images.ndim != 2 \
            or images.shape[1] != CIFAR_ROW_BYTES:
        described = f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) \
            else type(images).__name__
        raise DataError(
            f"{path}: b'data' must be a uint8 array of shape (n, {CIFAR_ROW_BYTES}), got {described}"
        )
    labels = _cifar_labels(path, batch[label_key], label_key, n_classes)
    if len(labels) != len(images):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels in {label_key!r}")
    if expected_count is not None and len(images) != expected_count:
        raise DataError(f"{path}: {len(images)} images; the canonical file has {expected_count}")
    return np.ascontiguousarray(images), labels


def _cifar_layout(dataset: str) -> CifarLayout:
    """The layout of a CIFAR dataset; ValueError listing the CIFAR datasets otherwise."""
    _check_dataset(dataset, CIFAR)
    return CIFAR[dataset]


def _check_member(archive: Path, member: tarfile.TarInfo, folder: str) -> None:
    """Raise DataError, naming the archive and member, unless ``member`` is a plain file or folder at a
    relative path inside ``folder/`` without ``..`` components."""
    name = member.name
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or name.startswith(("/", "\\")):
        raise DataError(f"{archive}: refusing member {name!r} with an absolute path")
    if ".." in posix.parts or ".." in windows.parts:
        raise DataError(f"{archive}: refusing member {name!r} with a '..' component")
    if not (member.isfile() or member.isdir()):
        kind = "link" if member.issym() or member.islnk() else "device or special file"
        raise DataError(f"{archive}: refusing member {name!r}: a {kind}, not a plain file or folder")
    parts = [part for part in posix.parts if part != "."]
    if not parts or parts[0] != folder:
        raise DataError(f"{archive}: refusing member {name!r} outside the folder {folder}/")


def extract_archive(archive: str | os.PathLike, root: str | os.PathLike, folder: str,
                    required: Iterable[str] = ()) -> Path:
    """Safely extract the ``.tar.gz`` ``archive`` whose members all lie in ``folder/`` into ``root/folder``.

    Every member is checked before anything is written: absolute paths, ``..`` components, links, devices
    and members outside ``folder/`` are refused with DataError (and tarfile's ``"data"`` filter is applied too
    where available). The archive is extracted into a temporary folder inside ``root``, checked to hold the
    ``required`` files, then renamed into place atomically; nothing is left behind on failure.
    """
    import gzip  # here, not at the top: only archives need these (CIFAR's first run)
    import tarfile
    archive, root = Path(archive), Path(root)
    target = root / folder
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(archive, member, folder)
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder}.", suffix=".extracting"))
            try:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, members=members, filter="data")
                else:  # pragma: no cover - Python without extraction filters; members were checked above
                    tar.extractall(tmp, members=members)
                extracted = tmp / folder
                missing = [name for name in required if not (extracted / name).is_file()]
                if missing:
                    lacking = ", ".join(f"{folder}/{name}" for name in missing)
                    raise DataError(f"{archive}: the archive lacks {lacking}")
                try:
                    os.rename(extracted, target)
                except OSError:
                    if not target.is_dir():  # not a concurrent extraction that won the race
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(f"{archive}: not a valid .tar.gz archive ({type(err).__name__}: {err})") from err
    return target


def cifar_folder(dataset: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The extracted folder of ``"cifar-10"`` or ``"cifar-100"`` in the data root.

    An existing folder is used as is. Otherwise the canonical archive in the data root is sha256-checked (or
    downloaded and checked, see :func:`fetch`) and extracted with :func:`extract_archive`. With neither on
    disk and no network, raises FileNotFoundError saying which dataset is missing and where to put it.
    """
    layout = _cifar_layout(dataset)
    root = resolve_data_root(data_dir)
    folder = root / layout.folder
    if _existing_dir(folder):
        return folder
    archive = root / layout.archive
    if _existing_file(archive):
        expected, actual = SHA256[dataset][layout.archive], _sha256_of_file(archive)
        if actual != expected:
            raise DataError(
                f"{archive}: sha256 mismatch: expected {expected}, got {actual}; not extracting it. "
                f"Replace it with the canonical archive, or put the extracted folder {layout.folder}/ "
                f"in {root}"
            )
    else:
        fetch(root, dataset, layout.archive)
    log.info("extracting %s into %s", archive, folder)
    required = (*layout.train_files, *layout.test_files, layout.meta_file)
    return extract_archive(archive, root, layout.folder, required)


def _gather_rows_in_place(rows: np.ndarray, order: np.ndarray) -> None:
    """``rows[:] = rows[order]`` for a permutation ``order``, following its cycles with one spare row instead
    of a second copy of the array."""
    order_list = order.tolist()
    done = bytearray(len(order_list))
    spare = np.empty(rows.shape[1:], dtype=rows.dtype)
    for start, source in enumerate(order_list):
        if done[start] or source == start:
            continue
        spare[...] = rows[start]
        i = start
        while True:
            done[i] = 1
            j = order_list[i]
            if j == start:
                rows[i] = spare
                break
            rows[i] = rows[j]
            i = j


def _load_cifar_split(dataset: str, folder: Path, files: tuple[str, ...], group_by_label: bool,
                      classes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Read the batch ``files`` of a split: read-only images ``(n, 3072)`` uint8 and labels ``(n,)`` int64."""
    layout = CIFAR[dataset]
    paths = [folder / name for name in files]
    for path in paths:
        if not _existing_file(path):
            raise FileNotFoundError(
                f"{path}: missing from the {dataset} folder {folder}/; put the canonical file there "
                f"or remove the folder so that {layout.archive} is extracted again"
            )
    counts = [CIFAR_COUNTS[dataset][name] for name in files]
    if len(paths) == 1:
        images, labels = read_cifar_batch(paths[0], layout.label_key, layout.n_classes, counts[0])
    else:  # fill one array batch by batch: never more than one batch beyond the result
        images = np.empty((sum(counts), CIFAR_ROW_BYTES), dtype=np.uint8)
        labels = np.empty(sum(counts), dtype=np.int64)
        start = 0
        for path, count in zip(paths, counts):
            batch_images, batch_labels = read_cifar_batch(path, layout.label_key, layout.n_classes, count)
            images[start:start + count], labels[start:start + count] = batch_images, batch_labels
            del batch_images, batch_labels
            start += count
    if classes is not None:
        keep = np.flatnonzero(np.isin(labels, classes))
        if group_by_label:
            keep = keep[np.argsort(labels[keep], kind="stable")]
        images, labels = images[keep], labels[keep]
    elif group_by_label:
        order = np.argsort(labels, kind="stable")
        _gather_rows_in_place(images, order)
        labels = labels[order]
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_cifar(
    dataset: str,
    data_dir: str | os.PathLike | None = None,
    group_by_label: bool = False,
    classes: Iterable[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load ``"cifar-10"`` or ``"cifar-100"`` (fine labels) as ``(x_train, y_train, x_test, y_test)``.

    Images are uint8 ``(n, 3072)`` in the canonical channel-major layout (1024 red, 1024 green, 1024 blue
    values, each a row-major 32x32 plane; reshape to ``(n, 3, 32, 32)``), labels int64 ``(n,)`` with the
    dataset's own labels; all four are read-only. ``classes`` keeps only the samples of those labels. With
    ``group_by_label`` each split is stably sorted by label, so that a subset of consecutive classes is a
    slice (a view). The data comes from :func:`cifar_folder` (extracting or downloading the archive if
    needed).
    """
    layout = _cifar_layout(dataset)
    keep = None
    if classes is not None:
        keep = np.unique(np.fromiter(classes, dtype=np.int64))
        if keep.size and (keep[0] < 0 or keep[-1] >= layout.n_classes):
            raise ValueError(f"classes for {dataset} must lie in 0..{layout.n_classes - 1}")
    folder = cifar_folder(dataset, data_dir)
    x_train, y_train = _load_cifar_split(dataset, folder, layout.train_files, group_by_label, keep)
    x_test, y_test = _load_cifar_split(dataset, folder, layout.test_files, group_by_label, keep)
    return x_train, y_train, x_test, y_test


def load_cifar_label_names(dataset: str, data_dir: str | os.PathLike | None = None) -> tuple[str, ...]:
    """The class names of ``"cifar-10"`` (``b"label_names"`` of ``batches.meta``) or ``"cifar-100"``
    (``b"fine_label_names"`` of ``meta``), indexed by label."""
    layout = _cifar_layout(dataset)
    path = cifar_folder(dataset, data_dir) / layout.meta_file
    if not _existing_file(path):
        raise FileNotFoundError(f"{path}: missing from the {dataset} folder")
    names = read_cifar_pickle(path).get(layout.label_names_key)
    if not isinstance(names, list) or len(names) != layout.n_classes \
            or not all(isinstance(name, bytes) for name in names):
        raise DataError(
            f"{path}: {layout.label_names_key!r} must be a list of {layout.n_classes} byte strings"
        )
    try:
        return tuple(name.decode("utf-8") for name in names)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: a class name is not valid UTF-8") from err
