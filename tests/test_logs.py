"""Logs: text or JSON lines, each command's fields on its lines, and no secret at any level."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from consumer import logs
from consumer.config import Settings, load_settings
from tests.conftest import AMQP_URL, Client
from tests.support.launcher_process import launcher_process, settings_env
from tests.support.localhub import LocalHub

HUB_TOKEN = "hub-token-0123456789abcdef"
AMQP_PASSWORD = "p@ss/w0rd:x"  # needs escaping in a URL: amqp://launcher:p%40ss%2Fw0rd%3Ax@...
USER_TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Whatever a test configures on the root logger is undone after it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    chatty = {name: logging.getLogger(name).level for name in logs.CHATTY_LOGGERS}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, was in chatty.items():
        logging.getLogger(name).setLevel(was)


def configured(tmp_path: Path, log_format: str, level: str = "DEBUG") -> Settings:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"log_format: {log_format}\nlog_level: {level}\njupyterhub_api_token: {HUB_TOKEN}\n"
        "amqp_url: amqp://launcher:p%40ss%2Fw0rd%3Ax@rabbit:5672/\n"
    )
    return load_settings(config, environ={})


def emit_secrets() -> None:
    """Log lines that hold each kind of secret, from our loggers and from the libraries'."""
    logging.getLogger("aiormq.connection").warning("Connecting to: %s", "amqp://launcher:p%40ss%2Fw0rd%3Ax@rabbit/")
    logging.getLogger("aio_pika.robust_connection").error("attempt to amqp://u:other-s3cret@h/ failed")
    logging.getLogger("consumer.hub").debug("headers %s", {"Authorization": f"token {HUB_TOKEN}"})
    logging.getLogger("consumer.hub").debug("the password is %s, decoded", AMQP_PASSWORD)
    logging.getLogger("consumer.worker").info("reply %s", json.dumps({"ok": True, "result": {"token": USER_TOKEN}}))
    logging.getLogger("aiohttp.client").debug("Authorization: Bearer %s", USER_TOKEN)
    try:
        raise RuntimeError(f"refused with token {HUB_TOKEN} at https://admin:hunter22@hub/")
    except RuntimeError:
        logging.getLogger("consumer.worker").exception("internal error")
    logging.getLogger("consumer.worker").info("stack here", stack_info=True)


SECRETS = (HUB_TOKEN, AMQP_PASSWORD, "p%40ss%2Fw0rd%3Ax", "other-s3cret", USER_TOKEN, "hunter22")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_reaches_the_log_in_either_format_at_debug(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], root_logging: None, log_format: str
) -> None:
    logs.configure(configured(tmp_path, log_format))
    emit_secrets()
    out = capsys.readouterr().err
    assert out.count("\n") >= 8
    for secret in SECRETS:
        assert secret not in out, (secret, out)
    # What is not secret stays readable.
    assert "amqp://launcher:***@rabbit/" in out and "amqp://u:***@h/" in out
    assert "RuntimeError: refused with token ***" in out and "https://admin:***@hub/" in out
    if log_format == "json":
        lines = [json.loads(line) for line in out.splitlines()]  # every line is one JSON object
        assert {"time", "level", "logger", "message"} <= set(lines[0])
        assert lines[0]["logger"] == "aiormq.connection" and lines[0]["level"] == "WARNING"
        failed = next(line for line in lines if line["message"] == "internal error")
        assert failed["level"] == "ERROR" and "Traceback" in failed["exception"]
        assert "stack" in next(line for line in lines if line["message"] == "stack here")


def test_the_amqp_libraries_stay_at_info_even_at_debug(tmp_path: Path, root_logging: None) -> None:
    logs.configure(configured(tmp_path, "json"))
    assert all(logging.getLogger(name).getEffectiveLevel() == logging.INFO for name in logs.CHATTY_LOGGERS)
    assert logging.getLogger("consumer").getEffectiveLevel() == logging.DEBUG


