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
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import redis
import yaml
from celery import Celery

from consumer.celery_bridge import Bridge, CallFailed, LauncherTaskError, launch_command
from consumer.client import LauncherClient
from consumer.config import Settings
from schemas import ReadCommand
from tests.conftest import AMQP_URL, Client, running_service, unique
from tests.support.launcher_process import queued
from tests.support.localhub import ROOT, LocalHub

REDIS_URL = os.environ.get("TEST_REDIS_URL", f"redis://127.0.0.1:{os.environ.get('TEST_REDIS_PORT', '6390')}/0")
BRIDGE = str(Path(sys.executable).with_name("jupyterhub-launcher"))
TASK_KEYS = {"image", "server_name", "token", "url", "username", "cpu", "memory", "gpu", "vols"}


# ---------------------------------------------------------------------------------------------
# Unit: the older worker's argument forms as launcher commands (a pure mapping).


def test_the_older_workers_none_values_mean_not_set() -> None:
    command = launch_command(
        "img",
        "alice",
        None,
        [{"pvc": "claim-alice", "mount": "/w", "subpath": None}],
        {"request": None, "limit": 2},
        {"request": None, "limit": None},
        None,
        {"transparent": True},
    )
    assert command.user_options() == {
        "image": "img",
        "cpu": {"limit": 2.0},
        "vols": [{"pvc": "claim-alice", "mount": "/w", "subpath": ""}],
        "json": {},
    }
    assert command.server_name == ""


@pytest.mark.parametrize(
    ("memory", "words"),
    [
        ({"request": "1G", "limit": "4X"}, "memory.limit: '4X' is not a memory quantity"),
        ("4X", "memory: Input should be a valid dictionary"),  # the older API had no bare quantities
    ],
)
def test_an_invalid_argument_names_the_field_and_the_reason(memory: object, words: str) -> None:
    with pytest.raises(CallFailed) as caught:
        launch_command("img", "alice", memory=memory)
    assert caught.value.code == "invalid_command"
    assert words in caught.value.message, caught.value.message


def test_the_bridges_keys_default_to_the_older_workers_set_up_and_read_the_environment(tmp_path: Path) -> None:
    from consumer.config import load_settings

    empty = tmp_path / "config.yaml"
    empty.write_text("")
    defaults = load_settings(empty, environ={})
    assert defaults.celery_broker == defaults.amqp_url.get_secret_value()
    assert defaults.celery_result_backend.get_secret_value() == "rpc://"
    assert (defaults.celery_queue, defaults.celery_task_prefix, defaults.celery_raise_errors) == (
        "celery",
        "launcher-worker",
        False,
    )
    overridden = load_settings(
        empty,
        environ={
            "LAUNCHER_CELERY_BROKER_URL": "redis://:secret@redis:6379/0",
            "LAUNCHER_CELERY_RAISE_ERRORS": "true",
            "LAUNCHER_CELERY_BROKER_TRANSPORT_OPTIONS": '{"visibility_timeout": 900}',
        },
    )
    assert overridden.celery_broker == "redis://:secret@redis:6379/0"
    assert "secret" not in repr(overridden)
    assert overridden.celery_raise_errors is True
    assert overridden.celery_broker_transport_options == {"visibility_timeout": 900}


# ---------------------------------------------------------------------------------------------
# The launcher: a redelivered task's command joins the running one and is answered too.


async def test_a_copy_that_joins_a_running_command_gets_the_reply_at_its_own_reply_queue(
    service: None, settings: Settings, username: str
) -> None:
    command = {"action": "launch", "username": username, "image": "standin:slow-2"}
    async with Client(settings) as first, Client(settings) as second:
        first_id = await first.send(command, message_id="task-1")
        async with asyncio.timeout(30):
            while not any(e["type"] == "launch.accepted" for e in first.events_for(first_id)):
                await asyncio.sleep(0.05)
        second_id = await second.send(command, message_id="task-1")  # the bridge after a restart

        replies = [await first.reply(first_id, timeout=60), await second.reply(second_id, timeout=60)]

    assert [r["ok"] for r in replies] == [True, True], replies
    assert replies[0]["result"]["token"] == replies[1]["result"]["token"]  # one launch, one answer
    assert [e["type"] for e in first.events].count("launch.accepted") == 1


