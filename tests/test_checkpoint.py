"""Checkpoints: exact round trips, bit-identical resume, refusal of damaged files, atomic writes."""
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import pair_tasks, tiny_config

from spacenet_np import checkpoint, fileio
from spacenet_np.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load,
    predict_from_checkpoint,
    restore_learner,
    save_learner,
    save_model,
)
from spacenet_np.network import SparseMLP
from spacenet_np.spacenet import SpaceNet, StaticSparseNN
from spacenet_np.strategy import Learner, predict

N_FEATURES, HIDDEN, N_CLASSES = 16, [40], 8
CLASSES = [np.array([2 * t, 2 * t + 1]) for t in range(4)]
MEAN, STD = 0.4512, 0.2731
METHODS = [SpaceNet, StaticSparseNN]


def make_tasks():
    """Four tasks of two classes each: a list of (images uint8, labels)."""
    return [(images, labels) for images, labels, _ in pair_tasks(N_CLASSES, N_FEATURES, 24, seed=5, spread=40.0)]


def new_learner(cls=SpaceNet, seed=11, config=None, **options):
    """A learner on a 16-40-8 network whose config leaves room for four tasks in the 16 inputs."""
    config = config or tiny_config(connections_per_task=(60, 16))
    return cls(SparseMLP(N_FEATURES, HIDDEN, N_CLASSES), config, seed=seed, input_mean=MEAN,
               input_std=STD, **options)


def learn_tasks(learner, tasks, first, stop):
    for t in range(first, stop):
        learner.learn(*tasks[t], CLASSES[t])
    return learner


@pytest.fixture(scope="module")
def tasks():
    return make_tasks()


@pytest.fixture(scope="module")
def all_images(tasks):
    return np.concatenate([images for images, _ in tasks])


def model_arrays(model):
    """Every array of a model, derived ones included, by name.

    Derived views that the network caches between structure changes (the active rows of the forward pass and the
    CSC view built from them) are brought up to date first, as the next forward pass would.
    """
    if hasattr(model, "update_active_rows"):
        model.update_active_rows()
    out = {"sizes": np.asarray(model.sizes), "known_classes": model.known_classes}
    for i, n in enumerate(model.neurons):
        out[f"n{i}.slot_ids"], out[f"n{i}.reserved_by"], out[f"n{i}.bias"] = n.slot_ids, n.reserved_by, n.bias
        out[f"n{i}.width_dense"] = np.array([n.width, n.dense])
        out[f"n{i}.slot_of"] = np.array(sorted((n._slot_of or {}).items()), dtype=np.int64).reshape(-1, 2)
    for l, layer in enumerate(model.layers):
        for name in ("indptr", "indices", "data"):
            out[f"l{l}.W.{name}"] = getattr(layer.W, name)
        out[f"l{l}.W.shape"] = np.asarray(layer.W.shape)
        for name in ("owner", "importance", "rows", "col_ptr", "col_order", "active_rows"):
            if hasattr(layer, name):
                out[f"l{l}.{name}"] = getattr(layer, name)
    return out


def assert_models_identical(a, b):
    arrays_a, arrays_b = model_arrays(a), model_arrays(b)
    assert arrays_a.keys() == arrays_b.keys()
    for name in arrays_a:
        x, y = arrays_a[name], arrays_b[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), f"{name} differs"  # bit-identical, element order included
    for n in b.neurons:
        assert n.bias.flags.writeable and n.reserved_by.flags.writeable


def assert_learners_identical(a, b):
    assert type(a) is type(b)
    assert_models_identical(a.model, b.model)
    assert a.config == b.config
    assert a.tasks_learned == b.tasks_learned
    assert a.rng.bit_generator.state == b.rng.bit_generator.state
    assert (a.input_mean, a.input_std) == (b.input_mean, b.input_std)


