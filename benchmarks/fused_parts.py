"""Inside the fused MLP step: where a split-MNIST training batch's time goes, part by part.

An epoch's whole batches train in one ``kernels.mlp_train_batches`` call, which a profiler sees whole. This benchmark
runs one CLI seed in-process (``spacenet_np.train.main(["--task", "split_mnist", "--seeds", SEED, "--quiet",
"--out", TMP])``, the paper configuration) and keeps a copy of what every epoch's call of whole batches is given,
taken just before the call (the training images are not copied: the copy refers to the run's array). Then each
recorded epoch is replayed, in alternating rounds, three ways:

- *whole*: ``mlp_train_batches`` on a fresh copy of the recorded arguments, as the run called it;
- *parts*: the same batches through the same compiled kernels, one timed Python call each, in the order of
  ``mlp_train_batches`` and ``mlp_train_step``: the batch's gathering (``transpose_lookup``, and its labels), per
  layer the frozen rows' copy (``copy_cached_rows``) and the forward pass (``csr_forward``, serial build), the
  loss (``softmax_cross_entropy``), then per layer from the top the input gradient (``csc_backward_input``), dL/dW
  at the trainable connections (``sampled_weight_grad``), SGD with Omega (``sgd_step_with_importance``) and the
  bias step (``bias_step``);
- *every bias row*: ``mlp_train_batches`` stepping the bias of every row its mask trains, instead of only the rows
  whose gradient can be nonzero (``SparseMLP.bias_step_rows``), to measure what leaving the others out gains.

The parts and every-bias-row replays must end with the same weights, Omega, biases and batch losses, bit
for bit, as the whole call (the benchmark stops otherwise). Reported per training batch: each part's time and
share, and for the three sparse products their useful work (forward ``2 * batch * connections into the rows
computed``, input gradient ``2 * batch * connections of the CSC view``, weight gradient ``2 * batch * trainable
connections``) and GFLOP/s, per layer. The parts add up to more than the whole call: each part is a Python call
(its cost, measured on an empty kernel call, is listed), and the whole call runs the parts back to back without
Python in between.

Run: ``python -m benchmarks.fused_parts [--rounds 5] [--seed 0]`` (about 30 s, one thread). Writes
``results/fused_parts.{json,md}``.
"""
if __name__ == "__main__":
    import sys
    if not __package__:  # run as a file: python benchmarks/fused_parts.py
        from pathlib import Path
        sys.path[0] = str(Path(__file__).resolve().parent.parent)
    from benchmarks.common import limit_threads
    limit_threads(1)  # before NumPy and Numba are imported

import argparse
import copy
import statistics
import sys
import time
from collections import defaultdict

import numpy as np

from benchmarks.common import machine_info, md_table, reproduce_command, write_results
from benchmarks.fused_step import run_seed
from spacenet_np import kernels
from spacenet_np.buffers import aligned_copy

PARTS = ("gather", "frozen rows copied", "forward", "frozen rows recorded", "loss", "input gradient",
         "weight gradient", "SGD + Omega", "bias step")


class EpochRecorder:
    """An instrument for ``fused_step.run_seed``: keeps a copy of the arguments of every ``mlp_train_batches``
    call that trains more than one batch (the epochs' whole batches), the images by reference."""

    def __init__(self):
        self.recorded, self.real = [], kernels.mlp_train_batches

    def _recording(self, *args):
        if args[-1].shape[0] > 1:
            self.recorded.append((args[4], copy.deepcopy(args[:4] + (None,) + args[5:])))
        return self.real(*args)

    def install(self):
        kernels.mlp_train_batches = self._recording

    def remove(self):
        kernels.mlp_train_batches = self.real


def record_epochs(seed):
    """Run one CLI seed in-process on the default path; return what ``EpochRecorder`` kept."""
    recorder = EpochRecorder()
    run_seed(seed, "fused", recorder)
    return recorder.recorded


