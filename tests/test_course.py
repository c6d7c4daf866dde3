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
        assert sorted(p.name for p in (tmp_path / "work").rglob("*.ipynb")) == sorted(
            p.name for p in (ROOT / "notebooks").rglob("*.ipynb"))
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}/lab?token={token}" in output
