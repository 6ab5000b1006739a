"""The OpenAPI document at /openapi.json, checked against the relay that serves it.

Schemathesis generates requests from the document (relay/static/openapi.json; what /openapi.json
serves differs only in `info.version`, checked below), sends them to a real relay over loopback, and
checks every answer against the document. The relay runs in a thread of its own (the app is
Quart-*Trio*; schemathesis's in-process ASGI client speaks asyncio) against the fake Supabase, with a
faction subscribed and events of every kind stored, so that generated calls get past
`404 not_subscribed` and answers carry real events. Two more tests keep the document from drifting:
every route served is documented and the other way round, and the document is valid OpenAPI 3.1.
"""

from __future__ import annotations

import functools
import json
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import trio
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

from relay import __version__
from relay.config import load_config
from relay.http.events import EVENTS_PATH, STREAM_PATH
from relay.service import RunningRelay, run_relay
from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.factions import ANON_KEY
from tests.helpers.waits import eventually

DOCUMENT: dict[str, Any] = json.loads(
    resources.files("relay").joinpath("static/openapi.json").read_text(encoding="utf-8")
)
_SUBSCRIBE_EXAMPLE = DOCUMENT["paths"]["/subscribe"]["post"]["requestBody"]["content"]["application/json"]
# The document's examples name a faction and a key; the relay under test accepts that key and has that
# faction subscribed, so that the examples (and the cases schemathesis builds from them) are answered.
EXAMPLE_KEY: str = _SUBSCRIBE_EXAMPLE["example"]["api_key"]
EXAMPLE_FACTION: int = _SUBSCRIBE_EXAMPLE["example"]["faction_id"]


HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
STARTUP_TIMEOUT_S = 30
SHUTDOWN_TIMEOUT_S = 30


def documented_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path, method.upper())
        for path, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def war_call(call_id: int) -> dict[str, Any]:
    return {
        "id": call_id,
        "faction_id": EXAMPLE_FACTION,
        "war_id": 77,
        "target_id": 2_000_000 + call_id,
        "caller_id": 1_000 + call_id,
        "caller_name": "alice",
        "created_at": "2026-11-24T15:00:00.118+00:00",
    }


async def store_every_kind_of_event(running: RunningRelay, fake: FakeSupabase) -> None:
    """Resync INSERTs from a reconcile after an outage, a live INSERT, UPDATE and DELETE, and a published
    event. (A faction's first reconcile is its baseline, which stores rows without events.)"""
    async with httpx.AsyncClient(base_url=running.url) as http:
        subscribed = await http.post(
            "/subscribe", json={"faction_id": EXAMPLE_FACTION, "api_key": EXAMPLE_KEY}
        )
        assert subscribed.status_code == 200, subscribed.text

        def reconciles() -> int:
            upstream = running.supervisors.statistics().get(EXAMPLE_FACTION)
            return upstream.reconcile.reconciles if upstream and upstream.reconcile else 0

        await eventually(lambda: reconciles() > 0)  # the baseline
        sockets = fake.connections_with(str(EXAMPLE_FACTION))
        fake.freeze(sockets)  # an outage: its changes come as the next reconcile's differences
        for call_id in (1, 2):
            fake.insert("war_calls", war_call(call_id), deliver=False)
        done = reconciles()
        fake.drop_connections(only=sockets)
        await eventually(lambda: reconciles() > done)
        fake.insert("war_calls", war_call(3))
        fake.update("war_calls", 3, {"caller_name": "bob"})
        fake.delete("war_calls", 1)
        published = await http.post(
            "/events",
            json={
                "faction_id": EXAMPLE_FACTION,
                "api_key": EXAMPLE_KEY,
                "type": "hospital_update",
                "data": {},
            },
        )
        assert published.status_code == 200, published.text
    stored = 2 + 3 + 1
    await eventually(lambda: running.store.kept_count(EXAMPLE_FACTION) >= stored)


