"""One experiment is one function: ``run(spec) -> record``.

A spec is a complete, JSON-serializable description of one run::

    {"task": "split_mnist", "method": "spacenet", "seed": 0, "preset": "paper",
     "arch": "mlp", "width": "standard", "hidden": [400, 400],
     "config": {...every SpaceNetConfig field...}, "method_options": {...every declared option...},
     "validation": 0.1, "data_dir": null, "stream_options": {}}

``stream_options`` is {} for the built-in streams and ``{"classes_per_task": 2, "class_order": null}`` (complete)
for an ``npz:PATH`` task, whose PATH ``make_spec`` makes absolute (see ``npz_stream``).

``make_spec`` builds one from a preset (the paper's values by default) and the values a caller sets; ``run``
trains the method over the stream and returns the result record: the test accuracy matrix and its metrics, the
same on the validation data (``val_*``), the validation split, the wall time and the model size. The train CLI
and the sweep both call ``run``; neither knows any method's options, which come from the declarations
(``options.config_options`` and each method's ``OPTIONS``).
"""
import functools
import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import checkpoint, data, metrics, npz_stream, presets, spacenet
from .checkpoint import CheckpointError
from .methods import METHODS
from .network import SparseCNN, SparseMLP
from .options import check_options, config_options, method_options
from .spacenet import SpaceNetConfig
from .streams import STREAMS, get_stream, stream_fingerprint, validation_split

ARCHS = ("auto", "mlp", "cnn")
SPEC_KEYS = ("task", "method", "seed", "preset", "arch", "width", "hidden", "config", "method_options",
             "validation", "data_dir", "stream_options")
IDENTITY_EXCLUDES = ("data_dir",)  # where the data live does not change what a run is
CONFIG_OPTIONS = config_options(SpaceNetConfig)


class SpecError(ValueError):
    """A run spec that cannot run: an unknown name, a value out of range, a missing key."""


# ----- specs -----
def make_spec(task, method="spacenet", seed=0, preset="paper", config=None, method_opts=None, validation=0.0,
              data_dir=None, arch="auto", width="standard", hidden=None, stream_options=None):
    """A complete, checked spec. ``config`` and ``method_opts`` hold only the values that differ from the preset
    (a single value for a per-layer field applies to every layer); ``stream_options`` only those of an npz task
    that differ from its defaults. Raises SpecError naming the problem."""
    if npz_stream.is_npz_task(task):
        task, stream_options = normalize_npz_task(task, stream_options)
    elif task not in STREAMS:
        raise SpecError(f"unknown task {task!r}; known tasks: {', '.join(sorted(STREAMS))}, or npz:PATH")
    if method not in METHODS:
        raise SpecError(METHODS.unknown(method))
    if arch not in ARCHS:
        raise SpecError(f"arch {arch!r} must be one of {', '.join(ARCHS)}")
    arch = presets.architecture(task, arch)
    if width not in presets.CNN_WIDTHS:
        raise SpecError(f"width {width!r} must be one of {', '.join(presets.CNN_WIDTHS)}")
    try:
        base = presets.preset_values(preset, arch, width, hidden, task, method)
    except presets.PresetError as err:
        raise SpecError(str(err)) from None
    spec = {"task": task, "method": method, "seed": seed, "preset": preset, "arch": arch, "width": width,
            "hidden": base["hidden"],
            "config": {**base["config"], **broadcast(config or {}, base["config"])},
            "method_options": {**base["method_options"], **(method_opts or {})},
            "validation": validation, "data_dir": None if data_dir is None else str(data_dir),
            "stream_options": stream_options or {}}
    return check_spec(spec)


def normalize_npz_task(task, options):
    """An npz task with an absolute path and its complete stream options; SpecError naming a bad one."""
    try:
        return npz_stream.normalize_task(task), npz_stream.stream_options(**check_stream_keys(options or {}))
    except ValueError as err:
        raise SpecError(str(err)) from None


def check_stream_keys(options):
    """``options`` if it is a dict of known stream option names; SpecError otherwise."""
    if not isinstance(options, dict):
        raise SpecError(f"stream_options {options!r} must be a dict")
    unknown = sorted(set(options) - set(npz_stream.OPTION_NAMES))
    if unknown:
        raise SpecError(f"stream_options has no option {', '.join(unknown)}; its options: "
                        f"{', '.join(npz_stream.OPTION_NAMES)}")
    return options


