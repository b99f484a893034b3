#!/usr/bin/env bash
# Issue 11 section 3: random search under the paper's protocol, selected on validation data only.
# Fixed: 784-400-400-10, 4 epochs per task, batch 128, plain SGD, the default per-task connection budget
# (10000/1640/80), no stored data for spacenet and static. Searched: lr, rewire ratio, selected and reserved neurons
# per layer, the init bound and the ablation switches (incl. head balancing). 10 % of each task's training images
# are held out as validation data (fixed split); --final-seeds then trains the chosen configuration on seeds 0-9
# (same training part) and reports its test accuracy.
# Usage (repository root): SPACENET_DATA=../shared/data bash benchmarks/fidelity/run_search.sh [TRIALS_SPACENET]
set -euo pipefail
out=benchmarks/results/fidelity/search
n_spacenet=${1:-100}
common=(--seeds 0 1 2 --validation 0.1 --workers 2 --sweep-seed 11 --quiet)
neurons=(--search selected.0=choice:60,80,100,120 --search selected.1=choice:60,80,100,120
         --search reserved.0=int:20:60 --search reserved.1=int:20:60)
switches=(--search init_fan=choice:layer,selected,connections --search bias_scope=choice:free,selected,output,none
          --search importance=choice:paper,official_sum --search balance_heads=choice:none,norm)
rewiring=(--search rewire_ratio=uniform:0.05:0.5 --search rewire_output=choice:false,true
          --search rewire_last_epoch=choice:false,true)
for task in split_mnist split_fashion_mnist; do
  python -m spacenet_np.sweep --task "$task" --method spacenet --search lr=loguniform:0.003:0.1 "${rewiring[@]}" \
    "${neurons[@]}" "${switches[@]}" --search softmax_scope=choice:all,seen --trials "$n_spacenet" "${common[@]}" \
    --out "$out/$task-spacenet"
  python -m spacenet_np.sweep --task "$task" --method static --search lr=loguniform:0.003:0.1 \
    "${neurons[@]}" "${switches[@]}" --trials 40 "${common[@]}" --out "$out/$task-static"
  python -m spacenet_np.sweep --task "$task" --method rehearsal --search lr=loguniform:0.003:0.1 \
    --search rewire_ratio=uniform:0.05:0.5 "${neurons[@]}" --search init_fan=choice:layer,selected,connections \
    --search bias_scope=choice:free,selected,output,none --trials 24 "${common[@]}" --out "$out/$task-rehearsal"
done
