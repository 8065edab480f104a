"""`python -m data_prep verify OUT`: check a `to-ffcv` / `to-wds` folder sample by sample.

Checks, per split: every file's size and sha256 match dataset.json (the digest is the only check that sees
a changed byte inside an image; folders converted before digests were recorded skip it); a .beton's header,
metadata and allocation table agree with each other and the file size (the loaders' open-time checks, shared
in qpm_dist.data.integrity); the sample counts (per shard and in total) match dataset.json; every label is in
0..C-1; no sample index appears twice; every image decodes (FFCV raw images: the stored size matches).
When the source dataset named in dataset.json is still readable, also: the converted indices plus the
left-out ones are exactly the source split, and every label equals the source label. Runs over worker
processes with a progress bar; exit code 0 if everything holds, 2 if the data is damaged or inconsistent
(each problem is printed, naming its file).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from data_prep import convert

MAX_LISTED = 20


def check_wds_shard(task: tuple) -> dict:
    """Read and decode every sample of one tar shard."""
    import torch
    import webdataset as wds

    from qpm_dist.data.decode import CorruptImageError, decode
    from qpm_dist.utils import file_sha256
    from qpm_dist.data.wds_loader import IMAGE_KEYS

    torch.set_num_threads(1)
    path, decoder, digest = task
    indices, labels, errors = [], [], []
    if digest is not None and file_sha256(path) != digest:
        errors.append(f"{path}: sha256 differs from dataset.json (the file changed after conversion)")
    try:
        for sample in wds.tarfile_to_samples()(iter([{"url": path}])):
            where = f"{path}:{sample['__key__']}"
            try:
                key = next(k for k in IMAGE_KEYS if k in sample)
                indices.append(int(sample["__key__"]))
                labels.append(int(sample["cls"]))
                decode(np.frombuffer(sample[key], dtype=np.uint8), where, decoder)
            except StopIteration:
                errors.append(f"{where}: no image entry")
            except CorruptImageError as exc:
                errors.append(str(exc))
            except (KeyError, ValueError) as exc:
                errors.append(f"{where}: missing or bad field ({exc})")
    except Exception as exc:  # noqa: BLE001 - a damaged tar is a finding, not a crash
        errors.append(f"{path}: cannot read the tar ({exc})")
    return {"file": Path(path).name, "count": len(indices), "indices": indices, "labels": labels, "errors": errors}


def check_ffcv_rows(task: tuple) -> dict:
    """Decode the images of rows [start, stop) of a .beton file from their raw stored bytes."""
    import torch
    from ffcv.reader import Reader

    from qpm_dist.data.decode import CorruptImageError, decode
    from qpm_dist.data.ffcv_loader import beton_columns

    torch.set_num_threads(1)
    path, start, stop, decoder = task
    data = np.memmap(path, dtype=np.uint8, mode="r")
    table = np.sort(Reader(path).alloc_table, order="ptr")
    columns = beton_columns(path)
    errors = []
    for row in range(start, stop):
        image, label = columns["image"][row], int(columns["label"][row])
        if label < 0:  # a placeholder for a left-out source image
            continue
        ptr = int(image["data_ptr"])
        slot = int(np.searchsorted(table["ptr"], ptr))
        if slot >= len(table) or int(table["ptr"][slot]) != ptr:
            errors.append(f"{path}: row {row}: image data pointer not in the allocation table")
            continue
        blob = np.asarray(data[ptr:ptr + int(table["size"][slot])])
        h, w = int(image["height"]), int(image["width"])
        if int(image["mode"]) == 1:  # raw
            if blob.size != h * w * 3:
                errors.append(f"{path}: row {row}: raw image of {blob.size} bytes, expected {h}x{w}x3")
            continue
        try:
            shape = tuple(decode(blob, f"{path}: row {row}", decoder).shape)
            if shape != (3, h, w):
                errors.append(f"{path}: row {row}: decodes to {shape[1]}x{shape[2]}, metadata says {h}x{w}")
        except CorruptImageError as exc:
            errors.append(str(exc))
    return {"count": stop - start, "errors": errors}


def import_checkers(fmt: str, ready) -> None:
    """Pool initializer: import what the checks need when a worker starts, then put a token into `ready`. With
    FFCV these imports (torch, torchvision, FFCV, numba) take 10-30 s per process; done in the first task they
    held the bar at 0 % that long, unexplained. Now they overlap the main process's own work (its imports, the
    source labels, hashing a .beton), and `ImportingPool` counts the workers that are ready. A missing FFCV is
    reported by the main process (an initializer that raised would be restarted forever); the token comes in
    any case, so the count cannot wait forever."""
    try:
        import torch  # noqa: F401

        from qpm_dist.data.decode import decode  # noqa: F401

        if fmt == "ffcv":
            from ffcv.reader import Reader  # noqa: F401
        else:
            import webdataset  # noqa: F401
    except Exception:  # noqa: BLE001 - a missing library fails the task itself, with its message
        pass
    finally:
        ready.put(True)


class ImportingPool:
    """A spawn pool whose workers import their libraries as they start (`import_checkers`); the first `imap`
    first counts the workers that are ready, as progress, so the wait for their imports is named and counted
    from the start instead of showing as a bar at 0 %."""

    def __init__(self, workers: int, fmt: str, progress: bool) -> None:
        context = multiprocessing.get_context("spawn")  # not fork: torch (threads) is loaded in this process
        self.ready, self.workers, self.progress, self.waited = context.Queue(), workers, progress, False
        libraries = "torch and FFCV" if fmt == "ffcv" else "torch"
        self.desc = f"verify: worker processes that imported {libraries}"
        self.pool = context.Pool(workers, import_checkers, (fmt, self.ready))

    def __enter__(self) -> "ImportingPool":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.terminate()

    def imap(self, fn, tasks):
        if not self.waited:
            from qpm_dist.utils import progress as progress_bar, to_stderr

            bar = progress_bar(self.workers, self.desc, show=self.progress, unit="workers", emit=to_stderr)
            for _ in range(self.workers):
                self.ready.get()
                bar.update(1)
            bar.close()
            self.waited = True
        return self.pool.imap(fn, tasks)


def sha256_with_progress(path: Path, desc: str, progress: bool) -> str:
    """A file's sha256 (as qpm_dist.utils.file_sha256), counting MiB: an ImageNet .beton is 100s of GB, minutes."""
    import hashlib

    from qpm_dist.utils import progress as progress_bar, to_stderr

    digest, done, shown = hashlib.sha256(), 0, 0
    bar = progress_bar(-(-path.stat().st_size // 2**20), desc, show=progress, unit="MiB", emit=to_stderr)
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(2**24):
                digest.update(chunk)
                done += len(chunk)
                bar.update(-(-done // 2**20) - shown)
                shown = -(-done // 2**20)
    finally:
        bar.close()
    return digest.hexdigest()


def _source_labels(manifest: dict) -> dict[str, np.ndarray] | None:
    from qpm_dist.config import DataConfig
    from qpm_dist.data.sources import read_splits

    try:
        bundle = read_splits(DataConfig(dataset=manifest["dataset"], root=manifest["source_root"],
                                        crop_to_box=manifest["crop_to_box"], cub_root=manifest.get("cub_root"),
                                        crop_root=manifest.get("crop_root"),
                                        val_classes=manifest.get("val_classes", "all")))
    except (FileNotFoundError, ValueError) as exc:
        print(f"note: source dataset not readable ({exc}); labels are not compared with it")
        return None
    return {"train": bundle.train_split.labels, "test": bundle.test_split.labels}


def _run_tasks(fn, tasks: list, pool, desc: str, progress: bool, weight) -> list:
    from qpm_dist.utils import progress as progress_bar, to_stderr

    bar = progress_bar(sum(weight(t) for t in tasks), desc, show=progress, unit="img", emit=to_stderr)
    results = []
    try:
        for task, result in zip(tasks, pool.imap(fn, tasks) if pool else map(fn, tasks)):
            results.append(result)
            bar.update(weight(task))
    finally:
        bar.close()
    return results


def verify_split(root: Path, manifest: dict, split: str, source: dict | None, pool, workers: int,
                 progress: bool) -> list[str]:
    """Every problem found in one split, as printable lines."""
    info = manifest["splits"][split]
    decoder = manifest["options"].get("decoder", "torchvision")
    problems: list[str] = []
    if manifest["format"] == "wds":
        from qpm_dist.data.integrity import shard_problems

        problems += shard_problems(root, info["shards"])
        shards = [s for s in info["shards"] if (root / s["file"]).is_file()]  # a missing one is reported above
        tasks = [(str(root / s["file"]), decoder, s.get("sha256")) for s in shards]
        counts = {s["file"]: s["count"] for s in shards}
        results = _run_tasks(check_wds_shard, tasks, pool, f"verify {split}: images decoded", progress,
                             lambda t: counts[Path(t[0]).name])
        for r in results:
            if r["count"] != counts[r["file"]]:
                problems.append(f"{r['file']}: {r['count']} samples, dataset.json says {counts[r['file']]}")
        indices = np.array([i for r in results for i in r["indices"]], dtype=np.int64)
        labels = np.array([y for r in results for y in r["labels"]], dtype=np.int64)
        problems += [e for r in results for e in r["errors"]]
    else:
        from qpm_dist.data.ffcv_loader import beton_columns
        from qpm_dist.data.integrity import beton_problems

        path = root / info["file"]
        damaged = beton_problems(path, info.get("bytes"), info.get("rows"))
        if damaged:  # its rows cannot be located: nothing more to check
            return damaged
        if (info.get("sha256") is not None
                and sha256_with_progress(path, f"verify {split}: sha256 of {path.name}", progress) != info["sha256"]):
            problems.append(f"{path}: sha256 differs from dataset.json (the file changed after conversion)")
        columns = beton_columns(path)
        keep = columns["label"] >= 0  # label -1: placeholder of an image left out at conversion
        indices, labels = columns["index"][keep].astype(np.int64), columns["label"][keep].astype(np.int64)
        rows = len(keep)
        step = max(1, min(2000, rows // (4 * max(1, workers)) or 1))
        tasks = [(str(path), a, min(a + step, rows), decoder) for a in range(0, rows, step)]
        results = _run_tasks(check_ffcv_rows, tasks, pool, f"verify {split}: images decoded", progress,
                             lambda t: t[2] - t[1])
        problems += [e for r in results for e in r["errors"]]
    if len(indices) != info["num_samples"]:
        problems.append(f"{len(indices)} samples, dataset.json says {info['num_samples']}")
    bad = np.flatnonzero((labels < 0) | (labels >= manifest["num_classes"]))
    problems += [f"sample index {indices[b]}: label {labels[b]} not in 0..{manifest['num_classes'] - 1}" for b in bad]
    unique, counts = np.unique(indices, return_counts=True)
    problems += [f"sample index {i} appears {c} times" for i, c in zip(unique[counts > 1], counts[counts > 1])]
    if source is not None:
        expected = len(source[split])
        left_out = {s["index"] for s in info["skipped"]}
        missing = sorted(set(range(expected)) - set(unique.tolist()) - left_out)
        extra = sorted(set(unique.tolist()) - set(range(expected)))
        if missing:
            problems.append(f"{len(missing)} source samples are missing (indices {missing[:5]} ...)")
        if extra:
            problems.append(f"{len(extra)} indices do not exist in the source split ({extra[:5]} ...)")
        ok = (indices >= 0) & (indices < expected)
        wrong = np.flatnonzero(ok & (labels != source[split][np.clip(indices, 0, expected - 1)]))
        problems += [f"sample index {indices[w]}: label {labels[w]}, source says {source[split][indices[w]]}"
                     for w in wrong]
    return problems


def run(args: argparse.Namespace) -> int:
    from qpm_dist.data.manifest import load_manifest

    from qpm_dist.utils import to_stderr

    try:
        manifest = load_manifest(args.out_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"verify: error: {exc}", file=sys.stderr)
        return 2
    failed = False
    workers = args.workers or convert.usable_cpus()
    if not args.quiet:  # said at once: before the first image is decoded, every process imports its libraries
        starting = f"starting {workers} worker processes, " if workers > 1 else ""
        importing = "importing FFCV, " if manifest["format"] == "ffcv" else ""
        to_stderr(f"verify: {args.out_dir} ({manifest['format']}): {starting}{importing}reading the source labels")
    # The workers start importing now, while this process does its own imports and reads the source labels.
    with ImportingPool(workers, manifest["format"], not args.quiet) if workers > 1 else nullcontext() as pool:
        if manifest["format"] == "ffcv":
            try:
                import ffcv  # noqa: F401
            except ImportError as exc:
                print(f"verify: error: FFCV is not installed ({exc})", file=sys.stderr)
                return 2
        source = _source_labels(manifest)
        reports = {split: verify_split(args.out_dir, manifest, split, source, pool, workers, not args.quiet)
                   for split in manifest["splits"]}
    for split, problems in reports.items():
        info = manifest["splits"][split]
        left_out = f", {len(info['skipped'])} left out at conversion" if info["skipped"] else ""
        if problems:
            failed = True
            print(f"{split}: {len(problems)} problem(s){left_out}:")
            for line in problems[:MAX_LISTED]:
                print(f"  {line}")
            if len(problems) > MAX_LISTED:
                print(f"  ... and {len(problems) - MAX_LISTED} more")
        else:
            checked = " and match the source labels" if source is not None else ""
            print(f"{split}: OK: {info['num_samples']} samples decode, labels in 0..{manifest['num_classes'] - 1}"
                  f"{checked}{left_out}")
    return 2 if failed else 0


def register(subparsers) -> None:
    ap = subparsers.add_parser("verify", help="check a converted folder: counts, labels, decode every sample",
                               description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path, help="folder written by to-ffcv or to-wds")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: usable CPUs)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.set_defaults(func=run)