# ----- round trips -----
def test_model_round_trip(tmp_path, tasks, all_images):
    learner = learn_tasks(new_learner(), tasks, 0, 2)
    path = save_model(tmp_path / "model.npz", learner.model, MEAN, STD)
    ckpt = load(path)
    assert ckpt.path == path and ckpt.format_version == FORMAT_VERSION
    assert (ckpt.method, ckpt.config, ckpt.progress, ckpt.tasks_learned, ckpt.rng_state) == (None,) * 5
    assert not ckpt.is_learner and ckpt.extra_state == {} and ckpt.extra_options == {}
    assert (ckpt.input_mean, ckpt.input_std) == (MEAN, STD)
    assert_models_identical(learner.model, ckpt.model)
    expected = learner.predict(all_images)
    np.testing.assert_array_equal(predict(ckpt.model, all_images, ckpt.input_mean, ckpt.input_std), expected)
    np.testing.assert_array_equal(predict_from_checkpoint(path, all_images), expected)
    standardized = (all_images / 255.0 - MEAN) / STD
    np.testing.assert_array_equal(predict_from_checkpoint(path, standardized.astype(np.float32)),
                                  learner.predict(standardized.astype(np.float32)))
    for original, rebuilt in zip(learner.model.layers, ckpt.model.layers):
        assert (original.to_scipy() != rebuilt.to_scipy()).nnz == 0  # the same weights between the same neurons


def test_prediction_needs_no_training_code(tmp_path, tasks, all_images, monkeypatch):
    learner = learn_tasks(new_learner(), tasks, 0, 2)
    expected = learner.predict(all_images)
    path = save_model(tmp_path / "model.npz", learner.model, MEAN, STD)

    def forbidden(*args, **kwargs):
        raise AssertionError("training code ran")

    for name in ("learn", "train_epoch", "train_step", "sgd_update", "begin_task"):
        monkeypatch.setattr(Learner, name, forbidden)
    for name in ("allocate", "rewire", "reserve", "begin_task"):
        monkeypatch.setattr(SpaceNet, name, forbidden)
    np.testing.assert_array_equal(predict_from_checkpoint(path, all_images), expected)


def test_file_is_a_plain_npz_without_pickles(tmp_path, tasks):
    path = save_learner(tmp_path / "ckpt.npz", learn_tasks(new_learner(), tasks, 0, 1), {"seed": 11})
    with np.load(path, allow_pickle=False) as npz:
        assert "meta" in npz.files and "layers.0.data" in npz.files and "known_classes" in npz.files
        assert all(npz[name].dtype != object for name in npz.files)
    trailer = path.read_bytes()[-111:]  # the zip comment ends the file
    assert trailer.startswith(b"spacenet_np.checkpoint format_version=2 sha256=")


@pytest.mark.parametrize("cls", METHODS)
def test_learner_round_trip(tmp_path, tasks, all_images, cls):
    learner = learn_tasks(new_learner(cls), tasks, 0, 2)
    progress = {"accuracy_matrix": [[99.5], [97.25, np.float64(98.0)]], "seed": np.int64(11), "wall_time_s": 1.5,
                "empty_task": float("nan"), "note": "two tasks done"}
    path = save_learner(tmp_path / "ckpt.npz", learner, progress)
    ckpt = load(path)
    assert ckpt.method == cls.name and ckpt.is_learner and ckpt.tasks_learned == 2
    assert ckpt.config == learner.config.to_dict()
    assert ckpt.progress["accuracy_matrix"] == [[99.5], [97.25, 98.0]] and ckpt.progress["seed"] == 11
    assert np.isnan(ckpt.progress["empty_task"]) and ckpt.progress["note"] == "two tasks done"
    assert ckpt.rng_state == learner.rng.bit_generator.state
    restored = restore_learner(ckpt)
    assert restored.model is ckpt.model
    assert isinstance(restored.config.connections_per_task, tuple)
    assert_learners_identical(learner, restored)
    np.testing.assert_array_equal(restored.predict(all_images), learner.predict(all_images))
    assert restored.trainable == [] and restored.observers == []


def test_connection_order_is_kept(tmp_path, tasks):
    """The rebuilt CSR holds the same connections at the same positions of W.data, owner and importance."""
    learner = learn_tasks(new_learner(), tasks, 0, 3)
    restored = restore_learner(load(save_learner(tmp_path / "ckpt.npz", learner)))
    for original, rebuilt in zip(learner.model.layers, restored.model.layers):
        assert rebuilt.nnz == original.nnz > 0
        for name in ("rows", "indices", "weights", "owner", "importance"):
            np.testing.assert_array_equal(getattr(rebuilt, name), getattr(original, name), err_msg=name)
        keys = rebuilt.rows.astype(np.int64) * rebuilt.in_index.n_slots + rebuilt.indices
        assert np.all(np.diff(keys) > 0)  # sorted by (row, column), as _set_connections keeps it


