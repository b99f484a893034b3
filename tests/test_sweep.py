"""The sweep on a tiny generated MNIST of Gaussian blobs, through real Dask clusters (local processes, and a
``dask scheduler`` + ``dask worker`` started as subprocesses): search-spec refusals, determinism whatever the
workers, resume after Ctrl-C, refusals of another sweep's folder, failed runs, best.json, final runs, report."""
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import idx_bytes, make_blobs, write_gz

from spacenet_np import sweep
from spacenet_np.data import FILES
from spacenet_np.sweep import SweepError, make_plan
from spacenet_np.sweep_report import report_sweep

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--task", "split_mnist", "--hidden", "30", "30", "--set", "connections=300,50,20", "--set", "selected=10",
         "--set", "reserved=4", "--set", "epochs=20", "--set", "batch_size=16", "--quiet"]
SEARCH = ["--search", "lr=loguniform:0.005:0.2", "--search", "rewire_ratio=uniform:0.05:0.5",
          "--search", "selected.0=choice:8,10,12", "--trials", "4", "--seeds", "0", "1"]


def write_blob_mnist(root, per_train=40, per_test=10):
    """MNIST files of learnable class blobs under ``root/mnist`` (40 training, 10 test images per digit)."""
    x_train, y_train = make_blobs(10, 784, per_train, seed=1, spread=60.0, centre_seed=0)
    x_test, y_test = make_blobs(10, 784, per_test, seed=2, spread=60.0, centre_seed=0)
    arrays = (x_train.reshape(-1, 28, 28), y_train.astype(np.uint8), x_test.reshape(-1, 28, 28),
              y_test.astype(np.uint8))
    for name, array in zip(FILES, arrays):
        write_gz(root / "mnist" / name, idx_bytes(array))
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_blob_mnist(tmp_path_factory.mktemp("data"))


