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
echo "== Grad-CAM consistency: GC training step vs plain step (ResNet-18/50, 128 and 224 px) =="
python bench/gc_bench.py --out bench/out/gc_step.json
echo "== Grad-CAM: closed form vs double backward in the GC step (GAP and GMP heads, ResNet-18/50, 128 px) =="
python bench/gradcam_bench.py --out bench/out/gradcam.json
echo "== pointing metrics: SPG by distance transform vs the reference's per-sample meshgrids; the whole pass =="
python bench/pointing_bench.py --out bench/out/pointing.json
echo "== PixPNet push: 2 processes vs 1 on demo-sized data; peak memory at 2000 and 8000 training images =="
python bench/pixpnet_push_bench.py --out bench/out/pixpnet_push.json
echo "== IIS: representation pass 2 processes vs 1 (same shards checked); one whole IIS evaluation of the demo's dense model =="
python bench/iis_bench.py --whole --out bench/out/iis.json
echo "== IIS head training: memory beyond the shards at 100k and 400k training rows =="
python bench/iis_heads_memory.py --n 100000 400000 --dim 512 --k 200 --classes 100 --epochs 1 --out bench/out/iis_heads_memory.json
