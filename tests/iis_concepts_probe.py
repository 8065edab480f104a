"""Run under torchrun by test_iis_concepts.py: the IIS concept pass (element vectors of SLIC segments) of a seeded
tiny model over 3 synthetic training images per class, every rank its chunks, elements cut in a DataLoader worker.

    torchrun --nproc-per-node 2 tests/iis_concepts_probe.py DATA_ROOT OUT_DIR [PAUSE_S]

Every rank prints `SUMMARY <json of element_vectors' summary>`. PAUSE_S: sleep that long after storing each chunk,
so that a test can kill the run between chunks.
"""

import json
import sys
import time

import torch

from qpm_dist import dist
from qpm_dist.config import DataConfig, ModelConfig
from qpm_dist.data.sources import read_splits
from qpm_dist.iis import concepts
from qpm_dist.iis.concepts import choice_record, concept_images, element_vectors
from qpm_dist.iis.elements import ElementConfig
from qpm_dist.models.net import build_model

IMAGES_PER_CLASS, CHUNK_IMAGES, BATCH_SIZE = 3, 2, 32


def concept_pass(root: str, out_dir: str, info, num_workers: int = 0, model_seed: int = 0) -> dict:
    data = read_splits(DataConfig(dataset="synthetic", root=root, img_size=32, num_workers=num_workers))
    torch.manual_seed(model_seed)
    model = build_model(ModelConfig(arch="tiny_resnet", tiny_width=8), data.num_classes)
    indices = concept_images(data, IMAGES_PER_CLASS, seed=0)
    return element_vectors(model, data, indices, ElementConfig(kind="segments"), out_dir, info,
                           batch_size=BATCH_SIZE, chunk_images=CHUNK_IMAGES,
                           record=choice_record(data.train_split, indices, IMAGES_PER_CLASS, seed=0))


if __name__ == "__main__":
    root, out = sys.argv[1:3]
    if len(sys.argv) > 3:
        pause, save = float(sys.argv[3]), concepts._save_chunk

        def save_and_pause(path, parts):
            save(path, parts)
            time.sleep(pause)

        concepts._save_chunk = save_and_pause
    info = dist.init("cpu")
    try:
        print("SUMMARY", json.dumps(concept_pass(root, out, info, num_workers=1)), flush=True)
    finally:  # exiting with a live gloo group aborts now and then
        dist.shutdown()