async def serve_seeded_relay(tmp_path: Path, handoff: queue.Queue[Any]) -> None:
    config_file = tmp_path / "relay.toml"
    config_file.write_text(
        # No 429 from the flood of generated requests; generated `wait=` values hold a poll 50 ms at most.
        "[limits]\nclient_rate = 0\nlong_poll_max_wait_s = 0.05\n"
        f"[auth]\napi_keys = [{json.dumps(EXAMPLE_KEY)}]\n"
        "[upstream]\nheartbeat_interval_s = 2.0\nconnect_timeout_s = 2.0\nbackoff_initial_s = 0.05\nbackoff_max_s = 0.5\n"
    )
    async with trio.open_nursery() as nursery:
        fake = FakeSupabase(valid_keys=(ANON_KEY,))
        await nursery.start(fake.run)
        env = {
            "RELAY_UPSTREAM_URL": fake.url,
            "RELAY_UPSTREAM_ANON_KEY": ANON_KEY,
            "RELAY_SERVER_PORT": "0",
            "RELAY_STORAGE_PATH": str(tmp_path / "relay.db"),
        }
        config = load_config(config_file, environ={}, overrides=env)
        async with trio.open_nursery() as relay_nursery:
            running: RunningRelay = await relay_nursery.start(functools.partial(run_relay, config))
            with trio.fail_after(STARTUP_TIMEOUT_S):
                await store_every_kind_of_event(running, fake)
            handoff.put((running.url, trio.lowlevel.current_trio_token(), running.stop))
        nursery.cancel_scope.cancel()


@contextmanager
def relay_in_a_thread(tmp_path: Path) -> Iterator[str]:
    """The seeded relay's base URL while it runs in a thread of its own; stopped cleanly after."""
    handoff: queue.Queue[Any] = queue.Queue()

    def run() -> None:
        try:
            trio.run(serve_seeded_relay, tmp_path, handoff)
        except BaseException as exc:  # handed to the test's thread, which raises it
            handoff.put(exc)

    thread = threading.Thread(target=run, name="relay-under-schemathesis", daemon=True)
    thread.start()
    started = handoff.get(timeout=STARTUP_TIMEOUT_S)
    if isinstance(started, BaseException):
        raise started
    url, token, stop = started
    try:
        yield url
    finally:
        if thread.is_alive():  # else it failed, and its exception waits in `handoff`
            trio.from_thread.run_sync(stop, trio_token=token)
        thread.join(SHUTDOWN_TIMEOUT_S)
        assert not thread.is_alive(), "the relay did not stop"
        if not handoff.empty():
            raise handoff.get()


@pytest.fixture(scope="module")
def relay_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with relay_in_a_thread(tmp_path_factory.mktemp("openapi")) as url:
        yield url


SCHEMATHESIS_CONFIG = schemathesis.Config.from_dict(
    {
        "request-timeout": 10,
        "generation": {"max-examples": 60, "database": "none", "deterministic": True},
        "checks": {
            "enabled": False,
            "not_a_server_error": {"enabled": True},
            "status_code_conformance": {"enabled": True},
            "content_type_conformance": {"enabled": True},
            "response_schema_conformance": {"enabled": True},
            "response_headers_conformance": {"enabled": True},
            "negative_data_rejection": {"enabled": True},
            "unsupported_method": {"enabled": True},
            "allow_header_conformance": {"enabled": True},
        },
        "phases": {"stateful": {"enabled": False}},
        "operations": [
            # A stream never ends: read it for at most this long (or 20 events), then check what came.
            {
                "include-operation-id": "streamEvents",
                "request-timeout": 0.5,
                "generation": {"max-examples": 5},
            },
        ],
    }
)
# The document as the relay serves it, but for `info.version` (checked on its own below). Loaded at
# import: schemathesis's fixture-based loader does not run under pytest 9.2.
api: schemathesis.BaseSchema = schemathesis.openapi.from_dict(DOCUMENT, config=SCHEMATHESIS_CONFIG)


@pytest.mark.e2e
@api.parametrize()
def test_every_answer_conforms_to_the_document(case: schemathesis.Case[Any], relay_url: str) -> None:
    case.call_and_validate(base_url=relay_url)


@pytest.mark.contract
async def test_every_route_served_is_documented_and_every_documented_route_served(
    relay: RunningRelay,
) -> None:
    served = {
        (rule.rule, method)
        for rule in relay.app.url_map.iter_rules()
        for method in rule.methods or ()
        if method != "HEAD"  # answered for every GET route by Quart itself
    }
    # The two paths answered in front of Quart (relay.http.events), GET and the preflight.
    served |= {(path, method) for path in (EVENTS_PATH, STREAM_PATH) for method in ("GET", "OPTIONS")}
    documented = documented_operations(DOCUMENT)
    assert served == documented


@pytest.mark.unit
def test_the_document_is_valid_openapi_3_1() -> None:
    # Schemathesis reads a document leniently; its copy of the specification's own schema does not.
    assert [str(error) for error in OPENAPI_31_VALIDATOR.iter_errors(DOCUMENT)] == []


@pytest.mark.contract
async def test_the_document_is_served_with_the_relays_version(relay: RunningRelay) -> None:
    response = await relay.app.test_client().get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    served = await response.get_json()
    assert served["info"]["version"] == __version__
    assert served == {**DOCUMENT, "info": {**DOCUMENT["info"], "version": __version__}}