def fresh(recorded_call):
    """A copy of a recorded call's arguments, its activation and gradient arrays placed as the run's are
    (``spacenet_np.buffers``: a deep copy would put them where NumPy does)."""
    images, args = recorded_call
    args = copy.deepcopy(args)
    activations, deltas = (tuple(aligned_copy(a) for a in arrays) for arrays in args[1:3])
    return (args[0], activations, deltas, args[3], images) + args[5:]


def replay_whole(args):
    """``mlp_train_batches`` on ``args``; returns (seconds, batches trained)."""
    start = time.perf_counter()
    trained = kernels.mlp_train_batches(*args)
    return time.perf_counter() - start, trained


def replay_parts(args, seconds):
    """The batches of one ``mlp_train_batches`` call, kernel by kernel, adding each part's time to ``seconds``
    (part -> s, and (product, layer) -> s). Returns the number of batches trained."""
    (layers, activations, deltas, grads, images, order, lut, labels, batch_labels, masked, classes, lr, sum_exp,
     losses, record, loss_limit, batch_losses) = args
    n, batch, lr32 = len(layers), activations[0].shape[1], np.float32(lr)
    forward, backward_input = kernels.csr_forward[0], kernels.csc_backward_input[0]
    weight_grad, sgd = kernels.sampled_weight_grad[0], kernels.sgd_step_with_importance[0]
    clock = time.perf_counter

    def timed(part, kernel, *kernel_args):
        start = clock()
        result = kernel(*kernel_args)
        seconds[part] += clock() - start
        return result

    for t in range(batch_losses.shape[0]):
        start = clock()
        ids = order[t * batch:(t + 1) * batch]
        kernels.transpose_lookup[0](images, ids, lut, activations[0])
        batch_labels[:] = labels[ids]
        seconds["gather"] += clock() - start
        for l in range(n):
            L = layers[l]
            if not record:
                timed("frozen rows copied", kernels.copy_cached_rows, L[11], L[12], ids, activations[l + 1], False)
            timed(("forward", l), forward, L[0], L[1], L[2], L[3], L[4], activations[l], activations[l + 1], l < n - 1)
            if record:
                timed("frozen rows recorded", kernels.copy_cached_rows, L[11], L[12], ids, activations[l + 1], True)
        loss = timed("loss", kernels.softmax_cross_entropy, activations[n], batch_labels, masked, classes, deltas[n],
                     sum_exp, losses)
        for l in range(n - 1, -1, -1):
            L = layers[l]
            if l > 0:
                timed(("input gradient", l), backward_input, L[6], L[7], L[5], L[3], deltas[l + 1], activations[l],
                      deltas[l])
            timed(("weight gradient", l), weight_grad, L[9], L[5], L[2], deltas[l + 1], activations[l], grads[l])
            timed("SGD + Omega", sgd, L[9], grads[l], lr32, L[3], L[8])
            timed("bias step", kernels.bias_step, deltas[l + 1], lr32, L[10], L[4], sum_exp, L[13])
        batch_losses[t] = loss
        if not -np.inf < loss <= loss_limit:
            return t + 1
    return batch_losses.shape[0]


def same_result(a, b):
    """Whether two replays left the same weights, Omega, biases and batch losses (bits)."""
    def state(args):
        return [x for layer in args[0] for x in (layer[3], layer[4], layer[8])] + [args[-1]]
    return all(np.array_equal(x.view(np.uint32), y.view(np.uint32)) for x, y in zip(state(a), state(b)))


def useful_work(args):
    """Per batch: (product, layer) -> useful floating-point operations (2 per multiply-add)."""
    layers, batch = args[0], args[1][0].shape[1]
    work = {}
    for l, layer in enumerate(layers):
        compute_rows, indptr = layer[0], layer[1]
        work["forward", l] = 2 * batch * int(np.sum(indptr[compute_rows + 1] - indptr[compute_rows]))
        if l > 0:
            work["input gradient", l] = 2 * batch * layer[7].size
        work["weight gradient", l] = 2 * batch * layer[9].size
    return work