def check_stream_options(task, options):
    """The stream options of ``task``: complete for an npz task, {} for a built-in one. SpecError otherwise."""
    check_stream_keys(options)
    if npz_stream.is_npz_task(task):
        try:
            return npz_stream.stream_options(**options)
        except ValueError as err:
            raise SpecError(str(err)) from None
    if options:
        raise SpecError(f"stream_options {options} apply to npz:PATH tasks only; task {task!r} takes none")
    return {}


def broadcast(values, like):
    """``values`` with a single value for a per-layer field repeated to the length of that field in ``like``."""
    out = {}
    for name, value in values.items():
        option = CONFIG_OPTIONS.get(name)
        if option is not None and option.per_layer and not isinstance(value, (list, tuple)):
            value = [value] * len(like[name])
        out[name] = value
    return out


def check_spec(spec):
    """``spec`` checked and normalized (lists for tuples); SpecError naming the first problem."""
    missing = [key for key in SPEC_KEYS if key not in spec]
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if missing or unknown:
        raise SpecError(f"a run spec needs the keys {', '.join(SPEC_KEYS)}; missing {missing}, unknown {unknown}")
    if spec["method"] not in METHODS or spec["task"] not in STREAMS and not npz_stream.is_npz_task(spec["task"]):
        raise SpecError(f"unknown method {spec['method']!r} or task {spec['task']!r}")
    stream_options = check_stream_options(spec["task"], spec["stream_options"])
    if not (isinstance(spec["seed"], (int, np.integer)) and not isinstance(spec["seed"], bool)
            and spec["seed"] >= 0):
        raise SpecError(f"seed {spec['seed']!r} must be an integer >= 0")
    validation = spec["validation"]
    if isinstance(validation, bool) or not isinstance(validation, (int, float)) or not 0 <= validation < 1:
        raise SpecError(f"validation fraction {validation!r} must be in [0, 1)")
    hidden = spec["hidden"]
    if not (isinstance(hidden, (list, tuple)) and hidden and all(isinstance(h, int) and h >= 1 for h in hidden)):
        raise SpecError(f"hidden {hidden!r} must be a non-empty list of widths >= 1")
    if spec["width"] not in presets.CNN_WIDTHS:
        raise SpecError(f"width {spec['width']!r} must be one of {', '.join(presets.CNN_WIDTHS)}")
    try:
        config = check_options(CONFIG_OPTIONS, spec["config"], "the config")
        options = check_options(method_options(METHODS[spec["method"]]), spec["method_options"],
                                f"method {spec['method']!r}")
    except ValueError as err:
        raise SpecError(str(err)) from None
    return {**spec, "seed": int(spec["seed"]), "validation": float(validation), "hidden": list(hidden),
            "config": jsonable(config), "method_options": jsonable(options), "stream_options": stream_options}


def jsonable(values):
    """Tuples as lists, so a spec compares equal to its JSON round trip."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def identity(spec):
    """What makes two runs the same run: the spec without where the data live."""
    return {k: v for k, v in spec.items() if k not in IDENTITY_EXCLUDES}


def config_hash(spec):
    """A short sha256 of the spec's identity without the seed: the same for every seed of one configuration."""
    body = json.dumps({k: v for k, v in identity(spec).items() if k != "seed"}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


# ----- building a run -----
def spec_stream(spec):
    """The stream of ``spec`` (its task, data folder and stream options), loaded once per process."""
    return load_stream(spec["task"], spec["data_dir"], spec["stream_options"])


def load_stream(task, data_dir, stream_options):
    """The stream, loaded once per process (sweep workers run many specs on the same data)."""
    return _load_stream(task, data_dir, json.dumps(stream_options, sort_keys=True))


@functools.lru_cache(maxsize=2)
def _load_stream(task, data_dir, options_json):
    return get_stream(task, data_dir, **json.loads(options_json))


def fingerprint(spec):
    """The sha256 of ``spec``'s stream (``streams.stream_fingerprint``), computed once per process."""
    return fingerprint_soon(spec).result()


def fingerprint_soon(spec):
    """``fingerprint(spec)`` as a future, computed in a thread: hashing releases the GIL, so a run trains while
    the first checkpoint's fingerprint is computed."""
    return _fingerprint(spec["task"], spec["data_dir"], json.dumps(spec["stream_options"], sort_keys=True))


@functools.lru_cache(maxsize=2)
def _fingerprint(task, data_dir, options_json):
    return _hashing_thread().submit(stream_fingerprint, _load_stream(task, data_dir, options_json))


@functools.lru_cache(maxsize=1)
def _hashing_thread():
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="spacenet-fingerprint")


