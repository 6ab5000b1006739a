"""The README's promises: its two first commands, and a configuration table that matches the code."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path

import pytest

from relay.config import SECTIONS as CONFIG_SECTIONS

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
# Every section the code reads; storage's one key is a path resolved against the file (checked below).
SECTIONS = {name: shape for name, shape in CONFIG_SECTIONS.items() if name != "storage"}
NOT_A_PLAIN_VALUE = {"upstream.url", "upstream.anon_key", "upstream.channels", "logging.levels"}


def test_the_first_screen_is_make_demo_and_make_test() -> None:
    first_block = README.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.MULTILINE)
    assert re.search(r"^test:", makefile, re.MULTILINE)
    assert "make test" in (REPO / ".ci" / "run").read_text()


def readme_defaults() -> dict[str, str]:
    rows = re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \| ([^|]+) \|", README, re.MULTILINE)
    return {key: default.strip() for key, default in rows}


def test_the_configuration_table_lists_every_key_with_its_default() -> None:
    documented = readme_defaults()
    expected_keys = {"storage.path"} | {
        f"{section}.{field.name}" for section, cls in SECTIONS.items() for field in dataclasses.fields(cls)
    }
    assert set(documented) == expected_keys
    for section, cls in SECTIONS.items():
        for field in dataclasses.fields(cls):
            key = f"{section}.{field.name}"
            if key in NOT_A_PLAIN_VALUE:
                continue
            default = list(field.default) if isinstance(field.default, tuple) else field.default
            assert documented[key] == f"`{json.dumps(default)}`", key
    assert documented["storage.path"] == '`"data/relay.db"`'


def test_the_tests_section_shows_how_to_run_one_tier_and_names_every_tier() -> None:
    pytest_options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    tiers = [marker.split(":", 1)[0] for marker in pytest_options["markers"]]
    section = README.split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    assert ".venv/bin/pytest -m unit" in section
    assert re.findall(r"^\| `(\w+)` \|", section, re.MULTILINE) == tiers
