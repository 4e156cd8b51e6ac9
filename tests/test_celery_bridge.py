"""The Celery bridge: the older worker's clients, unchanged, are answered by the launcher.

Real parts throughout: a Celery client as the older worker's callers have it (``send_task(...).get()``),
the bridge as a subprocess (``jupyterhub-launcher celery-bridge``), Redis (``scripts/ensure-redis``)
or RabbitMQ as Celery's broker, the launcher service and a real JupyterHub.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import redis
import yaml
from celery import Celery

from consumer.celery_bridge import LauncherTaskError, launch_command
from consumer.config import Settings
from tests.conftest import AMQP_URL, Client, running_service, unique
from tests.support.localhub import ROOT, LocalHub

REDIS_URL = os.environ.get("TEST_REDIS_URL", f"redis://127.0.0.1:{os.environ.get('TEST_REDIS_PORT', '6390')}/0")
BRIDGE = str(Path(sys.executable).with_name("jupyterhub-launcher"))
TASK_KEYS = {"image", "server_name", "token", "url", "username", "cpu", "memory", "gpu", "vols"}


# ---------------------------------------------------------------------------------------------
# Unit: the older worker's argument forms as launcher commands (a pure mapping).


def test_the_older_workers_none_values_mean_not_set() -> None:
    command = launch_command(
        "img", "alice", None, [{"pvc": "claim-alice", "mount": "/w", "subpath": None}],
        {"request": None, "limit": 2}, {"request": None, "limit": None}, None, {"transparent": True},
    )
    assert command.user_options() == {
        "image": "img",
        "cpu": {"limit": 2.0},
        "vols": [{"pvc": "claim-alice", "mount": "/w", "subpath": ""}],
        "json": {},
    }
    assert command.server_name == ""


def test_an_invalid_argument_names_the_field_and_the_reason() -> None:
    from consumer.celery_bridge import CallFailed

    with pytest.raises(CallFailed) as caught:
        launch_command("img", "alice", memory={"request": "1G", "limit": "4X"})
    assert caught.value.code == "invalid_command"
    assert "memory.limit" in caught.value.message and "'4X' is not a memory quantity" in caught.value.message


# ---------------------------------------------------------------------------------------------
# Integration: brokers, the bridge process, the older worker's kind of client.


class Brokers:
    """Celery's broker and result backend for a test, and what they leave behind to delete."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.queue = unique("test-celery-")
        if kind == "redis":
            self.broker = self.backend = REDIS_URL
            self.transport_options: dict[str, Any] = {}
        else:
            self.broker, self.backend = AMQP_URL, "rpc://"
            self.transport_options = {}

    def cleanup(self) -> None:
        if self.kind == "redis":
            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(f"*{self.queue}*"))
            if keys:
                client.delete(*keys)
            client.close()
        else:
            asyncio.run(_delete_amqp(self.queue))


async def _delete_amqp(queue: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)
        await channel.exchange_delete(queue)


class OldClient:
    """A service written for the older worker: ``send_task(...).get()``, blocking, from its own threads.

    Celery's ``rpc://`` backend ties results to the thread that sent the task, so a call sends and
    waits in one thread of this client's pool.
    """

    def __init__(self, brokers: Brokers, threads: int = 1) -> None:
        self.app = Celery(set_as_current=False)
        self.app.conf.update(
            broker_url=brokers.broker, result_backend=brokers.backend, task_default_queue=brokers.queue
        )
        self.pool = concurrent.futures.ThreadPoolExecutor(threads)

    def call_blocking(self, task: str, args: list[Any], kwargs: dict[str, Any], timeout: float = 150) -> Any:
        return self.app.send_task(f"launcher-worker.{task}", args=args, kwargs=kwargs).get(timeout=timeout)

    async def call(self, task: str, *args: Any, **kwargs: Any) -> Any:
        return await self.run(functools.partial(self.call_blocking, task, list(args), kwargs))

    async def run(self, function: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, function)

    def close(self) -> None:
        self.pool.shutdown()
        self.app.close()