def build_model(spec, stream):
    """The network of ``spec`` for ``stream``: the paper's CNN (Sec. 5.3.1) or the MLP (Sec. 5.1)."""
    if spec["arch"] == "cnn":
        if stream.image_shape is None:
            raise SpecError(f"arch cnn needs images; {stream.name} has no image shape")
        return SparseCNN(stream.image_shape, presets.CNN_WIDTHS[spec["width"]], spec["hidden"], stream.n_classes)
    return SparseMLP(stream.n_features, spec["hidden"], stream.n_classes)


def build_config(spec):
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()}
    return SpaceNetConfig(**values)


def resolved_method_options(spec, stream):
    """The method's options with those declared ``from_stream`` filled from the stream when None."""
    options = dict(spec["method_options"])
    for option in METHODS[spec["method"]].OPTIONS:
        if option.from_stream == "n_tasks" and options.get(option.name) is None:
            options[option.name] = len(stream.tasks)
    return options


def prepare(spec):
    """Load and check everything a run needs, before any training: (stream, validation tasks, split record,
    model, config). Raises SpecError (or ValueError, DataError) naming the problem."""
    spec = check_spec(spec)
    stream = spec_stream(spec)
    train_stream, val_tasks, split = validation_split(stream, spec["validation"])
    model = build_model(spec, stream)
    config = build_config(spec)
    method = METHODS[spec["method"]]
    try:
        config.validate(model, neuron_selection=method.uses_neuron_selection, switches=method.SWITCHES)
        if method.uses_neuron_selection:  # simulate the free lists: an impossible later task fails now
            spacenet.check_budget(model, config, len(stream.tasks), [len(t.classes) for t in stream.tasks])
    except ValueError as err:
        raise SpecError(str(err)) from None
    return train_stream, val_tasks, split, model, config


def new_learner(spec, stream, model, config):
    mean, std = ((stream.feature_mean, stream.feature_std) if stream.feature_mean is not None
                 else (stream.mean, stream.std))
    return METHODS[spec["method"]](model, config, seed=spec["seed"], input_mean=mean, input_std=std,
                                   **resolved_method_options(spec, stream))


def resume_learner(path, spec):
    """The learner and progress saved at ``path``, after checking that the checkpoint belongs to ``spec``'s run:
    CheckpointError naming both sides otherwise."""
    saved = checkpoint.load(path)
    progress = saved.progress or {}
    expected = {"spec": identity(spec), "stream_fingerprint": fingerprint(spec)}
    found = {"spec": progress.get("spec"), "stream_fingerprint": progress.get("stream_fingerprint")}
    if found != expected:
        raise CheckpointError(f"{path} belongs to another run: {describe_difference(found, expected)}")
    return checkpoint.restore_learner(saved, METHODS), progress


def describe_difference(found, expected):
    """The differing fields of two (nested) identity dicts, as 'field: checkpoint X, this run Y'."""
    parts = []
    for key in sorted(set(found) | set(expected)):
        a, b = found.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            parts += [f"{key}.{part}" for part in describe_difference(a, b).split("; ") if part]
        elif a != b:
            parts.append(f"{key}: checkpoint {a!r}, this run {b!r}")
    return "; ".join(parts)


