"""A hub that restarts: the proxy in front of it answers 404 until the hub's route is back.

The launcher talks to the hub through a real configurable-http-proxy (tests/support/frontproxy.py)
that is restarted without the hub's route, as a proxy that is back before the hub is: its 404 is not
JupyterHub's JSON, and must read as "hub unavailable", never as "no such server". A failed launch's
clean-up that the hub does not let finish goes on after the reply, durably.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from consumer.config import Settings
from consumer.hub import HubClient
from consumer.signing import signed_options
from tests.conftest import Client, delete_topology, make_settings, running_service
from tests.support.frontproxy import FrontProxy
from tests.support.launcher_process import queued
from tests.support.localhub import LocalHub, free_port

NO_ROUTE = "no route to the hub"  # what the launcher logs for a proxy's 404


@pytest.fixture
def front(hub: LocalHub) -> Iterator[FrontProxy]:
    with FrontProxy(hub.url) as proxy:
        yield proxy


@pytest.fixture
async def front_settings(hub: LocalHub, front: FrontProxy) -> AsyncIterator[Settings]:
    made = make_settings(hub, jupyterhub_url=front.url, jupyterhub_public_url=hub.url)
    yield made
    await delete_topology(made)


@pytest.fixture
async def hub_api(hub: LocalHub) -> AsyncIterator[HubClient]:
    """The hub's API straight, not through the front proxy."""
    async with aiohttp.ClientSession() as session:
        yield HubClient(session, hub.api_url, hub.token)


@pytest.fixture(autouse=True)
def hub_client_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="consumer.hub")
    return caplog


async def launcher_tokens(hub_api: HubClient, username: str) -> list[dict[str, Any]]:
    """The launcher's tokens for ``username`` that the hub still accepts (it lists no expired ones)."""
    return [t for t in await hub_api.list_tokens(username) if (t["note"] or "").startswith("jupyterhub-launcher")]


async def status_with(url: str, token: str) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.get(url + "api/status", headers={"Authorization": f"token {token}"}, allow_redirects=False) as r,
    ):
        return r.status


