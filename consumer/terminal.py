"""The terminal client: ``jupyterhub-launcher launch|read|remove|watch`` (see README, "Terminal client").

It is a thin layer over :class:`consumer.client.LauncherClient`: arguments are turned into a command
and checked completely before anything is sent; a launch shows the hub's progress (a live bar on a
terminal, plain lines otherwise, on stderr), and the exit status says which failure class ended it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from typing import Any, TextIO

from pydantic import ValidationError

from schemas import CloudEvent, LaunchCommand, ReadCommand, RemoveCommand, describe_errors

from .client import LauncherClient
from .config import ConfigError, Settings, load_settings

# Exit statuses, one per failure class (documented in the README).
EXIT_OK = 0
EXIT_USAGE = 2  # bad arguments or configuration; nothing was sent
EXIT_CODES: dict[str, int] = {
    "invalid_command": 3,
    "not_found": 4,
    "already_running": 5,
    "options_rejected": 6,
    "spawn_failed": 7,
    "spawn_timeout": 8,
    "hub_unavailable": 9,
    "hub_error": 10,
    "internal_error": 11,
    "timeout": 12,  # no reply within the command's timeout plus the margin
    "not_delivered": 13,  # no command queue on the broker
    "broker_unreachable": 14,
}
EXIT_OTHER = 1  # an error code this client does not know
EXIT_INTERRUPTED = 130

COMMANDS = ("launch", "read", "remove", "watch")
# Which argument a command field comes from, so that a refusal names what the user typed.
ARGUMENT_OF = {
    "username": "-u/--user",
    "server_name": "--server",
    "image": "-i/--image",
    "cpu": "--cpu",
    "memory": "--memory",
    "gpu": "--gpu",
    "vols": "--vol",
    "env": "--env",
    "ttl": "--ttl",
    "timeout": "--timeout",
}
_DURATION = re.compile(r"(\d+(?:\.\d*)?)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d``, ``1h30m``: seconds."""
    text = text.strip().lower()
    parts = _DURATION.findall(text)
    if not text or "".join(n + u for n, u in parts) != text or (len(parts) > 1 and any(u == "" for _, u in parts)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (90, 90s, 15m, 2h, 1d, 1h30m)")
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be more than 0")
    return seconds


def request_limit(text: str) -> dict[str, str]:
    """``REQUEST[:LIMIT]`` or ``:LIMIT``: the command's ``{"request", "limit"}``."""
    request, _, limit = text.partition(":")
    if not request and not limit:
        raise argparse.ArgumentTypeError(f"{text!r}: give REQUEST, REQUEST:LIMIT or :LIMIT")
    return {k: v for k, v in (("request", request), ("limit", limit)) if v}


def volume(text: str) -> dict[str, str]:
    """``CLAIM:/MOUNT[:SUBPATH]``."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise argparse.ArgumentTypeError(f"{text!r} is not CLAIM:/MOUNT/PATH[:SUBPATH]")
    return {"pvc": parts[0], "mount": parts[1], **({"subpath": parts[2]} if len(parts) == 3 else {})}


def variable(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``launch``, ``read``, ``remove`` and ``watch`` to the CLI's subcommands."""
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--config", default=None, help="the service's YAML config file (default: ./config.yaml if present)"
    )
    connection.add_argument(
        "--amqp-url", default=None, help="RabbitMQ URL (default: amqp_url from the config / LAUNCHER_AMQP_URL)"
    )
    connection.add_argument("--json", action="store_true", help="print the whole reply (watch: each event) as JSON")
    target = argparse.ArgumentParser(add_help=False)
    target.add_argument("-u", "--user", required=True, help="the JupyterHub user name")
    target.add_argument(
        "--server", default="", metavar="NAME", help="a named server (default: the user's default server)"
    )
    target.add_argument(
        "--timeout", type=duration, default=None, help="seconds (or 5m, ...) to wait; launch: the launch's own timeout"
    )

    launch = commands.add_parser(
        "launch", parents=[connection, target], help="start a server and print its URL and token",
        description="Start (or return) a user's server, with live progress; prints the URL and token.",
    )  # fmt: skip
    launch.add_argument("-i", "--image", required=True)
    launch.add_argument("--cpu", type=request_limit, metavar="REQ[:LIMIT]", help="cores, e.g. 1 or 1:2 or :2")
    launch.add_argument(
        "--memory", type=request_limit, metavar="REQ[:LIMIT]", help="e.g. 2G or 2G:4G (G = 1024^3 bytes)"
    )
    launch.add_argument("--gpu", type=request_limit, metavar="N", help="whole GPUs")
    launch.add_argument(
        "--vol", type=volume, action="append", metavar="CLAIM:/PATH[:SUB]", help="mount a PVC (repeatable)"
    )
    launch.add_argument(
        "--env", type=variable, action="append", metavar="NAME=VALUE", help="environment variable (repeatable)"
    )
    launch.add_argument("--ttl", type=duration, help="remove the server this long after it is ready (90s, 15m, 2h, 1d)")
    commands.add_parser("read", parents=[connection, target], help="print a server's JupyterHub model")
    commands.add_parser("remove", parents=[connection, target], help="stop a server")
    watch = commands.add_parser(
        "watch", parents=[connection], help="print lifecycle events as they happen, one line each"
    )
    watch.add_argument("-u", "--user", default=None, help="only this user's events")
    watch.add_argument("--server", default=None, metavar="NAME", help="only this server's events ('' = default server)")
    watch.add_argument(
        "--type", action="append", metavar="PATTERN", help="event types, AMQP topic patterns: 'launch.*' (repeatable)"
    )
    watch.add_argument("--count", type=int, default=None, help="stop after this many events")


