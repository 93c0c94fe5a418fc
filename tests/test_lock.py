"""The setup path's lock agrees with pyproject.toml: every dependency the package and its extras name
is pinned there, at a version its specifier admits, and nothing in it points at this machine."""

import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"


def lock_pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$", line)
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in ("all", "test"):
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    for extra_name in {e for r in reqs if canonicalize_name(r.name) == "mergesmith" for e in r.extras}:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra_name]]
    return [r for r in reqs if canonicalize_name(r.name) != "mergesmith"]


def test_every_dependency_is_pinned_at_a_version_pyproject_admits():
    pins = lock_pins(LOCK.read_text())
    problems = []
    for req in project_requirements():
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req.name}: not in the lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req.name}: locked {pins[name]}, pyproject.toml asks {req.specifier}")
    assert not problems, "run scripts/lock.sh: " + "; ".join(problems)


def test_the_lock_names_no_local_path_and_no_local_build():
    text = LOCK.read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert lines, "the lock is empty"
    assert all("==" in line and "@" not in line and "file:" not in line for line in lines), \
        [line for line in lines if "==" not in line or "@" in line or "file:" in line]
    # torch's public version: its CPU build lies on the project's machines as 2.13.0+cpu.
    assert "+" not in lock_pins(text)["torch"]


def test_the_setup_path_installs_from_the_lock():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "requirements/lock.txt" in setup and '-r "$lock"' in setup
    assert "test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "scripts/setup.sh" in (ROOT / "scripts" / "test.sh").read_text()
