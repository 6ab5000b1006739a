"""Finding deaf channels: joined, heartbeats answered, yet no change arrives, and nobody is told.

Supabase's change-capture workers are per project and are not restarted when they stop (a region
rebalance, the poller giving up); the next join from anyone starts them cold, and a cold start
deletes every subscription row, so channels joined before stay deaf until they rejoin
(`../shared/reference/supabase-realtime-over-time.md`, finding 1). A reconcile would heal the rows,
but only by reading whole tables; this finds the deafness itself, cheaply.

Every `probe_interval_s`, one round, for the whole project (however many factions are live): per
table, one REST request, `select=<key>&<faction column>=in.(<live factions>)&order=<key>.desc&limit=1`
with `Prefer: count=exact`, answers how many rows the live factions have and the newest key
(`relay.upstream.snapshot.probe_rows`). The relay's side is what its reconcilers have heard: the keys
of their last snapshot, followed by every live change since (`Reconciler.heard_of`). Equal (the
newest keys compared only when they are integers: Postgres orders text by a collation Python does
not follow): nothing was missed. Different: either a change is still on its way (committed, not yet read from the socket)
or one was missed. So the round waits `probe_grace_s` and looks again, faction by faction, only at
the factions that heard nothing meanwhile: a faction that heard a change is not deaf, nor is one
whose socket holds bytes not yet read (the relay is behind, under load), and a silent one whose rows
still differ is. A filter that is not `<column>=eq.{faction_id}` cannot be folded into
one request: such tables are probed per faction.

Deafness is the project's, not a channel's: when one faction is found deaf, every faction and the
shared DELETE socket rejoin (`on_deaf`; the joins are paced like any others), and each rejoin's
reconcile heals what was missed, one full read per faction. Not seen: an UPDATE that changes neither
the row count nor the newest key (it is healed by the next reconcile, after a rejoin or a gap).

A failed probe is a WARNING and waits for the next round: probes are a watch, not a source of rows.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from relay.config import ChannelConfig
from relay.upstream.snapshot import Probe, SnapshotError, postgrest_filters

if TYPE_CHECKING:
    from relay.upstream.reconcile import Reconciler

log = logging.getLogger(__name__)

# (table, PostgREST filters, key column) -> the count and newest key.
ReadProbe = Callable[[str, list[tuple[str, str]], str], Awaitable[Probe]]
FACTION_EQUALS = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*eq\.\{faction_id\}\s*$")


@dataclass(frozen=True, slots=True)
class DeafStatistics:
    rounds: int  # probe rounds made
    probe_requests: int
    probe_bytes: int  # response bodies
    probe_errors: int
    deaf_found: int  # times the project was found deaf
    behind: int  # silent factions whose rows differed while their socket held unread bytes
    checks: int  # one faction's probes, made instead of a reconcile that might not be needed
    checks_differed: int  # of those, the ones that found a difference (a reconcile followed)
    rejoins: int  # faction rejoins asked for because of it
    last_found_at: int | None  # wall-clock ms
    last_factions: tuple[int, ...]  # the factions found deaf that time


def faction_column(channel: ChannelConfig) -> str | None:
    """The column a channel's filter selects the faction by, when the filter is only that."""
    match = FACTION_EQUALS.match(channel.filter)
    return match.group(1) if match else None


