"""What `to-ffcv` and `to-wds` share: source arguments, reading the source splits, the output folder's
identity (so a rerun resumes and a different conversion is never mixed in), and the final manifest.

An output folder holds `.convert.json` (format, source, options) while a conversion runs and
`dataset.json` (qpm_dist.data.manifest) once it is finished. Rerunning the same command resumes: finished
shards / .beton files are kept, unfinished ones (temp names) are redone. A folder holding anything else is
refused unless --force, which deletes only the files a converter writes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

PLAN_FILE = ".convert.json"
DATASETS = ("imagenet", "cub", "cars", "folder", "synthetic", "travelingbirds")


def usable_cpus() -> int:
    """CPUs this process may run on (respects affinity masks, e.g. under SLURM)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def split_name(name: str) -> str:
    """`val` is the test split's name in ImageNet and class-folder trees: accept it for `test`."""
    return "test" if name == "val" else name


class _UniqueSplits(argparse.Action):
    """`--splits test val` names one split once."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, list(dict.fromkeys(values)))


def add_source_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("out_dir", type=Path, help="output folder (give it to training as data.converted)")
    ap.add_argument("--dataset", required=True, choices=DATASETS, help="source layout, as data.dataset")
    ap.add_argument("--root", required=True, type=Path, help="source dataset folder, as data.root")
    ap.add_argument("--cub-root", type=Path, default=None,
                    help="travelingbirds: the CUB-200-2011 folder with its split and boxes, as data.cub_root")
    ap.add_argument("--crop-root", type=Path, default=None,
                    help="read pre-cropped images from this folder, as data.crop_root (train with the same)")
    ap.add_argument("--splits", nargs="+", default=["train", "test"], choices=["train", "test"], type=split_name,
                    action=_UniqueSplits,
                    help="splits to convert: train, test (or val, its name in ImageNet and folder trees); "
                         "default: both, which training needs")
    ap.add_argument("--crop-to-box", action="store_true",
                    help="store images cropped to their bounding box (CUB, Cars); train with data.crop_to_box=true")
    ap.add_argument("--val-classes", choices=["all", "train"], default="all",
                    help="imagenet: as data.val_classes; train = leave out validation images of classes without "
                         "a train folder (a class subset)")
    ap.add_argument("--max-side", type=int, default=None,
                    help="shrink images whose longer side exceeds this many pixels (default: keep the size)")
    ap.add_argument("--jpeg-quality", type=int, default=90, help="quality of re-encoded JPEGs (default %(default)s)")
    ap.add_argument("--on-corrupt", choices=["error", "skip"], default="error",
                    help="an unreadable image stops the conversion (default) or is left out with a warning; "
                         "left-out samples are listed in dataset.json")
    ap.add_argument("--decoder", choices=["torchvision", "pil"], default="torchvision", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: usable CPUs)")
    ap.add_argument("--force", action="store_true", help="replace an existing, different conversion in OUT_DIR")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")


def read_source(args):
    """The source dataset's splits through the same readers training uses (DatasetBundle)."""
    from qpm_dist.config import CROP_TO_BOX_DATASETS, DataConfig
    from qpm_dist.data.sources import read_splits

    if args.crop_to_box and args.dataset not in CROP_TO_BOX_DATASETS:  # the rule of data.crop_to_box
        raise ValueError(f"--crop-to-box: needs one bounding box per image, which --dataset {args.dataset} does not "
                         f"have (only {', '.join(CROP_TO_BOX_DATASETS)} do)")
    cfg = DataConfig(dataset=args.dataset, root=str(args.root), crop_to_box=args.crop_to_box,
                     val_classes=getattr(args, "val_classes", "all"),
                     cub_root=_path_or_none(getattr(args, "cub_root", None)),
                     crop_root=_path_or_none(getattr(args, "crop_root", None)))
    cfg.check("data")  # e.g. travelingbirds without --cub-root, --crop-root with --crop-to-box
    return read_splits(cfg)


def _path_or_none(path) -> str | None:
    return None if path is None else str(Path(path).resolve())


def split_items(bundle, split: str, crop_to_box: bool) -> list[tuple[int, str, int, list[float] | None]]:
    """(index, absolute path, label, box or None) of every sample of a split, in reader order."""
    s = bundle.train_split if split == "train" else bundle.test_split
    if crop_to_box and s.boxes is None:
        raise ValueError(f"--crop-to-box: the {split} split of this dataset has no bounding boxes")
    return [(i, str(s.image_dir / p), int(s.labels[i]), s.boxes[i].tolist() if crop_to_box else None)
            for i, p in enumerate(s.paths)]


