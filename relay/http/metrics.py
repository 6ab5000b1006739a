"""`GET /metrics`: the running relay's `statistics()` snapshots in Prometheus's text format.

Nothing is counted here. A collector reads the snapshots at scrape time, so the request path pays
for plain integers (relay/traffic.py, relay/http/stats.py) and not for the client library's locks
and label lookups. Per-faction series carry a `faction_id` label: at most `limits.max_factions`
active factions, plus the expired ones still listed in `/status`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import trio
from prometheus_client import exposition
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from relay.http.answers import AnswerCache
from relay.http.stats import ConnectionStatistics, Histogram
from relay.http.status import faction_snapshots
from relay.traffic import Source
from relay.upstream.deafness import DeafStatistics
from relay.upstream.shared_deletes import RouterStatistics
from relay.upstream.supervisor import UpstreamState, UpstreamStatistics

if TYPE_CHECKING:  # the composition root builds Services and imports the HTTP side
    from relay.service import Services

PREFIX = "cat_relay"


def metrics_registry(services: Services, answers: AnswerCache) -> CollectorRegistry:
    """A registry of its own per relay (not the library's global one), so that several relays in
    one process (the tests) do not collide; with the process's CPU, memory and descriptors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(services, answers))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """The exposition in the format the scraper asked for (Prometheus text, or OpenMetrics)."""
    encoder, content_type = exposition.choose_encoder(accept)
    return encoder(registry), content_type


class RelayCollector(Collector):
    def __init__(self, services: Services, answers: AnswerCache) -> None:
        self._services = services
        self._answers = answers

    def collect(self) -> Iterator[Metric]:
        yield from self._relay()
        yield from self._upstream()
        yield from self._traffic()
        yield from self._http()
        yield from self._storage()

    def _relay(self) -> Iterator[Metric]:
        services = self._services
        info = GaugeMetricFamily(f"{PREFIX}_build_info", "The relay's version.", labels=["version"])
        info.add_metric([services.version], 1)
        yield info
        yield GaugeMetricFamily(
            f"{PREFIX}_uptime_seconds",
            "Seconds since the relay started.",
            trio.current_time() - services.started_at,
        )

    def _upstream(self) -> Iterator[Metric]:
        services = self._services
        state = GaugeMetricFamily(
            f"{PREFIX}_upstream_state",
            "1 for the faction's upstream state (connected, connecting, backoff, auth_failed, misconfigured,"
            " stopped), 0 for the others.",
            labels=["faction_id", "state"],
        )
        attempts = _per_faction(
            GaugeMetricFamily, "upstream_attempts", "Connection attempts since the upstream was last live."
        )
        reconnects = _per_faction(
            CounterMetricFamily, "upstream_reconnects", "Connections opened again after one ended."
        )
        received = _per_faction(
            CounterMetricFamily, "upstream_changes_received", "Changes the upstream socket delivered."
        )
        ignored = _per_faction(
            CounterMetricFamily,
            "upstream_changes_ignored",
            "Changes dropped because their row belongs to another faction, or their type is not their"
            " channel's event (servers before 2025-11 sent every type).",
        )
        misconfigured = _per_faction(
            CounterMetricFamily,
            "upstream_misconfigured",
            "Connections ended by a subscription error Supabase never retries (table not published, bad"
            " filter): state misconfigured, retried every 10 minutes.",
        )
        retries = _per_faction(
            CounterMetricFamily,
            "upstream_subscription_retries",
            "Subscription errors Supabase retries on the same join (database timeouts); the socket is kept.",
        )
        resubscribed = _per_faction(
            CounterMetricFamily,
            "upstream_resubscriptions",
            "Channels subscribed again on a live socket (changes in between were never sent; each asks"
            " for a reconcile).",
        )
        dropped = _per_faction(
            CounterMetricFamily,
            "upstream_changes_dropped",
            "Changes dropped, oldest first, from a flood the relay could not keep (members told truncated).",
        )
        reconciles = _per_faction(
            CounterMetricFamily, "reconciles", "Completed reconciles of the faction's rows with upstream."
        )
        rest_requests = _per_faction(
            CounterMetricFamily, "reconcile_rest_requests", "Supabase REST requests made by reconciles."
        )
        rest_bytes = _per_faction(
            CounterMetricFamily, "reconcile_rest_bytes", "Response bodies the faction's reconciles read."
        )
        failing = _per_faction(
            GaugeMetricFamily, "reconcile_failing", "1 while the faction's latest reconcile attempt failed."
        )
        for faction in faction_snapshots(services):
            label, stats = str(faction.faction_id), faction.upstream
            for each in UpstreamState:
                state.add_metric([label, str(each)], 1 if each == faction.state else 0)
            if stats is None:
                continue
            attempts.add_metric([label], stats.attempts)
            reconnects.add_metric([label], stats.reconnects)
            received.add_metric([label], stats.changes_received)
            ignored.add_metric([label], stats.changes_ignored)
            dropped.add_metric([label], stats.changes_dropped)
            misconfigured.add_metric([label], stats.misconfigurations)
            retries.add_metric([label], stats.subscription_retries)
            resubscribed.add_metric([label], stats.resubscriptions)
            if stats.reconcile is not None:
                reconciles.add_metric([label], stats.reconcile.reconciles)
                rest_requests.add_metric([label], stats.reconcile.rest_requests)
                rest_bytes.add_metric([label], stats.reconcile.rest_bytes)
                failing.add_metric([label], 1 if stats.reconcile.last_error else 0)
        yield from (
            state,
            attempts,
            reconnects,
            received,
            ignored,
            dropped,
            misconfigured,
            retries,
            resubscribed,
            reconciles,
            rest_requests,
            rest_bytes,
            failing,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_upstream_rest_daily_budget_bytes",
            "upstream.rest_daily_budget_bytes: REST response bodies (reconciles and probes) allowed a day,"
            " for the egress alert; not enforced.",
            services.config.upstream.rest_daily_budget_bytes,
        )
        yield from _shared_deletes(services.supervisors.shared_deletes_statistics())
        yield from _delete_routing(services.ingest.shared_deletes_statistics())
        if services.deafness is not None:
            yield from _deafness(services.deafness.statistics())

    def _traffic(self) -> Iterator[Metric]:
        services = self._services
        now = trio.current_time()
        stored = CounterMetricFamily(
            f"{PREFIX}_events_stored",
            "Events committed, by where they came from (upstream, reconcile, published).",
            labels=["faction_id", "source"],
        )
        differences = _per_faction(
            CounterMetricFamily,
            "reconcile_differences",
            "Differences to upstream that reconciles found and stored as resync events.",
        )
        served = CounterMetricFamily(
            f"{PREFIX}_events_served", "Events sent to members (each member counted).", labels=["faction_id"]
        )
        members = _per_faction(
            GaugeMetricFamily,
            "members",
            "Addresses that asked about the faction within a minute or hold a stream open.",
        )
        age = _per_faction(
            GaugeMetricFamily,
            "upstream_last_event_age_seconds",
            "Seconds since the faction's upstream last sent a change (factions that sent one since start).",
        )
        for faction_id, flow in sorted(services.traffic.statistics(now).items()):
            label = str(faction_id)
            for source, count in flow.stored.items():
                stored.add_metric([label, str(source)], count)
            differences.add_metric([label], flow.stored[Source.RECONCILE])
            served.add_metric([label], flow.served)
            members.add_metric([label], flow.members)
            if flow.last_upstream_change_at is not None:
                age.add_metric([label], now - flow.last_upstream_change_at)
        yield from (stored, differences, served, members, age)
        delivery = services.held.statistics()
        held = GaugeMetricFamily(
            f"{PREFIX}_held_requests", "Long-polls and SSE streams held open now.", labels=["kind"]
        )
        held.add_metric(["long_poll"], delivery.held_long_polls)
        held.add_metric(["stream"], delivery.open_streams)
        yield held
        yield GaugeMetricFamily(
            f"{PREFIX}_held_requests_limit", "limits.max_held_requests.", services.held.limit
        )
        yield CounterMetricFamily(
            f"{PREFIX}_held_requests_refused",
            "Long-polls answered at once and streams refused because the relay held its limit.",
            delivery.refused_over_cap,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_answers_built", "Event answers and SSE chunks built.", self._answers.built
        )
        yield CounterMetricFamily(
            f"{PREFIX}_answers_reused",
            "Event answers and SSE chunks sent again from the cache, built once for many members.",
            self._answers.reused,
        )

    def _http(self) -> Iterator[Metric]:
        http = self._services.http.statistics()
        polls = CounterMetricFamily(
            f"{PREFIX}_polls",
            "GET /events by kind (poll, long_poll) and outcome (events, empty, hung_up, refused, failed).",
            labels=["kind", "outcome"],
        )
        for (kind, outcome), count in sorted(http.polls.items()):
            polls.add_metric([str(kind), str(outcome)], count)
        yield polls
        yield CounterMetricFamily(f"{PREFIX}_streams_opened", "SSE streams opened.", http.streams_opened)
        yield from _connections(self._services.http.connections.statistics())
        responses = CounterMetricFamily(
            f"{PREFIX}_http_responses",
            "HTTP responses by method, route and status.",
            labels=["method", "route", "status"],
        )
        for (method, route, status), count in sorted(http.responses.items()):
            responses.add_metric([method, route, str(status)], count)
        yield responses
        latency = HistogramMetricFamily(
            f"{PREFIX}_http_request_duration_seconds",
            "Seconds from a request's arrival to the end of its answer, by method and route (long-polls apart; streams not).",
            labels=["method", "route"],
        )
        for (method, route), histogram in sorted(http.latency.items()):
            latency.add_metric([method, route], _cumulative(histogram), histogram.sum_s)
        yield latency

    def _storage(self) -> Iterator[Metric]:
        store = self._services.store
        sizes = store.file_sizes()
        yield GaugeMetricFamily(
            f"{PREFIX}_database_size_bytes", "The SQLite database file.", sizes.database_bytes
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_database_wal_size_bytes",
            "The SQLite write-ahead log; the maintenance pass's checkpoint truncates it.",
            sizes.wal_bytes,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_storage_file_replaced",
            "1 while the database's path no longer leads to the file the relay has open (deleted,"
            " replaced or moved); /health says which.",
            int(store.file_fault() is not None),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_storage_write_failing",
            "1 while the database's latest write failed (a full disk or quota, a read-only file, a lock"
            " held too long): new events are not stored; /health says why.",
            int(store.write_fault() is not None),
        )
        stats = store.statistics()
        factions = GaugeMetricFamily(
            f"{PREFIX}_factions",
            "Subscribed factions, active (a socket each) or expired.",
            labels=["subscription"],
        )
        factions.add_metric(["active"], stats.active_factions)
        factions.add_metric(["expired"], stats.factions - stats.active_factions)
        yield factions
        yield GaugeMetricFamily(
            f"{PREFIX}_factions_limit",
            "limits.max_factions: active factions at most; a new one beyond it is refused (429).",
            self._services.config.limits.max_factions,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_group_commits", "Transactions that stored appended events.", stats.group_commits
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_events_in_memory",
            "Kept events also held in memory (the newest of each faction); older kept ones are read"
            " from the database.",
            stats.events_in_memory,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_events_memory_bytes",
            "What the events held in memory take, as retention.memory_bytes counts it.",
            stats.events_memory_bytes,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_events_quarantined",
            "Stored events that could not be read back (not UTF-8 or not JSON), skipped; see the log.",
            stats.events_quarantined,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_faction_rows_quarantined",
            "Stored faction rows that could not be read back, left for the next reconcile; see the log.",
            stats.faction_rows_quarantined,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_upstream_changes_refused",
            "Upstream changes, and rows a reconcile found, that JSON cannot carry (NaN, nested too"
            " deep): not stored, one WARNING each.",
            stats.changes_refused,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_upstream_changes_incomplete",
            "Upstream changes Realtime sent incomplete (an Error 413/400/401 record, an UPDATE without"
            " unchanged TOAST columns): never stored as a partial row, each followed by a reconcile.",
            stats.changes_incomplete,
        )


def _per_faction(
    family: type[GaugeMetricFamily] | type[CounterMetricFamily], name: str, documentation: str
) -> GaugeMetricFamily | CounterMetricFamily:
    return family(f"{PREFIX}_{name}", documentation, labels=["faction_id"])


def _shared_deletes(stats: UpstreamStatistics | None) -> Iterator[Metric]:
    if stats is None:
        return
    state = GaugeMetricFamily(
        f"{PREFIX}_shared_deletes_state", "1 for the relay-wide DELETE channels' state.", labels=["state"]
    )
    for each in UpstreamState:
        state.add_metric([str(each)], 1 if each == stats.state else 0)
    yield state
    yield CounterMetricFamily(
        f"{PREFIX}_shared_deletes_changes_received",
        "DELETEs received on the relay-wide channels, before routing to factions.",
        stats.changes_received,
    )
    yield CounterMetricFamily(
        f"{PREFIX}_shared_deletes_changes_ignored",
        "INSERTs and UPDATEs dropped on the relay-wide DELETE channels (servers before 2025-11 send"
        " every type).",
        stats.changes_ignored,
    )
    yield CounterMetricFamily(
        f"{PREFIX}_shared_deletes_misconfigured",
        "Connections of the relay-wide DELETE channels ended by a subscription error Supabase never retries.",
        stats.misconfigurations,
    )


def _deafness(stats: DeafStatistics) -> Iterator[Metric]:
    yield CounterMetricFamily(
        f"{PREFIX}_deaf_found",
        "Times the project's channels were found deaf (joined, hearing nothing).",
        stats.deaf_found,
    )
    yield CounterMetricFamily(
        f"{PREFIX}_deaf_behind",
        "Silent factions whose rows differed upstream while their socket held unread bytes (not deaf).",
        stats.behind,
    )
    yield CounterMetricFamily(
        f"{PREFIX}_deaf_checks",
        "One faction's probes made instead of a reconcile that might not be needed (cold start, shared DELETE gap).",
        stats.checks,
    )
    yield CounterMetricFamily(
        f"{PREFIX}_deaf_checks_differed",
        "Of those checks, the ones that found a difference, so a reconcile followed.",
        stats.checks_differed,
    )
    yield CounterMetricFamily(
        f"{PREFIX}_deaf_rejoins",
        "Faction rejoins asked for because the project's channels were deaf.",
        stats.rejoins,
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_deaf_last_found_timestamp_seconds",
        "When the channels were last found deaf (Unix seconds); 0 never.",
        (stats.last_found_at or 0) / 1000,
    )
    yield CounterMetricFamily(
        f"{PREFIX}_deaf_probe_requests", "REST requests made by deafness probes.", stats.probe_requests
    )
    yield CounterMetricFamily(
        f"{PREFIX}_deaf_probe_bytes", "Response bodies the deafness probes read.", stats.probe_bytes
    )
    yield CounterMetricFamily(
        f"{PREFIX}_deaf_probe_errors", "Deafness probe rounds that failed.", stats.probe_errors
    )


def _delete_routing(stats: RouterStatistics) -> Iterator[Metric]:
    # Always there, also before the shared channels start: a zero is an answer, a missing series is not.
    yield CounterMetricFamily(
        f"{PREFIX}_shared_deletes_routed",
        "Shared DELETEs handed to the faction holding their row, at once or after parking.",
        stats.routed,
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_shared_deletes_parked", "Shared DELETEs waiting for their row's INSERT.", stats.parked
    )
    yield CounterMetricFamily(
        f"{PREFIX}_shared_deletes_dropped",
        "Shared DELETEs no faction stored the row of within the parking time: another relay's, or"
        " lost (the reconcile is the backstop).",
        stats.dropped,
    )


def _cumulative(histogram: Histogram) -> list[tuple[str, float]]:
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip((*histogram.buckets, math.inf), histogram.counts, strict=True):
        running += count
        buckets.append(("+Inf" if bound == math.inf else repr(bound), running))
    return buckets


def _connections(stats: ConnectionStatistics) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        f"{PREFIX}_http_connections", "Client connections open now.", stats.open_connections
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_http_connections_limit",
        "Client connections accepted at once: the open-file limit less the relay's own reserve.",
        stats.max_connections,
    )
    ends = CounterMetricFamily(
        f"{PREFIX}_http_connections_ended",
        "Connections accepted, and those that ended badly: the client vanished mid-request or mid-answer, "
        "it stopped reading and was cut, serving it failed (logged), or it spoke HTTP/2 (answered 505).",
        labels=["how"],
    )
    ends.add_metric(["vanished"], stats.vanished)
    ends.add_metric(["stalled"], stats.stalled)
    ends.add_metric(["failed"], stats.failed)
    ends.add_metric(["http2_refused"], stats.http2_refused)
    yield ends
    yield CounterMetricFamily(
        f"{PREFIX}_http_connections_accepted", "Client connections accepted.", stats.accepted
    )
    yield CounterMetricFamily(
        f"{PREFIX}_http_accept_errors",
        "accept() failures for want of descriptors or memory (new members wait in the backlog).",
        stats.accept_errors,
    )
