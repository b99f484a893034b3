"""The command line on a tiny generated MNIST: results.json, determinism, refusals, divergence."""
import io
import json

import numpy as np
import pytest
from helpers import write_tiny_dataset

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


def test_impossible_hyperparameter_is_refused_by_name(data_dir, tmp_path, capsys):
    assert run_cli(data_dir, tmp_path / "out", "--reserved", "20", "4") == 2
    assert "reserved_neurons[0]=20" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_diverging_loss_writes_no_results(data_dir, tmp_path, capsys):
    assert run_cli(data_dir, tmp_path / "out", "--lr", "1e30") == 1
    assert "diverged" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()


def test_later_impossible_budget_is_refused_before_training(data_dir, tmp_path, capsys):
    # 8 of 30 neurons reserved per task: before task 4 only 6 are free for the 10 selected ones
    assert run_cli(data_dir, tmp_path / "out", "--reserved", "8", "8") == 2
    assert "selected_neurons[0]=10 exceeds the 6 free neurons left in hidden layer 0 before task 3" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before the folder was touched


def test_allocation_that_fails_by_chance_at_a_later_task_is_reported(data_dir, tmp_path, capsys):
    # 95 of the 100 positions of a 10 x 10 block: possible, unless old connections crowd the new block
    assert run_cli(data_dir, tmp_path / "out", "--connections", "300", "95", "20") == 2
    assert "connections_per_task[1]=95 exceeds the" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()


def test_missing_data_names_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("spacenet_np.data.MIRRORS", {"mnist": [], "fashion-mnist": []})
    (tmp_path / "empty").mkdir()
    assert run_cli(tmp_path / "empty", tmp_path / "out") == 1
    assert "train-images-idx3-ubyte.gz" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--epochs", "0", "epochs=0 must be >= 1"),
    ("--lr", "0", "lr=0.0 must be > 0"),
    ("--batch-size", "0", "batch_size=0 must be >= 1"),
    ("--rewire-ratio", "1", "rewire_ratio=1.0 must be >= 0 and < 1"),
    ("--validation", "1.5", "validation fraction 1.5 must be in [0, 1)"),
])
def test_every_given_value_is_used_or_refused(data_dir, tmp_path, capsys, flag, value, message):
    code = None
    try:
        code = run_cli(data_dir, tmp_path / "out", flag, value)
    except SystemExit as exit_:  # argparse refuses values the declaration rules out
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_given_zero_is_not_replaced_by_a_default(data_dir, tmp_path):
    assert run_cli(data_dir, tmp_path / "out", "--rewire-ratio", "0") == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["config"]["rewire_ratio"] == 0.0


def test_duplicate_seeds_are_refused(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(data_dir, tmp_path / "out", "--seeds", "0", "0")
    assert exit_.value.code == 2 and "repeats a seed" in capsys.readouterr().err


def test_an_option_of_another_method_is_refused(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(data_dir, tmp_path / "out", "--ewc-lambda", "10")
    assert "--ewc-lambda do not apply to --method spacenet" in capsys.readouterr().err


def test_validation_split_is_recorded(data_dir, tmp_path):
    assert run_cli(data_dir, tmp_path / "out", "--validation", "0.2") == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    run = results["runs"][0]
    split = run["validation_split"]
    assert split["fraction"] == 0.2 and sum(split["validation_counts"]) == 40  # 20 % of 200 tiny images
    assert [len(row) for row in run["val_accuracy_matrix"]] == [1, 2, 3, 4, 5]
    assert run["val_final_average_accuracy"] == pytest.approx(np.mean(run["val_accuracy_matrix"][-1]))


def test_one_value_of_a_per_layer_flag_applies_to_every_layer(data_dir, tmp_path):
    assert run_cli(data_dir, tmp_path / "out", "--selected", "12", "--reserved", "3") == 0
    config = json.loads((tmp_path / "out" / "results.json").read_text())["config"]
    assert config["selected_neurons"] == [12, 12] and config["reserved_neurons"] == [3, 3]


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, and keeps what is written to it."""

    def isatty(self):
        return True


def test_bars_only_on_a_terminal_with_the_same_numbers_either_way(data_dir, tmp_path, capsys, monkeypatch):
    """Without a terminal a run prints its task lines and no bars (an epoch then trains in one kernel call); on a
    terminal every epoch gets a bar fed batch by batch. Both give the numbers of a --quiet run."""
    shown = [arg for arg in SMALL if arg != "--quiet"]
    main = ["--task", "split_mnist", "--data-dir", str(data_dir), *shown]
    batches, report_batch = [], train.Progress.batch
    monkeypatch.setattr(train.Progress, "batch", lambda self, *a: (batches.append(a), report_batch(self, *a)))
    assert train.main([*main, "--out", str(tmp_path / "log")]) == 0
    out, err = capsys.readouterr()
    assert "task 5/5 classes [8, 9]" in out
    assert "img/s" not in err and "epoch 1/2" not in err and not batches

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert train.main([*main, "--out", str(tmp_path / "tty")]) == 0
    assert "task 5/5 epoch 2/2" in terminal.getvalue() and "img" in terminal.getvalue()
    assert len(batches) == 5 * 2 * 3  # 5 tasks x 2 epochs x 3 batches of 16 (40 training images a task)

    assert run_cli(data_dir, tmp_path / "quiet") == 0
    matrices = [json.loads((tmp_path / name / "results.json").read_text())["runs"][0]["accuracy_matrix"]
                for name in ("log", "tty", "quiet")]
    assert matrices[0] == matrices[1] == matrices[2]
