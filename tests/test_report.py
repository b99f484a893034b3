"""The snapshot recorder (learner observer) and the report: shapes, values, round trip, tables, figures."""
import json

import numpy as np
import pytest
from helpers import connection_table, make_blobs, task_split, tiny_config, write_tiny_dataset

from spacenet_np import experiment, metrics, train
from spacenet_np.layers import FREE
from spacenet_np.network import SparseMLP
from spacenet_np.recorder import Recorder, probe_set
from spacenet_np.spacenet import SpaceNet, StaticSparseNN
from spacenet_np.strategy import Learner, TaskState
from spacenet_np.streams import get_stream

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ([0, 1], [2, 3], [4, 5])


def two_hidden_config(**overrides):
    values = dict(connections_per_task=(120, 60, 20), selected_neurons=(12, 10), reserved_neurons=(4, 3))
    values.update(overrides)
    return tiny_config(**values)


def blobs():
    x, y = make_blobs(6, 16, 30, seed=0)
    xt, yt = make_blobs(6, 16, 6, seed=1, centre_seed=0)
    return x, y, xt, yt


def learn_all(learner, x, y):
    for classes in CLASSES:
        learner.learn(*task_split(x, y, classes), classes)


@pytest.fixture
def recorded():
    x, y, xt, yt = blobs()
    model = SparseMLP(16, [40, 30], 6)
    learner = SpaceNet(model, two_hidden_config(), seed=3)
    recorder = Recorder(xt, yt)
    learner.observers.append(recorder)
    learn_all(learner, x, y)
    return learner, recorder, xt, yt


def test_connection_snapshots_match_the_network(recorded):
    learner, recorder, _, _ = recorded
    model, cfg = learner.model, learner.config
    assert recorder.tasks == [0, 1, 2] and recorder.method == "spacenet" and recorder.sizes == [16, 40, 30, 6]
    for t, classes in enumerate(CLASSES):
        np.testing.assert_array_equal(recorder.classes(t), classes)
        for when in ("begin", "end"):
            pixels = recorder.pixel_counts(t, when)
            assert pixels.shape == (16,) and pixels.dtype == np.int32
            assert pixels.sum() == cfg.connections_per_task[0]  # allocation and rewiring keep the count
            pairs = recorder.pairs(t, when)
            assert pairs.shape == (cfg.connections_per_task[1], 2)
            assert len({tuple(p) for p in pairs.tolist()}) == pairs.shape[0]
            total, n_out, n_in = recorder.touched(t, when)
            assert total == pairs.shape[0]
            assert (n_out, n_in) == (np.unique(pairs[:, 0]).size, np.unique(pairs[:, 1]).size)
            assert n_out <= cfg.selected_neurons[1] and n_in <= cfg.selected_neurons[0]
        # a finished task's hidden connections never change, so the final network still holds them
        layer1 = {(o, i) for (owner, o, i) in connection_table(model, 1) if owner == t}
        assert {tuple(p) for p in recorder.pairs(t, "end").tolist()} == layer1
        layer0 = [i for (owner, _, i) in connection_table(model, 0) if owner == t]
        np.testing.assert_array_equal(recorder.pixel_counts(t, "end"), np.bincount(layer0, minlength=16))
    # rewiring moved some connections between allocation and the end of the task
    assert any({tuple(p) for p in recorder.pairs(t, "begin").tolist()}
               != {tuple(p) for p in recorder.pairs(t, "end").tolist()} for t in range(3))


def test_neuron_status_adds_up_and_matches_the_index(recorded):
    learner, recorder, _, _ = recorded
    cfg = learner.config
    for t in range(3):
        status = recorder.neuron_status(t)
        assert status.shape == (2, 4)
        for h, (width, reserved, shared, unused) in enumerate(status):
            assert width == learner.model.sizes[h + 1]
            assert reserved + shared + unused == width
            assert reserved == (t + 1) * cfg.reserved_neurons[h]
            assert shared >= 0 and unused >= 0
    for h, neurons in enumerate(learner.model.neurons[1:-1]):
        width, reserved, shared, unused = recorder.neuron_status(2)[h]
        assert reserved == np.count_nonzero(neurons.reserved_by != FREE)
        assert shared == neurons.n_slots - reserved and unused == neurons.width - neurons.n_slots


