"""WebDataset backend (`data.backend: wds`): tar shards written by `python -m data_prep to-wds`.

Why not WebDataset's usual shard-level split: with whole shards per rank, ranks get different sample
counts, DDP's collectives hang at the epoch end, and "every sample once per epoch" is lost (the known
webdataset#194/#225/#250 problem). The shard index in dataset.json gives every shard's sample count, so we
plan at the sample level instead, reading tars sequentially as WebDataset intends:

exact mode (`data.wds_mode: exact`, the default)
  Epoch e concatenates the shards in a permutation seeded by (seed, e) into one stream of N samples and
  keeps the first `steps * global_batch` (steps = N // global_batch, as the folder backend drops the last
  partial global batch). Node split: rank r reads the contiguous range [r*P, (r+1)*P) of that stream,
  P = steps * global_batch / world_size, so every rank has the same number of batches and the ranks'
  samples are disjoint. Worker split: a rank's batches are divided into contiguous blocks, one per loader
  worker; a block is read as (shard, start, stop) pieces (at most two shards per block are read partly).
  Each worker shuffles its block through a buffer of `data.wds_shuffle_buffer` samples seeded by
  (seed, epoch, rank, worker), decodes and augments each sample under the seed (seed, epoch, sample index)
  exactly as the folder backend does, and batches it.
  Guarantees: per epoch the ranks' sample sets are disjoint and together are the whole split minus fewer
  than one global batch; equal batch counts; the batch sequence of a rank is a function of (seed, epoch,
  world size, micro batch, workers, buffer), and `set_epoch(epoch, skip_batches)` resumes it exactly with
  the next unseen batch. Unlike the folder backend, which samples form a step's global batch depends on
  the world size and worker count (a shuffle buffer is local by nature); each sample's augmentation does not.

resampled mode (`data.wds_mode: resampled`)
  WebDataset's `ResampledShards`: every worker draws shards with replacement from a stream seeded by
  (seed, epoch, rank, worker), for the same number of steps per epoch as exact mode (the `with_epoch`
  idiom). Samples may repeat or be missed within an epoch; equal batch counts and exact resume still hold.

Negatives of composite images (data.composites, gc.negatives=dataset): tars cannot be read by index, so the
reference's draw (three other classes uniformly, one image of each) cannot name its images. Instead a second
stream, resampled mode with a salted seed (so other shards, another shuffle and other augmentation seeds than
the positives, resumable like them), yields 3 x micro samples per batch for the same number of batches; each
positive takes the 3 in its slots, and CompositeLoader (composites.pool_negatives) replaces, on the batch's
device, a slot holding the positive's class by another sample of the 3 x micro pool with another class;
`same_class_negatives` counts the slots where the pool has none. Deviation from the reference: a negative's
class follows the data's class frequencies, not a uniform draw over the other classes, and a replaced slot
repeats a crop of the pool.

Evaluation: rank r reads the contiguous range [r*N/W, (r+1)*N/W) of the split in shard order, without
padding, so all-reduced sums count every sample once.

Damage: a missing shard or one whose size differs from dataset.json is refused at open; a tar error or too few
samples met while reading raises DataIntegrityError naming the shard and the fix (qpm_dist.data.integrity). A
sample whose image bytes differ from its `.sha` digest (or lacks it, when dataset.json says every sample has one)
is handled like an undecodable image, by `data.on_corrupt` (qpm_dist.data.digests); shards converted before
digests were recorded are read unchecked.
"""

from __future__ import annotations

import itertools
import multiprocessing
import random
import tarfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from qpm_dist.config import DataConfig
from qpm_dist.data.composites import NEGATIVES, check_classes
from qpm_dist.data.datasets import sample_seed, seeded_cpu_rng
from qpm_dist.data.decode import CorruptImageError, decode
from qpm_dist.data.digests import ImageDigestError, image_digest, mismatch_error
from qpm_dist.data.integrity import DataIntegrityError, plain_message, raise_if_damaged, repair_hint, shard_problems
from qpm_dist.data.loaders import collate
from qpm_dist.data.manifest import ConvertedSource
from qpm_dist.data.transforms import test_transform, train_transform

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm")

