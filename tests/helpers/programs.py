"""The programs beyond Python that the external tier runs, where Debian puts them (.ci/run installs
each; conftest.py's fixtures skip a test whose program is missing, or fail it under CI)."""

from __future__ import annotations

from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NGINX = Path("/usr/sbin/nginx")
OPENSSL = Path("/usr/bin/openssl")
# deploy/prometheus/: the rules' unit tests (promtool) and a live Prometheus scraping a relay.
PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
# What deploy/cat-relay.service runs the one-file build with (tests/test_deploy.py holds the unit to it).
SYSTEM_PYTHON = Path("/usr/bin/python3")
SYSTEMD_ANALYZE = Path("/usr/bin/systemd-analyze")
