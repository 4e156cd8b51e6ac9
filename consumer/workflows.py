"""What each command does against JupyterHub: launch, remove, read.

Workflows take validated commands and a ``HubClient``, report lifecycle steps through ``emit`` and
return a result or raise ``CommandFailed``. They know neither AMQP nor JSON wire formats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from schemas import LaunchCommand, ReadCommand, RemoveCommand

from .config import Settings
from .hub import HubClient, HubError, HubUnavailable

log = logging.getLogger(__name__)

Emit = Callable[[str, dict[str, Any]], Awaitable[None]]
CLEANUP_TIMEOUT = 30.0  # a failed launch's stop and revoke get this long, past the command's timeout


class CommandFailed(Exception):
    """A command that ends in an error reply with ``code``."""

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details


@dataclass
class Workflows:
    hub: HubClient
    settings: Settings

    async def run(self, command: LaunchCommand | RemoveCommand | ReadCommand, emit: Emit) -> dict[str, Any]:
        if isinstance(command, LaunchCommand):
            return await self.launch(command, emit)
        if isinstance(command, RemoveCommand):
            return await self.remove(command, emit)
        return await self.read(command)

    def _deadline(self, timeout: float) -> float:
        return asyncio.get_running_loop().time() + timeout

    async def read(self, command: ReadCommand) -> dict[str, Any]:
        hub = self.hub.until(self._deadline(self.settings.launch_timeout))
        with _hub_errors():
            server = await hub.get_server(command.username, command.server_name)
        if server is None:
            raise CommandFailed("not_found", f"no server {_label(command)}")
        return server

    async def remove(self, command: RemoveCommand, emit: Emit) -> dict[str, Any]:
        await emit("remove.accepted", {})
        deadline = self._deadline(self.settings.launch_timeout)
        try:
            with _hub_errors():
                async with asyncio.timeout_at(deadline):
                    await _stop(self.hub.until(deadline), command.username, command.server_name, self.settings)
        except TimeoutError:
            error = CommandFailed("hub_error", f"server {_label(command)} did not stop in time")
            await emit("remove.failed", {"code": error.code, "message": error.message})
            raise error from None
        except CommandFailed as error:
            await emit("remove.failed", {"code": error.code, "message": error.message})
            raise
        await emit("remove.stopped", {})
        return {"stopped": True}

    async def launch(self, command: LaunchCommand, emit: Emit) -> dict[str, Any]:
        await emit("launch.accepted", {"image": command.image})
        timeout = command.timeout or self.settings.launch_timeout
        deadline = self._deadline(timeout)
        launch = _Launch(self.hub.until(deadline), command, self.settings, emit)
        try:
            with _hub_errors():
                async with asyncio.timeout_at(deadline):
                    result = await launch.run()
        except TimeoutError:
            await launch.clean_up()
            error = CommandFailed(
                "spawn_timeout",
                f"server {_label(command)} was not ready within {timeout:g} s"
                + (f"; last progress: {launch.last_message}" if launch.last_message else ""),
            )
            await emit("launch.failed", {"code": error.code, "message": error.message})
            raise error from None
        except CommandFailed as error:
            await launch.clean_up()
            await emit("launch.failed", {"code": error.code, "message": error.message})
            raise
        except asyncio.CancelledError:
            # Shutting down: the command goes back to the queue and its next run follows the spawn
            # that is still pending, so only the token nobody will receive is withdrawn.
            await launch.revoke_token()
            raise
        await emit("launch.ready", {"url": result["url"]})
        return result


@dataclass
class _Launch:
    """One launch's state, so that failure at any step can undo what the earlier steps did."""

    hub: HubClient
    command: LaunchCommand
    settings: Settings
    emit: Emit
    token_task: asyncio.Task[tuple[str, str]] | None = None
    spawned: bool = False  # we started (or followed) a spawn that is ours to stop on failure
    last_message: str = ""

    async def run(self) -> dict[str, Any]:
        username, server_name = self.command.username, self.command.server_name
        options = self.command.user_options()
        await self.hub.ensure_user(username)
        server = await self.hub.get_server(username, server_name)
        if server and server.get("pending") == "stop":
            await _wait_stopped(self.hub, username, server_name, self.settings)
            server = None
        if server and (server.get("user_options") or {}) != options:
            raise CommandFailed(
                "already_running",
                f"server {_label(self.command)} is {'starting' if server.get('pending') else 'running'} "
                "with other options; remove it first",
                {"user_options": server.get("user_options")},
            )
        # The hub serves one request at a time: a token asked for now is ready when the server is.
        self.token_task = asyncio.create_task(self._issue_token())
        if server and server.get("ready") and not server.get("pending"):
            return await self._result(server)
        if not server:
            self.spawned = True
            await self._start(options)
        else:
            self.spawned = True  # following a pending spawn with our options: ours to finish
        await self._follow()
        server = await self.hub.get_server(username, server_name)
        # A spawn cancelled by a stop can still emit "ready": only the server model is trusted.
        if not server or not server.get("ready") or server.get("pending"):
            raise CommandFailed("spawn_failed", f"server {_label(self.command)} stopped while starting")
        return await self._result(server)

    async def _issue_token(self) -> tuple[str, str]:
        username, server_name = self.command.username, self.command.server_name
        return await self.hub.create_token(
            username,
            scopes=[f"access:servers!server={username}/{server_name}"],
            expires_in=self.settings.user_token_lifetime,
            note=f"jupyterhub-launcher: {_label(self.command)}",
        )

    async def _start(self, options: dict[str, Any]) -> None:
        username, server_name = self.command.username, self.command.server_name
        try:
            await self.hub.start_server(username, server_name, options)
        except HubError as error:
            if error.status == 400 and "already running" in error.message:
                return  # a concurrent start won the race; the model check after readiness decides
            if error.status == 400:
                raise CommandFailed("options_rejected", error.message) from None
            if error.status >= 500:
                # A spawn that fails inside the hub's wait answers a bare 500; its message is only
                # in the progress stream, which _follow reads next.
                log.info("start of %s answered %s; reading its progress", _label(self.command), error.status)
                return
            raise

    async def _follow(self) -> None:
        """Follow the spawn to ready or failed through the progress stream, else by polling."""
        username, server_name = self.command.username, self.command.server_name
        try:
            async for event in self.hub.progress(username, server_name):
                self.last_message = str(event.get("message") or self.last_message)
                if event.get("failed"):
                    raise CommandFailed("spawn_failed", self.last_message or "spawn failed")
                await self.emit(
                    "launch.progress", {"progress": event.get("progress"), "message": event.get("message", "")}
                )
                if event.get("ready"):
                    return
        except HubError as error:
            if error.status == 400:
                return  # not starting any more: the server model says whether it is ready
            if error.status == 404:
                raise CommandFailed("spawn_failed", f"server {_label(self.command)} is gone") from None
            log.warning("progress stream unusable (%s); polling", error.status)
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            log.warning("progress stream broke (%s); polling", type(error).__name__)
        await self._poll()

    async def _poll(self) -> None:
        username, server_name = self.command.username, self.command.server_name
        for _ in range(self.settings.status_check_count):
            server = await self.hub.get_server(username, server_name)
            if not server:
                raise CommandFailed("spawn_failed", self.last_message or "the server stopped while starting")
            if server.get("ready") and not server.get("pending"):
                return
            await asyncio.sleep(self.settings.status_check_interval)
        raise TimeoutError

    async def _result(self, server: dict[str, Any]) -> dict[str, Any]:
        assert self.token_task is not None
        token, _ = await self.token_task
        command = self.command
        return {
            "image": command.image,
            "server_name": command.server_name,
            "token": token,
            "url": self.settings.public_url + server["url"],
            "username": command.username,
            **command.model_dump(include={"cpu", "memory", "gpu", "vols"}, exclude_none=False),
        }

    async def revoke_token(self) -> None:
        task, self.token_task = self.token_task, None
        if task is None:
            return
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            _, token_id = await task
            await asyncio.wait_for(
                self.hub.until(self.hub_cleanup_deadline()).revoke_token(self.command.username, token_id),
                CLEANUP_TIMEOUT,
            )

    def hub_cleanup_deadline(self) -> float:
        return asyncio.get_running_loop().time() + CLEANUP_TIMEOUT

    async def clean_up(self) -> None:
        """Undo a failed launch: withdraw the token and stop a server we were starting."""
        await self.revoke_token()
        if not self.spawned:
            return
        hub = self.hub.until(self.hub_cleanup_deadline())
        try:
            async with asyncio.timeout(CLEANUP_TIMEOUT):
                await _stop(hub, self.command.username, self.command.server_name, self.settings)
        except (TimeoutError, HubError, HubUnavailable, aiohttp.ClientError) as error:
            log.error("could not stop failed server %s: %s", _label(self.command), error)


async def _stop(hub: HubClient, username: str, server_name: str, settings: Settings) -> None:
    try:
        status = await hub.stop_server(username, server_name)
    except HubError as error:
        if error.status == 404:
            return  # no such user or server: nothing is running
        raise
    if status == 202:
        await _wait_stopped(hub, username, server_name, settings)


async def _wait_stopped(hub: HubClient, username: str, server_name: str, settings: Settings) -> None:
    """The hub has no stream for stopping: poll, quickly at first."""
    delay = 0.1
    while True:
        server = await hub.get_server(username, server_name)
        if not server or (not server.get("pending") and not server.get("ready")):
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, settings.status_check_interval)


@contextlib.contextmanager
def _hub_errors() -> Any:
    """Hub failures that no workflow step handled become error replies."""
    try:
        yield
    except HubUnavailable as error:
        raise CommandFailed("hub_unavailable", f"JupyterHub is unavailable: {error}") from None
    except HubError as error:
        raise CommandFailed("hub_error", f"JupyterHub answered {error.status}: {error.message}") from None


def _label(command: LaunchCommand | RemoveCommand | ReadCommand) -> str:
    return f"{command.username}/{command.server_name}"
