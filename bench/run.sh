#!/usr/bin/env bash
# `make bench`: every benchmark, each comparing against a baseline measured in the same run.
# Results land in bench/out/*.json; docs/BENCHMARKS.md records them with these commands.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p bench/out
echo "== engine overhead (2 ranks, gloo) =="
python -m torch.distributed.run --standalone --nproc-per-node 2 bench/engine_overhead.py --out bench/out/engine_overhead.json
echo "== feature statistics: streamed sums vs the reference's per-class loop (N=50k, F=2048, C=1000) =="
python bench/stats_bench.py --out bench/out/stats.json
echo "== solver: exactness, medium, CUB and ImageNet size =="
python bench/solver_bench.py --out bench/out/solver_bench.json
echo "== data loaders (2 loader workers; first run generates and converts the images, a few minutes) =="
python bench/loader_bench.py --out bench/out/loader.json
echo "== sparse GLM solvers: fast vs glm-saga on the same standardised features (N=20k, F=512, C=100) =="
# glm-saga's full path (100 + 100 λ, up to 2000 epochs each) takes hours on a CPU; the path is shortened for
# BOTH solvers identically (docs/BENCHMARKS.md "Sparse solvers"). Without these options: the reference's path.
python bench/sparse_bench.py --selection-points 10 --fit-points 20 --max-epochs 10 --out bench/out/sparse.json
