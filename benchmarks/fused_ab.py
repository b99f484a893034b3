"""The fused MLP step of the working tree against the kernels of a git revision, on the same batches.

Runs one CLI seed in-process and keeps a copy of every epoch's ``kernels.mlp_train_batches`` call
(``fused_parts.record_epochs``). ``spacenet_np/kernels.py`` at ``--against`` (read with ``git show``) is loaded as a
separate module with Numba's cache off, so it is compiled in this process. Then every recorded epoch is replayed by
both modules' ``mlp_train_batches`` on fresh copies of its arguments, ``--rounds`` times, the order alternating from
round to round. Whether both end with the same weights, Omega, biases and batch losses, bit for bit, is reported.

Reported per round: ms per training batch for each, and their ratio (the revision's time over the working tree's);
the median ratio is the figure. Both run in one process, one thread, on the same arrays, so the machine's drift
over minutes cancels out of the ratio.

Run: ``python -m benchmarks.fused_ab --against REV [--rounds 8] [--seed 0]`` (about 1.5 min, one thread). Writes
``results/fused_ab.{json,md}``.
"""
if __name__ == "__main__":
    import sys
    if not __package__:  # run as a file: python benchmarks/fused_ab.py
        from pathlib import Path
        sys.path[0] = str(Path(__file__).resolve().parent.parent)
    from benchmarks.common import limit_threads
    limit_threads(1)  # before NumPy and Numba are imported

import argparse
import importlib.util
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine_info, md_table, reproduce_command, write_results
from benchmarks.fused_parts import fresh, parse_replay_options, record_epochs, same_result
from spacenet_np import kernels

ROOT = Path(__file__).resolve().parent.parent
CACHE_LINE = "CACHE = numba_cache.configure()"


def kernels_at(revision):
    """``spacenet_np/kernels.py`` at ``revision`` as a module of its own, compiled without Numba's cache."""
    shown = subprocess.run(["git", "show", f"{revision}:spacenet_np/kernels.py"], cwd=ROOT, capture_output=True,
                           text=True)
    if shown.returncode != 0:
        raise SystemExit(f"error: cannot read spacenet_np/kernels.py at {revision!r}: {shown.stderr.strip()}")
    if CACHE_LINE not in shown.stdout:
        raise SystemExit(f"error: kernels.py at {revision!r} has no line {CACHE_LINE!r} to turn the cache off")
    source = shown.stdout.replace("from . import numba_cache", "from spacenet_np import numba_cache")
    source = source.replace(CACHE_LINE, "CACHE = False")
    name = "kernels_at_" + re.sub(r"\W", "_", revision)  # a module name: no dots, slashes, ...
    path = Path(tempfile.mkdtemp(prefix="fused_ab_")) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Numba looks functions' modules up by name
    spec.loader.exec_module(module)
    return module


def replay(module, call):
    """``module.mlp_train_batches`` on a fresh copy of a recorded call: (seconds, the arguments it left)."""
    args = fresh(call)
    start = time.perf_counter()
    module.mlp_train_batches(*args)
    return time.perf_counter() - start, args


def measure(recorded, other, rounds):
    """Per round, the seconds of every recorded epoch's replay: (tree, revision), and whether every epoch ended
    with the same bits in both."""
    tree, revision, same = [0.0] * rounds, [0.0] * rounds, True
    for call in recorded:
        try:
            theirs = replay(other, call)[1]  # (compiles the revision's kernels)
        except Exception as err:  # Numba's TypingError among others: an older signature
            raise SystemExit(f"error: the revision's mlp_train_batches does not take the working tree's arguments "
                             f"(its signature differs): {str(err).splitlines()[0]}") from None
        same = same and same_result(replay(kernels, call)[1], theirs)
        for r in range(rounds):
            order = ((kernels, tree), (other, revision)) if r % 2 == 0 else ((other, revision), (kernels, tree))
            for module, seconds in order:
                seconds[r] += replay(module, call)[0]
    return tree, revision, same


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.fused_ab", description=__doc__.splitlines()[0])
    p.add_argument("--against", required=True, help="git revision whose spacenet_np/kernels.py is compared")
    args, argv = parse_replay_options(p, argv, rounds=8)
    machine = machine_info()
    other = kernels_at(args.against)
    recorded = record_epochs(args.seed)
    batches = sum(call[1][-1].shape[0] for call in recorded)
    tree, revision, same = measure(recorded, other, args.rounds)
    ratios = [r / t for r, t in zip(revision, tree)]
    rows = [[r + 1, f"{revision[r] / batches * 1e3:.4f}", f"{tree[r] / batches * 1e3:.4f}", f"{ratios[r]:.3f}"]
            for r in range(args.rounds)]
    text = "\n".join([
        f"# The fused MLP step: working tree ({machine['git_revision']}) against `{args.against}`'s kernels", "",
        f"Every epoch's `mlp_train_batches` call of CLI seed {args.seed} ({batches} batches), replayed by both "
        "in one process, one thread, alternating. ms per training batch.", "",
        md_table(["round", f"`{args.against}`", "working tree", "ratio"], rows), "",
        f"- Median ratio: **{statistics.median(ratios):.3f}x** (the revision's time over the working tree's; "
        f"{sum(x > 1 for x in ratios)} of {args.rounds} rounds above 1).",
        f"- Same weights, Omega, biases and losses, bit for bit: **{'yes' if same else 'no'}**."])
    print(text)
    write_results("fused_ab", {"against": args.against, "seed": args.seed, "rounds": args.rounds,
                               "batches": batches, "tree_s_per_round": tree, "revision_s_per_round": revision,
                               "median_ratio": statistics.median(ratios), "same_bits": same},
                  text, reproduce_command("fused_ab", argv), machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
