"""A run folder belongs to one run; faults and signals give a message, keep the last good checkpoint, and resume
to the numbers of an uninterrupted run."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import results_without_time, write_tiny_dataset

from spacenet_np import checkpoint, train

SMALL = ["--hidden", "30", "30", "--connections", "300", "50", "20", "--selected", "10", "10",
         "--reserved", "4", "4", "--batch-size", "16", "--quiet"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_tiny_dataset(root, "mnist", n_train=300, n_test=100)
    write_tiny_dataset(root, "fashion-mnist", n_train=300, n_test=100)
    return root


def cli(data_dir, out, *extra, task="split_mnist", epochs="2"):
    return ["--task", task, "--data-dir", str(data_dir), "--out", str(out), *SMALL, "--epochs", epochs, *extra]


def folder_state(path):
    """Every file under ``path`` with its bytes: to show that a refused run changed nothing."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


def start_cli(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-m", "spacenet_np.train", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def wait_for(path, process, seconds=120):
    deadline = time.monotonic() + seconds
    while not Path(path).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return Path(path).exists()


# ----- one run per folder -----
def test_a_new_run_into_another_runs_folder_is_refused_and_changes_nothing(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main(cli(data_dir, out)) == 0
    before = folder_state(out)
    assert train.main(cli(data_dir, out, task="split_fashion_mnist")) == 2
    assert "holds another run's files" in capsys.readouterr().err
    assert folder_state(out) == before


def test_overwrite_replaces_the_old_run(data_dir, tmp_path):
    out = tmp_path / "out"
    assert train.main(cli(data_dir, out, "--seeds", "0", "1")) == 0
    assert train.main(cli(data_dir, out, "--overwrite", task="split_fashion_mnist")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "split_fashion_mnist" and [r["seed"] for r in results["runs"]] == [0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["seed0.ckpt"]


def test_resume_refuses_a_checkpoint_of_another_stream(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main(cli(data_dir, out)) == 0
    run = json.loads((out / "run.json").read_text())
    run["spec"]["task"] = "split_fashion_mnist"  # a careless edit
    (out / "run.json").write_text(json.dumps(run))
    (out / "results.json").unlink()
    assert train.main(["--resume", str(out)]) == 1
    err = capsys.readouterr().err
    assert "belongs to another run" in err
    assert "spec.task: checkpoint 'split_mnist', this run 'split_fashion_mnist'" in err
    assert not (out / "results.json").exists()


def test_resume_refuses_other_run_options(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main(cli(data_dir, out)) == 0
    with pytest.raises(SystemExit) as exit_:
        train.main(["--resume", str(out), "--seeds", "3", "--epochs", "5"])
    assert exit_.value.code == 2
    assert "refused: --seeds, --epochs" in capsys.readouterr().err


def test_a_locked_folder_is_refused_naming_the_holder(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main(cli(data_dir, out)) == 0
    before = folder_state(out)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        before[".lock"] = (out / ".lock").read_bytes()
        assert train.main(["--resume", str(out)]) == 2
        assert f"in use by process {holder.pid}" in capsys.readouterr().err
        assert train.main(cli(data_dir, out, "--overwrite")) == 2
        assert folder_state(out) == before  # the first run's results survive
    finally:
        holder.kill()
        holder.wait()
    assert train.main(["--resume", str(out)]) == 0  # its holder is gone: a stale lock is taken over
    assert not (out / ".lock").exists()


def test_out_that_is_a_file_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a folder")
    assert train.main(cli(data_dir, out)) == 2
    assert f"{out} is a file" in capsys.readouterr().err


def test_missing_data_dir_is_an_error_that_names_it(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    assert train.main(cli(missing, tmp_path / "out")) == 1
    assert str(missing) in capsys.readouterr().err
    assert not missing.exists()


# ----- signals -----
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_run_exits_with_the_resume_command_and_resumes_identically(data_dir, tmp_path, signum, code):
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["--seeds", "0", "1"]
    assert train.main(cli(data_dir, full, *args, epochs="6")) == 0
    process = start_cli(cli(data_dir, cut, *args, epochs="6"))
    assert wait_for(cut / "checkpoints" / "seed0.ckpt", process), "no checkpoint before the process ended"
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    if process.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert process.returncode == code, err
    assert "Traceback" not in err
    assert f"interrupted by {signal.Signals(signum).name}" in err
    assert f"resume with: python -m spacenet_np.train --resume {cut}" in err
    assert not list(cut.rglob("*.tmp")) and not (cut / ".lock").exists()
    assert train.main(["--resume", str(cut)]) == 0
    assert results_without_time(cut) == results_without_time(full)


# ----- I/O faults on a real file system -----
@contextlib.contextmanager
def tmpfs(path, size="1m", read_only=False):
    """A small tmpfs mounted at ``path`` (root only): a real full disk or read-only file system."""
    path.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(path):
    """Fill the file system of ``path`` up: every later write fails with ENOSPC."""
    with open(path / "filler", "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()


def test_read_only_file_system_gives_one_line(data_dir, tmp_path):
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        process = start_cli(cli(data_dir, ro / "out"))
        _, err = process.communicate(timeout=120)
    assert process.returncode == 1
    assert err.strip() == f"error: cannot write {ro / 'out' / '.lock'}: Read-only file system" or \
        err.strip() == f"error: cannot create {ro / 'out'}: Read-only file system"


def test_full_disk_keeps_the_last_good_checkpoint_and_resumes_identically(data_dir, tmp_path):
    full = tmp_path / "full"
    assert train.main(cli(data_dir, full, epochs="6")) == 0
    with tmpfs(tmp_path / "disk", size="2m") as disk:
        out = disk / "out"
        process = start_cli(cli(data_dir, out, epochs="6"))
        assert wait_for(out / "checkpoints" / "seed0.ckpt", process)
        fill(disk)
        _, err = process.communicate(timeout=120)
        if process.returncode == 0:
            pytest.skip("the run finished before the disk was full")
        assert process.returncode == 1 and "Traceback" not in err
        assert "No space left on device" in err and str(out) in err
        assert not list(out.rglob("*.tmp"))
        assert checkpoint.load(out / "checkpoints" / "seed0.ckpt").tasks_learned >= 1  # the last good one
        (disk / "filler").unlink()
        assert train.main(["--resume", str(out)]) == 0
        assert results_without_time(out) == results_without_time(full)


def test_unwritable_results_are_written_elsewhere_not_lost(data_dir, tmp_path, capsys, monkeypatch):
    original = train.write_results

    def fill_then_write(session):  # the disk fills up once the last seed has trained
        fill(disk)
        return original(session)

    with tmpfs(tmp_path / "disk", size="1m") as disk:
        out = disk / "out"
        monkeypatch.setattr(train, "write_results", fill_then_write)
        assert train.main(cli(data_dir, out, "--checkpoint-every", "none")) == 1
    err = capsys.readouterr().err
    assert f"cannot write {out / 'results.json'}: No space left on device" in err
    rescue = Path(err.strip().splitlines()[-1].split(" were written to ")[1].split(" instead")[0])
    results = json.loads(rescue.read_text())
    rescue.unlink()
    assert results["complete"] and [r["seed"] for r in results["runs"]] == [0]


def test_seeds_on_two_workers_give_the_sequential_numbers(data_dir, tmp_path):
    args = ["--seeds", "0", "1", "2", "--validation", "0.2"]
    assert train.main(cli(data_dir, tmp_path / "sequential", *args)) == 0
    assert train.main(cli(data_dir, tmp_path / "parallel", *args, "--workers", "2")) == 0
    sequential, parallel = (results_without_time(tmp_path / name) for name in ("sequential", "parallel"))
    assert [r["seed"] for r in parallel["runs"]] == [0, 1, 2]
    assert parallel["runs"] == sequential["runs"]
    assert sorted(p.name for p in (tmp_path / "parallel" / "checkpoints").iterdir()) == [
        "seed0.ckpt", "seed1.ckpt", "seed2.ckpt"]
    assert train.main(["--resume", str(tmp_path / "parallel")]) == 0  # every seed finished: nothing to redo
    assert results_without_time(tmp_path / "parallel")["runs"] == sequential["runs"]
