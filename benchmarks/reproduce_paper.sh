#!/usr/bin/env bash
# The paper's split MNIST / split Fashion-MNIST experiments: 6 methods x 5 seeds, then the report.
# Usage: SPACENET_DATA=../shared/data bash benchmarks/reproduce_paper.sh [OUT_DIR]
set -euo pipefail
out="${1:-benchmarks/results/paper}"
for task in split_mnist split_fashion_mnist; do
  for method in spacenet static rehearsal finetune joint ewc; do
    echo "== $task $method"
    python -m spacenet_np.train --task "$task" --method "$method" --seeds 0 1 2 3 4 --quiet \
      --out "$out/runs/$task-$method" --overwrite
  done
done
python -m spacenet_np.report "$out"/runs/* --out "$out/report"
