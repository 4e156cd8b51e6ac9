"""A Python client for the launcher: commands in, typed results (or typed errors) out.

    async with LauncherClient.from_config("config.yaml") as client:
        result = await client.launch(username="alice", image="quay.io/jupyter/scipy-notebook:2024-12-09",
                                     on_progress=print)
        print(result.url, result.token)

One connection carries every call: commands and their RPC replies on one channel (direct reply-to,
``amq.rabbitmq.reply-to``, so no reply queue is declared per caller), lifecycle events on a second
one through a single exclusive queue, declared the first time a call needs events. Replies and
events are told apart by the command's ``correlation_id``, so hundreds of concurrent calls share them.

Direct reply-to is at-most-once: a reply sent while the connection is down is lost, and the call
ends in :class:`ReplyTimeout` (the command may still have run; launch is idempotent, so calling
again is safe). A call never waits longer than the command's timeout plus ``reply_margin``.

Needs only the launcher's own dependencies (aio-pika, Pydantic, PyYAML for ``from_config``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import DeliveryError
from pydantic import BaseModel, ValidationError

from schemas import (
    CloudEvent,
    LaunchCommand,
    LaunchResult,
    ReadCommand,
    RemoveCommand,
    RemoveResult,
    Reply,
    ServerModel,
    describe_errors,
)

from .config import Settings, load_settings

log = logging.getLogger(__name__)

_DEFAULTS = Settings()
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
# A failed launch is cleaned up (server stopped, token revoked: up to 30 s in the launcher) before
# its reply; the rest covers a queue of commands ahead of this one.
REPLY_MARGIN = 60.0
EVENT_BUFFER = 10_000  # events waiting for a slow ``events()`` reader; past it they are dropped

ProgressCallback = Callable[[CloudEvent], Awaitable[None] | None]
Result = TypeVar("Result", bound=BaseModel)


class LauncherError(Exception):
    """A command that did not succeed. ``code`` says which failure class, ``message`` says why;
    ``reply`` is the launcher's whole reply when there was one."""

    code: str = "error"

    def __init__(self, message: str, details: Any = None, reply: Reply | None = None) -> None:
        super().__init__(f"{self.code}: {message}")
        self.message = message
        self.details = details
        self.reply = reply


class InvalidCommand(LauncherError):
    """The command is not valid (checked before sending, and by the launcher); the message names each field."""

    code = "invalid_command"


class SpawnFailed(LauncherError):
    code = "spawn_failed"


class SpawnTimeout(LauncherError):
    code = "spawn_timeout"


class NotFound(LauncherError):
    code = "not_found"


class AlreadyRunning(LauncherError):
    """Running (or starting) with other options; ``details["user_options"]`` shows them."""

    code = "already_running"


class OptionsRejected(LauncherError):
    code = "options_rejected"


class HubUnavailable(LauncherError):
    code = "hub_unavailable"


class HubError(LauncherError):
    code = "hub_error"


class InternalError(LauncherError):
    code = "internal_error"


class ReplyTimeout(LauncherError):
    """No reply within the command's timeout plus the margin: the launcher is down or far behind."""

    code = "timeout"


class NotDelivered(LauncherError):
    """The broker could not route the command: no command queue (the launcher never ran there)."""

    code = "not_delivered"


ERRORS: dict[str, type[LauncherError]] = {
    cls.code: cls
    for cls in (
        InvalidCommand,
        SpawnFailed,
        SpawnTimeout,
        NotFound,
        AlreadyRunning,
        OptionsRejected,
        HubUnavailable,
        HubError,
        InternalError,
        ReplyTimeout,
        NotDelivered,
    )
}


def error_from_reply(reply: Reply) -> LauncherError:
    """The exception for an error reply (a code this client does not know gives the base class)."""
    assert reply.error is not None
    cls = ERRORS.get(reply.error.code, LauncherError)
    error = cls(reply.error.message, reply.error.details, reply)
    if cls is LauncherError:
        error.code = reply.error.code
    return error


