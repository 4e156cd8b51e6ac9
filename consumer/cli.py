"""``jupyterhub-launcher run --config FILE`` (also ``python -m consumer``)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
from collections.abc import Coroutine
from typing import Any

from . import __version__, logs, terminal
from .config import ConfigError, Settings, load_settings
from .logs import CHATTY_LOGGERS

__all__ = ["CHATTY_LOGGERS", "configure_logging", "main"]
DESCRIPTION = (
    "Start, read and stop users' Jupyter servers through JupyterHub, on commands from RabbitMQ. "
    "Configuration: a YAML file and LAUNCHER_<KEY> environment variables."
)
log = logging.getLogger(__name__)


def configure_logging(settings: Settings) -> None:
    logs.configure(settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jupyterhub-launcher", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="consume launch/remove/read commands",
        description="Consume launch, remove and read commands until SIGTERM or SIGINT.",
    )
    run.add_argument("--config", default=None, help="YAML config file (default: ./config.yaml if present)")
    bridge = commands.add_parser("celery-bridge", help="answer the older Celery worker's tasks (extra 'celery')")
    bridge.add_argument("--config", default=None, help="YAML config file (default: ./config.yaml if present)")
    terminal.add_commands(commands)
    args = parser.parse_args(argv)
    if args.command in terminal.COMMANDS:
        return terminal.main(args)

    logs.configure()  # until the settings say otherwise: text at INFO, secrets redacted
    try:
        settings = load_settings(args.config)
    except ConfigError as error:
        print(f"jupyterhub-launcher: {error}", file=sys.stderr)
        return 2
    configure_logging(settings)
    if args.command == "celery-bridge":
        from .celery_bridge import run as run_bridge  # Celery only where the bridge runs

        return run_bridge(settings)

    from .broker import QueueMismatch
    from .service import serve  # the service's dependencies only when it runs

    # What start-up made (modules, classes, Pydantic schemas: ~50,000 objects) lives as long as the
    # process. Frozen, it is out of the collector's reach, so a full collection no longer walks it:
    # in the benchmark, full collections during a burst of launches took 25-40 ms, and 1 ms frozen.
    gc.collect()
    gc.freeze()

    from .startup import StartupError

    try:
        _run(serve(settings))
    except QueueMismatch as error:  # a deployment mistake, named with how to migrate
        print(f"jupyterhub-launcher: {error}", file=sys.stderr)
        return 2
    except StartupError as error:
        log.error("%s", error)
        return 1
    except KeyboardInterrupt:  # SIGINT before the service's own handler was in place
        return 130
    return 0


def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # not built for this platform: the standard event loop
        asyncio.run(main)
        return
    uvloop.run(main)