def sweep_args(data_dir, out, *extra):
    return [*SMALL, *SEARCH, "--data-dir", str(data_dir), "--out", str(out), *extra]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_time(rows):
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in rows]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The sweep run uninterrupted on a local cluster of one worker process."""
    out = tmp_path_factory.mktemp("reference") / "sweep"
    assert sweep.main(sweep_args(data_dir, out, "--workers", "1")) == 0
    return out


# ----- the search spec -----
def plan(*searches, **kwargs):
    kwargs.setdefault("trials", 3)
    return make_plan("split_mnist", "spacenet", list(searches), hidden=[30, 30], **kwargs)


@pytest.mark.parametrize("search, problem", [
    ("foo=uniform:0.1:0.2", r"unknown name 'foo'.*known names: .*lr.*selected.*NAME\.i"),
    ("ewc_lambda=uniform:1:2", r"unknown name 'ewc_lambda' for --method spacenet \(ewc_lambda is an option of "
                               r"--method ewc\)"),
    ("lr=uniform:0.2:0.1", r"LO 0\.2 must be < HI 0\.1"),
    ("epochs=int:3:3", r"LO 3 must be < HI 3"),
    ("lr=loguniform:0:0.1", r"loguniform needs LO > 0, got 0"),
    ("rewire_ratio=loguniform:-0.1:0.5", r"loguniform needs LO > 0"),
    ("selected=choice:", r"empty choice"),
    ("selected=choice:8,,12", r"empty value"),
    ("selected=choice:8,8", r"repeats the value 8"),
    ("selected=choice:0,8", r"selected_neurons=0 must be >= 1"),
    ("rewire_ratio=uniform:0.5:1", r"rewire_ratio=1\.0 must be >= 0 and < 1"),
    ("lr=uniform:0:0.1", r"lr=0\.0 must be > 0"),
    ("init_fan=choice:layer,wide", r"init_fan='wide' must be one of"),
    ("lr=int:1:3", r"int does not fit lr"),
    ("epochs=uniform:1:3", r"uniform does not fit epochs"),
    ("connections=uniform:0.1:2", r"LO and HI must be in \(0, 1\)"),
    ("selected.2=choice:8", r"layer index '2' must be an integer in \[0, 1\]"),
    ("lr.0=choice:0.1", r"lr is one value, not one per layer"),
    ("lr=normal:0:1", r"unknown distribution 'normal'"),
    ("lr=uniform:0.1", r"expected uniform:LO:HI"),
    ("lr=uniform:a:0.1", r"LO 'a' is not a number"),
    ("lr", r"expected NAME=DIST"),
])
def test_bad_search_spec_is_refused_naming_the_problem(search, problem):
    with pytest.raises(SweepError, match=problem):
        plan(search)


@pytest.mark.parametrize("searches, sets, problem", [
    (["lr=uniform:0.01:0.1", "lr=choice:0.05"], [], r"--search lr and --search lr both set lr"),
    (["selected=choice:8", "selected_neurons.1=choice:8"], [], r"both set selected_neurons"),
    (["lr=uniform:0.01:0.1"], ["lr=0.05"], r"--search lr replaces --set lr"),
    (["lr=uniform:0.01:0.1"], ["selected=10", "selected.1=8"], r"--set selected and --set selected\.1"),
    (["lr=uniform:0.01:0.1"], ["reserved=4,4,4"], r"3 values given; reserved takes one value, or 2"),
    (["lr=uniform:0.01:0.1"], ["rewire_ratio=2"], r"rewire_ratio=2\.0 must be >= 0 and < 1"),
])
def test_conflicting_names_are_refused(searches, sets, problem):
    with pytest.raises(SweepError, match=problem):
        plan(*searches, sets=sets)


def test_cli_refusal_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    code = sweep.main([*SMALL, "--search", "lr=loguniform:0:0.1", "--trials", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: --search lr=loguniform:0:0.1: loguniform needs LO > 0") and err.count("\n") == 1
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_info:
        sweep.main([*SMALL, "--search", "lr=uniform:0.01:0.1", "--trials", "two"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_trials_come_from_the_sweep_seed_only():
    searches = ("lr=loguniform:0.003:0.1", "epochs=int:1:3", "selected=choice:8,all,12")
    a, b = plan(*searches, trials=5), plan(*searches, trials=5)
    assert a.values == b.values and a.runs == b.runs
    assert plan(*searches, trials=3).values == a.values[:3]  # trial i does not depend on the number of trials
    assert plan(*searches, trials=5, sweep_seed=1).values != a.values
    for lr, epochs, selected in a.values:
        assert 0.003 <= lr <= 0.1 and epochs in (1, 2, 3) and selected in (8, None, 12)
    assert a.spec(2, 0)["config"]["lr"] == a.values[2][0]


def test_grid_is_the_full_product_and_values_reach_the_spec():
    p = plan("selected.0=choice:8,12", "epochs=int:1:2", sets=["selected=10", "reserved=3"], trials=None, grid=True)
    assert p.values == [(8, 1), (8, 2), (12, 1), (12, 2)]
    spec = p.spec(3, 7)
    assert spec["seed"] == 7 and spec["config"]["selected_neurons"] == [12, 10]
    assert spec["config"]["reserved_neurons"] == [3, 3] and spec["config"]["epochs"] == 2
    with pytest.raises(SweepError, match="--grid needs choice or int dimensions; lr is uniform"):
        plan("lr=uniform:0.01:0.1", trials=None, grid=True)


# ----- running sweeps -----
def test_workers_do_not_change_the_rows_and_a_rerun_skips_everything(reference, data_dir, tmp_path, capsys):
    out = tmp_path / "two"
    assert sweep.main(sweep_args(data_dir, out, "--workers", "2")) == 0
    rows = read_csv(out / "trials.csv")
    assert [(r["trial"], r["seed"]) for r in rows] == [(str(t), str(s)) for t in range(4) for s in (0, 1)]
    assert without_time(rows) == without_time(read_csv(reference / "trials.csv"))
    assert all(r["status"] == "ok" and float(r["wall_time_s"]) > 0 for r in rows)
    assert len({r["val_final_average_accuracy"] for r in rows}) > 1  # the trials differ
    before = (out / "trials.csv").read_bytes()
    capsys.readouterr()
    assert sweep.main(sweep_args(data_dir, out, "--workers", "2")) == 0
    assert "8 done, 0 to run" in capsys.readouterr().out
    assert (out / "trials.csv").read_bytes() == before


def default_sigint():
    """In the child: Ctrl-C's default action, even when this test runs in a background job of a shell without job
    control (which starts everything with SIGINT ignored, and an ignored SIGINT is inherited)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupted_sweep_resumes_to_the_same_rows(reference, data_dir, tmp_path):
    out = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "spacenet_np.sweep", *sweep_args(data_dir, out, "--workers",
                                                                                       "1")],
                               env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 60
        while not ((out / "trials.csv").exists() and len(read_csv(out / "trials.csv")) >= 1):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole process group
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err.decode()
    assert "interrupted" in err.decode() and "Traceback" not in err.decode()
    partial = read_csv(out / "trials.csv")
    expected = without_time(read_csv(reference / "trials.csv"))
    assert 1 <= len(partial) < 8
    assert without_time(partial) == [row for row in expected if row in without_time(partial)]
    assert sweep.main(sweep_args(data_dir, out, "--workers", "2")) == 0
    assert without_time(read_csv(out / "trials.csv")) == expected


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sweep_on_a_dask_scheduler_and_worker(reference, data_dir, tmp_path):
    from distributed import Client
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    logs = [open(tmp_path / name, "wb") for name in ("scheduler.log", "worker.log")]
    commands = [[sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                 "--no-dashboard"],
                [sys.executable, "-m", "dask", "worker", address, "--nworkers", "1", "--nthreads", "1",
                 "--no-dashboard", "--memory-limit", "0"]]
    processes = []
    try:
        for command, log in zip(commands, logs):
            processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True))
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(1, timeout=60)
        out = tmp_path / "cluster"
        assert sweep.main(sweep_args(data_dir, out, "--scheduler", address)) == 0
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in logs:
            log.close()
    assert without_time(read_csv(out / "trials.csv")) == without_time(read_csv(reference / "trials.csv"))
    assert not (out / "checkpoints").exists()  # no checkpoints by default on a cluster


