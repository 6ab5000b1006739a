"""The HTTP API: routes, CORS, and the one renderer every refusal goes through.

`create_app(services)` builds the Quart-Trio app around services that are already running; the
app starts no tasks of its own (hypercorn's lifespan nursery is not the relay's task tree).
Parsing lives in `relay.inputs`, holding requests in `relay.delivery`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from relay.config import Config
from relay.delivery import HeldRequests, next_poll_ms, stream_events, wait_for_events
from relay.hub import Hub
from relay.inputs import (
    ApiError,
    check_api_key,
    check_body_size,
    parse_faction_id,
    parse_json_object,
    parse_since,
    parse_wait,
)
from relay.ratelimit import RateLimiter, retry_after_header
from relay.store import Store, StoreError
from relay.supervisor import Supervisors, UpstreamState

log = logging.getLogger(__name__)

JSON_TYPE = "application/json; charset=utf-8"
CORS_HEADERS = {"Access-Control-Allow-Origin": "*"}
PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, Last-Event-ID",
    "Access-Control-Max-Age": "86400",
}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
HTTP_ERROR_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    414: "uri_too_long",
    431: "headers_too_large",
}
# What the legacy publishing paths carry, and under which body key: (event type, body key).
LEGACY_PUBLISH = {
    "/hospital": ("hospital_update", "data"),
    "/faction-members": ("faction_members_update", "members"),
}
STREAM_RETRY_AFTER_S = "30"
BODY_TIMEOUT_S = 10


# The routes a client address is rate-limited on: everything that costs the relay work per member.
RATE_LIMITED_PATHS = frozenset({"/subscribe", "/events", "/events/stream", "/hospital", "/faction-members"})


@dataclass(frozen=True, slots=True)
class Services:
    config: Config
    store: Store
    supervisors: Supervisors
    hub: Hub
    held: HeldRequests
    limiter: RateLimiter
    version: str
    started_at: float  # trio clock
    wall_clock_ms: Callable[[], int]


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), status=status, content_type=JSON_TYPE)


@cache
def client_script() -> bytes:
    return resources.files("relay").joinpath("static/client.js").read_bytes()


def create_app(services: Services) -> QuartTrio:
    app = QuartTrio(__name__)
    config, store, supervisors, hub, held = (
        services.config,
        services.store,
        services.supervisors,
        services.hub,
        services.held,
    )
    # Quart applies one body limit to every route; the publishing routes need the larger one, and
    # the others check their own (smaller) limit before reading.
    app.config["MAX_CONTENT_LENGTH"] = max(config.server.max_body_bytes, config.publish.max_body_bytes)
    app.config["RESPONSE_TIMEOUT"] = None  # SSE streams are meant to stay open; shutdown ends them
    # A body of at most publish.max_body_bytes takes no honest client long; a slow one holds a socket.
    app.config["BODY_TIMEOUT"] = BODY_TIMEOUT_S

    @app.before_request
    async def rate_limit() -> None:
        if request.path not in RATE_LIMITED_PATHS or request.method == "OPTIONS":
            return
        wait_s = services.limiter.acquire(request.remote_addr or "unknown", trio.current_time())
        if wait_s > 0:
            raise ApiError(
                429,
                "rate_limited",
                "too many requests from this address; slow down",
                {"Retry-After": retry_after_header(wait_s)},
            )

    async def read_json(limit: int) -> Mapping[str, Any]:
        check_body_size(request.content_length, limit)
        body = await request.get_data(as_text=False)
        check_body_size(len(body), limit)
        return parse_json_object(body)

    def ensure_capacity(faction_id: int) -> None:
        # One upstream socket per active faction counts against the Supabase project's connections.
        subscription = store.subscription(faction_id)
        already_active = subscription is not None and subscription.active
        if not already_active and len(store.active_factions()) >= config.limits.max_factions:
            raise ApiError(
                429, "too_many_factions", f"this relay serves at most {config.limits.max_factions} factions"
            )

    async def known_faction(faction_id: int) -> None:
        """A request about a faction: 404 if never subscribed; revives an expired one; is activity."""
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

    async def apply_client_clock(since: int | None) -> None:
        """Lamport's rule for a `since` ahead of the relay, within the allowed skew."""
        if since is None or since <= store.cursor():
            return
        if since > services.wall_clock_ms() + int(config.limits.max_clock_skew_s * 1000):
            raise ApiError(400, "invalid_since", "since is further ahead of the relay's clock than allowed")
        try:
            await store.advance_clock(since)
        except StoreError:
            # While nothing can be written no event can be stored either, so the poll is still
            # answered from memory; its cursor stays the relay's own, below `since`, which the script
            # keeps only when events come with it.
            return

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

    @app.get("/client.js")
    async def client_js() -> Response:
        return Response(client_script(), content_type="application/javascript; charset=utf-8")

    @app.post("/subscribe")
    async def subscribe() -> Response:
        payload = await read_json(config.server.max_body_bytes)
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
        wait_s = parse_wait(request.args.get("wait"), config.limits.long_poll_max_wait)
        await known_faction(faction_id)
        await apply_client_clock(since)
        found, cursor = store.read_since(faction_id, since)
        if not found and wait_s > 0:
            with held.long_poll() as may_hold:
                if may_hold:
                    found, cursor = await wait_for_events(
                        store,
                        hub,
                        faction_id,
                        since,
                        wait_s=wait_s,
                        linger_s=config.limits.long_poll_linger_s,
                    )
        advice = next_poll_ms(store, held, faction_id, services.wall_clock_ms())
        body = (
            '{"events":['
            + ",".join(event.json for event in found)
            + f'],"timestamp":{cursor},"next_poll_ms":{advice}}}'
        )
        return Response(body, content_type=JSON_TYPE)

    @app.get("/events/stream")
    async def events_stream() -> Response:
        faction_id = parse_faction_id(request.args.get("faction_id"))
        resume = request.headers.get("Last-Event-ID")
        since = parse_since(resume if resume is not None else request.args.get("since"))
        await known_faction(faction_id)
        await apply_client_clock(since)
        if not held.try_open_stream():
            raise ApiError(
                503,
                "too_many_streams",
                "this relay holds as many streams as it can; poll /events instead",
                {"Retry-After": STREAM_RETRY_AFTER_S},
            )
        body = stream_events(store, hub, held, faction_id, since)
        return Response(body, content_type="text/event-stream; charset=utf-8", headers=SSE_HEADERS)

    async def publish(faction_id: int, event_type: str, data: object) -> Response:
        if event_type not in config.publish.types:
            allowed = ", ".join(config.publish.types)
            raise ApiError(400, "invalid_type", f"type must be one of: {allowed}")
        if not isinstance(data, dict | list):
            raise ApiError(400, "invalid_data", "data must be a JSON object or array")
        await known_faction(faction_id)
        (stored,) = await store.append_events(faction_id, [(event_type, data)])
        hub.notify(faction_id)
        return json_response({"status": "published", "id": stored.id, "timestamp": stored.timestamp})

    @app.post("/events")
    async def publish_event() -> Response:
        payload = await read_json(config.publish.max_body_bytes)
        check_api_key(payload.get("api_key"), config.accepted_api_keys)
        faction_id = parse_faction_id(payload.get("faction_id"))
        event_type = payload.get("type")
        return await publish(
            faction_id, event_type if isinstance(event_type, str) else "", payload.get("data")
        )

    @app.post("/hospital")
    @app.post("/faction-members")
    async def publish_legacy() -> Response:
        event_type, data_key = LEGACY_PUBLISH[request.path]
        payload = await read_json(config.publish.max_body_bytes)
        check_api_key(payload.get("api_key", request.args.get("apikey")), config.accepted_api_keys)
        faction_id = parse_faction_id(payload.get("faction_id"))
        return await publish(faction_id, event_type, payload.get(data_key))

    @app.get("/status")
    async def status() -> Response:
        return json_response(await status_document(services))

    install_error_handlers(app)
    install_cors(app)
    return app


async def status_document(services: Services) -> dict[str, Any]:
    store = services.store
    counts = await store.counts()
    upstream = services.supervisors.statistics()
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
    return {
        "online": True,
        "timestamp": store.cursor(),
        "version": services.version,
        "uptime_s": round(trio.current_time() - services.started_at, 3),
        "factions": factions,
    }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    response = json_response({"error": message, "code": code}, status)
    response.headers.update(headers or {})
    return response


def install_error_handlers(app: QuartTrio) -> None:
    @app.errorhandler(ApiError)
    async def api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

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
