"""Data ready: decoding the gzipped IDX files against the decode cache, and the CLI module's import cost.

Works on a temporary copy of the 8 MNIST and Fashion-MNIST gz files (the data folder is never written to). Every
measurement is its own child process, in rounds of three modes: *decode* (``SPACENET_CACHE=off``: the gz files
are inflated, as before the cache existed), *first run* (the cache removed first: inflate and build it) and
*warm* (the cache is checked and memory-mapped). A child times ``get_stream(STREAM)`` alone (its imports are
timed separately) and reports the stream's fingerprint, so the three modes are checked to give the same bytes.

Imports: ``python -X importtime -c "import spacenet_np.train"``, the cumulative time of that import and of its
largest parts, and the process wall time of the same command. The children write their ``.pyc`` files into a
temporary ``PYTHONPYCACHEPREFIX`` (also when ``PYTHONDONTWRITEBYTECODE`` is set here), after one warm-up, so no
module is compiled again in a timed run.

Run: ``SPACENET_DATA=DIR python -m benchmarks.data_ready`` (``--stream split_fashion_mnist`` for the other
stream). ``--tiny`` runs on small generated files instead and writes nothing: a check that the benchmark works.
"""
if __name__ == "__main__" and not __package__:  # run as a file: python benchmarks/data_ready.py
    import sys
    from pathlib import Path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import contextlib
import gzip
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    REPO_ROOT,
    child_env,
    child_report,
    limit_threads,
    machine_info,
    md_table,
    python_module,
    reproduce_command,
    run_measured,
    write_results,
)

DATASETS = ("mnist", "fashion-mnist")
MODES = ("decode", "first run", "warm")
MODE_ENV = {"decode": "off", "first run": None, "warm": None}  # SPACENET_CACHE per mode (None: unset)
LABELS = {"decode": "decode, no cache (as before the cache)", "first run": "first run: decode and build the cache",
          "warm": "warm: cache checked and memory-mapped"}
NOT_IMPORTED = ("matplotlib", "tqdm", "distributed", "dask", "sklearn", "spacenet_np.report", "spacenet_np.engine",
                "tarfile", "urllib.request", "http.client")
IMPORT_PARTS = ("numpy", "scipy.sparse", "numba", "spacenet_np.data")  # cumulative times, each with what it imports
IMPORTTIME = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


# ----- child -----
def child_main(stream_name, data_dir):
    """Load the stream once in this process; report the import and load times and the stream's fingerprint."""
    t0 = time.perf_counter()
    from spacenet_np.streams import get_stream, stream_fingerprint
    t1 = time.perf_counter()
    stream = get_stream(stream_name, data_dir)
    t2 = time.perf_counter()
    base = stream.tasks[0].x_train
    while getattr(base, "base", None) is not None:
        base = base.base.obj if isinstance(base.base, memoryview) else base.base
    child_report({"import_s": t1 - t0, "data_s": t2 - t1, "mapped": type(base).__name__ == "mmap",
                  "fingerprint": stream_fingerprint(stream)})


