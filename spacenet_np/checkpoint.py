"""Checkpoints: a trained model, or a learner in the middle of a task stream, in one verified file.

The file is an uncompressed ``.npz`` (a zip of ``.npy`` members, readable with ``np.load(allow_pickle=False)``):

- ``meta``: a 0-d unicode array holding a JSON object: ``format`` (``"spacenet_np.checkpoint"``),
  ``format_version`` (``FORMAT_VERSION``), ``kind`` (``"model"`` or ``"learner"``), ``model`` (``architecture``,
  the network's ``spec()``, and per neuron layer ``width`` and ``dense``), ``input`` (``mean``, ``std``: numbers,
  or lists of per-feature values), ``learner`` (``method``, ``config``,
  ``tasks_learned``, ``rng_state``, ``extra_options``, ``extra_state_keys``; null for a model), ``progress``
  (the caller's JSON object; null for a model), ``library_version`` and ``sha256``;
- ``neurons.{i}.slot_ids`` int64, ``neurons.{i}.reserved_by`` int16, ``neurons.{i}.bias`` float32 per neuron layer;
- ``layers.{l}.indptr``, ``layers.{l}.indices``, ``layers.{l}.data`` (the CSR of ``W``, rows and columns are
  slots; a convolution's ``data`` holds 9 weights per kernel), ``layers.{l}.owner`` int16 and
  ``layers.{l}.importance`` float32 aligned with the connections;
- ``known_classes`` bool; ``extra.{key}`` for each array of a method's ``extra_state()``.

The metadata's ``sha256`` covers the contents: the metadata (canonical JSON without the ``sha256`` field) and every
array (name, dtype, shape, bytes). The zip comment, the last bytes of the file, is
``spacenet_np.checkpoint format_version=N sha256=HEX`` with HEX the sha256 of every byte before it, so the zip
structure is covered too: a truncated file or a flipped byte anywhere is refused with ``CheckpointError`` (naming
the file) instead of loading a different model.
Files are written atomically (``fileio.atomic_write_encoded``: temporary file, fsync, rename) with fixed zip
timestamps, so the same state always gives the same bytes. Nothing is pickled.

Use::

    save_learner("run/ckpt.npz", learner, progress={"accuracy_matrix": matrix, "seed": 0})
    learner = restore_learner(load("run/ckpt.npz"))     # continue with the next task: bit-identical results
    save_model("model.npz", model, input_mean, input_std)
    labels = predict_from_checkpoint("model.npz", images)  # = predict(ckpt.model, images, ckpt.input_mean, ...)

Save a learner between tasks (after ``learn`` returns), never from inside a task's callbacks: during a task
SpaceNet holds the old tasks' output connections outside the network.
"""
import dataclasses
import hashlib
import io
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .fileio import atomic_write_encoded, signals_deferred
from .network import SparseNetwork, build_network
from .spacenet import SpaceNet, SpaceNetConfig, StaticSparseNN
from .strategy import input_statistics, predict

FORMAT_NAME = "spacenet_np.checkpoint"
FORMAT_VERSION = 2  # 2: architecture spec (MLP or CNN), per-feature input statistics

