"""Presets: the paper's values by default, tuned values per stream and method, shown by --help and recorded."""
import json

import pytest
from helpers import write_tiny_dataset

from spacenet_np import presets, train
from spacenet_np.experiment import SpecError, make_spec

ENTRY = {("split_mnist", "static"): {"config": {"lr": 0.037, "reserved_neurons": [30, 50]}, "source": "test"}}


def test_paper_preset_is_the_default_and_follows_the_hidden_layers():
    spec = make_spec("split_mnist", hidden=[400, 400, 400])
    assert spec["preset"] == "paper"
    assert spec["config"]["connections_per_task"] == [10000, 1640, 1640, 80]
    assert spec["config"]["selected_neurons"] == [80, 80, 80] and spec["config"]["lr"] == 0.01
    cnn = make_spec("split_cifar10")
    assert cnn["config"]["reserved_neurons"] == [2, 2, 5, 6, 30] and cnn["config"]["epochs"] == 20


def test_tuned_preset_takes_the_searched_values(monkeypatch):
    monkeypatch.setattr(presets, "TUNED", ENTRY)
    spec = make_spec("split_mnist", "static", preset="tuned")
    assert spec["config"]["lr"] == 0.037 and spec["config"]["reserved_neurons"] == [30, 50]
    assert spec["config"]["connections_per_task"] == [10000, 1640, 80]  # not searched: the paper's
    given = make_spec("split_mnist", "static", preset="tuned", config={"lr": 0.5})
    assert given["config"]["lr"] == 0.5  # a value given on top of a preset wins


def test_tuned_preset_without_values_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(presets, "TUNED", ENTRY)
    with pytest.raises(SpecError, match="--preset tuned has no values for --task split_fashion_mnist --method "
                                        "static"):
        make_spec("split_fashion_mnist", "static", preset="tuned")


def test_help_prints_every_preset(monkeypatch, capsys):
    monkeypatch.setattr(presets, "TUNED", ENTRY)
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    assert "paper (mlp): hidden=[400, 400], connections_per_task=[10000, 1640, 80]" in out
    assert "tuned (--task split_mnist --method static): paper (mlp) with lr=0.037, reserved_neurons=[30, 50]" in out


def test_results_record_the_preset_values(tmp_path, monkeypatch):
    monkeypatch.setattr(presets, "TUNED", ENTRY)
    write_tiny_dataset(tmp_path / "data", "mnist", n_train=200, n_test=100)
    argv = ["--task", "split_mnist", "--method", "static", "--preset", "tuned", "--data-dir", str(tmp_path / "data"),
            "--out", str(tmp_path / "out"), "--hidden", "30", "30", "--connections", "300", "50", "20",
            "--selected", "10", "10", "--reserved", "4", "4", "--epochs", "1", "--quiet"]
    assert train.main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["preset"] == "tuned" and results["preset_values"]["config"]["lr"] == 0.037
    assert results["spec"]["config"]["lr"] == 0.037 and results["spec"]["config"]["reserved_neurons"] == [4, 4]
