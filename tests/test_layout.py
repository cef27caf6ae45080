"""The code stays readable in one sitting: no module over 600 lines, no function over 120."""

from __future__ import annotations

import ast
from pathlib import Path

import animeddim

SRC = Path(animeddim.__file__).parent
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 600, 120


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_no_module_over_600_lines():
    long = {
        str(p.relative_to(SRC)): n
        for p in _sources()
        if (n := p.read_text().count("\n")) > MAX_MODULE_LINES
    }
    assert not long, f"split these modules (lines): {long}"


def test_no_function_over_120_lines():
    long = {}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if (n := node.end_lineno - start + 1) > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(SRC)}:{node.lineno} {node.name}"] = n
    assert not long, f"extract named steps from these functions (lines): {long}"