DEFAULT_METHODS = {"spacenet": SpaceNet, "static": StaticSparseNN}

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: the same state gives the same bytes
_META = "meta"
_EXTRA = "extra."
# The zip comment ends the file: "spacenet_np.checkpoint format_version=N sha256=HEX", HEX over every byte before it.
_TRAILER = re.compile(re.escape(FORMAT_NAME).encode() + rb" format_version=(\d{1,9}) sha256=([0-9a-f]{64})\Z")
_TRAILER_MAX = 128


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: truncated, corrupted, not a checkpoint, or another format version."""


@dataclass
class Checkpoint:
    """The contents of a checkpoint file.

    ``model`` is ready for ``predict(model, images, input_mean, input_std)``. For a learner checkpoint, ``method``,
    ``config`` (``SpaceNetConfig.to_dict()`` form), ``progress``, ``tasks_learned``, ``rng_state``,
    ``extra_options`` and ``extra_state`` rebuild it with ``restore_learner``; for a model checkpoint they are None
    (``extra_options``/``extra_state`` empty).
    """
    path: Path
    model: SparseNetwork
    input_mean: object  # float, or (n_features,) float64 array
    input_std: object
    method: str = None
    config: dict = None
    progress: dict = None
    tasks_learned: int = None
    rng_state: dict = None
    extra_options: dict = field(default_factory=dict)
    extra_state: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def is_learner(self):
        return self.method is not None


# ----- saving -----
def save_model(path, model, input_mean, input_std):
    """Write ``model`` and its input standardization to ``path`` atomically. Returns the path."""
    meta, arrays = _model_contents(model, input_mean, input_std)
    meta.update(kind="model", learner=None, progress=None)
    return _write(path, meta, arrays)


def save_learner(path, learner, progress=None):
    """Write ``learner`` (model, config, method, rng state, method state) and ``progress`` atomically.

    Call it between tasks. ``progress`` is a JSON-able dict kept as is (numpy scalars and arrays become numbers
    and lists), e.g. the accuracy matrix so far, the seed and the wall time. Returns the path.
    """
    meta, arrays = _model_contents(learner.model, learner.input_mean, learner.input_std)
    extra_options = learner.extra_options()
    extra_state = learner.extra_state()
    if not isinstance(extra_options, dict) or not all(isinstance(k, str) for k in extra_options):
        raise TypeError(f"{type(learner).__name__}.extra_options() must return a dict with str keys")
    if not isinstance(extra_state, dict) or not all(isinstance(k, str) and k for k in extra_state):
        raise TypeError(f"{type(learner).__name__}.extra_state() must return a dict with non-empty str keys")
    for key, value in extra_state.items():
        value = np.asarray(value)
        if value.dtype.hasobject:
            raise TypeError(f"{type(learner).__name__}.extra_state()[{key!r}] has dtype object; checkpoints hold "
                            f"numeric arrays only")
        arrays[_EXTRA + key] = value
    config = learner.config
    config = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
    if progress is not None and not isinstance(progress, dict):
        raise TypeError(f"progress must be a dict, got {type(progress).__name__}")
    meta.update(kind="learner", progress=_to_json_value(progress or {}, "progress"), learner={
        "method": str(learner.name),
        "class": f"{type(learner).__module__}.{type(learner).__qualname__}",
        "config": _to_json_value(config, "config"),
        "tasks_learned": int(learner.tasks_learned),
        "rng_state": _to_json_value(learner.rng.bit_generator.state, "rng state"),
        "extra_options": _to_json_value(extra_options, "extra_options()"),
        "extra_state_keys": sorted(extra_state),
    })
    return _write(path, meta, arrays)


def _model_contents(model, input_mean, input_std):
    input_mean, input_std = input_statistics(input_mean, input_std, model.n_features)
    arrays = {}
    for i, neurons in enumerate(model.neurons):
        arrays[f"neurons.{i}.slot_ids"] = neurons.slot_ids
        arrays[f"neurons.{i}.reserved_by"] = neurons.reserved_by
        arrays[f"neurons.{i}.bias"] = neurons.bias
    for l, layer in enumerate(model.layers):
        arrays[f"layers.{l}.indptr"] = layer.W.indptr
        arrays[f"layers.{l}.indices"] = layer.W.indices
        arrays[f"layers.{l}.data"] = layer.weights.reshape(-1)
        arrays[f"layers.{l}.owner"] = layer.owner
        arrays[f"layers.{l}.importance"] = layer.importance
    arrays["known_classes"] = model.known_classes
    from . import __version__
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "model": {"architecture": model.spec(),
                  "neurons": [{"width": int(n.width), "dense": bool(n.dense)} for n in model.neurons]},
        "input": {"mean": _to_json_value(input_mean, "input_mean"), "std": _to_json_value(input_std, "input_std")},
    }
    return meta, arrays


def _json_default(value):
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray) and not value.dtype.hasobject:
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _to_json_value(value, what):
    """``value`` as plain JSON types (what ``json.loads`` gives back), or TypeError naming ``what``."""
    try:
        return json.loads(json.dumps(value, default=_json_default))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be JSON-serializable: {err}") from None


def _canonical_json(meta):
    return json.dumps(meta, sort_keys=True, separators=(",", ":"))


def _digest(meta, arrays):
    """sha256 over the canonical JSON of ``meta`` (without ``sha256``) and every array's name, dtype, shape, bytes."""
    h = hashlib.sha256()
    body = _canonical_json({k: v for k, v in meta.items() if k != "sha256"}).encode()
    h.update(len(body).to_bytes(8, "little"))
    h.update(body)
    for name in sorted(arrays):
        a = np.asarray(arrays[name], order="C")
        header = json.dumps([name, a.dtype.str, list(a.shape)]).encode()
        h.update(len(header).to_bytes(8, "little"))
        h.update(header)
        h.update(a.nbytes.to_bytes(8, "little"))
        h.update(a.tobytes())
    return h.hexdigest()


