"""What each command does against JupyterHub: launch, remove, read.

Workflows take validated commands and a ``HubClient``, report lifecycle steps through ``emit`` and
return a result or raise ``CommandFailed``. They know neither AMQP nor JSON wire formats.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import aiohttp

from schemas import LaunchCommand, ReadCommand, RemoveCommand

from .admission import admitted_launch, spawn_slot, start_retried
from .cleanup import CleanUp, new_launch_id, revoke_tokens, token_note, undo
from .config import Settings
from .hub import HubClient, HubError, HubUnavailable
from .signing import OPTIONS_EVENT_KEY, URL_EVENT_KEY, options_digest, signed_options

log = logging.getLogger(__name__)

Emit = Callable[[str, dict[str, Any]], None]  # queues a lifecycle event; never waits
# A failed launch's revoke and stop get this long before its reply goes out: replies come within
# the command's deadline plus a few seconds. What is not done by then (the hub is down, or slow to
# stop the server) is handed back as a CleanUp, which the worker makes a durable follow-up command.
CLEANUP_GRACE = 5.0
# A deferred clean-up keeps retrying an unavailable hub this long per delivery, then is re-queued.
FOLLOW_UP_TIMEOUT = 60.0
# An interrupted launch (shutdown) withdraws its token within this; its re-run revokes any left.
CANCEL_REVOKE_TIMEOUT = 2.0
ALREADY_RUNNING = 0  # _start's answer when the hub says the server is already running
# A start still unanswered this long after its token (sent right behind it) is likely to end in a
# 202, which needs the options check, so the model is read now, while the server starts (unless the
# launcher's spawner has confirmed our options in the progress stream by then): read at the
# 202 instead, it came just before ready when a busy hub took a little over its slow_spawn_timeout
# (10 s by default) to spawn, and the hub answered it after ready (overhead p95 at N = 200 in the
# benchmark: 200 ms against 50 ms). Earlier would spend reads on spawns that end in a 201; timed
# from the progress stream instead, it came too late when the stream opened late on a busy hub.
OPTIONS_CHECK_AFTER = 8.0


class CommandFailed(Exception):
    """A command that ends in an error reply with ``code``."""

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details
        self.follow_up: CleanUp | None = None  # what is left to undo after the reply


@dataclass
class Workflows:
    hub: HubClient
    settings: Settings

    async def run(
        self,
        command: LaunchCommand | RemoveCommand | ReadCommand,
        emit: Emit,
        command_id: str = "",
        redelivered: bool = False,
    ) -> dict[str, Any]:
        """``command_id`` is the same for every delivery of one command; ``redelivered`` says that
        an earlier run of it may have issued tokens."""
        if isinstance(command, LaunchCommand):
            return await self.launch(command, emit, command_id, redelivered)
        if isinstance(command, RemoveCommand):
            return await self.remove(command, emit)
        return await self.read(command)

    def _deadline(self, timeout: float) -> float:
        return asyncio.get_running_loop().time() + timeout

    async def read(self, command: ReadCommand) -> dict[str, Any]:
        timeout = command.timeout or self.settings.read_timeout
        deadline = self._deadline(timeout)
        try:
            with _hub_errors():
                async with asyncio.timeout_at(deadline):  # also a hub that accepts and never answers
                    server = await self.hub.until(deadline).get_server(command.username, command.server_name)
        except TimeoutError:
            raise CommandFailed("hub_unavailable", f"JupyterHub did not answer within {timeout:g} s") from None
        if server is None:
            raise CommandFailed("not_found", f"no server {_label(command)}")
        return server

    async def remove(self, command: RemoveCommand, emit: Emit) -> dict[str, Any]:
        emit("remove.accepted", {})
        deadline = self._deadline(command.timeout or self.settings.launch_timeout)
        try:
            with _hub_errors():
                async with asyncio.timeout_at(deadline):
                    hub = self.hub.until(deadline)
                    # A start still pending on the hub is another's launch (this replica runs one
                    # command per server at a time): a previous replica finishing its commands
                    # after a handover, or a user. Stopping now would cancel it and fail that
                    # launch; the commands' order says it comes first, so let it settle.
                    await _wait_start_settled(hub, command.username, command.server_name, self.settings)
                    # Nobody holds a running server after this: no launcher token for it stays valid
                    # (one would open the next server started under this name). Revoked while it
                    # stops, not after: the listing and revokes cost the caller no extra wait.
                    for outcome in await asyncio.gather(
                        _stop(hub, command.username, command.server_name, self.settings),
                        revoke_tokens(hub, command.username, command.server_name),
                        return_exceptions=True,  # both finish before either's error is raised
                    ):
                        if isinstance(outcome, BaseException):
                            raise outcome
        except TimeoutError:
            error = CommandFailed("hub_error", f"server {_label(command)} did not stop in time")
            emit("remove.failed", {"code": error.code, "message": error.message})
            raise error from None
        except CommandFailed as error:
            emit("remove.failed", {"code": error.code, "message": error.message})
            raise
        emit("remove.stopped", {})
        return {"stopped": True}

    async def launch(
        self, command: LaunchCommand, emit: Emit, command_id: str = "", redelivered: bool = False
    ) -> dict[str, Any]:
        emit("launch.accepted", {"image": command.image})
        timeout = command.timeout or self.settings.launch_timeout
        deadline = self._deadline(timeout)
        launch = _Launch(self.hub.until(deadline), command, self.settings, emit, new_launch_id(command_id), redelivered)
        try:
            with _hub_errors():
                async with asyncio.timeout_at(deadline):
                    # Waits in the launcher while the hub is busy or full (the time counts against
                    # the launch's timeout); the spawn slot frees when run() returns or raises.
                    async with admitted_launch(self.hub.admission, launch.queued):
                        result = await launch.run()
        except TimeoutError:
            follow_up = await launch.clean_up()
            error = CommandFailed(
                "spawn_timeout",
                f"server {_label(command)} was not ready within {timeout:g} s"
                + (f"; last progress: {launch.last_message}" if launch.last_message else ""),
            )
            error.follow_up = follow_up
            emit("launch.failed", {"code": error.code, "message": error.message})
            raise error from None
        except CommandFailed as error:
            error.follow_up = await launch.clean_up()
            emit("launch.failed", {"code": error.code, "message": error.message})
            raise
        except asyncio.CancelledError:
            # Shutting down: the command goes back to the queue and its next run follows the spawn
            # that is still pending, so only the token nobody will receive is withdrawn (and what
            # this cannot withdraw in time, the re-run does: it revokes its earlier runs' tokens).
            await launch.revoke_token()
            raise
        emit("launch.ready", {"url": result["url"]})
        return result

    async def clean_up(self, job: CleanUp) -> bool:
        """Finish undoing a failed launch (a follow-up command): revoke its tokens, stop the server
        it was starting. False if the hub stayed unavailable (try again later)."""
        hub = self.hub.until(self._deadline(FOLLOW_UP_TIMEOUT))
        try:
            async with asyncio.timeout(FOLLOW_UP_TIMEOUT):
                if await undo(hub, job):
                    await _stop(hub, job.username, job.server_name, self.settings)
        except (TimeoutError, HubUnavailable, aiohttp.ClientError) as error:
            log.warning(
                "clean-up of failed launch %s of %s/%s: hub unavailable (%s)",
                job.launch,
                job.username,
                job.server_name,
                type(error).__name__,
            )
            return False
        except HubError as error:
            # The hub refuses (not a passing outage): retrying would not change its mind.
            log.error(
                "clean-up of failed launch %s of %s/%s refused by the hub: %s",
                job.launch,
                job.username,
                job.server_name,
                error,
            )
            return True
        log.info("cleaned up failed launch %s of %s/%s", job.launch, job.username, job.server_name)
        return True


@dataclass
class _Launch:
    """One launch's state, so that failure at any step can undo what the earlier steps did."""

    hub: HubClient
    command: LaunchCommand
    settings: Settings
    emit: Emit
    launch_id: str = dataclasses.field(default_factory=new_launch_id)  # in the notes of the tokens it issues
    redelivered: bool = False  # an earlier run of this command may have issued tokens
    token_task: asyncio.Task[tuple[str, str]] | None = None
    spawned: bool = False  # we started (or followed) a spawn that is ours to stop on failure
    last_message: str = ""
    ready_url: str = ""  # the server's path: from the stream's "ready" event, or the spawner's, on a 201
    pending_model: asyncio.Task[dict[str, Any] | None] | None = None  # read while the spawn is pending
    options_digest: str = ""  # of the options we send, as the spawner reports applied ones
    spawn_digest: str | None = None  # what the launcher's spawner said in the progress stream
    spawn_url: str = ""  # the server's path, as the launcher's spawner said in the progress stream

    async def run(self) -> dict[str, Any]:
        """Four hub requests for a new server: user, start, token, progress; a fifth, the model, when
        the start request was answered before the server was ready (or was slow to be answered),
        read while it starts, unless the launcher's spawner said in the progress stream that this
        spawn applied our options.

        The start request is not preceded by a read of the server: the hub's answer (201 ours and
        ready, 202 pending, 400 already running) says as much, for one request less.
        """
        username, server_name = self.command.username, self.command.server_name
        await self.hub.ensure_user(username)
        # While the hub is at its spawn limit, wait here: no start, token or progress requests yet.
        await spawn_slot(self.hub.admission)
        # Signed after the wait for a spawn slot: the signature's time is checked for freshness.
        options = signed_options(
            self.settings.spawner_signing_key.get_secret_value(), username, server_name, self.command.user_options()
        )
        self.options_digest = options_digest(options)
        start = asyncio.create_task(self._start(options))
        start.add_done_callback(_retrieve)  # a failure found first elsewhere leaves its error unread
        # The hub serves one request at a time: the token request, sent right behind the start,
        # is answered once the spawn is pending, so it costs the caller nothing, and from then on
        # the progress stream is open, even while the start request is still held by the hub.
        self.token_task = asyncio.create_task(self._issue_token())
        slow_check: asyncio.TimerHandle | None = None  # reads the model if the start is slow to be answered
        try:
            await asyncio.wait({start, self.token_task}, return_when=asyncio.FIRST_COMPLETED)
            if not start.done():
                # The hub took up the start just before the token: time the start from here.
                slow_check = asyncio.get_running_loop().call_later(
                    OPTIONS_CHECK_AFTER, self._read_model_if_unanswered, start
                )
            if not start.done() or start.result() != ALREADY_RUNNING:
                await self._follow_until_ready(start)
            status = await start
        finally:
            if not start.done():
                start.cancel()
            if slow_check is not None:
                slow_check.cancel()
        if status >= 500:
            # The start failed, yet the stream said ready: a stop cancelled the spawn, and the hub
            # reports a cancelled spawn as ready (and its model as ready) until it stops it.
            raise CommandFailed("spawn_failed", f"server {_label(self.command)} was stopped while starting")
        if status == 201 and self.ready_url:
            # 201: the hub held our start until the server was ready, so the spawn is ours, with our
            # options (a pending or running one answers 202 or 400), and was not cancelled (that
            # answers 500). The model would say nothing new; reading it queues behind the hub's work.
            self._drop_pending_model()
            return await self._result({"url": self.ready_url})
        if status == 202 and self.ready_url and self._options_confirmed():
            # 202, and the spawner said in the stream that this spawn applied our options (the
            # launcher's spawner does, on the hub): no model read needed to tell it is ours.
            self._drop_pending_model()
            return await self._result({"url": self.ready_url})
        if self.pending_model is not None and self.ready_url:
            # 202: the options are checked on the model read while the server was starting, off
            # the caller's wait. A spawn cancelled by someone else's stop in its last second would
            # still look ready to any read now: the hub shows a cancelled spawn as ready for the
            # 1 s its DELETE waits before stopping it, and waiting that out would add it to every
            # slow launch; our own removes cannot race (one command per server at a time).
            server = await self.pending_model
            if server is not None:  # else the read came before or after the spawn: read again below
                self._check_options(server, options)
                return await self._result({"url": self.ready_url})
        self._drop_pending_model()
        server = await self.hub.get_server(username, server_name)
        if not _is_running(server):
            raise CommandFailed(
                "spawn_failed", self.last_message or f"server {_label(self.command)} stopped while starting"
            )
        self._check_options(server, options)
        return await self._result(server)

    def queued(self, position: int) -> None:
        """The launcher holds this launch back (admission control): say so, with its position
        (0: no longer queued, its start is sent)."""
        if position == 0:
            self.last_message = ""
            return
        self.last_message = f"queued in the launcher at position {position}"
        self.emit("launch.progress", {"progress": 0, "message": self.last_message, "queue_position": position})

    def _check_options(self, server: dict[str, Any] | None, options: dict[str, Any]) -> None:
        """A 202 may mean someone else's spawn was already pending: the hub ignored our options."""
        if server and (server.get("user_options") or {}) != options:
            self.spawned = False  # someone else's server: not ours to stop
            raise CommandFailed(
                "already_running",
                f"server {_label(self.command)} is running with other options; remove it first",
                {"user_options": server.get("user_options")},
            )

    async def _issue_token(self) -> tuple[str, str]:
        username, server_name = self.command.username, self.command.server_name
        return await self.hub.create_token(
            username,
            scopes=[f"access:servers!server={username}/{server_name}"],
            expires_in=self.settings.user_token_lifetime,
            note=token_note(username, server_name, self.launch_id),
        )

    async def _start(self, options: dict[str, Any]) -> int:
        """Ask the hub to start the server: its status (201 ready, 202 pending, 5xx failed inside
        the hub's wait), or ALREADY_RUNNING."""
        username, server_name = self.command.username, self.command.server_name
        for _ in range(2):
            # Ours to stop on failure from the moment it is asked for (the request may be cut
            # short by the timeout while the hub works on it); the options check may disown it.
            self.spawned = True
            try:
                status = await self.hub.start_server(username, server_name, options)
                if status == 202:
                    self._read_pending_model()
                return status
            except HubError as error:
                if error.status == 400 and "already running" in error.message:
                    self.spawned = False
                    return ALREADY_RUNNING
                if error.status == 400 and "pending stop" in error.message:
                    await _wait_stopped(self.hub, username, server_name, self.settings)
                    continue
                if error.status == 400:
                    raise CommandFailed("options_rejected", error.message) from None
                if error.status >= 500:
                    # A spawn that fails inside the hub's wait answers a bare 500; its message is
                    # only in the progress stream, which is being followed.
                    log.info("start of %s answered %s; its progress tells why", _label(self.command), error.status)
                    return error.status
                raise
        raise CommandFailed("hub_error", f"server {_label(self.command)} kept stopping instead of starting")

    def _options_confirmed(self) -> bool:
        """The spawner reported that the spawn under way applied the options we sent."""
        return self.spawn_digest is not None and self.spawn_digest == self.options_digest

    def _read_pending_model(self) -> None:
        """Read the server's model for the options check, once, while its spawn is pending (not
        needed once the spawner has confirmed our options)."""
        if self.pending_model is None and not self._options_confirmed():
            username, server_name = self.command.username, self.command.server_name
            self.pending_model = asyncio.create_task(self.hub.get_server(username, server_name))

    def _read_model_if_unanswered(self, start: asyncio.Task[int]) -> None:
        if not start.done():
            self._read_pending_model()

    async def _follow_until_ready(self, start: asyncio.Task[int]) -> None:
        """Follow the spawn (``_follow``), or stop at the start's 201 once the spawner has told the
        server's URL. A 201 says the server is ready and the spawn ours; the stream's own "ready"
        event leaves the hub a turn or two of its event loop after the 201, and during a burst each
        turn waits behind the hub's other work (N = 200, 0 s spawns: overhead p95 about 40 ms less,
        benchmarks/README.md). Without the URL (another spawner, or a 201 that came before the
        spawner's event) the stream is followed to its end, as before."""
        follow = asyncio.create_task(self._follow(start))
        follow.add_done_callback(_retrieve)  # a stream cancelled at the 201 may have failed meanwhile
        try:
            await asyncio.wait({follow, start}, return_when=asyncio.FIRST_COMPLETED)
            if not follow.done() and self.spawn_url and _answered(start) == 201:
                self.ready_url = self.spawn_url
                # The event the stream would have ended with, so callers see the same sequence.
                self.emit("launch.progress", {"progress": 100, "message": f"Server ready at {self.ready_url}"})
                return
            await follow
        finally:
            if not follow.done():
                follow.cancel()
                await asyncio.wait({follow})

    async def _follow(self, start: asyncio.Task[int]) -> None:
        """Follow the spawn to ready or failed through the progress stream, else by polling."""
        username, server_name = self.command.username, self.command.server_name
        not_pending_yet = 0.1
        while True:
            try:
                async for event in self.hub.progress(username, server_name):
                    self.last_message = str(event.get("message") or self.last_message)
                    if URL_EVENT_KEY in event:
                        self.spawn_url = str(event[URL_EVENT_KEY])
                    if OPTIONS_EVENT_KEY in event:
                        self.spawn_digest = str(event[OPTIONS_EVENT_KEY])
                        if not self._options_confirmed():
                            self._read_pending_model()  # someone else's options: for the error's details
                    if event.get("failed"):
                        # A spawner that refuses the options fails the spawn and the start request
                        # with 400: that answer (options_rejected) is the more precise one.
                        await asyncio.wait({start})
                        if start.exception() is not None:
                            raise start.exception()  # type: ignore[misc]
                        raise CommandFailed("spawn_failed", self.last_message or "spawn failed")
                    self.emit(
                        "launch.progress", {"progress": event.get("progress"), "message": event.get("message", "")}
                    )
                    if event.get("ready"):
                        self.ready_url = str(event.get("url") or "")
                        return
            except HubError as error:
                if error.status == 400 and not start.done():
                    # Not pending yet: the start request is still on its way, or waiting out a 429;
                    # then ask again once it is sent again, not every few seconds while it waits.
                    if await start_retried(self.hub.admission):
                        not_pending_yet = 0.05
                    not_pending_yet = min(not_pending_yet * 2, 5.0)
                    await asyncio.wait({start}, timeout=not_pending_yet)
                    continue
                if error.status == 400:
                    if await start == ALREADY_RUNNING:
                        return  # nothing to follow
                elif error.status == 404:
                    await start  # raises if the start itself was refused
                else:
                    log.warning("progress stream unusable (%s); polling", error.status)
            except (TimeoutError, aiohttp.ClientError, HubUnavailable) as error:
                # HubUnavailable: a proxy with no route to the hub (it restarts); polling retries.
                log.warning("progress stream broke (%s); polling", type(error).__name__)
            break
        await self._poll()

    async def _poll(self) -> None:
        username, server_name = self.command.username, self.command.server_name
        for _ in range(self.settings.status_check_count):
            server = await self.hub.get_server(username, server_name)
            if not server:
                raise CommandFailed("spawn_failed", self.last_message or "the server stopped while starting")
            if _is_running(server):
                return
            await asyncio.sleep(self.settings.status_check_interval)
        raise CommandFailed(
            "spawn_timeout",
            f"server {_label(self.command)} was not ready after {self.settings.status_check_count} status checks"
            f" {self.settings.status_check_interval:g} s apart"
            + (f"; last progress: {self.last_message}" if self.last_message else ""),
        )

    async def _result(self, server: dict[str, Any]) -> dict[str, Any]:
        assert self.token_task is not None
        token, token_id = await self.token_task
        if self.redelivered:
            # A re-run: an earlier run of this command (whose reply never reached the broker, or
            # whose process died) may have issued a token nobody holds. One listing, on re-runs
            # only, so that a first launch's path keeps its four or five hub requests.
            await revoke_tokens(
                self.hub, self.command.username, self.command.server_name, self.launch_id, keep=token_id
            )
        command = self.command
        return {
            "image": command.image,
            "server_name": command.server_name,
            "token": token,
            "url": self.settings.public_url + server["url"],
            "username": command.username,
            **command.model_dump(include={"cpu", "memory", "gpu", "vols"}, exclude_none=False),
        }

    def _drop_pending_model(self) -> None:
        task, self.pending_model = self.pending_model, None
        if task is None:
            return
        if task.done():
            if not task.cancelled():
                task.exception()  # read: a failed read is not worth a "never retrieved" warning
        else:
            task.cancel()

    async def revoke_token(self) -> None:
        """Withdraw this run's token, briefly (shutting down)."""
        self._drop_pending_model()
        task, self.token_task = self.token_task, None
        if task is None:
            return
        with contextlib.suppress(BaseException):
            async with asyncio.timeout(CANCEL_REVOKE_TIMEOUT):
                _, token_id = await task
                await self.hub.until(self._now() + CANCEL_REVOKE_TIMEOUT).revoke_token(self.command.username, token_id)

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def clean_up(self) -> CleanUp | None:
        """Undo a failed launch: revoke every token this launch issued (in any run of it), stop the
        server it was starting. Returns what was not done within CLEANUP_GRACE, for later.

        A token request still in flight is let finish, not cancelled: cancelled after sending, the
        hub creates the token anyway. The tokens are then found by their note, so that one whose
        answer never came is revoked too.
        """
        self._drop_pending_model()
        hub = self.hub.until(self._now() + CLEANUP_GRACE)
        try:
            async with asyncio.timeout(CLEANUP_GRACE):
                task = self.token_task
                if task is not None:
                    task.add_done_callback(_retrieve)  # it may outlive this wait: no "never retrieved"
                    await asyncio.wait({task})  # not cancelled by the grace's end either
                if await undo(hub, self._clean_up_job()):
                    await _stop(hub, self.command.username, self.command.server_name, self.settings)
            return None
        except (TimeoutError, HubUnavailable, aiohttp.ClientError) as error:
            log.warning("clean-up of %s continues after the reply (%s)", _label(self.command), type(error).__name__)
            return self._clean_up_job()
        except HubError as error:
            log.error("could not clean up failed launch of %s: %s", _label(self.command), error)
            return None

    def _clean_up_job(self) -> CleanUp:
        return CleanUp(
            username=self.command.username,
            server_name=self.command.server_name,
            launch=self.launch_id,
            stop=self.spawned,
        )


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


def _answered(task: asyncio.Task[int]) -> int | None:
    """The task's result if it has one (not pending, cancelled or failed)."""
    if not task.done() or task.cancelled() or task.exception() is not None:
        return None
    return task.result()


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def _wait_start_settled(hub: HubClient, username: str, server_name: str, settings: Settings) -> None:
    """Wait while the server's start is pending on the hub (ready or failed ends it)."""
    delay = 0.1
    while (server := await hub.get_server(username, server_name)) and server.get("pending") == "spawn":
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


def _is_running(server: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
    """Ready and not in the middle of a start or stop, by the hub's server model."""
    return bool(server and server.get("ready") and not server.get("pending"))


def _label(command: LaunchCommand | RemoveCommand | ReadCommand) -> str:
    return f"{command.username}/{command.server_name}"