_NEGATIVES_SALT = 0x4E4547  # the composite negatives' stream: another seed than the positives'
Piece = tuple[int, int, int]  # (shard number, first sample, end sample) within that shard


# ------------------------------------------------------------------------------------------- planning
def even_bounds(total: int, parts: int) -> list[int]:
    """parts+1 boundaries splitting range(total) into contiguous blocks whose sizes differ by at most 1
    (the larger blocks first)."""
    base, extra = divmod(total, parts)
    bounds = [0]
    for k in range(parts):
        bounds.append(bounds[-1] + base + (k < extra))
    return bounds


def stream_pieces(counts: list[int], order: list[int], start: int, stop: int) -> list[Piece]:
    """Positions [start, stop) of the stream that concatenates shards `order` (with sample `counts`)."""
    pieces, offset = [], 0
    for shard in order:
        lo, hi = max(start, offset), min(stop, offset + counts[shard])
        if lo < hi:
            pieces.append((shard, lo - offset, hi - offset))
        offset += counts[shard]
        if offset >= stop:
            break
    return pieces


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(num_shards)]


def round_robin(counts: list[int]) -> list[int]:
    """The worker of each batch, in the order a DataLoader yields them (cycling over unexhausted workers)."""
    return [k for r in range(max(counts, default=0)) for k in range(len(counts)) if counts[k] > r]


def resume_position(counts: list[int], skip: int) -> tuple[list[int], int]:
    """After the first `skip` batches of the round-robin sequence: batches each worker has produced, and the
    worker that produces the next batch (0 if none is left)."""
    sequence = round_robin(counts)
    done = [sequence[:skip].count(k) for k in range(len(counts))]
    return done, sequence[skip] if skip < len(sequence) else 0


# ------------------------------------------------------------------------------------------- reading
def tar_error(url: str, exc: BaseException, where: str = "") -> DataIntegrityError:
    """A tar reading error as DataIntegrityError naming the shard and the fix."""
    # webdataset re-raises tar errors with args (message @ stream, stream, url)
    reason = exc.args[0] if exc.args and isinstance(exc.args[0], str) else plain_message(exc)
    return DataIntegrityError(f"{url}: cannot read the tar{where} ({reason.split(' @ ')[0]}); "
                              f"{repair_hint(Path(url).parent, 'wds')}")


def raise_tar_error(exc: BaseException) -> bool:
    """webdataset handler (resampled mode): name the shard webdataset appended to the error's args."""
    url = exc.args[-1] if exc.args and isinstance(exc.args[-1], str) else "a tar shard"
    raise tar_error(url, exc) from None


def read_pieces(pieces: list[tuple[str, int, int]]) -> Iterator[dict]:
    """The samples of each (tar path, start, stop) piece, read with WebDataset's tar reader. A shard that
    cannot be read to `stop` (cut mid-member: a tar error; at a member boundary or a damaged header: too few
    samples) raises DataIntegrityError naming it and the fix."""
    for url, start, stop in pieces:
        samples = itertools.islice(wds.tarfile_to_samples()(iter([{"url": url}])), start, stop)
        got = 0
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                break
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise tar_error(url, exc, f" after {start + got} samples") from None
            got += 1
            yield sample
        if got != stop - start:
            raise DataIntegrityError(f"{url}: {start + got} samples, dataset.json says at least {stop}; "
                                     f"{repair_hint(Path(url).parent, 'wds')}")


def _skip(n: int):
    def stage(samples):
        return itertools.islice(samples, n, None)

    return stage


def _take(n: int):
    def stage(samples):
        return itertools.islice(samples, n)

    return stage