def _encode(meta, arrays, sha256=None):
    """The file bytes: ``meta`` (sha256 added, computed unless given) and ``arrays`` as a stored zip of .npy."""
    meta = _to_json_value(meta, "checkpoint metadata")
    meta["sha256"] = _digest(meta, arrays) if sha256 is None else sha256
    members = [(_META, np.array(json.dumps(meta, sort_keys=True)))] + [(n, arrays[n]) for n in sorted(arrays)]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.comment = _trailer_prefix(meta["format_version"]) + b"0" * 64  # placeholder for the file sha256
        for name, array in members:
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(array, order="C"), allow_pickle=False)
    data = buffer.getvalue()
    return data[:-64] + hashlib.sha256(data[:-64]).hexdigest().encode()


def _trailer_prefix(version):
    return f"{FORMAT_NAME} format_version={version} sha256=".encode()


def _write(path, meta, arrays):
    """Encode fully in memory first, so a serialization error never touches ``path``; then write atomically
    (signals wait for both)."""
    path = Path(path)
    atomic_write_encoded(path, lambda: _encode(meta, arrays))
    return path


# ----- loading -----
def load(path):
    """Read and verify a checkpoint. Returns a ``Checkpoint``.

    Raises ``CheckpointError`` (naming the file) for a path that is missing, a folder or unreadable, and for a
    file that is empty, truncated, corrupted, not a checkpoint, or of another format version.
    """
    path = Path(path)
    return _load_bytes(path, _read_file(path))


