"""deploy/cat-relay.service as systemd reads it, and the README's deploy commands held to it."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path, PurePosixPath

import pytest

from relay.cli import EXIT_STORAGE_ERROR, EXIT_USER_ERROR
from relay.config import load_config
from tests.helpers.programs import SYSTEM_PYTHON
from tests.helpers.relay_process import SHUTDOWN_BOUND_S

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "cat-relay.service"
README = (REPO / "README.md").read_text()
# `systemd-analyze security` scores exposure from 0 to 100 (printed divided by ten): the unit scores
# 12 with Debian 12's systemd 252, and dropping any one protection raises it. A newer systemd that
# scores more checks may need this number looked at again, not raised to whatever it prints.
MAX_EXPOSURE = 12


def unit_settings() -> dict[str, list[str]]:
    """Every `Key=value` of the unit, in order; systemd allows a key more than once."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def one(key: str) -> str:
    (value,) = unit_settings()[key]
    return value


def environment() -> dict[str, str]:
    return dict(assignment.split("=", 1) for assignment in unit_settings()["Environment"])


def exec_start() -> tuple[str, str, str]:
    """The interpreter, the pyz and the config that the unit starts."""
    found = re.fullmatch(r"(\S+) (\S+\.pyz) serve --config (\S+)", one("ExecStart"))
    assert found, one("ExecStart")
    interpreter, pyz, config = found.groups()
    return interpreter, pyz, config


def deploy_section() -> str:
    section = README.split("\n## Deploy on a Debian VM\n", 1)[1]
    return section.split("\n## ", 1)[0]


def deploy_commands() -> str:
    return "\n".join(re.findall(r"```sh\n(.*?)```", deploy_section(), re.DOTALL))


@pytest.mark.external
def test_systemd_verify_accepts_the_unit_without_a_word(systemd_analyze: Path) -> None:
    # verify exits 0 even for an unknown key or a value it cannot parse (it ignores the line, as
    # systemd would at boot), so anything on stderr is a failure too.
    result = subprocess.run(
        [systemd_analyze, "verify", "--man=no", str(UNIT)], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.external
def test_the_unit_stays_hardened(systemd_analyze: Path) -> None:
    result = subprocess.run(
        [
            systemd_analyze,
            "security",
            "--offline=yes",
            f"--threshold={MAX_EXPOSURE}",
            "--no-pager",
            str(UNIT),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""


@pytest.mark.unit
def test_the_unit_holds_together() -> None:
    env = environment()
    state = PurePosixPath("/var/lib") / one("StateDirectory")
    cache = PurePosixPath("/var/cache") / one("CacheDirectory")
    # ProtectSystem=strict leaves only these folders writable: the database and shiv's unpacked
    # dependencies must be inside them.
    assert one("ProtectSystem") == "strict"
    assert PurePosixPath(env["RELAY_STORAGE_PATH"]).parent == state
    assert PurePosixPath(env["SHIV_ROOT"]) == cache
    assert one("DynamicUser") == "yes"
    assert one("Restart") == "on-failure"
    assert one("RestartPreventExitStatus").split() == [str(EXIT_USER_ERROR), str(EXIT_STORAGE_ERROR)]
    assert one("KillSignal") == "SIGTERM"
    # systemd kills what has not stopped by then: the relay's own bound, with a margin, and no more.
    assert int(one("TimeoutStopSec")) == 2 * SHUTDOWN_BOUND_S
    assert int(one("LimitNOFILE")) >= 65536
    assert "RELAY_UPSTREAM_ANON_KEY" not in env  # a secret: only in the 0600 environment file
    interpreter, _, _ = exec_start()
    assert Path(interpreter) == SYSTEM_PYTHON  # what tests/test_pyz.py runs the build with


@pytest.mark.unit
def test_the_readme_deploys_where_the_unit_looks() -> None:
    commands = deploy_commands()
    _, pyz, config = exec_start()
    env_file = one("EnvironmentFile")
    for path in (pyz, config, env_file, "/etc/systemd/system/cat-relay.service"):
        assert path in commands, path
    # What gets copied is what this checkout has and builds, under the names the commands use.
    for source in ("relay.toml", "deploy/cat-relay.service"):
        assert (REPO / source).exists(), source
        assert source in commands, source
    assert "make pyz && scp dist/cat-relay.pyz" in commands
    assert re.search(r"^PYZ := dist/cat-relay\.pyz$", (REPO / "Makefile").read_text(), re.MULTILINE)
    # The key file is born 0600, holding the one variable the relay reads the key from.
    key_line = rf"\(umask 077 && echo 'RELAY_UPSTREAM_ANON_KEY=[^']+' > {re.escape(env_file)}\)"
    assert re.search(key_line, commands)
    assert "systemctl daemon-reload && systemctl enable --now cat-relay" in commands
    assert "journalctl -u cat-relay" in commands
    port = tomllib.loads((REPO / "relay.toml").read_text())["server"]["port"]
    assert f"curl -s http://127.0.0.1:{port}/ping" in commands
    section = deploy_section()
    assert environment()["RELAY_STORAGE_PATH"] in section  # where the database lives
    assert "deploy/nginx.conf" in section


@pytest.mark.unit
def test_the_readme_sed_sets_upstream_url_in_the_shipped_config(tmp_path: Path) -> None:
    found = re.search(r"^sed -i '([^']+)' (\S+)", deploy_commands(), re.MULTILINE)
    assert found, "the deploy commands set upstream.url with sed"
    expression, target = found.groups()
    assert target == exec_start()[2]
    config = tmp_path / "relay.toml"
    shutil.copy(REPO / "relay.toml", config)
    project = "abcdefghijklmnopqrst"
    subprocess.run(["sed", "-i", expression.replace("<your project ref>", project), str(config)], check=True)
    loaded = load_config(config, environ={}, overrides={"RELAY_UPSTREAM_ANON_KEY": "key"})
    assert loaded.upstream.url == f"wss://{project}.supabase.co/realtime/v1/websocket"