class _SampleDecoder:
    """Raw WebDataset sample -> (augmented tensor, label[, index]); corrupt images (undecodable, or bytes that
    differ from the sample's `.sha` digest) by `data.on_corrupt`.

    Under "skip" a corrupt sample is replaced by the previous readable one of this worker (or the next one
    at the start), so batch counts stay equal on every rank; a warning names the shard and key.
    `require_digest`: the manifest says every sample has a digest, so one without it is damaged."""

    def __init__(self, transform, seed: int, epoch: int, decoder: str, on_corrupt: str, return_index: bool,
                 salt: int | None = None, first_position: int = 0, require_digest: bool = False) -> None:
        self.transform, self.seed, self.epoch = transform, seed, epoch
        self.decoder, self.on_corrupt, self.return_index = decoder, on_corrupt, return_index
        self.require_digest = require_digest
        # resampled mode: seeds follow the position in the worker's stream (a sample may be drawn twice)
        self.salt, self.first_position = salt, first_position

    def prepare(self, sample: dict, position: int):
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        if key is None:
            raise ValueError(f"{where}: no image entry (expected one of {IMAGE_KEYS})")
        index, label = int(sample["__key__"]), int(sample["cls"])  # the key is the source index
        self.check_digest(sample, key, where)
        image = decode(np.frombuffer(sample[key], dtype=np.uint8), where, self.decoder)
        seed = (sample_seed(self.seed, self.epoch, index) if self.salt is None
                else sample_seed(self.salt, self.epoch, position))
        with seeded_cpu_rng(seed):
            image = self.transform(image)
        return (image, label, index) if self.return_index else (image, label)

    def check_digest(self, sample: dict, key: str, where: str) -> None:
        """Before decoding: changed bytes may still decode, to other pixels."""
        recorded = sample.get("sha")
        if recorded is None and not self.require_digest:
            return  # converted before digests were recorded: read unchecked
        if recorded is not None and image_digest(sample[key]) == bytes(recorded).decode("ascii", "replace").strip():
            return
        fix = repair_hint(Path(str(sample.get("__url__"))).parent, "wds")
        if recorded is None:
            raise ImageDigestError(f"image {where} has no .sha digest member, but dataset.json says every sample "
                                   f"has one; {fix}")
        raise mismatch_error(where, fix)

    def __call__(self, samples: Iterator[dict]) -> Iterator[tuple]:
        last, pending = None, 0
        for position, sample in enumerate(samples, start=self.first_position):
            try:
                out = self.prepare(sample, position)
            except CorruptImageError as exc:
                if self.on_corrupt != "skip":
                    raise
                warnings.warn(f"{exc}; skipped (data.on_corrupt=skip), a neighbouring sample is used instead",
                              RuntimeWarning, stacklevel=2)
                if last is None:
                    pending += 1
                else:
                    yield last
                continue
            for _ in range(pending + 1):
                yield out
            last, pending = out, 0
        if pending:
            raise CorruptImageError(f"{pending} samples in a row could not be decoded and none after them")