async def test_a_launch_following_a_healthy_spawn_through_a_hub_restart_ends_ready_and_stops_nothing(
    hub: LocalHub, front: FrontProxy, front_settings: Settings, username: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_service(front_settings), Client(front_settings) as client:
        correlation_id = await client.send({"action": "launch", "username": username, "image": "standin:slow-8"})
        await client.wait_for_event(correlation_id, "launch.progress")
        # The launch follows the spawn; the proxy goes away (the stream breaks) and comes back
        # without the hub's route, while the spawn goes on.
        await asyncio.to_thread(front.restart)
        await asyncio.sleep(3)
        front.route()
        reply = await client.reply(correlation_id, timeout=90)

    assert reply["ok"] is True, reply
    assert NO_ROUTE in caplog.text  # the launcher did meet the proxy's 404
    assert await status_with(reply["result"]["url"], reply["result"]["token"]) == 200
    assert not [r for r in hub.launcher_requests(username) if " DELETE " in r]


async def test_read_and_remove_sent_while_the_hub_has_no_route_wait_for_it_instead_of_answering_gone(
    front: FrontProxy, front_settings: Settings, hub_api: HubClient, username: str, caplog: pytest.LogCaptureFixture
) -> None:
    reader, remover = f"{username}-r", f"{username}-d"
    async with running_service(front_settings), Client(front_settings) as client:
        for name in (reader, remover):
            assert (await client.call({"action": "launch", "username": name, "image": "standin"}))["ok"]
        await asyncio.to_thread(front.restart)
        read = await client.send({"action": "read", "username": reader})
        remove = await client.send({"action": "remove", "username": remover})
        await asyncio.sleep(3)
        assert not client.replies[read].done() and not client.replies[remove].done()
        front.route()
        read_reply, remove_reply = await client.reply(read), await client.reply(remove)

    assert NO_ROUTE in caplog.text
    assert read_reply["ok"] is True, read_reply  # not "not_found"
    assert read_reply["result"]["ready"] is True
    assert remove_reply["ok"] is True, remove_reply
    assert await hub_api.get_server(remover) is None  # "stopped" was true
    assert await hub_api.get_server(reader) is not None


async def test_a_start_answered_503_by_a_proxy_whose_hub_is_down_is_retried_until_the_hub_is_back(
    hub: LocalHub, front: FrontProxy, hub_api: HubClient, username: str
) -> None:
    # A proxy that kept its route to a hub that is down answers 503, not JupyterHub's JSON: the
    # start never reached the hub and is retried (the hub's own 500, a failed spawn, is an answer).
    await hub_api.ensure_user(username)
    front.route(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    async with aiohttp.ClientSession() as session:
        through_front = HubClient(session, front.url + "/hub/api", hub.token)
        loop = asyncio.get_running_loop()
        start = asyncio.create_task(
            through_front.until(loop.time() + 60).start_server(
                username, "", signed_options(hub.signing_key, username, "", {"image": "standin"})
            )
        )
        await asyncio.sleep(2)
        assert not start.done()
        front.route()
        assert await start in (201, 202)


async def _fail_a_launch_while_the_hub_is_unavailable(
    client: Client, front: FrontProxy, hub_api: HubClient, username: str, timeout: float, proxy_down: bool = False
) -> dict[str, Any]:
    """A launch whose spawn goes on (ready after 8 s) but whose deadline comes while the proxy has
    no route to the hub (or is down: ``proxy_down``); returns its reply, checked to come within the
    deadline plus a few seconds."""
    sent = time.monotonic()
    correlation_id = await client.send(
        {"action": "launch", "username": username, "image": "standin:slow-8", "timeout": timeout}
    )
    await client.wait_for_event(correlation_id, "launch.progress")
    await asyncio.to_thread(front.stop if proxy_down else front.restart)
    reply = await client.reply(correlation_id, timeout=120)
    elapsed = time.monotonic() - sent
    print(f"failed launch (timeout {timeout:g} s, hub unavailable) answered {elapsed:.1f} s after it was sent")
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] in ("spawn_timeout", "hub_unavailable"), reply
    # The deadline plus the clean-up's grace (5 s) and generous slack; it used to be up to 60 s more.
    assert elapsed < timeout + 15, elapsed
    # The clean-up could not be done: the server is there and the launch's token still valid.
    assert await hub_api.get_server(username) is not None
    assert len(await launcher_tokens(hub_api, username)) == 1
    return reply


async def _wait_cleaned_up(hub_api: HubClient, username: str, timeout: float = 90) -> None:
    async with asyncio.timeout(timeout):
        while await hub_api.get_server(username) is not None or await launcher_tokens(hub_api, username):
            await asyncio.sleep(0.5)


async def test_a_launch_failing_while_the_hub_is_unavailable_replies_in_time_and_is_cleaned_up_once_it_is_back(
    front: FrontProxy, front_settings: Settings, hub_api: HubClient, username: str
) -> None:
    async with running_service(front_settings), Client(front_settings) as client:
        await _fail_a_launch_while_the_hub_is_unavailable(client, front, hub_api, username, timeout=4, proxy_down=True)
        await asyncio.sleep(2)
        await asyncio.to_thread(front.start)
        await _wait_cleaned_up(hub_api, username)
        await asyncio.sleep(0.5)
        assert [key for key, _ in client.results] == ["launch.error"]  # the clean-up answers nobody
    assert await queued(front_settings) == 0


async def test_a_clean_up_left_for_later_survives_a_restart_of_the_launcher(
    front: FrontProxy, front_settings: Settings, hub_api: HubClient, username: str
) -> None:
    async with Client(front_settings) as client:
        async with running_service(front_settings):
            await _fail_a_launch_while_the_hub_is_unavailable(client, front, hub_api, username, timeout=4)
        # The launcher stopped while its clean-up was waiting for the hub: the queue keeps it.
        assert await queued(front_settings) == 1
        front.route()
        await asyncio.sleep(3)
        assert await hub_api.get_server(username) is not None  # nobody else cleans up
        async with running_service(front_settings):
            await _wait_cleaned_up(hub_api, username)
            await asyncio.sleep(0.5)
        assert [key for key, _ in client.results] == ["launch.error"]
    assert await queued(front_settings) == 0
