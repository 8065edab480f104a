"""IIS's representation pass (qpm_dist.iis.representations, the stage iis_features): throughput with 2 processes vs
1 on the demo data (issue 17: "representation-pass throughput with 2 processes vs 1"), and optionally the wall time
of one whole IIS evaluation (`--whole`: `qpm-dist iis` of the demo's trained dense model on 2 processes, every IIS
stage afresh from a copy of runs/demo's dense stage; issue 17's "wall time of one whole IIS evaluation on the demo
data").

The pass is the real stage run by the real CLI: `qpm-dist run configs/demo_iis.yaml --stage iis_features
iis.backbone=random` in a fresh run folder per measurement (the random-init backbone needs no training and costs
the same forward as the trained one), once with 1 process and once under torchrun with 2 (gloo, CPU). Its time is
the stage's own `seconds` (stage.json: model load, both splits streamed, shards written, meta gathered), divided
into the rows written (train + test). Both runs must write the same representations (compared in sample order,
fp16, exactly), or the bench stops: the 2-process pass is the 1-process pass, split.

    OMP_NUM_THREADS=1 python bench/iis_bench.py [--data data/synthetic] [--rounds 2] [--whole]
        [--out bench/out/iis.json] [overrides of the --whole run]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gc_bench import machine

REPO = Path(__file__).resolve().parents[1]


def qpm(nproc: int, *args: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "qpm_dist", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
            "qpm_dist", *args]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    e.update(OMP_NUM_THREADS=e.get("OMP_NUM_THREADS", "1"), WANDB_MODE="disabled",
             PYTHONPATH=os.pathsep.join(p for p in (str(REPO), e.get("PYTHONPATH", "")) if p))
    return e


def representation_pass(nproc: int, data: str, out_dir: Path) -> dict:
    """One iis_features stage in a fresh run folder; its seconds, rows and representations (sample order)."""
    from qpm_dist.iis.representations import Representations

    cmd = qpm(nproc, "run", str(REPO / "configs/demo_iis.yaml"), "--stage", "iis_features", "iis.backbone=random",
              f"data.root={data}", f"run.out_dir={out_dir}", "engine.progress=false", "wandb.mode=disabled")
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    (folder,) = (out_dir / "demo").glob("iis_features-*")
    record = json.loads((folder / "stage.json").read_text())
    reps = Representations(folder)
    rows = sum(reps.num_rows(s) for s in reps.splits)
    x = {s: reps.in_sample_order(s) for s in reps.splits}
    return {"seconds": record["seconds"], "rows": rows, "x": x}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data/synthetic"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--whole", action="store_true", help="also time `qpm-dist iis configs/demo_iis.yaml` "
                                                              "(2 processes; runs/demo's dense stage is reused)")
    parser.add_argument("--out", default=str(REPO / "bench/out/iis.json"))
    parser.add_argument("overrides", nargs="*", help="config overrides of the --whole run (e.g. iis.heads.epochs=5)")
    args = parser.parse_args()
    result: dict = {"machine": machine(), "data": args.data, "pass": {}}
    reference = None
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in (1, 2):
            times, rows = [], 0
            for r in range(args.rounds):
                run = representation_pass(nproc, args.data, Path(tmp) / f"w{nproc}-{r}")
                times.append(run["seconds"])
                rows = run["rows"]
                if reference is None:
                    reference = run["x"]
                for split, (x, y) in run["x"].items():
                    if not (np.array_equal(x, reference[split][0]) and np.array_equal(y, reference[split][1])):
                        raise SystemExit(f"{nproc} processes wrote other {split} representations than 1 process")
            seconds = statistics.median(times)
            result["pass"][nproc] = {"seconds": times, "median_seconds": seconds, "rows": rows,
                                     "images_per_second": rows / seconds}
            print(f"representation pass, {nproc} process(es): {rows} images, median {seconds:.2f} s "
                  f"({rows / seconds:.0f} images/s; runs {times})", flush=True)
    result["speedup_2_vs_1"] = result["pass"][1]["median_seconds"] / result["pass"][2]["median_seconds"]
    result["same_representations"] = True
    print(f"2 processes vs 1: {result['speedup_2_vs_1']:.2f}x (identical representations)")
    if args.whole:
        dense = sorted((REPO / "runs/demo").glob("dense-*/stage.json"))
        if not dense:
            raise SystemExit("--whole: no finished runs/demo/dense-*; run `torchrun --nproc-per-node 2 -m qpm_dist run "
                             "configs/demo.yaml --stage dense` first")
        with tempfile.TemporaryDirectory() as tmp:  # the trained dense stage only: every IIS stage runs afresh
            shutil.copytree(dense[-1].parent, Path(tmp) / "demo" / dense[-1].parent.name)
            start = time.perf_counter()
            proc = subprocess.run(qpm(2, "iis", "configs/demo_iis.yaml", f"data.root={args.data}",
                                      f"run.out_dir={tmp}", "engine.progress=false", *args.overrides),
                                  cwd=REPO, env=env(), capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"qpm-dist iis failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
            result["whole_iis_seconds"] = time.perf_counter() - start
            result["whole_iis_stage_seconds"] = {
                p.parent.name.split("-")[0]: json.loads(p.read_text())["seconds"]
                for p in sorted((Path(tmp) / "demo").glob("iis_*/stage.json"))}
        result["whole_iis_output"] = proc.stdout.strip().splitlines()
        print(f"one whole IIS evaluation (2 processes, from the trained dense stage): "
              f"{result['whole_iis_seconds']:.1f} s; stages {result['whole_iis_stage_seconds']}\n{proc.stdout}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