def test_config_types_round_trip(tmp_path, tasks):
    """Densities stay floats, counts stay ints, tuples come back as tuples."""
    config = tiny_config(connections_per_task=(0.25, 20), init_fan="selected", rewire=False, epochs=1)
    learner = learn_tasks(new_learner(config=config), tasks, 0, 1)
    restored = restore_learner(load(save_learner(tmp_path / "ckpt.npz", learner)))
    assert restored.config == config
    assert type(restored.config.connections_per_task[0]) is float
    assert type(restored.config.connections_per_task[1]) is int


def test_other_bit_generator_round_trip(tmp_path, tasks):
    learner = new_learner()
    learner.rng = np.random.Generator(np.random.Philox(5))
    learn_tasks(learner, tasks, 0, 1)
    restored = restore_learner(load(save_learner(tmp_path / "ckpt.npz", learner)))
    assert isinstance(restored.rng.bit_generator, np.random.Philox)
    as_json = checkpoint._to_json_value  # Philox's state holds arrays, saved as lists
    assert as_json(restored.rng.bit_generator.state, "") == as_json(learner.rng.bit_generator.state, "")
    np.testing.assert_array_equal(restored.rng.integers(0, 2 ** 62, 20), learner.rng.integers(0, 2 ** 62, 20))


def test_same_state_gives_the_same_bytes(tmp_path, tasks):
    learner = learn_tasks(new_learner(), tasks, 0, 2)
    first = save_learner(tmp_path / "a.npz", learner, {"seed": 11}).read_bytes()
    assert save_learner(tmp_path / "b.npz", learner, {"seed": 11}).read_bytes() == first
    again = restore_learner(load(tmp_path / "a.npz"))
    assert save_learner(tmp_path / "c.npz", again, {"seed": 11}).read_bytes() == first


# ----- methods with extra state (the methods.py protocol) -----
class Anchored(SpaceNet):
    """A method with constructor options and per-task arrays, like the penalty methods of methods.py."""

    name = "anchored"

    def __init__(self, model, config, seed=0, input_mean=0.0, input_std=1.0, strength=1.0, mode="sum"):
        super().__init__(model, config, seed=seed, input_mean=input_mean, input_std=input_std)
        self.strength, self.mode = strength, mode
        self.anchors = {}

    def extra_options(self):
        return {"strength": self.strength, "mode": self.mode}

    def extra_state(self):
        return dict(self.anchors)

    def load_extra_state(self, state):
        self.anchors = {k: np.array(v) for k, v in state.items()}

    def end_task(self, state):
        super().end_task(state)
        self.anchors[f"weights.{state.task}"] = self.model.layers[0].weights.copy()
        self.anchors["last_task"] = np.int64(state.task)  # a 0-d array
        self.anchors["importance_2d"] = np.outer(np.arange(3.0), np.arange(4.0))


def test_extra_options_and_state_round_trip(tmp_path, tasks):
    learner = learn_tasks(new_learner(Anchored, strength=0.25, mode="max"), tasks, 0, 2)
    ckpt = load(save_learner(tmp_path / "ckpt.npz", learner))
    assert ckpt.method == "anchored" and ckpt.extra_options == {"strength": 0.25, "mode": "max"}
    assert sorted(ckpt.extra_state) == ["importance_2d", "last_task", "weights.0", "weights.1"]
    restored = restore_learner(ckpt, {"anchored": Anchored})
    assert (restored.strength, restored.mode) == (0.25, "max")
    assert restored.anchors.keys() == learner.anchors.keys()
    for key, value in learner.anchors.items():
        got = restored.anchors[key]
        assert got.dtype == np.asarray(value).dtype and got.shape == np.asarray(value).shape
        np.testing.assert_array_equal(got, value)
    assert_learners_identical(learner, restored)


def test_registry_refusals(tmp_path, tasks):
    path = save_learner(tmp_path / "ckpt.npz", learn_tasks(new_learner(Anchored), tasks, 0, 1))
    with pytest.raises(CheckpointError, match="'anchored' is not one of the known methods") as err:
        restore_learner(load(path))  # default registry: spacenet and static only
    assert str(path) in str(err.value)
    with pytest.raises(CheckpointError, match="cannot rebuild"):
        restore_learner(load(path), {"anchored": SpaceNet})  # SpaceNet takes no strength option
    model_path = save_model(tmp_path / "model.npz", SparseMLP(N_FEATURES, HIDDEN, N_CLASSES), MEAN, STD)
    with pytest.raises(CheckpointError, match="model only") as err:
        restore_learner(load(model_path))
    assert str(model_path) in str(err.value)