class BridgeProcess:
    """``jupyterhub-launcher celery-bridge --config FILE`` as operators run it."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90) -> BridgeProcess:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [BRIDGE, "celery-bridge", "--config", str(self.config)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if not k.startswith("LAUNCHER_")},
            )
        deadline = time.monotonic() + timeout
        while " ready." not in self.log()[offset:]:
            if self.process.poll() is not None:
                raise AssertionError(f"the bridge exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the bridge did not get ready in {timeout} s:\n{self.log()}")
            time.sleep(0.2)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the bridge did not stop on SIGTERM:\n{self.log()}") from None


def write_config(path: Path, settings: Settings, hub: LocalHub, brokers: Brokers, **celery: Any) -> Path:
    values = {
        "log_level": "INFO",
        "jupyterhub_url": hub.url,
        "jupyterhub_api_token": hub.token,
        "amqp_url": AMQP_URL,
        "command_queue": settings.command_queue,
        "reply_exchange": settings.reply_exchange,
        "events_exchange": settings.events_exchange,
        "launch_timeout": settings.launch_timeout,
        "celery_broker_url": brokers.broker,
        "celery_result_backend": brokers.backend,
        "celery_queue": brokers.queue,
        "celery_broker_transport_options": brokers.transport_options,
        **celery,
    }
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(params=["redis", "rabbitmq"])
def brokers(request: pytest.FixtureRequest) -> Iterator[Brokers]:
    made = Brokers(request.param)
    yield made
    made.cleanup()


@pytest.fixture
def redis_brokers() -> Iterator[Brokers]:
    made = Brokers("redis")
    yield made
    made.cleanup()


@pytest.fixture
def start_bridge(
    tmp_path: Path, settings: Settings, hub: LocalHub
) -> Iterator[Callable[..., BridgeProcess]]:
    started: list[BridgeProcess] = []

    def start(brokers: Brokers, **celery: Any) -> BridgeProcess:
        name = f"bridge-{len(started)}"
        config = write_config(tmp_path / f"{name}.yaml", settings, hub, brokers, **celery)
        bridge = BridgeProcess(config, tmp_path / f"{name}.log").start()
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        bridge.stop()
        assert hub.token not in bridge.log()  # the config's secrets stay out of the bridge's log


@pytest.fixture
async def old_client(brokers: Brokers) -> AsyncIterator[OldClient]:
    made = OldClient(brokers)
    yield made
    made.close()


def vols(username: str) -> list[dict[str, str]]:
    return [{"pvc": f"claim-{username}", "mount": "/home/jovyan/work", "subpath": "projects"}]


async def test_launch_read_and_remove_with_positional_and_keyword_arguments(
    service: None, brokers: Brokers, start_bridge: Callable[..., BridgeProcess], old_client: OldClient, username: str
) -> None:
    bridge = start_bridge(brokers)
    cpu, memory, gpu = {"request": 0.5, "limit": 1}, {"request": "512M", "limit": "1G"}, {"request": 1, "limit": 1}

    # launch(image, username, server_name, vols, cpu, memory, gpu, json, skip_check), all positional.
    by_position = await old_client.call(
        "launch", "standin", username, "lab-1", vols(username), cpu, memory, gpu, {"transparent": True}, False
    )
    by_keyword = await old_client.call(
        "launch", image="standin", username=username, server_name="lab-2", vols=vols(username),
        cpu={"request": None, "limit": 2}, memory=memory, gpu=None, json=None, skip_check=True,
    )

    assert isinstance(by_position, dict) and set(by_position) == TASK_KEYS, by_position
    assert by_position["url"].endswith(f"/user/{username}/lab-1/") and by_position["token"]
    assert (by_position["cpu"], by_position["memory"], by_position["gpu"]) == (
        {"request": 0.5, "limit": 1.0}, memory, gpu
    )
    assert by_position["vols"] == vols(username)
    assert isinstance(by_keyword, dict) and set(by_keyword) == TASK_KEYS, by_keyword
    assert by_keyword["url"].endswith(f"/user/{username}/lab-2/") and by_keyword["server_name"] == "lab-2"
    assert by_keyword["cpu"] == {"request": None, "limit": 2.0} and by_keyword["gpu"] is None

    # skip_check=False: the older worker refused a server that exists.
    assert await old_client.call("launch", "standin", username, "lab-1", None, None, None, None, None, False) is None
    assert "already_running" in bridge.log()

    read_by_position = await old_client.call("read", username, "lab-1")
    read_by_keyword = await old_client.call("read", username=username, server_name="lab-2")
    assert read_by_position["ready"] is True and read_by_position["name"] == "lab-1"
    assert read_by_position["user_options"]["memory"] == memory
    assert read_by_keyword["ready"] is True and read_by_keyword["name"] == "lab-2"

    assert await old_client.call("remove", username, "lab-1") is True
    assert await old_client.call("remove", username=username, server_name="lab-2") is True
    assert await old_client.call("read", username, "lab-1") is None
    assert await old_client.call("read", username=username, server_name="lab-2") is None


async def test_a_failing_spawn_and_an_invalid_argument_return_none_with_the_reason_in_the_bridge_log(
    service: None, brokers: Brokers, start_bridge: Callable[..., BridgeProcess], old_client: OldClient, username: str
) -> None:
    bridge = start_bridge(brokers)

    assert await old_client.call("launch", "standin:crash", username) is None
    assert await old_client.call("launch", "standin", username, memory={"request": "1G", "limit": "4X"}) is None

    log = bridge.log()
    assert re.search(rf"launch {username}/ failed \(task [-0-9a-f]+\): spawn_failed: .*broken on purpose", log), log
    assert re.search(rf"launch {username}/ failed \(task [-0-9a-f]+\): invalid_command: memory.limit: '4X' is not a memory quantity", log), log


async def test_with_raise_errors_a_failure_raises_with_the_launchers_code_and_message(
    service: None, brokers: Brokers, start_bridge: Callable[..., BridgeProcess], old_client: OldClient, username: str
) -> None:
    start_bridge(brokers, celery_raise_errors=True)

    with pytest.raises(LauncherTaskError) as invalid:
        await old_client.call("launch", "standin", username, memory={"request": "1G", "limit": "4X"})
    assert invalid.value.code == "invalid_command"
    assert "memory.limit" in invalid.value.message

    with pytest.raises(LauncherTaskError) as crashed:
        await old_client.call("launch", image="standin:crash", username=username)
    assert crashed.value.code == "spawn_failed" and "broken on purpose" in crashed.value.message

    with pytest.raises(LauncherTaskError) as missing:
        await old_client.call("read", username, "nothing")
    assert missing.value.code == "not_found"
