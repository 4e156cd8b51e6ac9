"""/healthz, /readyz and /metrics of a running service, against the real broker and hub.

The broker and the hub are reached through TCP forwarders that the tests cut and mend: the service
sees them go away and come back as it would on a network.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from prometheus_client import generate_latest

from consumer import metrics
from consumer.admission import MAX_REQUESTS, MIN_REQUESTS, Admission
from consumer.metrics import hub_route
from tests.conftest import AMQP_URL, Client, delete_topology, make_settings, running_service, unique
from tests.support.localhub import LocalHub, free_port
from tests.support.tcpcut import TcpCut


@pytest.fixture
async def cuts(hub: LocalHub) -> AsyncIterator[tuple[TcpCut, TcpCut]]:
    broker = urlsplit(AMQP_URL)
    hub_address = urlsplit(hub.url)
    async with (
        TcpCut(broker.hostname or "127.0.0.1", broker.port or 5672) as to_broker,
        TcpCut(hub_address.hostname or "127.0.0.1", hub_address.port or 80) as to_hub,
    ):
        yield to_broker, to_hub


async def get(port: int, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=5)) as response,
    ):
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


async def wait_for_status(port: int, path: str, status: int, timeout: float = 40) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            got, body = await get(port, path)
            if got == status:
                return body
            await asyncio.sleep(0.05)


def gauge(text: str, name: str) -> float:
    """An unlabelled gauge's value from Prometheus text; fails when it is not there."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, f"{name} is not on /metrics"
    return values[0]


def sample(text: str, name: str, **labels: str) -> float:
    """A sample's value from Prometheus text, 0 when absent."""
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_readyz_follows_the_broker_and_the_hub_going_away_and_coming_back(
    hub: LocalHub, cuts: tuple[TcpCut, TcpCut]
) -> None:
    to_broker, to_hub = cuts
    port = free_port()
    settings = make_settings(
        hub,
        health_port=port,
        health_host="127.0.0.1",
        amqp_url=f"amqp://guest:guest@127.0.0.1:{to_broker.port}/",
        jupyterhub_url=f"http://127.0.0.1:{to_hub.port}",
        hub_check_interval=0.5,
    )
    try:
        async with running_service(settings):
            assert await get(port, "/healthz") == (200, {"status": "ok"})
            await wait_for_status(port, "/readyz", 200)

            to_hub.cut()
            body = await wait_for_status(port, "/readyz", 503)
            assert any("JupyterHub" in reason for reason in body["reasons"]), body
            assert (await get(port, "/healthz"))[0] == 200  # alive all the same: nothing to restart
            to_hub.mend()
            await wait_for_status(port, "/readyz", 200)

            to_broker.cut()
            body = await wait_for_status(port, "/readyz", 503)
            assert any("RabbitMQ" in reason for reason in body["reasons"]), body
            to_broker.mend()
            await wait_for_status(port, "/readyz", 200)
            _, metrics = await get(port, "/metrics")
            assert sample(metrics, "launcher_broker_reconnects_total") >= 1
    finally:
        await delete_topology(settings)


async def test_metrics_count_real_commands_by_action_and_outcome_without_user_names(
    hub: LocalHub, username: str
) -> None:
    port = free_port()
    settings = make_settings(hub, health_port=port, health_host="127.0.0.1")
    try:
        async with running_service(settings), Client(settings) as client:
            _, before = await get(port, "/metrics")
            launched = await client.call({"action": "launch", "username": username, "image": "standin"})
            assert launched["ok"], launched
            missing = await client.call({"action": "read", "username": username, "server_name": "nope"})
            assert missing["error"]["code"] == "not_found"
            invalid = await client.call(
                {"action": "launch", "username": username, "image": "standin", "memory": {"limit": "4X"}}
            )
            assert invalid["error"]["code"] == "invalid_command"
            removed = await client.call({"action": "remove", "username": username})
            assert removed["ok"], removed

            _, after = await get(port, "/metrics")

        def moved(name: str, **labels: str) -> float:
            return sample(after, name, **labels) - sample(before, name, **labels)

        assert moved("launcher_commands_total", action="launch", outcome="ok") == 1
        assert moved("launcher_commands_total", action="read", outcome="not_found") == 1
        assert moved("launcher_commands_total", action="launch", outcome="invalid_command") == 1
        assert moved("launcher_commands_total", action="remove", outcome="ok") == 1
        assert moved("launcher_command_duration_seconds_count", action="launch") == 2
        assert (
            moved("launcher_hub_requests_total", method="POST", route="/users/{name}/server", status="201")
            + moved("launcher_hub_requests_total", method="POST", route="/users/{name}/server", status="202")
            == 1
        )
        assert moved("launcher_hub_requests_total", method="POST", route="/users/{name}/tokens", status="201") == 1
        assert moved("launcher_hub_request_duration_seconds_count", method="GET", route="/users/{name}") >= 1
        assert sample(after, "launcher_commands_in_flight") == 0
        assert sample(after, "launcher_active_consumer") == 1
        assert "launcher_events_dropped_total" in after
        # Labels are bounded: no user name, no token, no hub address.
        assert username not in after
        assert launched["result"]["token"] not in after
        assert settings.jupyterhub_api_token.get_secret_value() not in after
    finally:
        await delete_topology(settings)


