"""The locks (requirements/*.txt) against pyproject.toml: a dependency changed without `make lock`
fails here, in seconds, rather than as a venv or a pyz that is not what pyproject.toml says."""

from __future__ import annotations

import itertools
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers.locks import (
    DEV_LOCK,
    LOCKS,
    REPO,
    RUNTIME_LOCK,
    TARGET_MARKERS,
    TARGET_PLATFORM,
    TARGET_PYTHON,
    read_lock,
)

pytestmark = pytest.mark.unit

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXTRAS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]


def asked_for(extras: list[str]) -> list[Requirement]:
    """What pyproject.toml asks for with these extras, on the locks' target."""
    asked = [Requirement(line) for line in PYPROJECT["project"]["dependencies"]]
    asked += [Requirement(line) for extra in extras for line in EXTRAS[extra]]
    return [each for each in asked if each.marker is None or each.marker.evaluate(TARGET_MARKERS)]


@pytest.mark.parametrize("path", LOCKS, ids=lambda path: path.name)
def test_every_line_is_one_version_with_its_hashes_for_the_target(path: Path) -> None:
    lock = read_lock(path)
    assert lock.lines, f"{path.name} locks nothing"
    unpinned = [str(line.requirement) for line in lock.lines if line.version is None]
    assert not unpinned, f"{path.name}: not one version each: {unpinned}"
    unhashed = [line.name for line in lock.lines if not line.hashes]
    assert not unhashed, f"{path.name}: no --hash for {unhashed}"
    assert all(value.startswith("sha256:") for line in lock.lines for value in line.hashes)
    assert len(lock.pins()) == len(lock.lines), f"{path.name} names a distribution twice"
    # pip reads this line from the file: a source distribution would build with unlocked tools.
    assert "--only-binary :all:" in lock.options, f"{path.name}: {lock.options}"
    command = " ".join(lock.command)
    assert f"--python-version {TARGET_PYTHON}" in command, f"{path.name}'s header: {command!r}"
    assert f"--python-platform {TARGET_PLATFORM}" in command, f"{path.name}'s header: {command!r}"
    assert "--generate-hashes" in command


@pytest.mark.parametrize("path", LOCKS, ids=lambda path: path.name)
def test_each_lock_holds_what_pyproject_asks_for_at_a_version_it_admits(path: Path) -> None:
    lock = read_lock(path)
    pins = lock.pins()
    wrong = []
    for requirement in asked_for(lock.extras()):
        line = pins.get(canonicalize_name(requirement.name))
        found = "nothing" if line is None else str(line.version)
        if (
            line is None
            or line.version is None
            or not requirement.specifier.contains(line.version, prereleases=True)
        ):
            wrong.append(f"{requirement} (locked: {found})")
    assert not wrong, f"pyproject.toml asks for what {path.name} does not hold (make lock): {wrong}"


def test_every_extra_is_locked_and_the_runtime_lock_holds_no_tools() -> None:
    assert read_lock(RUNTIME_LOCK).extras() == []
    locked = {extra for path in LOCKS for extra in read_lock(path).extras()}
    assert locked == set(EXTRAS)


def test_the_dev_lock_holds_the_build_backend_that_builds_the_project_in_the_venv() -> None:
    """The Makefile builds the project with --no-build-isolation: with the venv's, so the lock's,
    build backend, rather than one pip would fetch unlocked."""
    pins = read_lock(DEV_LOCK).pins()
    for requirement in (Requirement(line) for line in PYPROJECT["build-system"]["requires"]):
        line = pins[canonicalize_name(requirement.name)]
        assert line.version is not None
        assert requirement.specifier.contains(line.version, prereleases=True)


def test_each_lock_holds_the_one_before_it_unchanged() -> None:
    """So that `make test` runs on exactly the versions (and files) that the pyz ships."""
    for smaller, larger in itertools.pairwise(LOCKS):
        inner, outer = read_lock(smaller).pins(), read_lock(larger).pins()
        changed = []
        for name, line in inner.items():
            other = outer.get(name)
            if other is None or other.version != line.version:
                found = "nothing" if other is None else other.version
                changed.append(f"{name} {line.version} in {smaller.name}, {found} in {larger.name}")
            elif other.hashes != line.hashes:
                changed.append(f"{name} {line.version}: other hashes in {larger.name}")
        assert not changed, f"make lock: {changed}"
