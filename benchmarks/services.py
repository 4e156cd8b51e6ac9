"""The systems under test as subprocesses (the consumer, a bare echo consumer) and the RPC client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import aio_pika
import yaml

from tests.support.localhub import ROOT

from .hub import BenchHub

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
# Where ``python -m consumer`` is imported from: another checkout compares a change before/after.
CONSUMER_ROOT = Path(os.environ.get("BENCH_CONSUMER_ROOT", str(ROOT)))
# A py-spy binary to attach to every consumer process (``--profile``); None: no profiling.
PY_SPY: str | None = None
PROFILES: Path | None = None


@dataclass
class Names:
    """A round's own queue and exchange names, so rounds and concurrent test runs never mix."""

    command_queue: str
    reply_exchange: str
    events_exchange: str

    @classmethod
    def unique(cls, prefix: str) -> Names:
        base = f"bench-{prefix}-{uuid.uuid4().hex[:8]}"
        return cls(f"{base}.commands", f"{base}.replies", f"{base}.events")


async def delete_topology(names: Names) -> None:
    """Quorum queues are Raft clusters: left behind, they load the broker for everyone."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for queue in (names.command_queue, f"{names.command_queue}.dead", f"{names.command_queue}.answered"):
            await channel.queue_delete(queue)
        for exchange in (names.reply_exchange, names.events_exchange, f"{names.command_queue}.dlx"):
            await channel.exchange_delete(exchange)


@dataclass
class ServiceProcess:
    """A subprocess whose CPU seconds and peak RSS the benchmark reads from /proc."""

    argv: list[str]
    env: dict[str, str]
    ready_marker: str  # a line fragment its log prints once it consumes
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bench-svc-")))
    cwd: Path = ROOT
    profile_name: str | None = None  # with --profile: py-spy samples it into PROFILES/<name>.txt
    process: subprocess.Popen[bytes] | None = None
    profiler: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "service.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, timeout: float = 60) -> None:
        log = self.log_path.open("ab")
        # Popen only forks: it returns at once, and the wait for readiness below is asynchronous.
        self.process = subprocess.Popen(  # noqa: ASYNC220
            self.argv, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.argv} exited:\n{self.log_tail()}")
            if self.ready_marker in self.log_path.read_text(errors="replace"):
                self._attach_profiler()
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.argv} did not start in {timeout} s:\n{self.log_tail()}")

    def _attach_profiler(self) -> None:
        if PY_SPY is None or PROFILES is None or self.profile_name is None:
            return
        PROFILES.mkdir(parents=True, exist_ok=True)
        # Collapsed stacks (one line per stack with its sample count): readable and diffable.
        # --nonblocking: sampling does not pause the process, so timings stay honest.
        self.profiler = subprocess.Popen(
            [
                PY_SPY,
                "record",
                "--pid",
                str(self.pid),
                "--format",
                "raw",
                "--rate",
                "200",
                "--nonblocking",
                "--output",
                str(PROFILES / f"{self.profile_name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stop(self, timeout: float = 60) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        give_up = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < give_up:
            await asyncio.sleep(0.1)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.profiler is not None:  # py-spy writes its file when the process it samples exits
            try:
                self.profiler.wait(30)
            except subprocess.TimeoutExpired:
                self.profiler.kill()
        return self.process.returncode


def consumer_process(
    hub: BenchHub,
    names: Names,
    max_concurrency: int,
    launch_timeout: float,
    profile_name: str | None = None,
    root: Path | None = None,
) -> ServiceProcess:
    """``python -m consumer run --config FILE``, exactly as deployed, against the benchmark hub;
    ``root``: the checkout to run (default ``CONSUMER_ROOT``)."""
    root = root or CONSUMER_ROOT
    workdir = Path(tempfile.mkdtemp(prefix="bench-consumer-"))
    config = {
        "log_level": "INFO",
        "jupyterhub_url": hub.url,
        "amqp_url": AMQP_URL,
        "command_queue": names.command_queue,
        "reply_exchange": names.reply_exchange,
        "events_exchange": names.events_exchange,
        "max_concurrency": max_concurrency,
        "launch_timeout": launch_timeout,
        "shutdown_grace": 10,
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAUNCHER_", "JUPYTERHUB_"))}
    env["LAUNCHER_JUPYTERHUB_API_TOKEN"] = hub.token("launcher")
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    return ServiceProcess(
        [sys.executable, "-m", "consumer", "run", "--config", str(workdir / "config.yaml")],
        env,
        ready_marker="consuming",
        workdir=workdir,
        cwd=root,
        profile_name=profile_name,
    )


def echo_process(names: Names, prefetch: int) -> ServiceProcess:
    env = {**os.environ, "BENCH_AMQP_URL": AMQP_URL}
    return ServiceProcess(
        [sys.executable, "-m", "benchmarks.echo", names.command_queue, str(prefetch)],
        env,
        ready_marker="consuming",
    )


class RpcClient:
    """A publisher as a platform service writes one: timestamps each command and its reply."""

    def __init__(self, names: Names, watch_events: tuple[str, ...] = ()) -> None:
        self.names = names
        self.watch_events = watch_events
        self.sent_at: dict[str, float] = {}
        self.replies: dict[str, asyncio.Future[tuple[float, dict[str, Any]]]] = {}
        self.on_event: Callable[[str, dict[str, Any]], None] | None = None
        self.on_reply: Callable[[str], None] | None = None

    async def __aenter__(self) -> Self:
        self.connection = await aio_pika.connect_robust(AMQP_URL)
        self.channel = await self.connection.channel()
        self.reply_queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await self.reply_queue.consume(self._on_reply, no_ack=True)
        if self.watch_events:
            events = await self.channel.declare_exchange(
                self.names.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
            for key in self.watch_events:
                await queue.bind(events, key)
            await queue.consume(self._on_event, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.connection.close()

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        received = time.time()
        future = self.replies.get(message.correlation_id or "")
        if future is not None and not future.done():
            future.set_result((received, json.loads(message.body)))
            if self.on_reply is not None:
                self.on_reply(message.correlation_id or "")

    async def _on_event(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if self.on_event is not None:
            self.on_event(message.routing_key or "", json.loads(message.body))

    async def send(self, body: dict[str, Any]) -> str:
        correlation_id = uuid.uuid4().hex
        self.replies[correlation_id] = asyncio.get_running_loop().create_future()
        message = aio_pika.Message(
            json.dumps(body).encode(),
            content_type="application/json",
            correlation_id=correlation_id,
            reply_to=self.reply_queue.name,
            message_id=uuid.uuid4().hex,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        self.sent_at[correlation_id] = time.time()
        await self.channel.default_exchange.publish(message, routing_key=self.names.command_queue)
        return correlation_id

    async def reply(self, correlation_id: str, timeout: float) -> tuple[float, dict[str, Any]] | None:
        """``(received_at, reply)``, or None if it did not come in time."""
        try:
            return await asyncio.wait_for(asyncio.shield(self.replies[correlation_id]), timeout)
        except TimeoutError:
            return None
