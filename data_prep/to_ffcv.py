"""`python -m data_prep to-ffcv OUT --dataset D --root R`: one FFCV .beton file per split.

Fields: `image` (RGBImageField), `label`, `index` (the sample's position in the source split). The image
options are FFCV's, named as ffcv-imagenet uses them: `--write-mode jpg|raw|proportion`, `--max-side`
(FFCV's max_resolution), `--jpeg-quality`, `--compress-probability` (share of JPEG-compressed images in
proportion mode). ffcv-imagenet's ResNet-50 data is `--write-mode proportion --compress-probability 0.5
--max-side 500 --jpeg-quality 90`, its ResNet-18 data `... 0.1 --max-side 400 ...`.

FFCV's DatasetWriter runs the worker processes; its unlabelled progress bar is replaced by ours
(`qpm_dist.utils.progress`: a labelled bar on a terminal, lines in a log file). It waits forever for a worker
that died, so our reader never raises inside it: an unreadable image is written as a tiny placeholder with
label -1 and a warning naming the file; afterwards the labels are read back, the placeholders are listed in
dataset.json (the loader leaves them out) or, with --on-corrupt error, the split fails naming every file.
Each split is written to a temp name and renamed when complete: a rerun keeps finished splits.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from data_prep import convert

PLACEHOLDER_LABEL = -1


class SourceImages:
    """Indexable (image HWC uint8, label, index) for FFCV's writer; never raises (see module docstring)."""

    def __init__(self, items: list, decoder: str, seed: int) -> None:
        self.items, self.decoder, self.seed = items, decoder, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from qpm_dist.data.decode import crop_box, read_image

        index, path, label, box = self.items[i]
        # FFCV's proportion mode draws from np.random: seeding per sample makes the output reproducible.
        np.random.seed(np.random.SeedSequence([self.seed, index]).generate_state(1)[0])
        try:
            image = read_image(path, self.decoder)
            if box is not None:
                image = crop_box(image, box)
            return np.ascontiguousarray(image.permute(1, 2, 0).numpy()), label, index
        except Exception as exc:  # noqa: BLE001 - anything raised here would hang FFCV's writer
            convert.warn(f"{exc if path in str(exc) else f'{path}: {exc}'}; written as a placeholder")
            return np.zeros((8, 8, 3), dtype=np.uint8), PLACEHOLDER_LABEL, index


def convert_split(out: Path, split: str, items: list, args, progress: bool) -> dict:
    from functools import partial
    from unittest import mock

    import ffcv.writer
    import torch
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from qpm_dist.data.ffcv_loader import beton_columns
    from qpm_dist.utils import file_sha256, progress as progress_bar, to_stderr

    name = f"{split}.beton"
    sidecar = out / f"{name}.json"
    if (out / name).is_file() and sidecar.is_file():
        print(f"to-ffcv {split}: {out / name} finished earlier, kept", file=sys.stderr)
        return convert._read_json(sidecar)
    tmp = out / f".{name}.tmp"
    torch.set_num_threads(1)
    fields = {
        "image": RGBImageField(write_mode=args.write_mode, max_resolution=args.max_side,
                               jpeg_quality=args.jpeg_quality, compress_probability=args.compress_probability),
        "label": IntField(),
        "index": IntField(),
    }
    writer = DatasetWriter(str(tmp), fields, num_workers=args.workers or convert.usable_cpus())
    if progress and not sys.stderr.isatty():
        to_stderr(f"to-ffcv {split}: writing {len(items)} images into {tmp.name}")
    # FFCV's writer draws `tqdm(total=N)` with no label and updates it as its workers finish images: it gets
    # our reporter instead (which has tqdm's update/close), labelled, as lines in a log file, silent with --quiet.
    bar = partial(progress_bar, desc=f"to-ffcv {split}: images converted", show=progress, unit="img", emit=to_stderr)
    with mock.patch.object(ffcv.writer, "tqdm", bar):
        writer.from_indexed_dataset(SourceImages(items, args.decoder, args.seed), chunksize=args.chunk_size)
    columns = beton_columns(tmp)
    labels, indices = columns["label"], columns["index"]
    bad = np.flatnonzero(labels == PLACEHOLDER_LABEL)
    by_index = {item[0]: item[1] for item in items}
    skipped = [{"index": int(indices[b]), "path": by_index[int(indices[b])]} for b in bad]
    if args.on_corrupt == "skip":
        for entry in skipped:
            convert.warn(f"{entry['path']}: unreadable, left out of {name} (--on-corrupt skip)")
    elif skipped:
        tmp.unlink()
        listing = "\n  ".join(s["path"] for s in skipped)
        raise ValueError(f"{len(skipped)} unreadable image(s) in the {split} split (use --on-corrupt skip to "
                         f"leave them out):\n  {listing}")
    # bytes: checked by the loader at open; sha256: by `verify` (the only check that sees a changed image byte)
    record = {"file": name, "num_samples": int(len(labels) - len(bad)), "rows": int(len(labels)),
              "bytes": tmp.stat().st_size, "sha256": file_sha256(tmp), "skipped": skipped}
    convert.write_json(sidecar, record)
    os.replace(tmp, out / name)
    return record


def run(args: argparse.Namespace) -> int:
    try:
        import ffcv  # noqa: F401
    except ImportError as exc:
        print(f"to-ffcv: error: FFCV is not installed ({exc}); see requirements/ffcv.txt", file=sys.stderr)
        return 2
    if not 0.0 <= args.compress_probability <= 1.0 or not 1 <= args.jpeg_quality <= 100:
        print("to-ffcv: error: need 0 <= --compress-probability <= 1 and 1 <= --jpeg-quality <= 100", file=sys.stderr)
        return 2
    opts = {"write_mode": args.write_mode, "max_side": args.max_side, "jpeg_quality": args.jpeg_quality,
            "compress_probability": args.compress_probability, "decoder": args.decoder,
            "on_corrupt": args.on_corrupt, "seed": args.seed}

    def convert_splits(bundle) -> dict:
        return {s: convert_split(args.out_dir, s, convert.split_items(bundle, s, args.crop_to_box), args,
                                 not args.quiet) for s in args.splits}

    return convert.run_conversion("ffcv", args, opts, convert_splits,
                                  lambda info: f"{info['num_samples']} samples in {info['file']}")


def register(subparsers) -> None:
    ap = subparsers.add_parser("to-ffcv", help="convert a dataset to FFCV .beton files",
                               description=__doc__.split("\n\n")[0])
    convert.add_source_arguments(ap)
    ap.add_argument("--write-mode", choices=["jpg", "raw", "proportion"], default="jpg",
                    help="FFCV RGBImageField write_mode (default %(default)s)")
    ap.add_argument("--compress-probability", type=float, default=0.5,
                    help="proportion mode: share of images stored as JPEG (default %(default)s)")
    ap.add_argument("--chunk-size", type=int, default=100, help="samples per writer task (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of proportion mode's choice (default %(default)s)")
    ap.set_defaults(func=run)
