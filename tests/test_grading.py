"""The grader under hostile submissions (tests/hostile.py), on notebook 03, through the instructor's own cycle
(lorakit.grading: collect, parallel autograde, feedback, grades CSV), in a scratch copy of the course:

* the batch finishes, every submission gets exactly its expected score, and none is missing from the gradebook
  or the grades CSV;
* no feedback file and no student notebook contains a line of hidden-test code.

`make grade-hostile` runs the same on every notebook (GRADE_HOSTILE_ALL=1).
"""

from __future__ import annotations

import csv
import html
import os
import re
import shutil

import pytest
from hostile import cases
from nbgrader.api import Gradebook
from notebook_tools import ROOT, graded_cells, source_notebook

from lorakit import course, grading

ALL = bool(os.environ.get("GRADE_HOSTILE_ALL"))
NAMES = [n for n in course.assignments() if (ROOT / "notebooks" / n / f"{n}.ipynb").exists()] if ALL \
    else ["03-lora-from-scratch"]
# Answer cells are only definitions: a short timeout there keeps the infinite loops cheap; every other cell keeps
# the course's limit. The same line works in nbgrader_config.py for a real batch.
TIMEOUTS = ('\nc.Execute.timeout_func = lambda cell: 20 if cell.metadata.get("nbgrader", {}).get("solution") '
            'else 300\n')


def hidden_lines(name: str) -> list[str]:
    """Distinctive lines of the hidden tests of a notebook (not also somewhere in its visible parts)."""
    nb = source_notebook(name)
    visible, hidden = set(), set()
    for cell in nb.cells:
        inside = False
        for line in cell.source.splitlines():
            if "BEGIN HIDDEN TESTS" in line:
                inside = True
            elif "END HIDDEN TESTS" in line:
                inside = False
            else:
                (hidden if inside else visible).add(line.strip())
    shown = "\n".join(visible)
    return sorted(line for line in hidden if len(line) >= 25 and line not in shown)


def text_of(path) -> str:
    """A file as a student would read it: HTML tags dropped and entities decoded."""
    raw = path.read_text(errors="replace")
    return html.unescape(re.sub(r"<[^>]+>", "", raw)) if path.suffix == ".html" else raw


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("course")
    (root / "nbgrader_config.py").write_text((ROOT / "nbgrader_config.py").read_text() + TIMEOUTS)
    shutil.copytree(ROOT / "solutions", root / "solutions", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    inbox, expected = root / "inbox", {}
    for name in NAMES:
        for student, (text, score) in cases(name, slow=ALL).items():
            folder = inbox / student
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.ipynb").write_text(text)
            expected[(name, student)] = score
    collected = grading.collect(inbox, root)
    assert len(collected) == len(expected)
    # Honest submissions of notebook 03 take 20-60 s each on 2 idle cores; only a kernel that ignores interrupts
    # (nbclient then waits for it forever) reaches this limit, so it sets what that case costs the whole run.
    rows = grading.autograde(root, NAMES, jobs=2, timeout=int(os.environ.get("GRADE_HOSTILE_TIMEOUT", "300")))
    feedback = grading.feedback(root, NAMES)
    grades = grading.grades(root)
    return root, expected, rows, feedback, grades


def test_every_submission_gets_its_expected_score(graded):
    root, expected, rows, _, _ = graded
    measured = {(r["assignment"], r["student"]): r["score"] for r in rows}
    assert measured.keys() == expected.keys(), "a submission is missing from the batch"
    table = "\n".join(f"{n:<24} {s:<18} expected {expected[(n, s)]:>4g}  got {measured[(n, s)]:>4g}"
                      for n, s in sorted(expected))
    print("\n" + table)
    wrong = {k: (expected[k], measured[k]) for k in expected if measured[k] != expected[k]}
    problems = {(r["assignment"], r["student"]): r["problem"] for r in rows if (r["assignment"], r["student"]) in wrong}
    assert not wrong, f"{wrong}\n{problems}\n{table}"


def test_nothing_is_lost_from_the_gradebook_or_the_csv(graded):
    root, expected, _, _, _ = graded
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        for name, student in expected:
            sub = gb.find_submission(name, student)
            assert sub.score == expected[(name, student)]
    with open(root / "autograded" / "grades.csv", newline="") as f:
        rows = {(r["assignment"], r["student_id"]): float(r["raw_score"]) for r in csv.DictReader(f)}
    for key, score in expected.items():
        assert rows[key] == score, key


def test_the_report_names_the_submissions_that_could_not_run(graded):
    root, _, rows, _, _ = graded
    problems = {r["student"] for r in rows if r["problem"]}
    assert {"not_json"} <= problems, problems
    assert (root / "autograded" / grading.REPORT).exists()
    assert not {"solved", "blank", "alt"} & problems


def test_feedback_shows_no_hidden_test_code(graded):
    root, expected, rows, _, _ = graded
    files = sorted((root / "feedback").rglob("*.html"))
    # every submission that nbgrader graded without a problem has its feedback; those that crashed the grader
    # (not JSON, a dead kernel, patched builtins) are in the report with 0 instead
    clean = {(r["assignment"], r["student"]) for r in rows if not r["problem"]}
    have = {(p.parent.name, p.parent.parent.name) for p in files}
    assert clean and clean <= have, f"no feedback for {sorted(clean - have)}"
    for name in NAMES:
        lines = hidden_lines(name)
        assert lines, f"{name} has no hidden tests to look for"
        for path in files:
            if path.parent.name == name:
                text = text_of(path)
                leaked = [line for line in lines if line in text]
                assert not leaked, f"{path.relative_to(root)} shows hidden tests: {leaked[:3]}"


@pytest.mark.parametrize("name", course.assignments())
def test_student_versions_show_no_hidden_test_code(name):
    path = ROOT / "notebooks" / name / f"{name}.ipynb"
    if not path.exists():
        pytest.skip(f"{name} has no student version yet")
    text = text_of(path)
    leaked = [line for line in hidden_lines(name) if line in text]
    assert not leaked, f"notebooks/{name} shows hidden tests: {leaked[:3]}"


def test_hidden_tests_exist_for_every_test_cell_of_03():
    cells = graded_cells(source_notebook("03-lora-from-scratch"))
    for gid, cell in cells.items():
        if cell.metadata["nbgrader"].get("grade"):
            assert "BEGIN HIDDEN TESTS" in cell.source, gid
