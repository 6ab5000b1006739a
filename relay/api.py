"""The HTTP API: routes, input parsing, CORS, and the one error shape every failure is rendered in.

`create_app(services)` builds the Quart-Trio app around services that are already running; the
app starts no tasks of its own (hypercorn's lifespan nursery is not the relay's task tree).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from relay.config import Config
from relay.hub import Hub
from relay.store import Store, StoreError
from relay.supervisor import Supervisors, UpstreamState

log = logging.getLogger(__name__)

JSON_TYPE = "application/json; charset=utf-8"
MAX_FACTION_ID = 2**31 - 1
# Longest digit strings worth parsing: ten digits hold 2**31-1, sixteen hold any ms timestamp
# for the next 300,000 years; anything longer is refused before int() spends time on it.
MAX_FACTION_ID_DIGITS = 10
MAX_SINCE_DIGITS = 16
CORS_HEADERS = {"Access-Control-Allow-Origin": "*"}
PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, Last-Event-ID",
    "Access-Control-Max-Age": "86400",
}
HTTP_ERROR_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    414: "uri_too_long",
    431: "headers_too_large",
}


class ApiError(Exception):
    """A request the relay refuses: rendered as {"error": message, "code": code} with `status`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Services:
    config: Config
    store: Store
    supervisors: Supervisors
    hub: Hub
    version: str
    started_at: float  # trio clock
    wall_clock_ms: Callable[[], int]


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), status=status, content_type=JSON_TYPE)


def error_response(status: int, code: str, message: str) -> Response:
    return json_response({"error": message, "code": code}, status)


