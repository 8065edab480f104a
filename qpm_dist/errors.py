"""Errors that name input the user gave (a path in the config that does not exist).

The CLI turns these into exit 2 ("bad input", one line, no traceback). Any other `FileNotFoundError` inside a
stage is a bug or a race on the run's own files and must stay a crash with its traceback (exit 1): reporting it
as bad input hid a race between runs sharing a stage folder (issue 18)."""

from __future__ import annotations


class MissingInput(FileNotFoundError):
    """A file or folder the config names is missing; the message starts with the config key."""
