"""`python -m data_prep fingerprint ROOT --dataset D`: record a digest of every image file of both splits.

Why: a byte changed inside a source image (the file keeps its size and structure) often still decodes, to other
pixels; nothing else notices. With the list in place (ROOT/qpm_dist_digests.json, or `--output` and
`data.digests: PATH`), the folder backend hashes each image's bytes when it reads them and compares before
decoding (qpm_dist.data.digests): a changed image stops the run naming it, or is skipped with a warning by
`data.on_corrupt`. Run it on data you trust, e.g. right after downloading and checking the archive: it records
the files as they are (reading every byte, not decoding). Keys are paths relative to ROOT, so the dataset
folder may move. Hashing runs over `--workers` processes with a progress bar.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from contextlib import nullcontext
from pathlib import Path

from data_prep import convert

CHUNK = 256  # files per task: keeps the pool's per-task overhead well below the hashing


def hash_files(paths: list[str]) -> list[str]:
    """Digests of the files (runs in worker processes)."""
    from qpm_dist.data.digests import image_digest

    digests = []
    for path in paths:
        with open(path, "rb") as f:
            digests.append(image_digest(f.read()))
    return digests


def dataset_files(args) -> list[tuple[str, Path]]:
    """(digest-list key, absolute path) of every image of both splits, each file once."""
    from qpm_dist.data.digests import image_keys

    bundle = convert.read_source(argparse.Namespace(dataset=args.dataset, root=args.root, crop_to_box=False,
                                                    cub_root=args.cub_root))
    files: dict[str, Path] = {}
    for split in (bundle.train_split, bundle.test_split):
        for key, path in zip(image_keys(split.image_dir, split.paths, args.root), split.paths):
            files[key] = split.image_dir / path
    return sorted(files.items())


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from qpm_dist.data.digests import DIGEST_LIST, write_digest_list

    output = args.output or args.root / DIGEST_LIST
    try:
        files = dataset_files(args)
        tasks = [[str(p) for _, p in files[i:i + CHUNK]] for i in range(0, len(files), CHUNK)]
        digests: list[str] = []
        workers = min(args.workers or convert.usable_cpus(), max(1, len(tasks)))
        bar = tqdm(total=len(files), unit="img", desc="fingerprint", disable=args.quiet, file=sys.stderr)
        with multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else nullcontext() as pool:
            for chunk in pool.imap(hash_files, tasks) if pool else map(hash_files, tasks):
                digests += chunk
                bar.update(len(chunk))
        bar.close()
        write_digest_list(output, {key: d for (key, _), d in zip(files, digests)}, args.dataset)
    except (OSError, ValueError) as exc:  # a missing or unreadable image, unreadable annotations, output not writable
        print(f"fingerprint: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fingerprint: interrupted; nothing was written", file=sys.stderr)
        return 130
    if not args.quiet:
        use = "data.digests=auto uses it" if args.output is None else f"train with data.digests={output}"
        print(f"{output}: digests of {len(files)} images ({use})")
    return 0


def register(subparsers) -> None:
    ap = subparsers.add_parser("fingerprint", help="record a digest of every image, checked by the folder backend",
                               description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, help="source dataset folder, as data.root")
    ap.add_argument("--dataset", required=True, choices=convert.DATASETS, help="source layout, as data.dataset")
    ap.add_argument("--cub-root", type=Path, default=None,
                    help="travelingbirds: the CUB-200-2011 folder with its split and boxes, as data.cub_root")
    ap.add_argument("--output", type=Path, default=None,
                    help="where to write the list (default: ROOT/qpm_dist_digests.json; elsewhere: data.digests=PATH)")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: usable CPUs)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    ap.set_defaults(func=run)
