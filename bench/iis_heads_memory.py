"""IIS head training: memory beyond the memory-mapped shards must not grow with the number of training images.

For each N, synthetic fp16 representation shards (N x D train, N/10 test, C classes, written by 2 "ranks" as the
iis_features stage writes them) are trained on by one prototype-head job (K prototypes, S_s at 0.5) in a fresh
subprocess. A sampler thread reads /proc/self/status every 5 ms: RssAnon is the process's own (anonymous) memory,
RssFile the mapped shard pages the kernel keeps resident (page cache, shared, evictable). Reported: the peak of
each above the process's state just before training (imports, prototypes, shards opened), and the wall time.

    python bench/iis_heads_memory.py [--n 20000 200000 --dim 512 --k 200 --classes 100 --epochs 1]
        [--out bench/out/iis_heads_memory.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def status() -> dict[str, int]:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            values[name] = int(rest.split()[0]) * 1024
    return values


def write_shards(folder: Path, n: int, dim: int, classes: int) -> None:
    import numpy as np
    import torch

    from qpm_dist.glm.shards import ShardWriter, write_meta
    from qpm_dist.iis.representations import ORDER, REPRESENTATION

    rng = np.random.default_rng(0)
    means = rng.normal(size=(classes, dim)).astype(np.float32)
    rows = {}
    for split, count in (("train", n), ("test", n // 10)):
        rows[split] = []
        for r in range(2):
            m = len(range(r, count, 2))
            writer = ShardWriter(folder, split, r, m, dim, "float16")
            for a in range(0, m, 8192):
                y = rng.integers(0, classes, min(8192, m - a))
                x = means[y] + rng.normal(size=(y.size, dim)).astype(np.float32)
                writer.add(torch.from_numpy(x), torch.from_numpy(y))
            rows[split].append(writer.close())
    write_meta(folder, {"world_size": 2, "dim": dim, "dtype": "float16", "rows": rows, "order": ORDER,
                        "representation": REPRESENTATION, "pooling": "avg", "num_classes": classes})


def measure(folder: str, k: int, epochs: int) -> dict:
    import torch

    from qpm_dist.iis.heads import HeadJob, HeadOptions, train_head
    from qpm_dist.iis.representations import Representations

    reps = Representations(Path(folder))
    prototypes = torch.randn(k, reps.dim, generator=torch.Generator().manual_seed(0))
    before = status()
    peak = dict(before)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for key, value in status().items():
                peak[key] = max(peak[key], value)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    record = train_head(reps, HeadJob("bench", 0.5, 1e-2), HeadOptions(epochs=epochs), prototypes).record
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return {"train_rows": reps.num_rows("train"), "shard_bytes": reps.num_rows("train") * reps.dim * 2,
            "anon_peak_above_start_mb": (peak["RssAnon"] - before["RssAnon"]) / 2**20,
            "file_peak_above_start_mb": (peak["RssFile"] - before["RssFile"]) / 2**20,
            "seconds": round(seconds, 2), "accuracy": record["accuracy"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, nargs="+", default=[20000, 200000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--out", type=Path)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    results = []
    for n in args.n:
        with tempfile.TemporaryDirectory() as tmp:
            write_shards(Path(tmp), n, args.dim, args.classes)
            out = subprocess.run([sys.executable, __file__, "--child", tmp, str(args.k), str(args.epochs)],
                                 capture_output=True, text=True, check=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(results[-1]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"dim": args.dim, "k": args.k, "classes": args.classes, "epochs": args.epochs,
                                        "runs": results}, indent=1))


if __name__ == "__main__":
    main()