def test_unserializable_state_is_refused_before_writing(tmp_path, tasks):
    learner = learn_tasks(new_learner(Anchored), tasks, 0, 1)
    path = save_learner(tmp_path / "ckpt.npz", learner, {"task": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError, match="progress must be JSON-serializable"):
        save_learner(path, learner, {"task": 2, "bad": object()})
    learner.anchors["bad"] = np.array([object()], dtype=object)
    with pytest.raises(TypeError, match="dtype object"):
        save_learner(path, learner, {"task": 2})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.npz"]
    with pytest.raises(ValueError, match="input_std"):
        save_model(tmp_path / "m.npz", learner.model, MEAN, 0.0)


# ----- resume: bit-identical to an uninterrupted run -----
@pytest.mark.parametrize("cls", METHODS)
def test_resume_is_bit_identical(tmp_path, tasks, all_images, cls):
    uninterrupted = learn_tasks(new_learner(cls), tasks, 0, 4)

    first_half = learn_tasks(new_learner(cls), tasks, 0, 2)
    path = save_learner(tmp_path / "after-2.npz", first_half, {"tasks_done": 2})
    del first_half
    resumed = restore_learner(load(path))
    assert load(path).progress == {"tasks_done": 2}
    learn_tasks(resumed, tasks, 2, 4)

    assert_learners_identical(uninterrupted, resumed)
    np.testing.assert_array_equal(resumed.predict(all_images), uninterrupted.predict(all_images))
    # everything a checkpoint holds is identical, byte for byte
    assert (save_learner(tmp_path / "r.npz", resumed).read_bytes()
            == save_learner(tmp_path / "u.npz", uninterrupted).read_bytes())


def test_resume_with_extra_state_is_bit_identical(tmp_path, tasks):
    uninterrupted = learn_tasks(new_learner(Anchored, strength=0.5), tasks, 0, 4)
    path = save_learner(tmp_path / "after-1.npz", learn_tasks(new_learner(Anchored, strength=0.5), tasks, 0, 1))
    resumed = learn_tasks(restore_learner(load(path), {"anchored": Anchored}), tasks, 1, 4)
    assert (save_learner(tmp_path / "r.npz", resumed).read_bytes()
            == save_learner(tmp_path / "u.npz", uninterrupted).read_bytes())


@pytest.mark.parametrize("name", ["rehearsal", "finetune", "joint", "ewc"])
def test_resume_of_the_other_methods_is_bit_identical(tmp_path, tasks, name):
    """The methods of ``spacenet_np.methods``, with their extra options and state, resume bit-identically."""
    methods = pytest.importorskip("spacenet_np.methods")
    if name not in methods.METHODS:
        pytest.skip(f"no method {name!r} in spacenet_np.methods")
    cls = methods.METHODS[name]
    options = {"ewc": {"total_tasks": 4, "ewc_lambda": 50.0, "fisher_samples": 20},
               "rehearsal": {"replay_per_task": 10}, "finetune": {"total_tasks": 4}, "joint": {"total_tasks": 4}}[name]
    uninterrupted = learn_tasks(new_learner(cls, **options), tasks, 0, 4)
    path = save_learner(tmp_path / "after-2.npz", learn_tasks(new_learner(cls, **options), tasks, 0, 2))
    ckpt = load(path)
    assert ckpt.method == name
    for key, value in options.items():
        assert ckpt.extra_options[key] == value
    assert bool(ckpt.extra_state) == (name != "finetune")  # replay buffers, Fisher and theta* arrays
    resumed = learn_tasks(restore_learner(ckpt, methods.METHODS), tasks, 2, 4)
    assert_learners_identical(uninterrupted, resumed)
    assert (save_learner(tmp_path / "r.npz", resumed).read_bytes()
            == save_learner(tmp_path / "u.npz", uninterrupted).read_bytes())


RESUME_SCRIPT = f"""
import sys
from helpers import pair_tasks
from spacenet_np.checkpoint import load, restore_learner, save_learner
learner = restore_learner(load(sys.argv[1]))
for images, labels, classes in pair_tasks({N_CLASSES}, {N_FEATURES}, 24, seed=5, spread=40.0)[2:4]:
    learner.learn(images, labels, classes)
save_learner(sys.argv[2], learner)
"""


def test_resume_in_a_fresh_process_is_bit_identical(tmp_path, tasks):
    """No state hides in the process: a new interpreter resumes to the same bytes as an uninterrupted run."""
    tests_dir = Path(__file__).resolve().parent
    path = save_learner(tmp_path / "after-2.npz", learn_tasks(new_learner(), tasks, 0, 2))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tests_dir.parent), str(tests_dir), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(path), str(tmp_path / "resumed.npz")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    uninterrupted = save_learner(tmp_path / "u.npz", learn_tasks(new_learner(), tasks, 0, 4))
    assert (tmp_path / "resumed.npz").read_bytes() == uninterrupted.read_bytes()


