"""The stage runner in process, with fake stages: caching by content key, invalidation, targets, errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from qpm_dist import dist
from qpm_dist.config import default_config
from qpm_dist.stages.artifacts import RECORD
from qpm_dist.stages.runner import RunContext, run_stages


class FakeData:
    fingerprint = "fake-dataset-1"


class Recorder:
    """A stage that reads one config field (`run.seed` or `run.name`), writes a file and counts its runs."""

    def __init__(self, name: str, depends: tuple[str, ...] = (), field: str = "seed", fail: bool = False) -> None:
        self.name, self.depends, self.field, self.fail = name, depends, field, fail
        self.runs = 0

    def config_parts(self, cfg) -> dict:
        return {self.field: getattr(cfg.run, self.field)}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        self.runs += 1
        if self.fail:
            raise RuntimeError(f"{self.name} failed")
        inputs = {d: (ctx.outputs[d] / "out.txt").read_text() for d in self.depends}
        (out_dir / "out.txt").write_text(f"{self.name}:{self.runs}:{sorted(inputs.items())}")
        return {"runs": self.runs}


def context(tmp_path: Path, **run_fields) -> RunContext:
    cfg = default_config()
    for name, value in run_fields.items():
        setattr(cfg.run, name, value)
    return RunContext(cfg=cfg, info=dist.init("cpu"), run_dir=tmp_path, data=FakeData())


def chain() -> list[Recorder]:
    return [Recorder("a"), Recorder("b", ("a",), field="name"), Recorder("c", ("b",))]


def test_each_stage_runs_once_and_a_finished_one_is_reused(tmp_path):
    stages = chain()
    records = run_stages(stages, context(tmp_path))
    assert list(records) == ["a", "b", "c"] and [s.runs for s in stages] == [1, 1, 1]
    for stage in stages:
        folder = next(tmp_path.glob(f"{stage.name}-*"))
        record = json.loads((folder / RECORD).read_text())
        assert record["summary"] == {"runs": 1} and set(record["upstream"]) == set(stage.depends)
    again = run_stages(stages, context(tmp_path))
    assert [s.runs for s in stages] == [1, 1, 1]  # nothing reran
    assert {n: r["key"] for n, r in again.items()} == {n: r["key"] for n, r in records.items()}


def test_a_changed_input_reruns_that_stage_and_everything_downstream_into_new_folders(tmp_path):
    stages = chain()
    run_stages(stages, context(tmp_path, name="x"))
    run_stages(stages, context(tmp_path, name="y"))  # only b reads run.name
    assert [s.runs for s in stages] == [1, 2, 2]
    assert len(list(tmp_path.glob("a-*"))) == 1 and len(list(tmp_path.glob("b-*"))) == 2
    assert len(list(tmp_path.glob("c-*"))) == 2  # c's own config is unchanged; its upstream key is not


def test_a_target_runs_only_what_it_needs(tmp_path):
    stages = chain() + [Recorder("d", ("a",))]
    records = run_stages(stages, context(tmp_path), target="d")
    assert list(records) == ["a", "d"] and [s.runs for s in stages] == [1, 0, 0, 1]
    with pytest.raises(ValueError, match="unknown stage 'e'; this method has: a, b, c, d"):
        run_stages(stages, context(tmp_path), target="e")


def test_a_failed_stage_is_not_marked_finished_and_runs_again(tmp_path):
    stages = [Recorder("a"), Recorder("b", ("a",), fail=True)]
    with pytest.raises(RuntimeError, match="b failed"):
        run_stages(stages, context(tmp_path))
    assert not list(tmp_path.glob(f"b-*/{RECORD}"))
    stages[1].fail = False
    run_stages(stages, context(tmp_path))
    assert [s.runs for s in stages] == [1, 2]


def test_stage_lists_that_cannot_run_are_refused(tmp_path):
    with pytest.raises(ValueError, match="stage b depends on z, which no earlier stage produces"):
        run_stages([Recorder("a"), Recorder("b", ("z",))], context(tmp_path))
    with pytest.raises(ValueError, match="stage names must be unique; repeated: a"):
        run_stages([Recorder("a"), Recorder("a")], context(tmp_path))


class WritesNaN(Recorder):
    """A stage whose model file or training result holds NaN (as a diverged phase would write)."""

    def __init__(self, name: str, file: str) -> None:
        super().__init__(name)
        self.file = file

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        import torch

        if self.file == "model.pt":
            torch.save({"state_dict": {"w": torch.tensor([1.0, float("nan")]), "n": torch.tensor([3])}},
                       out_dir / "model.pt")
        else:
            (out_dir / "result.json").write_text(json.dumps({"test": {"loss": float("nan"), "acc": 25.0}}))
        return {}


@pytest.mark.parametrize("file, where", [("model.pt", r"model\.pt: w \(1 NaN/inf values\)"),
                                         ("result.json", r"result\.json: test\.loss=nan")])
def test_a_stage_with_nonfinite_weights_or_results_is_not_marked_finished(tmp_path, file, where):
    from qpm_dist.engine.trainer import NonFiniteError

    with pytest.raises(NonFiniteError, match=f"stage a: not marked finished, its outputs hold NaN/inf: .*{where}"):
        run_stages([WritesNaN("a", file)], context(tmp_path))
    assert not list(tmp_path.glob(f"a-*/{RECORD}"))


def test_a_stage_starting_fresh_beside_a_folder_of_the_same_stage_says_which_fields_differ(tmp_path, caplog):
    stages = chain()
    run_stages(stages, context(tmp_path, seed=0))
    old_a, old_b = (next(tmp_path.glob(f"{n}-*")).name for n in "ab")
    logger = logging.getLogger("qpm_dist")
    logger.addHandler(caplog.handler)  # also when qpm_dist's logger does not propagate (after setup_logging)
    try:
        with caplog.at_level(logging.INFO, logger="qpm_dist"):
            run_stages(stages, context(tmp_path, seed=5))
    finally:
        logger.removeHandler(caplog.handler)
    new_a = next(p.name for p in tmp_path.glob("a-*") if p.name != old_a)
    assert f"stage a: starting fresh in {new_a}; the folder {old_a} differs in seed: 0 -> 5" in caplog.text
    assert "stage b: starting fresh in " in caplog.text
    assert f"the folder {old_b} differs in its input stage a: " in caplog.text
