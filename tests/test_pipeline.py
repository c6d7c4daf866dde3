"""The nbgrader pipeline end to end, in a scratch copy of the course:

* regenerating notebooks/ from solutions/ gives exactly the committed student versions;
* the committed solutions carry no volatile metadata (make outputs strips it);
* autograding the unanswered student version scores 0 and a solved one full marks, without grader errors;
* the student version runs in small mode with errors only in its answer and test cells;
* no solution or hidden test reaches a student notebook, and no hidden test reaches the feedback.
"""

from __future__ import annotations

import shutil

import nbformat
import pytest
from nbgrader.api import Gradebook
from notebook_tools import ROOT, graded_cells, source_notebook, strip_markers
from test_grading import hidden_lines, text_of

from lorakit import check, course, grading

ASSIGNMENTS = course.assignments()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    root = tmp_path_factory.mktemp("course")
    shutil.copy(ROOT / "nbgrader_config.py", root)
    shutil.copytree(ROOT / "solutions", root / "solutions", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    course.release(root)
    return root


def test_there_are_notebooks():
    assert "03-lora-from-scratch" in ASSIGNMENTS


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_release_is_up_to_date(scratch, name):
    fresh = (scratch / "notebooks" / name / f"{name}.ipynb").read_text()
    committed = (ROOT / "notebooks" / name / f"{name}.ipynb").read_text()
    assert fresh == committed, f"notebooks/{name} is stale: run `make notebooks` (or `make outputs`)"


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_solutions_have_no_volatile_metadata(scratch, name):
    stripped = (scratch / "solutions" / name / f"{name}.ipynb").read_text()
    committed = (ROOT / "solutions" / name / f"{name}.ipynb").read_text()
    assert stripped == committed, f"solutions/{name} carries execution timestamps or widget state: run `make notebooks`"


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_student_version_hides_solutions_and_hidden_tests(name):
    text = (ROOT / "notebooks" / name / f"{name}.ipynb").read_text()
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
        assert marker not in text
    student = graded_cells(nbformat.reads(text, as_version=4))
    source = graded_cells(source_notebook(name))
    assert student.keys() == source.keys()
    n_answers = 0
    for grade_id, cell in source.items():
        meta = cell.metadata["nbgrader"]
        if meta.get("solution"):
            n_answers += 1
            assert "raise NotImplementedError()" in student[grade_id].source
            assert "raises-exception" in student[grade_id].metadata["tags"]
        if meta.get("grade"):
            assert "raises-exception" in student[grade_id].metadata["tags"]
            assert meta["points"] > 0
    assert n_answers >= 2, "each notebook has at least two graded exercises"


def _solved(name: str) -> nbformat.NotebookNode:
    """The student version with every answer cell filled in as a student would: the solution code alone."""
    nb = nbformat.read(ROOT / "notebooks" / name / f"{name}.ipynb", as_version=4)
    answers = {k: c for k, c in graded_cells(source_notebook(name)).items() if c.metadata["nbgrader"].get("solution")}
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in answers:
            cell.source = strip_markers(answers[grade_id].source)
    return nb


@pytest.fixture(scope="module")
def graded(scratch):
    """A blank and a solved copy of every notebook, autograded by the instructor's own tool (lorakit.grading: one
    nbgrader process per submission, two at a time, each kernel on its share of the cores), then feedback for all
    of them. The solved copies are graded as every cohort is, running only the cells grading needs; the blank
    copies with every cell (LORAKIT_GRADE_EVERY_CELL=1), which checks that the student version runs."""
    for name in ASSIGNMENTS:
        for student, nb in [("blank", nbformat.read(scratch / "notebooks" / name / f"{name}.ipynb", 4)),
                            ("solved", _solved(name))]:
            folder = scratch / "submitted" / student / name
            folder.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, folder / f"{name}.ipynb")
    with pytest.MonkeyPatch.context() as env:
        env.delenv("LORAKIT_GRADE_EVERY_CELL", raising=False)
        rows = grading.autograde(scratch, ASSIGNMENTS, jobs=2, timeout=1500, release=False, students=["solved"])
        env.setenv("LORAKIT_GRADE_EVERY_CELL", "1")
        rows += grading.autograde(scratch, ASSIGNMENTS, jobs=2, timeout=1500, release=False, students=["blank"])
    grading.feedback(scratch, ASSIGNMENTS)  # raises if nbgrader fails on one
    return {(r["assignment"], r["student"]): r for r in rows}


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_autograde_scores_blank_zero_and_solved_full(graded, scratch, name):
    rows = graded
    for student in ("blank", "solved"):
        row = rows[(name, student)]
        assert not row["problem"], f"{student}/{name}: {row['problem']}\n{row['log']}"
        assert "CRITICAL" not in row["log"], row["log"]
    with Gradebook(f"sqlite:///{scratch / 'gradebook.db'}") as gradebook:
        blank = gradebook.find_submission(name, "blank")
        solved = gradebook.find_submission(name, "solved")
        assert solved.max_score > 0
        assert blank.score == 0, f"an unanswered notebook scored {blank.score}"
        assert solved.score == solved.max_score, \
            f"the solution scored {solved.score} of {solved.max_score}:\n{rows[(name, 'solved')]['log']}"
        assert not solved.needs_manual_grade
    graded_nb = (scratch / "autograded" / "solved" / name / f"{name}.ipynb").read_text()
    assert "BEGIN HIDDEN TESTS" in graded_nb, "autograde must restore and run the hidden tests"


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_autograde_runs_every_graded_cell_and_skips_only_demonstrations(graded, scratch, name):
    """lorakit.grading.ExecuteGradedCells: every answer and test cell of the solved copy ran; a cell that did not
    run says so; the cells run are the ones `make check` picks (lorakit.check.select_cells)."""
    nb = nbformat.read(scratch / "autograded" / "solved" / name / f"{name}.ipynb", 4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    chosen = set(check.select_cells(code))
    for i, cell in enumerate(code):
        ran = cell.get("execution_count") is not None
        assert ran == (i in chosen), f"{name} code cell {i}: ran {ran}, chosen {i in chosen}"
        if cell.metadata.get("nbgrader", {}).get("solution") or cell.metadata.get("nbgrader", {}).get("grade"):
            assert ran
        if not ran:
            assert [o.get("text") for o in cell.outputs] == [grading.ExecuteGradedCells.SKIPPED]


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_student_version_runs_and_only_exercises_raise(graded, scratch, name):
    """The student version as a student first runs it, in nbgrader's small mode (its blank autograde run above):
    every cell but the answer and test cells runs without an error, an answer cell raises nothing but
    NotImplementedError (most only define the function that raises it), and every test cell fails. This is what
    `make nbval-students` checks cell by cell with nbval-lax, a little stricter."""
    nb = nbformat.read(scratch / "autograded" / "blank" / name / f"{name}.ipynb", 4)
    executed = 0
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        meta = cell.metadata.get("nbgrader", {})
        errors = [o for o in cell.get("outputs", []) if o.output_type == "error"]
        executed += cell.get("execution_count") is not None
        where = f"{name} cell {index} ({meta.get('grade_id', 'no grade id')})"
        if meta.get("solution"):
            assert {e.ename for e in errors} <= {"NotImplementedError"}, f"{where}: {[e.ename for e in errors]}"
        elif meta.get("grade"):
            assert errors, f"{where}: a test cell passed on an unanswered notebook"
        else:
            assert not errors, f"{where} raised {errors[0].ename}: {errors[0].evalue}"
    assert executed == sum(c.cell_type == "code" for c in nb.cells), f"{name}: not every cell ran"


@pytest.mark.usefixtures("graded")
def test_feedback_shows_no_hidden_test_code(scratch):
    """Feedback shows the results, never the hidden tests' code (lorakit.grading.StripHiddenTests)."""
    for name in ASSIGNMENTS:
        hidden = hidden_lines(name)
        for student in ("blank", "solved"):
            page = text_of(scratch / "feedback" / student / name / f"{name}.html")
            assert f"{name}" in page
            leaked = [line for line in hidden if line in page]
            assert not leaked, f"the feedback of {student}/{name} shows hidden tests: {leaked[:3]}"