# ----- running -----
def run(spec, checkpoint_path=None, progress=None, observers=(), on_task=None):
    """Train ``spec``'s method over its stream and evaluate it after every task. Returns the result record.

    ``checkpoint_path``: save the learner there after every task, and resume from it when it exists (it must
    belong to this spec). ``progress``: an object with ``start_epoch(task, epoch, n_images)``,
    ``batch(loss, n_images)``, ``end_epoch()``, ``line(text)`` and ``shows_batches`` (False: it ignores the
    batch calls, so none are made and an epoch's batches may run in one kernel call; see ``train.Progress``).
    ``observers`` join the learner's observers; ``on_task(learner, record_so_far)`` runs after each task's
    checkpoint.
    """
    spec = check_spec(spec)
    stream, val_tasks, split, model, config = prepare(spec)
    start = time.perf_counter()
    if checkpoint_path is not None and checkpoint_path.exists():
        learner, saved = resume_learner(checkpoint_path, spec)
        test_matrix, val_matrix, time_before = (saved["accuracy_matrix"], saved["val_accuracy_matrix"],
                                                saved["wall_time_s"])
    else:
        if checkpoint_path is not None:
            fingerprint_soon(spec)
        learner, test_matrix, val_matrix, time_before = new_learner(spec, stream, model, config), [], [], 0.0
    learner.observers.extend(observers)

    def predict_and_release(images):  # a test set's pages are mapped again at the next evaluation
        predictions = learner.predict(images)
        data.release_pages(images)
        return predictions

    for task in stream.tasks[learner.tasks_learned:]:
        task_start = time.perf_counter()
        learn_task(learner, task, progress, config.batch_size)
        data.release_pages(task.x_train)  # a finished task's training images need not stay in memory
        test_matrix.append(metrics.evaluate_tasks(predict_and_release, stream.tasks[:task.index + 1]))
        val_matrix.append(metrics.evaluate_tasks(learner.predict, val_tasks[:task.index + 1]) if val_tasks else [])
        elapsed = time_before + time.perf_counter() - start
        if checkpoint_path is not None:
            checkpoint.save_learner(checkpoint_path, learner, {
                "seed": spec["seed"], "accuracy_matrix": test_matrix, "val_accuracy_matrix": val_matrix,
                "wall_time_s": elapsed, "spec": identity(spec),
                "stream_fingerprint": fingerprint(spec)})
        if progress is not None:
            progress.line(task_line(spec["seed"], task, len(stream.tasks), test_matrix[-1],
                                    time.perf_counter() - task_start))
        if on_task is not None:
            on_task(learner, test_matrix)
    return result_record(spec, learner, test_matrix, val_matrix, split, time_before + time.perf_counter() - start)


def learn_task(learner, task, progress, batch_size):
    """``learner.learn`` on one task, reporting batches to ``progress`` if it shows them."""
    def on_batch(epoch, batch, n_batches, loss):  # n_batches: of what the method trains on (replay included)
        if batch == 0:
            progress.end_epoch()
            progress.start_epoch(task.index, epoch, learner.epoch_size)
        progress.batch(loss, min(batch_size, learner.epoch_size - batch * batch_size))

    try:
        learner.learn(task.x_train, task.y_train, task.classes,
                      on_batch=on_batch if progress is not None and progress.shows_batches else None)
    finally:
        if progress is not None:
            progress.end_epoch()


def task_line(seed, task, n_tasks, row, seconds):
    return (f"seed {seed} task {task.index + 1}/{n_tasks} classes {list(task.classes)} ({seconds:.1f} s): "
            f"accuracy " + " ".join(f"{a:.2f}" for a in row) + f" | average {np.mean(row):.2f}")


def result_record(spec, learner, test_matrix, val_matrix, split, wall_time):
    """The record of one finished run: spec, test and validation matrices and metrics, split, cost."""
    size = metrics.model_size(learner.model)
    record = {"spec": spec, "seed": spec["seed"], "accuracy_matrix": test_matrix,
              **metrics.run_metrics(test_matrix), "val_accuracy_matrix": val_matrix}
    if split["fraction"] > 0:
        record.update({f"val_{k}": v for k, v in metrics.run_metrics(val_matrix).items()})
    record.update({
        "validation_split": split,
        "wall_time_s": wall_time,
        "connections_per_layer": learner.model.connection_counts(),
        "free_neurons_per_layer": [learner.model.neurons[p].n_free for p in learner.model.hidden_positions],
        "parameter_count": size["parameters"],
        "model_size_bytes": size["bytes"],
    })
    return record