# ----- damaged files are refused, naming the file -----
@pytest.fixture(scope="module")
def saved(tmp_path_factory, tasks):
    """A learner checkpoint after two tasks: (path, bytes)."""
    path = save_learner(tmp_path_factory.mktemp("saved") / "ckpt.npz", learn_tasks(new_learner(), tasks, 0, 2),
                        {"accuracy_matrix": [[100.0], [99.0, 98.0]]})
    return path, path.read_bytes()


def refused(path, match=None):
    with pytest.raises(CheckpointError, match=match) as err:
        load(path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, ValueError)
    return str(err.value)


@pytest.mark.parametrize("keep", [1, 4, 30, 100, 0.25, 0.5, 0.9, -90, -65, -64, -22, -1])
def test_truncated_file_is_refused(tmp_path, saved, keep):
    data = saved[1]
    length = keep if isinstance(keep, int) and keep > 0 else (len(data) + keep if isinstance(keep, int)
                                                              else int(keep * len(data)))
    path = tmp_path / "cut.npz"
    path.write_bytes(data[:length])
    refused(path)


@pytest.mark.parametrize("where", [0.5, 0.1, 0.9, 0, -1, -70])
def test_flipped_byte_is_refused(tmp_path, saved, where):
    data = bytearray(saved[1])
    position = int(where * len(data)) if isinstance(where, float) else where % len(data)
    data[position] ^= 0x01
    path = tmp_path / "flipped.npz"
    path.write_bytes(bytes(data))
    refused(path)


def test_every_flipped_byte_and_every_truncation_is_refused(tmp_path):
    """Exhaustive over a small checkpoint: no corruption of any byte, and no prefix of the file, ever loads."""
    learner = new_learner(config=tiny_config(connections_per_task=(8, 4), epochs=1))
    images, labels = make_tasks()[0]
    learner.learn(images[:8], labels[:8], CLASSES[0])
    path = save_learner(tmp_path / "small.npz", learner, {"seed": 1})
    data = path.read_bytes()
    checkpoint._load_bytes(path, data)  # the intact bytes load
    for position in range(len(data)):
        corrupted = bytearray(data)
        corrupted[position] ^= 0xFF if position % 2 else 0x10
        with pytest.raises(CheckpointError, match=str(path)):
            checkpoint._load_bytes(path, bytes(corrupted))
    for length in range(len(data)):
        with pytest.raises(CheckpointError, match=str(path)):
            checkpoint._load_bytes(path, data[:length])


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.npz"
    path.write_bytes(b"")
    assert "empty" in refused(path)


def test_garbage_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    cases = {
        "random.npz": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "zip-magic.npz": b"PK\x03\x04" + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "text.npz": b"this is not a checkpoint\n",
    }
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        refused(tmp_path / name)
    np.savez(tmp_path / "other.npz", weights=np.ones(3))
    assert "not a spacenet_np.checkpoint" in refused(tmp_path / "other.npz")
    np.save(tmp_path / "array.npy", np.ones(3))
    refused(tmp_path / "array.npy")


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "ckpt.npz"
    assert "no such checkpoint file" in refused(path)
    with pytest.raises(CheckpointError, match=str(path)):
        predict_from_checkpoint(path, np.zeros((1, N_FEATURES), np.uint8))
    with pytest.raises(CheckpointError, match=str(path)):
        restore_learner(path)


