"""Your own data: streams from arrays (``make_stream``) and from .npz files (``--task npz:PATH``), their errors, and
every stream feature on them (the validation split, checkpoints, the report)."""
import json

import numpy as np
import pytest
from helpers import make_blobs

from spacenet_np import experiment, make_stream, report, sweep, train
from spacenet_np.npz_stream import StreamDataError, load_npz_stream
from spacenet_np.strategy import Learner
from spacenet_np.streams import get_stream

NET = ["--hidden", "20", "--connections", "40", "12", "--selected", "8", "--reserved", "2", "--epochs", "2",
       "--batch-size", "16", "--quiet"]


def blobs(labels=(0, 1, 2, 3), n_features=16, n_train=12, n_test=4, float_features=False):
    """(x_train, y_train, x_test, y_test): blobs with the given class labels; floats standardized per feature."""
    x_train, y_train = make_blobs(len(labels), n_features, n_train, seed=0)
    x_test, y_test = make_blobs(len(labels), n_features, n_test, seed=1, centre_seed=0)
    if float_features:
        x_train, x_test = ((x.astype(np.float64) - 128.0) / 64.0 for x in (x_train, x_test))
    names = np.asarray(labels)
    return x_train, names[y_train], x_test, names[y_test]


def save(path, **arrays):
    np.savez(path, **arrays)
    return f"npz:{path}"


# ----- streams from arrays -----
def test_labels_map_to_sorted_indices_and_tasks_follow_the_class_order():
    x_train, y_train, x_test, y_test = blobs(labels=(7, -3, 42, 10))
    stream = make_stream(x_train, y_train, x_test, y_test, classes_per_task=2, class_order=[42, 7, -3, 10])
    # sorted labels -3, 7, 10, 42 are indices 0, 1, 2, 3; tasks: {42, 7} -> (1, 3), {-3, 10} -> (0, 2)
    assert stream.n_classes == 4 and [t.classes for t in stream.tasks] == [(1, 3), (0, 2)]
    for task, originals in zip(stream.tasks, [(42, 7), (-3, 10)]):
        keep = np.isin(y_train, originals)
        sorted_labels = np.array([-3, 7, 10, 42])
        assert sorted(sorted_labels[task.y_train].tolist()) == sorted(y_train[keep].tolist())
        # grouped by class, the file order kept within a class
        for index in task.classes:
            np.testing.assert_array_equal(task.x_train[task.y_train == index],
                                          x_train[y_train == sorted_labels[index]])
        assert not task.x_train.flags.writeable and task.y_test.dtype == np.int64
    assert x_train.flags.writeable  # the caller's array is left as it was


def test_uint8_pixels_get_their_statistics_and_floats_are_used_as_they_are():
    x_train, y_train, x_test, y_test = blobs()
    stream = make_stream(x_train, y_train, x_test, y_test)
    assert stream.mean == pytest.approx((x_train / 255).mean()) and stream.std == pytest.approx((x_train / 255).std())
    floats = make_stream(*blobs(float_features=True))
    assert (floats.mean, floats.std, floats.feature_mean) == (0.0, 1.0, None)
    x = floats.tasks[0].x_test
    np.testing.assert_array_equal(floats.standardize(x), x.astype(np.float32))
    learner = Learner.__new__(Learner)  # input_batch only reads the statistics
    learner.input_mean, learner.input_std = floats.mean, floats.std
    np.testing.assert_array_equal(learner.input_batch(x, np.arange(len(x))).T, floats.standardize(x))


def test_images_give_their_shape_and_channels_their_statistics():
    x_train, y_train, x_test, y_test = blobs(n_features=2 * 4 * 4)
    stream = make_stream(x_train.reshape(-1, 2, 4, 4), y_train, x_test.reshape(-1, 2, 4, 4), y_test)
    assert stream.image_shape == (2, 4, 4) and stream.n_features == 32
    np.testing.assert_allclose(stream.feature_mean[:16], (x_train[:, :16] / 255).mean())
    np.testing.assert_allclose(stream.feature_mean[16:], (x_train[:, 16:] / 255).mean())
    flat = make_stream(x_train, y_train, x_test, y_test, image_shape=(1, 4, 8))
    assert flat.image_shape == (1, 4, 8) and flat.feature_mean is None


def bad(name, value):
    """The blobs with one array replaced."""
    arrays = dict(zip(("x_train", "y_train", "x_test", "y_test"), blobs()))
    arrays[name] = value
    return arrays


