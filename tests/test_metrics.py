"""`GET /metrics` over a real port: Prometheus text that a scraper parses, with the relay's counts."""

from __future__ import annotations

import functools
from collections.abc import Callable

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import relay
from relay.config import Config
from relay.service import RunningRelay, run_relay
from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.factions import FACTION, OTHER_FACTION, call
from tests.helpers.userscript import Userscript, wait_connected, wait_reconciled
from tests.helpers.waits import eventually, eventually_async

pytestmark = pytest.mark.e2e


async def scrape(http: httpx.AsyncClient) -> dict[str, list[Sample]]:
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    (found,) = [s.value for s in samples[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    return found


async def test_metrics_count_what_flowed_through_the_relay(
    relay: RunningRelay, fake_upstream: FakeSupabase
) -> None:
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=relay.url, timeout=10) as http:
            script = Userscript(http, FACTION)
            await script.start()
            await Userscript(http, OTHER_FACTION).start()
            await wait_reconciled(http, FACTION)
            await script.poll()  # nothing yet: an empty poll
            for n in range(1, 4):
                fake_upstream.insert("war_calls", call(FACTION, n))
            await script.poll_until(3)
            await eventually(lambda: relay.services.held.statistics().held_long_polls == 0)
            async with trio.open_nursery() as nursery:
                # A long-poll held while the scrape happens, then answered by a fourth change.
                query = f"/events?faction_id={FACTION}&since={script.cursor}&wait=10"
                nursery.start_soon(http.get, query)
                await eventually(lambda: relay.services.held.statistics().held_long_polls == 1)
                held = await scrape(http)
                fake_upstream.insert("war_calls", call(FACTION, 4))
            await http.get("/no-such-path")
            await http.request("BREW", "/ping")
            samples = await scrape(http)

    faction = str(FACTION)
    assert value(held, "cat_relay_held_requests", kind="long_poll") == 1
    assert value(samples, "cat_relay_held_requests", kind="long_poll") == 0
    assert value(samples, "cat_relay_build_info", version=relay_version()) == 1
    assert value(samples, "cat_relay_upstream_state", faction_id=faction, state="connected") == 1
    assert value(samples, "cat_relay_upstream_state", faction_id=faction, state="backoff") == 0
    assert value(samples, "cat_relay_events_stored_total", faction_id=faction, source="upstream") == 4
    assert value(samples, "cat_relay_upstream_changes_received_total", faction_id=faction) == 4
    assert value(samples, "cat_relay_reconciles_total", faction_id=faction) >= 1
    assert value(samples, "cat_relay_reconcile_differences_total", faction_id=faction) == 0
    # Three events to the script's polls (in one or more answers), one to the long-poll.
    assert value(samples, "cat_relay_events_served_total", faction_id=faction) == 4
    assert value(samples, "cat_relay_members", faction_id=faction) == 1
    assert 0 <= value(samples, "cat_relay_upstream_last_event_age_seconds", faction_id=faction) < 20
    assert value(samples, "cat_relay_polls_total", kind="long_poll", outcome="events") == 1
    assert value(samples, "cat_relay_polls_total", kind="poll", outcome="empty") >= 1
    assert value(samples, "cat_relay_polls_total", kind="poll", outcome="events") >= 1
    assert value(samples, "cat_relay_http_responses_total", route="/subscribe", status="200") == 2
    assert value(samples, "cat_relay_http_responses_total", route="other", status="404") == 1
    # A method nobody answers is "other" too, so random methods cannot grow the series either.
    assert value(samples, "cat_relay_http_responses_total", method="other", route="/ping", status="405") == 1
    polls = sum(s.value for s in samples["cat_relay_polls_total"] if s.labels["kind"] == "poll")
    assert (
        value(samples, "cat_relay_http_request_duration_seconds_count", method="GET", route="/events")
        == polls
    )
    assert (
        value(samples, "cat_relay_http_request_duration_seconds_bucket", route="/events?wait", le="+Inf") == 1
    )
    assert value(samples, "cat_relay_database_size_bytes") > 0
    assert value(samples, "cat_relay_database_wal_size_bytes") > 0  # events written since the last checkpoint
    assert value(samples, "cat_relay_factions", subscription="active") == 2
    assert value(samples, "cat_relay_factions_limit") == 150  # limits.max_factions
    assert value(samples, "cat_relay_storage_file_replaced") == 0
    assert value(samples, "cat_relay_storage_write_failing") == 0
    assert "process_resident_memory_bytes" in samples


async def test_a_refused_key_shows_as_auth_failed_beside_a_connected_faction(
    relay: RunningRelay, fake_upstream: FakeSupabase
) -> None:
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=relay.url, timeout=10) as http:
            await Userscript(http, FACTION).start()
            await wait_connected(http, FACTION)
            fake_upstream.refuse_upgrades(403, "invalid apikey")
            await Userscript(http, OTHER_FACTION).start()

            samples: dict[str, list[Sample]] = {}

            async def scrape_into() -> None:
                samples.update(await scrape(http))

            def refused() -> bool:
                labels = {"faction_id": str(OTHER_FACTION), "state": "auth_failed"}
                return value(samples, "cat_relay_upstream_state", **labels) == 1

            await eventually_async(scrape_into, refused)
            samples = await scrape(http)
    assert value(samples, "cat_relay_upstream_state", faction_id=str(FACTION), state="connected") == 1
    assert value(samples, "cat_relay_upstream_attempts", faction_id=str(OTHER_FACTION)) >= 1


def relay_version() -> str:
    return relay.__version__


def rest_bodies_read(running: RunningRelay) -> tuple[int, int]:
    """The response bodies the faction's reconciles and the project's probes have read so far."""
    reconcile = running.supervisors.statistics()[FACTION].reconcile
    assert reconcile is not None
    assert running.services.deafness is not None
    return reconcile.rest_bytes, running.services.deafness.statistics().probe_bytes


async def test_rest_egress_is_counted_beside_its_budget_and_the_faction_limit(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake_upstream: FakeSupabase
) -> None:
    fake_upstream.seed_history(FACTION, 20)
    config = make_config(
        "probe_interval_s = 0.3\nprobe_grace_s = 0.2\nrest_daily_budget_bytes = 123456\n"
        "[limits]\nmax_factions = 7\n"
    )
    running: RunningRelay = await nursery.start(functools.partial(run_relay, config))
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=running.url, timeout=10) as http:
            await Userscript(http, FACTION).start()
            await wait_reconciled(http, FACTION)
            await eventually(lambda: rest_bodies_read(running)[1] > 0)  # a probe round has run
            before = rest_bodies_read(running)
            samples = await scrape(http)
            after = rest_bodies_read(running)
    # Counters only grow: what the scrape read lies between the snapshots taken around it.
    reconciled = value(samples, "cat_relay_reconcile_rest_bytes_total", faction_id=str(FACTION))
    assert 0 < before[0] <= reconciled <= after[0]
    assert before[1] <= value(samples, "cat_relay_deaf_probe_bytes_total") <= after[1]
    assert value(samples, "cat_relay_upstream_rest_daily_budget_bytes") == 123456
    assert value(samples, "cat_relay_factions_limit") == 7