def main(args: argparse.Namespace) -> int:
    """Run a terminal subcommand; the exit status."""
    try:
        command = _command(args)
    except _Usage as error:
        print(f"jupyterhub-launcher {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        settings = load_settings(args.config)
    except ConfigError as error:
        print(f"jupyterhub-launcher: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_main(args, command, settings))
    except KeyboardInterrupt:
        if args.command == "watch":
            return EXIT_OK
        print("interrupted (the launcher still carries out a command it received)", file=sys.stderr)
        return EXIT_INTERRUPTED


class _Usage(Exception):
    pass


def _command(args: argparse.Namespace) -> LaunchCommand | ReadCommand | RemoveCommand | None:
    """The command, checked by the contract's own models before anything is sent."""
    if args.command == "watch":
        return None
    fields: dict[str, Any] = {"action": args.command, "username": args.user, "server_name": args.server}
    if args.command == "launch":
        gpu = args.gpu
        if gpu is not None and "limit" not in gpu:
            gpu = {"request": gpu["request"], "limit": gpu["request"]}  # Kubernetes: request = limit
        fields |= {
            "image": args.image, "cpu": args.cpu, "memory": args.memory, "gpu": gpu, "vols": args.vol,
            "env": dict(args.env) if args.env else None, "ttl": args.ttl, "timeout": args.timeout,
        }  # fmt: skip
    models: dict[str, type[LaunchCommand | ReadCommand | RemoveCommand]] = {
        "launch": LaunchCommand,
        "read": ReadCommand,
        "remove": RemoveCommand,
    }
    model = models[args.command]
    try:
        return model.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as error:
        raise _Usage(
            "; ".join(
                f"argument {ARGUMENT_OF.get(p['field'].split('.')[0], p['field'])}: {p['field']}: {p['message']}"
                for p in describe_errors(error)
            )
        ) from None


async def _main(
    args: argparse.Namespace, command: LaunchCommand | ReadCommand | RemoveCommand | None, settings: Settings
) -> int:
    if args.amqp_url:
        settings = settings.model_copy(update={"amqp_url": args.amqp_url})
    client = LauncherClient.from_settings(settings, connection_name=f"jupyterhub-launcher {args.command}")
    try:
        await client.connect()
    except Exception as error:  # noqa: BLE001 (OSError, aiormq's AMQPConnectionError, a malformed URL)
        print(f"error: cannot connect to RabbitMQ: {type(error).__name__}", file=sys.stderr)
        await client.close()
        return EXIT_CODES["broker_unreachable"]
    try:
        if command is None:
            return await _watch(client, args)
        return await _run(client, args, command)
    finally:
        await client.close()


async def _run(
    client: LauncherClient, args: argparse.Namespace, command: LaunchCommand | ReadCommand | RemoveCommand
) -> int:
    from .client import LauncherError

    label = f"{command.username}/{command.server_name}"
    timeout = args.timeout if not isinstance(command, LaunchCommand) else None
    try:
        if isinstance(command, LaunchCommand):
            with _progress_display(label, quiet=args.json) as on_progress:
                reply = await client.call(command, on_progress=on_progress)
        else:
            reply = await client.call(command, timeout=timeout)
    except LauncherError as error:  # no reply: timeout, not delivered
        answer: dict[str, Any] = {
            "ok": False, "action": command.action, "username": command.username, "server_name": command.server_name,
            "result": None, "error": {"code": error.code, "message": error.message, "details": None},
        }  # fmt: skip
    else:
        answer = reply.model_dump(mode="json")
    if args.json:
        print(json.dumps(answer, indent=2))
    if not answer["ok"]:
        code, message = answer["error"]["code"], answer["error"]["message"]
        print(f"error: {code}: {message}", file=sys.stderr)
        return EXIT_CODES.get(code, EXIT_OTHER)
    if not args.json:
        _print_result(command, answer["result"] or {})
    return EXIT_OK


def _print_result(command: LaunchCommand | ReadCommand | RemoveCommand, result: dict[str, Any]) -> None:
    if isinstance(command, LaunchCommand):
        print(f"url: {result['url']}")
        print(f"token: {result['token']}")
        if result.get("expires_at"):
            print(f"expires_at: {result['expires_at']}")
    elif isinstance(command, ReadCommand):
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(f"stopped {command.username}/{command.server_name}")


class _progress_display:
    """A launch's progress: a rich bar on a terminal (stderr), plain lines otherwise."""

    def __init__(self, label: str, quiet: bool, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.quiet = quiet and not self.live
        self.progress: Any = None

    def __enter__(self) -> Any:
        if self.quiet:
            return None
        if not self.live:
            return self._line
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.fields[label]}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=Console(file=self.stream),
        )
        self.progress.start()
        self.task = self.progress.add_task("sent", total=100, label=self.label)
        return self._bar

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def _line(self, event: CloudEvent) -> None:
        data = event.data
        if event.type == "launch.progress":
            text = f"{data.get('progress', '?')}% {data.get('message', '')}"
        else:
            text = data.get("message") or data.get("url") or data.get("image") or ""
        print(f"{event.type} {self.label} {text}".rstrip(), file=self.stream, flush=True)

    def _bar(self, event: CloudEvent) -> None:
        data = event.data
        if event.type == "launch.accepted":
            self.progress.update(self.task, description="accepted")
        elif event.type == "launch.progress":
            self.progress.update(self.task, completed=data.get("progress") or 0, description=data.get("message", ""))
        elif event.type == "launch.ready":
            self.progress.update(self.task, completed=100, description="ready")
        elif event.type == "launch.failed":
            self.progress.update(self.task, description=f"failed: {data.get('message', '')}")


async def _watch(client: LauncherClient, args: argparse.Namespace) -> int:
    seen = 0
    async with client.events(user=args.user, server=args.server, types=args.type or ["#"]) as stream:
        print("watching events (Ctrl-C to stop)", file=sys.stderr, flush=True)
        async for event in stream:
            print(event.model_dump_json() if args.json else _event_line(event), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                break
    return EXIT_OK


def _event_line(event: CloudEvent) -> str:
    data = event.data
    detail = " ".join(
        str(v) for v in (
            f"{data['progress']}%" if data.get("progress") is not None else None,
            data.get("code"), data.get("reason"), data.get("message"), data.get("url"), data.get("image"),
        ) if v
    )  # fmt: skip
    return f"{event.time.isoformat(timespec='seconds')} {event.type:<16} {event.subject} {detail}".rstrip()