# ----- parent -----
@contextlib.contextmanager
def environment(**values):
    """Set (a str) or unset (None) environment variables for the children started inside; restore them after."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        _set_environment(values)
        yield
    finally:
        _set_environment(saved)


def _set_environment(values):
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def copy_data(source, target):
    """Copy the gz files of both datasets from the data root ``source`` into ``target`` (nothing else)."""
    from spacenet_np.data import FILES
    for dataset in DATASETS:
        (target / dataset).mkdir(parents=True)
        for name in FILES:
            shutil.copyfile(source / dataset / name, target / dataset / name)


def write_tiny_data(target, n_train=3000, n_test=500):
    """Small random MNIST-like gz files for both datasets in ``target`` (for ``--tiny``)."""
    import numpy as np

    from spacenet_np.data import FILES
    rng = np.random.default_rng(0)
    for dataset in DATASETS:
        (target / dataset).mkdir(parents=True)
        for (images, labels), n in zip(((FILES[0], FILES[1]), (FILES[2], FILES[3])), (n_train, n_test)):
            for name, array in ((images, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                                (labels, (np.arange(n) % 10).astype(np.uint8))):
                header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                (target / dataset / name).write_bytes(gzip.compress(header + array.tobytes()))


def remove_cache(data_dir):
    """Delete the cache files beside the gz files (the data folder is a temporary copy)."""
    for dataset in DATASETS:
        for path in (data_dir / dataset).iterdir():
            if path.suffix in (".npy", ".json"):
                path.unlink()


def run_mode(mode, stream, data_dir):
    """One child run of ``mode``; returns its measured record (RuntimeError if the child failed)."""
    if mode == "first run":
        remove_cache(data_dir)
    with environment(SPACENET_CACHE=MODE_ENV[mode]):
        result = run_measured(python_module("benchmarks.data_ready", "--child", stream, data_dir), timeout_s=600)
    if result["exit_code"] != 0 or result["report"] is None:
        raise RuntimeError(f"the {mode} child failed:\n{result['stderr_tail']}")
    return {"mode": mode, **result["report"], "process_wall_s": result["process_wall_s"],
            "peak_rss_mb": result["wait4_maxrss_mb"], "other_cpus_busy": result["other_cpus_busy"]}


def import_profile():
    """``python -X importtime -c "import spacenet_np.train"`` once: the import's cumulative time, its largest
    parts and which optional modules were loaded; then the process wall time of the same import without
    ``-X importtime``."""
    check = "import sys, spacenet_np.train; print('@@LOADED', *[m for m in %r if m in sys.modules])" % (NOT_IMPORTED,)
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", check], cwd=REPO_ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"the import child failed:\n{done.stderr[-3000:]}")
    cumulative = {}
    for line in done.stderr.splitlines():
        match = IMPORTTIME.match(line)
        if match:
            cumulative[match.group(4)] = int(match.group(2)) / 1e6
    loaded = next((line.split()[1:] for line in done.stdout.splitlines() if line.startswith("@@LOADED")), [])
    parts = {name: cumulative.get(name) for name in IMPORT_PARTS}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import spacenet_np.train"], cwd=REPO_ROOT, env=child_env(), check=True,
                   timeout=300)
    wall = time.perf_counter() - start
    return {"import_s": cumulative.get("spacenet_np.train"), "parts_s": parts, "optional_loaded": loaded,
            "process_wall_s": wall}


def summarize(runs):
    """{mode: {median_s, min_s, runs, process_wall_median_s, peak_rss_median_mb}} over the runs of each mode."""
    out = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        out[mode] = {"median_s": statistics.median(r["data_s"] for r in mine), "min_s": min(r["data_s"] for r in mine),
                     "runs": len(mine), "process_wall_median_s": statistics.median(r["process_wall_s"] for r in mine),
                     "peak_rss_median_mb": statistics.median(r["peak_rss_mb"] for r in mine)}
    return out


def markdown(stream, summary, ratio, identical, imports, imports_runs, tiny):
    """The results as Markdown."""
    rows = [[LABELS[mode], f"{s['median_s']:.3f}", f"{s['min_s']:.3f}", f"{s['process_wall_median_s']:.2f}",
             f"{s['peak_rss_median_mb']:.0f}", s["runs"]] for mode, s in summary.items()]
    parts = ", ".join(f"{name} {value:.3f} s" for name, value in imports["parts_s"].items() if value is not None)
    return "\n".join([
        f"# Data ready: `get_stream('{stream}')`{' (tiny generated files, not the real data)' if tiny else ''}", "",
        "One child process per measurement. *Data ready* is `get_stream` alone (imports excluded); *process wall* is "
        "spawn to exit; peak RSS from the kernel (`wait4`).", "",
        md_table(["mode", "data ready, median s", "min s", "process wall, median s", "peak RSS MB", "runs"], rows),
        "",
        f"Decode / warm: **{ratio:.1f}x** (medians). The three modes gave byte-identical streams (fingerprints): "
        f"{'yes' if identical else '**NO**'}.", "",
        f"`import spacenet_np.train` (`-X importtime`, cumulative, median of {imports_runs}): "
        f"{imports['import_s']:.3f} s; the cumulative imports of {parts}. "
        "Process wall of `python -c \"import spacenet_np.train\"`: "
        f"{imports['process_wall_s']:.2f} s. Optional modules loaded: "
        f"{', '.join(imports['optional_loaded']) or 'none'} (checked: {', '.join(NOT_IMPORTED)}).",
    ])


def median_imports(profiles):
    """The per-field median of several import profiles (the optional modules of the last)."""
    return {"import_s": statistics.median(p["import_s"] for p in profiles),
            "parts_s": {name: (statistics.median(p["parts_s"][name] for p in profiles)
                               if all(p["parts_s"][name] is not None for p in profiles) else None)
                        for name in profiles[0]["parts_s"]},
            "optional_loaded": profiles[-1]["optional_loaded"],
            "process_wall_s": statistics.median(p["process_wall_s"] for p in profiles)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(argv[1], argv[2])
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_ready", description=__doc__.splitlines()[0])
    p.add_argument("--stream", choices=["split_mnist", "split_fashion_mnist"], default="split_mnist")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the three modes (default 5)")
    p.add_argument("--import-runs", type=int, default=5, help="importtime runs (default 5)")
    p.add_argument("--data-dir", help="the data root to copy from (default: $SPACENET_DATA, then ./data)")
    p.add_argument("--threads", type=int, default=1, help="Numba and BLAS threads of the children (0: all cores)")
    p.add_argument("--tiny", action="store_true", help="small generated files; print the results, write nothing")
    args = p.parse_args(argv)
    command = reproduce_command("data_ready", argv)
    limit_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="spacenet_data_ready.") as tmp:
        tmp = Path(tmp)
        data_dir = tmp / "data"
        if args.tiny:
            write_tiny_data(data_dir)
        else:
            from spacenet_np.data import resolve_data_root
            copy_data(resolve_data_root(args.data_dir), data_dir)
        copied_ns = time.time_ns()
        with environment(XDG_CACHE_HOME=str(tmp / "xdg"), SPACENET_DATA=None, PYTHONDONTWRITEBYTECODE=None,
                         PYTHONPYCACHEPREFIX=str(tmp / "pyc")):
            run_mode("decode", args.stream, data_dir)  # warm-up: .pyc files, Numba's cache, the OS file cache
            from spacenet_np.data import RACY_NS  # a gz this fresh is hashed on every load: wait it out
            time.sleep(max(0.0, (copied_ns + RACY_NS - time.time_ns()) / 1e9 + 0.1))
            runs = []
            for round_index in range(args.rounds):
                for mode in MODES:
                    runs.append({"round": round_index, **run_mode(mode, args.stream, data_dir)})
                    print(f"  round {round_index + 1}: {mode}: {runs[-1]['data_s']:.3f} s", flush=True)
            import_profile()  # warm-up
            imports = median_imports([import_profile() for _ in range(args.import_runs)])
    summary = summarize(runs)
    ratio = summary["decode"]["median_s"] / summary["warm"]["median_s"]
    identical = len({r["fingerprint"] for r in runs}) == 1
    if not all(r["mapped"] for r in runs if r["mode"] == "warm"):
        raise RuntimeError("a warm run did not memory-map the cache")
    text = markdown(args.stream, summary, ratio, identical, imports, args.import_runs, args.tiny)
    if args.tiny:
        print(text)
        return 0 if identical else 1
    payload = {"stream": args.stream, "rounds": args.rounds, "summary": summary, "decode_over_warm": ratio,
               "identical": identical, "imports": imports, "runs": runs}
    write_results(f"data_ready_{args.stream}" if args.stream != "split_mnist" else "data_ready", payload, text,
                  command, machine_info())
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