def dense_hidden_activations(model, x):
    """ReLU(W x + b) per hidden layer with dense NumPy weights over slots (every slotted neuron)."""
    out = []
    for layer in model.layers[:-1]:
        x = np.maximum(layer.W.toarray() @ x + layer.bias[:, None], 0.0)
        out.append(x)
    return out


def test_activations_are_the_hidden_layers_of_the_probes(recorded):
    learner, recorder, xt, yt = recorded
    np.testing.assert_array_equal(recorder.probe_labels, yt)
    reference = dense_hidden_activations(learner.model, learner.input_batch(xt, np.arange(xt.shape[0])))
    for h, neurons in enumerate(learner.model.neurons[1:-1]):
        ids, acts, reserved_by = recorder.activations(2, h)
        np.testing.assert_array_equal(ids, neurons.slot_ids)
        np.testing.assert_array_equal(reserved_by, neurons.reserved_by)
        assert acts.shape == (neurons.n_slots, xt.shape[0]) and acts.dtype == np.float32
        np.testing.assert_allclose(acts, reference[h], rtol=1e-5, atol=1e-5)
        assert np.all(acts >= 0) and np.any(acts > 0)
        first_ids, first_acts, _ = recorder.activations(0, h)  # after task 1: only its selected neurons
        assert first_ids.size == learner.config.selected_neurons[h] == first_acts.shape[0]


def test_activations_include_neurons_that_do_not_reach_the_output():
    """The forward pass may skip dead-end neurons; the recorder still gives their activation."""
    x, y, xt, yt = blobs()
    learner = SpaceNet(SparseMLP(16, [40, 30], 6), two_hidden_config(), seed=3)
    recorder = Recorder(xt, yt)
    learner.observers.append(recorder)
    learn_all(learner, x, y)
    model = learner.model
    first, second = model.layers[0], model.layers[1]
    dead = np.setdiff1d(np.unique(first.rows), second.indices)  # inputs, but no outgoing connection
    if dead.size == 0:  # make one: take a neuron's outgoing connections out of the network
        slot = int(np.unique(first.rows)[0])
        second.remove_connections(np.flatnonzero(second.indices == slot))
        dead = np.array([slot])
    model.neurons[1].bias[dead] = 1.0  # so that its activation is positive for every sample
    recorder.task_end(learner, TaskState(task=2, classes=np.array(CLASSES[2])))
    _, acts, _ = recorder.activations(2, 0)
    reference = dense_hidden_activations(model, learner.input_batch(xt, np.arange(xt.shape[0])))[0]
    np.testing.assert_allclose(acts[dead], reference[dead], rtol=1e-5, atol=1e-5)
    assert np.all(acts[dead] > 0)


def test_save_load_round_trip(recorded, tmp_path):
    _, recorder, _, _ = recorded
    path = tmp_path / "snapshots" / "seed3.npz"
    recorder.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["seed3.npz"]  # no temporary file left
    loaded = Recorder.load(path)
    assert set(loaded.arrays) == set(recorder.arrays)
    for key, value in recorder.arrays.items():
        np.testing.assert_array_equal(loaded.arrays[key], value)
        assert loaded.arrays[key].dtype == value.dtype
    assert loaded.tasks == recorder.tasks and loaded.method == "spacenet"
    assert loaded.touched(1, "begin") == recorder.touched(1, "begin")
    with np.load(path, allow_pickle=False) as data:  # readable without pickle
        assert "t0_status" in data.files


@pytest.mark.parametrize("method", [SpaceNet, StaticSparseNN])
def test_recording_does_not_change_the_run(method):
    x, y, xt, yt = blobs()
    finals = []
    for record in (False, True):
        learner = method(SparseMLP(16, [40, 30], 6), two_hidden_config(), seed=5)
        if record:
            learner.observers.append(Recorder(xt, yt))
        learn_all(learner, x, y)
        finals.append((learner.predict(xt), [layer.weights.copy() for layer in learner.model.layers]))
    np.testing.assert_array_equal(finals[0][0], finals[1][0])
    for a, b in zip(finals[0][1], finals[1][1]):
        np.testing.assert_array_equal(a, b)


