"""The `animeddim` command lines in the README's and docs' shell blocks name commands and
options that exist, with values the options take: each is parsed by the CLI's own parser
(nothing is run; fast). Placeholders the docs use (LOSS, W, LO,HI, ...) are given a
value; an optional part in [brackets] is left out."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from animeddim.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
PLACEHOLDERS = {"LOSS": "mse", "AT": "blocks", "DROP": "0.1", "W": "3", "WA": "11"}


def _shell_lines(text: str) -> list[str]:
    """The commands of the ```sh / ```bash blocks, continuation lines joined, comments cut
    (a '#' that starts a word: `--attr hair_color=#ab2a18` keeps its colour)."""
    lines, block = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            block = [] if block is None and line[3:].strip() in ("sh", "bash") else None
            continue
        if block is not None:
            line = re.split(r"(?:^|\s)#", line, maxsplit=1)[0].rstrip()
            if lines and lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1] + " " + line.strip()
            elif line.strip():
                lines.append(line.strip())
    return lines


def _animeddim_argv(line: str) -> list[str] | None:
    """The arguments after the `animeddim` program in `line` (`animeddim ...`, `python -m
    animeddim ...`, `torchrun ... -m -- animeddim ...`, after VAR=value prefixes), or None."""
    line = re.sub(r"\[[^\]]*\]", "", line)  # an optional part
    words = shlex.split(line)
    if "animeddim" not in words:
        return None
    argv = words[words.index("animeddim") + 1 :]
    return [PLACEHOLDERS.get(w, w) for w in argv]


def _commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for line in _shell_lines(doc.read_text(encoding="utf-8")):
            argv = _animeddim_argv(line)
            if argv:
                found.append((f"{doc.relative_to(ROOT)}: {line}", argv))
    return found


COMMANDS = _commands()


def test_the_docs_have_commands_to_check():
    assert len(COMMANDS) > 80, len(COMMANDS)  # README.md alone has over 40


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w[:90] for w, _ in COMMANDS])
def test_a_documented_command_line_parses(where, argv, capsys):
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code not in (0, None):  # --help exits 0
            pytest.fail(f"{where}\n  {capsys.readouterr().err.strip()}")


_DELIMITER = re.compile(r"\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?")  # | --- | :-: | under a header


def _cells(row: str) -> int:
    """How many cells a markdown table row has, as GitHub counts them: split at each `|` not
    escaped as `\\|` (inside `code` too), the outer ones optional."""
    row = row.strip().removeprefix("|")
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return len(re.split(r"(?<!\\)\|", row))


def _uneven_table_rows() -> list[str]:
    """'FILE:LINE: N cells, its header M' for each table row of the README and docs whose
    cell count is not its header's (GitHub drops the extra cells of a longer row, and shows a
    shorter one with empty cells)."""
    found = []
    for doc in DOCS:
        lines, header, fenced = doc.read_text(encoding="utf-8").splitlines(), None, False
        for i, line in enumerate(lines):
            if line.startswith("```"):
                fenced, header = not fenced, None
            elif fenced or "|" not in line:
                header = None
            elif header is None:
                below = lines[i + 1].strip() if i + 1 < len(lines) else ""
                if "-" in below and _DELIMITER.fullmatch(below):
                    header = _cells(line)
            elif not _DELIMITER.fullmatch(line.strip()) and _cells(line) != header:
                where = f"{doc.relative_to(ROOT)}:{i + 1}"
                found.append(f"{where}: {_cells(line)} cells, its header {header}")
    return found


def test_every_table_row_has_as_many_cells_as_its_header():
    assert _cells("| a | `x \\| y` | b |") == 3 and _cells("a | b") == 2
    assert _uneven_table_rows() == []
