"""The flow of one command: message in → validate → workflow → reply, result event, ack.

A command is acked only after its reply and result event are confirmed by the broker; an invalid
command is answered and rejected to the dead-letter queue. Commands for the same user and server run
one after another, and a copy of a command that is still running (redelivered after a reconnect, or
published twice: the same message_id and the same body) joins the running one instead of starting a
second launch; its caller gets the same answer.

Whatever a delivery holds, it ends answered (where it has a ``reply_to``) and acked or dead-lettered:
no exception leaves a command's task with its delivery unsettled.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError
from pydantic_core import from_json

from schemas import (
    ACTIONS,
    EVENT_CONTENT_TYPE,
    MAX_COMMAND_BYTES,
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
    settled: int = 0  # deliveries[:settled] are acked, rejected or requeued
    # ("reply", reply_to, correlation_id) and ("result", correlation_id) already published: a
    # redelivered copy is answered once, a copy from another caller is answered too.
    answered: set[tuple[str | None, ...]] = field(default_factory=set)


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
            await self._finish(run, reply, dead_letter)
        except asyncio.CancelledError:
            log.info("command %s interrupted by shutdown; requeued", key)
            await _settle(run, requeue=True)
            raise
        except Exception:
            # A bug on the reply's path. Left unsettled, the delivery would hold a prefetch slot
            # for ever and stall the next process too: answer what can be answered, dead-letter.
            log.exception("command %s failed unexpectedly; dead-lettered", key)
            await self._last_resort(run, message)
        finally:
            self.runs.pop(key, None)

    async def _last_resort(self, run: _Run, message: AbstractIncomingMessage) -> None:
        try:
            reply = Reply(
                ok=False,
                error=ErrorInfo(code="internal_error", message="the launcher failed on this command; see its log"),
                **_loose_target(message.body),
            )
            answered = await self._answer(run, run.deliveries[run.settled :], reply)
        except Exception:
            log.exception("command %s: no error reply could be made", message.message_id)
            answered = False
        if not answered:
            log.error("command %s dead-lettered without a reply", message.message_id)
        await _settle(run, dead_letter=True)

    async def _execute(
        self, command: LaunchCommand | RemoveCommand | ReadCommand, message: AbstractIncomingMessage
    ) -> tuple[Reply, bool]:
        target = {"action": command.action, "username": command.username, "server_name": command.server_name}
        log.info("%s %s/%s: started (command %s)", command.action, command.username, command.server_name, message.message_id)

        def emit(event_type: str, data: dict[str, Any]) -> None:
            self._emit(command, message.correlation_id, event_type, data)

        try:
            result = await self.workflows.run(command, emit)
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
        reply = Reply(
            ok=False,
            error=ErrorInfo(code="invalid_command", message=text, details=problems),
            **_loose_target(message.body),
        )
        await self._finish(run, reply, dead_letter=True)

    async def _finish(self, run: _Run, reply: Reply, dead_letter: bool) -> None:
        """Answer, then settle: ack (or dead-letter) once the answer is confirmed, else requeue,
        so that the command runs again (at most ``delivery_limit`` times) rather than hang unacked.
        Copies that join while the answer is on its way are answered in another round."""
        while run.settled < len(run.deliveries):
            batch = run.deliveries[run.settled :]
            if await self._answer(run, batch, reply):
                await _settle(run, len(batch), dead_letter=dead_letter)
            else:
                await _settle(run, len(batch), requeue=True)

    async def _answer(self, run: _Run, deliveries: list[AbstractIncomingMessage], reply: Reply) -> bool:
        """Publish the reply to each caller and the result event; False if the broker did not
        confirm them."""
        body = reply.body()
        publishes = []
        for delivery in deliveries:
            correlation_id = delivery.correlation_id
            if ("result", correlation_id) not in run.answered:
                run.answered.add(("result", correlation_id))
                publishes.append(self.broker.publish_result(reply.routing_key, correlation_id, body))
            if delivery.reply_to and ("reply", delivery.reply_to, correlation_id) not in run.answered:
                run.answered.add(("reply", delivery.reply_to, correlation_id))
                publishes.insert(0, self.broker.reply(delivery.reply_to, correlation_id, body))
        try:
            # All confirmed before the ack, but waited for together: one broker round trip, not two.
            await asyncio.gather(*publishes)
        except Exception as error:
            log.error("could not publish the reply to %s: %s", deliveries[0].message_id, type(error).__name__)
            return False
        return True

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


async def _settle(run: _Run, count: int | None = None, dead_letter: bool = False, requeue: bool = False) -> None:
    """Ack (or reject) the next ``count`` (default: all) unsettled deliveries of the command;
    deliveries from a lost channel cannot be."""
    end = len(run.deliveries) if count is None else run.settled + count
    while run.settled < end:
        delivery = run.deliveries[run.settled]
        run.settled += 1  # before the await: a cancelled or failed settle is not tried twice
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
    """A copy is the same command only with the same body: two commands that share a message_id
    (a publisher's bug, or ids reused across publishers) both run."""
    if message.message_id:
        return f"{message.message_id} sha256:{hashlib.sha256(message.body).hexdigest()}"
    return "sha256:" + hashlib.sha256((message.correlation_id or "").encode() + message.body).hexdigest()


def _loose_target(body: bytes) -> dict[str, str]:
    """What can be read of an invalid command to address its error reply: action, username and
    server name, where they are short strings.

    Any body: pydantic's JSON parser (unlike ``json.loads``) bounds nesting and refuses lone
    surrogates, and bodies over MAX_COMMAND_BYTES are not read at all.
    """
    target = {"action": "invalid", "username": "", "server_name": ""}
    if len(body) > MAX_COMMAND_BYTES:
        return target
    try:
        data = from_json(body)
    except ValueError:
        return target
    if not isinstance(data, dict):
        return target
    for name in target:
        value = data.get(name)
        if isinstance(value, str) and len(value) <= 255:
            target[name] = value
    if target["action"] not in ACTIONS:
        target["action"] = "invalid"
    return target
