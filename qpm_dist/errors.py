"""Errors that mean: the input the user gave is wrong (missing, damaged, inconsistent), not that qpm-dist is.

The CLI reports every `BadInput` in one line naming the file or key, with exit 2 and no traceback; each module
raises its own subclass (a damaged shard, a damaged stage output, a damaged checkpoint, a missing path the config
names). Any other exception inside a stage, a plain `FileNotFoundError` included, is a bug or a race on the run's
own files and stays a crash with its traceback (exit 1): reporting it as bad input hid a race between runs sharing
a stage folder (issue 18)."""

from __future__ import annotations


class BadInput(Exception):
    """Input the user gave is wrong; the message names the file or config key and, where there is one, the fix."""


class MissingInput(BadInput, FileNotFoundError):
    """A file or folder the config names is missing; the message starts with the config key."""


class TrainedTooLong(BadInput, ValueError):
    """A stage folder holds training beyond the config's `<phase>.epochs` (a finished stage or a checkpoint):
    fewer epochs cannot be made from it; the message names both numbers and the fix."""
