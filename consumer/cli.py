"""``jupyterhub-launcher run --config FILE`` (also ``python -m consumer``)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
from collections.abc import Coroutine
from typing import Any

from . import terminal
from .config import ConfigError, Settings, load_settings

# These log whole AMQP frames, message bodies (user tokens) included, at DEBUG.
CHATTY_LOGGERS = ("aio_pika", "aiormq", "pamqp")


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(settings.log_level, logging.INFO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jupyterhub-launcher", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="consume launch/remove/read commands")
    run.add_argument("--config", default=None, help="YAML config file (default: ./config.yaml if present)")
    bridge = commands.add_parser("celery-bridge", help="answer the older Celery worker's tasks (extra 'celery')")
    bridge.add_argument("--config", default=None, help="YAML config file (default: ./config.yaml if present)")
    terminal.add_commands(commands)
    args = parser.parse_args(argv)
    if args.command in terminal.COMMANDS:
        return terminal.main(args)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(args.config)
    except ConfigError as error:
        print(f"jupyterhub-launcher: {error}", file=sys.stderr)
        return 2
    configure_logging(settings)
    if args.command == "celery-bridge":
        from .celery_bridge import run as run_bridge  # Celery only where the bridge runs

        return run_bridge(settings)

    from .service import serve  # the service's dependencies only when it runs

    # What start-up made (modules, classes, Pydantic schemas: ~50,000 objects) lives as long as the
    # process. Frozen, it is out of the collector's reach, so a full collection no longer walks it:
    # in the benchmark, full collections during a burst of launches took 25-40 ms, and 1 ms frozen.
    gc.collect()
    gc.freeze()

    _run(serve(settings))
    return 0


def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # not built for this platform: the standard event loop
        asyncio.run(main)
        return
    uvloop.run(main)