async def test_a_reply_that_does_not_come_is_asked_for_again_under_the_same_message_id(
    settings: Settings, caplog: pytest.LogCaptureFixture, username: str
) -> None:
    settings = settings.model_copy(update={"launch_timeout": 2})
    async with running_service(settings):
        pass  # the launcher's queue exists; the launcher is stopped, so the first send gets no reply
    bridge = Bridge(settings)
    bridge.client = LauncherClient.from_settings(settings, reply_margin=5)  # 7 s per attempt
    bridge.start()
    try:
        call = asyncio.ensure_future(
            asyncio.to_thread(bridge.call, ReadCommand(action="read", username=username), "task-7")
        )
        async with asyncio.timeout(60):
            while await queued(settings) < 2:  # sent again after the first wait
                await asyncio.sleep(0.1)
        async with running_service(settings):
            with pytest.raises(CallFailed) as answered:
                await asyncio.wait_for(call, 60)
    finally:
        await asyncio.to_thread(bridge.stop)

    assert answered.value.code == "not_found"  # the launcher's answer, not a timeout
    assert "task-7: no reply to read" in caplog.text and "sending it again (2 of 3)" in caplog.text


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


def write_config(path: Path, settings: Settings, hub: LocalHub, brokers: Brokers, **keys: Any) -> Path:
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
        **keys,
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
def start_bridge(tmp_path: Path, settings: Settings, hub: LocalHub) -> Iterator[Callable[..., BridgeProcess]]:
    started: list[BridgeProcess] = []

    def start(brokers: Brokers, **keys: Any) -> BridgeProcess:
        name = f"bridge-{len(started)}"
        config = write_config(tmp_path / f"{name}.yaml", settings, hub, brokers, **keys)
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
        "launch",
        image="standin",
        username=username,
        server_name="lab-2",
        vols=vols(username),
        cpu={"request": None, "limit": 2},
        memory=memory,
        gpu=None,
        json=None,
        skip_check=True,
    )

    assert isinstance(by_position, dict) and set(by_position) == TASK_KEYS, by_position
    assert by_position["url"].endswith(f"/user/{username}/lab-1/") and by_position["token"]
    assert (by_position["cpu"], by_position["memory"], by_position["gpu"]) == (
        {"request": 0.5, "limit": 1.0},
        memory,
        gpu,
    )
    assert by_position["vols"] == vols(username)
    assert by_position["token"] not in bridge.log()  # results hold user tokens: never logged
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
    assert re.search(
        rf"launch {username}/ failed \(task [-0-9a-f]+\): invalid_command: memory.limit: '4X' is not a memory quantity",
        log,
    ), log


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


