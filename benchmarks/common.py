"""Shared helpers of the benchmarks: machine description, timing, child processes, result files.

Child processes report to their parent with one line ``@@BENCH {json}`` on stdout (:func:`child_report`), which
always carries the child's own peak RSS, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``. The parent
(:func:`run_measured`) also times the whole process from spawn to exit and reads the kernel's rusage of the child
through ``os.wait4`` as a cross-check.

``python -m benchmarks.common run-module MODULE [ARGS...]`` runs ``python -m MODULE ARGS...`` in-process via
``runpy`` and then reports its peak RSS the same way: this is how a command line that knows nothing about the
benchmarks (``python -m spacenet_np.train ...``) is measured.
"""
import json
import os
import platform
import resource
import runpy
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
MARKER = "@@BENCH "
THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


# ----- machine description -----
def _read(path):
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cpu_model():
    """The CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def compiled_for():
    """The CPU that Numba compiles for here, as LLVM names it (``znver3``, ``znver4``, ...), and the per-core L2
    size from sysfs: two machines of one model name can differ in both, and the kernels' speeds (and their last
    bits: fastmath sums in the order the compiler picks for the CPU) with them. Returns a short string."""
    import llvmlite.binding
    name = os.environ.get("NUMBA_CPU_NAME") or llvmlite.binding.get_host_cpu_name()  # set: Numba compiles for it
    l2 = _read("/sys/devices/system/cpu/cpu0/cache/index2/size").strip()
    return f"{name}, L2 {l2} per core" if l2 else name


def ram_bytes():
    """Total RAM from /proc/meminfo, in bytes (None if unknown)."""
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def available_ram_bytes():
    """MemAvailable from /proc/meminfo, in bytes (None if unknown)."""
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _blas_description():
    import numpy as np
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # older numpy: no dict mode
        return "unknown"


def _git_revision():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info():
    """What the numbers were measured on: CPU, cores, RAM, library versions, load, revision. Returns a dict."""
    import numba
    import numpy as np
    import scipy

    import spacenet_np
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "compiled_for": compiled_for(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "ram_gb": round((ram_bytes() or 0) / 2**30, 1),
        "available_ram_gb_at_start": round((available_ram_bytes() or 0) / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "numba": numba.__version__,
        "spacenet_np": spacenet_np.__version__,
        "numba_threads_in_this_process": numba.get_num_threads(),
        "thread_limits": {var: os.environ.get(var) for var in THREAD_VARIABLES if os.environ.get(var)},
        "blas": _blas_description(),
        "git_revision": _git_revision(),
    }


def machine_line(machine):
    """One Markdown line describing the machine."""
    return (f"Machine: {machine['cpu_model']} ({machine['compiled_for']}), {machine['usable_cpus']} cores, "
            f"{machine['ram_gb']} GB RAM; "
            f"Python {machine['python']}, NumPy {machine['numpy']} ({machine['blas']}), SciPy {machine['scipy']}, "
            f"Numba {machine['numba']}; threads: "
            + (", ".join(f"{k}={v}" for k, v in machine["thread_limits"].items()) or "library defaults")
            + "; load average at start "
            f"{', '.join(str(x) for x in machine['load_average_at_start'])}; revision {machine['git_revision']}.")


# ----- commands and result files -----
def reproduce_command(module, argv):
    """The shell command that reruns benchmark ``module`` (e.g. ``"end_to_end"``) with ``argv``."""
    prefix = ""
    if os.environ.get("SPACENET_DATA"):
        prefix = f"SPACENET_DATA={shlex.quote(os.environ['SPACENET_DATA'])} "
    return prefix + shlex.join(["python", "-m", f"benchmarks.{module}", *argv])


def write_results(name, payload, markdown, command, machine):
    """Write ``results/NAME.json`` (payload + command + machine + time) and ``results/NAME.md`` atomically.

    Returns the two paths. Prints them and the command that reproduces them.
    """
    from spacenet_np.fileio import atomic_write_bytes, atomic_write_json
    document = {"benchmark": name, "command": command, "machine": machine,
                "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "load_average_at_end": [round(x, 2) for x in os.getloadavg()], **payload}
    json_path, md_path = RESULTS_DIR / f"{name}.json", RESULTS_DIR / f"{name}.md"
    atomic_write_json(json_path, document)
    footer = (f"\n\n{machine_line(machine)} Load average at end "
              f"{', '.join(str(x) for x in document['load_average_at_end'])}.\n\n"
              f"Reproduce: `{command}`\n")
    atomic_write_bytes(md_path, (markdown.rstrip() + footer).encode())
    print(f"wrote {json_path.relative_to(REPO_ROOT)} and {md_path.relative_to(REPO_ROOT)}")
    print(f"reproduce with: {command}")
    return json_path, md_path


def md_table(headers, rows):
    """A Markdown table from ``headers`` (list of str) and ``rows`` (lists of already formatted cells)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(headers)))
             + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(values):
    """(mean, population std) of a non-empty list; std is 0 for one value."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def pm(values, digits=2):
    """``mean +/- std`` of ``values`` as text."""
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# ----- timing in-process -----
def time_call(fn, warmup=1, min_repeats=5, max_repeats=200, min_total_s=0.25, max_total_s=3.0):
    """Median wall time of ``fn()`` after ``warmup`` calls.

    Repeats at least ``min_repeats`` times and until ``min_total_s`` seconds are spent, but never more than
    ``max_repeats`` times or (after ``min_repeats``, at least 3) ``max_total_s`` seconds. Returns a dict with
    median_s, min_s and repeats.
    """
    for _ in range(warmup):
        fn()
    times = []
    spent = 0.0
    while len(times) < max_repeats:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
        if len(times) >= min_repeats and spent >= min_total_s:
            break
        if len(times) >= 3 and spent >= max_total_s:
            break
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": len(times)}


def time_interleaved(fns, warmup=1, min_rounds=5, max_rounds=200, min_total_s=0.25, max_total_s=3.0, around=None):
    """Median wall time of each ``fns[name]()``, timed in interleaved rounds (one call of each per round).

    Interleaving spreads the load of other processes over all candidates alike. ``around(name)`` may return a
    context manager entered around each call of ``name`` (outside the timed region it only sets state).
    Stops after ``min_rounds`` rounds once ``min_total_s`` is spent, or after 3 rounds once ``max_total_s`` is.
    Returns {name: {median_s, min_s, repeats}}.
    """
    import contextlib
    around = around or (lambda name: contextlib.nullcontext())
    for name, fn in fns.items():
        with around(name):
            for _ in range(warmup):
                fn()
    times = {name: [] for name in fns}
    spent, rounds = 0.0, 0
    while rounds < max_rounds:
        for name, fn in fns.items():
            with around(name):
                start = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            spent += elapsed
        rounds += 1
        if rounds >= min_rounds and spent >= min_total_s:
            break
        if rounds >= 3 and spent >= max_total_s:
            break
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "repeats": len(t)} for name, t in times.items()}


def batches_trained(method_name, result):
    """The batches a call of ``SparseMLP.<method_name>`` trained: one per ``train_step``, the losses that
    ``train_batches`` returns; 0 for any other method."""
    return 1 if method_name == "train_step" else len(result) if method_name == "train_batches" else 0


# ----- child processes -----
def kernel_pairs(module):
    """{name: (serial, parallel)} of every kernel pair in ``module`` (``spacenet_np.kernels``): the attributes that
    are tuples of two Numba dispatchers. Found by inspection so that renamed or new kernels are picked up."""
    pairs = {}
    for name, value in vars(module).items():
        if (not name.startswith("_") and isinstance(value, tuple) and len(value) == 2
                and all(hasattr(v, "py_func") and hasattr(v, "targetoptions") for v in value)):
            pairs[name] = value
    return pairs


def peak_rss_mb():
    """Peak resident set size of this process so far, in MB (ru_maxrss is in kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child_report(payload):
    """Print the child's result line for :func:`run_measured`, adding its own peak RSS (MB)."""
    payload = {**payload, "peak_rss_mb": peak_rss_mb()}
    print(MARKER + json.dumps(payload), flush=True)


def limit_threads(threads):
    """Limit the Numba and BLAS threads of child processes started from now on (``threads`` 0: library default).

    With only two cores and other work on the machine, two-thread Numba and OpenBLAS regions wait for a
    descheduled thread and can run several times slower than one thread, so the benchmarks default to one.
    Returns a short description for the reports.
    """
    if threads and threads > 0:
        for var in THREAD_VARIABLES:
            os.environ[var] = str(threads)
        return f"{threads} thread{'s' if threads > 1 else ''} (Numba and BLAS)"
    for var in THREAD_VARIABLES:
        os.environ.pop(var, None)
    return f"library defaults ({os.cpu_count()} cores for Numba and BLAS)"


def limit_threads_from_argv(default):
    """``limit_threads`` with the ``--threads N`` of the command line (``default`` without one), called from a
    benchmark's ``__main__`` block before NumPy and Numba are imported. Returns the thread count."""
    threads = default
    if "--threads" in sys.argv[1:-1]:
        threads = int(sys.argv[sys.argv.index("--threads") + 1])
    limit_threads(threads)
    return threads


def child_env():
    """Environment for children: the current one, with the repository importable, Python unbuffered, and bytecode
    cached as a default Python caches it (``PYTHONDONTWRITEBYTECODE`` removed). Where it is set, an editable install
    has no ``.pyc`` files, so every child would compile the package's sources again (0.1-0.14 s, measured here),
    which a user's installation does once."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cpu_busy_s():
    """Busy CPU seconds of the whole machine so far (all cores), from /proc/stat (None if unavailable)."""
    line = _read("/proc/stat").splitlines()[:1]
    if not line or not line[0].startswith("cpu "):
        return None
    fields = [int(v) for v in line[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_measured(argv, timeout_s=None, label=None, expect_report=True):
    """Run ``argv`` (a list) in the repository root and measure it from spawn to exit.

    Returns a dict: ``argv``, ``exit_code``, ``process_wall_s`` (start-up included), ``wait4_maxrss_mb`` and
    ``cpu_user_s``/``cpu_sys_s`` from the kernel's rusage of the child, ``other_cpus_busy`` (the average number
    of cores that other processes kept busy meanwhile: the machine's busy CPU time, from /proc/stat, minus the
    child's, over the wall time), ``report`` (the child's last ``@@BENCH`` payload, or None), ``timed_out`` and the
    tails of stdout/stderr. A failed run, or one without a report when ``expect_report``, is printed to stderr.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        busy_before = cpu_busy_s()
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=out, stderr=err, env=child_env())
        killed = []
        timer = None
        if timeout_s is not None:
            def kill():
                killed.append(True)
                proc.kill()
            timer = threading.Timer(timeout_s, kill)
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        busy_after = cpu_busy_s()
        if timer is not None:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    report = None
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            report = json.loads(line[len(MARKER):])
    result = {
        "argv": list(argv),
        "exit_code": proc.returncode,
        "timed_out": bool(killed),
        "process_wall_s": wall,
        "wait4_maxrss_mb": usage.ru_maxrss / 1024.0,
        "cpu_user_s": usage.ru_utime,
        "cpu_sys_s": usage.ru_stime,
        "other_cpus_busy": (None if busy_before is None or busy_after is None else
                            max(0.0, (busy_after - busy_before - usage.ru_utime - usage.ru_stime) / wall)),
        "report": report,
        "stdout_tail": "\n".join(stdout.splitlines()[-15:]),
        "stderr_tail": "\n".join(stderr.splitlines()[-15:]),
    }
    name = label or shlex.join(argv)
    if proc.returncode != 0 or (report is None and expect_report):
        print(f"  ! {name}: exit code {proc.returncode}{' (timed out)' if killed else ''}\n"
              f"{result['stderr_tail']}", file=sys.stderr, flush=True)
    return result


def python_module(module, *args):
    """argv running ``python -m module args`` with the current interpreter."""
    return [sys.executable, "-m", module, *[str(a) for a in args]]


def measured_module(module, *args):
    """argv running ``python -m module args`` under :func:`run_module_measured` (adds the peak RSS report)."""
    return python_module("benchmarks.common", "run-module", module, *args)


def run_module_measured(module, args):
    """Run ``python -m module args`` in this process, then report its exit code, wall time and peak RSS."""
    sys.argv = [module, *args]
    start = time.perf_counter()
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    child_report({"module": module, "args": list(args), "module_exit_code": code,
                  "module_wall_s": time.perf_counter() - start})
    return code


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] == "run-module":
        return run_module_measured(argv[1], argv[2:])
    if argv and argv[0] == "machine":
        print(json.dumps(machine_info(), indent=2))
        return 0
    print("usage: python -m benchmarks.common run-module MODULE [ARGS...] | machine", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