# ------------------------------------------------------------------------------------------- datasets
class TrainStream(IterableDataset):
    """One rank's training batches for one epoch (iterated by a DataLoader with batch_size=None)."""

    def __init__(self, urls: list[str], counts: list[int], micro_batch: int, global_batch: int, rank: int,
                 world_size: int, num_workers: int, seed: int, transform, cfg: DataConfig,
                 return_index: bool = False, require_digest: bool = False, draws: int = 1) -> None:
        """draws: samples per planned sample (the negatives stream: 3); batches then hold draws x micro_batch
        samples, as many batches as usual. Only in resampled mode, which is not bound to the split's size."""
        if draws != 1 and cfg.wds_mode != "resampled":
            raise ValueError("TrainStream: draws > 1 needs wds_mode=resampled")
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the world size {world_size}")
        total = sum(counts)
        self.steps = total // global_batch
        if self.steps == 0:
            raise ValueError(f"the training set has {total} samples, fewer than one global batch ({global_batch})")
        self.per_rank = self.steps * global_batch // world_size
        if self.per_rank % micro_batch:
            raise ValueError(f"per-rank batch share {self.per_rank} is not a multiple of {micro_batch}")
        self.urls, self.counts = urls, counts
        self.micro, self.rank, self.world = micro_batch, rank, world_size
        self.workers = max(1, num_workers)
        self.seed, self.transform, self.cfg, self.return_index = seed, transform, cfg, return_index
        self.require_digest = require_digest
        self.batches = self.per_rank // micro_batch
        self.micro = micro_batch * draws  # after the split into worker blocks of batches, which it does not change
        bounds = even_bounds(self.batches, self.workers)
        self.worker_batches = [bounds[k + 1] - bounds[k] for k in range(self.workers)]
        self.worker_first_batch = bounds[:-1]
        # (epoch, batches to skip) in shared memory: persistent loader workers read the current values
        # each time an epoch's iteration starts (they are forked once, not per epoch).
        self._position = multiprocessing.RawArray("q", 2)

    @property
    def epoch(self) -> int:
        return self._position[0]

    @property
    def skip(self) -> int:
        return self._position[1]

    def set_position(self, epoch: int, skip: int) -> None:
        self._position[0], self._position[1] = epoch, skip

    def _logical_worker(self) -> tuple[int, int]:
        """(logical worker this process plays, batches of it already consumed): rotated on resume so the
        DataLoader's round-robin continues the uninterrupted batch sequence."""
        info = get_worker_info()
        wid = info.id if info is not None else 0
        done, nxt = resume_position(self.worker_batches, self.skip)
        k = (nxt + wid) % self.workers
        return k, done[k]

    def worker_pieces(self, epoch: int, k: int) -> list[tuple[str, int, int]]:
        order = epoch_shard_order(len(self.counts), self.seed, epoch)
        start = self.rank * self.per_rank + self.worker_first_batch[k] * self.micro
        stop = start + self.worker_batches[k] * self.micro
        return [(self.urls[s], a, b) for s, a, b in stream_pieces(self.counts, order, start, stop)]

    def _rng(self, *parts: int) -> random.Random:
        return random.Random(int(np.random.default_rng([self.seed, *parts]).integers(2**62)))

    def __iter__(self):
        k, done = self._logical_worker()
        n_batches = self.worker_batches[k] - done
        if n_batches <= 0:
            return iter(())
        buffer = self.cfg.wds_shuffle_buffer
        stream_id = self.rank * self.workers + k
        if self.cfg.wds_mode == "exact":
            pieces = self.worker_pieces(self.epoch, k)
            source = [lambda: read_pieces(pieces)]
            salt = None
        else:
            salt = int(np.random.default_rng([self.seed, self.epoch, stream_id, 1]).integers(2**62))
            source = [wds.ResampledShards(self.urls, seed=self.seed, deterministic=True, worker_seed=lambda: salt),
                      wds.tarfile_to_samples(handler=raise_tar_error)]
        decoder = _SampleDecoder(self.transform, self.seed, self.epoch, self.cfg.decoder, self.cfg.on_corrupt,
                                 self.return_index, salt=salt, first_position=done * self.micro,
                                 require_digest=self.require_digest)
        pipeline = wds.DataPipeline(
            *source,
            wds.shuffle(buffer, initial=buffer, rng=self._rng(self.epoch, stream_id, 2)),
            _skip(done * self.micro),
            decoder,
            wds.batched(self.micro, collation_fn=collate, partial=False),
            _take(n_batches),
        )
        return iter(pipeline)


