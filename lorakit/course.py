"""Course plumbing behind the Makefile: release the student notebooks, copy them into the
student's own working folder, and start JupyterLab there.

    python -m lorakit.course release   # solutions/ -> notebooks/ with nbgrader (make notebooks)
    python -m lorakit.course release 11-real-finetune   # only the assignments named
    python -m lorakit.course strip     # drop volatile metadata from solutions/ (make outputs does this)
    python -m lorakit.course sync      # notebooks/ -> work/, never overwriting a student's work
    python -m lorakit.course lab       # sync, then JupyterLab in work/ (make lab)
    python -m lorakit.course bundle    # build/student-bundle.tar.gz for a graded cohort (make student-bundle)

Run from the course repository (the folder holding nbgrader_config.py).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS, RELEASE = ROOT / "solutions", ROOT / "notebooks"
WORK = Path(os.environ.get("LORAKIT_WORK", ROOT / "work"))  # the student's own folder, ignored by git

# nbval lets these cells raise in the student version: answer cells hold `raise NotImplementedError()`
# until the student answers, and their test cells then fail. Every other cell must run.
ALLOW_RAISE = "raises-exception"


def assignments(source: Path = SOLUTIONS) -> list[str]:
    """Assignment names, one per notebook: NN-short-name, each in a folder of that name."""
    return sorted(p.parent.name for p in source.glob("*/*.ipynb") if p.stem == p.parent.name)


def strip_volatile(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Remove what changes on every run without changing the lesson: execution timestamps and widget state."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("collapsed", None)
        if cell.cell_type == "code":
            for out in cell.get("outputs", []):
                out.get("metadata", {}).pop("execution", None)
    return nb


def _rewrite(path: Path, transform) -> None:
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    after = nbformat.writes(transform(nb))
    if after != before:
        path.write_text(after + ("" if after.endswith("\n") else "\n"))


def strip_sources(root: Path = ROOT) -> None:
    for name in assignments(root / "solutions"):
        _rewrite(root / "solutions" / name / f"{name}.ipynb", strip_volatile)


def _tag_student_cells(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    for cell in nb.cells:
        grading = cell.metadata.get("nbgrader", {})
        if cell.cell_type == "code" and (grading.get("solution") or grading.get("grade")):
            tags = cell.metadata.setdefault("tags", [])
            if ALLOW_RAISE not in tags:
                tags.append(ALLOW_RAISE)
    return strip_volatile(nb)


def nbgrader(*args: str, root: Path = ROOT) -> subprocess.CompletedProcess:
    """Run the nbgrader CLI of this environment in `root` (its venv's bin first on PATH: nbgrader calls alembic)."""
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run([os.path.join(bindir, "nbgrader"), *args], cwd=root, env=env, capture_output=True, text=True)


def release(root: Path = ROOT, names: list[str] | None = None) -> list[Path]:
    """Regenerate the student notebooks (every one, or those in `names`) from their sources with nbgrader;
    returns the files written."""
    strip_sources(root)
    known = assignments(root / "solutions")
    unknown = sorted(set(names or ()) - set(known))
    if unknown:
        raise ValueError(f"no assignment named {unknown} in {root / 'solutions'} (known: {known})")
    written = []
    for name in names or known:
        done = nbgrader("generate_assignment", name, "--force", "--log-level=WARN", root=root)
        if done.returncode != 0:
            raise RuntimeError(f"nbgrader generate_assignment {name} failed:\n{done.stdout}\n{done.stderr}")
        path = root / "notebooks" / name / f"{name}.ipynb"
        _rewrite(path, _tag_student_cells)
        written.append(path)
    return written


BASELINE = ".course-copies"  # inside work/: the course's version of each file as last copied, to spot updates


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sync_work(release_dir: Path = RELEASE, work: Path = WORK) -> list[str]:
    """Copy the released notebooks into the student's working folder without ever losing their work.

    A new file is copied. A file the student has and the course has not changed since it was copied is left
    alone. When the course has changed a file: if the student's copy is still the course's previous version
    (untouched), it is replaced; otherwise the new version is written *beside* it as NAME.update-XXXXXXXX.ipynb
    (XXXXXXXX from its content, so an update is never written twice and never overwrites anything) and the
    report says so. The course's last copied version of each file is kept in work/.course-copies/.
    Returns one line per file."""
    report = []
    for src in sorted(p for p in release_dir.rglob("*") if p.is_file() and ".ipynb_checkpoints" not in p.parts):
        rel = src.relative_to(release_dir)
        dst, base = work / rel, work / BASELINE / rel
        shown = dst.relative_to(work.parent)
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            report.append(f"copied  {shown}")
        elif _digest(dst) == _digest(src):
            report.append(f"current {shown}")
        elif base.exists() and _digest(base) == _digest(src):
            report.append(f"kept    {shown} (yours; the course has not changed it)")
        elif base.exists() and _digest(base) == _digest(dst):
            shutil.copy2(src, dst)
            report.append(f"updated {shown} (you had not changed it)")
        else:
            update = dst.with_name(f"{dst.stem}.update-{_digest(src)[:8]}{dst.suffix}")
            if not update.exists():
                shutil.copy2(src, update)
            report.append(f"kept    {shown} (yours); the course changed it: new version beside it in "
                          f"{update.relative_to(work.parent)} - copy your answers across")
        base.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, base)
    return report


# What a graded cohort receives (`make student-bundle`): everything tracked by git except what shows answers or
# hidden tests: the solution notebooks, the tests (they hold solutions and wrong-answer variants), the instructor's
# notes and CI. lorakit stays whole: its reference implementations are what the notebooks' demonstrations run,
# and the hidden tests switch off the ones that answer an exercise while they call the student's function.
BUNDLE_EXCLUDE = ("solutions/", "tests/", "INSTRUCTORS.md", ".ci/", "benchmarks/bench_")


def bundle(root: Path = ROOT, out: Path | None = None) -> Path:
    """build/student-bundle.tar.gz: the files a graded cohort gets, under a folder lora-course/."""
    import tarfile

    out = out or root / "build" / "student-bundle.tar.gz"
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    keep = [f for f in files if not f.startswith(BUNDLE_EXCLUDE) and (root / f).is_file()]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz") as tar:
        for f in keep:
            tar.add(root / f, arcname=f"lora-course/{f}")
    return out


def lab(port: int = 8888) -> None:
    """Start JupyterLab in work/ and print its address with the token."""
    for line in sync_work():
        print(line)
    token = os.environ.get("LAB_TOKEN") or secrets.token_hex(16)
    port = int(os.environ.get("LAB_PORT", port))
    args = [
        str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", f"--ServerApp.port={port}",
        "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={WORK}",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")
    print(f"\nOpen the course at  http://127.0.0.1:{port}/lab?token={token}\n(stop it with Ctrl-C)\n", flush=True)
    os.chdir(WORK)  # the student's folder, not the instructor's course root with its nbgrader_config.py
    os.execv(args[0], args)


def main(argv: list[str]) -> int:
    if argv[:1] == ["release"]:
        print(*release(names=argv[1:] or None), sep="\n")
        return 0
    commands = {"strip": strip_sources, "sync": lambda: print(*sync_work(), sep="\n"), "lab": lab,
                "bundle": lambda: print(bundle())}
    if len(argv) != 1 or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    commands[argv[0]]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
