"""The files the relay serves as they are, each by a route of its own with its own headers: the
browser client (`/client.js`), the status page (`/`, under a content security policy hashed from its
inline script and style) and the API's OpenAPI document (`/openapi.json`), read from relay/static.

No static route serves the folder: a file is never served a second time without its headers under
/static/.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from functools import cache
from importlib import resources

from quart import Response, request
from quart_trio import QuartTrio

from relay.config import Config
from relay.http.responses import JSON_TYPE

HTML_TYPE = "text/html; charset=utf-8"
JAVASCRIPT_TYPE = "application/javascript; charset=utf-8"


def install_asset_routes(app: QuartTrio, config: Config, version: str) -> None:
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
        return Response(script, content_type=JAVASCRIPT_TYPE)

    @app.get("/")
    async def status_html() -> Response:
        page, headers = status_page()
        return Response(page, content_type=HTML_TYPE, headers=headers)

    @app.get("/openapi.json")
    async def openapi_json() -> Response:
        return Response(openapi_document(version), content_type=JSON_TYPE)


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
