"""The IIS method (qpm_dist.methods.iis): a whole run in process, the array path, the CLI's errors, the comparison."""

from __future__ import annotations

import json

import pytest

from helpers import run_in_process, write_test_config

RATIOS, LRS = [0.0, 0.5, 0.9], [0.01, 0.1]
IIS = {"concepts": {"images_per_class": 2, "num_concepts": 8, "kind": "patches"},
       "heads": {"ratios": RATIOS, "lrs": LRS, "epochs": 2, "batch_size": 32}}
GRID = len(LRS) * (1 + len(RATIOS))  # per lr: the dense probe, then the prototype library at every ratio


@pytest.fixture(scope="module")
def iis_run(tmp_path_factory, tiny_data):
    """One whole IIS run (dense -> features -> concepts -> heads -> score -> report) of the tiny dataset."""
    root = tmp_path_factory.mktemp("iis")
    config = write_test_config(root / "iis.yaml", tiny_data, root / "runs", dense={"epochs": 1}, iis=IIS)
    records, ctx = run_in_process(config, "method=iis")
    return config, records, ctx


def test_whole_run_gives_every_job_and_an_iis_in_its_bounds(iis_run):
    from qpm_dist.iis.score import iis_area, read_manifest

    _, records, ctx = iis_run
    assert list(records) == ["dense", "iis_features", "iis_concepts", "iis_heads", "iis_score", "iis_report"]
    manifest = read_manifest(ctx.outputs["iis_heads"] / "manifest.json")
    jobs = sorted((r["library"], r["ratio"], r["lr"]) for r in manifest)
    assert jobs == sorted([("dense", None, lr) for lr in LRS] + [("prototype", s, lr) for s in RATIOS for lr in LRS])
    assert sorted(r["job"] for r in manifest) == list(range(GRID))
    score = json.loads((ctx.outputs["iis_score"] / "iis.json").read_text())["prototype"]
    # A(s) = best over lrs, A_dense = best dense probe over the same lrs, IIS = the trapezoid (spec §4)
    dense = max(r["accuracy"] for r in manifest if r["library"] == "dense")
    best = [max(r["accuracy"] for r in manifest if r["ratio"] == s) for s in RATIOS]
    assert score["dense_accuracy"] == dense and score["accuracies"] == best
    assert score["iis"] == pytest.approx(iis_area(RATIOS, best, dense), abs=1e-12)
    assert 0 < score["iis"] <= (RATIOS[-1] - RATIOS[0]) * max(score["arr"]) + 1e-12
    assert score["iis_normalised"] == pytest.approx(score["iis"] / (RATIOS[-1] - RATIOS[0]))
    metrics = json.loads((ctx.outputs["iis_score"] / "metrics.json").read_text())
    assert metrics == {"dense": {"iis": score["iis"], "iis_normalised": score["iis_normalised"],
                                 "iis_dense_probe": 100 * dense}}
    assert (ctx.outputs["iis_report"] / "arr.png").stat().st_size > 0


def test_array_job_writes_exactly_its_record_and_an_incomplete_grid_is_refused(iis_run, capsys):
    from qpm_dist.iis.score import BadManifest, read_manifest, write_manifest
    from qpm_dist.methods.iis import IncompleteGrid, score_manifest

    config, first, ctx = iis_run
    other = "iis.heads.epochs=1"  # another grid (heads key): none of its jobs is done yet
    records, job_ctx = run_in_process(config, "method=iis", other, "iis.heads.job=3")
    assert list(records)[-1] == "iis_head_job" and "iis_heads" not in records
    for stage in ("dense", "iis_features", "iis_concepts"):  # the backbone and the passes are reused, not redone
        assert job_ctx.outputs[stage] == ctx.outputs[stage] and records[stage]["digest"] == first[stage]["digest"]
    record = records["iis_head_job"]["summary"]["record"]
    assert (record["job"], record["library"], record["ratio"], record["lr"]) == (3, "prototype", 0.9, 0.01)
    assert len(list(job_ctx.run_dir.glob("iis_head_job-*"))) == 1

    with pytest.raises(IncompleteGrid, match=r"7 of 8 array jobs have not finished.*job 0 \(dense, ratio None, "
                                             r"lr 0.01\), job 1 \(prototype, ratio 0.0, lr 0.01\)") as err:
        run_in_process(config, "method=iis", other, "iis.heads.array=true")
    assert "job 3 " not in str(err.value)
    from qpm_dist.cli import main  # the CLI: the same refusal, one line, exit 2

    assert main(["iis", str(config), other, "iis.heads.array=true"]) == 2
    assert "qpm-dist: error: iis_heads: 7 of 8 array jobs have not finished" in capsys.readouterr().err

    full = read_manifest(ctx.outputs["iis_heads"] / "manifest.json")
    partial = job_ctx.run_dir / "partial.json"
    write_manifest(partial, [r for r in full if not (r["ratio"] == 0.5 and r["lr"] == 0.1)])
    with pytest.raises(BadManifest, match=r"1 job\(s\) of the grid .* have no record: prototype ratio=0.5 lr=0.1"):
        score_manifest(partial, ctx.cfg)


