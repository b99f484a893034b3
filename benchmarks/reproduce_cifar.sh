#!/usr/bin/env bash
# Split CIFAR-10 with the paper's CNN, seed 0: SpaceNet, Static-SparseNN and fine-tuning, then the report.
# The three runs share the machine, one thread each (about 1.5 h on 2 cores); progress goes to OUT_DIR/logs/.
# Usage: SPACENET_DATA=DIR bash benchmarks/reproduce_cifar.sh [OUT_DIR]
#   DIR holds cifar-10-batches-py/ (e.g. tar -xJf ../shared/data/cifar-10-batches-py.tar.xz -C DIR)
set -euo pipefail
out="${1:-benchmarks/results/cifar}"
mkdir -p "$out/logs"
for method in spacenet static finetune; do
  NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
    python -m spacenet_np.train --task split_cifar10 --method "$method" --seeds 0 \
    --out "$out/split_cifar10-$method" --overwrite > "$out/logs/split_cifar10-$method.log" 2>&1 &
done
wait
python -m spacenet_np.report "$out"/split_cifar10-* --out "$out/report"