async def test_json_lines_carry_the_fields_of_their_own_command_only() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    log = logging.getLogger("test.logs.fields")
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    async def progress(n: int) -> None:
        log.info("progress %d", n)

    async def command(n: int) -> None:
        logs.bind_command(correlation_id=f"c{n}", message_id=f"m{n}")
        log.info("received %d", n)
        logs.bind_command(action="launch", username=f"user{n}", server_name="", no_such_field="x")
        await asyncio.sleep(0.01)  # the two commands interleave
        await asyncio.create_task(progress(n))  # a task the command starts works for it too
        log.info("done %d", n)

    try:
        await asyncio.gather(command(1), command(2))
        log.info("between commands")
        log.info("lone surrogate \ud800 from a caller")
    finally:
        log.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    by_message = {line["message"]: line for line in lines}
    assert by_message["received 1"] | {"time": ""} == {
        "time": "",
        "level": "INFO",
        "logger": "test.logs.fields",
        "message": "received 1",
        "correlation_id": "c1",
        "message_id": "m1",
    }
    done = by_message["done 2"]
    assert (done["correlation_id"], done["message_id"], done["action"], done["username"], done["server_name"]) == (
        "c2",
        "m2",
        "launch",
        "user2",
        "",
    )
    assert "no_such_field" not in done
    assert by_message["progress 1"]["username"] == "user1" and by_message["progress 2"]["correlation_id"] == "c2"
    assert not set(logs.COMMAND_FIELDS) & set(by_message["between commands"])
    assert by_message["lone surrogate \ud800 from a caller"]["level"] == "INFO"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
        ("amqps://u:p%40ss@rabbit.example.org/vhost", "amqps://u:***@rabbit.example.org/vhost"),
        ("amqp://rabbit/", "amqp://rabbit/"),
    ],
)
def test_mask_url_hides_only_the_password(url: str, shown: str) -> None:
    assert logs.mask_url(url) == shown


async def test_json_logs_of_real_commands_at_debug_parse_line_by_line_with_no_secret(
    hub: LocalHub, settings: Settings, client: Client, username: str, tmp_path: Path
) -> None:
    """The launcher as run in production: a process, JSON logs at DEBUG, a launch, a read, a remove
    and an invalid command against the real hub and broker."""
    log_path = tmp_path / "launcher.log"
    env = settings_env(settings, log_level="DEBUG", log_format="json", health_port=0)
    with log_path.open("wb") as log_file:  # a file, not a pipe: a full pipe would block the launcher
        async with launcher_process(env, tmp_path, stderr=log_file) as process:
            async with asyncio.timeout(60):
                while "consuming " + settings.command_queue not in log_path.read_text():
                    await asyncio.sleep(0.2)
            launch_id = await client.send({"action": "launch", "username": username, "image": "standin"})
            launched = await client.reply(launch_id)
            read = await client.call({"action": "read", "username": username})
            removed = await client.call({"action": "remove", "username": username})
            invalid_id = await client.send(
                b'{"action": "launch", "username": "x", "token": "' + USER_TOKEN.encode() + b'"'
            )
            invalid = await client.reply(invalid_id)
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 60) == 0
    assert launched["ok"] and read["ok"] and removed["ok"], (launched, read, removed)
    assert invalid["error"]["code"] == "invalid_command"

    text = log_path.read_text()
    lines: list[dict[str, Any]] = [json.loads(line) for line in text.splitlines()]  # each line one object
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    for secret in (hub.token, hub.signing_key, launched["result"]["token"], "guest:guest", USER_TOKEN):
        assert secret not in text

    def of(correlation_id: str) -> list[dict[str, Any]]:
        return [line for line in lines if line.get("correlation_id") == correlation_id]

    started = [line for line in of(launch_id) if line["message"].startswith(f"launch {username}/: started")]
    assert len(started) == 1
    assert {k: started[0][k] for k in ("action", "username", "server_name")} == {
        "action": "launch",
        "username": username,
        "server_name": "",
    }
    assert started[0]["message_id"]
    assert any(line["message"].endswith(": done") for line in of(launch_id))
    # The invalid command is known by its ids only.
    invalid_lines = of(invalid_id)
    assert invalid_lines and all("username" not in line for line in invalid_lines)
    assert any("hubcheck" in line["logger"] and "token accepted" in line["message"] for line in lines)
    await _no_leftover_queue(settings)


async def _no_leftover_queue(settings: Settings) -> None:
    """The launcher settled every command: nothing waits in its queue."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(settings.command_queue, passive=True)
        assert queue.declaration_result.message_count == 0
