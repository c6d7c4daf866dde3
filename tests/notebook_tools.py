"""Helpers shared by the notebook tests: read nbgrader cells out of a source notebook."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOLUTION_BLOCK = re.compile(r"^[ \t]*### BEGIN SOLUTION\n(.*?)^[ \t]*### END SOLUTION\n?", re.S | re.M)


def source_notebook(name: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "solutions" / name / f"{name}.ipynb", as_version=4)


def graded_cells(nb: nbformat.NotebookNode) -> dict[str, nbformat.NotebookNode]:
    """grade_id -> cell, for every answer and test cell."""
    return {c.metadata["nbgrader"]["grade_id"]: c for c in nb.cells if "grade_id" in c.metadata.get("nbgrader", {})}


def strip_markers(source: str) -> str:
    """The solution as a student would type it: the code between the markers, markers removed."""
    return SOLUTION_BLOCK.sub(lambda m: m.group(1), source)


def run_graded(cells: dict[str, nbformat.NotebookNode], answer_id: str, answer_source: str, namespace: dict,
               before: list[str] | tuple[str, ...] = (), replaced: dict[str, str] | None = None) -> None:
    """Run `answer_source` in place of answer cell `answer_id`, then its test cell (visible and hidden tests),
    in `namespace`. The exercises named in `before` run first, for answers that call them: their solutions, or
    the source `replaced` gives for them."""
    for grade_id in before:
        exec((replaced or {}).get(grade_id, strip_markers(cells[grade_id].source)), namespace)
    exec(answer_source, namespace)
    exec(cells["test_" + answer_id].source, namespace)


def reference_refused(run, *args) -> None:
    """`run(*args)` grades an answer that calls lorakit's own implementation of the exercise: its hidden tests must
    switch that reference off, so the answer fails there with their RuntimeError."""
    with pytest.raises(RuntimeError, match="switched off"):
        run(*args)