class DenseLearner(Learner):
    """A learner without SpaceNet's fields: one dense network owned by task 0, trained on every task."""

    name = "dense"

    def begin_task(self, classes):
        if self.tasks_learned == 0:
            for neurons in self.model.neurons[1:-1]:
                neurons.slots_for(np.arange(neurons.width))
            for layer in self.model.layers:
                layer.resize_to_indices()
                rows, cols = np.meshgrid(np.arange(layer.out_index.n_slots),
                                         np.arange(layer.in_index.n_slots), indexing="ij")
                layer.add_connections(rows.ravel(), cols.ravel(),
                                      self.rng.normal(0, 0.1, rows.size).astype(np.float32), 0)
        self.trainable = [np.arange(layer.nnz) for layer in self.model.layers]
        self.bias_trainable = [np.ones(n.n_slots, np.float32) for n in self.model.neurons[1:]]
        return TaskState(task=self.tasks_learned, classes=classes)


def test_recorder_works_for_a_learner_without_spacenet_fields():
    x, y, xt, yt = blobs()
    learner = DenseLearner(SparseMLP(16, [40, 30], 6), two_hidden_config(), seed=0)
    recorder = Recorder(xt, yt, max_pairs=500)
    learner.observers.append(recorder)
    learn_all(learner, x, y)
    assert recorder.method == "dense" and recorder.tasks == [0, 1, 2]
    assert recorder.pairs(0, "end").shape == (500, 2)  # subsampled, exact totals kept
    assert recorder.touched(0, "end") == (40 * 30, 30, 40)
    np.testing.assert_array_equal(recorder.pixel_counts(0, "end"), np.full(16, 40))
    assert recorder.pairs(1, "end").shape == (0, 2) and recorder.pixel_counts(2, "begin").sum() == 0
    np.testing.assert_array_equal(recorder.neuron_status(2), [[40, 0, 40, 0], [30, 0, 30, 0]])
    assert recorder.activations(1, 0)[1].shape == (40, xt.shape[0])


def test_recorder_without_probes_skips_activations():
    x, y, _, _ = blobs()
    learner = SpaceNet(SparseMLP(16, [40, 30], 6), two_hidden_config(), seed=0)
    recorder = Recorder()
    learner.observers.append(recorder)
    learn_all(learner, x, y)
    assert recorder.tasks == [0, 1, 2] and not recorder.has("t0_act0") and recorder.probe_labels is None


# ----- the report -----
SMALL = ["--hidden", "30", "30", "--connections", "300", "50", "20", "--selected", "10", "10",
         "--reserved", "4", "4", "--epochs", "2", "--batch-size", "16", "--quiet"]


def write_snapshots(run_dir, data_dir):
    """Re-run each seed of a CLI run with a Recorder attached (as run_seed will) and save its snapshots."""
    results = json.loads((run_dir / "results.json").read_text())
    config = experiment.build_config(train.base_spec(train.parse_args(["--task", "split_mnist", *SMALL])))
    stream = get_stream("split_mnist", data_dir)
    probes = probe_set(stream.tasks, per_task=6)
    for run in results["runs"]:
        model = SparseMLP(stream.n_features, [30, 30], stream.n_classes)
        learner = train.METHODS[results["method"]](model, config, seed=run["seed"], input_mean=stream.mean,
                                                   input_std=stream.std)
        recorder = Recorder(*probes)
        learner.observers.append(recorder)
        for task in stream.tasks:
            learner.learn(task.x_train, task.y_train, task.classes)
        assert learner.predict(stream.tasks[0].x_test).shape == stream.tasks[0].y_test.shape
        recorder.save(run_dir / "snapshots" / f"seed{run['seed']}.npz")