def empty_call_s(repeats=20000):
    """The cost of one Python call of a compiled kernel that does nothing (``ids_in_range`` on no ids)."""
    ids = np.zeros(0, np.int64)
    kernels.ids_in_range(ids, 1)
    start = time.perf_counter()
    for _ in range(repeats):
        kernels.ids_in_range(ids, 1)
    return (time.perf_counter() - start) / repeats


def every_bias_row(args):
    """``args`` with the bias step computed on every row (those whose mask is 0 are still left alone)."""
    return (tuple(layer[:13] + (np.arange(layer[4].shape[0]),) for layer in args[0]),) + args[1:]


VARIANTS = {"whole": fresh, "every bias row": lambda call: every_bias_row(fresh(call))}


def measure(recorded, rounds):
    """Alternating replays of every recorded epoch: whole, whole with every bias row stepped, and kernel by
    kernel. Returns (variant -> whole s per round, parts: key -> s per round, work:
    key -> operations over all batches, batches, Python calls of the parts replay)."""
    whole = {name: [0.0] * rounds for name in VARIANTS}
    parts = defaultdict(lambda: [0.0] * rounds)
    work, batches, calls = defaultdict(int), 0, 0
    ways = (*VARIANTS, "parts")
    for call in recorded:
        check_whole, check_parts = fresh(call), fresh(call)
        trained_whole = replay_whole(check_whole)[1]
        trained_parts = replay_parts(check_parts, defaultdict(float))
        if trained_whole != trained_parts or not same_result(check_whole, check_parts):
            raise RuntimeError("the kernel-by-kernel replay does not reproduce mlp_train_batches")
        for name in [name for name in VARIANTS if name != "whole"]:  # whole is check_whole itself
            check = VARIANTS[name](call)
            if replay_whole(check)[1] != trained_whole or not same_result(check_whole, check):
                raise RuntimeError(f"the {name} replay does not reproduce mlp_train_batches")
        for key, value in useful_work(check_whole).items():
            work[key] += value * trained_whole
        batches += trained_whole
        layers = check_whole[0]
        calls += trained_whole * (6 * len(layers) + 1)  # gather; copy + forward; loss; 3 or 4 backward
        for r in range(rounds):
            for way in ways[r % len(ways):] + ways[:r % len(ways)]:
                if way == "parts":
                    seconds = defaultdict(float)
                    replay_parts(fresh(call), seconds)
                    for key, value in seconds.items():
                        parts[key][r] += value
                else:
                    whole[way][r] += replay_whole(VARIANTS[way](call))[0]
    return whole, dict(parts), dict(work), batches, calls


def summarize(variants, parts, work, batches, calls, empty_s):
    """Per batch medians over rounds (ms) and GFLOP/s. Returns (rows, summary dict)."""
    whole, whole_every_bias = variants["whole"], variants["every bias row"]
    per_batch = {key: 1e3 * statistics.median(values) / batches for key, values in parts.items()}
    total_parts = 1e3 * statistics.median([sum(v[r] for v in parts.values()) for r in range(len(whole))]) / batches
    whole_ms = 1e3 * statistics.median(whole) / batches
    rows, products = [], defaultdict(float)
    for part in PARTS:
        keys = sorted(k for k in per_batch if k == part or (isinstance(k, tuple) and k[0] == part))
        for key in keys:
            ms = per_batch[key]
            label = f"{part}, layer {key[1]}" if isinstance(key, tuple) else part
            flop = work.get(key, 0) / batches
            gflops = flop / (ms * 1e6) if flop else None
            if flop:
                products["ms"] += ms
                products["flop"] += flop
            rows.append({"part": label, "ms_per_batch": ms, "share_of_parts": ms / total_parts,
                         "mflop_per_batch": flop / 1e6 if flop else None, "gflops": gflops})
    summary = {"batches": batches, "whole_ms_per_batch": whole_ms, "parts_ms_per_batch": total_parts,
               "whole_every_bias_row_ms_per_batch": 1e3 * statistics.median(whole_every_bias) / batches,
               "rounds_bias_rows_faster": sum(a < b for a, b in zip(whole, whole_every_bias)),
               "python_calls_per_batch": calls / batches, "empty_call_us": 1e6 * empty_s,
               "products_ms_per_batch": products["ms"], "products_mflop_per_batch": products["flop"] / 1e6,
               "products_gflops": products["flop"] / (products["ms"] * 1e6),
               "whole_gflops": products["flop"] / (whole_ms * 1e6)}
    return rows, summary