def test_folder_or_link_loop_instead_of_a_file(tmp_path):
    folder = tmp_path / "ckpt.npz"
    folder.mkdir()
    assert "a folder" in refused(folder)
    loop = tmp_path / "loop.npz"
    os.symlink(tmp_path / "loop2.npz", loop)
    os.symlink(loop, tmp_path / "loop2.npz")
    refused(loop)


def rewrite(source, target, sha256=None, arrays_update=None, **meta_update):
    """Write ``source``'s contents to ``target`` with metadata fields and arrays replaced (a test helper).

    The file checksum is always valid; the contents' sha256 is recomputed unless ``sha256`` is given.
    """
    meta, arrays = checkpoint._read_container(source)
    meta.update(meta_update)
    arrays.update(arrays_update or {})
    for name in [n for n, v in arrays.items() if v is None]:
        del arrays[name]
    target.write_bytes(checkpoint._encode(meta, arrays, sha256=sha256))
    return target


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, FORMAT_VERSION - 1, 99])
def test_other_format_version_is_refused(tmp_path, saved, version):
    path = rewrite(saved[0], tmp_path / "other-version.npz", format_version=version)
    message = refused(path)
    assert f"version {version}" in message and f"version {FORMAT_VERSION}" in message
    if version > FORMAT_VERSION:
        assert "newer" in message


def test_other_format_name_is_refused(tmp_path, saved):
    path = rewrite(saved[0], tmp_path / "other-format.npz", format="someone.else")
    assert "not a spacenet_np.checkpoint file (format 'someone.else')" in refused(path)


def test_rewrite_helper_round_trips(tmp_path, saved):
    path = rewrite(saved[0], tmp_path / "same.npz")
    assert path.read_bytes() == saved[1]


def test_stale_content_checksum_is_refused(tmp_path, saved):
    """Changed arrays under a valid file checksum but the old contents' sha256: refused."""
    meta, arrays = checkpoint._read_container(saved[0])
    bias = arrays["neurons.1.bias"].copy()
    bias[0] += 1.0
    path = rewrite(saved[0], tmp_path / "stale.npz", sha256=meta["sha256"], arrays_update={"neurons.1.bias": bias})
    assert "sha256 of its contents" in refused(path)


def test_inconsistent_contents_are_refused(tmp_path, saved):
    """Files with valid checksums whose arrays do not describe a network: refused, not half-loaded."""
    meta, arrays = checkpoint._read_container(saved[0])
    indices = arrays["layers.0.indices"].copy()
    indices[[0, 1]] = indices[[1, 0]]
    out_of_range = arrays["layers.1.indices"].copy()
    out_of_range[-1] = 10 ** 6
    short_bias = arrays["neurons.1.bias"][:-1]
    cases = {
        "unsorted": {"layers.0.indices": indices},
        "out-of-range": {"layers.1.indices": out_of_range},
        "short-bias": {"neurons.1.bias": short_bias},
        "float-owner": {"layers.0.owner": arrays["layers.0.owner"].astype(np.float32)},
        "unknown-entry": {"surprise": np.ones(2)},
        "missing-entry": {"known_classes": None},
    }
    for name, update in cases.items():
        path = rewrite(saved[0], tmp_path / f"{name}.npz", arrays_update=update)
        assert "inconsistent checkpoint contents" in refused(path), name
    other = {**meta["model"], "architecture": {"kind": "mlp", "sizes": [16, 41, 8]}}
    refused(rewrite(saved[0], tmp_path / "sizes.npz", model=other), "inconsistent")
    unknown = {**meta["model"], "architecture": {"kind": "transformer"}}
    refused(rewrite(saved[0], tmp_path / "kind.npz", model=unknown), "inconsistent")


# ----- atomic writes -----
def test_save_leaves_only_the_file(tmp_path, tasks):
    learner = learn_tasks(new_learner(), tasks, 0, 1)
    target = tmp_path / "run" / "ckpt.npz"  # the folder is created
    save_learner(target, learner)
    save_learner(target, learn_tasks(learner, tasks, 1, 2))  # replaces it
    assert os.listdir(target.parent) == ["ckpt.npz"]
    assert load(target).tasks_learned == 2