def identity(fmt: str, args, bundle, options: dict) -> dict:
    """Everything that determines the output bytes (workers and progress bars do not)."""
    return {"format": fmt, "dataset": args.dataset, "source_root": str(Path(args.root).resolve()),
            "source_fingerprint": bundle.fingerprint, "crop_to_box": bool(args.crop_to_box),
            "cub_root": _path_or_none(args.cub_root), "crop_root": _path_or_none(args.crop_root),
            "split_names": sorted(args.splits), "options": options}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or damaged (JSONDecodeError, UnicodeDecodeError): not reused
        return None


_OWNED = re.compile(r"^(\.convert\.json|dataset\.json|(train|test)(-\d{6}\.tar|\.beton)(\.json)?|\..*\.tmp)$")


def owned(name: str) -> bool:
    """Files a converter writes into its output folder (the only ones --force deletes)."""
    return _OWNED.match(name) is not None


def prepare_output(out: Path, ident: dict, force: bool) -> str:
    """'complete' (nothing to do), 'resume' or 'new'; refuses to mix different conversions."""
    from qpm_dist.data.manifest import MANIFEST

    manifest, plan = _read_json(out / MANIFEST), _read_json(out / PLAN_FILE)
    same = lambda d: d is not None and {k: d.get(k) for k in ident} == ident  # noqa: E731
    if not force:
        if same(manifest):
            return "complete"
        if same(plan):
            return "resume"
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} is not empty and holds no unfinished conversion with these options; "
                                  f"use --force to replace its converted files, or choose another folder")
    elif out.exists():
        for entry in out.iterdir():
            if owned(entry.name) and entry.is_file():
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / PLAN_FILE, ident)
    return "new"


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def fingerprint(ident: dict) -> str:
    """Identifies the converted content: source annotations plus every option that changes pixels or order."""
    keep = {k: ident[k] for k in ("format", "dataset", "source_fingerprint", "crop_to_box", "options")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def finish(out: Path, ident: dict, bundle, splits: dict, val_classes: str = "all") -> dict:
    """Write dataset.json (last: it marks the conversion finished) and drop the plan file."""
    from qpm_dist.data.manifest import MANIFEST, VERSION

    manifest = {**ident, "version": VERSION, "num_classes": bundle.num_classes,
                "class_names": list(bundle.class_names),
                "display_names": list(bundle.display_names), "fingerprint": fingerprint(ident), "splits": splits}
    if val_classes != "all":  # for verify, which reads the source again
        manifest["val_classes"] = val_classes
    if getattr(bundle, "class_parts", None) is not None:  # synthetic ground truth, for the part metrics
        manifest["class_parts"] = bundle.class_parts.astype(int).tolist()
    write_json(out / MANIFEST, manifest)
    (out / PLAN_FILE).unlink(missing_ok=True)
    return manifest


def run_conversion(fmt: str, args, options: dict, convert_splits, describe) -> int:
    """The command both converters share: read the source, skip a finished conversion with the same options,
    convert the splits (`convert_splits(bundle) -> {split: info}`), write the manifest, print a summary line
    per split (`describe(info)`). Errors exit 2 and an interrupt 130, both saying how to resume."""
    from qpm_dist.data.decode import CorruptImageError

    name = f"to-{fmt}"
    start = time.perf_counter()
    try:
        bundle = read_source(args)
        ident = identity(fmt, args, bundle, options)
        if prepare_output(args.out_dir, ident, args.force) == "complete":
            print(f"{args.out_dir}: already converted with these options (dataset.json)")
            return 0
        manifest = finish(args.out_dir, ident, bundle, convert_splits(bundle), args.val_classes)
    except (FileNotFoundError, FileExistsError, ValueError, CorruptImageError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        print(f"{name}: finished files are kept; rerun the same command to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted; rerun the same command to resume {args.out_dir}", file=sys.stderr)
        return 130
    if not args.quiet:
        for split, info in manifest["splits"].items():
            print(f"{split}: {describe(info)}, {len(info['skipped'])} left out")
        print(f"{args.out_dir}: done in {time.perf_counter() - start:.1f} s")
    return 0


def warn(message: str) -> None:
    """To the process's real stderr, also from worker processes and while a progress bar is silenced."""
    print(f"warning: {message}", file=sys.__stderr__ or sys.stderr, flush=True)
