"""Kill a CLI run mid-task, resume it, and get the numbers of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import interrupt_after, results_without_time, write_tiny_dataset

from spacenet_np import checkpoint, train
from spacenet_np.streams import get_stream, stream_fingerprint

ARGS = ["--task", "split_mnist", "--hidden", "30", "30", "--connections", "300", "50", "20", "--selected", "10", "10",
        "--reserved", "4", "4", "--epochs", "2", "--batch-size", "16", "--seeds", "0", "1", "--quiet"]


@pytest.fixture
def data_dir(tmp_path):
    write_tiny_dataset(tmp_path / "data", "mnist", n_train=300, n_test=100)
    return tmp_path / "data"


@pytest.mark.parametrize("method", ["spacenet", "rehearsal", "ewc"])
def test_interrupted_run_resumes_to_identical_results(data_dir, tmp_path, monkeypatch, method):
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ARGS + ["--method", method, "--data-dir", str(data_dir)]
    assert train.main(args + ["--out", str(full)]) == 0

    resume_batches = interrupt_after(monkeypatch, tasks=3, seed=1)  # in task 4 of seed 1
    monkeypatch.setattr(train.Progress, "start_epoch", lambda self, *a: None)
    assert train.main(args + ["--out", str(cut)]) == 130
    partial = json.loads((cut / "results.json").read_text())  # seed 0 finished before the interrupt
    assert not partial["complete"] and [r["seed"] for r in partial["runs"]] == [0]
    assert checkpoint.load(cut / "checkpoints" / "seed1.ckpt").tasks_learned == 3
    resume_batches()
    assert train.main(["--resume", str(cut)]) == 0
    assert results_without_time(cut) == results_without_time(full)


def test_killed_process_resumes_to_identical_results(data_dir, tmp_path):
    """A real SIGKILL of the CLI process after its first checkpoint, then --resume."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ARGS + ["--data-dir", str(data_dir), "--epochs", "6"]
    assert train.main(args + ["--out", str(full)]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-m", "spacenet_np.train", *args, "--out", str(cut)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = cut / "checkpoints" / "seed0.ckpt"
    deadline = time.monotonic() + 120
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first.exists(), "the run ended or timed out before its first checkpoint"
    if (cut / "results.json").exists():
        pytest.skip("the process finished before it could be killed (machine too fast for this data size)")
    assert train.main(["--resume", str(cut)]) == 0
    assert results_without_time(cut) == results_without_time(full)


def test_resume_needs_a_run_folder(tmp_path, capsys):
    assert train.main(["--resume", str(tmp_path)]) == 2
    assert "run.json not found" in capsys.readouterr().err


def test_checkpoints_hold_the_fingerprint_of_the_stream_they_trained_on(data_dir, tmp_path):
    """The fingerprint is hashed in a thread while the first task trains (``experiment.fingerprint_soon``); what
    the checkpoint records is the stream's own ``stream_fingerprint``."""
    assert train.main(ARGS + ["--data-dir", str(data_dir), "--seeds", "0", "--out", str(tmp_path / "run")]) == 0
    saved = checkpoint.load(tmp_path / "run" / "checkpoints" / "seed0.ckpt")
    assert saved.progress["stream_fingerprint"] == stream_fingerprint(get_stream("split_mnist", data_dir))