async def test_the_example_client_of_the_older_worker_runs_unchanged(
    service: None, redis_brokers: Brokers, start_bridge: Callable[..., BridgeProcess], username: str
) -> None:
    start_bridge(redis_brokers)
    example = ROOT / "examples" / "celery-client"
    env = {
        **os.environ,
        "CELERY_BROKER_URL": redis_brokers.broker,
        "CELERY_RESULT_BACKEND": redis_brokers.backend,
        "CELERY_QUEUE": redis_brokers.queue,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "launch_notebook.py",
        username,
        "standin",
        cwd=example,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output = (await asyncio.wait_for(process.communicate(), 240))[0].decode()

    assert process.returncode == 0, output
    assert re.search(rf"^launched: http://\S+/user/{username}/$", output, re.MULTILINE), output
    assert "ready: True" in output and "removed: True" in output, output


async def test_sigterm_lets_the_tasks_in_flight_finish_then_the_bridge_exits_0(
    service: None, client: Client, redis_brokers: Brokers, start_bridge: Callable[..., BridgeProcess], username: str
) -> None:
    bridge = start_bridge(redis_brokers)
    caller = OldClient(redis_brokers)
    task = await caller.run(lambda: caller.app.send_task("launcher-worker.launch", args=["standin:slow-3", username]))
    async with asyncio.timeout(60):
        while not any(e["type"] == "launch.accepted" and e["subject"] == f"{username}/" for e in client.events):
            await asyncio.sleep(0.05)

    exit_code = await asyncio.to_thread(bridge.stop)
    result = await caller.run(lambda: task.get(timeout=60))
    caller.close()

    assert exit_code == 0, bridge.log()
    assert isinstance(result, dict) and result["url"].endswith(f"/user/{username}/")
    assert (await client.call({"action": "remove", "username": username}))["ok"]


def percentiles(values: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[94]


@pytest.mark.timeout(1200)
async def test_two_hundred_launch_tasks_in_flight_in_one_bridge_all_succeed(
    settings: Settings, redis_brokers: Brokers, start_bridge: Callable[..., BridgeProcess], username: str
) -> None:
    # Fewer launches at once in the launcher than the hub's concurrent_spawn_limit (100), so that no
    # start is throttled (429, retried after 30-60 s); the rest wait in the launcher's queue.
    # A generous launch_timeout (the bridge waits that long plus a margin for each reply): on a busy
    # machine the last of 200 queued launches can take minutes.
    settings = settings.model_copy(update={"launch_timeout": 300})
    launcher = settings.model_copy(update={"max_concurrency": 50})
    caller = OldClient(redis_brokers)
    async with running_service(launcher):
        pass  # the launcher's queue now exists; the launcher is stopped
    bridge = start_bridge(redis_brokers, launch_timeout=settings.launch_timeout)
    names = [f"{username}-{i}" for i in range(200)]

    def send(names: list[str]) -> list[tuple[float, Any]]:
        return [(time.time(), caller.app.send_task("launcher-worker.launch", args=["standin", n])) for n in names]

    def collect(sent: list[tuple[float, Any]]) -> list[tuple[Any, str, float]]:
        # Each result, and when it was ready: the result backend's date_done, stored by the bridge.
        return [(task.get(timeout=900), task.id, task.date_done.timestamp() - started) for started, task in sent]

    def one_at_a_time(names: list[str]) -> list[tuple[Any, str, float]]:
        return [collect(send([name]))[0] for name in names]

    sent = await caller.run(functools.partial(send, names))
    # In flight at once: the launcher is stopped, so all 200 commands wait in its queue, each for a
    # task that a thread of the one bridge process is running.
    async with asyncio.timeout(180):
        while await queued(settings) < 200:
            await asyncio.sleep(0.2)
    async with running_service(launcher), Client(settings) as direct:
        burst = await caller.run(functools.partial(collect, sent))
        await remove_all(direct, names)
        alone_names = [f"{username}-s{i}" for i in range(20)]  # for comparison, one at a time
        alone = await caller.run(functools.partial(one_at_a_time, alone_names))
        await remove_all(direct, alone_names)
    caller.close()

    results = [result for result, _, _ in burst]
    assert [r["url"].endswith(f"/user/{n}/") for r, n in zip(results, names)] == [True] * 200, results
    assert all(result is not None for result, _, _ in alone)
    # What the bridge adds over the direct AMQP command it sends: from send_task to the stored result,
    # less that command's round trip (the bridge logs it: "launch alice/ answered in 12 ms (task …)").
    round_trips = {
        task_id: float(ms) / 1000
        for ms, task_id in re.findall(r" answered in ([0-9]+) ms \(task ([-0-9a-f]+)\)", bridge.log())
    }
    for label, calls in (("200 tasks in flight", burst), ("one task at a time", alone)):
        added = [total - round_trips[task_id] for _, task_id, total in calls]
        assert all(a > 0 for a in added)  # a result is stored after the command it waited for
        p50, p95 = percentiles(added)
        print(f"\nthe bridge adds to a launch command, {label}: p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms")


async def remove_all(direct: Client, names: list[str]) -> None:
    replies = await asyncio.gather(*(direct.call({"action": "remove", "username": n}, timeout=300) for n in names))
    assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]][:3]


@pytest.mark.timeout(600)
async def test_a_bridge_killed_with_launches_in_flight_restarts_and_every_task_gets_its_result_once(
    hub: LocalHub,
    service: None,
    client: Client,
    brokers: Brokers,
    start_bridge: Callable[..., BridgeProcess],
    username: str,
) -> None:
    if brokers.kind == "redis":
        # Redis gives an unacknowledged task back after the visibility timeout (default: an hour);
        # RabbitMQ as soon as the bridge's connection is gone.
        brokers.transport_options = {
            "visibility_timeout": 10,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        }
    caller = OldClient(brokers)
    try:
        first = start_bridge(brokers)
        names = [f"{username}-{i}" for i in range(10)]
        # Half the spawns end before the tasks come back (the launch is repeated: the running server
        # is returned), half are still starting then (the launch is joined).
        images = ["standin:slow-3", "standin:slow-20"] * 5
        tasks = await caller.run(
            lambda: [caller.app.send_task("launcher-worker.launch", args=[i, n]) for i, n in zip(images, names)]
        )
        async with asyncio.timeout(120):  # every launch has reached the launcher
            while {e["subject"] for e in client.events if e["type"] == "launch.accepted"} < {f"{n}/" for n in names}:
                await asyncio.sleep(0.1)
        first.kill()
        assert not any(t.ready() for t in tasks)

        second = start_bridge(brokers)
        results = await caller.run(lambda: [t.get(timeout=300) for t in tasks])

        assert [isinstance(r, dict) and r["url"].endswith(f"/user/{n}/") for r, n in zip(results, names)] == [True] * 10
        hub_log = hub.log_path.read_text(errors="replace")
        assert {n: hub_log.count(f"User {n} took ") for n in names} == {n: 1 for n in names}  # one start each
        assert second.stop() == 0
        assert "Warm shutdown" in second.log()
        replies = await asyncio.gather(*(client.call({"action": "remove", "username": n}) for n in names))
        assert all(r["ok"] for r in replies)
    finally:
        caller.close()
