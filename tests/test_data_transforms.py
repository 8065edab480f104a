"""The speed-ups of the image pipeline change no pixel: our RandomResizedCrop equals torchvision's, the
channels-last collate equals torch.stack, and per-sample seeding leaves the caller's RNG untouched."""

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from qpm_dist.data.datasets import seeded_cpu_rng
from qpm_dist.data.decode import read_image
from qpm_dist.data.loaders import collate
from qpm_dist.data.transforms import RandomResizedCrop


def test_random_resized_crop_is_bitwise_torchvisions(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (75, 100, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=90)
    image = read_image(tmp_path / "a.jpg")  # HWC memory, as decode_jpeg returns it
    ours, theirs = RandomResizedCrop(32, antialias=True), v2.RandomResizedCrop(32, antialias=True)
    for seed in range(20):
        torch.manual_seed(seed)
        a = ours(image)
        torch.manual_seed(seed)
        b = theirs(image)
        assert torch.equal(a, b) and a.shape == (3, 32, 32)
        assert a.stride(0) == 1  # channels-last memory


def test_collate_keeps_values_and_uses_channels_last_for_channels_last_images():
    images = [torch.randint(0, 255, (8, 6, 3), dtype=torch.uint8).permute(2, 0, 1) for _ in range(4)]
    batch = collate([(im, i) for i, im in enumerate(images)])
    assert torch.equal(batch[0], torch.stack(images)) and batch[0].is_contiguous(memory_format=torch.channels_last)
    assert batch[1].tolist() == [0, 1, 2, 3]
    plain = collate([(im.contiguous(), i, 7) for i, im in enumerate(images)])
    assert torch.equal(plain[0], torch.stack(images)) and plain[0].is_contiguous() and plain[2].tolist() == [7] * 4


def test_seeded_cpu_rng_is_reproducible_and_restores_the_callers_stream():
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    with seeded_cpu_rng(42):
        first = torch.rand(2)
    with seeded_cpu_rng(42):
        second = torch.rand(2)
    assert torch.equal(first, second)
    assert torch.equal(torch.rand(3), expected)