def markdown(rows, summary, rounds, seed):
    table = md_table(["part", "ms / batch", "share of the parts", "useful MFLOP / batch", "GFLOP/s"],
                     [[r["part"], f"{r['ms_per_batch']:.4f}", f"{100 * r['share_of_parts']:.1f} %",
                       "" if r["mflop_per_batch"] is None else f"{r['mflop_per_batch']:.2f}",
                       "" if r["gflops"] is None else f"{r['gflops']:.1f}"] for r in rows])
    s = summary
    return "\n".join([
        "# Inside the fused MLP step (split MNIST, one seed)",
        "",
        f"Every epoch's call of `kernels.mlp_train_batches` in CLI seed {seed} (paper configuration, {s['batches']} "
        f"batches of whole-batch calls), replayed from a copy of its arguments: whole, and kernel by kernel with "
        f"each call timed (same bits, checked). Medians of {rounds} alternating rounds, per training batch, one "
        "thread.",
        "",
        table,
        "",
        f"- The whole call: **{s['whole_ms_per_batch']:.4f} ms per batch**; the parts add up to "
        f"{s['parts_ms_per_batch']:.4f} ms, which includes {s['python_calls_per_batch']:.0f} Python calls per batch "
        f"(an empty kernel call costs {s['empty_call_us']:.2f} us).",
        f"- The same calls stepping the bias of every row that its mask trains (same bits, checked): "
        f"{s['whole_every_bias_row_ms_per_batch']:.4f} ms per batch "
        f"({s['whole_every_bias_row_ms_per_batch'] / s['whole_ms_per_batch']:.3f}x the default's, which leaves out "
        f"the rows whose gradient is exactly 0; the default faster in {s['rounds_bias_rows_faster']} of {rounds} "
        "rounds).",
        f"- The three sparse products: {s['products_ms_per_batch']:.4f} ms and {s['products_mflop_per_batch']:.2f} "
        f"MFLOP per batch, **{s['products_gflops']:.1f} GFLOP/s** of useful work in their own time; the whole call "
        f"does the same work at {s['whole_gflops']:.1f} GFLOP/s (its time also holds the gathering, the loss, SGD "
        "with Omega, the bias steps and the frozen rows' copies).",
    ])


def parse_replay_options(parser, argv, rounds):
    """Add ``--rounds`` (default ``rounds``) and ``--seed`` to ``parser``, parse ``argv`` (None: the command line).
    Returns (the options, argv as a list)."""
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--seed", type=int, default=0)
    argv = sys.argv[1:] if argv is None else list(argv)
    options = parser.parse_args(argv)
    if options.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {options.rounds}")
    return options, argv


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.fused_parts", description=__doc__.splitlines()[0])
    args, argv = parse_replay_options(p, argv, rounds=5)
    machine = machine_info()
    recorded = record_epochs(args.seed)
    whole, parts, work, batches, calls = measure(recorded, args.rounds)
    rows, summary = summarize(whole, parts, work, batches, calls, empty_call_s())
    text = markdown(rows, summary, args.rounds, args.seed)
    print(text)
    write_results("fused_parts", {"seed": args.seed, "rounds": args.rounds, "parts": rows, "summary": summary,
                                  "whole_s_per_round": whole["whole"],
                                  "whole_every_bias_row_s_per_round": whole["every bias row"],
                                  "parts_s_per_round": {" / ".join(map(str, k)) if isinstance(k, tuple) else k: v
                                                        for k, v in parts.items()}},
                  text, reproduce_command("fused_parts", argv), machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
