"""`make check` (lorakit.check): the student's progress, from their working folder, in one process.

* which cells run is decided from nbgrader metadata and the names cells read and write;
* on a folder holding a solved copy of every notebook, every notebook is complete (so the selection works on
  every notebook of the course, including any added later, with no change to lorakit.check);
* unanswered, missing and broken notebooks are reported as such, and no notebook is modified.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import nbformat
import pytest
from notebook_tools import ROOT
from test_pipeline import _solved

from lorakit import check, course


def _cells(*sources, meta=None):
    meta = meta or {}
    return [{"source": s, "metadata": meta.get(i, {})} for i, s in enumerate(sources)]


ANSWER = {"nbgrader": {"solution": True, "grade": False, "grade_id": "f"}}
TEST = {"nbgrader": {"solution": False, "grade": True, "grade_id": "test_f", "points": 1}}


def test_selection_runs_what_the_checks_need_and_skips_the_rest():
    cells = _cells(
        "import torch\nmodel = torch.nn.Linear(2, 2)",            # 0 needed: model, torch
        "import matplotlib.pyplot as plt\nplt.plot([1, 2])",     # 1 a figure: skipped
        "torch.nn.init.zeros_(model.weight)",                    # 2 changes model: needed
        "for r in [1, 2]:\n    print(r, torch.ones(r))",         # 3 prints only: skipped
        "def f(x):\n    return model(x)",                        # 4 answer
        "assert f(torch.ones(2)).sum() == model.bias.sum()",     # 5 test
        "model = None",                                          # 6 after the last test: skipped
        meta={4: ANSWER, 5: TEST},
    )
    assert check.select_cells(cells) == [0, 2, 4, 5]


def test_selection_follows_rebinding_and_the_tags():
    cells = _cells(
        "x = 1",                                   # 0 overwritten by 1 before anyone reads it
        "x = 2",                                   # 1
        "y = x + 1",                               # 2 needed
        "import random\nrandom.seed(0)",           # 3 tagged check-always
        "slow = sum(range(10**9))",                # 4 tagged check-never
        "def f():\n    return y",                  # 5 answer
        "assert f() == 3",                         # 6 test
        meta={3: {"tags": ["check-always"]}, 4: {"tags": ["check-never"]}, 5: ANSWER, 6: TEST},
    )
    assert check.select_cells(cells) == [1, 2, 3, 5, 6]


def _digests(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_progress_table_for_solved_blank_missing_and_broken_notebooks(tmp_path):
    release = tmp_path / "release"
    work = tmp_path / "work"
    for name in ("08-nf4-from-scratch", "09-double-quant-and-qlora", "07-peft-family"):
        (release / name).mkdir(parents=True)
        (release / name / f"{name}.ipynb").write_text((ROOT / "notebooks" / name / f"{name}.ipynb").read_text())
    (work / "08-nf4-from-scratch").mkdir(parents=True)
    nbformat.write(_solved("08-nf4-from-scratch"), work / "08-nf4-from-scratch" / "08-nf4-from-scratch.ipynb")
    (work / "09-double-quant-and-qlora").mkdir()
    (work / "09-double-quant-and-qlora" / "09-double-quant-and-qlora.ipynb").write_text(
        (release / "09-double-quant-and-qlora" / "09-double-quant-and-qlora.ipynb").read_text())
    (work / "12-broken").mkdir()
    (work / "12-broken" / "12-broken.ipynb").write_text("{ not json")
    before = _digests(work)

    lines = []
    results = {r.name: r for r in check.run(work=work, release=release, out=_Lines(lines))}
    assert _digests(work) == before, "make check must never modify the student's notebooks"
    out = "".join(lines)

    assert results["08-nf4-from-scratch"].complete and results["08-nf4-from-scratch"].total == 4
    blank = results["09-double-quant-and-qlora"]
    assert blank.passed == 0 and blank.total == 4 and "not answered yet" in blank.first_failure
    assert results["07-peft-family"].missing and "not in your folder yet" in out
    assert results["12-broken"].total == 0 and "cannot read" in results["12-broken"].first_failure
    assert "1 of 4 notebooks complete" in out and "█" in out and "4 of 8 visible checks" in out


class _Lines:
    def __init__(self, lines):
        self.lines = lines

    def write(self, s):
        self.lines.append(s)

    def flush(self):
        pass


@pytest.mark.skipif(os.environ.get("LORAKIT_SKIP_SLOW") == "1", reason="whole course")
def test_make_check_completes_a_solved_course_in_one_process(tmp_path):
    """The generic cell selection on every notebook of the course: a solved copy of each passes all its visible
    checks, through the same command as `make check`. Notebooks still being written (no student version yet)
    are left out."""
    work = tmp_path / "work"
    names = [n for n in course.assignments() if (ROOT / "notebooks" / n / f"{n}.ipynb").exists()]
    for name in names:
        (work / name).mkdir(parents=True)
        nbformat.write(_solved(name), work / name / f"{name}.ipynb")
    env = {**os.environ, "LORAKIT_WORK": str(work)}
    done = subprocess.run([sys.executable, "-m", "lorakit.check"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    print(done.stdout[-3000:])
    assert f"{len(names)} of {len(names)} notebooks complete" in done.stdout, done.stdout + done.stderr
    assert done.returncode == 0


def test_check_is_callable_from_a_notebook(tmp_path, capfd):
    import lorakit.check

    env_before = os.environ.get("LORAKIT_WORK")
    os.environ["LORAKIT_WORK"] = str(tmp_path / "empty")
    try:
        (tmp_path / "empty").mkdir()
        rc = lorakit.check("00-none")  # the module itself is callable: `import lorakit.check; lorakit.check()`
    finally:
        if env_before is None:
            os.environ.pop("LORAKIT_WORK")
        else:
            os.environ["LORAKIT_WORK"] = env_before
    assert "0 of 0 notebooks complete" in capfd.readouterr().out
    assert rc == 1