@pytest.mark.parametrize("arrays, options, message", [
    (bad("y_train", blobs()[1][:-1]), {}, "y_train has 47 labels but x_train has 48 samples"),
    (bad("y_test", blobs()[3].astype(float)), {}, "y_test has dtype float64 in arrays: labels must be integers"),
    (bad("x_test", np.where(np.arange(16)[:, None] == 5, np.nan, blobs(float_features=True)[2])), {},
     "x_test holds 16 NaN or infinite values in arrays (the first at sample 5, feature 0)"),
    (bad("x_train", blobs()[0].astype(np.int32)), {}, "x_train has dtype int32"),
    (bad("x_test", blobs(float_features=True)[2]), {}, "x_train is uint8 but x_test is float64"),
    (bad("x_test", blobs()[2][:, :15]), {}, "x_train has 16 features but x_test has 15"),
    (bad("y_test", np.full(16, 3)), {}, "classes [0, 1, 2] have no sample in y_test"),
    (bad("y_test", np.r_[blobs()[3][:-1], 9]), {}, "y_test holds labels [9] that y_train does not have"),
    (bad("y_train", blobs()[1][:, None]), {}, "y_train has shape (48, 1) in arrays: labels must be one-dimensional"),
    (bad("x_train", np.zeros((0, 16), np.uint8)), {}, "x_train has shape (0, 16)"),
    (bad("x_train", np.full((48, 16), 7, np.uint8)), {}, "the training pixels in arrays are constant (std 0)"),
    ({**bad("x_train", blobs()[0]), "image_shape": (1, 4, 5)}, {}, "image_shape (1, 4, 5) in arrays has 20 values"),
    (bad("x_train", blobs()[0]), {"classes_per_task": 3},
     "4 classes cannot be split into tasks of 3 classes in arrays; classes_per_task must divide 4: one of [1, 2, 4]"),
    (bad("x_train", blobs()[0]), {"classes_per_task": 0}, "classes_per_task=0 must be an integer >= 1"),
    (bad("x_train", blobs()[0]), {"class_order": [0, 1, 2, 5]}, "class_order holds [5], which are not classes"),
    (bad("x_train", blobs()[0]), {"class_order": [0, 1, 2, 2]}, "class_order repeats [2]"),
    (bad("x_train", blobs()[0]), {"class_order": [0, 1, 2]}, "class_order lacks the classes [3]"),
    (bad("x_train", blobs()[0]), {"class_order": [0, 1.5, 2, 3]}, "must be a non-empty list of integer labels"),
])
def test_bad_arrays_and_options_are_named(arrays, options, message):
    with pytest.raises(StreamDataError) as err:
        make_stream(**arrays, **options)
    assert message in str(err.value)


# ----- .npz files -----
def test_an_npz_file_gives_the_stream_of_its_arrays(tmp_path):
    arrays = dict(zip(("x_train", "y_train", "x_test", "y_test"), blobs(labels=(5, 6, 8, 9))))
    task = save(tmp_path / "d.npz", **arrays, image_shape=np.array([1, 4, 4]))
    stream = get_stream(task, classes_per_task=1, class_order=[9, 5, 8, 6])
    expected = make_stream(**arrays, classes_per_task=1, class_order=[9, 5, 8, 6], image_shape=(1, 4, 4))
    assert stream.name == task and [t.classes for t in stream.tasks] == [(3,), (0,), (2,), (1,)]
    assert stream.image_shape == (1, 4, 4) and stream.mean == expected.mean
    for a, b in zip(stream.tasks, expected.tasks):
        np.testing.assert_array_equal(a.x_train, b.x_train)
        np.testing.assert_array_equal(a.y_test, b.y_test)
    with pytest.raises(ValueError, match="takes no options"):
        get_stream("split_mnist", classes_per_task=2)


@pytest.mark.parametrize("contents, message", [
    ({"x_train": 1, "y_train": 1, "x_test": 1}, "missing array y_test"),
    ({"x_train": 1, "y_train": 1, "x_test": 1, "y_test": 1, "X_val": 1}, "unknown array X_val"),
    ("npy", "holds a single array, not an .npz archive"),
    ({"x_train": np.array([[1, "a"]], dtype=object), "y_train": 1, "x_test": 1, "y_test": 1},
     "array x_train cannot be read: Object arrays cannot be loaded when allow_pickle=False"),
    ("text", "is not a readable .npz file"),
])
def test_bad_npz_files_are_named(tmp_path, contents, message):
    path = tmp_path / "bad.npz"
    if contents == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    elif contents == "text":
        path.write_text("not an archive")
    else:
        np.savez(path, **contents)
    with pytest.raises(StreamDataError, match=message) as err:
        load_npz_stream(f"npz:{path}")
    assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_npz_stream(f"npz:{tmp_path / 'missing.npz'}")


