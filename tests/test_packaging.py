"""The pinned environment: pyproject.toml, environment.yml and constraints.txt agree, and the
installed packages are the pinned ones."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)$")


def _name(req: str) -> str:
    return re.sub(r"[-_.]+", "-", req.split("==")[0]).lower()


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            match = PIN.match(line)
            assert match, f"not an exact pin: {line!r}"
            pins[_name(line)] = match.group(2)
    return pins


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return _pins(reqs)


def test_environment_yml_mirrors_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, "environment.yml should have one pip: section"
    assert _pins(pip_lists[0]) == pyproject_pins()


def test_constraints_agree_with_pyproject():
    constraints = _pins((ROOT / "constraints.txt").read_text().splitlines())
    for name, pinned in pyproject_pins().items():
        assert constraints.get(name) == pinned, f"{name}: pyproject {pinned}, constraints.txt {constraints.get(name)}"


def test_installed_versions_are_the_pinned_ones():
    pins = pyproject_pins() | _pins((ROOT / "requirements-nodeps.txt").read_text().splitlines())
    for name, pinned in pins.items():
        installed = version(name).split("+")[0]  # torch's CPU wheel is 2.13.0+cpu
        assert installed == pinned, f"{name}: pinned {pinned}, installed {installed}"


def test_torch_is_the_cpu_wheel_pinned_first():
    assert pyproject_pins()["torch"] == "2.13.0"
    makefile = (ROOT / "Makefile").read_text()
    torch_first = makefile.index("install -q --disable-pip-version-check torch==2.13.0")
    assert torch_first < makefile.index("-e '.[course,dev,hub]'")
