"""The prototype library of the IIS prototype head: K concept vectors from the element pool (spec §2.6).

prototype_library  K element vectors drawn at random with a fixed seed, stratified over classes, L2-normalised;
                   the drawn elements are recorded as (train image index, element id). The reference takes rows
                   0..K-1 of its element tensor, which on ImageNet are all from the first two classes (spec bug 4).
cluster_library    the Cluster variant: scikit-learn k-means (seeded, n_init "auto") on L2-normalised element
                   vectors, centroids L2-normalised. The reference clusters the first 20,000 rows (the first ~135
                   ImageNet classes, bug 16); here at most `max_rows` rows drawn like the prototypes (stratified,
                   seeded).

The stratified draw (`stratified_draw`): each class's elements in a seeded random order, the classes in a seeded
random order, then round-robin (one element of every class per round, skipping exhausted classes) until K: the
classes differ by at most one element unless a class runs out. Positions refer to `element_index`, the pool
ordered by (image index, element id), so the draw does not depend on the world size that wrote the shards.
Memory: the index holds 4 integers per element; only the drawn rows' vectors are read (memory-mapped shards).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qpm_dist.glm.shards import read_meta, shard_paths
from qpm_dist.iis.concepts import SPLIT, BadConceptInput, ids_path


@dataclass(frozen=True)
class ElementIndex:
    """Every element of a concept pass, ordered by (image index, element id)."""

    ids: np.ndarray  # N x 2: train image index, element id
    labels: np.ndarray  # N: the image's class
    shard: np.ndarray  # N: the shard holding the row
    row: np.ndarray  # N: its row in that shard

    def __len__(self) -> int:
        return len(self.labels)


def element_index(folder: Path) -> ElementIndex:
    """The index of the element shards under `folder` (written by concepts.element_vectors)."""
    meta = read_meta(folder)
    ids, labels, shard, row = [], [], [], []
    for s in range(meta["world_size"]):
        _, y_path = shard_paths(folder, SPLIT, s)
        y = np.load(y_path)
        ids.append(np.load(ids_path(folder, s)).reshape(-1, 2))
        labels.append(y)
        shard.append(np.full(len(y), s, dtype=np.int64))
        row.append(np.arange(len(y), dtype=np.int64))
    ids_all = np.concatenate(ids)
    order = np.lexsort((ids_all[:, 1], ids_all[:, 0]))
    return ElementIndex(ids_all[order], np.concatenate(labels)[order], np.concatenate(shard)[order],
                        np.concatenate(row)[order])


def read_elements(folder: Path, index: ElementIndex, positions: np.ndarray) -> torch.Tensor:
    """The float32 vectors of the elements at `positions` of `index` (only those rows are read)."""
    positions = np.asarray(positions, dtype=np.int64)
    out = np.empty((len(positions), read_meta(folder)["dim"]), dtype=np.float32)
    for s in np.unique(index.shard[positions]):
        x_path, _ = shard_paths(folder, SPLIT, int(s))
        x = np.load(x_path, mmap_mode="r")
        here = np.flatnonzero(index.shard[positions] == s)
        out[here] = x[index.row[positions[here]]]
    return torch.from_numpy(out)


def stratified_draw(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` positions of `labels`, stratified over the classes present, seeded (see the module docstring);
    returned sorted."""
    if not 1 <= count <= len(labels):
        raise BadConceptInput(f"iis library: {count} prototypes requested from a pool of {len(labels)} elements; "
                              f"expected 1 to {len(labels)}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    pools = [pools[i] for i in rng.permutation(len(classes))]
    longest = max(len(p) for p in pools)
    rounds = np.full((longest, len(pools)), -1, dtype=np.int64)  # round r = the r-th element of every class
    for j, pool in enumerate(pools):
        rounds[:len(pool), j] = pool
    order = rounds.ravel()
    return np.sort(order[order >= 0][:count])


@dataclass(frozen=True)
class PrototypeLibrary:
    """K concept vectors (rows L2-normalised) and where they came from."""

    vectors: torch.Tensor  # K x D float32, unit rows
    kind: str  # "prototype" or "cluster"
    seed: int
    ids: np.ndarray  # prototype: K x 2 (image index, element id) of the drawn elements; cluster: the clustered rows
    labels: np.ndarray  # the classes of `ids`' images

    def save(self, path: Path) -> None:
        np.savez(path, vectors=self.vectors.numpy(), kind=self.kind, seed=self.seed, ids=self.ids, labels=self.labels)

    @classmethod
    def load(cls, path: Path) -> "PrototypeLibrary":
        with np.load(path) as z:
            return cls(torch.from_numpy(z["vectors"]), str(z["kind"]), int(z["seed"]), z["ids"], z["labels"])


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1)


def prototype_library(folder: Path, num_prototypes: int, seed: int) -> PrototypeLibrary:
    """K = `num_prototypes` elements drawn stratified at random (bug 4 fixed), L2-normalised."""
    index = element_index(folder)
    drawn = stratified_draw(index.labels, num_prototypes, seed)
    return PrototypeLibrary(_unit_rows(read_elements(folder, index, drawn)), "prototype", seed, index.ids[drawn],
                            index.labels[drawn])


def cluster_library(folder: Path, num_prototypes: int, seed: int, max_rows: int = 20000) -> PrototypeLibrary:
    """k-means centroids (K = `num_prototypes`) of at most `max_rows` L2-normalised elements drawn stratified."""
    from sklearn.cluster import KMeans

    index = element_index(folder)
    drawn = stratified_draw(index.labels, min(max_rows, len(index)), seed)
    if num_prototypes > len(drawn):
        raise BadConceptInput(f"iis library: {num_prototypes} clusters requested from {len(drawn)} elements; "
                              f"expected at most {len(drawn)}")
    x = _unit_rows(read_elements(folder, index, drawn)).double().numpy()
    kmeans = KMeans(n_clusters=num_prototypes, random_state=seed, n_init="auto").fit(x)
    centroids = _unit_rows(torch.from_numpy(kmeans.cluster_centers_).float())
    return PrototypeLibrary(centroids, "cluster", seed, index.ids[drawn], index.labels[drawn])
