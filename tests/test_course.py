"""The student's side of the course plumbing: their working folder is never overwritten, and
`make lab` serves JupyterLab."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from lorakit import course

ROOT = Path(__file__).resolve().parents[1]


def test_sync_copies_new_notebooks_and_never_overwrites(tmp_path):
    release, work = tmp_path / "notebooks", tmp_path / "work"
    (release / "03-x").mkdir(parents=True)
    (release / "03-x" / "03-x.ipynb").write_text("course v1")
    (release / "04-y").mkdir()
    (release / "04-y" / "04-y.ipynb").write_text("course v1")
    (work / "03-x").mkdir(parents=True)
    (work / "03-x" / "03-x.ipynb").write_text("my answers")

    report = course.sync_work(release, work)

    assert (work / "03-x" / "03-x.ipynb").read_text() == "my answers"
    assert (work / "04-y" / "04-y.ipynb").read_text() == "course v1"
    assert any(line.startswith("kept") and "03-x" in line for line in report)
    assert any(line.startswith("copied") and "04-y" in line for line in report)
    assert course.sync_work(release, work) and (work / "04-y" / "04-y.ipynb").read_text() == "course v1"


def test_work_folder_is_ignored_by_git():
    if (ROOT / ".git").exists():
        assert subprocess.run(["git", "check-ignore", "-q", "work/x.ipynb"], cwd=ROOT).returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lab_serves_the_course(tmp_path):
    port, token = _free_port(), "test-token"
    env = {**os.environ, "LAB_PORT": str(port), "LAB_TOKEN": token, "LORAKIT_WORK": str(tmp_path / "work")}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.course", "lab"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        status, deadline = None, time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab?token={token}", timeout=5) as response:
                    status = response.status
                    break
            except OSError:
                time.sleep(1)
        assert status == 200, f"JupyterLab did not answer on /lab (exit code {proc.poll()})"
        work = tmp_path / "work"  # hidden folders hold the course's own bookkeeping (.course-copies)
        assert sorted(p.name for p in work.rglob("*.ipynb") if not any(
            part.startswith(".") for part in p.relative_to(work).parts)) == sorted(
            p.name for p in (ROOT / "notebooks").rglob("*.ipynb"))
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}/lab?token={token}" in output


def test_course_updates_never_lose_a_students_work(tmp_path):
    release, work = tmp_path / "notebooks", tmp_path / "work"
    for name in ("03-x", "04-y", "05-z"):
        (release / name).mkdir(parents=True)
        (release / name / f"{name}.ipynb").write_text("course v1")
    assert all(line.startswith("copied") for line in course.sync_work(release, work))
    (work / "03-x" / "03-x.ipynb").write_text("my answers")  # the student works on 03 and 05, not on 04
    (work / "05-z" / "05-z.ipynb").write_text("my answers to 05")

    (release / "03-x" / "03-x.ipynb").write_text("course v2")  # the course updates 03 and 04, not 05
    (release / "04-y" / "04-y.ipynb").write_text("course v2")
    report = "\n".join(course.sync_work(release, work))

    assert (work / "03-x" / "03-x.ipynb").read_text() == "my answers"
    beside = sorted((work / "03-x").glob("03-x.update-*.ipynb"))
    assert len(beside) == 1 and beside[0].read_text() == "course v2"
    assert beside[0].name in report and "changed" in report
    assert (work / "04-y" / "04-y.ipynb").read_text() == "course v2", "an untouched copy follows the course"
    assert "updated" in report and "04-y" in report
    assert (work / "05-z" / "05-z.ipynb").read_text() == "my answers to 05"

    (beside[0]).write_text("I started answering in the new version")  # nothing is ever overwritten
    again = course.sync_work(release, work)
    assert beside[0].read_text() == "I started answering in the new version"
    assert not any("the course changed it" in line for line in again), "the same update is offered once"
    (release / "03-x" / "03-x.ipynb").write_text("course v3")
    course.sync_work(release, work)
    assert len(sorted((work / "03-x").glob("03-x.update-*.ipynb"))) == 2
    assert (work / "03-x" / "03-x.ipynb").read_text() == "my answers"


def test_student_bundle_has_no_solutions_and_no_hidden_tests(tmp_path):
    import tarfile

    from test_grading import hidden_lines

    if not (ROOT / ".git").exists():
        return
    out = course.bundle(out=tmp_path / "bundle.tar.gz")
    with tarfile.open(out) as tar:
        members = {m.name.removeprefix("lora-course/"): m for m in tar.getmembers()}
        texts = {name: tar.extractfile(m).read().decode(errors="replace") for name, m in members.items()}
    assert not [n for n in members if n.startswith(("solutions/", "tests/"))]
    for needed in ("Makefile", "pyproject.toml", "constraints.txt", "environment.yml", "lorakit/__init__.py"):
        assert needed in members, needed
    tracked = subprocess.run(["git", "ls-files", "solutions"], cwd=ROOT, capture_output=True, text=True).stdout
    for name in course.assignments():
        if f"solutions/{name}/{name}.ipynb" not in tracked:
            continue  # a notebook still being written
        assert f"notebooks/{name}/{name}.ipynb" in members
        lines = hidden_lines(name)
        leaked = {f: [ln for ln in lines if ln in t][:2] for f, t in texts.items() if any(ln in t for ln in lines)}
        assert not leaked, f"hidden tests of {name} in the bundle: {leaked}"


def test_validate_button_works_in_the_students_folder(tmp_path, monkeypatch):
    """What JupyterLab's Validate button does (nbgrader's validate_assignment handler: config from the folder
    the server runs in, then nbgrader's Validator), on a copy of the course in a student's work/."""
    import nbformat
    from nbgrader.server_extensions.validate_assignment.handlers import ValidateAssignmentHandler
    from nbgrader.validator import Validator
    from test_pipeline import _solved

    work = tmp_path / "work"
    course.sync_work(ROOT / "notebooks", work)
    assert (work / "nbgrader_config.py").exists()
    name = "08-nf4-from-scratch"
    solved = work / name / "solved.ipynb"
    nbformat.write(_solved(name), solved)
    monkeypatch.chdir(work)  # `make lab` runs JupyterLab in work/
    config = ValidateAssignmentHandler.load_config(None)
    assert config.Execute.timeout == 300
    blank = Validator(config=config).validate(str(work / name / f"{name}.ipynb"))
    assert blank.get("failed"), "an unanswered notebook must fail validation"
    assert Validator(config=config).validate(str(solved)) == {}, "a solved notebook must pass validation"
