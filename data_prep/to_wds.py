"""`python -m data_prep to-wds OUT --dataset D --root R`: WebDataset tar shards + a per-shard index.

Each split is shuffled once (seeded) and then cut into shards of `--samples-per-shard` samples, or of about
`--shard-size` bytes, so that a shard is a random sample of the split and streaming readers need only a
small shuffle buffer. A sample is `<key>.jpg|png` (the source file's bytes unchanged, unless --crop-to-box
or --max-side asks for a re-encode), `<key>.cls` (label) and `<key>.sha` (the hex blake2b-64 digest of the
image member's bytes, which the loader checks before decoding: a changed byte inside an image is named
instead of decoding to other pixels; qpm_dist.data.digests). The key is the sample's index in the source
split (9 digits), which the loader uses to seed augmentation exactly like the folder backend. The digest
member costs 2 KB of (PAX) tar headers per sample, ~2% of a 110 KB JPEG, and ~70 us of tar reading per sample
(measured with webdataset's reader; decoding such a JPEG takes ~5 ms). Every image is decoded once
while writing, so a corrupt file is caught here (stop, or leave it out with a warning, by --on-corrupt).

Shards are written by worker processes, each to a temp name renamed when complete, with a small JSON
sidecar (count, bytes, skipped samples); a rerun skips finished shards. dataset.json lists every shard with
its sample count: the loader plans exact epochs from it without opening a tar.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from data_prep import convert

JPEG_MAGIC, PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG"


def encoded_image(path: str, box, max_side: int | None, quality: int, decoder: str) -> tuple[str, bytes]:
    """(extension, bytes) to store for one image, after a full decode check."""
    from qpm_dist.data.decode import crop_box, decode, read_bytes

    raw = read_bytes(path)
    image = decode(raw, path, decoder)  # raises CorruptImageError naming the file
    head = raw[:4].tobytes()
    too_big = max_side is not None and max(image.shape[1:]) > max_side
    if box is None and not too_big and head.startswith((JPEG_MAGIC, PNG_MAGIC)):
        return ("jpg" if head.startswith(JPEG_MAGIC) else "png"), raw.tobytes()
    if box is not None:
        image = crop_box(image, box)
    if max_side is not None and max(image.shape[1:]) > max_side:
        from torchvision.transforms.v2 import functional as F

        h, w = image.shape[1:]
        scale = max_side / max(h, w)
        image = F.resize(image, [max(1, round(h * scale)), max(1, round(w * scale))], antialias=True)
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=quality)
    return "jpg", buffer.getvalue()


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def plan_shards(items: list, seed: int, split_no: int, samples_per_shard: int | None,
                shard_bytes: float | None) -> list[list]:
    """Shuffle the split (seeded) and cut it into shards by sample count or by estimated bytes."""
    order = np.random.default_rng([seed, split_no]).permutation(len(items))
    shuffled = [items[i] for i in order]
    if samples_per_shard:
        return [shuffled[i:i + samples_per_shard] for i in range(0, len(shuffled), samples_per_shard)]
    shards, current, size = [], [], 0
    for item in shuffled:
        item_size = os.path.getsize(item[1])  # the source file: an upper bound when re-encoding shrinks it
        if current and size + item_size > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item_size
    if current:
        shards.append(current)
    return shards


def write_shard(task: tuple) -> dict:
    """Write one shard (temp name, then rename); return its sidecar record. Runs in a worker process."""
    import torch
    import webdataset as wds

    from qpm_dist.data.decode import CorruptImageError
    from qpm_dist.data.digests import image_digest
    from qpm_dist.utils import file_sha256

    torch.set_num_threads(1)
    out, name, items, opts = task
    final, tmp = Path(out) / name, Path(out) / f".{name}.tmp"
    skipped, count = [], 0
    try:
        with wds.TarWriter(str(tmp)) as sink:
            for index, path, label, box in items:
                try:
                    ext, data = encoded_image(path, box, opts["max_side"], opts["jpeg_quality"], opts["decoder"])
                except CorruptImageError as exc:
                    if opts["on_corrupt"] != "skip":
                        raise
                    convert.warn(f"{exc}; left out (--on-corrupt skip)")
                    skipped.append({"index": index, "path": path, "error": str(exc)})
                    continue
                sink.write({"__key__": f"{index:09d}", ext: data, "cls": str(label).encode(),
                            "sha": image_digest(data).encode()})
                count += 1
        record = {"file": name, "count": count, "bytes": tmp.stat().st_size, "sha256": file_sha256(tmp),
                  "skipped": skipped}
        convert.write_json(Path(out) / f"{name}.json", record)
        os.replace(tmp, final)
        return record
    finally:
        tmp.unlink(missing_ok=True)


def convert_split(out: Path, split: str, items: list, args, opts: dict, progress: bool, pool) -> dict:
    """Write the split's unfinished shards (through `pool` if given) and return its manifest entry."""
    from qpm_dist.utils import progress as progress_bar, to_stderr

    shards = plan_shards(items, args.seed, ["train", "test"].index(split), args.samples_per_shard, args.shard_size)
    names = [shard_name(split, i) for i in range(len(shards))]
    records: dict[str, dict] = {}
    todo = []
    for name, shard in zip(names, shards):
        sidecar = out / f"{name}.json"
        if (out / name).is_file() and sidecar.is_file():  # finished earlier: not rewritten
            records[name] = json.loads(sidecar.read_text())
        else:
            todo.append((str(out), name, shard, opts))
    bar = progress_bar(len(items), f"to-wds {split}: images converted", show=progress, unit="img", emit=to_stderr,
                       initial=sum(len(s) for n, s in zip(names, shards) if n in records))
    try:
        for record in pool.imap_unordered(write_shard, todo) if pool else map(write_shard, todo):
            records[record["file"]] = record
            bar.update(record["count"] + len(record["skipped"]))
    finally:
        bar.close()
    ordered = [records[n] for n in names]
    return {"num_samples": sum(r["count"] for r in ordered),
            "skipped": [s for r in ordered for s in r["skipped"]],
            "shards": [{"file": r["file"], "count": r["count"], "bytes": r["bytes"], "sha256": r.get("sha256")}
                       for r in ordered]}


