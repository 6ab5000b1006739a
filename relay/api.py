"""The HTTP API: routes, CORS, and the one renderer every refusal goes through.

`create_app(services)` builds the Quart-Trio app around services that are already running; the
app starts no tasks of its own (hypercorn's lifespan nursery is not the relay's task tree).
`GET /events` and `GET /events/stream` are answered in front of Quart by `relay.events_http`;
parsing lives in `relay.inputs`, admission in `relay.admission`, holding requests in `relay.delivery`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from relay.admission import RATE_LIMITED_PATHS, REQUEST_COSTS, check_rate
from relay.asgi import EndAfterResponse
from relay.events_http import UNKNOWN_ADDRESS, EventsEndpoint
from relay.inputs import (
    ApiError,
    check_api_key,
    check_body_size,
    parse_faction_id,
    parse_json_object,
)
from relay.metrics import metrics_registry, render
from relay.reconcile import ReconcileStatistics
from relay.responses import CORS_HEADERS, JSON_TYPE, PREFLIGHT_HEADERS, error_body
from relay.store import StoreError
from relay.supervisor import UpstreamState
from relay.traffic import RATE_MINUTES

if TYPE_CHECKING:  # the composition root builds Services and imports the HTTP side
    from relay.service import Services

log = logging.getLogger(__name__)

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
BODY_TIMEOUT_S = 10
HTML_TYPE = "text/html; charset=utf-8"
# Set by the proxy in front of several relay instances (deploy/nginx.conf) on the copy of a subscribe
# it mirrors to every instance: each learns the faction, so that it can take over its polls.
STANDBY_HEADER = "X-CAT-Relay-Standby"


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), status=status, content_type=JSON_TYPE)


@cache
def client_script() -> bytes:
    return resources.files("relay").joinpath("static/client.js").read_bytes()


@cache
def status_page() -> tuple[bytes, dict[str, str]]:
    """The status page and its headers: a policy that lets it run its own inline script and style
    (by hash, so the page stays one file) and fetch `/status`, and nothing else at all."""
    page = resources.files("relay").joinpath("static/status.html").read_text(encoding="utf-8")
    policy = (
        f"default-src 'none'; script-src {_inline_hash(page, 'script')}; style-src {_inline_hash(page, 'style')}; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    # no-cache: a relay upgraded in place serves its new page at once.
    headers = {
        "Content-Security-Policy": policy,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
    }
    return page.encode(), headers


def _inline_hash(page: str, tag: str) -> str:
    (body,) = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.DOTALL)  # exactly one, or no page at all
    return f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"


@cache  # 50 KB of JSON: parsed once, not per request
def openapi_document(version: str) -> bytes:
    """relay/static/openapi.json, the API's description, with the running relay's version in it."""
    document = json.loads(resources.files("relay").joinpath("static/openapi.json").read_bytes())
    document["info"]["version"] = version
    return json.dumps(document, separators=(",", ":")).encode()


def create_app(services: Services) -> QuartTrio:
    # No static route: each file has its own route and headers (the status page its CSP), and is
    # never served a second time without them under /static/.
    app = QuartTrio(__name__, static_folder=None)
    config, store, factions = services.config, services.store, services.factions
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
        check_rate(services, request.remote_addr, REQUEST_COSTS.get(request.path, 1))

    async def read_json(limit: int) -> Mapping[str, Any]:
        check_body_size(request.content_length, limit)
        body = await request.get_data(as_text=False)
        check_body_size(len(body), limit)
        return parse_json_object(body)

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
        # Its default relay is the address it was fetched from, so `@require https://<relay>/client.js`
        # needs nothing else. Behind a trusted proxy (which terminates TLS) the proxy's scheme counts.
        scheme = request.scheme
        forwarded = request.headers.get("X-Forwarded-Proto", "")
        if config.server.trusted_proxies and forwarded in ("http", "https"):
            scheme = forwarded
        default = f"CATRelay.defaults.relayUrl = {json.dumps(f'{scheme}://{request.host}')};\n"
        script = client_script() + (default.encode() if request.host else b"")
        return Response(script, content_type="application/javascript; charset=utf-8")

    @app.get("/")
    async def status_html() -> Response:
        page, headers = status_page()
        return Response(page, content_type=HTML_TYPE, headers=headers)

    @app.get("/openapi.json")
    async def openapi_json() -> Response:
        return Response(openapi_document(services.version), content_type=JSON_TYPE)

    @app.post("/subscribe")
    async def subscribe() -> Response:
        payload = await read_json(config.server.max_body_bytes)
        check_api_key(payload.get("api_key"), config.accepted_api_keys)
        faction_id = parse_faction_id(payload.get("faction_id"))
        if request.headers.get(STANDBY_HEADER) == "1":
            await factions.stand_by(faction_id)
            return json_response({"status": "standby", "faction_id": faction_id})
        await factions.subscribe(faction_id)
        return json_response({"status": "subscribed", "faction_id": faction_id, "timestamp": store.cursor()})

    @app.get("/state")
    async def state() -> Response:
        faction_id = parse_faction_id(request.args.get("faction_id"))
        await factions.admit(faction_id)
        services.traffic.seen(faction_id, request.remote_addr or UNKNOWN_ADDRESS, trio.current_time())
        current = store.faction_state(faction_id)
        return json_response(
            {
                "faction_id": faction_id,
                "timestamp": current.timestamp,
                "tables": current.tables,
                # Which column identifies a row of each table: what a client mirroring rows keys them by.
                "keys": config.upstream.key_columns,
            }
        )

    async def publish(faction_id: int, event_type: str, data: object) -> Response:
        if event_type not in config.publish.types:
            allowed = ", ".join(config.publish.types)
            raise ApiError(400, "invalid_type", f"type must be one of: {allowed}")
        if not isinstance(data, dict | list):
            raise ApiError(400, "invalid_data", "data must be a JSON object or array")
        await factions.admit(faction_id)
        stored = await services.ingest.published(faction_id, event_type, data)
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

    registry = metrics_registry(services)

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = render(registry, request.headers.get("Accept", ""))
        return Response(body, content_type=content_type)

    install_error_handlers(app)
    install_cors(app)
    # Quart's documented place for ASGI middleware, so that its test client goes through it too.
    routes = [rule.rule for rule in app.url_map.iter_rules()]
    app.asgi_app = EventsEndpoint(services, EndAfterResponse(app.asgi_app), routes)  # type: ignore[method-assign,assignment]
    return app


async def status_document(services: Services) -> dict[str, Any]:
    store = services.store
    counts = await store.counts()
    upstream = services.supervisors.statistics()
    traffic = services.traffic.statistics(trio.current_time())
    factions = []
    for faction_id in sorted(set(counts) | set(upstream) | set(store.known_factions())):
        stats = upstream.get(faction_id)
        faction_counts = counts.get(faction_id)
        flow = traffic.get(faction_id)
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


def _reconcile_document(stats: ReconcileStatistics | None) -> dict[str, Any]:
    if stats is None:
        return {"reconciles": 0, "last_at": None, "differences": None, "last_error": None, "rest_requests": 0}
    return {
        "reconciles": stats.reconciles,
        "last_at": stats.last_at,
        "differences": stats.last_differences,
        "last_error": stats.last_error,
        "rest_requests": stats.rest_requests,
    }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    response = Response(error_body(code, message), status=status, content_type=JSON_TYPE)
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
        # A 405 must say which methods the path answers (RFC 9110 15.5.6); the body is ours, JSON.
        headers = {name: value for name, value in exc.get_headers() if name.lower() != "content-type"}
        return error_response(status, code, message, headers)

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
