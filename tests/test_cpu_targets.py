"""The paths that must give the same bits still do when the kernels are compiled for other CPUs.

A fastmath kernel's summation order is the compiler's choice for the CPU it compiles for, so a claim of identical
bits between two compiled paths holds on one CPU and can fail on another (it did: two dL/dW kernels agreed on Zen 4
and not on Zen 3). Each target below that this machine can run gets its own Numba cache and reruns the tests of
those claims in a child process: the fused step against the per-layer path, one call per epoch against one per
batch, frozen rows copied against computed, the serial against the parallel builds, and the convolutions' bias
gradients from block sums against NumPy's sums.
"""
import os
import platform
import subprocess
import sys
from pathlib import Path

import llvmlite.binding
import pytest

CLAIMS = [
    "tests/test_fused_step.py::test_spacenet_run_is_bit_identical_both_ways_with_the_same_softmax",
    "tests/test_fused_step.py::test_the_three_paths_give_the_same_bits_at_split_mnist_shapes",
    "tests/test_fused_step.py::test_batches_in_one_call_give_the_bits_of_one_call_per_batch",
    "tests/test_fused_step.py::test_a_diverging_loss_stops_both_ways_at_the_same_batch",
    "tests/test_frozen.py::test_copying_frozen_outputs_gives_the_same_bits",
    "tests/test_kernels.py::test_serial_and_parallel_builds_give_the_same_bits",
    "tests/test_block_sums.py",
]
AVX512 = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd")


def runnable_targets():
    """LLVM CPU names whose code this machine runs: the baseline of its architecture, and on x86 the AVX2 and
    AVX-512 generations it supports."""
    features = llvmlite.binding.get_host_cpu_features()
    targets = ["generic"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        if features.get("avx2") and features.get("fma"):
            targets.append("haswell")
        if all(features.get(f) for f in AVX512):
            targets.append("skylake-avx512")
    return targets


@pytest.mark.parametrize("cpu", runnable_targets())
def test_the_same_bits_when_compiled_for_another_cpu(cpu, tmp_path):
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES="", NUMBA_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CLAIMS], cwd=root,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"compiled for {cpu}:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}"
