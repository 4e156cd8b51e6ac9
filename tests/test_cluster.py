"""The launcher against a three-node RabbitMQ cluster behind HAProxy: quorum queues on all three
nodes, and launches in flight while the queue leader's node, then the launcher's node, go away."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import aio_pika
import pytest

from consumer.config import Settings
from tests.conftest import delete_topology, make_settings, unique
from tests.support.cluster import Cluster
from tests.support.localhub import LocalHub
from tests.support.replica import Replica
from tests.test_replicas import RecordingClient, launcher_tokens

QUORUM = {"x-queue-type": "quorum"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    running = Cluster()
    try:
        yield running.start()
    finally:
        running.stop()


class ClusterClient(RecordingClient):
    """A caller that survives the loss of its node: quorum queues for replies, results and events,
    acked after they are recorded (an unacked delivery comes again; a no-ack one would be lost)."""

    def __init__(self, settings: Settings, url: str) -> None:
        super().__init__(settings)
        self.url = url
        self.result_bodies: dict[str, list[dict[str, Any]]] = {}

    async def __aenter__(self) -> Self:
        self.connection = await aio_pika.connect_robust(self.url, client_properties={"connection_name": "test caller"})
        self.channel = await self.connection.channel(on_return_raises=True)
        declare = self.channel.declare_queue
        self.reply_queue = await declare(unique("test-replies-"), durable=True, arguments=QUORUM)
        self.results_queue = await declare(unique("test-results-"), durable=True, arguments=QUORUM)
        self.events_queue = await declare(unique("test-events-"), durable=True, arguments=QUORUM)
        replies = await self.channel.declare_exchange(
            self.settings.reply_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        events = await self.channel.declare_exchange(
            self.settings.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        await self.results_queue.bind(replies, "#")
        await self.events_queue.bind(events, "#")
        await self.reply_queue.consume(self._acked(self._on_reply))
        await self.results_queue.consume(self._acked(self._on_result))
        await self.events_queue.consume(self._acked(self._on_event))
        return self

    def _acked(self, handle: Any) -> Any:
        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await handle(message)
            await message.ack()

        return on_message

    async def __aexit__(self, *exc: object) -> None:
        for queue in (self.reply_queue, self.results_queue, self.events_queue):
            await queue.delete(if_unused=False, if_empty=False)
        await self.connection.close()


async def queue_depth(url: str, name: str) -> int:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count or 0


class Probe:
    """A read every 0.25 s, as a steady caller: progress is its replies arriving."""

    def __init__(self, client: ClusterClient) -> None:
        self.client = client
        self.sent: list[str] = []  # confirmed by the broker: each must be answered
        self.tasks: set[asyncio.Task[None]] = set()
        self.running = True

    async def run(self) -> None:
        username = unique("probe")
        while self.running:
            task = asyncio.create_task(self._one(username))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            await asyncio.sleep(0.25)

    async def _one(self, username: str) -> None:
        try:
            correlation_id = await asyncio.wait_for(self.client.send({"action": "read", "username": username}), 30)
        except Exception:  # noqa: BLE001
            return  # not confirmed (the caller's node went away): the broker may not have it
        self.sent.append(correlation_id)

    def answer_times(self) -> list[float]:
        return sorted(self.client.first_reply_at[i] for i in self.sent if i in self.client.first_reply_at)

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time in [start, end] with no probe answered."""
        times = [start] + [t for t in self.answer_times() if start < t < end] + [end]
        return max(b - a for a, b in itertools.pairwise(times))

    async def answered_after(self, moment: float, timeout: float = 120) -> float:
        async with asyncio.timeout(timeout):
            while not any(t > moment for t in self.answer_times()):
                await asyncio.sleep(0.05)
        return min(t for t in self.answer_times() if t > moment)


