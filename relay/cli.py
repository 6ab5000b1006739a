"""The `relay` command: argument parsing, logging set-up, `trio.run`, and user errors as one line."""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import math
import resource
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

import relay
from relay.config import LOG_LEVELS, Config, ConfigError, LoggingConfig, load_config
from relay.http.descriptors import check_file_limit, open_file_limit
from relay.http.server import CannotListen
from relay.logs import configure_logging
from relay.memory import return_large_blocks_to_the_system
from relay.ops.checkconfig import check_config
from relay.ops.checkconfig import render as render_config
from relay.ops.dbstats import read_stats
from relay.ops.dbstats import render as render_stats
from relay.ops.offline import DatabaseUnreadable, load_offline
from relay.ops.statustable import DEFAULT_URL, Unreachable, exit_status, fetch_status, url_from_config
from relay.ops.statustable import render as render_status
from relay.service import run_relay
from relay.storage.lineage import StaleWriteAheadLog
from relay.storage.migrations import MigrationError
from relay.storage.store import StoreError

log = logging.getLogger("relay")

EXIT_USER_ERROR = 2
EXIT_RUNTIME_ERROR = 1
# The database cannot be opened at start-up: starting again would fail the same way until someone acts,
# so deploy/cat-relay.service lists it in RestartPreventExitStatus beside EXIT_USER_ERROR.
EXIT_STORAGE_ERROR = 3
STORAGE_ADVICE = (
    "the relay will not start until this is fixed: check the file's owner and permissions, move the "
    "database aside together with its -wal and -shm files to start empty, or restore a good copy "
    "(README, Storage)"
)
OPERATOR_COMMANDS = ("check-config", "status", "db")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay", description="CAT Relay: Supabase Realtime for Torn factions over HTTP"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {relay.__version__}")
    parser.add_argument(
        "--log-level",
        default=None,
        choices=LOG_LEVELS,
        help="the root logger's level (default: [logging] level in the config, else INFO)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the relay until SIGINT/SIGTERM")
    serve.add_argument(
        "--config", type=Path, default=None, help="relay.toml to read (default: $RELAY_CONFIG)"
    )

    demo = commands.add_parser("demo", help="run the relay against a built-in fake Supabase with war traffic")
    demo.add_argument("--port", type=int, default=8444, help="HTTP port (default 8444; 0 picks a free one)")
    demo.add_argument(
        "--factions", type=int, nargs="+", default=[46666, 11581, 9356], help="demo faction ids"
    )
    demo.add_argument(
        "--changes-per-s",
        type=_positive_rate,
        default=2.0,
        help="upstream changes per second, all factions (above 0)",
    )
    add_operator_commands(commands)
    return parser


def _positive_rate(text: str) -> float:
    """argparse's one-line refusal (exit 2) rather than the demo's traceback once it has started."""
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(rate) or rate <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return rate


# When the hard limit is unlimited, a fixed generous target (setrlimit refuses RLIM_INFINITY for files).
UNLIMITED_FILES_TARGET = 1_048_576


