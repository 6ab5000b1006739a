"""deploy/prometheus/alerts.yml under Debian's promtool: the rules and the example Prometheus config
load, every alert's unit tests (deploy/prometheus/alerts.test.yml) pass, every alert is tested both
firing and not firing, and every alert says what members see and links to its README runbook entry.

tests/test_grafana_dashboard.py evaluates the same expressions against a real Prometheus and relay.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

pytestmark = pytest.mark.external

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "prometheus"
RULES = DEPLOY / "alerts.yml"
RULE_TESTS = DEPLOY / "alerts.test.yml"
README = REPO / "README.md"
RUNBOOK_SECTION = "When an alert fires"
SEVERITIES = {"page", "warning"}


def alerting_rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "two alerts share a name"
    return dict(zip(names, rules, strict=True))


def runbook_entries() -> list[str]:
    """The `###` headings of the README's runbook section, in order."""
    section = README.read_text().split(f"\n## {RUNBOOK_SECTION}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^### (\S+)$", section, re.MULTILINE)


async def promtool(binary: Path, *arguments: str) -> str:
    done = await trio.run_process(
        [str(binary), *arguments], cwd=DEPLOY, capture_stdout=True, capture_stderr=True, check=False
    )
    output = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, output
    return output


async def test_promtool_loads_the_example_config_and_every_rule(promtool_binary: Path) -> None:
    output = await promtool(promtool_binary, "check", "config", "prometheus.yml")
    assert "SUCCESS: 1 rule files found" in output
    assert f"SUCCESS: {len(alerting_rules())} rules found" in output


async def test_every_alert_passes_its_unit_tests(promtool_binary: Path) -> None:
    output = await promtool(promtool_binary, "test", "rules", RULE_TESTS.name)
    assert "SUCCESS" in output


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    cases = [
        case for group in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in group["alert_rule_test"]
    ]
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    alerts = set(alerting_rules())
    assert firing | quiet == alerts  # and no test of an alert that is gone
    assert alerts - firing == set(), "never tested firing"
    assert alerts - quiet == set(), "never tested not firing"


def test_every_alert_says_what_members_see_and_links_its_runbook_entry() -> None:
    rules = alerting_rules()
    for name, rule in rules.items():
        assert set(rule["annotations"]) == {"summary", "runbook"}, name
        assert rule["labels"]["severity"] in SEVERITIES, name
        # GitHub's anchor for a heading that is one word: the word in lower case.
        assert rule["annotations"]["runbook"] == f"README.md#{name.lower()}", name
    # One entry per alert, in the order of the rules file, and none for an alert that is gone.
    assert runbook_entries() == list(rules)
    assert f"lists the {len(rules)} alerts" in README.read_text()  # "Watching it"
