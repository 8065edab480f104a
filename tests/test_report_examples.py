"""The report's example images: chosen in one streaming pass, so they work for shard backends too."""

from __future__ import annotations

import torch

from qpm_dist.models.net import ModelOutput
from qpm_dist.report.sparse import best_examples


class StubModel:
    """Images are 1x1x2 'feature maps' of two features; class c uses feature c; logits = pooled features."""

    class head:
        @staticmethod
        def class_weights():
            return torch.eye(2)

    def __call__(self, images):
        maps = images.flatten(1).view(-1, 2, 1, 1)
        feats = maps.flatten(1)
        return ModelOutput(feats, maps, feats)


def batches(rows, labels, size=2):
    images = torch.tensor(rows, dtype=torch.float32).view(-1, 2, 1, 1)
    labels = torch.tensor(labels)
    return [(images[i:i + size], labels[i:i + size]) for i in range(0, len(labels), size)]


def test_correct_strongest_example_within_the_first_limit_images():
    rows = [[5, 9], [2, 1], [3, 0], [4, 1], [9, 0], [0, 7]]  # class-0 images: 0 (wrong), 1, 2, 3, 4 (past limit)
    labels = [0, 0, 0, 0, 0, 1]
    found = best_examples(StubModel(), batches(rows, labels), {0, 1}, torch.device("cpu"), limit=4)
    image, maps, correct = found[0]
    assert correct and image.flatten().tolist() == [4, 1]  # the strongest correct one; [5, 9] is misclassified
    assert found[1][0].flatten().tolist() == [0, 7] and found[1][2]


def test_a_class_without_a_correct_image_gets_its_strongest_wrong_one_and_unseen_classes_none():
    rows = [[1, 2], [1, 5]]
    found = best_examples(StubModel(), batches(rows, [0, 0]), {0, 1}, torch.device("cpu"), limit=16)
    assert found[0][0].flatten().tolist() == [1, 2] and not found[0][2]  # equal peaks: strength 1 vs 1 -> first
    assert 1 not in found
