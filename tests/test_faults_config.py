"""Fault injection, config files (issue 13): a damaged YAML config is refused with a message naming the file
(exit 2 from the CLI), or it is read as exactly the undamaged config. It is never read as a different config.

Not covered, because no reader can tell: a change that leaves valid UTF-8 YAML with in-range values (a digit
edited, a file cut exactly at the end of a line).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from damage import damaged_copies, flip_byte, standard_damages, truncate, zero_block
from qpm_dist.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _damages() -> list:
    return standard_damages() + [
        flip_byte(5),  # in the header comment
        flip_byte(lambda size: size - 2),  # in the last value
        truncate(lambda size: size - 2),  # the last value cut by one character
        zero_block(lambda size: size // 3, 1),  # a single NUL byte
    ]


@pytest.mark.parametrize("name", ["demo.yaml", "demo_qsenn.yaml"])
def test_a_damaged_config_is_refused_naming_the_file_or_read_unchanged(name, tmp_path):
    source = CONFIGS / name
    original, original_bytes = load_config(source), source.read_bytes()
    outcomes = []
    for damage, copy in damaged_copies(source, tmp_path, _damages()):
        damage.apply(copy)
        damaged = copy.read_bytes()
        try:
            loaded = load_config(copy)
        except ConfigError as exc:
            assert str(copy) in str(exc), (damage, str(exc))
            assert "\n" not in str(exc), (damage, str(exc))  # one line, as the CLI prints it
            outcomes.append("refused")
            continue
        if loaded == original:
            outcomes.append("unchanged")
        else:
            # The one undetectable damage: cut exactly at the end of a line, the rest is a valid shorter config
            # (demo.yaml's size - 100 is such a point: the last lines, engine.log_every_steps and wandb, are gone).
            cut_at_line_end = original_bytes.startswith(damaged) and damaged.endswith(b"\n")
            assert cut_at_line_end, f"{damage}: {copy} was read as a different config"
            outcomes.append("cut at a line end")
    assert outcomes.count("refused") >= len(_damages()) - 1, outcomes


def test_the_cli_exits_2_with_one_line_naming_the_damaged_file(tmp_path, capsys):
    from qpm_dist import cli

    messages = {}
    for damage, copy in damaged_copies(CONFIGS / "demo.yaml", tmp_path, [truncate(0), truncate(lambda s: s // 2),
                                                                         flip_byte(16), zero_block(700, 8)]):
        damage.apply(copy)
        assert cli.main(["print-config", str(copy)]) == 2, damage
        err = capsys.readouterr().err
        assert err.startswith(f"qpm-dist: error: {copy}") and err.count("\n") == 1, err
        messages[damage.name] = err
    assert "no settings" in messages["truncate(0)"]
    assert "cut short" in messages["truncate(f)"]
    assert "line 1: not UTF-8 text (byte 16)" in messages["flip_byte(16)"]
    assert "line 23: character #x0000 is not allowed in YAML" in messages["zero_block(700,8)"]
