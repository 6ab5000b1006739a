"""The structure docs/architecture.md describes, read from the source: which package may import which,
and the one home of the calls that keep the invariants (notify after commit, one socket per faction).
A change that breaks one of these is not wrong by itself, but it must change that document too."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

RELAY = Path(__file__).resolve().parent.parent / "relay"

# What each package may import from the rest of the relay (itself aside). Under `TYPE_CHECKING` only
# the composition root's `Services` type is imported, which builds no dependency at run time.
ALLOWED_IMPORTS = {
    "relay.storage": {"relay.config"},
    "relay.upstream": {"relay.config", "relay.storage"},
    "relay.ops": {"relay.config", "relay.storage"},
}


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(RELAY.rglob("*.py")):
        parts = path.relative_to(RELAY.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, ast.parse(path.read_text(encoding="utf-8"))


def runtime_imports(tree: ast.Module) -> Iterator[str]:
    """Every relay module imported outside an `if TYPE_CHECKING:` block."""
    type_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
        for statement in block.body
        for node in ast.walk(statement)
    }
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("relay"):
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("relay"))


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def callers_of(method: str, on: str = "") -> set[str]:
    """The modules calling `<something ending in on>.method(...)`."""
    return {
        name
        for name, tree in modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == method
        and _receiver(node.func.value).endswith(on)
    }


def _receiver(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    return node.attr if isinstance(node, ast.Attribute) else ""


@pytest.mark.parametrize("package", sorted(ALLOWED_IMPORTS))
def test_a_package_imports_only_what_is_below_it(package: str) -> None:
    reached = {
        package_of(imported)
        for name, tree in modules()
        if package_of(name) == package
        for imported in runtime_imports(tree)
    }
    assert reached - {package} <= ALLOWED_IMPORTS[package]


def test_only_the_composition_root_and_the_cli_import_the_http_side_and_the_operator_commands() -> None:
    importers = {
        (package_of(imported), name)
        for name, tree in modules()
        for imported in runtime_imports(tree)
        if package_of(imported) in ("relay.http", "relay.ops") and package_of(name) != package_of(imported)
    }
    # factions raises the API's refusals (ApiError, from relay.http.responses); the cli checks the
    # open-file budget (relay.http.descriptors) before it starts anything.
    assert importers == {
        ("relay.http", "relay.service"),
        ("relay.http", "relay.cli"),
        ("relay.http", "relay.factions"),
        ("relay.ops", "relay.cli"),
    }


def test_only_the_ingest_wakes_waiters_so_none_is_woken_before_a_commit() -> None:
    assert callers_of("notify") == {"relay.ingest"}


def test_only_the_faction_lifecycle_starts_and_stops_a_factions_socket() -> None:
    assert callers_of("ensure_running") - {"relay.upstream.supervisor"} == {"relay.factions"}
    assert callers_of("stop", on="supervisors") == {"relay.factions"}


def test_the_wall_clock_is_read_only_to_stamp_and_to_show_never_to_time() -> None:
    # Every duration (expiry, timers, next_poll_ms) is on the monotonic clock, which no NTP step or
    # `date -s` moves; the wall clock is read here only: the store's stamps, a migration's record, the
    # operator's commands showing ages, and the fake upstream's commit times. Elsewhere it is injected.
    readers = (
        callers_of("time", on="time") | callers_of("time_ns", on="time") | callers_of("now", on="datetime")
    )
    assert readers == {
        "relay.storage.store",
        "relay.storage.migrations",
        "relay.ops.dbstats",
        "relay.ops.statustable",
        "relay.testing.fake_tables",
        "relay.testing.war_traffic",
    }