def run(args: argparse.Namespace) -> int:
    if args.samples_per_shard is None and args.shard_size is None:
        args.samples_per_shard = 1000
    if (args.samples_per_shard or 1) < 1 or (args.shard_size or 1) <= 0:
        print("to-wds: error: --samples-per-shard and --shard-size must be positive", file=sys.stderr)
        return 2
    from qpm_dist.data.digests import ALGORITHM

    # sample_digest: every sample has a `.sha` member (the loader then refuses a sample without one)
    opts = {"sample_digest": ALGORITHM, "max_side": args.max_side, "jpeg_quality": args.jpeg_quality,
            "decoder": args.decoder, "on_corrupt": args.on_corrupt, "seed": args.seed,
            "samples_per_shard": args.samples_per_shard, "shard_size": args.shard_size}

    def convert_splits(bundle) -> dict:
        workers = args.workers or convert.usable_cpus()
        # spawn, not fork: safe although torch (threads) is loaded in this process
        with multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else nullcontext() as pool:
            return {s: convert_split(args.out_dir, s, convert.split_items(bundle, s, args.crop_to_box), args,
                                     opts, not args.quiet, pool) for s in args.splits}

    return convert.run_conversion("wds", args, opts, convert_splits,
                                  lambda info: f"{info['num_samples']} samples in {len(info['shards'])} shards")


def register(subparsers) -> None:
    ap = subparsers.add_parser("to-wds", help="convert a dataset to WebDataset tar shards",
                               description=__doc__.split("\n\n")[0])
    convert.add_source_arguments(ap)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, default=None, help="samples per shard (default 1000)")
    size.add_argument("--shard-size", type=float, default=None,
                      help="target shard size in bytes, e.g. 1e9 (estimated from the source files)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shuffle before sharding (default %(default)s)")
    ap.set_defaults(func=run)
