"""The one-file build (`make pyz`): exactly the runtime lock's dependencies, and run as a server runs
it: Debian's python3, a bare environment, and nothing of this checkout or its venv within reach."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import tomllib
import zipfile
from email.parser import BytesHeaderParser
from pathlib import Path

import httpx
import pytest
import trio
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.factions import FACTION, call
from tests.helpers.locks import RUNTIME_LOCK, read_lock
from tests.helpers.relay_process import relay_process
from tests.helpers.userscript import Userscript, wait_connected
from tests.helpers.waits import eventually_async

pytestmark = pytest.mark.external

REPO = Path(__file__).resolve().parent.parent
PYZ = REPO / "dist" / "cat-relay.pyz"
CLIENT_JS = REPO / "relay" / "static" / "client.js"
MIGRATIONS = sorted((REPO / "migrations").glob("*.sql"))
# Compiled code that may ride along: markupsafe's optional speedups, which it replaces with pure
# Python on any other interpreter or platform, and httptools, the hot path's parser, which it
# replaces with h11 (relay.http.hotpath). Anything else would tie the pyz to the build machine's
# platform, and the README's deploy section would have to say so.
OPTIONAL_EXTENSIONS = {"markupsafe", "httptools"}


@pytest.fixture(scope="module")
def pyz() -> Path:
    """`make pyz`, which rebuilds only when a source changed: built here, not before every run of
    pytest, so that no other test waits for shiv. `-o` keeps make from reinstalling the venv these
    tests are running in."""
    built = subprocess.run(
        ["make", "--no-print-directory", "-o", ".venv/.installed", "pyz"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, f"make pyz failed:\n{built.stdout}{built.stderr}"
    return PYZ


def test_the_pyz_carries_this_checkout_the_migrations_and_client_js(pyz: Path) -> None:
    with zipfile.ZipFile(pyz) as archive:
        names = set(archive.namelist())
        environment = json.loads(archive.read("environment.json"))
        packed = {
            name.removeprefix("site-packages/"): archive.read(name)
            for name in names
            if name.startswith("site-packages/relay/")
        }
    assert pyz.read_bytes().split(b"\n", 1)[0] == b"#!/usr/bin/env python3"
    assert environment["entry_point"] == "relay.cli:main"
    for migration in MIGRATIONS:
        assert packed[f"relay/_migrations/{migration.name}"] == migration.read_bytes()
    assert packed["relay/static/client.js"] == CLIENT_JS.read_bytes()
    stale = [
        str(source.relative_to(REPO))
        for source in (REPO / "relay").rglob("*.py")
        if packed.get(str(source.relative_to(REPO))) != source.read_bytes()
    ]
    assert not stale, f"dist/cat-relay.pyz is older than the checkout (make pyz): {stale}"
    compiled = {name.split("/")[1] for name in names if name.endswith(".so")}
    assert compiled <= OPTIONAL_EXTENSIONS


def packed_distributions(pyz: Path) -> list[tuple[NormalizedName, Version]]:
    """Each distribution that shiv packed, by the name and version in its METADATA."""
    with zipfile.ZipFile(pyz) as archive:
        return [
            (canonicalize_name(metadata["Name"]), Version(metadata["Version"]))
            for metadata in (
                BytesHeaderParser().parsebytes(archive.read(name))
                for name in archive.namelist()
                if name.startswith("site-packages/")
                and name.endswith(".dist-info/METADATA")
                and name.count("/") == 2
            )
        ]


def test_the_pyz_holds_exactly_the_runtime_locks_versions(pyz: Path) -> None:
    packed = packed_distributions(pyz)
    found = dict(packed)
    assert len(found) == len(packed), f"a distribution packed twice: {sorted(packed)}"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert found.pop(canonicalize_name(project["name"])) == Version(project["version"])
    locked = {line.name: line.version for line in read_lock(RUNTIME_LOCK).lines}
    missing = sorted(locked.keys() - found.keys())
    extra = sorted(found.keys() - locked.keys())
    other = sorted(
        f"{name} {found[name]} (locked {locked[name]})"
        for name in found.keys() & locked.keys()
        if found[name] != locked[name]
    )
    assert (missing, extra, other) == ([], [], []), (
        f"the pyz against requirements/runtime.txt: missing {missing}, not locked {extra}, other {other}"
    )


async def test_the_pyz_serves_from_the_zip_alone_and_stops_on_sigterm(
    pyz: Path,
    system_python: Path,
    serve_config: tuple[Path, dict[str, str]],
    fake_upstream: FakeSupabase,
    tmp_path: Path,
) -> None:
    config, test_env = serve_config
    shiv_root = tmp_path / "shiv"
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "SHIV_ROOT": str(shiv_root),
        "RELAY_UPSTREAM_ANON_KEY": test_env["RELAY_UPSTREAM_ANON_KEY"],
        "RELAY_UPSTREAM_URL": test_env["RELAY_UPSTREAM_URL"],
    }
    with trio.fail_after(60):  # the first start unpacks the dependencies
        async with (
            relay_process(config, env, command=[str(system_python), str(pyz)], cwd=tmp_path) as relay,
            httpx.AsyncClient(base_url=relay.url) as http,
        ):
            script = Userscript(http, FACTION)
            await script.start()
            await wait_connected(http, FACTION)
            fake_upstream.insert("war_calls", call(FACTION, 1))
            await eventually_async(
                script.poll, lambda: [e["data"]["new"].get("id") for e in script.events] == [1]
            )
            client_js = await http.get("/client.js")
            assert client_js.status_code == 200
            # The file from the zip, then the line naming the relay it was fetched from.
            assert client_js.content == CLIENT_JS.read_bytes() + (
                f'CATRelay.defaults.relayUrl = "{relay.url}";\n'.encode()
            )
            relay.process.send_signal(signal.SIGTERM)
            assert await relay.process.wait() == 0
    assert "Traceback" not in relay.text()
    # The relay ran from what shiv unpacked into SHIV_ROOT (its modules were compiled there), and
    # created its database from the migrations inside the zip.
    (unpacked,) = shiv_root.glob("cat-relay.pyz_*/site-packages")
    assert list((unpacked / "relay" / "__pycache__").glob("service.*.pyc"))
    with sqlite3.connect(config.parent / "data" / "relay.db") as db:
        applied = [row[0] for row in db.execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert applied == [int(migration.name[:4]) for migration in MIGRATIONS]
