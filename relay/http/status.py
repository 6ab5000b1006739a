"""The relay as `/status` and `/metrics` show it: the per-faction view both are built from
(`faction_snapshots`), and the `/status` document.

A faction is in the view when it was ever subscribed (expired ones too) or has a supervisor; one
without a supervisor is `stopped`. `/status` also lists a faction with events stored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from relay.traffic import RATE_MINUTES
from relay.upstream.reconcile import ReconcileStatistics
from relay.upstream.supervisor import UpstreamState, UpstreamStatistics

if TYPE_CHECKING:  # the composition root builds Services and imports the HTTP side
    from relay.service import Services


@dataclass(frozen=True, slots=True)
class FactionSnapshot:
    faction_id: int
    upstream: UpstreamStatistics | None  # None while no supervisor runs for the faction

    @property
    def state(self) -> UpstreamState:
        return self.upstream.state if self.upstream else UpstreamState.STOPPED


def faction_snapshots(services: Services, also: Iterable[int] = ()) -> list[FactionSnapshot]:
    """Every faction subscribed or supervised, and those in `also`, by id, with its upstream's
    statistics."""
    upstream = services.supervisors.statistics()
    factions = set(upstream) | set(services.store.known_factions()) | set(also)
    return [FactionSnapshot(faction_id, upstream.get(faction_id)) for faction_id in sorted(factions)]


async def status_document(services: Services) -> dict[str, Any]:
    """The relay, each faction of the view with its stored events and traffic, and the relay-wide
    DELETE subscription."""
    store = services.store
    counts = await store.counts()
    traffic = services.traffic.statistics(trio.current_time())
    factions = []
    for faction in faction_snapshots(services, also=counts):
        faction_id, stats = faction.faction_id, faction.upstream
        faction_counts = counts.get(faction_id)
        flow = traffic.get(faction_id)
        factions.append(
            {
                "faction_id": faction_id,
                "upstream": {
                    "state": str(faction.state),
                    "attempts": stats.attempts if stats else 0,
                    "last_error": stats.last_error if stats else None,
                    "connected_since": stats.connected_since if stats else None,
                    "next_attempt_in_s": _rounded(stats.next_attempt_in_s) if stats else None,
                },
                "reconcile": _reconcile_document(stats.reconcile if stats else None),
                "events_stored": faction_counts.events_stored if faction_counts else 0,
                "last_event_at": faction_counts.last_event_at if faction_counts else None,
                "last_poll_at": store.last_activity_at(faction_id),
                # Addresses that asked about the faction in the last minute or hold a stream open.
                "members": flow.members if flow else 0,
                "events_per_minute": flow.events_per_minute if flow else [0] * RATE_MINUTES,
            }
        )
    shared = services.supervisors.shared_deletes_statistics()
    return {
        "online": True,
        "timestamp": store.cursor(),
        # The relay's wall clock: what a reader measures `last_event_at` and `last_poll_at` against
        # (`timestamp` is a cursor, which a client's clock running ahead may have moved up).
        "now": services.wall_clock_ms(),
        "version": services.version,
        "uptime_s": round(trio.current_time() - services.started_at, 3),
        "factions": factions,
        "deafness": _deafness_document(services),
        # The relay-wide DELETE subscription (tables with deletes = "shared"); null until a faction starts it.
        "shared_deletes": None
        if shared is None
        else {
            "state": str(shared.state),
            "attempts": shared.attempts,
            "last_error": shared.last_error,
            "connected_since": shared.connected_since,
            "changes_received": shared.changes_received,
        },
    }


def _deafness_document(services: Services) -> dict[str, Any] | None:
    """The project's deafness probes (relay.upstream.deafness); null while they are off."""
    if services.deafness is None:
        return None
    stats = services.deafness.statistics()
    return {
        "rounds": stats.rounds,
        "probe_requests": stats.probe_requests,
        "probe_errors": stats.probe_errors,
        "deaf_found": stats.deaf_found,
        "behind": stats.behind,
        "checks": stats.checks,
        "checks_differed": stats.checks_differed,
        "rejoins": stats.rejoins,
        "last_found_at": stats.last_found_at,
        "last_factions": list(stats.last_factions),
    }


def _reconcile_document(stats: ReconcileStatistics | None) -> dict[str, Any]:
    if stats is None:
        return {
            "reconciles": 0,
            "last_at": None,
            "differences": None,
            "last_error": None,
            "rest_requests": 0,
            "rest_bytes": 0,
            "requested": 0,
            "due": False,
        }
    return {
        "reconciles": stats.reconciles,
        "last_at": stats.last_at,
        "differences": stats.last_differences,
        "last_error": stats.last_error,
        "rest_requests": stats.rest_requests,
        "rest_bytes": stats.rest_bytes,
        "requested": stats.requested,
        "due": stats.due,
    }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)
