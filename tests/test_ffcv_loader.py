"""FFCV loader: the folder backend's sample order per rank and step, equal batch counts, resume with the next
unseen batch, evaluation sharding without padding, transforms close to torchvision's, and the GPU path's
pipeline (built, not run: no GPU here). Loaders JIT-compile their pipeline (seconds each), so few are built."""

import pytest
import torch

from data_helpers import source_cfg
from qpm_dist.data.sources import build_datasets
from qpm_dist.data.loaders import EpochShardSampler

pytest.importorskip("ffcv")

from qpm_dist.data import ffcv_loader  # noqa: E402  (needs ffcv)


@pytest.fixture(scope="module")
def ffcv_dir(tiny_ffcv):
    return tiny_ffcv


def test_train_order_batches_and_resume(ffcv_dir, tiny_data):
    src = build_datasets(source_cfg("ffcv", ffcv_dir, tiny_data, num_workers=2), seed=3)
    loader = src.train_loader(8, 16, 1, 2, return_index=True)  # rank 1 of 2
    sampler = EpochShardSampler(128, 16, 1, 2, seed=3)  # what the folder backend's rank 1 reads
    truth = build_datasets(source_cfg("folder", None, tiny_data), seed=3).train_split.labels
    epochs = {}
    for epoch in (0, 3):
        loader.set_epoch(epoch)
        batches = [(x.clone(), y, i) for x, y, i in loader]  # FFCV reuses image buffers: clone to keep them
        assert len(batches) == loader.batches_per_epoch == 8
        sampler.set_epoch(epoch)
        assert torch.cat([b[2] for b in batches]).tolist() == [i for i, _ in sampler]
        for images, labels, indices in batches:
            assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
            assert labels.dtype == torch.int64 and labels.tolist() == truth[indices].tolist()
            assert -3 < images.mean() < 3 and images.std() > 0.1  # normalised
        epochs[epoch] = batches
    loader.set_epoch(3, skip_batches=5)
    rest = [(x.clone(), y, i) for x, y, i in loader]
    assert len(rest) == len(loader) == 3
    assert [b[2].tolist() for b in rest] == [b[2].tolist() for b in epochs[3][5:]]


def test_eval_shards_without_padding_and_matches_torchvision_geometry(ffcv_dir, tiny_data):
    cfg = source_cfg("ffcv", ffcv_dir, tiny_data)
    src = build_datasets(cfg, seed=0)
    folder = build_datasets(source_cfg("folder", None, tiny_data), seed=0).dataset("test", augment=False)
    seen = []
    for rank in range(3):
        for images, labels, indices in src.eval_loader("test", 5, rank, 3, return_index=True):
            seen += indices.tolist()
            for image, index in zip(images, indices.tolist()):
                # same squash to 32x32; FFCV re-encodes JPEGs and resizes with INTER_AREA, so pixels differ a bit
                assert (image - folder[index][0]).abs().mean() < 0.15
    assert sorted(seen) == list(range(32))
    assert src.eval_loader("test", 5, 0, 3) is src.eval_loader("test", 5, 0, 3)  # cached: compiled once


def test_gpu_path_moves_uint8_batches_and_normalises_on_the_device(ffcv_dir, tiny_data):
    from ffcv.transforms import NormalizeImage, ToDevice, ToTensor, ToTorchImage

    cfg = source_cfg("ffcv", ffcv_dir, tiny_data)
    cuda = torch.device("cuda", 0)
    ops = ffcv_loader.image_pipeline(cfg, True, cuda)
    assert [type(o) for o in ops[-3:]] == [ToTensor, ToDevice, ToTorchImage] and ops[-2].device == cuda
    assert not any(isinstance(o, NormalizeImage) for o in ops)  # FFCV's GPU NormalizeImage needs cupy
    assert isinstance(ffcv_loader.int_pipeline(cuda)[-1], ToDevice)
    assert isinstance(ffcv_loader.image_pipeline(cfg, True, None)[-3], NormalizeImage)  # CPU path

    class FakeLoader:  # uint8 NCHW batches as ToTorchImage delivers them
        def __iter__(self):
            yield torch.full((2, 3, 4, 4), 255, dtype=torch.uint8), torch.tensor([1, 2], dtype=torch.int32)

    batches = ffcv_loader.FFCVBatches(FakeLoader(), cfg, torch.device("cpu"), return_index=False)
    images, labels = next(iter(batches))
    expected = (1 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    assert torch.allclose(images[0, :, 0, 0], expected) and labels.dtype == torch.int64


def test_recipes_ffcv_cannot_run_are_refused_before_training(ffcv_dir, tiny_data):
    with pytest.raises(ValueError, match="augment=light is not available with data.backend=ffcv"):
        build_datasets(source_cfg("ffcv", ffcv_dir, tiny_data, augment="light"), seed=0)
    with pytest.raises(ValueError, match="data.crop_to_box"):
        build_datasets(source_cfg("ffcv", ffcv_dir, tiny_data, crop_to_box=True), seed=0)
