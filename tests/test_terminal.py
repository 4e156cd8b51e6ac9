"""The terminal client (``jupyterhub-launcher launch|read|remove|watch``) as a person and a script use
it: in a pseudo-terminal (live progress) and piped (plain lines, ``--json``), against the real
service, broker and hub."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import pty
import struct
import sys
import termios
from pathlib import Path

import pytest

from consumer.config import Settings
from consumer.terminal import EXIT_CODES, duration
from tests.conftest import AMQP_URL
from tests.support.localhub import free_port

CLI = [sys.executable, "-m", "consumer"]


def cli_env(settings: Settings, amqp_url: str = AMQP_URL) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAUNCHER_", "JUPYTERHUB_"))}
    return env | {
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "LAUNCHER_AMQP_URL": amqp_url,
        "LAUNCHER_COMMAND_QUEUE": settings.command_queue,
        "LAUNCHER_REPLY_EXCHANGE": settings.reply_exchange,
        "LAUNCHER_EVENTS_EXCHANGE": settings.events_exchange,
        "TERM": "xterm-256color",
    }


async def in_pty(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as stdin, stdout and stderr: (exit status, all it wrote)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    process = await asyncio.create_subprocess_exec(
        *CLI, *args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd
    )
    os.close(slave)
    chunks: list[bytes] = []
    closed = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_readable() -> None:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            data = b""
        if data:
            chunks.append(data)
        else:
            loop.remove_reader(master)
            closed.set()

    loop.add_reader(master, on_readable)
    try:
        status = await asyncio.wait_for(process.wait(), 180)
        await asyncio.wait_for(closed.wait(), 10)
    finally:
        loop.remove_reader(master)
        os.close(master)
    return status, b"".join(chunks).decode(errors="replace")


async def piped(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
    )
    out, err = await asyncio.wait_for(process.communicate(), 180)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_launch_in_a_terminal_shows_the_hubs_progress_then_the_url_and_token(
    service: None, settings: Settings, username: str, tmp_path: Path
) -> None:
    status, output = await in_pty(
        ["launch", "-u", username, "-i", "standin:slow-2", "--cpu", "1:2"], cli_env(settings), tmp_path
    )

    assert status == 0, output
    assert "Spawning server" in output  # the hub's own progress message, on the live bar
    assert "\x1b[" in output and "%" in output  # drawn with terminal control sequences
    assert f"url: {settings.public_url}/user/{username}/" in output
    assert "token: " in output


async def test_a_failed_launch_in_a_terminal_exits_with_its_failure_class(
    service: None, settings: Settings, username: str, tmp_path: Path
) -> None:
    status, output = await in_pty(["launch", "-u", username, "-i", "standin:crash"], cli_env(settings), tmp_path)

    assert status == EXIT_CODES["spawn_failed"] == 7, output
    assert "spawn_failed: Spawn failed: the stand-in image is broken on purpose" in output


async def test_piped_json_prints_the_whole_reply_and_plain_runs_print_lines(
    service: None, settings: Settings, username: str, tmp_path: Path
) -> None:
    env = cli_env(settings)
    status, out, err = await piped(
        ["launch", "-u", username, "--server", "lab", "-i", "standin", "--memory", "256M:1G", "--json"], env, tmp_path
    )
    assert status == 0, err
    reply = json.loads(out)
    assert reply["ok"] is True and reply["action"] == "launch"
    assert reply["result"]["memory"] == {"request": "256M", "limit": "1G"}
    assert reply["result"]["url"].endswith(f"/user/{username}/lab/")
    assert "\x1b[" not in out + err and err == ""  # --json, not a terminal: nothing but the reply

    status, out, err = await piped(["launch", "-u", username, "-i", "standin:slow-1"], env, tmp_path)
    assert status == 0, err
    lines = err.splitlines()
    assert lines[0].startswith(f"launch.accepted {username}/"), err
    assert any(line.startswith("launch.progress") and "%" in line for line in lines), err
    assert "\x1b[" not in out + err
    assert out.startswith("url: ") and "\ntoken: " in out

    status, out, _ = await piped(["read", "-u", username, "--server", "lab", "--json"], env, tmp_path)
    assert status == 0 and json.loads(out)["result"]["ready"] is True

    status, out, err = await piped(["launch", "-u", username, "-i", "standin", "--cpu", "2"], env, tmp_path)
    assert status == EXIT_CODES["already_running"], (out, err)

    status, out, _ = await piped(["remove", "-u", username, "--server", "lab"], env, tmp_path)
    assert status == 0 and out.strip() == f"stopped {username}/lab"
    status, out, err = await piped(["read", "-u", username, "--server", "lab"], env, tmp_path)
    assert status == EXIT_CODES["not_found"] and "not_found" in err and out == ""
    await piped(["remove", "-u", username], env, tmp_path)


async def test_watch_prints_one_line_per_matching_event(
    service: None, settings: Settings, username: str, tmp_path: Path
) -> None:
    env = cli_env(settings)
    watcher = await asyncio.create_subprocess_exec(
        *CLI, "watch", "--user", username, "--type", "launch.*", "--count", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert watcher.stderr is not None and watcher.stdout is not None
    assert b"watching" in await asyncio.wait_for(watcher.stderr.readline(), 60)  # subscribed
    await piped(["launch", "-u", username + "x", "-i", "standin"], env, tmp_path)  # another user: not shown
    await piped(["remove", "-u", username + "x"], env, tmp_path)
    status, _, _ = await piped(["launch", "-u", username, "-i", "standin"], env, tmp_path)
    assert status == 0
    out = (await asyncio.wait_for(watcher.stdout.read(), 60)).decode()
    assert await watcher.wait() == 0
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert " launch.accepted " in lines[0] and f" {username}/ " in lines[0] and "standin" in lines[0]
    assert all(f"{username}x/" not in line for line in lines)
    await piped(["remove", "-u", username], env, tmp_path)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["launch", "-u", "alice", "-i", "img", "--memory", "2G:1G"], "argument --memory"),
        (["launch", "-u", "Alice", "-i", "img"], "argument -u/--user"),
        (["launch", "-u", "alice", "-i", "img", "--vol", "claim-alice"], "argument --vol"),
        (["launch", "-u", "alice", "-i", "img", "--env", "JUPYTERHUB_API_TOKEN=x"], "argument --env"),
        (["launch", "-u", "alice", "-i", "img", "--ttl", "soon"], "argument --ttl"),
        (["launch", "-u", "alice"], "-i/--image"),
        (["read", "-u", "alice", "--server", "Lab_1"], "argument --server"),
    ],
)
async def test_bad_arguments_are_named_and_nothing_is_sent(
    args: list[str], named: str, settings: Settings, tmp_path: Path
) -> None:
    # A broker URL where nothing listens: had the client tried to connect, the status would be 14.
    env = cli_env(settings, amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    status, out, err = await piped(args, env, tmp_path)
    assert status == 2, err
    assert named in err and out == ""


async def test_no_command_queue_and_no_broker_have_their_own_exit_statuses(settings: Settings, tmp_path: Path) -> None:
    status, _, err = await piped(["read", "-u", "alice"], cli_env(settings), tmp_path)
    assert status == EXIT_CODES["not_delivered"] == 13, err
    env = cli_env(settings, amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    status, _, err = await piped(["read", "-u", "alice"], env, tmp_path)
    assert status == EXIT_CODES["broker_unreachable"] == 14, err
    assert "cannot connect to RabbitMQ" in err and "guest" not in err


def test_durations_read_like_people_write_them() -> None:
    assert [duration(d) for d in ("90", "90s", "15m", "2h", "1d", "1h30m", "1.5h")] == [
        90,
        90,
        900,
        7200,
        86400,
        5400,
        5400,
    ]
    for bad in ("", "2x", "h", "0", "1h2", "-5"):
        with pytest.raises(argparse.ArgumentTypeError):
            duration(bad)
