"""The HTTP API: `create_app(services)`, which reads as the list of routes, with CORS and the Quart
side of the one error renderer (`relay.http.responses`).

The app is built around services that are already running and starts no tasks of its own
(hypercorn's lifespan nursery is not the relay's task tree). In front of it is the HTTP edge
(`relay.http.edge`), where `GET /events` and `GET /events/stream` are answered (`relay.http.events`).
Parsing lives in `relay.http.inputs`, admission in `relay.http.admission`, holding requests in
`relay.http.delivery`, the files served as they are in `relay.http.assets`, the `/status` document in
`relay.http.status`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import trio
from quart import Response, request
from quart_trio import QuartTrio

from relay.config import Config
from relay.http.admission import RATE_LIMITED_PATHS, REQUEST_COSTS, check_rate
from relay.http.answers import AnswerCache
from relay.http.asgi import UNKNOWN_ADDRESS
from relay.http.assets import install_asset_routes
from relay.http.edge import http_edge
from relay.http.inputs import (
    check_api_key,
    check_body_size,
    parse_faction_id,
    parse_json_object,
)
from relay.http.large import pieces_response, state_answer
from relay.http.metrics import metrics_registry, render
from relay.http.responses import (
    CORS_HEADERS,
    JSON_HEADERS,
    JSON_TYPE,
    PREFLIGHT_HEADERS,
    STORAGE_UNAVAILABLE,
    ApiError,
    Refusal,
    refusal,
)
from relay.http.status import status_document
from relay.storage.store import StateTexts, StoreError

if TYPE_CHECKING:  # the composition root builds Services and imports the HTTP side
    from relay.service import Services

log = logging.getLogger(__name__)

# What the legacy publishing paths carry, and under which body key: (event type, body key).
LEGACY_PUBLISH = {
    "/hospital": ("hospital_update", "data"),
    "/faction-members": ("faction_members_update", "members"),
}
BODY_TIMEOUT_S = 10
# Set by the proxy in front of several relay instances (deploy/nginx.conf) on the copy of a subscribe
# it mirrors to every instance: each learns the faction, so that it can take over its polls.
STANDBY_HEADER = "X-CAT-Relay-Standby"


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), status=status, content_type=JSON_TYPE)


class RelayApp(QuartTrio):
    """The relay's Quart-Trio app, with the cache of event answers its events endpoint fills and
    `/metrics` reports on: the app's own, so that two apps (the tests') never share answers."""

    def __init__(self, import_name: str, answers: AnswerCache, **options: Any) -> None:
        super().__init__(import_name, **options)
        self.answers = answers


def create_app(services: Services) -> RelayApp:
    # No static route: each file has its own route and headers (relay.http.assets).
    app = RelayApp(__name__, AnswerCache(JSON_HEADERS), static_folder=None)
    config, store, factions = services.config, services.store, services.factions
    _configure_limits(app, config)
    install_rate_limit(app, services)

    @app.get("/ping")
    async def ping() -> Response:
        return json_response({"status": "ok", "deployed": True, "online": True, "version": services.version})

    @app.get("/health")
    async def health() -> Response:
        try:
            await store.check_health()
        except StoreError as exc:
            # /health's own documented shape: `status` for a monitor, and the storage's own words.
            document = {"status": "unavailable", "error": str(exc), "code": STORAGE_UNAVAILABLE.code}
            return json_response(document, STORAGE_UNAVAILABLE.status)
        return json_response({"status": "ok"})

    install_asset_routes(app, config, services.version)  # /client.js, /, /openapi.json

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

        def encode(current: StateTexts) -> list[bytes]:  # in the store's worker thread
            # `keys`: which column identifies a row of each table, what a client mirroring rows keys them by.
            return state_answer(faction_id, current, config.upstream.key_columns)

        return pieces_response(await store.faction_state_encoded(faction_id, encode))

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

    registry = metrics_registry(services, app.answers)

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = render(registry, request.headers.get("Accept", ""))
        return Response(body, content_type=content_type)

    install_error_handlers(app)
    install_cors(app)
    # Quart's documented place for ASGI middleware, so that its test client goes through it too.
    app.asgi_app = http_edge(services, app.answers, app)  # type: ignore[method-assign,assignment]
    return app


def _configure_limits(app: QuartTrio, config: Config) -> None:
    # Quart applies one body limit to every route; the publishing routes need the larger one, and
    # the others check their own (smaller) limit before reading.
    app.config["MAX_CONTENT_LENGTH"] = max(config.server.max_body_bytes, config.publish.max_body_bytes)
    app.config["RESPONSE_TIMEOUT"] = None  # SSE streams are meant to stay open; shutdown ends them
    # A body of at most publish.max_body_bytes takes no honest client long; a slow one holds a socket.
    app.config["BODY_TIMEOUT"] = BODY_TIMEOUT_S


def install_rate_limit(app: QuartTrio, services: Services) -> None:
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


def error_response(refused: Refusal) -> Response:
    response = Response(refused.body, status=refused.status, content_type=JSON_TYPE)
    response.headers.update(refused.headers)
    return response


def install_error_handlers(app: QuartTrio) -> None:
    # One handler for every exception, HTTPException included: Quart finds it by the exception's MRO,
    # and `refusal` tells them apart in one place for both layers.
    @app.errorhandler(Exception)
    async def refuse(exc: Exception) -> Response:
        return error_response(refusal(exc, request.method, request.path, log))


def install_cors(app: QuartTrio) -> None:
    @app.after_request
    async def add_cors(response: Response) -> Response:
        response.headers.update(CORS_HEADERS)
        if request.method == "OPTIONS":
            response.headers.update(PREFLIGHT_HEADERS)
        return response
