"""WebDataset loader: sample-level planning, exact epochs (disjoint ranks covering the split, equal batch counts),
exact resume with the next unseen batch, the folder backend's augmentation, resampled mode, evaluation
sharding without padding, and corrupt samples inside shards."""

import io
import json
import tarfile

import pytest
import torch

from data_helpers import convert, source_cfg
from qpm_dist.data.sources import build_datasets
from qpm_dist.data.decode import CorruptImageError
from qpm_dist.data.wds_loader import even_bounds, resume_position, round_robin, stream_pieces


@pytest.fixture(scope="module")
def wds_dir(tiny_data, tmp_path_factory):
    # 128 train samples in shards of 24 (5 x 24 + 8), 32 test samples in 24 + 8
    return convert("wds", tiny_data, tmp_path_factory.mktemp("conv") / "wds", "--samples-per-shard", "24")


def source(wds_dir, tiny_data, **kw):
    return build_datasets(source_cfg("wds", wds_dir, tiny_data, **kw), seed=3)


def epoch_indices(src, epoch, micro, global_batch, rank, world, skip=0):
    loader = src.train_loader(micro, global_batch, rank, world, return_index=True)
    loader.set_epoch(epoch, skip)
    batches = list(loader)
    assert len(batches) == loader.batches_per_epoch - skip == len(loader)
    return batches


def test_planning_helpers():
    assert even_bounds(10, 3) == [0, 4, 7, 10]
    assert stream_pieces([5, 3, 4], [2, 0, 1], 2, 10) == [(2, 2, 4), (0, 0, 5), (1, 0, 1)]
    assert round_robin([3, 3, 2]) == [0, 1, 2, 0, 1, 2, 0, 1]
    assert resume_position([3, 3, 2], 4) == ([2, 1, 1], 1)
    assert resume_position([3, 3, 2], 8) == ([3, 3, 2], 0)


