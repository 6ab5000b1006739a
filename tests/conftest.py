"""Fixtures only (what tests share besides fixtures is in tests/helpers/): every test's tier, an
environment without the developer's RELAY_* variables, the programs beyond Python, a fake Supabase on
a loopback port, the real relay in-process on port 0, and the contract tier's relay, built and never
started."""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from relay.config import Config, load_config
from relay.service import BuiltRelay, RunningRelay, run_relay
from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.contract import contract_config, open_relay_app
from tests.helpers.factions import ANON_KEY
from tests.helpers.programs import (
    CHROMIUM,
    NGINX,
    OPENSSL,
    PROMETHEUS,
    PROMTOOL,
    SYSTEM_PYTHON,
    SYSTEMD_ANALYZE,
)

# The tiers of style.md's "Tests", registered as markers in pyproject.toml: `pytest -m unit` runs one.
TIERS = ("unit", "virtual_time", "contract", "e2e", "external")


def tier_problem(item: pytest.Item) -> str | None:
    """What is wrong with `item`'s tier, if anything: it has exactly one; the autojump clock is the
    virtual-time tier's and only its; a unit opens no socket (the fake upstream is under `relay`,
    `make_config` and `serve_config` too)."""
    tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
    if len(tiers) != 1:
        return f"{len(tiers)} tiers {tiers}, expected one of {TIERS}"
    fixtures = getattr(item, "fixturenames", ())
    if (tiers[0] == "virtual_time") != ("autojump_clock" in fixtures):
        return "virtual_time is the tier of the tests that use autojump_clock, and only of those"
    if tiers[0] == "unit" and "fake_upstream" in fixtures:
        return "a unit opens no socket, yet this one uses the fake upstream"
    return None


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: every collected test is checked
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    registered = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
    if missing := set(TIERS) - registered:
        raise pytest.UsageError(f"pyproject.toml registers no marker for the tiers {sorted(missing)}")
    problems = [f"{item.nodeid}: {problem}" for item in items if (problem := tier_problem(item))]
    if problems:
        raise pytest.UsageError("\n".join(problems))


@pytest.fixture(autouse=True)
def no_relay_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's exported RELAY_* would change what a test loads, and what every process a test
    starts inherits from os.environ (`relay serve`, the operator's commands): each test starts
    without them."""
    for name in list(os.environ):
        if name.startswith("RELAY_"):
            monkeypatch.delenv(name)


def require_program(program: Path, package: str, purpose: str) -> Path:
    """Skip where `program` is missing, except under CI, where a skip would hide a broken set-up
    (.ci/run installs every program a test needs)."""
    if not program.exists():
        reason = f"{program} is missing (Debian: apt-get install {package})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must run {purpose}")
        pytest.skip(reason)
    return program


@pytest.fixture
def chromium_binary() -> Path:
    return require_program(CHROMIUM, "chromium", "the browser tests")


@pytest.fixture
def nginx_binary() -> Path:
    """nginx, and openssl for the test's certificate."""
    require_program(OPENSSL, "openssl", "the nginx tests")
    return require_program(NGINX, "nginx", "the nginx tests")


@pytest.fixture
def promtool_binary() -> Path:
    return require_program(PROMTOOL, "prometheus", "the alerting rules' unit tests")


@pytest.fixture
def prometheus_binary() -> Path:
    return require_program(PROMETHEUS, "prometheus", "the dashboard's and alerts' queries against a relay")


@pytest.fixture
def system_python() -> Path:
    return require_program(SYSTEM_PYTHON, "python3", "the one-file build")


@pytest.fixture
def systemd_analyze() -> Path:
    """Only its files: no systemd needs to be running to verify a unit."""
    return require_program(SYSTEMD_ANALYZE, "systemd", "the systemd unit's checks")


@pytest.fixture
async def fake_upstream(nursery: trio.Nursery) -> FakeSupabase:
    fake = FakeSupabase(valid_keys=(ANON_KEY,))
    await nursery.start(fake.run)
    return fake


@pytest.fixture
def make_config(tmp_path: Path, fake_upstream: FakeSupabase) -> Callable[..., Config]:
    """A config pointed at the fake, with small timings so real-clock tests stay quick."""

    def make(toml: str = "", **overrides: str) -> Config:
        config_file = tmp_path / "relay.toml"
        config_file.write_text(
            "[upstream]\nheartbeat_interval_s = 2.0\nconnect_timeout_s = 2.0\n"
            "backoff_initial_s = 0.05\nbackoff_max_s = 0.5\n" + toml
        )
        env = {
            "RELAY_UPSTREAM_URL": fake_upstream.url,
            "RELAY_UPSTREAM_ANON_KEY": ANON_KEY,
            "RELAY_SERVER_PORT": "0",
            "RELAY_STORAGE_PATH": str(tmp_path / "data" / "relay.db"),
            **overrides,
        }
        return load_config(config_file, environ={}, overrides=env)

    return make


@pytest.fixture
async def relay(make_config: Callable[..., Config]) -> AsyncIterator[RunningRelay]:
    """The relay in a nursery of its own, so teardown is a real shutdown the fake upstream outlives."""
    async with trio.open_nursery() as nursery:
        running: RunningRelay = await nursery.start(functools.partial(run_relay, make_config()))
        yield running
        running.stop()


@pytest.fixture
async def relay_app(tmp_path: Path) -> AsyncIterator[BuiltRelay]:
    """The HTTP-contract tier's relay (tests/helpers/contract.py): built, never started."""
    async with open_relay_app(contract_config(tmp_path)) as built:
        yield built


@pytest.fixture
def serve_config(tmp_path: Path, fake_upstream: FakeSupabase) -> tuple[Path, dict[str, str]]:
    """A config for `relay serve` and its environment: this process's, which has no RELAY_* of the
    developer's (`no_relay_variables`), and the fake upstream's URL and key."""
    config = tmp_path / "relay.toml"
    config.write_text(
        '[server]\nport = 0\n[storage]\npath = "data/relay.db"\n[upstream]\nheartbeat_interval_s = 2.0\n'
    )
    env = {**os.environ, "RELAY_UPSTREAM_URL": fake_upstream.url, "RELAY_UPSTREAM_ANON_KEY": ANON_KEY}
    return config, env
