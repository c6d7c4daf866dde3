"""The instructor's grading cycle on this repository (see INSTRUCTORS.md), behind the Makefile's targets.

    python -m lorakit.grading collect FOLDER     # FOLDER/<student>/... -> submitted/<student>/<NN-name>/NN-name.ipynb
    python -m lorakit.grading autograde [NAMES]  # every submission, in parallel (--jobs N, --timeout S each)
    python -m lorakit.grading feedback [NAMES]      # feedback/ HTML, hidden tests stripped
    python -m lorakit.grading grades [CSV]         # nbgrader export (autograded/grades.csv)

Every command works on this repository, or on the course folder given by --root (a copy of the course holding its
nbgrader_config.py, such as the grader account's folder on JupyterHub: deploy/jupyterhub/README.md).

Autograding treats every submission as hostile: each runs in its own `nbgrader autograde --student` process
with a wall-clock limit on top of nbgrader's per-cell timeout; a process that hangs (a loop that ignores
interrupts) is killed with its kernel; a submission that cannot be graded (not valid JSON, a dead kernel) is
recorded in the gradebook with 0 and listed in `autograded/grading-report.csv`, never dropped.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nbformat.notebooknode import NotebookNode
from nbgrader.preprocessors import Execute, NbGraderPreprocessor

from lorakit import course

ROOT = course.ROOT
REPORT = "grading-report.csv"


# ------------------------------------------------------------------------------------------ feedback

class StripHiddenTests(NbGraderPreprocessor):
    """For feedback: drop every hidden-test region from the test cells, and reduce every error output to its
    exception line (an IPython traceback quotes the failing hidden-test line). Set in nbgrader_config.py."""

    begin, end = "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type == "code" and cell.metadata.get("nbgrader", {}).get("grade"):
            kept, hidden = [], False
            for line in cell.source.split("\n"):
                if self.begin in line:
                    hidden = True
                    kept.append(line.replace(self.begin, "(hidden tests: their code is not shown)"))
                elif self.end in line:
                    hidden = False
                elif not hidden:
                    kept.append(line)
            cell.source = "\n".join(kept)
        if cell.cell_type == "code":
            for out in cell.get("outputs", []):
                if out.get("output_type") == "error":
                    out["traceback"] = [f"{out.get('ename', 'Error')}: {out.get('evalue', '')}"]
        return cell, resources


# ------------------------------------------------------------------------------------------- autograde

class ExecuteGradedCells(Execute):
    """For autograde: nbgrader's Execute, running only the cells grading needs: every answer cell, every test cell
    (with its hidden tests, which nbgrader has restored by then) and every other code cell that a later cell needs,
    decided as `make check` decides (`lorakit.check.select_cells`: the names each cell binds and reads, plus the
    `check-always` / `check-never` tags). The demonstrations no graded cell depends on (plots, tables, long runs)
    are not run, so they cost the grader nothing; in the graded notebook and its feedback each such cell shows one
    line saying so. Set as the first autograde preprocessor in nbgrader_config.py; LORAKIT_GRADE_EVERY_CELL=1
    runs every cell instead, as plain nbgrader does."""

    SKIPPED = "(not run by the grader: no graded cell needs this cell; it runs in full in your own notebook)\n"

    def preprocess(self, nb, resources=None, km=None):
        from lorakit.check import select_cells

        code = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
        if os.environ.get("LORAKIT_GRADE_EVERY_CELL") == "1":
            self._graded = set(code)
        else:
            chosen = select_cells([nb.cells[i] for i in code])
            self._graded = {code[j] for j in chosen}
        return super().preprocess(nb, resources, km)

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type == "code" and index not in self._graded:
            cell.outputs = [NotebookNode(output_type="stream", name="stdout", text=self.SKIPPED)]
            cell.execution_count = None
            return cell, self.resources
        return super().preprocess_cell(cell, resources, index)


# ------------------------------------------------------------------------------------------- collect

def collect(folder: Path, root: Path = ROOT, names: list[str] | None = None) -> list[str]:
    """Copy each student's notebooks from FOLDER/<student>/ (flat, or in NN-name/ subfolders) into
    submitted/<student>/<NN-name>/<NN-name>.ipynb. Files are copied byte for byte, broken ones included
    (autograde records them). Returns one line per file."""
    known = names or course.assignments(root / "solutions")
    lines = []
    for student_dir in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        student = student_dir.name
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]*", student):
            lines.append(f"skipped {student_dir}: not a usable student id")
            continue
        for nb in sorted(student_dir.rglob("*.ipynb")):
            if ".ipynb_checkpoints" in nb.parts or nb.stem not in known:
                continue
            dst = root / "submitted" / student / nb.stem / f"{nb.stem}.ipynb"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(nb, dst)
            lines.append(f"collected {student}/{nb.stem}")
    return lines


# ----------------------------------------------------------------------------------------- autograde

def _kill_tree(pid: int) -> None:
    import psutil
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = parent.children(recursive=True) + [parent]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def _nbgrader(root: Path, *args: str, timeout: float | None = None, threads: int | None = None) -> tuple[int, str]:
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    if threads:  # the kernel's torch/OpenMP threads: jobs x threads <= cores, or parallel jobs slow each other down
        env.update({var: str(threads) for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    proc = subprocess.Popen([os.path.join(bindir, "nbgrader"), *args], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, _ = proc.communicate()
        return -9, (out or "") + f"\n[killed after {timeout:.0f} s: the submission did not finish]"


def submissions(root: Path = ROOT, names: list[str] | None = None,
                students: list[str] | None = None) -> list[tuple[str, str]]:
    """(assignment, student) for every submitted/<student>/<assignment>/ folder (only `names`' assignments and
    `students`' work, where given)."""
    pairs = []
    for folder in sorted((root / "submitted").glob("*/*")):
        if folder.is_dir() and (names is None or folder.name in names) and (
                students is None or folder.parent.name in students):
            pairs.append((folder.name, folder.parent.name))
    return pairs


def _zero(root: Path, assignment: str, student: str) -> None:
    """Make sure the gradebook holds this submission, with 0 wherever no grade was computed."""
    from nbgrader.api import Gradebook, MissingEntry
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        try:
            gb.find_submission(assignment, student)
        except MissingEntry:
            gb.add_submission(assignment, student)
        for nb in gb.find_submission(assignment, student).notebooks:
            for grade in nb.grades:
                if grade.auto_score is None and grade.manual_score is None:
                    grade.manual_score = 0.0
        gb.db.commit()


def autograde(root: Path = ROOT, names: list[str] | None = None, jobs: int | None = None,
              timeout: float = 900, extra: tuple[str, ...] = (), release: bool = True,
              students: list[str] | None = None) -> list[dict]:
    """Autograde every submission in submitted/ (or those of the assignments in `names`, of the `students`),
    `jobs` at a time. Returns one row per submission, also written to autograded/grading-report.csv."""
    from nbgrader.api import Gradebook

    pairs = submissions(root, names, students)
    assignments = sorted({a for a, _ in pairs})
    if release and assignments:
        course.release(root, assignments)  # puts the assignments' source cells in the gradebook
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        for student in sorted({s for _, s in pairs}):
            gb.update_or_create_student(student)
    cores = max(1, os.cpu_count() or 1)
    jobs = jobs or cores
    # each kernel gets its share of the cores: jobs whose torch each used every core would slow each other down
    threads = max(1, cores // jobs) if jobs > 1 else None

    def one(pair):
        assignment, student = pair
        start = time.perf_counter()
        args = ("autograde", assignment, "--student", student, "--force", *extra)
        rc, log = _nbgrader(root, *args, timeout=timeout, threads=threads)
        for _ in range(3):  # sqlite is shared by the workers: a rare lock is retried, not lost
            if "database is locked" not in log:
                break
            rc, log = _nbgrader(root, *args, timeout=timeout, threads=threads)
        graded = root / "autograded" / student / assignment / f"{assignment}.ipynb"
        problem = ""
        if rc == -9:
            problem = "killed: ran past the time limit for one submission"
        elif rc != 0 or not graded.exists() or "| ERROR]" in log:
            lines = [ln for ln in log.splitlines() if "ERROR" in ln or "Error" in ln]
            problem = (lines[-1] if lines else f"nbgrader exited with {rc}")[:300]
        return {"assignment": assignment, "student": student, "seconds": round(time.perf_counter() - start, 1),
                "problem": problem, "log": log}

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        rows = list(pool.map(one, pairs))
    for row in rows:
        _zero(root, row["assignment"], row["student"])
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        for row in rows:
            sub = gb.find_submission(row["assignment"], row["student"])
            row["score"], row["max_score"] = sub.score, sub.max_score
    out = root / "autograded" / REPORT
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, ["assignment", "student", "score", "max_score", "seconds", "problem"],
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return rows


def feedback(root: Path = ROOT, names: list[str] | None = None) -> str:
    done = []
    for assignment in sorted({a for a, _ in submissions(root, names)}):
        rc, log = _nbgrader(root, "generate_feedback", assignment, "--force")
        if rc != 0:
            raise RuntimeError(f"nbgrader generate_feedback {assignment} failed:\n{log}")
        done.append(assignment)
    return f"feedback for {', '.join(done) or 'nothing'} in {root / 'feedback'}"


def grades(root: Path = ROOT, out: str = "autograded/grades.csv") -> str:
    rc, log = _nbgrader(root, "export", "--to", out)
    if rc != 0:
        raise RuntimeError(f"nbgrader export failed:\n{log}")
    return f"grades written to {root / out}"


def main(argv: list[str]) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m lorakit.grading", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["collect", "autograde", "feedback", "grades"])
    p.add_argument("args", nargs="*")
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--timeout", type=float, default=900, help="seconds for one submission, all cells")
    p.add_argument("--cell-timeout", type=int, default=None, help="nbgrader's per-cell timeout (Execute.timeout)")
    p.add_argument("--root", type=Path, default=ROOT,
                   help="the course folder, holding its nbgrader_config.py (default: this repository)")
    a = p.parse_args(argv)
    root = a.root.resolve()
    if not (root / "nbgrader_config.py").is_file():
        p.error(f"{root} is not a course folder: it holds no nbgrader_config.py")
    if a.command == "collect":
        if not a.args:
            p.error("collect needs the folder of submissions (one subfolder per student)")
        print(*collect(Path(a.args[0]), root, names=a.args[1:] or None), sep="\n")
    elif a.command == "autograde":
        extra = (f"--Execute.timeout={a.cell_timeout}",) if a.cell_timeout else ()
        rows = autograde(root, names=a.args or None, jobs=a.jobs, timeout=a.timeout, extra=extra)
        for r in rows:
            print(f"{r['assignment']:<28} {r['student']:<20} {r['score']:>5g} / {r['max_score']:<4g} "
                  f"{r['seconds']:>6.1f} s  {r['problem']}")
        print(f"{len(rows)} submissions graded; report in {root / 'autograded' / REPORT}")
    elif a.command == "feedback":
        print(feedback(root, names=a.args or None))
    else:
        print(grades(root, out=(a.args or ["autograded/grades.csv"])[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
