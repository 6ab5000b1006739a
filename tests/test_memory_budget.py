"""Issue 16, point 1: with every default, `relay serve` driven to the worst legitimate load stays under
the stated RSS budget (`relay.testing.worst_case`, which `make bench` reports too, in bench/budget.py).

The relay is a real process (its RSS read from /proc) with the default config but for two keys a
test cannot do without: `server.port = 0` (a free port) and `storage.path` (a temporary database).
No limit is raised: each faction and each member speaks from a loopback address of its own, so that
`limits.client_rate` (per address) is met as in production, where every member is at home.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from relay.testing.fake_supabase import FakeSupabase
from relay.testing.rss import Phase, RssSampler
from relay.testing.worst_case import (
    MIB,
    RSS_BUDGET_BYTES,
    default_plan,
    drive_worst_case,
)
from tests.helpers.factions import ANON_KEY
from tests.helpers.relay_process import relay_process

pytestmark = pytest.mark.e2e

# The whole load takes 3 to 5 minutes on a shared two-core machine, nearly all of it the relay's own
# CPU (about 30 ms per 256 KiB published, 60 ms per 1 MiB row and its read-back) and the default
# pacing of 20 joins a second (150 factions x 3 channels: 23 s). Over the budget it stops at once.
# The bound is for a relay that stalls, not a target.
TEST_BOUND_S = 600.0


def phase_line(phase: Phase) -> str:
    return (
        f"  {phase.name:<14} start {phase.started_rss / MIB:6.0f} MiB  peak {phase.peak_rss / MIB:6.0f} MiB"
        f"  end {phase.ended_rss / MIB:6.0f} MiB  {phase.seconds:5.1f} s  relay CPU {phase.relay_cpu_s:5.1f} s"
        f"  test CPU {phase.driver_cpu_s:5.1f} s"
    )


def phases_table(sampler: RssSampler) -> str:
    title = f"relay RSS: peak {sampler.peak / MIB:.0f} MiB, budget {RSS_BUDGET_BYTES / MIB:.0f} MiB"
    return "\n".join([title, *map(phase_line, sampler.phases)])


async def test_the_defaults_hold_the_worst_legitimate_load_under_the_rss_budget(
    tmp_path: Path, fake_upstream: FakeSupabase
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f'[server]\nport = 0\n[storage]\npath = "{tmp_path / "relay.db"}"\n')
    env = {**os.environ, "RELAY_UPSTREAM_URL": fake_upstream.url, "RELAY_UPSTREAM_ANON_KEY": ANON_KEY}
    plan = default_plan()
    with trio.fail_after(TEST_BOUND_S):
        async with relay_process(config, env) as relay:
            sampler = RssSampler(relay.process.pid, on_phase=lambda phase: print(phase_line(phase)))
            outcome = await drive_worst_case(
                relay.url, fake_upstream, ANON_KEY, plan, sampler, stop_above_bytes=RSS_BUDGET_BYTES
            )
    # First: over the budget, the load stopped there and the checks after it never ran.
    assert outcome.peak_rss < RSS_BUDGET_BYTES, phases_table(sampler)
    assert outcome.newest_missing == []
    assert "Traceback" not in relay.text()