class LauncherClient:
    """Sends launch/read/remove commands and returns typed results; see the module's docstring."""

    def __init__(
        self,
        amqp_url: str,
        command_queue: str = _DEFAULTS.command_queue,
        reply_exchange: str = _DEFAULTS.reply_exchange,
        events_exchange: str = _DEFAULTS.events_exchange,
        *,
        launch_timeout: float = _DEFAULTS.launch_timeout,
        reply_margin: float = REPLY_MARGIN,
        connection_name: str = "jupyterhub-launcher client",
    ) -> None:
        self.amqp_url = amqp_url
        self.command_queue = command_queue
        self.reply_exchange = reply_exchange  # where result events go; the client's replies come by reply-to
        self.events_exchange = events_exchange
        # The launcher's default timeout for a launch without one, and its deadline for read/remove.
        self.launch_timeout = launch_timeout
        self.reply_margin = reply_margin
        self.connection_name = connection_name
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self._events_channel: AbstractChannel | None = None
        self._events_queue: AbstractQueue | None = None
        self._events_exchange: AbstractExchange | None = None
        self._bound: set[str] = set()
        self._events_lock = asyncio.Lock()
        self._progress: dict[str, _ProgressPump] = {}
        self._streams: set[EventStream] = set()

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> LauncherClient:
        return cls(
            settings.amqp_url.get_secret_value(),
            settings.command_queue,
            settings.reply_exchange,
            settings.events_exchange,
            launch_timeout=settings.launch_timeout,
            **options,
        )

    @classmethod
    def from_config(cls, path: str | Path | None = None, **options: Any) -> LauncherClient:
        """Connection settings from the service's config file and ``LAUNCHER_`` variables."""
        return cls.from_settings(load_settings(path), **options)

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        self._connection = await aio_pika.connect_robust(
            self.amqp_url, client_properties={"connection_name": self.connection_name}
        )
        # Confirms: a command counts as sent once the broker has it; mandatory publishes return
        # (and raise) when no command queue exists, instead of vanishing.
        self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        # Direct reply-to must be consumed, without acks, on the channel that publishes.
        replies = await self._channel.declare_queue(DIRECT_REPLY_TO, passive=True)
        await replies.consume(self._on_reply, no_ack=True)

    async def close(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the LauncherClient was closed before the reply came"))
        for stream in list(self._streams):
            stream._close()
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    # ---- commands ----------------------------------------------------------------------------

    async def launch(
        self,
        username: str,
        image: str,
        server_name: str = "",
        *,
        cpu: Any = None,
        memory: Any = None,
        gpu: Any = None,
        vols: Any = None,
        env: Mapping[str, str] | None = None,
        json: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        ttl: float | None = None,
        on_progress: ProgressCallback | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
    ) -> LaunchResult:
        """Start (or return) a server. ``on_progress`` gets this launch's lifecycle events
        (``launch.accepted``, ``launch.progress``, ...) as :class:`schemas.CloudEvent`."""
        fields = {
            "action": "launch", "username": username, "server_name": server_name, "image": image,
            "cpu": cpu, "memory": memory, "gpu": gpu, "vols": vols, "env": env, "json": json,
            "timeout": timeout, "ttl": ttl,
        }  # fmt: skip
        command = _validate(LaunchCommand, fields)
        wait = (timeout or self.launch_timeout) + self.reply_margin
        return await self._call(command, LaunchResult, wait, on_progress, message_id, correlation_id)

    async def read(
        self,
        username: str,
        server_name: str = "",
        *,
        timeout: float | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
    ) -> ServerModel:
        """The server's JupyterHub model; :class:`NotFound` when it does not exist or is stopped."""
        command = _validate(ReadCommand, {"action": "read", "username": username, "server_name": server_name})
        wait = timeout if timeout is not None else self.launch_timeout + self.reply_margin
        return await self._call(command, ServerModel, wait, None, message_id, correlation_id)

    async def remove(
        self,
        username: str,
        server_name: str = "",
        *,
        timeout: float | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
    ) -> RemoveResult:
        """Stop the server (a server that is not running counts as stopped)."""
        command = _validate(RemoveCommand, {"action": "remove", "username": username, "server_name": server_name})
        wait = timeout if timeout is not None else self.launch_timeout + self.reply_margin
        return await self._call(command, RemoveResult, wait, None, message_id, correlation_id)

    async def call(
        self,
        command: LaunchCommand | ReadCommand | RemoveCommand,
        *,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
    ) -> Reply:
        """Send a validated command and return the launcher's whole reply, successful or not
        (raises only for :class:`ReplyTimeout` and :class:`NotDelivered`)."""
        if timeout is None:
            command_timeout = command.timeout if isinstance(command, LaunchCommand) else None
            timeout = (command_timeout or self.launch_timeout) + self.reply_margin
        return await self._send(command, timeout, on_progress, message_id, correlation_id)

    async def _call(
        self,
        command: LaunchCommand | ReadCommand | RemoveCommand,
        result_type: type[Result],
        wait: float,
        on_progress: ProgressCallback | None,
        message_id: str | None,
        correlation_id: str | None,
    ) -> Result:
        reply = await self._send(command, wait, on_progress, message_id, correlation_id)
        if not reply.ok:
            raise error_from_reply(reply)
        return result_type.model_validate(reply.result or {})

    async def _send(
        self,
        command: LaunchCommand | ReadCommand | RemoveCommand,
        wait: float,
        on_progress: ProgressCallback | None,
        message_id: str | None,
        correlation_id: str | None,
    ) -> Reply:
        if self._channel is None:
            raise RuntimeError("LauncherClient is not connected: use 'async with' or await connect()")
        message_id = message_id or secrets.token_hex(16)
        correlation_id = correlation_id or message_id
        if correlation_id in self._pending:
            raise ValueError(f"a call with correlation id {correlation_id!r} is already waiting")
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        pump: _ProgressPump | None = None
        try:
            if on_progress is not None:
                # Subscribed before the command goes out, so no early event is missed.
                await self._subscribe_events(["launch.*", "remove.*"])
                pump = self._progress[correlation_id] = _ProgressPump(on_progress)
            body = command.model_dump_json(by_alias=True, exclude_none=True).encode()
            try:
                await self._channel.default_exchange.publish(
                    aio_pika.Message(
                        body,
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        message_id=message_id,
                        correlation_id=correlation_id,
                        reply_to=DIRECT_REPLY_TO,
                    ),
                    routing_key=self.command_queue,
                    mandatory=True,
                    timeout=wait,
                )
            except DeliveryError as error:
                raise NotDelivered(
                    f"the broker could not deliver the command to queue {self.command_queue!r}"
                    f" (reply code {getattr(error.frame, 'reply_code', '?')}): is the launcher set up there?"
                ) from None
            try:
                return await asyncio.wait_for(asyncio.shield(future), wait)
            except TimeoutError:
                raise ReplyTimeout(
                    f"no reply to {command.action} {command.username}/{command.server_name} within {wait:g} s"
                    " (is the launcher running?)"
                ) from None
        finally:
            self._pending.pop(correlation_id, None)
            if pump is not None:
                self._progress.pop(correlation_id, None)
                await pump.finish()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.get(message.correlation_id or "")
        if future is None or future.done():
            return  # a caller that gave up, or a second copy of an answered command
        try:
            future.set_result(Reply.model_validate_json(message.body))
        except ValidationError as error:
            future.set_exception(InternalError(f"the launcher's reply is not a reply: {error}"))

    # ---- events ------------------------------------------------------------------------------

    def events(
        self, user: str | None = None, server: str | None = None, types: Iterable[str] | str = ("#",)
    ) -> EventStream:
        """Lifecycle events as they happen, for ``user`` and ``server`` (``""`` is the default
        server; ``None``: any), of the ``types`` (AMQP topic patterns: ``launch.*``, ``#``).

        ``async for event in client.events(...)`` subscribes when iteration starts; ``async with
        client.events(...) as stream`` subscribes on entering, so a command sent after that cannot
        be missed.
        """
        patterns = [types] if isinstance(types, str) else list(types)
        return EventStream(self, user, server, patterns)

    async def _subscribe_events(self, patterns: Iterable[str]) -> None:
        async with self._events_lock:
            if self._connection is None:
                raise RuntimeError("LauncherClient is not connected")
            if self._events_queue is None:
                self._events_channel = await self._connection.channel(publisher_confirms=False)
                self._events_exchange = await self._events_channel.declare_exchange(
                    self.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
                )
                self._events_queue = await self._events_channel.declare_queue(exclusive=True, auto_delete=True)
                await self._events_queue.consume(self._on_event, no_ack=True)
            for pattern in patterns:
                if pattern not in self._bound:
                    assert self._events_exchange is not None
                    await self._events_queue.bind(self._events_exchange, pattern)
                    self._bound.add(pattern)

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        try:
            event = CloudEvent.model_validate_json(message.body)
        except ValidationError:
            log.warning("ignored an event that is not a CloudEvent (routing key %s)", message.routing_key)
            return
        pump = self._progress.get(event.correlationid or "")
        if pump is not None:
            pump.put(event)
        for stream in self._streams:
            stream._offer(event)


class EventStream:
    """An async iterator (and async context manager) over lifecycle events; see ``events()``."""

    def __init__(self, client: LauncherClient, user: str | None, server: str | None, patterns: list[str]) -> None:
        self._client = client
        self.user = user
        self.server = server
        self.patterns = patterns
        self._queue: asyncio.Queue[CloudEvent | None] = asyncio.Queue(EVENT_BUFFER)
        self._subscribed = False
        self.dropped = 0

    async def subscribe(self) -> None:
        if not self._subscribed:
            await self._client._subscribe_events(self.patterns)
            self._client._streams.add(self)
            self._subscribed = True

    async def __aenter__(self) -> Self:
        await self.subscribe()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        self._client._streams.discard(self)
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> CloudEvent:
        await self.subscribe()
        event = await self._queue.get()
        if event is None:
            raise StopAsyncIteration
        return event

    def _offer(self, event: CloudEvent) -> None:
        user, _, server = event.subject.partition("/")
        if self.user is not None and user != self.user:
            return
        if self.server is not None and server != self.server:
            return
        if not any(topic_matches(p, event.type) for p in self.patterns):
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning("event stream reader too slow: %d events dropped so far", self.dropped)


class _ProgressPump:
    """Calls one launch's progress callback with its events, in order, one at a time."""

    def __init__(self, callback: ProgressCallback) -> None:
        self.callback = callback
        self.queue: asyncio.Queue[CloudEvent | None] = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    def put(self, event: CloudEvent) -> None:
        self.queue.put_nowait(event)

    async def _run(self) -> None:
        while (event := await self.queue.get()) is not None:
            try:
                outcome = self.callback(event)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception:
                log.exception("progress callback failed on %s", event.type)

    async def finish(self) -> None:
        """Deliver what arrived before the reply, then stop (events that trail the reply are not waited for)."""
        self.queue.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self.task), 5)
        except TimeoutError:
            self.task.cancel()


def _validate(model: type[Result], fields: dict[str, Any]) -> Result:
    """The command, checked here, before anything is sent; the launcher checks it again."""
    try:
        return model.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as error:
        problems = describe_errors(error)
        raise InvalidCommand("; ".join(f"{p['field']}: {p['message']}" for p in problems), problems) from None


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more words (``launch.#`` matches ``launch``)."""
    words, keys = pattern.split("."), routing_key.split(".")

    def match(i: int, j: int) -> bool:
        if i == len(words):
            return j == len(keys)
        if words[i] == "#":
            return any(match(i + 1, k) for k in range(j, len(keys) + 1))
        return j < len(keys) and words[i] in ("*", keys[j]) and match(i + 1, j + 1)

    return match(0, 0)
