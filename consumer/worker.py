"""The flow of one command: message in → validate → workflow → reply, result event, ack.

A command is acked only after its reply and result event are confirmed by the broker; an invalid
command is answered and rejected to the dead-letter queue. Commands for the same user and server run
one after another, and a copy of a command that is still running (redelivered after a reconnect, or
published twice) joins the running one instead of starting a second launch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from schemas import (
    ACTIONS,
    EVENT_CONTENT_TYPE,
    CloudEvent,
    ErrorInfo,
    LaunchCommand,
    ReadCommand,
    RemoveCommand,
    Reply,
    describe_errors,
    parse_command,
)

from .broker import Broker
from .config import Settings
from .workflows import CommandFailed, Workflows

log = logging.getLogger(__name__)


@dataclass
class _Run:
    """A command being handled, with every delivery of it that waits for its outcome."""

    deliveries: list[AbstractIncomingMessage]


@dataclass
class KeyedLocks:
    """One lock per key, dropped when nobody holds or waits for it."""

    _locks: dict[Any, tuple[asyncio.Lock, int]] = field(default_factory=dict)

    @contextlib.asynccontextmanager
    async def hold(self, key: Any) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class Worker:
    def __init__(self, settings: Settings, broker: Broker, workflows: Workflows) -> None:
        self.settings = settings
        self.broker = broker
        self.workflows = workflows
        self.runs: dict[str, _Run] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.locks = KeyedLocks()
        self.expiry: Any = None  # consumer.expiry.Expiry: records launches' ttl (set by the service)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        key = _identity(message)
        run = self.runs.get(key)
        if run is not None:
            log.info("command %s is already running; its outcome will answer this copy too", key)
            run.deliveries.append(message)
            return
        run = self.runs[key] = _Run([message])
        task = asyncio.create_task(self._handle(key, run, message))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handle(self, key: str, run: _Run, message: AbstractIncomingMessage) -> None:
        try:
            try:
                command = parse_command(message.body)
            except ValidationError as error:
                await self._invalid(run, message, error)
                return
            # A read changes nothing: it need not wait for (or hold up) a launch or remove.
            ordered = not isinstance(command, ReadCommand)
            async with self.locks.hold((command.username, command.server_name)) if ordered else contextlib.nullcontext():
                reply, dead_letter = await self._execute(command, message)
            await self._finish(run, message, reply, dead_letter)
        except asyncio.CancelledError:
            log.info("command %s interrupted by shutdown; requeued", key)
            await _settle(run, requeue=True)
            raise
        finally:
            self.runs.pop(key, None)

    async def _execute(
        self, command: LaunchCommand | RemoveCommand | ReadCommand, message: AbstractIncomingMessage
    ) -> tuple[Reply, bool]:
        target = {"action": command.action, "username": command.username, "server_name": command.server_name}
        log.info("%s %s/%s: started (command %s)", command.action, command.username, command.server_name, message.message_id)

        def emit(event_type: str, data: dict[str, Any]) -> None:
            self._emit(command, message.correlation_id, event_type, data)

        try:
            result = await self.workflows.run(command, emit)
            if isinstance(command, LaunchCommand) and command.ttl is not None and self.expiry is not None:
                result = await self.expiry.schedule(command, result, message.correlation_id)
        except CommandFailed as error:
            log.info("%s %s/%s: %s", command.action, command.username, command.server_name, error)
            info = ErrorInfo(code=error.code, message=error.message, details=error.details)  # type: ignore[arg-type]
            return Reply(ok=False, error=info, **target), False
        except Exception:
            # A bug, not the caller's fault: answer, and keep the command for inspection.
            log.exception("%s %s/%s: internal error", command.action, command.username, command.server_name)
            info = ErrorInfo(code="internal_error", message="the launcher failed unexpectedly; see its log")
            return Reply(ok=False, error=info, **target), True
        log.info("%s %s/%s: done", command.action, command.username, command.server_name)
        return Reply(ok=True, result=result, **target), False

    async def _invalid(self, run: _Run, message: AbstractIncomingMessage, error: ValidationError) -> None:
        problems = describe_errors(error)
        text = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        log.warning("invalid command %s dead-lettered: %s", message.message_id, text)
        fields = _loose_fields(message.body)
        reply = Reply(
            ok=False,
            action=fields.get("action") if fields.get("action") in ACTIONS else "invalid",
            username=str(fields.get("username", "")),
            server_name=str(fields.get("server_name", "")),
            error=ErrorInfo(code="invalid_command", message=text, details=problems),
        )
        await self._finish(run, message, reply, dead_letter=True)

    async def _finish(self, run: _Run, message: AbstractIncomingMessage, reply: Reply, dead_letter: bool) -> None:
        """Answer, then settle: ack (or dead-letter) once the answer is confirmed, else requeue,
        so that the command runs again (at most ``delivery_limit`` times) rather than hang unacked."""
        if await self._answer(message, reply):
            await self._answer_copies(run, message, reply)
            await _settle(run, dead_letter=dead_letter)
        else:
            await _settle(run, requeue=True)

    async def _answer(self, message: AbstractIncomingMessage, reply: Reply) -> bool:
        """Publish the reply and the result event; False if the broker did not confirm them."""
        body = reply.model_dump_json().encode()
        try:
            # Both confirmed before the ack, but waited for together: one broker round trip, not two.
            publishes = [self.broker.publish_result(reply.routing_key, message.correlation_id, body)]
            if message.reply_to:
                publishes.insert(0, self.broker.reply(message.reply_to, message.correlation_id, body))
            await asyncio.gather(*publishes)
        except Exception as error:
            log.error("could not publish the reply to %s: %s", message.message_id, type(error).__name__)
            return False
        return True

    async def _answer_copies(self, run: _Run, first: AbstractIncomingMessage, reply: Reply) -> None:
        """The RPC reply to each copy that joined the run under its own ``reply_to`` (a caller whose
        first attempt was lost with its connection is waiting there); the result event went out once."""
        body = reply.model_dump_json().encode()
        for copy in run.deliveries:  # copies that join while replies go out are answered too
            if copy is first or not copy.reply_to:
                continue
            try:
                await self.broker.reply(copy.reply_to, copy.correlation_id, body)
            except Exception as error:  # best effort: the result event has the outcome
                log.info("could not reply to a copy of %s: %s", copy.message_id, type(error).__name__)

    def _emit(
        self,
        command: LaunchCommand | RemoveCommand | ReadCommand,
        correlation_id: str | None,
        event_type: str,
        data: dict[str, Any],
    ) -> None:
        happened = datetime.now(timezone.utc)

        def render() -> bytes:
            event = CloudEvent(
                source=self.settings.event_source,
                type=event_type,  # type: ignore[arg-type]
                subject=f"{command.username}/{command.server_name}",
                time=happened,
                correlationid=correlation_id,
                data=data,
            )
            return event.model_dump_json().encode()

        self.broker.publish_event(event_type, correlation_id, render, EVENT_CONTENT_TYPE)

    async def drain(self, grace: float) -> None:
        """Let running commands finish for ``grace`` seconds, then interrupt (and requeue) the rest."""
        if self.tasks:
            log.info("waiting up to %g s for %d running commands", grace, len(self.tasks))
            _, pending = await asyncio.wait(set(self.tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)


async def _settle(run: _Run, dead_letter: bool = False, requeue: bool = False) -> None:
    """Ack (or reject) every delivery of the command; deliveries from a lost channel cannot be."""
    for delivery in run.deliveries:
        try:
            if requeue:
                await delivery.nack(requeue=True)
            elif dead_letter:
                await delivery.reject(requeue=False)
            else:
                await delivery.ack()
        except Exception as error:
            log.info("delivery %s not settled (%s); the broker redelivers it", delivery.delivery_tag, type(error).__name__)


def _identity(message: AbstractIncomingMessage) -> str:
    if message.message_id:
        return message.message_id
    return "sha256:" + hashlib.sha256((message.correlation_id or "").encode() + message.body).hexdigest()


def _loose_fields(body: bytes) -> dict[str, Any]:
    """What can be read of an invalid command, to address its error reply."""
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
