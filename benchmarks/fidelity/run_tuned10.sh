#!/usr/bin/env bash
# Issue 11 section 3: the values chosen on validation data (--preset tuned, spacenet_np/tuned.py) over seeds 0-9,
# test accuracy. Trains on the whole training set, as any --preset run without --validation.
# Usage (repository root): SPACENET_DATA=../shared/data bash benchmarks/fidelity/run_tuned10.sh
set -euo pipefail
out=benchmarks/results/fidelity/tuned10
for task in split_mnist split_fashion_mnist; do
  for method in spacenet static rehearsal; do
    python -m spacenet_np.train --task "$task" --method "$method" --preset tuned --seeds 0 1 2 3 4 5 6 7 8 9 \
      --workers 2 --checkpoint-every none --quiet --out "$out/$task-$method" --overwrite
  done
done
