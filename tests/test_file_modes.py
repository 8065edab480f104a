"""Outputs are shared with collaborators: files written atomically (model.pt, metrics.json, report.html,
config.yaml, checkpoints) get the mode `open()` would give them under the umask, not mkstemp's 0600."""

from __future__ import annotations

import os
import stat

import pytest

from qpm_dist.config import load_config, save_config
from qpm_dist.utils import atomic_write_bytes, atomic_write_text, current_umask


@pytest.fixture
def umask():
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    assert current_umask() == mask
    atomic_write_text(tmp_path / "metrics.json", "{}")
    atomic_write_bytes(tmp_path / "model.pt", b"\0")
    save_config(load_config(None, []), tmp_path / "config.yaml")
    for name in ("metrics.json", "model.pt", "config.yaml"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
    plain = tmp_path / "plain.txt"  # what open() gives, the reference
    plain.write_text("x")
    assert stat.S_IMODE(plain.stat().st_mode) == expected
