"""Reading a text-concept list (specs/iis.md §2.7): UTF-8, one concept per line.

The reference reads such files verbatim, so a trailing newline becomes an empty concept and the shipped dtd,
ham10000 and ucf101 lists repeat concepts (spec bug 15): an empty concept gets a CLIP embedding of its own and
a duplicate gets two columns of P that the projection then fits twice. Here empty (blank) lines are dropped,
surrounding white space is stripped, and each concept is kept once, at its first line, in file order.

The file is user input: its size is bounded (`max_lines` lines, empty ones included; `max_chars` characters per
line) and every error names the file and, where there is one, the line.
"""

from __future__ import annotations

import re
from pathlib import Path

from qpm_dist.errors import BadInput, MissingInput

MAX_LINES = 100_000  # the largest shipped list, ucf101_filtered_full, has 50,983 lines
_SURROGATES = re.compile("[\udc80-\udcff]")
MAX_CHARS = 300  # CLIP's context is 77 tokens; the longest shipped concept is far shorter


class BadConceptFile(BadInput, ValueError):
    """A concept list that cannot be used; the message names the file and the line."""


def read_concepts(path: str | Path, max_lines: int = MAX_LINES, max_chars: int = MAX_CHARS) -> list[str]:
    """The concepts of `path`: stripped, non-empty, first occurrence of each kept, in file order (bug 15)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"concept file {path}: not found (expected a UTF-8 text file, one concept per line)")
    concepts: list[str] = []
    seen: set[str] = set()
    # Text mode reads "\n", "\r\n" and "\r" line ends alike (imagenet_classes.txt uses "\r", bug 15); readline's
    # size bounds the memory a file without line ends can take; "surrogateescape" turns a byte that is not UTF-8
    # into a lone surrogate, so the check below finds the exact line (a strict decoder fails a buffer ahead).
    with path.open("r", encoding="utf-8", errors="surrogateescape", newline=None) as f:
        for number in range(1, max_lines + 2):
            line = f.readline(max_chars + 2)
            if not line:
                break
            if number > max_lines:
                raise BadConceptFile(f"concept file {path}: more than {max_lines} lines; expected at most {max_lines}")
            if len(line.rstrip("\n")) > max_chars:
                raise BadConceptFile(f"concept file {path} line {number}: more than {max_chars} characters; "
                                     f"expected at most {max_chars} per concept")
            if _SURROGATES.search(line):
                raise BadConceptFile(f"concept file {path} line {number}: not UTF-8 text")
            if "\x00" in line:
                raise BadConceptFile(f"concept file {path} line {number}: a NUL character; expected text")
            concept = line.strip()
            if concept and concept not in seen:
                seen.add(concept)
                concepts.append(concept)
    if not concepts:
        raise BadConceptFile(f"concept file {path}: no concept (every line is empty); expected one concept per line")
    return concepts