@pytest.mark.timeout(900)  # the cluster's start (its fixture) counts too
async def test_launches_in_flight_survive_losing_the_queue_leaders_node_then_the_launchers_node(
    hub: LocalHub, cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 50
    settings = make_settings(hub, amqp_url=cluster.url)
    users = [unique("c") for _ in range(n)]
    replica = await (await Replica(settings, tmp_path / "launcher.log").start()).consuming()
    hub_log_offset = hub.log_path.stat().st_size
    figures: list[str] = []
    try:
        # Replicated on all three nodes, as declared through the one address.
        all_nodes = sorted(cluster.node(i) for i in (1, 2, 3))
        assert cluster.members(settings.command_queue) == all_nodes
        assert cluster.members(settings.dead_letter_queue) == all_nodes

        async with ClusterClient(settings, cluster.url) as client:
            probe = Probe(client)
            probing = asyncio.create_task(probe.run())
            # Spawns of 4 to 15 s: launches finish before, during and after the faults.
            ids = [
                await client.send({"action": "launch", "username": u, "image": f"standin:slow-{4 + i % 12}"})
                for i, u in enumerate(users)
            ]
            async with asyncio.timeout(120):
                while sum(1 for i in ids if client.events_for(i)) < n:
                    await asyncio.sleep(0.05)

            connection_name = f"jupyterhub-launcher {settings.command_queue}"
            for fault in ("queue leader's node", "launcher's node"):
                if fault == "queue leader's node":
                    node = await asyncio.to_thread(cluster.leader, settings.command_queue)
                else:
                    node = await asyncio.to_thread(cluster.node_of_connection, connection_name)
                in_flight = sum(1 for i in ids if i not in client.first_reply_at)
                stopped = time.monotonic()
                await asyncio.to_thread(cluster.stop_node, node)
                down = time.monotonic() - stopped
                resumed = await probe.answered_after(time.monotonic())
                gap = probe.longest_gap(stopped - 1, resumed)
                await asyncio.to_thread(cluster.start_node, node)
                figures.append(
                    f"{fault} (node {node}) stopped with {in_flight} launches in flight: no reply for"
                    f" {gap:.2f} s (the node took {down:.1f} s to stop), node started again after"
                    f" {time.monotonic() - stopped:.1f} s"
                )

            replies = await asyncio.gather(*(client.reply(i, timeout=300) for i in ids))
            probe.running = False
            await probing
            if probe.tasks:
                await asyncio.wait(set(probe.tasks))
            async with asyncio.timeout(120):
                while any(i not in client.first_reply_at for i in probe.sent):
                    await asyncio.sleep(0.1)
            await asyncio.sleep(2)  # repeated replies and late results have arrived by now

            failed = [r for r in replies if not r["ok"]]
            assert failed == [], failed
            repeats = {i: r for i, r in client.all_replies.items() if len(r) > 1}
            assert all(all(x == r[0] for x in r) for r in repeats.values()), repeats
            results: dict[str, list[tuple[str, dict[str, Any]]]] = {}
            for key, body in client.results:
                results.setdefault(body["_correlation_id"], []).append((key, body))
            assert all(len({json.dumps(r, sort_keys=True) for r in results.get(i, [])}) == 1 for i in ids), results
            hub_log = hub.log_path.read_text(errors="replace")[hub_log_offset:]
            starts = {u: hub_log.count(f"User {u} took") for u in users}
            assert set(starts.values()) == {1}, {u: c for u, c in starts.items() if c != 1}
            tokens = await asyncio.gather(*(launcher_tokens(hub, u) for u in users))
            assert [len(t) for t in tokens] == [1] * n, [t for t in tokens if len(t) != 1]
            assert await queue_depth(cluster.url, settings.command_queue) == 0
            assert await queue_depth(cluster.url, settings.dead_letter_queue) == 0
            assert replica.process is not None and replica.process.returncode is None  # reconnected by itself
            assert "CONNECTION_FORCED" in replica.log()  # the faults did cut the launcher's connection

            with capsys.disabled():  # the figures show in `make test` too
                print(
                    f"\ncluster faults, {n} launches through HAProxy, probe reads every 0.25 s:\n  "
                    + "\n  ".join(figures)
                    + f"\n  all {n} launches answered ok, {len(probe.sent)} probe reads answered;"
                    f" repeated replies {len(repeats)} (identical); servers started once each;"
                    f" one launcher token per launch; command and dead-letter queues empty"
                )
            removes = await asyncio.gather(*(client.call({"action": "remove", "username": u}) for u in users))
            assert all(r["ok"] for r in removes)
    finally:
        await replica.stop()
        await delete_topology(settings, cluster.url)