def raise_file_limit() -> None:
    """Every held long-poll, SSE stream and upstream socket is a descriptor; the usual soft limit of
    1024 would cap a relay near a thousand members, so take the hard limit the system allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, UNLIMITED_FILES_TARGET)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)
            return
        soft = target
    log.info("open-file limit: %d", soft)


# Young-generation threshold: CPython's default of 700 allocations runs a collection thousands of
# times a second under load and promotes every held request's objects to the old generation, which
# then triggers full collections that stop the loop for ~250 ms at 1,000 members. Measured by
# `make bench` (1,000 long-polls, 100 factions, a change per faction per second): p50 1.46 s with the
# defaults, 0.31 s with these; SSE p99 unchanged. Cyclic garbage waits longer, a few MB at most.
GC_THRESHOLDS = (100_000, 20, 100)


def tune_garbage_collector() -> None:
    """Collect less often, and never rescan what start-up loaded (modules, config): it lives forever."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(LoggingConfig(), level=args.log_level)  # until the config says otherwise
    # A file-size limit (RLIMIT_FSIZE, as a full quota behaves) must surface as a failed write that
    # /health reports and the relay recovers from, not as SIGXFSZ killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        if args.command in OPERATOR_COMMANDS:
            return run_operator_command(args)
        if args.command == "serve":
            config = load_config(args.config)
            configure_logging(config.logging, level=args.log_level)
            log_warnings(config)
            log.debug("configuration: %r", config)  # the config's repr leaves out every key
            raise_file_limit()
            check_file_limit(config, open_file_limit())
            tune_garbage_collector()
            return_large_blocks_to_the_system()
            trio.run(functools.partial(run_relay, config, handle_signals=True))
        else:
            from relay.testing.demo import run_demo  # the fake server is only loaded for the demo

            raise_file_limit()
            tune_garbage_collector()
            return_large_blocks_to_the_system()
            trio.run(
                functools.partial(
                    run_demo, port=args.port, factions=args.factions, changes_per_s=args.changes_per_s
                )
            )
    except (ConfigError, MigrationError, Unreachable, DatabaseUnreadable) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BaseExceptionGroup as group:  # raised inside the task tree: from start-up, one line
        sole = sole_exception(group)
        if not isinstance(sole, CannotListen):
            raise
        print(f"relay: {sole}", file=sys.stderr)
        return EXIT_USER_ERROR
    except StaleWriteAheadLog as exc:  # its message is the advice
        print(f"relay: {exc}", file=sys.stderr)
        return EXIT_STORAGE_ERROR
    except StoreError as exc:  # only opening raises out of the relay: every later fault is served around
        print(f"relay: {exc}; {STORAGE_ADVICE}", file=sys.stderr)
        return EXIT_STORAGE_ERROR
    except OSError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return EXIT_RUNTIME_ERROR
    return 0


def sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception inside `group` and the groups nested in it, if there is exactly one."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending and len(leaves) < 2:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 and not pending else None


def log_warnings(config: Config) -> Config:
    """What loading noticed but let through (old key names), one line each, in the log's configured shape."""
    for warning in config.warnings:
        log.warning("%s", warning)
    return config


STATUS_EPILOG = """exit status: 0 when every active (not expired) faction is connected, 1 when one is not,
2 when the relay cannot be reached, so it can serve as a cron job or a health check."""


def add_operator_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = commands.add_parser(
        "check-config",
        help="print the effective config (secrets masked) and exit 2 on problems",
        description="Load the config as `relay serve` would, print it as TOML with secrets masked and "
        "what the environment overrode, and list every problem seen offline (exit 2). "
        "Never connects upstream.",
    )
    check.add_argument(
        "--config", type=Path, default=None, help="relay.toml to read (default: $RELAY_CONFIG)"
    )

    status = commands.add_parser(
        "status",
        help="a table of a running relay's /status",
        description="Show a running relay's /status as a table, one row per faction.",
        epilog=STATUS_EPILOG,
    )
    where = status.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help=f"the relay's base URL (default {DEFAULT_URL})")
    where.add_argument(
        "--config", type=Path, default=None, help="use server.host and server.port from this config"
    )

    db = commands.add_parser("db", help="inspect the database")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    stats = db_commands.add_parser(
        "stats",
        help="sizes, schema and per-faction counts, read-only",
        description="Read the database strictly read-only (safe beside a running relay, or on a copy): "
        "file sizes, schema version, and per faction its subscription, events and stored rows.",
    )
    which = stats.add_mutually_exclusive_group()
    which.add_argument("--db", type=Path, default=None, help="the SQLite file to read")
    which.add_argument(
        "--config",
        type=Path,
        default=None,
        help="read storage.path from this config (default: $RELAY_CONFIG)",
    )


def run_operator_command(args: argparse.Namespace) -> int:
    """`check-config`, `status`, `db stats`: each module does the work; this prints and picks the status."""
    if args.command == "check-config":
        checked = check_config(args.config)
        if checked.config is not None:
            log_warnings(checked.config)
            print(render_config(checked.config, anon_key_missing=checked.anon_key_missing), end="")
        for problem in checked.problems:
            print(f"relay: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR if checked.problems else 0
    if args.command == "status":
        url = args.url or (
            url_from_config(log_warnings(load_offline(args.config))) if args.config else DEFAULT_URL
        )
        document = fetch_status(url)
        print(render_status(document, url))
        return exit_status(document)
    path = args.db or log_warnings(load_offline(args.config)).storage.path
    print(render_stats(read_stats(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