def test_the_comparison_shows_the_iis_in_the_scored_backbones_column(iis_run):
    from qpm_dist.report.compare import method_columns
    from qpm_dist.report.tables import table_text

    _, _, ctx = iis_run
    score = json.loads((ctx.outputs["iis_score"] / "iis.json").read_text())["prototype"]
    evaluation = ctx.run_dir / "qpm_evaluate-x"  # an evaluation whose baseline is the scored dense stage
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(json.dumps({"dense": {"accuracy": 50.0}, "qpm": {"accuracy": 40.0}}))
    (evaluation / "stage.json").write_text(json.dumps({"upstream": {"dense": ctx.keys["dense"]}}))
    try:
        columns = {c.name: c.metrics for c in method_columns(ctx.run_dir.parent)}
        assert columns["dense"] == {"accuracy": 50.0, "iis": score["iis"], "iis_normalised": score["iis_normalised"],
                                    "iis_dense_probe": 100 * score["dense_accuracy"]}
        assert "iis" not in columns["qpm"]  # QPM's own backbone was not scored
        assert "IIS of the backbone" in table_text(list(method_columns(ctx.run_dir.parent)))
    finally:
        for f in evaluation.iterdir():
            f.unlink()
        evaluation.rmdir()


@pytest.mark.parametrize("args, message", [
    (["--backbone", "nosuch"], "iis.backbone: 'nosuch' is no stage of any method"),
    (["--backbone", "./missing.pth"], "--backbone: ./missing.pth: no such file or folder"),
    (["--backbone", "{empty}"], "has no model.pt"),
    (["--job", "8"], "iis.heads.job: 8, but the grid has 8 jobs (0 to 7)"),
    (["iis.text.enabled=true"], "iis.text.concepts: the text library is enabled but no concept file is named"),
    (["iis.heads.ratios=[0.5,0.5]"], "iis.heads.ratios: expected one or more distinct ratios"),
    (["iis.backbone=null", "model.weights=/x/w.pth"], "model.weights: file not found: /x/w.pth"),
    (["--backbone", "random", "model.weights=/x/w.pth"], "'random' scores model.arch at random init, but model"),
])
def test_iis_cli_errors_are_one_line_with_exit_2(iis_run, tmp_path, capsys, args, message):
    from qpm_dist.cli import main

    config = iis_run[0]
    (tmp_path / "empty").mkdir()
    args = [a.replace("{empty}", str(tmp_path / "empty")) for a in args]
    assert main(["iis", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qpm-dist: error: ") and message in err, err


def test_sweep_file_lists_every_job(iis_run, tmp_path, capsys):
    from qpm_dist.cli import main

    sweep = tmp_path / "sweep.txt"
    assert main(["iis", str(iis_run[0]), "--sweep-file", str(sweep)]) == 0
    runs = [line for line in sweep.read_text().splitlines() if line and not line.startswith("#")]
    assert runs == [f"iis.heads.job={i}" for i in range(GRID)]
    assert f"sbatch --array=0-{GRID - 1} slurm/sweep_array.sbatch {sweep}" in capsys.readouterr().out


def test_two_process_iis_run_finishes_with_every_job(iis_run, tmp_path):
    """`qpm-dist iis` under torchrun with 2 ranks: every stage's collectives line up (rank 0's file writes inside
    a collective once deadlocked the heads and the report stages) and the grid is complete."""
    from helpers import qpm_command, run_ranks_or_fail
    from qpm_dist.iis.score import read_manifest

    config = iis_run[0]
    proc = run_ranks_or_fail(qpm_command(2, "iis", str(config), "--backbone", "random", f"run.out_dir={tmp_path}",
                                         "iis.heads.epochs=1"), 120,
                             "the 2-process IIS run did not finish within 120 s (ranks waiting in unmatched "
                             "collectives?)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IIS of random init (tiny_resnet), prototype concepts:" in proc.stdout and "report: " in proc.stdout
    (heads,) = (tmp_path / "t").glob("iis_heads-*")
    assert len(read_manifest(heads / "manifest.json")) == GRID
    assert all(r["world_size"] == 2 for r in read_manifest(heads / "manifest.json"))