def _read_file(path):
    """The bytes of the checkpoint file ``path``; CheckpointError naming it if there is no readable file."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: a folder, not a checkpoint file") from None
    except OSError as err:  # a link loop, no permission, ...
        raise CheckpointError(f"{path}: cannot read the checkpoint ({err.strerror or err})") from None


def _load_bytes(path, data):
    """``load`` of the file contents ``data``; ``path`` names the file in errors."""
    with signals_deferred():  # as in atomic_write_encoded: zipfile would turn an interruption into a damaged file
        container = _parse_container(path, data)
    return _checkpoint_from(path, *container)


def predict_from_checkpoint(path, images, batch_size=1000):
    """Predicted class per sample of ``images`` (n, n_features) uint8 or standardized float, with the model saved in
    ``path`` and its input standardization. No training code runs. Returns (n,) int64."""
    ckpt = load(path)
    return predict(ckpt.model, images, ckpt.input_mean, ckpt.input_std, batch_size)


def _read_container(path):
    """The verified (meta, arrays) of the file at ``path``: format name, version and sha256 checked."""
    path = Path(path)
    return _parse_container(path, _read_file(path))


def _parse_container(path, data):
    if not data:
        raise CheckpointError(f"{path}: the file is empty, not a checkpoint")
    if not data.startswith(b"PK\x03\x04"):
        raise CheckpointError(f"{path}: not a {FORMAT_NAME} file (not an .npz archive)")
    trailer = _TRAILER.search(data[-_TRAILER_MAX:])
    if trailer is None:
        raise CheckpointError(f"{path}: truncated or corrupted checkpoint, or not a {FORMAT_NAME} file (the "
                              f"file checksum that ends every checkpoint is missing)")
    _check_version(path, int(trailer.group(1)))
    recorded, actual = trailer.group(2).decode(), hashlib.sha256(data[:-64]).hexdigest()
    if recorded != actual:
        raise CheckpointError(f"{path}: corrupted or truncated checkpoint: the file's sha256 is {actual}, its "
                              f"trailer records {recorded}")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            names = list(npz.files)
            if _META not in names:
                raise CheckpointError(f"{path}: not a {FORMAT_NAME} file (no '{_META}' entry; entries: "
                                      f"{sorted(names)[:8]})")
            meta_array = npz[_META]
            arrays = {name: npz[name] for name in names if name != _META}
        if meta_array.ndim != 0 or meta_array.dtype.kind != "U":
            raise CheckpointError(f"{path}: not a {FORMAT_NAME} file (its '{_META}' entry is not a JSON string)")
        meta = json.loads(str(meta_array))
    except CheckpointError:
        raise
    except Exception as err:  # zipfile, numpy header, CRC, JSON: all mean a damaged file
        raise CheckpointError(f"{path}: truncated or corrupted checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: not a {FORMAT_NAME} file (format {found!r})")
    _check_version(path, meta.get("format_version"))
    recorded = meta.get("sha256")
    actual = _digest(meta, arrays)
    if recorded != actual:
        raise CheckpointError(f"{path}: corrupted checkpoint: sha256 of its contents is {actual}, the file records "
                              f"{recorded}")
    return meta, arrays


def _check_version(path, version):
    if version != FORMAT_VERSION:
        hint = ("written by a newer spacenet_np; upgrade to read it" if isinstance(version, int)
                and version > FORMAT_VERSION else "no converter from that version exists")
        raise CheckpointError(f"{path}: checkpoint format version {version!r}, but this spacenet_np reads format "
                              f"version {FORMAT_VERSION} only ({hint})")


def _checkpoint_from(path, meta, arrays):
    try:
        model = _model_from(meta["model"], arrays)
        expected = set(_model_contents(model, 0.0, 1.0)[1])
        learner = meta["learner"]
        if learner is not None:
            expected |= {_EXTRA + k for k in learner["extra_state_keys"]}
        if set(arrays) != expected:
            raise ValueError(f"unexpected entries {sorted(set(arrays) - expected)[:8]}, missing entries "
                             f"{sorted(expected - set(arrays))[:8]}")
        input_mean, input_std = input_statistics(meta["input"]["mean"], meta["input"]["std"], model.n_features)
        ckpt = Checkpoint(path=path, model=model, input_mean=input_mean, input_std=input_std,
                          format_version=meta["format_version"])
        if learner is not None:
            ckpt.method = str(learner["method"])
            ckpt.config = dict(learner["config"])
            ckpt.progress = meta["progress"]
            ckpt.tasks_learned = int(learner["tasks_learned"])
            ckpt.rng_state = dict(learner["rng_state"])
            ckpt.extra_options = dict(learner["extra_options"])
            ckpt.extra_state = {k: arrays[_EXTRA + k] for k in learner["extra_state_keys"]}
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise CheckpointError(f"{path}: inconsistent checkpoint contents ({type(err).__name__}: {err})") from None
    return ckpt


def _array(arrays, name, dtype, length=None):
    """``arrays[name]`` as a writable 1-D array of ``dtype``; ints of any width are accepted for int64."""
    a = arrays[name]
    dtype = np.dtype(dtype)
    same_kind = a.dtype.kind == dtype.kind or (dtype.kind == "i" and a.dtype.kind in "iu")
    if a.ndim != 1 or not same_kind or (dtype.kind != "i" and a.dtype.itemsize != dtype.itemsize):
        raise ValueError(f"'{name}' must be a 1-D {dtype} array, got {a.dtype} with shape {a.shape}")
    if length is not None and a.shape[0] != length:
        raise ValueError(f"'{name}' has {a.shape[0]} entries, expected {length}")
    converted = a.astype(dtype)
    if dtype == np.int16 and not np.array_equal(converted, a):
        raise ValueError(f"'{name}' does not fit in {dtype}")
    return np.ascontiguousarray(converted)


def _model_from(spec, arrays):
    """A network holding the saved neuron indices and connections, in the saved connection order."""
    model = build_network(spec["architecture"])
    if [(n["width"], bool(n["dense"])) for n in spec["neurons"]] != [(n.width, n.dense) for n in model.neurons]:
        raise ValueError(f"neuron layers {spec['neurons']} do not match the architecture {spec['architecture']}")
    for i, neurons in enumerate(model.neurons):
        slot_ids = _array(arrays, f"neurons.{i}.slot_ids", np.int64)
        n = slot_ids.shape[0]
        if neurons.dense:
            if not np.array_equal(slot_ids, np.arange(neurons.width)):
                raise ValueError(f"dense neuron layer {i} must have slot i = neuron i for every neuron")
        elif n and (slot_ids.min() < 0 or slot_ids.max() >= neurons.width or np.unique(slot_ids).size != n):
            raise ValueError(f"neuron layer {i}: slot ids must be distinct neuron ids in [0, {neurons.width})")
        neurons.slot_ids = slot_ids
        neurons.reserved_by = _array(arrays, f"neurons.{i}.reserved_by", np.int16, n)
        neurons.bias = _array(arrays, f"neurons.{i}.bias", np.float32, n)
        if not neurons.dense:
            neurons._slot_of = {neuron: slot for slot, neuron in enumerate(slot_ids.tolist())}
    for l, layer in enumerate(model.layers):
        n_out, n_in = layer.out_index.n_slots, layer.in_index.n_slots
        indptr = _array(arrays, f"layers.{l}.indptr", np.int64, n_out + 1)
        indices = _array(arrays, f"layers.{l}.indices", np.int64)
        nnz = indices.shape[0]
        data = _array(arrays, f"layers.{l}.data", np.float32, nnz * layer.taps).reshape(layer.weight_shape(nnz))
        owner = _array(arrays, f"layers.{l}.owner", np.int16, nnz)
        importance = _array(arrays, f"layers.{l}.importance", np.float32, nnz)
        if indptr[0] != 0 or indptr[-1] != nnz or np.any(np.diff(indptr) < 0):
            raise ValueError(f"layer {l}: indptr must rise from 0 to nnz={nnz}")
        if nnz and (indices.min() < 0 or indices.max() >= n_in):
            raise ValueError(f"layer {l}: column slots must be in [0, {n_in})")
        rows = np.repeat(np.arange(n_out, dtype=np.int64), np.diff(indptr))
        if np.any(np.diff(rows * n_in + indices) <= 0):
            raise ValueError(f"layer {l}: connections must be sorted by (row, column) without duplicates")
        layer._set_connections(rows, indices, data, owner, importance)  # sorted input: the order is kept
        if not (np.array_equal(layer.indices, indices) and np.array_equal(layer.weights, data)):
            raise ValueError(f"layer {l}: the connection order changed while rebuilding")  # guard, never expected
    model.known_classes = _array(arrays, "known_classes", np.bool_, model.n_classes)
    return model


# ----- rebuilding a learner -----
def restore_learner(checkpoint, methods_registry=None):
    """The learner saved in ``checkpoint`` (a ``Checkpoint`` or a path), ready to learn its next task.

    ``methods_registry`` maps method names to ``Learner`` classes (default: ``DEFAULT_METHODS``, spacenet and
    static). The class is built as ``cls(model, config, seed=0, input_mean=..., input_std=..., **extra_options)``
    with ``config = cls.config_class(**config)`` (``SpaceNetConfig`` unless the class names another), then
    ``load_extra_state(extra_state)`` runs, and the rng and ``tasks_learned`` are set to the saved ones. The learner
    trains ``checkpoint.model`` in place: call ``load`` again for a second, independent learner. Continuing the
    stream gives bit-identical results to an uninterrupted run.
    """
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = load(checkpoint)
    path = checkpoint.path
    if checkpoint.method is None:
        raise CheckpointError(f"{path}: holds a model only (written by save_model), not a learner to resume")
    registry = DEFAULT_METHODS if methods_registry is None else methods_registry
    if checkpoint.method not in registry:
        raise CheckpointError(f"{path}: method {checkpoint.method!r} is not one of the known methods "
                              f"{sorted(registry)}")
    cls = registry[checkpoint.method]
    config_class = getattr(cls, "config_class", SpaceNetConfig)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in checkpoint.config.items()}
    known = {f.name for f in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) else None
    if known is not None and set(values) - known:
        raise CheckpointError(f"{path}: config fields {sorted(set(values) - known)} are unknown to "
                              f"{config_class.__name__}")
    try:
        config = config_class(**values)
        learner = cls(checkpoint.model, config, seed=0, input_mean=checkpoint.input_mean,
                      input_std=checkpoint.input_std, **checkpoint.extra_options)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot rebuild the {checkpoint.method!r} learner: {err}") from None
    try:
        learner.load_extra_state(dict(checkpoint.extra_state))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: the {checkpoint.method!r} method state does not fit: {err}") from None
    learner.tasks_learned = checkpoint.tasks_learned
    _set_rng_state(learner, checkpoint.rng_state, path)
    return learner


def _set_rng_state(learner, state, path):
    """Put the saved bit generator state into ``learner.rng`` (in place when the bit generator kind matches)."""
    name = state.get("bit_generator") if isinstance(state, dict) else None
    try:
        if name == type(learner.rng.bit_generator).__name__:
            learner.rng.bit_generator.state = state
            return
        kind = getattr(np.random, str(name), None)
        if not (isinstance(kind, type) and issubclass(kind, np.random.BitGenerator)):
            raise ValueError(f"unknown bit generator {name!r}")
        bit_generator = kind()
        bit_generator.state = state
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: invalid rng state: {err}") from None
    learner.rng = np.random.Generator(bit_generator)
