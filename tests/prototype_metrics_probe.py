"""Hand-built prototype-metric cases (test_prototype_metrics.py), and a probe run under torchrun: every rank scores
its shard (images rank::world) of the same cases, and rank 0 writes the all-reduced results as JSON.

    torchrun --nproc-per-node 2 tests/prototype_metrics_probe.py OUT.json

The consistency/stability case: 224 px input, a 2 x 2 latent grid whose receptive fields are the 40 x 40 corner
squares (so "ours" centres are (20, 20), (20, 204), ...; "upsample" centres are (56, 56), (56, 168), ...),
4 prototypes (class 0: 0 and 1, class 1: 2 and 3), 2 parts given in input pixels. Each image carries the cells
of its class's prototypes in its pixels (row 0: clean, row 1: after noise; value 10 * (2h + w)), so `locate`
reads them back; clean images are zero in channel 2, noisy ones are not.
"""

import json
import sys

import numpy as np
import torch

from qpm_dist import dist
from qpm_dist.metrics import prototypes as PM

SIZE = 224
RF_BOUNDS = torch.tensor([[[0, 40, 0, 40], [0, 40, 184, 224]], [[184, 224, 0, 40], [184, 224, 184, 224]]])
CLASS_PROTOTYPES = torch.tensor([[0, 1], [2, 3]])


def keypoints(*points):
    """ImageParts of 1x1 keypoint boxes: (part, x, y) each."""
    parts = np.array([p for p, _, _ in points], dtype=np.int64)
    boxes = np.array([[y, y + 1, x, x + 1] for _, x, y in points], dtype=np.float64).reshape(-1, 4)
    return PM.ImageParts(parts, boxes)


# index: (label, parts in input pixels, clean cells of the class's 2 prototypes, cells after noise)
CASES = {
    0: (0, keypoints((0, 10, 10), (1, 80, 80)), [(0, 0), (1, 1)], [(0, 0), (1, 1)]),
    1: (1, keypoints((0, 10, 10)), [(0, 0), (0, 1)], [(1, 1), (0, 1)]),
    2: (0, keypoints((1, 80, 80)), [(0, 0), (0, 0)], [(0, 0), (0, 0)]),
    3: (1, None, [(1, 0), (1, 1)], [(1, 0), (1, 1)]),
}
BATCHES = ([0, 1], [2, 3])  # each batch mixes the two classes


def case_image(index: int) -> torch.Tensor:
    _, _, clean, noisy = CASES[index]
    image = torch.zeros(3, SIZE, SIZE)
    for slot, ((h, w), (hn, wn)) in enumerate(zip(clean, noisy)):
        image[0, 0, slot], image[0, 1, slot] = 10.0 * (2 * h + w), 10.0 * (2 * hn + wn)
    return image


def locate(images: torch.Tensor, prototype_ids: torch.Tensor) -> torch.Tensor:
    """The cells written into the images: row 1 for a noisy image (channel 2 not zero), else row 0."""
    noisy = images[:, 2].flatten(1).abs().sum(1) > 0
    rows = torch.where(noisy, 1, 0)
    codes = torch.round(images[torch.arange(len(images)), 0, rows, : prototype_ids.shape[1]] / 10).long()
    return torch.stack([codes // 2, codes % 2], dim=-1)


def part_scores(rank: int = 0, world: int = 1) -> dict:
    batches = []
    for batch in BATCHES:
        mine = [i for i in batch if i % world == rank]
        if mine:
            batches.append((torch.stack([case_image(i) for i in mine]), torch.tensor([CASES[i][0] for i in mine]),
                            torch.tensor(mine)))
    return PM.prototype_part_scores(batches, locate, CLASS_PROTOTYPES, RF_BOUNDS, lambda i: CASES[i][1],
                                    num_parts=2, seed=7)


# ROT case: 20 x 20 one-channel images; prototype p's similarity is (p + 1) x the mean of channel 0 over its
# region R_p (20 pixels); the right relevance map is R_p's indicator.
ROT_HW = 20
ROT_REGIONS = {p: (slice(4 * p, 4 * p + 4), slice(0, 5)) for p in range(4)}


def region_similarity(images: torch.Tensor, prototype_ids) -> torch.Tensor:
    region_similarity.images += len(images)
    return torch.stack([(p + 1) * images[:, 0, ROT_REGIONS[p][0], ROT_REGIONS[p][1]].mean(dim=(1, 2))
                        for p in prototype_ids], dim=1)


region_similarity.images = 0


def region_relevance(sign: float = 1.0):
    def relevance(image, prototype_ids, index):
        maps = torch.zeros(len(prototype_ids), ROT_HW, ROT_HW)
        for row, p in enumerate(prototype_ids.tolist()):
            maps[row][ROT_REGIONS[p]] = sign
        return maps

    return relevance


ROT_VALUES = torch.tensor([1.0, 3.0, 2.0, 5.0])  # image i is this value everywhere
ROT_PROTOTYPES = torch.tensor([[0, 1], [0, 2], [3, 1], [2, 0]])  # mixed "classes": overlapping prototype sets


def rot_scores(rank: int = 0, world: int = 1) -> dict:
    mine = [i for i in range(len(ROT_VALUES)) if i % world == rank]
    images = ROT_VALUES[mine].view(-1, 1, 1, 1).expand(-1, 1, ROT_HW, ROT_HW).contiguous()
    batches = [(images[:1], ROT_PROTOTYPES[mine[:1]], mine[:1]), (images[1:], ROT_PROTOTYPES[mine[1:]], mine[1:])]
    return PM.relevance_ordering_test(batches, region_similarity, region_relevance(), num_prototypes=4,
                                      input_shape=(1, ROT_HW, ROT_HW), baseline=torch.zeros(1, ROT_HW, ROT_HW),
                                      step_fraction=0.05, batch_size=8)


if __name__ == "__main__":
    out = sys.argv[1]
    info = dist.init("cpu")
    try:
        result = {"parts": part_scores(info.rank, info.world_size), "rot": rot_scores(info.rank, info.world_size)}
        if info.rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
    finally:  # exiting with a live gloo group aborts now and then
        dist.shutdown()
