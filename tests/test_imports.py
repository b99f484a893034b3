"""A run imports only what it uses: plotting, progress bars, Dask, scikit-learn, the report and sweep code and the
download modules stay out of ``sys.modules`` unless asked for. Each check runs in a fresh interpreter."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_tiny_dataset

import spacenet_np

REPO_ROOT = Path(spacenet_np.__file__).resolve().parents[1]
MARK = "@@MODULES "
NEVER_AT_IMPORT = ["matplotlib", "tqdm", "distributed", "dask", "sklearn", "spacenet_np.estimator",
                   "spacenet_np.report", "spacenet_np.sweep_report", "spacenet_np.engine", "spacenet_np.sweep",
                   "tarfile", "urllib.request", "http.client"]
TINY_RUN = ["--task", "split_mnist", "--hidden", "30", "30", "--connections", "300", "50", "20",
            "--selected", "10", "10", "--reserved", "4", "4", "--epochs", "1", "--batch-size", "16",
            "--quiet", "--checkpoint-every", "none"]

# Prints the imported modules after running ``body`` (which may raise SystemExit, as argparse and the CLI do).
SCRIPT = """
import json, sys
try:
{body}
except SystemExit as stop:
    if stop.code not in (0, None):
        raise
print({mark!r} + json.dumps(sorted(sys.modules)))
"""


def modules_after(body, tmp_path):
    """The names in ``sys.modules`` after a fresh interpreter ran ``body`` (indented Python source)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPACENET_CACHE", "SPACENET_DATA")}
    env.update(PYTHONPATH=str(REPO_ROOT), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    script = SCRIPT.format(body=body, mark=MARK)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    assert lines, done.stdout[-3000:]
    return set(json.loads(lines[-1][len(MARK):]))


def run_module_body(args):
    """Source that runs ``python -m spacenet_np.train ARGS`` in the interpreter."""
    return f"    import runpy\n    sys.argv = ['spacenet_np.train', *{args!r}]\n" \
           "    runpy.run_module('spacenet_np.train', run_name='__main__', alter_sys=True)"


@pytest.mark.parametrize("body", ["    import spacenet_np", "    import spacenet_np.train",
                                  run_module_body(["--help"])], ids=["package", "cli module", "cli --help"])
def test_importing_loads_nothing_optional(body, tmp_path):
    modules = modules_after(body, tmp_path)
    assert "spacenet_np" in modules
    assert sorted(modules.intersection(NEVER_AT_IMPORT)) == []


def test_quiet_run_without_checkpoints_loads_nothing_optional(tmp_path):
    """A real single-process --quiet run: no progress bars, Dask, plots, report or download code."""
    write_tiny_dataset(tmp_path / "data", "mnist", n_train=200, n_test=100)
    args = [*TINY_RUN, "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    modules = modules_after(run_module_body(args), tmp_path)
    assert "spacenet_np.recorder" in modules and (tmp_path / "out" / "results.json").is_file()  # it did run
    assert sorted(modules.intersection(NEVER_AT_IMPORT)) == []
