"""deploy/kubernetes/, the recipe on paper: its files parse, they name the course the way nbgrader_config.py does, and
each pod's resources cover the measured needs (deploy/kubernetes/measured.json, written by measure_notebooks.py).
What runs for real is deploy/jupyterhub/ (tests/test_jupyterhub.py)."""

from __future__ import annotations

import json
import os
import re
import statistics

import pytest
import yaml
from notebook_tools import ROOT

from lorakit import course

K8S = ROOT / "deploy" / "kubernetes"
UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity(text) -> float:
    """A Kubernetes quantity ("3.5Gi", "4G", 2, "500m") as a number (bytes, or cores)."""
    match = re.fullmatch(r"([0-9.]+)(m|k|M|G|Ki|Mi|Gi)?", str(text))
    assert match, f"not a quantity: {text!r}"
    number, unit = float(match.group(1)), match.group(2) or ""
    return number / 1000 if unit == "m" else number * UNITS[unit]


def values() -> dict:
    return yaml.safe_load((K8S / "values.yaml").read_text())


def measured() -> dict:
    return json.loads((K8S / "measured.json").read_text())


def course_id() -> str:
    found = re.search(r'c\.CourseDirectory\.course_id = "([^"]+)"', (ROOT / "nbgrader_config.py").read_text())
    assert found
    return found.group(1)


def test_every_notebook_is_measured():
    assert sorted(measured()["notebooks"]) == course.assignments()


def test_the_files_name_the_course_as_nbgrader_does():
    cid, hub = course_id(), values()["hub"]
    assert list(hub["services"]) == [cid]
    assert set(hub["config"]["JupyterHub"]["load_groups"]) == {f"formgrade-{cid}", f"nbgrader-{cid}"}
    assert hub["loadRoles"][f"formgrade-{cid}"]["scopes"][0] == f"access:services!service={cid}"
    grader = [d for d in yaml.safe_load_all((K8S / "grader.yaml").read_text()) if d and d["kind"] == "Deployment"][0]
    env = {e["name"]: e.get("value") for e in grader["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["JUPYTERHUB_SERVICE_NAME"] == cid and env["JUPYTERHUB_SERVICE_PREFIX"] == f"/services/{cid}/"


def test_a_students_pod_holds_the_largest_notebook_and_its_server():
    run, single = measured(), values()["singleuser"]
    peaks = [n["peak_rss_mb"] for n in run["notebooks"].values()]
    server = run["server_mb"]["value"]
    limit, guarantee = quantity(single["memory"]["limit"]), quantity(single["memory"]["guarantee"])
    assert limit >= (max(peaks) + server) * 2**20, (single["memory"], max(peaks), server)
    assert guarantee >= (statistics.median(peaks) + server) * 2**20, (single["memory"], statistics.median(peaks))
    assert guarantee <= limit
    threads = run["threads"]
    assert quantity(single["cpu"]["limit"]) == threads
    assert single["extraEnv"]["OMP_NUM_THREADS"] == str(threads) == single["extraEnv"]["MKL_NUM_THREADS"]


# deploy/jupyterhub/jupyterhub_config.py refuses to start, saying why and what to do, on the common set-up mistakes
# (tests/test_jupyterhub.py runs it for real).

def refusal(monkeypatch, **settings) -> str:
    """The message deploy/jupyterhub/jupyterhub_config.py exits with under these LORA_* settings."""
    from traitlets.config.loader import PyFileConfigLoader

    for key in [k for k in os.environ if k.startswith("LORA_")]:
        monkeypatch.delenv(key)
    for key, value in settings.items():
        monkeypatch.setenv(f"LORA_{key}", str(value))
    loader = PyFileConfigLoader("jupyterhub_config.py", path=str(ROOT / "deploy" / "jupyterhub"))
    with pytest.raises(SystemExit) as refused:
        loader.load_config()
    return str(refused.value)


def test_the_hub_config_asks_for_a_roster(monkeypatch, tmp_path):
    message = refusal(monkeypatch, ROSTER=tmp_path / "roster.txt")
    assert f"no roster at {tmp_path / 'roster.txt'}" in message and "roster.example.txt" in message


def test_the_hub_config_names_missing_accounts_and_bad_lines(monkeypatch, tmp_path):
    roster = tmp_path / "roster.txt"
    roster.write_text("instructor lkt-nobody-i\nstudent lkt-nobody-s  # a comment\n")
    message = refusal(monkeypatch, ROSTER=roster, GRADER_USER="lkt-nobody-g")
    assert "no local account for ['lkt-nobody-i', 'lkt-nobody-s', 'lkt-nobody-g']" in message
    assert "useradd -m -K HOME_MODE=0700" in message
    roster.write_text("teacher ada\n")
    assert "expected 'instructor NAME' or 'student NAME'" in refusal(monkeypatch, ROSTER=roster)