def hand_results(method, finals, task="split_mnist"):
    """A results.json dict whose runs have constant accuracy matrices with the given final averages."""
    runs = []
    for seed, final in enumerate(finals):
        matrix = [[float(final)] * (i + 1) for i in range(5)]
        runs.append({"seed": seed, "accuracy_matrix": matrix, **metrics.run_metrics(matrix),
                     "wall_time_s": 1.0, "parameter_count": 1000, "model_size_bytes": 2048})
    return {"task": task, "method": method, "config": {"hidden": [30, 30]}, "runs": runs,
            "mean_final_average_accuracy": float(np.mean(finals)),
            "std_final_average_accuracy": float(np.std(finals))}


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    pytest.importorskip("matplotlib")
    root = tmp_path_factory.mktemp("report")
    write_tiny_dataset(root / "data", "mnist", n_train=200, n_test=100)
    dirs = {}
    for method in ("spacenet", "static"):
        dirs[method] = root / method
        assert train.main(["--task", "split_mnist", "--data-dir", str(root / "data"),
                           "--out", str(dirs[method]), "--method", method, "--seeds", "0", "1", *SMALL]) == 0
        write_snapshots(dirs[method], root / "data")
    dirs["ewc"] = root / "ewc"
    dirs["ewc"].mkdir()
    (dirs["ewc"] / "results.json").write_text(json.dumps(hand_results("ewc", [20.0, 22.0])))
    return root, dirs


