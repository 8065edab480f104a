"""Command line of the data preparation tools: ``python -m data_prep <command> ...``.

To add a command (e.g. ``to-ffcv``, ``to-wds``): give its module a
``register(subparsers)`` function that calls ``subparsers.add_parser(...)``
and ``set_defaults(func=handler)`` where ``handler(args) -> int`` returns the
exit code, then append the module to ``COMMAND_MODULES`` below. Keep heavy
imports (torch, ffcv, ...) inside the handler so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from data_prep import fingerprint, synthetic, to_ffcv, to_wds, verify

COMMAND_MODULES = [synthetic, to_ffcv, to_wds, verify, fingerprint]


def build_parser() -> argparse.ArgumentParser:
    """Top-level parser with one subparser per registered command."""
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]) and run the chosen command."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
