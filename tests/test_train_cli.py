"""The command line on a tiny generated MNIST: results.json, determinism, refusals, divergence."""
import json

import numpy as np
import pytest
from test_data import write_tiny_dataset

from spacenet_np import train

SMALL = ["--hidden", "30", "30", "--connections", "300", "50", "20", "--selected", "10", "10",
         "--reserved", "4", "4", "--epochs", "2", "--batch-size", "16", "--quiet"]


@pytest.fixture
def data_dir(tmp_path):
    write_tiny_dataset(tmp_path / "data", "mnist", n_train=200, n_test=100)
    return tmp_path / "data"


def run_cli(data_dir, out, *extra):
    return train.main(["--task", "split_mnist", "--data-dir", str(data_dir), "--out", str(out), *SMALL, *extra])


def test_results_json_has_every_field(data_dir, tmp_path):
    assert run_cli(data_dir, tmp_path / "out", "--seeds", "0", "1") == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["task"] == "split_mnist" and results["method"] == "spacenet"
    assert results["config"]["connections_per_task"] == [300, 50, 20]
    assert [r["seed"] for r in results["runs"]] == [0, 1]
    for run in results["runs"]:
        matrix = run["accuracy_matrix"]
        assert [len(row) for row in matrix] == [1, 2, 3, 4, 5]
        assert all(0.0 <= a <= 100.0 for row in matrix for a in row)
        assert run["final_average_accuracy"] == pytest.approx(np.mean(matrix[-1]))
        assert run["connections_per_layer"] == [5 * 300, 5 * 50, 5 * 20]
        assert run["free_neurons_per_layer"] == [30 - 5 * 4, 30 - 5 * 4]
        assert run["wall_time_s"] > 0
    finals = [r["final_average_accuracy"] for r in results["runs"]]
    assert results["mean_final_average_accuracy"] == pytest.approx(np.mean(finals))
    assert results["std_final_average_accuracy"] == pytest.approx(np.std(finals))


def test_same_seed_same_numbers(data_dir, tmp_path):
    for name in ("a", "b"):
        assert run_cli(data_dir, tmp_path / name, "--method", "static") == 0
    a, b = (json.loads((tmp_path / n / "results.json").read_text())["runs"][0] for n in ("a", "b"))
    assert a["accuracy_matrix"] == b["accuracy_matrix"]


def test_impossible_hyperparameter_is_refused_by_name(data_dir, tmp_path):
    with pytest.raises(SystemExit, match="reserved_neurons"):
        run_cli(data_dir, tmp_path / "out", "--reserved", "20", "4")
    assert not (tmp_path / "out").exists()


def test_diverging_loss_writes_no_results(data_dir, tmp_path, capsys):
    assert run_cli(data_dir, tmp_path / "out", "--lr", "1e30") == 1
    assert "diverged" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()


def test_later_impossible_allocation_is_reported(data_dir, tmp_path, capsys):
    assert run_cli(data_dir, tmp_path / "out", "--connections", "300", "95", "20") == 2
    assert "connections_per_task[1]" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()


def test_missing_data_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr("spacenet_np.data.MIRRORS", {"mnist": [], "fashion-mnist": []})
    with pytest.raises(SystemExit, match="error: .*train-images-idx3-ubyte.gz"):
        run_cli(tmp_path / "empty", tmp_path / "out")