def table_row(text, name):
    rows = [line for line in text.splitlines() if line.startswith(f"| {name} |")]
    assert rows, f"no row for {name} in table.md"
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_report_writes_table_and_every_figure(run_dirs, capsys):
    from spacenet_np import report
    root, dirs = run_dirs
    out = root / "out"
    assert report.main([str(dirs["spacenet"]), str(dirs["static"]), str(dirs["ewc"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = (out / "table.md").read_text()
    for method, name in (("spacenet", "SpaceNet"), ("static", "Static-SparseNN")):
        results = json.loads((dirs[method] / "results.json").read_text())
        finals = [r["final_average_accuracy"] for r in results["runs"]]
        row = table_row(table, name)
        assert row[1] == f"{np.mean(finals):.2f} ± {np.std(finals):.2f}" and row[2] == "2"
        assert row[-3:] == ["No", "No", "No"]
    ewc = table_row(table, "EWC")
    assert ewc[1:4] == ["21.00 ± 1.00", "2", "20.01 ± 0.06"] and ewc[-3:] == ["No", "No", "No"]
    assert table_row(table, "SpaceNet")[3] == "75.53 ± 1.82"
    assert ewc[8] == "2.0"  # model size in KB
    names = ["table.md", "per_task_accuracy_split_mnist.png", "connection_distribution_split_mnist.png",
             "input_connections_split_mnist.png", "activations_split_mnist.png",
             "neuron_usage_split_mnist.png"]
    names += [f"accuracy_matrix_split_mnist_{m}.png" for m in ("spacenet", "static", "ewc")]
    for name in names:
        path = out / name
        assert path.is_file() and str(path) in printed
        if name.endswith(".png"):
            data = path.read_bytes()
            assert data.startswith(PNG_MAGIC) and len(data) > 2000
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # nothing else, no temporary files
    assert "no snapshots" in printed and str(dirs["ewc"]) in printed  # the ewc run's figures are skipped
    assert "in / " in printed and "neurons" in printed  # Fig. 5 summary: neurons touched before/after


def test_report_without_snapshots_skips_the_analysis_figures(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from spacenet_np import report
    for method, finals in (("spacenet", [70.0, 72.0, 74.0]), ("rehearsal", [90.0])):
        (tmp_path / method).mkdir()
        (tmp_path / method / "results.json").write_text(
            json.dumps(hand_results(method, finals, task="split_fashion_mnist")))
    dirs = [str(tmp_path / "spacenet"), str(tmp_path / "rehearsal")]
    assert report.main([*dirs, "--out", str(tmp_path / "o")]) == 0
    assert "no SpaceNet run with snapshots" in capsys.readouterr().out
    table = (tmp_path / "o" / "table.md").read_text()
    assert table_row(table, "SpaceNet")[1:4] == ["72.00 ± 1.63", "3", "64.83 ± 0.69"]
    assert table_row(table, "SpaceNet-Rehearsal")[1:4] == ["90.00", "1", "84.18 ± 0.24"]
    assert table_row(table, "SpaceNet-Rehearsal")[-3:] == ["Yes", "Yes", "No"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "accuracy_matrix_split_fashion_mnist_rehearsal.png",
        "accuracy_matrix_split_fashion_mnist_spacenet.png",
        "per_task_accuracy_split_fashion_mnist.png", "table.md"]


def test_run_dir_without_results_is_refused_by_name(tmp_path):
    from spacenet_np import report
    good = tmp_path / "good"
    good.mkdir()
    (good / "results.json").write_text(json.dumps(hand_results("spacenet", [70.0])))
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(SystemExit, match="not-a-run.*results.json"):
        report.main([str(good), str(empty), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


# ----- invalid inputs leave nothing behind; runs with the same folder name stay apart -----
def hand_run(folder, method, finals, task="split_fashion_mnist"):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(hand_results(method, finals, task=task)))
    return str(folder)


def bad_matrix(results):
    results["runs"][1]["accuracy_matrix"][2] = [50.0]  # row 3 with one value


def ragged_final(results):
    results["runs"][0]["final_per_task_accuracy"] = [1.0, 2.0]


def string_accuracy(results):
    results["runs"][0]["final_average_accuracy"] = "high"


@pytest.mark.parametrize("damage", [bad_matrix, ragged_final, string_accuracy])
@pytest.mark.parametrize("out_exists", [False, True])
def test_an_invalid_second_run_leaves_no_output_of_the_first(tmp_path, damage, out_exists):
    pytest.importorskip("matplotlib")
    from spacenet_np import report
    good = hand_run(tmp_path / "good", "spacenet", [70.0, 72.0])
    results = hand_results("static", [60.0, 62.0])
    damage(results)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text(json.dumps(results))
    out = tmp_path / "reports" / "o"
    if out_exists:
        out.mkdir(parents=True)
        (out / "earlier.txt").write_text("kept")
    with pytest.raises(SystemExit, match=r"bad/results\.json.*run"):
        report.main([good, str(tmp_path / "bad"), "--out", str(out)])
    if out_exists:
        assert [p.name for p in out.iterdir()] == ["earlier.txt"]
    else:
        assert not (tmp_path / "reports").exists()


def test_a_failure_while_writing_removes_what_was_written(tmp_path):
    """The per-task figure cannot take its place (a folder has its name): no table or other figure stays."""
    pytest.importorskip("matplotlib")
    from spacenet_np import report
    runs = [hand_run(tmp_path / m, m, [70.0]) for m in ("spacenet", "rehearsal")]
    out = tmp_path / "o"
    (out / "per_task_accuracy_split_fashion_mnist.png").mkdir(parents=True)
    with pytest.raises(OSError):
        report.main([*runs, "--out", str(out)])
    assert [p.name for p in out.iterdir()] == ["per_task_accuracy_split_fashion_mnist.png"]
    assert not any((out / "per_task_accuracy_split_fashion_mnist.png").iterdir())


def test_run_folders_with_the_same_name_do_not_overwrite_each_other(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from spacenet_np import report
    runs = [hand_run(tmp_path / "a" / "run", "spacenet", [70.0]), hand_run(tmp_path / "b" / "run", "spacenet", [80.0]),
            hand_run(tmp_path / "c" / "x y", "static", [50.0]), hand_run(tmp_path / "c" / "x-y", "static", [55.0])]
    out = tmp_path / "o"
    assert report.main([*runs, "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert table_row(table, "SpaceNet (a/run)")[1] == "70.00" and table_row(table, "SpaceNet (b/run)")[1] == "80.00"
    assert table_row(table, "Static-SparseNN (x y)")[1] == "50.00"
    assert table_row(table, "Static-SparseNN (x-y)")[1] == "55.00"
    matrices = sorted(p.name for p in out.glob("accuracy_matrix_*.png"))
    assert matrices == ["accuracy_matrix_split_fashion_mnist_spacenet-a-run.png",
                        "accuracy_matrix_split_fashion_mnist_spacenet-b-run.png",
                        "accuracy_matrix_split_fashion_mnist_static-x-y-2.png",  # same slug: numbered, not replaced
                        "accuracy_matrix_split_fashion_mnist_static-x-y.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(matrices + ["table.md",
                                                                       "per_task_accuracy_split_fashion_mnist.png"])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(out))]
    assert sorted(printed) == sorted(str(p) for p in out.iterdir())


def test_the_same_run_folder_twice_is_refused(tmp_path):
    from spacenet_np import report
    run = hand_run(tmp_path / "run", "spacenet", [70.0])
    with pytest.raises(SystemExit, match="given twice"):
        report.main([run, str(tmp_path / "." / "run"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