def test_another_sweep_into_the_same_folder_is_refused(reference, data_dir, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    args = sweep_args(data_dir, out)
    args[args.index("--trials") + 1] = "5"
    assert sweep.main([*args, "--sweep-seed", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} holds another sweep; differs: ") and err.count("\n") == 1
    assert "sweep_seed: 0 in OUT, 3 here" in err and "trials: 4 in OUT, 5 here" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    other = tmp_path / "run"
    other.mkdir()
    (other / "results.json").write_text("{}")
    assert sweep.main(sweep_args(data_dir, other)) == 2
    assert "holds files that are not a sweep's (results.json)" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["results.json"]


def test_best_json_is_the_best_validation_mean(reference):
    rows = read_csv(reference / "trials.csv")
    assert not any("val" not in column and "accuracy" in column for column in rows[0])  # no test accuracy
    means = {t: np.mean([float(r["val_final_average_accuracy"]) for r in rows if r["trial"] == str(t)])
             for t in range(4)}
    best = json.loads((reference / "best.json").read_text())
    assert best["trial"] == min(means, key=lambda t: (-means[t], t))
    assert best["val_final_average_accuracy_mean"] == pytest.approx(means[best["trial"]])
    trial_rows = [r for r in rows if r["trial"] == str(best["trial"])]
    assert best["val_final_average_accuracy_std"] == pytest.approx(
        np.std([float(r["val_final_average_accuracy"]) for r in trial_rows]))
    assert best["n_seeds"] == 2 and best["std_ddof"] == 0
    assert best["spec"]["config"]["lr"] == best["params"]["lr"] == float(trial_rows[0]["lr"])
    assert best["spec"]["config"]["selected_neurons"] == [best["params"]["selected.0"], 10]


def test_failed_run_is_recorded_and_final_seeds_evaluate_the_best(data_dir, tmp_path, capsys):
    out = tmp_path / "fails"
    args = [*SMALL, "--search", "lr=choice:0.05,1e30", "--grid", "--seeds", "0", "--data-dir", str(data_dir),
            "--out", str(out), "--workers", "1"]
    assert sweep.main([*args, "--final-seeds", "0", "1"]) == 0
    rows = read_csv(out / "trials.csv")
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert rows[1]["error"].startswith("TrainingDiverged: the training loss became nan")
    assert rows[1]["val_final_average_accuracy"] == ""
    best = json.loads((out / "best.json").read_text())
    assert best["trial"] == 0
    results = json.loads((out / "final" / "results.json").read_text())
    assert [r["seed"] for r in results["runs"]] == [0, 1]
    finals = [r["final_average_accuracy"] for r in results["runs"]]
    assert results["mean_final_average_accuracy"] == pytest.approx(np.mean(finals))
    assert results["std_final_average_accuracy"] == pytest.approx(np.std(finals))
    assert {**results["spec"], "data_dir": None} == {**best["spec"], "data_dir": None}
    # same spec and seed as the trial's run: the same validation accuracy, through the train CLI
    assert results["runs"][0]["val_final_average_accuracy"] == float(rows[0]["val_final_average_accuracy"])
    capsys.readouterr()
    assert sweep.main([*args, "--final-seeds", "0", "1"]) == 0  # a diverged run fails the same way: not rerun
    printed = capsys.readouterr().out
    assert "2 done, 0 to run" in printed and "final runs already in" in printed
    assert sweep.main([*args, "--retry-failed"]) == 0
    assert "1 done, 1 to run" in capsys.readouterr().out
    assert read_csv(out / "trials.csv")[1]["status"] == "failed"


def test_report_of_a_sweep_folder(reference, tmp_path):
    written = report_sweep(reference, tmp_path / "report")
    names = sorted(p.name for p in written)
    assert names == ["sweep_lr.png", "sweep_rewire_ratio.png", "sweep_selected.0.png", "sweep_table.md"]
    assert all(p.stat().st_size > 0 for p in written)
    table = (tmp_path / "report" / "sweep_table.md").read_text()
    best = json.loads((reference / "best.json").read_text())
    first_row = next(line for line in table.splitlines() if line.startswith("| 1 |"))
    assert first_row.startswith(f"| 1 | {best['trial']} |")
    assert "ddof=0" in table and "8 of 8 runs finished, 0 failed" in table
    not_sweep = tmp_path / "run"
    not_sweep.mkdir()
    (not_sweep / "results.json").write_text("{}")
    with pytest.raises(SweepError, match="holds no sweep.json"):
        report_sweep(not_sweep, tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_the_report_command_understands_a_sweep_folder(reference, tmp_path, capsys):
    from spacenet_np import report
    assert report.main([str(reference), "--out", str(tmp_path / "report"), "--top", "2"]) == 0
    table = (tmp_path / "report" / "sweep_table.md").read_text()
    assert sum(line.startswith("| ") and line[2].isdigit() for line in table.splitlines()) == 2  # the top 2
    assert str(tmp_path / "report" / "sweep_lr.png") in capsys.readouterr().out
