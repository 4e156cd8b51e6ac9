"""Launch paths a real hub cannot be made to take on demand, against a scripted stand-in of its API.

The real hub cannot be made to refuse its progress stream, drop it mid-spawn or hold its "ready"
event back after answering the start on demand, so these use a small aiohttp server that answers
like JupyterHub does (status codes and bodies from JupyterHub 6.1's apihandlers/users.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from consumer.config import Settings
from consumer.hub import HubClient
from consumer.signing import OPTIONS_EVENT_KEY, URL_EVENT_KEY
from consumer.workflows import CommandFailed, Workflows
from schemas import LaunchCommand


class ScriptedHub:
    """One user, one default server that becomes ready after ``polls_until_ready`` model reads."""

    def __init__(self, progress_status: int, polls_until_ready: int = 2) -> None:
        self.progress_status = progress_status
        self.polls_until_ready = polls_until_ready
        self.requests: list[str] = []
        self.model_reads = 0
        self.started = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hub/api/users/{user}", self.create_user)
        app.router.add_post("/hub/api/users/{user}/server", self.start)
        app.router.add_post("/hub/api/users/{user}/tokens", self.token)
        app.router.add_get("/hub/api/users/{user}/server/progress", self.progress)
        app.router.add_get("/hub/api/users/{user}", self.user)
        return app

    @web.middleware
    async def record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.path}")
        return await handler(request)

    async def create_user(self, request: web.Request) -> web.Response:
        return web.json_response({"name": request.match_info["user"]}, status=201)

    async def start(self, request: web.Request) -> web.Response:
        self.started = True
        self.options = await request.json()
        return web.Response(status=202)

    async def token(self, request: web.Request) -> web.Response:
        return web.json_response({"token": "t0ken", "id": "a1"}, status=201)

    async def progress(self, request: web.Request) -> web.StreamResponse:
        if self.progress_status != 200:
            return web.json_response({"status": self.progress_status, "message": "no"}, status=self.progress_status)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"progress": 50, "message": "Spawning server..."}\n\n')
        return response  # the stream ends without ready or failed, as when the hub restarts

    async def user(self, request: web.Request) -> web.Response:
        self.model_reads += 1
        ready = self.model_reads >= self.polls_until_ready
        server = {
            "name": "",
            "ready": ready,
            "pending": None if ready else "spawn",
            "url": "/user/bob/",
            "user_options": getattr(self, "options", {}),
        }
        return web.json_response({"name": "bob", "servers": {"": server} if self.started else {}})


@pytest.fixture
async def scripted(request: pytest.FixtureRequest) -> AsyncIterator[tuple[ScriptedHub, Workflows]]:
    hub = ScriptedHub(progress_status=request.param)
    runner, settings = await _serve(hub)
    async with aiohttp.ClientSession() as session:
        yield hub, Workflows(HubClient(session, settings.hub_api_url, "secret"), settings)
    await runner.cleanup()


async def _serve(hub: ScriptedHub) -> tuple[web.AppRunner, Settings]:
    """The scripted hub on a free port, and the launcher's settings for it."""
    app = hub.app()
    app.middlewares.append(hub.record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, Settings(jupyterhub_url=f"http://127.0.0.1:{port}", status_check_interval=0.05)


def no_events(event_type: str, data: dict[str, Any]) -> None:
    pass


@pytest.mark.parametrize("scripted", [403, 200], indirect=True, ids=["stream-refused", "stream-ended-early"])
async def test_launch_falls_back_to_polling_when_the_progress_stream_cannot_be_used(
    scripted: tuple[ScriptedHub, Workflows],
) -> None:
    hub, workflows = scripted
    result = await workflows.launch(LaunchCommand(username="bob", image="img"), no_events)

    assert result["url"].endswith("/user/bob/") and result["token"] == "t0ken"
    assert hub.requests.count("GET /hub/api/users/bob") >= 2  # polled until the model said ready
    assert hub.requests[:2] == ["POST /hub/api/users/bob", "POST /hub/api/users/bob/server"]


@pytest.mark.parametrize("scripted", [403], indirect=True)
async def test_polling_gives_up_after_status_check_count_reads(scripted: tuple[ScriptedHub, Workflows]) -> None:
    hub, workflows = scripted
    hub.polls_until_ready = 10**6
    workflows.settings = workflows.settings.model_copy(update={"status_check_count": 3})
    with pytest.raises(CommandFailed) as failed:
        await workflows.launch(LaunchCommand(username="bob", image="img"), no_events)
    assert failed.value.code == "spawn_timeout"
    assert "not ready after 3 status checks" in failed.value.message


class ReadyBeforeItsStreamSaysSo(ScriptedHub):
    """Answers the start 201 once the stream has sent the spawner's event, and never sends the
    stream's "ready" (as a busy hub sends it only turns of its event loop after the 201)."""

    def __init__(self, with_url: bool) -> None:
        super().__init__(progress_status=200)
        self.with_url = with_url
        self.spawner_event_sent = asyncio.Event()
        self.finished = asyncio.Event()  # set by the test: the stream may end

    async def start(self, request: web.Request) -> web.Response:
        self.started = True
        self.options = await request.json()
        await self.spawner_event_sent.wait()
        return web.Response(status=201)

    async def progress(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        event: dict[str, Any] = {"progress": 0, "message": "Server options checked", OPTIONS_EVENT_KEY: "d"}
        if self.with_url:
            event[URL_EVENT_KEY] = "/user/bob/"
        await response.write(f"data: {json.dumps(event)}\n\n".encode())
        self.spawner_event_sent.set()
        await self.finished.wait()  # no "ready": the launch must not need it
        return response


@pytest.mark.parametrize("with_url", [True, False], ids=["spawner-told-the-url", "no-url"])
async def test_a_start_answered_201_needs_no_ready_event_once_the_spawner_told_the_url(with_url: bool) -> None:
    hub = ReadyBeforeItsStreamSaysSo(with_url)
    runner, settings = await _serve(hub)
    events: list[dict[str, Any]] = []
    try:
        async with aiohttp.ClientSession() as session:
            workflows = Workflows(HubClient(session, settings.hub_api_url, "secret"), settings)
            launch = workflows.launch(
                LaunchCommand(username="bob", image="img"),
                lambda kind, data: events.append(data) if kind == "launch.progress" else None,
            )
            if with_url:
                result = await asyncio.wait_for(launch, 10)
                assert result["url"] == settings.public_url + "/user/bob/" and result["token"] == "t0ken"
                assert "GET /hub/api/users/bob" not in hub.requests  # no model read either
                assert [e["progress"] for e in events] == [0, 100], events  # the stream's end, as the hub says it
                assert events[-1]["message"] == "Server ready at /user/bob/"
            else:
                # Without the spawner's URL the launch waits for the stream, as before.
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(launch, 2)
    finally:
        hub.finished.set()
        await runner.cleanup()