class EvalStream(IterableDataset):
    """One rank's share of a split, in shard order, test transform, no padding."""

    def __init__(self, urls: list[str], counts: list[int], batch_size: int, rank: int, world_size: int,
                 num_workers: int, transform, cfg: DataConfig, seed: int, return_index: bool = False,
                 require_digest: bool = False) -> None:
        bounds = even_bounds(sum(counts), world_size)
        self.start, self.stop = bounds[rank], bounds[rank + 1]
        self.urls, self.counts, self.batch_size = urls, counts, batch_size
        self.workers = max(1, num_workers)
        self.transform, self.cfg, self.seed, self.return_index = transform, cfg, seed, return_index
        self.require_digest = require_digest

    def __len__(self) -> int:
        """Batches over all workers (each worker ends with its own partial batch)."""
        bounds = even_bounds(self.stop - self.start, self.workers)
        return sum(-(-(bounds[k + 1] - bounds[k]) // self.batch_size) for k in range(self.workers))

    def __iter__(self):
        info = get_worker_info()
        k = info.id if info is not None else 0
        bounds = even_bounds(self.stop - self.start, self.workers)
        pieces = stream_pieces(self.counts, list(range(len(self.counts))),
                               self.start + bounds[k], self.start + bounds[k + 1])
        urls = [(self.urls[s], a, b) for s, a, b in pieces]
        decoder = _SampleDecoder(self.transform, self.seed, 0, self.cfg.decoder, self.cfg.on_corrupt,
                                 self.return_index, require_digest=self.require_digest)
        pipeline = wds.DataPipeline(lambda: read_pieces(urls), decoder,
                                    wds.batched(self.batch_size, collation_fn=collate, partial=True))
        return iter(pipeline)


# ------------------------------------------------------------------------------------------- loaders
class WebDatasetTrainLoader:
    """EpochLoader over a TrainStream, with persistent workers that read (epoch, skip) when an epoch starts."""

    def __init__(self, stream: TrainStream, num_workers: int, pin_memory: bool = False) -> None:
        self.stream = stream
        # A private generator: creating an iterator must not consume the global RNG (see TrainLoader).
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                 persistent_workers=num_workers > 0, generator=torch.Generator())

    @property
    def batches_per_epoch(self) -> int:
        return self.stream.batches

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.stream.set_position(epoch, skip_batches)

    def __len__(self) -> int:
        return self.stream.batches - self.stream.skip

    def __iter__(self):
        return iter(self.loader)


class WebDatasetSource(ConvertedSource):
    """DataSource over a `to-wds` folder (`data.converted`); see the module docstring for the guarantees."""

    format = "wds"

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        super().__init__(cfg, seed)
        for split in ("train", "test"):
            # one stat per shard: a cut or replaced shard is refused here, not hours later mid-epoch
            raise_if_damaged(shard_problems(self.root, self.manifest["splits"][split]["shards"]), self.root, "wds")
        # converted with a `.sha` member per sample (older conversions have none and are read unchecked)
        self.require_digest = self.manifest["options"].get("sample_digest") is not None

    def num_samples(self, split: str) -> int:
        return int(self.manifest["splits"][split]["num_samples"])

    def shards(self, split: str) -> tuple[list[str], list[int]]:
        shards = self.manifest["splits"][split]["shards"]
        return [str(self.root / s["file"]) for s in shards], [int(s["count"]) for s in shards]

    def train_loader(self, micro_batch: int, global_batch: int, rank: int, world_size: int,
                     pin_memory: bool = False, return_index: bool = False) -> WebDatasetTrainLoader:
        urls, counts = self.shards("train")
        stream = TrainStream(urls, counts, micro_batch, global_batch, rank, world_size, self.cfg.num_workers,
                             self.seed, train_transform(self.cfg), self.cfg, return_index, self.require_digest)
        return WebDatasetTrainLoader(stream, self.cfg.num_workers, pin_memory)

    def negatives_loader(self, micro_batch: int, global_batch: int, rank: int, world_size: int,
                         pin_memory: bool = False) -> WebDatasetTrainLoader:
        """The pool of composite negatives: batch k holds 3 x micro_batch samples drawn for the k-th batch of
        `train_loader` (same arguments), with their sample indices (see the module docstring)."""
        check_classes(self.num_classes)
        urls, counts = self.shards("train")
        salted = int(np.random.default_rng([self.seed, _NEGATIVES_SALT]).integers(2**62))
        stream = TrainStream(urls, counts, micro_batch, global_batch, rank, world_size, self.cfg.num_workers, salted,
                             train_transform(self.cfg), replace(self.cfg, wds_mode="resampled"), return_index=True,
                             require_digest=self.require_digest, draws=NEGATIVES)
        return WebDatasetTrainLoader(stream, self.cfg.num_workers, pin_memory)

    def eval_loader(self, split: str, batch_size: int, rank: int, world_size: int, pin_memory: bool = False,
                    return_index: bool = False) -> DataLoader:
        urls, counts = self.shards(split)
        stream = EvalStream(urls, counts, batch_size, rank, world_size, self.cfg.num_workers,
                            test_transform(self.cfg), self.cfg, self.seed, return_index, self.require_digest)
        return DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers, pin_memory=pin_memory,
                          generator=torch.Generator())
