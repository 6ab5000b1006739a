"""`relay status`: one `GET /status`, shown as a terminal table, with an exit status a cron job or a
health check can act on: 0 when every active faction is connected, 1 when one is not.

Errors: `Unreachable` (no answer, or not a relay's /status).
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, Final

from relay.config import Config
from relay.ops import terminal

DEFAULT_URL: Final = "http://127.0.0.1:8444"
# A relay answers /status from memory in milliseconds; one that takes longer is in trouble, and a
# cron job or health check must not hang on it.
TIMEOUT_S: Final = 5.0
# The stdlib client rather than httpx: httpx logs every request at INFO, which would end up on stderr.
# No proxy handler: a proxy from the environment must not stand between the operator and their relay.
DIRECT: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# 150 factions make a /status of about 100 KB; the cap only keeps a wrong URL from filling memory.
MAX_STATUS_BYTES: Final = 16 * 1024 * 1024
ERROR_CHARS: Final = 60  # the table stays within a wide terminal; /status has the whole message
# A relay listening on every address is reached on loopback from the machine it runs on.
WILDCARD_HOSTS: Final = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
EXPIRED: Final = "stopped"
CONNECTED: Final = "connected"
ALL_CONNECTED, NOT_ALL_CONNECTED = 0, 1


class Unreachable(Exception):
    """The relay did not answer /status, or answered with something that is not a relay's /status."""


def url_from_config(config: Config) -> str:
    """Where the relay that `config` describes answers on this machine."""
    if config.server.port == 0:
        raise Unreachable("server.port is 0 (the relay picks a free port when it starts): pass --url")
    host = WILDCARD_HOSTS.get(config.server.host, config.server.host)
    return f"http://[{host}]:{config.server.port}" if ":" in host else f"http://{host}:{config.server.port}"


def fetch_status(url: str, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    address = url.rstrip("/") + "/status"
    try:
        with DIRECT.open(address, timeout=timeout_s) as response:
            body = response.read(MAX_STATUS_BYTES)
    except urllib.error.HTTPError as exc:
        raise Unreachable(f"{address} answered {exc.code}, not a relay's status") from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise Unreachable(f"cannot reach the relay at {address}: {reason or type(exc).__name__}") from exc
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise Unreachable(f"{address} did not answer with JSON: is it a relay?") from exc
    if not isinstance(document, dict) or not isinstance(document.get("factions"), list):
        raise Unreachable(f"{address} did not answer with a relay's status (no factions list)")
    return document


def exit_status(document: Mapping[str, Any]) -> int:
    """0 when every faction that is not expired is connected (none at all counts as all), else 1."""
    states = [_state(faction) for faction in document["factions"]]
    return ALL_CONNECTED if all(state in (CONNECTED, EXPIRED) for state in states) else NOT_ALL_CONNECTED


def render(document: Mapping[str, Any], url: str, now_ms: int | None = None) -> str:
    """A summary line, then one row per faction. Ages are measured against the relay's own `now` when
    it sends one, so a skewed clock on the operator's side does not distort them."""
    now = _now(document, now_ms)
    factions: Sequence[Mapping[str, Any]] = document["factions"]
    states = [_state(faction) for faction in factions]
    active = sum(state != EXPIRED for state in states)
    summary = (
        f"relay {document.get('version', '?')} at {url}: up {terminal.age(_number(document.get('uptime_s')))},"
        f" {len(factions)} factions ({active} active), {states.count(CONNECTED)} connected"
    )
    if not factions:
        return summary
    with_members = any("members" in faction for faction in factions)
    with_rate = any("events_per_minute" in faction for faction in factions)
    headers = [
        "FACTION",
        "UPSTREAM",
        "ATTEMPTS",
        *(["MEMBERS"] if with_members else []),
        "STORED",
        *(["LAST 30M"] if with_rate else []),
        "LAST EVENT",
        "LAST POLL",
        "LAST ERROR",
    ]
    rows = []
    for faction, state in zip(factions, states, strict=True):
        upstream = _mapping(faction.get("upstream"))
        rows.append(
            [
                str(faction.get("faction_id", "?")),
                state,
                _text(upstream.get("attempts")),
                *([_text(faction.get("members"))] if with_members else []),
                _text(faction.get("events_stored")),
                *([_sum(faction.get("events_per_minute"))] if with_rate else []),
                terminal.age_since(_millis(faction.get("last_event_at")), now),
                terminal.age_since(_millis(faction.get("last_poll_at")), now),
                terminal.shorten(str(upstream.get("last_error") or terminal.MISSING), ERROR_CHARS),
            ]
        )
    return summary + "\n\n" + terminal.table(headers, rows)


def _now(document: Mapping[str, Any], now_ms: int | None) -> int:
    sent = _millis(document.get("now"))  # the relay's wall clock; not `timestamp`, which is a cursor
    if sent is not None:
        return sent
    return time.time_ns() // 1_000_000 if now_ms is None else now_ms


def _state(faction: Mapping[str, Any]) -> str:
    return str(_mapping(faction.get("upstream")).get("state", "?"))


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _millis(value: object) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


def _text(value: object) -> str:
    return terminal.MISSING if value is None else str(value)


def _sum(counts: object) -> str:
    if not isinstance(counts, list):
        return terminal.MISSING
    return str(sum(count for count in counts if isinstance(count, int)))