async def test_metrics_show_the_launches_that_admission_control_holds_back(hub: LocalHub) -> None:
    port = free_port()
    settings = make_settings(hub, health_port=port, health_host="127.0.0.1", hub_max_pending_spawns=1)
    users = [unique("m") for _ in range(3)]
    try:
        async with running_service(settings), Client(settings) as client:
            ids = [await client.send({"action": "launch", "username": u, "image": "standin:slow-3"}) for u in users]
            # One spawn pending at the hub (the fixed limit), the other two waiting for its slot: a
            # state that lasts the spawn's 3 s (a launch creating its user also counts as queued).
            async with asyncio.timeout(30):
                while True:
                    _, during = await get(port, "/metrics")
                    if (
                        gauge(during, "launcher_admission_spawns_pending") == 1
                        and gauge(during, "launcher_admission_spawns_waiting") == 2
                    ):
                        break
                    await asyncio.sleep(0.05)
            replies = [await client.reply(i, 60) for i in ids]
            _, after = await get(port, "/metrics")
            for user in users:
                assert (await client.call({"action": "remove", "username": user}))["ok"]
    finally:
        await delete_topology(settings)
    assert [r["ok"] for r in replies] == [True] * 3, replies
    assert gauge(during, "launcher_admission_launches_queued") == 2
    assert gauge(during, "launcher_admission_spawns_limit") == 1
    assert gauge(after, "launcher_admission_launches_queued") == 0
    assert gauge(after, "launcher_admission_spawns_pending") == 0
    assert gauge(after, "launcher_admission_spawns_waiting") == 0
    # The hub answered cheap requests: their answer times are known.
    assert gauge(after, "launcher_admission_hub_idle_answer_seconds") > 0
    assert gauge(after, "launcher_admission_hub_answer_seconds") > 0
    assert MIN_REQUESTS <= gauge(after, "launcher_admission_hub_requests_limit") <= MAX_REQUESTS
    assert not any(user in during + after for user in users)


def test_admission_metrics_say_what_is_not_known_yet_and_report_fixed_limits() -> None:
    previous = metrics.watch_admission(Admission(max_requests=3))
    try:
        text = generate_latest().decode()
    finally:
        metrics.watch_admission(previous)
    assert gauge(text, "launcher_admission_hub_requests_limit") == 3
    assert gauge(text, "launcher_admission_spawns_limit") == math.inf  # no spawn limit known
    assert math.isnan(gauge(text, "launcher_admission_hub_answer_seconds"))  # no answer seen
    assert gauge(text, "launcher_admission_launches_queued") == 0


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/", "/"),
        ("/users/alice", "/users/{name}"),
        ("/users/alice%40example.org/server", "/users/{name}/server"),
        ("/users/alice/servers/gpu-1", "/users/{name}/servers/{server}"),
        ("/users/alice/servers/gpu-1/progress", "/users/{name}/servers/{server}/progress"),
        ("/users/alice/server/progress", "/users/{name}/server/progress"),
        ("/users/alice/tokens", "/users/{name}/tokens"),
        ("/users/alice/tokens/a12", "/users/{name}/tokens/{token_id}"),
        ("/users/alice/something-new", "other"),
        ("/groups/alice-group", "other"),
    ],
)
def test_hub_routes_are_templates_never_names(path: str, route: str) -> None:
    assert hub_route(path) == route


async def test_a_taken_health_port_ends_start_up_with_one_clear_error(hub: LocalHub) -> None:
    port = free_port()
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", port)
    settings = make_settings(hub, health_port=port, health_host="127.0.0.1")
    try:
        with pytest.raises(OSError, match=str(port)):
            async with running_service(settings):
                pass
    finally:
        blocker.close()
        await blocker.wait_closed()
