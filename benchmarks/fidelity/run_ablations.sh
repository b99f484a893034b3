#!/usr/bin/env bash
# Issue 11 section 2: each documented deviation as a switch, on validation data (10 % of each task's training
# images held out, fixed split), seeds 0-9, both streams. Every variant changes one switch of the paper preset and
# runs on the same seeds and split as the default, so the comparison is paired by seed.
# Usage (repository root): SPACENET_DATA=../shared/data bash benchmarks/fidelity/run_ablations.sh
set -euo pipefail
out=benchmarks/results/fidelity/ablations
variant() {  # variant TASK NAME ARGS...: one train run folder of 10 seeds
  local task=$1 name=$2; shift 2
  python -m spacenet_np.train --task "$task" --method spacenet --seeds 0 1 2 3 4 5 6 7 8 9 --validation 0.1 \
    --workers 2 --checkpoint-every none --quiet --out "$out/$task/$name" --overwrite "$@"
}
for task in split_mnist split_fashion_mnist; do
  variant "$task" default
  variant "$task" bias_scope=selected --bias-scope selected
  variant "$task" bias_scope=output --bias-scope output
  variant "$task" bias_scope=none --bias-scope none
  variant "$task" softmax_scope=seen --softmax-scope seen
  variant "$task" rewire_output=true --rewire-output true
  variant "$task" rewire_last_epoch=true --rewire-last-epoch true
  variant "$task" importance=official_sum --importance official_sum
  variant "$task" budget=2pct --connections 6272 3200 80   # the paper's "2 % per task" of every layer
  variant "$task" init_fan=selected --init-fan selected
  variant "$task" init_fan=connections --init-fan connections
  variant "$task" balance_heads=norm --balance-heads norm
done
