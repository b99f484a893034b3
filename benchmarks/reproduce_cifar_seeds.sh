#!/usr/bin/env bash
# Split CIFAR-10 with the paper's CNN: SpaceNet and Static-SparseNN, seeds 0-2, the six runs in parallel on one
# Dask cluster (a `dask scheduler` and one single-threaded `dask worker` process per core on 127.0.0.1), through
# the CLI's --scheduler, then the report. About an hour on 2 cores; progress goes to OUT_DIR/logs/.
# Usage: SPACENET_DATA=DIR bash benchmarks/reproduce_cifar_seeds.sh [OUT_DIR]
#   DIR holds cifar-10-batches-py/ (e.g. tar -xJf ../shared/data/cifar-10-batches-py.tar.xz -C DIR)
set -euo pipefail
out="${1:-benchmarks/results/cifar/seeds}"
port="${PORT:-8786}"
address="tcp://127.0.0.1:$port"
mkdir -p "$out/logs"
dask scheduler --host 127.0.0.1 --port "$port" --dashboard-address :0 > "$out/logs/scheduler.log" 2>&1 &
scheduler=$!
NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
  dask worker "$address" --nworkers "$(nproc)" --nthreads 1 --dashboard-address :0 > "$out/logs/workers.log" 2>&1 &
workers=$!
trap 'kill $workers $scheduler 2>/dev/null || true' EXIT
until python -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null; do sleep 1; done
pids=()
for method in spacenet static; do
  python -m spacenet_np.train --task split_cifar10 --method "$method" --seeds 0 1 2 --scheduler "$address" \
    --out "$out/split_cifar10-$method" --overwrite > "$out/logs/split_cifar10-$method.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
python -m spacenet_np.report "$out"/split_cifar10-* --out "$out/report"