def test_specs_make_the_path_absolute_and_complete_the_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = experiment.make_spec("npz:d.npz", stream_options={"class_order": [3, 1, 0, 2]})
    assert spec["task"] == f"npz:{tmp_path / 'd.npz'}" and spec["arch"] == "mlp"
    assert spec["stream_options"] == {"classes_per_task": 2, "class_order": [3, 1, 0, 2]}
    assert experiment.check_spec(json.loads(json.dumps(spec))) == spec
    assert experiment.make_spec("split_mnist")["stream_options"] == {}
    with pytest.raises(experiment.SpecError, match="apply to npz:PATH tasks only"):
        experiment.check_spec({**experiment.make_spec("split_mnist"), "stream_options": {"classes_per_task": 5}})
    with pytest.raises(experiment.SpecError, match="stream_options has no option order"):
        experiment.make_spec("npz:d.npz", stream_options={"order": [1]})


# ----- the command line and every stream feature -----
def test_cli_trains_on_an_npz_file_with_validation_and_the_report_reads_it(tmp_path):
    task = save(tmp_path / "mine.npz", **dict(zip(("x_train", "y_train", "x_test", "y_test"),
                                                   blobs(labels=(3, 1, 4, 0, 2, 5)))))
    out = tmp_path / "run"
    code = train.main(["--task", task, "--classes-per-task", "3", "--class-order", "3", "1", "4", "0", "2", "5",
                       "--validation", "0.25", "--out", str(out)] + NET)
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["spec"]["stream_options"] == {"classes_per_task": 3, "class_order": [3, 1, 4, 0, 2, 5]}
    (run,) = results["runs"]
    assert run["validation_split"]["validation_counts"] == [9, 9] and len(run["accuracy_matrix"]) == 2
    assert len(run["val_accuracy_matrix"][1]) == 2 and "val_final_average_accuracy" in run
    assert (out / "checkpoints" / "seed0.ckpt").exists()
    assert report.main([str(out), "--out", str(tmp_path / "report")]) == 0
    assert "npz" in (tmp_path / "report" / "table.md").read_text()


def test_the_sweep_runs_on_an_npz_file_and_its_final_runs_keep_the_class_order(tmp_path):
    task = save(tmp_path / "mine.npz", **dict(zip(("x_train", "y_train", "x_test", "y_test"),
                                                   blobs(labels=(3, 1, 4, 0, 2, 5)))))
    out = tmp_path / "sweep"
    argv = ["--task", task, "--classes-per-task", "3", "--class-order", "3", "1", "4", "0", "2", "5",
            "--search", "lr=choice:0.01,0.05", "--grid", "--seeds", "0", "--validation", "0.25", "--workers", "1",
            "--final-seeds", "0", "--out", str(out), "--hidden", "20", "--set", "connections=40,12", "--set",
            "selected=8", "--set", "reserved=2", "--set", "epochs=2", "--set", "batch_size=16", "--quiet"]
    assert sweep.main(argv) == 0
    assert len((out / "trials.csv").read_text().splitlines()) == 3  # header and one row per trial
    final = json.loads((out / "final" / "results.json").read_text())
    assert final["spec"]["stream_options"] == {"classes_per_task": 3, "class_order": [3, 1, 4, 0, 2, 5]}
    assert final["spec"]["task"] == task and len(final["runs"][0]["accuracy_matrix"]) == 2


def test_cli_trains_on_float_features(tmp_path):
    arrays = dict(zip(("x_train", "y_train", "x_test", "y_test"), blobs(float_features=True)))
    out = tmp_path / "run"
    assert train.main(["--task", save(tmp_path / "f.npz", **arrays), "--out", str(out)] + NET) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["input_mean"] == 0.0 and len(results["runs"][0]["accuracy_matrix"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["--task", "split_mnist", "--classes-per-task", "2"], "--classes-per-task apply to npz:PATH tasks only"),
    (["--task", "mnist"], "unknown task 'mnist'"),
    (["--task", "NPZ", "--classes-per-task", "3"], "4 classes cannot be split into tasks of 3 classes"),
    (["--task", "NPZ", "--class-order", "0", "1", "2", "7"], "class_order holds [7], which are not classes of"),
    (["--task", "npz:"], "names no file"),
])
def test_cli_names_the_problem(tmp_path, capsys, argv, message):
    task = save(tmp_path / "d.npz", **dict(zip(("x_train", "y_train", "x_test", "y_test"), blobs())))
    argv = [task if a == "NPZ" else a for a in argv]
    assert exit_code(argv + ["--out", str(tmp_path / "run")] + NET) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "results.json").exists()


def exit_code(argv):
    """``train.main``'s exit code, also when argparse exits."""
    try:
        return train.main(argv)
    except SystemExit as stop:
        return stop.code
