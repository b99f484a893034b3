"""One seed of split MNIST from the command line, the whole process: spacenet_np's CLI against the dense reference's.

Alternating child processes (``--rounds`` of each, default 5), each measured from spawn to exit with the kernel's
rusage (``benchmarks.common.run_measured``): wall time and peak RSS, medians and the ratio dense / spacenet_np.

- spacenet_np: ``python -m spacenet_np.train --task split_mnist --quiet --out TMP --overwrite`` (the default run:
  paper preset, seed 0, library-default threads, checkpoints and snapshots written);
- dense: ``python -m benchmarks.dense_reference --task split_mnist --hidden 400 400 --seeds 0 --out TMP --quiet``
  (the same algorithm with dense masks and BLAS, its own CLI).

Each runs once before the timed rounds (warm Numba and file caches). Run: ``SPACENET_DATA=DIR python -m
benchmarks.cli_seed [--rounds 5]``. Writes ``results/cli_seed.{json,md}``.
"""
if __name__ == "__main__" and not __package__:  # run as a file: python benchmarks/cli_seed.py
    import sys
    from pathlib import Path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import statistics
import sys
import tempfile

from benchmarks.common import machine_info, md_table, python_module, reproduce_command, run_measured, write_results


def commands(out):
    return {"spacenet_np": python_module("spacenet_np.train", "--task", "split_mnist", "--quiet", "--out",
                                         f"{out}/spacenet", "--overwrite"),
            "dense": python_module("benchmarks.dense_reference", "--task", "split_mnist", "--hidden", 400, 400,
                                   "--seeds", 0, "--out", f"{out}/dense", "--quiet")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    argv = list(argv) if argv is not None else sys.argv[1:]
    machine = machine_info()
    runs = {"spacenet_np": [], "dense": []}
    with tempfile.TemporaryDirectory() as out:
        argvs = commands(out)
        for name, command in argvs.items():
            if run_measured(command, expect_report=False)["exit_code"] != 0:
                raise SystemExit(f"{name} failed: {' '.join(command)}")
        for r in range(args.rounds):
            for name in (("spacenet_np", "dense") if r % 2 == 0 else ("dense", "spacenet_np")):
                runs[name].append(run_measured(argvs[name], expect_report=False))
                print(f"round {r + 1} {name}: {runs[name][-1]['process_wall_s']:.2f} s, "
                      f"{runs[name][-1]['wait4_maxrss_mb']:.0f} MB", flush=True)
    median = {name: {key: statistics.median(run[key] for run in rows) for key in
                     ("process_wall_s", "wait4_maxrss_mb", "other_cpus_busy")} for name, rows in runs.items()}
    ratio = median["dense"]["process_wall_s"] / median["spacenet_np"]["process_wall_s"]
    rows = [[name, f"{m['process_wall_s']:.2f}",
             " ".join(f"{run['process_wall_s']:.2f}" for run in runs[name]), f"{m['wait4_maxrss_mb']:.0f}",
             f"{m['other_cpus_busy']:.2f}"] for name, m in median.items()]
    md = "\n".join([
        f"# One seed of split MNIST from the command line, whole process ({args.rounds} rounds, alternating)", "",
        md_table(["implementation", "median wall s", "walls s", "median peak RSS MB", "other work (cores busy)"],
                 rows), "",
        f"dense / spacenet_np wall time: **{ratio:.2f}x**. Commands: `{' '.join(commands('TMP')['spacenet_np'][1:])}`"
        f" and `{' '.join(commands('TMP')['dense'][1:])}`."])
    write_results("cli_seed", {"rounds": args.rounds, "median": median, "ratio_dense_over_spacenet": ratio,
                               "runs": {name: [{k: run[k] for k in ("process_wall_s", "wait4_maxrss_mb",
                                                                     "cpu_user_s", "cpu_sys_s", "other_cpus_busy")}
                                               for run in rows_] for name, rows_ in runs.items()}},
                  md, reproduce_command("cli_seed", argv), machine)


if __name__ == "__main__":
    main()
