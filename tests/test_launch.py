"""Launch, read and remove end to end: RabbitMQ → consumer → real JupyterHub → replies and events."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from consumer import workflows
from consumer.hub import HubClient
from consumer.signing import OPTIONS_EVENT_KEY, URL_EVENT_KEY, options_digest, signed_options
from tests.conftest import Client
from tests.support.localhub import LocalHub


@pytest.fixture
async def hub_api(hub: LocalHub):
    async with aiohttp.ClientSession() as session:
        yield HubClient(session, hub.api_url, hub.token)


async def test_launch_returns_a_url_that_the_returned_token_opens(service: None, client: Client, username: str) -> None:
    reply = await client.call({"action": "launch", "username": username, "image": "jupyter"})

    assert reply["ok"] is True, reply
    result = reply["result"]
    assert result["url"] == f"{client.settings.public_url}/user/{username}/"
    assert set(result) == {"image", "server_name", "token", "url", "username", "cpu", "memory", "gpu", "vols"}
    async with aiohttp.ClientSession() as http:
        async with http.get(result["url"] + "api/status", headers={"Authorization": f"token {result['token']}"}) as r:
            assert r.status == 200
        async with http.get(result["url"] + "api/status", allow_redirects=False) as r:
            assert r.status in (302, 403)


async def test_launch_of_a_named_server_echoes_the_options_like_the_older_worker(
    service: None, client: Client, username: str, hub_api: HubClient
) -> None:
    command = {
        "action": "launch",
        "username": username,
        "server_name": "lab-1",
        "image": "standin",
        "cpu": {"request": 0.5, "limit": 2},
        "memory": {"request": "512M", "limit": "1G"},
        "vols": [{"pvc": f"claim-{username}", "mount": "/home/jovyan/work", "subpath": "a"}],
    }
    reply = await client.call(command)

    assert reply["ok"] is True, reply
    result = reply["result"]
    assert result["url"].endswith(f"/user/{username}/lab-1/")
    assert result["server_name"] == "lab-1"
    assert result["cpu"] == {"request": 0.5, "limit": 2.0}
    assert result["memory"] == {"request": "512M", "limit": "1G"}
    assert result["gpu"] is None
    assert result["vols"] == [{"pvc": f"claim-{username}", "mount": "/home/jovyan/work", "subpath": "a"}]
    server = await hub_api.get_server(username, "lab-1")
    assert server is not None and server["ready"] is True
    assert server["user_options"]["memory"] == {"request": "512M", "limit": "1G"}


async def test_read_returns_the_hub_server_model_and_not_found_when_absent(
    service: None, client: Client, username: str
) -> None:
    missing = await client.call({"action": "read", "username": username})
    assert missing["ok"] is False
    assert missing["error"]["code"] == "not_found"

    assert (await client.call({"action": "launch", "username": username, "image": "standin"}))["ok"]
    found = await client.call({"action": "read", "username": username})
    assert found["ok"] is True, found
    assert found["result"]["ready"] is True
    assert found["result"]["url"] == f"/user/{username}/"
    assert {"name", "pending", "started", "last_activity", "progress_url"} <= set(found["result"])


async def test_remove_stops_the_server_and_removing_a_stopped_one_is_ok(
    service: None, client: Client, username: str, hub_api: HubClient
) -> None:
    assert (await client.call({"action": "launch", "username": username, "server_name": "x", "image": "standin"}))["ok"]

    removed = await client.call({"action": "remove", "username": username, "server_name": "x"})
    assert removed == {
        "ok": True,
        "action": "remove",
        "username": username,
        "server_name": "x",
        "result": {"stopped": True},
        "error": None,
    }
    assert await hub_api.get_server(username, "x") is None
    again = await client.call({"action": "remove", "username": username, "server_name": "x"})
    assert again["ok"] is True
    nobody = await client.call({"action": "remove", "username": username + "z"})
    assert nobody["ok"] is True


async def test_running_server_with_same_options_is_returned_with_a_fresh_token(
    service: None, client: Client, username: str
) -> None:
    command = {"action": "launch", "username": username, "image": "standin", "cpu": {"limit": 1}}
    first = await client.call(command)
    second = await client.call(command)

    assert first["ok"] and second["ok"], (first, second)
    assert second["result"]["url"] == first["result"]["url"]
    assert second["result"]["token"] != first["result"]["token"]


async def test_running_server_with_other_options_is_already_running(
    service: None, client: Client, username: str
) -> None:
    assert (await client.call({"action": "launch", "username": username, "image": "standin"}))["ok"]
    other = await client.call({"action": "launch", "username": username, "image": "standin", "cpu": {"limit": 2}})

    assert other["ok"] is False
    assert other["error"]["code"] == "already_running"
    assert other["error"]["details"]["user_options"] == {"image": "standin"}


async def test_spawn_failure_reports_jupyterhubs_message_and_leaves_nothing_pending(
    service: None, client: Client, username: str, hub_api: HubClient
) -> None:
    reply = await client.call({"action": "launch", "username": username, "image": "standin:crash"})

    assert reply["ok"] is False
    assert reply["error"]["code"] == "spawn_failed"
    assert reply["error"]["message"] == "Spawn failed: the stand-in image is broken on purpose"
    assert await hub_api.get_server(username) is None
    _, tokens = await hub_api._request("GET", f"/users/{username}/tokens")
    assert [t for t in tokens["api_tokens"] if "launcher" in (t["note"] or "")] == [], tokens


async def test_timeout_stops_the_half_started_server_and_revokes_its_token(
    service: None, client: Client, username: str, hub_api: HubClient
) -> None:
    reply = await client.call({"action": "launch", "username": username, "image": "standin:slow-30", "timeout": 3})

    assert reply["ok"] is False
    assert reply["error"]["code"] == "spawn_timeout"
    assert "3 s" in reply["error"]["message"]
    assert await hub_api.get_server(username) is None
    _, tokens = await hub_api._request("GET", f"/users/{username}/tokens")
    assert [t for t in tokens["api_tokens"] if "launcher" in (t["note"] or "")] == [], tokens


async def test_events_come_in_order_and_never_carry_a_token(service: None, client: Client, username: str) -> None:
    correlation_id = await client.send({"action": "launch", "username": username, "image": "standin:slow-1"})
    reply = await client.reply(correlation_id)
    assert reply["ok"], reply
    await asyncio.sleep(0.3)  # events may trail the reply: they are published after replies, on another connection

    events = client.events_for(correlation_id)
    types = [e["type"] for e in events]
    assert types[0] == "launch.accepted"
    assert types[-1] == "launch.ready"
    assert "launch.progress" in types
    assert set(types) <= {"launch.accepted", "launch.progress", "launch.ready"}
    assert all(e["subject"] == f"{username}/" and e["specversion"] == "1.0" for e in events)
    assert events[-1]["data"]["url"] == reply["result"]["url"]
    progress = [e["data"]["progress"] for e in events if e["type"] == "launch.progress"]
    assert progress == sorted(progress) and progress[-1] == 100
    token = reply["result"]["token"]
    raw = [m for m in client.event_messages if m.correlation_id == correlation_id]
    assert raw and all(token.encode() not in m.body for m in raw)
    assert all(m.content_type == "application/cloudevents+json" for m in raw)
    assert [m.routing_key for m in raw] == types


async def test_result_event_on_the_reply_exchange_matches_the_rpc_reply(
    service: None, client: Client, username: str
) -> None:
    correlation_id = await client.send({"action": "launch", "username": username, "image": "standin"})
    reply = await client.reply(correlation_id)
    await asyncio.sleep(0.3)

    results = [(key, body) for key, body in client.results if body.pop("_correlation_id") == correlation_id]
    assert results == [("launch.ok", reply)]
    bad = await client.send({"action": "read", "username": username + "-nobody"})
    await client.reply(bad)
    await asyncio.sleep(0.3)
    assert any(key == "read.error" for key, _ in client.results)


async def test_reply_reaches_a_direct_reply_to_consumer(service: None, client: Client, username: str) -> None:
    import aio_pika

    from tests.conftest import AMQP_URL

    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        reply_queue = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            got.set_result(message.body)

        await reply_queue.consume(on_reply, no_ack=True)
        await channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps({"action": "read", "username": username}).encode(),
                reply_to="amq.rabbitmq.reply-to",
                correlation_id="direct-1",
            ),
            routing_key=client.settings.command_queue,
        )
        body = json.loads(await asyncio.wait_for(got, 30))
    assert body["action"] == "read" and body["error"]["code"] == "not_found"


async def test_fifty_concurrent_launches_all_succeed(service: None, client: Client, username: str) -> None:
    names = [f"{username}-{i}" for i in range(50)]
    replies = await asyncio.gather(
        *(client.call({"action": "launch", "username": n, "image": "standin"}, timeout=180) for n in names)
    )
    assert [r["ok"] for r in replies] == [True] * 50, [r["error"] for r in replies if not r["ok"]]
    assert {r["result"]["url"] for r in replies} == {f"{client.settings.public_url}/user/{n}/" for n in names}
    removed = await asyncio.gather(*(client.call({"action": "remove", "username": n}) for n in names))
    assert all(r["ok"] for r in removed)


async def test_a_spawn_cancelled_on_the_hub_is_not_reported_ready(
    service: None, client: Client, username: str, hub_api: HubClient
) -> None:
    correlation_id = await client.send({"action": "launch", "username": username, "image": "standin:slow-3"})
    async with asyncio.timeout(30):
        while not any(e["type"] == "launch.progress" for e in client.events_for(correlation_id)):
            await asyncio.sleep(0.05)
    server = await hub_api.get_server(username)
    assert server is not None and server["pending"] == "spawn"
    await hub_api.stop_server(username)  # an admin stops it while it starts

    reply = await client.reply(correlation_id)
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] == "spawn_failed"
    assert await hub_api.get_server(username) is None


@pytest.fixture(scope="module")
def eager_hub():
    """A hub that answers every start at once with 202, as Zero to JupyterHub's does
    (slow_spawn_timeout 0): launches are then followed on the progress stream alone."""
    with LocalHub(extra={"tornado_settings": {"slow_spawn_timeout": 0}}) as running:
        yield running


async def test_launch_on_a_hub_that_answers_202_at_once_is_followed_to_ready(
    eager_hub: LocalHub, username: str
) -> None:
    from tests.conftest import delete_topology, make_settings, running_service

    settings = make_settings(eager_hub)
    try:
        async with running_service(settings), Client(settings) as own:
            reply = await own.call({"action": "launch", "username": username, "image": "standin:slow-2"})
            other = await own.call({"action": "launch", "username": username, "image": "standin", "cpu": {"limit": 1}})
    finally:
        await delete_topology(settings)
    assert reply["ok"] is True, reply
    assert reply["result"]["url"] == f"{eager_hub.url}/user/{username}/"
    assert other["error"]["code"] == "already_running"


async def test_a_launch_that_meets_someone_elses_pending_spawn_with_other_options_leaves_it_alone(
    eager_hub: LocalHub, username: str
) -> None:
    from tests.conftest import delete_topology, make_settings, running_service

    settings = make_settings(eager_hub)
    try:
        async with aiohttp.ClientSession() as session, running_service(settings), Client(settings) as own:
            hub = HubClient(session, eager_hub.api_url, eager_hub.token)
            await hub.ensure_user(username)
            options = signed_options(eager_hub.signing_key, username, "", {"image": "standin:slow-3"})
            assert await hub.start_server(username, "", options) == 202
            reply = await own.call({"action": "launch", "username": username, "image": "standin"})
            async with asyncio.timeout(30):
                async for event in hub.progress(username):
                    if event.get("ready"):
                        break
            server = await hub.get_server(username)
    finally:
        await delete_topology(settings)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "already_running"
    assert reply["error"]["details"]["user_options"] == {"image": "standin:slow-3"}
    assert server is not None and server["ready"] is True  # the other spawn was not stopped


@pytest.fixture(scope="module")
def slow_answering_hub():
    """A hub that holds start requests 2 s (JupyterHub's default is 10 s) before answering 202."""
    with LocalHub(extra={"tornado_settings": {"slow_spawn_timeout": 2}}) as running:
        yield running


async def _slow_launch(hub: LocalHub, username: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Launch a 4 s spawn on a hub that answers its start 202 after 2 s; the launcher's requests."""
    from tests.conftest import delete_topology, make_settings, running_service

    monkeypatch.setattr(workflows, "OPTIONS_CHECK_AFTER", 0.5)  # a model read comes before the 202
    settings = make_settings(hub)
    try:
        async with running_service(settings), Client(settings) as own:
            reply = await own.call({"action": "launch", "username": username, "image": "standin:slow-4"})
    finally:
        await delete_topology(settings)
    assert reply["ok"] is True, reply
    return hub.launcher_requests(username)


async def test_a_slow_spawn_whose_options_the_spawner_confirms_in_its_progress_needs_no_model_read(
    slow_answering_hub: LocalHub, username: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = await _slow_launch(slow_answering_hub, username, monkeypatch)
    start = f"/hub/api/users/{username}/server"
    assert f"202 POST {start}" in requests, requests
    # user, start, token, progress: the stream's "options checked" event stood in for the model read.
    assert sorted(r.split(" ", 2)[1] + " " + r.split(" ", 2)[2] for r in requests) == sorted(
        [
            f"POST /hub/api/users/{username}",
            f"POST {start}",
            f"POST /hub/api/users/{username}/tokens",
            f"GET {start}/progress",
        ]
    ), requests


async def test_a_slow_spawn_has_its_options_checked_while_it_starts_when_its_spawner_does_not_confirm_them(
    slow_answering_hub: LocalHub, username: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As with a spawner that is not the launcher's: the launcher finds no confirmation in the stream.
    monkeypatch.setattr(workflows, "OPTIONS_EVENT_KEY", "not-the-spawners-key")
    requests = await _slow_launch(slow_answering_hub, username, monkeypatch)
    start = f"/hub/api/users/{username}/server"
    assert f"202 POST {start}" in requests, requests
    # The model was read (once) before the hub answered the start, not queued behind it at ready.
    model_read = f"200 GET /hub/api/users/{username}"
    assert requests.count(model_read) == 1, requests
    assert requests.index(model_read) < requests.index(f"202 POST {start}"), requests


async def _wait_gone(hub: HubClient, username: str) -> None:
    async with asyncio.timeout(30):
        while await hub.get_server(username) is not None:
            await asyncio.sleep(0.1)


async def test_the_spawner_reports_the_digest_of_the_options_it_applied_and_not_an_earlier_spawns(
    eager_hub: LocalHub, username: str
) -> None:
    async def first_events(hub: HubClient) -> list[dict[str, Any]]:
        events = []
        async with asyncio.timeout(30):
            async for event in hub.progress(username):
                events.append(event)
                if event.get("ready"):
                    return events
        return events

    async with aiohttp.ClientSession() as session:
        hub = HubClient(session, eager_hub.api_url, eager_hub.token)
        await hub.ensure_user(username)
        options = signed_options(eager_hub.signing_key, username, "", {"image": "standin:slow-1"})
        assert await hub.start_server(username, "", options) == 202
        events = await first_events(hub)
        await hub.stop_server(username)
        await _wait_gone(hub, username)
        # A start without options gets the defaults: no launcher options, so no digest to report
        # (and not the one from before the stop).
        assert await hub.start_server(username, "", {}) == 202
        again = await first_events(hub)
        await hub.stop_server(username)
    reported = [e[OPTIONS_EVENT_KEY] for e in events if OPTIONS_EVENT_KEY in e]
    assert reported == [options_digest(options)], events
    assert events[-1].get("ready") is True
    # The server's URL in the spawner's event is the one the hub's "ready" event gives.
    assert [e[URL_EVENT_KEY] for e in events if OPTIONS_EVENT_KEY in e] == [events[-1]["url"]], events
    assert [e[OPTIONS_EVENT_KEY] for e in again if OPTIONS_EVENT_KEY in e] == [options_digest({})], again


async def test_a_launch_whose_start_is_answered_201_does_not_read_the_server_model(
    service: None, client: Client, username: str, hub: LocalHub
) -> None:
    reply = await client.call({"action": "launch", "username": username, "image": "standin"})
    assert reply["ok"] is True, reply
    requests = hub.launcher_requests(username)
    assert f"201 POST /hub/api/users/{username}/server" in requests, requests
    assert f"201 POST /hub/api/users/{username}/tokens" in requests, requests
    assert not [r for r in requests if r.endswith(f"GET /hub/api/users/{username}")], requests