class HalfWriter:
    """A file object that writes half of what it gets, then fails like a full disk."""

    def __init__(self, f, error):
        self.f, self.error = f, error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, payload):
        self.f.write(payload[:len(payload) // 2])
        self.f.flush()
        raise self.error

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize("failure", ["write", "fsync", "replace", "interrupt"])
def test_failed_write_keeps_the_old_file(tmp_path, tasks, monkeypatch, failure):
    learner = learn_tasks(new_learner(), tasks, 0, 1)
    path = save_learner(tmp_path / "ckpt.npz", learner, {"tasks": 1})
    before = path.read_bytes()
    learn_tasks(learner, tasks, 1, 2)
    real_fdopen = os.fdopen

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if failure == "write":
        monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode), OSError(28, "")))
    elif failure == "interrupt":
        monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode),
                                                                             KeyboardInterrupt()))
    else:
        monkeypatch.setattr(fileio.os, failure, boom)
    with pytest.raises(KeyboardInterrupt if failure == "interrupt" else OSError):
        save_learner(path, learner, {"tasks": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.npz"]  # no temporary file left behind
    assert load(path).progress == {"tasks": 1}


def test_a_half_written_temp_file_is_never_the_checkpoint(tmp_path, tasks, monkeypatch):
    """A crash before the rename leaves at most a temp file; the target name only ever holds complete files."""
    learner = learn_tasks(new_learner(), tasks, 0, 1)
    seen = []
    real_replace = os.replace

    def checking_replace(src, dst):
        seen.append(Path(src).name)
        checkpoint._read_container(Path(src))  # the complete, verified file is what gets renamed
        assert not Path(dst).exists()
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", checking_replace)
    save_learner(tmp_path / "ckpt.npz", learner)
    assert seen and seen[0].startswith(".ckpt.npz.") and seen[0].endswith(".tmp")
    assert os.listdir(tmp_path) == ["ckpt.npz"]


class Stop(Exception):
    pass


def raise_stop(signum, frame):
    raise Stop


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_another_thread_receives_mid_write_acts_after_the_write(tmp_path, monkeypatch, signum):
    """The system delivers a process's signal to any thread that does not block it, and Python then runs the
    handler in the main thread at its next instruction: a signal that a helper thread receives while a file is
    written must still wait for the write (no temporary file, the whole file), then reach its handler."""
    waiting, release = threading.Event(), threading.Event()
    helper = threading.Thread(target=lambda: (waiting.set(), release.wait(30)))
    helper.start()
    waiting.wait(30)
    real_fsync, order = os.fsync, []

    def fsync_then_signal(fd):
        real_fsync(fd)
        signal.pthread_kill(helper.ident, signum)  # received by the helper, handled in this (main) thread
        time.sleep(0.05)  # the handler would run here, mid-write, if the signal were not held back
        order.append("fsync")

    monkeypatch.setattr(fileio.os, "fsync", fsync_then_signal)
    previous = signal.signal(signum, raise_stop)
    try:
        with pytest.raises(Stop):
            fileio.atomic_write_bytes(tmp_path / "file.bin", b"x" * 1000)
            order.append("after the write")  # not reached: the handler raises as the write ends
    finally:
        signal.signal(signum, previous)
        release.set()
        helper.join()
    assert order == ["fsync"]
    assert os.listdir(tmp_path) == ["file.bin"] and (tmp_path / "file.bin").read_bytes() == b"x" * 1000


def test_a_signal_while_a_checkpoint_is_encoded_acts_after_the_save(tmp_path, tasks, monkeypatch):
    """A handler that raises inside ``zipfile`` leaves a write handle open, and closing the zip then raises
    ValueError in place of the interruption (the CLI reported it as an error, exit 2, instead of SIGINT's 130):
    the encoding waits for the signal like the write does, and the whole checkpoint is saved first."""
    learner = learn_tasks(new_learner(), tasks, 0, 1)
    real_close, sent = zipfile._ZipWriteFile.close, []

    def close_with_a_signal(handle):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # its handler would run right here
            time.sleep(0.05)
        return real_close(handle)

    monkeypatch.setattr(zipfile._ZipWriteFile, "close", close_with_a_signal)
    previous = signal.signal(signal.SIGTERM, raise_stop)
    try:
        with pytest.raises(Stop):
            save_learner(tmp_path / "ckpt.npz", learner, {"tasks": 1})
    finally:
        signal.signal(signal.SIGTERM, previous)
    monkeypatch.undo()
    assert sent and os.listdir(tmp_path) == ["ckpt.npz"]
    assert load(tmp_path / "ckpt.npz").progress == {"tasks": 1}