def test_exact_epoch_ranks_are_disjoint_equal_and_cover_the_split(wds_dir, tiny_data):
    src = source(wds_dir, tiny_data, num_workers=2)
    for world, global_batch in ((2, 16), (4, 32)):  # 128 samples: no remainder, so every sample is used
        shares = [epoch_indices(src, 1, global_batch // world, global_batch, r, world) for r in range(world)]
        assert len({len(s) for s in shares}) == 1  # equal batch counts
        seen = [int(i) for s in shares for _, _, idx in s for i in idx]
        assert sorted(seen) == list(range(128))
    labels = {int(i): int(y) for _, ys, idx in epoch_indices(src, 0, 8, 16, 0, 1) for y, i in zip(ys, idx)}
    truth = build_datasets(source_cfg("folder", None, tiny_data), seed=3).train_split.labels
    assert labels == {i: int(truth[i]) for i in labels}
    one, two = (sorted(int(i) for _, _, idx in epoch_indices(src, e, 8, 16, 0, 2) for i in idx) for e in (1, 2))
    assert one != two  # another epoch, another shard order


def test_exact_epoch_drops_less_than_one_global_batch(wds_dir, tiny_data):
    src = source(wds_dir, tiny_data)
    shares = [epoch_indices(src, 0, 10, 30, r, 3) for r in range(3)]  # 128 = 4 * 30 + 8
    seen = [int(i) for s in shares for _, _, idx in s for i in idx]
    assert [len(s) for s in shares] == [4, 4, 4] and len(seen) == len(set(seen)) == 120


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_next_unseen_batch(wds_dir, tiny_data, workers):
    src = source(wds_dir, tiny_data, num_workers=workers)
    loader = src.train_loader(8, 24, 1, 3, return_index=True)  # 5 batches per rank; 2 workers make 3 and 2
    loader.set_epoch(2)
    full = list(loader)
    for skip in (1, 2, 4):
        loader.set_epoch(2, skip)  # the same loader: its persistent workers pick up the new position
        rest = list(loader)
        fresh = epoch_indices(src, 2, 8, 24, 1, 3, skip=skip)  # a restarted process
        for (xa, ya, ia), (xb, yb, ib), (xc, _, ic) in zip(rest, full[skip:], fresh, strict=True):
            assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.equal(xa, xb)
            assert torch.equal(ic, ib) and torch.equal(xc, xb)


def test_augmentation_equals_the_folder_backend(wds_dir, tiny_data):
    """Same decoder, transform and per-sample seed (seed, epoch, index): bitwise equal tensors."""
    batches = epoch_indices(source(wds_dir, tiny_data), 4, 8, 16, 0, 1)
    folder = build_datasets(source_cfg("folder", None, tiny_data), seed=3).dataset("train", augment=True)
    images, _, indices = batches[0]
    for image, index in zip(images, indices.tolist()):
        assert torch.equal(image, folder[(index, 4)][0])


def test_resampled_mode_keeps_equal_batch_counts_and_exact_resume(wds_dir, tiny_data):
    src = source(wds_dir, tiny_data, num_workers=2, wds_mode="resampled")
    shares = [epoch_indices(src, 0, 8, 16, r, 2) for r in range(2)]
    assert [len(s) for s in shares] == [8, 8]
    full = shares[1]
    rest = epoch_indices(src, 0, 8, 16, 1, 2, skip=3)
    assert all(torch.equal(a[2], b[2]) and torch.equal(a[0], b[0]) for a, b in zip(rest, full[3:], strict=True))
    assert epoch_indices(src, 1, 8, 16, 1, 2)[0][2].tolist() != full[0][2].tolist()


@pytest.mark.parametrize("world", [2, 3])
def test_eval_shards_without_padding(wds_dir, tiny_data, world):
    src = source(wds_dir, tiny_data, num_workers=2)
    seen = []
    for rank in range(world):
        loader = src.eval_loader("test", 5, rank, world, return_index=True)
        batches = list(loader)
        assert len(batches) == len(loader)
        for images, labels, idx in batches:
            assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
            seen += idx.tolist()
    assert sorted(seen) == list(range(32))


def test_corrupt_sample_in_a_shard_stops_or_is_replaced(wds_dir, tiny_data, tmp_path):
    import shutil

    damaged = tmp_path / "wds"
    shutil.copytree(wds_dir, damaged)
    shard = damaged / "train-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad_key = members[0][0].name.split(".")[0]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name == f"{bad_key}.jpg":
                data = b"\xff\xd8\xff broken"
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    manifest = json.loads((damaged / "dataset.json").read_text())  # a well-formed shard holding a broken image,
    manifest["splits"]["train"]["shards"][0]["bytes"] = shard.stat().st_size  # not a cut one (refused at open)
    (damaged / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptImageError, match=f"train-000000.tar:{bad_key}"):
        for world_rank in range(2):
            epoch_indices(source(damaged, tiny_data), 0, 8, 16, world_rank, 2)
    lenient = source(damaged, tiny_data, on_corrupt="skip")
    with pytest.warns(RuntimeWarning, match=f"train-000000.tar:{bad_key}"):
        shares = [epoch_indices(lenient, 0, 8, 16, r, 2) for r in range(2)]
    seen = [int(i) for s in shares for _, _, idx in s for i in idx]
    assert len(seen) == 128 and int(bad_key) not in seen  # replaced by a neighbour: batches stay full


def test_backend_options_are_checked_before_training(wds_dir, tiny_data, tmp_path):
    from qpm_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.converted: data.backend=wds needs"):
        load_config(overrides=["data.backend=wds"])
    with pytest.raises(ValueError, match="converted from a 'synthetic' dataset, but data.dataset=cub"):
        source(wds_dir, tiny_data, dataset="cub")
    with pytest.raises(FileNotFoundError, match="to-wds"):
        source(tmp_path / "nothing", tiny_data)
