"""A plain `pip install .`, as an operator does it, carries the migrations and creates a database."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
PIP = [sys.executable, "-m", "pip"]


def build_wheel(out: Path) -> Path:
    subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        capture_output=True,
        check=True,
    )
    (wheel,) = out.glob("cat_relay-*.whl")
    return wheel


def test_the_wheel_carries_every_migration_and_the_fake(tmp_path: Path) -> None:
    with zipfile.ZipFile(build_wheel(tmp_path)) as wheel:
        names = set(wheel.namelist())
    for migration in sorted((REPO / "migrations").glob("*.sql")):
        assert f"relay/_migrations/{migration.name}" in names
    assert "relay/testing/fake_supabase.py" in names
    assert "relay/static/openapi.json" in names  # served at /openapi.json
    assert any(name.endswith("entry_points.txt") for name in names)


def test_an_installed_wheel_migrates_a_new_database(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "dist")
    site = tmp_path / "site"
    subprocess.run(
        [*PIP, "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        check=True,
    )
    script = (
        "import sqlite3, relay, relay.storage.migrations as m;"
        "conn = sqlite3.connect('fresh.db', isolation_level=None);"
        "print(m.migrations_dir()); print(m.apply_migrations(conn)); print(relay.__file__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        check=True,
    )
    migrations_dir, applied, module = result.stdout.splitlines()
    assert Path(module).is_relative_to(site)
    assert Path(migrations_dir) == site / "relay" / "_migrations"
    assert applied == str([int(p.name[:4]) for p in sorted((REPO / "migrations").glob("*.sql"))])