def parse_faction_id(value: object) -> int:
    """A JSON integer, or a string of ASCII digits, from 1 to 2**31-1."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif (
        isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= MAX_FACTION_ID_DIGITS
    ):
        number = int(value)
    else:
        raise ApiError(400, "invalid_faction_id", "faction_id must be an integer from 1 to 2147483647")
    if not 1 <= number <= MAX_FACTION_ID:
        raise ApiError(400, "invalid_faction_id", "faction_id must be an integer from 1 to 2147483647")
    return number


def parse_since(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= MAX_SINCE_DIGITS):
        raise ApiError(400, "invalid_since", "since must be a cursor: a whole number of milliseconds")
    return int(value)


def parse_json_object(body: str | bytes) -> Mapping[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_json", "the request body must be a JSON object")
    return payload


def check_api_key(presented: object, accepted: tuple[str, ...]) -> None:
    """Constant-time comparison against every accepted key; the key itself is never logged."""
    if not isinstance(presented, str) or not presented:
        raise ApiError(401, "invalid_api_key", "an api_key is required")
    candidate = presented.encode("utf-8", "surrogatepass")
    matched = False
    for key in accepted:
        matched |= hmac.compare_digest(candidate, key.encode("utf-8"))
    if not matched:
        raise ApiError(401, "invalid_api_key", "the api_key is not accepted by this relay")


def create_app(services: Services) -> QuartTrio:
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = services.config.server.max_body_bytes
    store, supervisors, config = services.store, services.supervisors, services.config

    @app.get("/ping")
    async def ping() -> Response:
        return json_response({"status": "ok", "deployed": True, "online": True, "version": services.version})

    @app.get("/health")
    async def health() -> Response:
        try:
            await store.check_health()
        except StoreError as exc:
            return json_response(
                {"status": "unavailable", "error": str(exc), "code": "storage_unavailable"}, 503
            )
        return json_response({"status": "ok"})

    def ensure_capacity(faction_id: int) -> None:
        # One upstream socket per active faction counts against the Supabase project's connections.
        subscription = store.subscription(faction_id)
        already_active = subscription is not None and subscription.active
        if not already_active and len(store.active_factions()) >= config.limits.max_factions:
            raise ApiError(
                429, "too_many_factions", f"this relay serves at most {config.limits.max_factions} factions"
            )

    @app.post("/subscribe")
    async def subscribe() -> Response:
        payload = parse_json_object(await request.get_data(as_text=False))
        check_api_key(payload.get("api_key"), config.accepted_api_keys)
        faction_id = parse_faction_id(payload.get("faction_id"))
        ensure_capacity(faction_id)
        await store.subscribe(faction_id)
        supervisors.ensure_running(faction_id)
        return json_response({"status": "subscribed", "faction_id": faction_id, "timestamp": store.cursor()})

    @app.get("/events")
    async def events() -> Response:
        faction_id = parse_faction_id(request.args.get("faction_id"))
        since = parse_since(request.args.get("since"))
        subscription = store.subscription(faction_id)
        if subscription is None:
            raise ApiError(
                404, "not_subscribed", f"faction {faction_id} is not subscribed; POST /subscribe first"
            )
        if not subscription.active:
            # Today's script never re-subscribes, so its poll is what brings an expired faction back.
            ensure_capacity(faction_id)
            await store.revive(faction_id)
            supervisors.ensure_running(faction_id)
        store.touch(faction_id)
        if since is not None:
            await apply_client_clock(since)
        found, cursor = store.read_since(faction_id, since)
        body = '{"events":[' + ",".join(event.json for event in found) + '],"timestamp":' + str(cursor) + "}"
        return Response(body, content_type=JSON_TYPE)

    async def apply_client_clock(since: int) -> None:
        """Lamport's rule for a `since` ahead of the relay, within the allowed skew."""
        if since <= store.cursor():
            return
        limit = services.wall_clock_ms() + int(config.limits.max_clock_skew_s * 1000)
        if since > limit:
            raise ApiError(400, "invalid_since", "since is further ahead of the relay's clock than allowed")
        await store.advance_clock(since)

    @app.get("/status")
    async def status() -> Response:
        counts = await store.counts()
        upstream = supervisors.statistics()
        factions = []
        for faction_id in sorted(set(counts) | set(upstream) | set(store.known_factions())):
            stats = upstream.get(faction_id)
            faction_counts = counts.get(faction_id)
            factions.append(
                {
                    "faction_id": faction_id,
                    "upstream": {
                        "state": str(stats.state if stats else UpstreamState.STOPPED),
                        "attempts": stats.attempts if stats else 0,
                        "last_error": stats.last_error if stats else None,
                        "connected_since": stats.connected_since if stats else None,
                        "next_attempt_in_s": _rounded(stats.next_attempt_in_s) if stats else None,
                    },
                    "events_stored": faction_counts.events_stored if faction_counts else 0,
                    "last_event_at": faction_counts.last_event_at if faction_counts else None,
                    "last_poll_at": store.last_activity_at(faction_id),
                }
            )
        return json_response(
            {
                "online": True,
                "timestamp": store.cursor(),
                "version": services.version,
                "uptime_s": round(trio.current_time() - services.started_at, 3),
                "factions": factions,
            }
        )

    install_error_handlers(app)
    install_cors(app)
    return app


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def install_error_handlers(app: QuartTrio) -> None:
    @app.errorhandler(ApiError)
    async def api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = HTTP_ERROR_CODES.get(status, f"http_{status}")
        if status == 413:
            message = "the request body is larger than this relay accepts"
        else:
            message = exc.description or exc.name
        return error_response(status, code, message)

    @app.errorhandler(StoreError)
    async def store_error(exc: StoreError) -> Response:
        log.error("storage fault while answering %s %s: %s", request.method, request.path, exc)
        return error_response(503, "storage_unavailable", "the relay's storage is not available right now")

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return error_response(500, "internal_error", "the relay failed to answer this request")


def install_cors(app: QuartTrio) -> None:
    @app.after_request
    async def add_cors(response: Response) -> Response:
        response.headers.update(CORS_HEADERS)
        if request.method == "OPTIONS":
            response.headers.update(PREFLIGHT_HEADERS)
        return response
