"""Train and test transforms on uint8 CHW tensors (torchvision.transforms.v2).

Recipes (`data.augment`):
* none     – the test transform (deterministic);
* light    – squash to size x size, RandomCrop(size, padding=size//16), horizontal flip (synthetic data:
             no colour changes, because colour identifies a part);
* cub      – the reference's CUB/Cars recipe: squash (or, with crop_to_box=False, resize shorter side +
             RandomCrop(padding 4)), flip, ColorJitter(0.1, 0.1, 0.1), TrivialAugmentWide;
* imagenet – RandomResizedCrop(size), flip, ColorJitter(0.1, 0.1, 0.1) (on float32 in [0, 1]). Unlike the
             reference we always normalise (spec bug 4: ImageNet-pretrained weights expect normalised input).
Test: squash to size x size for `cub`/`light`/`none` on box-cropped data, else resize and centre-crop: the
shorter side to size for `cub` (the reference's CUB/Cars test transform), to size*256/224 for `imagenet`.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from qpm_dist.config import DataConfig


class RandomResizedCrop(v2.RandomResizedCrop):
    """v2.RandomResizedCrop (same parameters, bitwise the same pixels) that copies the crop to channels-last
    memory before resizing and returns it channels-last.

    Why: decode_jpeg returns HWC memory and torch's uint8 antialiased bilinear kernel works on channels-last
    input; given a strided crop view it repacks it internally, which made the crop + resize about 1.3x slower
    (657 against 512 us per image, docs/BENCHMARKS.md "Data loaders"). loaders.collate then stacks such
    images without transposing.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if type(inpt) is not torch.Tensor or inpt.ndim != 3:
            return super().transform(inpt, params)
        crop = F.crop(inpt, params["top"], params["left"], params["height"], params["width"])
        crop = crop.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        return F.resize(crop, self.size, interpolation=self.interpolation, antialias=self.antialias)


def _finish(cfg: DataConfig) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=cfg.mean, std=cfg.std)]


def squashes(cfg: DataConfig) -> bool:
    """The reference squashes box-cropped CUB images (cropped here or pre-cropped in data.crop_root; and our
    synthetic images) to a square."""
    return cfg.dataset == "synthetic" or cfg.crop_to_box or cfg.crop_root is not None


def eval_squashes(cfg: DataConfig) -> bool:
    """The test transform squashes to size x size (else: resize and centre-crop); the FFCV backend follows it."""
    return squashes(cfg) or cfg.augment in ("none", "light")


def eval_crop_ratio(cfg: DataConfig) -> float:
    """Centre-crop side / resized shorter side of the test transform when it does not squash."""
    return 1.0 if cfg.augment == "cub" else 224 / 256


def test_transform(cfg: DataConfig) -> v2.Compose:
    s = cfg.img_size
    if eval_squashes(cfg):
        geometry = [v2.Resize((s, s), antialias=True)]
    else:
        geometry = [v2.Resize(round(s / eval_crop_ratio(cfg)), antialias=True), v2.CenterCrop(s)]
    return v2.Compose(geometry + _finish(cfg))


def full_image_transform(cfg: DataConfig, shorter: int) -> v2.Compose:
    """The pointing metrics' reference input (specs/gc_consistency.md §7.1): the whole image, its shorter side
    resized to `shorter` (aspect kept, antialiased bilinear), no crop; so the map covers the whole original."""
    return v2.Compose([v2.Resize(shorter, antialias=True)] + _finish(cfg))


def test_point_to_source(cfg: DataConfig, width: int, height: int, x: float, y: float) -> tuple[float, float]:
    """The point of the original width x height image that the test transform moves to (x, y) of its output
    (continuous pixel coordinates), for metrics that compare map positions with boxes drawn on the original."""
    s = cfg.img_size
    if eval_squashes(cfg):
        return x * width / s, y * height / s
    # v2.Resize(int): the shorter side becomes r, the longer int(r * long / short); v2.CenterCrop(s) then cuts
    # int(round((side - s) / 2)) from the top and the left
    r = round(s / eval_crop_ratio(cfg))
    if width <= height:
        new_w, new_h = r, int(r * height / width)
    else:
        new_w, new_h = int(r * width / height), r
    left, top = int(round((new_w - s) / 2.0)), int(round((new_h - s) / 2.0))
    return (x + left) * width / new_w, (y + top) * height / new_h


def train_transform(cfg: DataConfig) -> v2.Compose:
    s = cfg.img_size
    if cfg.augment == "none":
        return test_transform(cfg)
    if cfg.augment == "light":
        ops = [v2.Resize((s, s), antialias=True), v2.RandomCrop(s, padding=max(1, s // 16)), v2.RandomHorizontalFlip()]
    elif cfg.augment == "cub":
        geometry = (
            [v2.Resize((s, s), antialias=True)]
            if squashes(cfg)
            else [v2.Resize(s, antialias=True), v2.RandomCrop(s, padding=4)]
        )
        ops = geometry + [v2.RandomHorizontalFlip(), v2.ColorJitter(0.1, 0.1, 0.1), v2.TrivialAugmentWide()]
    elif cfg.augment == "imagenet":
        # ColorJitter on float32 in [0, 1]: 2.5x faster than on uint8 (which converts to float and back in
        # each of its three ops), and it skips two intermediate roundings.
        return v2.Compose([RandomResizedCrop(s, antialias=True), v2.RandomHorizontalFlip(),
                           v2.ToDtype(torch.float32, scale=True), v2.ColorJitter(0.1, 0.1, 0.1),
                           v2.Normalize(mean=cfg.mean, std=cfg.std)])
    else:
        raise ValueError(f"data.augment: unknown recipe {cfg.augment!r}")
    return v2.Compose(ops + _finish(cfg))