class DeafWatch:
    """The project's probe rounds; every live reconciler takes part (`take_part`) and whichever is
    due runs the round, so a round is made once for the project, with no task of its own."""

    def __init__(
        self,
        channels: Sequence[ChannelConfig],
        probe: ReadProbe,
        *,
        interval_s: float,
        grace_s: float,
        wall_clock_ms: Callable[[], int],
        on_deaf: Callable[[Sequence[int]], int] | None = None,
    ) -> None:
        self._channels = list(channels)
        self._probe = probe
        self._interval_s = interval_s
        self._grace_s = grace_s
        self._wall_clock_ms = wall_clock_ms
        self.on_deaf = on_deaf  # rejoins every faction; returns how many it asked to rejoin
        self._live: dict[int, Reconciler] = {}
        self._heard_at_round: dict[int, int] = {}
        self._lock = trio.Lock()
        self._next_round_at = -float("inf")
        self._rounds = 0
        self._requests = 0
        self._bytes = 0
        self._errors = 0
        self._found = 0
        self._behind_seen = 0
        self._checks = 0
        self._checks_differed = 0
        self._rejoins = 0
        self._last_found_at: int | None = None
        self._last_factions: tuple[int, ...] = ()

    async def take_part(self, reconciler: Reconciler) -> None:
        """Until cancelled (the faction's connection ended): the faction is probed in every round,
        and makes the round when it is due."""
        self._live[reconciler.faction_id] = reconciler
        try:
            while True:
                async with self._lock:
                    if trio.current_time() >= self._next_round_at:
                        self._next_round_at = trio.current_time() + self._interval_s
                        await self._round()
                await trio.sleep_until(self._next_round_at)
        finally:
            if self._live.get(reconciler.faction_id) is reconciler:
                del self._live[reconciler.faction_id]

    async def _round(self) -> None:
        self._heal_quiet_losses()
        members = {fid: r for fid, r in self._live.items() if all(r.heard_of(t) for t in r.tables)}
        if not members:
            return
        self._rounds += 1
        heard_before = {fid: reconciler.heard for fid, reconciler in members.items()}
        try:
            if not await self._differs(members, together=True):
                return
            await trio.sleep(self._grace_s)
            silent = {
                fid: reconciler
                for fid, reconciler in members.items()
                if reconciler.heard == heard_before[fid] and self._live.get(fid) is reconciler
            }
            deaf = [fid for fid in sorted(silent) if await self._differs({fid: silent[fid]}, together=False)]
        except SnapshotError as exc:
            self._errors += 1
            log.warning("deafness probe failed (%s); next round in %.0f s", exc, self._interval_s)
            return
        # A known loss (a flood dropped changes) explains a silent faction's difference: it is healed
        # by its own reconcile, not by rejoining the project.
        for fid in deaf:
            if silent[fid].loss_pending:
                silent[fid].request("a probe found rows missed since changes were dropped")
        deaf = [fid for fid in deaf if not silent[fid].loss_pending and not self._behind(fid, silent[fid])]
        if deaf:
            self._deaf(deaf)

    async def _differs(self, members: dict[int, Reconciler], *, together: bool) -> bool:
        """Whether upstream's rows of `members` differ from what they heard, table by table."""
        some = next(iter(members.values()))
        for channel in self._channels:
            if channel.table not in some.tables:
                continue
            column = faction_column(channel) if together else None
            if column is not None:
                groups = [(sorted(members), [(column, "in.(" + ",".join(map(str, sorted(members))) + ")")])]
            else:
                groups = [([fid], postgrest_filters(channel.filter_for(fid))) for fid in sorted(members)]
            for factions, filters in groups:
                probe = await self._probe(channel.table, filters, channel.key)
                self._requests += 1
                self._bytes += probe.bytes
                if not _agrees(probe, _heard(members, factions, channel.table)):
                    log.info(
                        "deafness probe: %s of faction(s) %s upstream %d row(s), newest %r; heard %r",
                        channel.table,
                        factions,
                        probe.count,
                        probe.newest,
                        _heard(members, factions, channel.table),
                    )
                    return True
        return False

    async def differs_for(self, reconciler: Reconciler) -> bool:
        """Whether upstream's rows of this one faction differ from what it heard (its tables probed
        one request each), for a reconcile asked for only if so (`Reconciler.request`). True when
        that cannot be told: a table not read yet in this live period, keys that do not compare, a
        failed probe. A change committed and not yet heard also differs: a whole read too many,
        never one too few."""
        self._checks += 1
        if not all(reconciler.heard_of(table) is not None for table in reconciler.tables):
            return True
        try:
            differs = await self._differs({reconciler.faction_id: reconciler}, together=False)
        except SnapshotError as exc:
            self._errors += 1
            log.warning("%r: check probe failed (%s); reconciling instead", reconciler, exc)
            return True
        if differs:
            self._checks_differed += 1
        else:
            log.info("%r: check probe agrees with what was heard; no reconcile needed", reconciler)
        return differs

    def _behind(self, faction_id: int, reconciler: Reconciler) -> bool:
        """A silent faction whose socket holds bytes not yet read is behind, not deaf: its changes
        are on their way (an overloaded relay reads them late). Looked at again next round."""
        unread = reconciler.unread_upstream()
        if unread > 0:
            self._behind_seen += 1
            log.info(
                "deafness probe: faction %d differs, but its socket holds %d byte(s) unread: behind, not deaf",
                faction_id,
                unread,
            )
        return unread > 0

    def _heal_quiet_losses(self) -> None:
        """A faction whose changes a flood dropped, quiet for a whole round since: its reconcile.
        What was dropped had been read, so what was heard agrees with upstream and a probe cannot
        see the loss; the flood's own reconcile comes only after a change is stored again."""
        heard_now = {fid: reconciler.heard for fid, reconciler in self._live.items()}
        for fid, reconciler in self._live.items():
            if reconciler.loss_pending and self._heard_at_round.get(fid) == heard_now[fid]:
                reconciler.request("changes were dropped and the faction has been quiet since")
        self._heard_at_round = heard_now

    def _deaf(self, factions: Sequence[int]) -> None:
        self._found += 1
        self._last_found_at = self._wall_clock_ms()
        self._last_factions = tuple(factions)
        asked = self.on_deaf(factions) if self.on_deaf is not None else 0
        self._rejoins += asked
        log.warning(
            "upstream channels of faction(s) %s are deaf (joined, yet changes upstream never arrived):"
            " the project's change capture has stopped; rejoining %d faction(s)",
            list(factions),
            asked,
        )

    def statistics(self) -> DeafStatistics:
        return DeafStatistics(
            self._rounds,
            self._requests,
            self._bytes,
            self._errors,
            self._found,
            self._behind_seen,
            self._checks,
            self._checks_differed,
            self._rejoins,
            self._last_found_at,
            self._last_factions,
        )


def _agrees(probe: Probe, heard: tuple[int, Any]) -> bool:
    """Counts must match; newest keys only when both are integers, because Postgres orders text by
    its collation, which Python's `max` does not follow."""
    count, newest = heard
    if probe.count != count:
        return False
    if _integer(probe.newest) and _integer(newest):
        return bool(probe.newest == newest)
    return True


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _heard(members: dict[int, Reconciler], factions: Iterable[int], table: str) -> tuple[int, Any]:
    count, newest = 0, None
    for fid in factions:
        heard = members[fid].heard_of(table)
        if heard is None:
            continue
        count += heard[0]
        if heard[1] is not None and (newest is None or heard[1] > newest):
            newest = heard[1]
    return count, newest
