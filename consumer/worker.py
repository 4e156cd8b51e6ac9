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
import time
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

from . import metrics
from .broker import Broker
from .cleanup import CleanUp
from .config import Settings
from .logs import bind_command
from .journal import Answer
from .workflows import CommandFailed, Workflows

log = logging.getLogger(__name__)

# The AMQP ``type`` of the launcher's own follow-up commands on the command queue: the rest of a
# failed launch's clean-up. They are answered to nobody: no reply, no result, no event.
FOLLOW_UP_TYPE = "jupyterhub-launcher.clean-up"
# A clean-up the hub never lets finish is given up after this long (tokens expire on their own).
FOLLOW_UP_LIFETIME = 24 * 3600.0


@dataclass
class _Run:
    """A command being handled, with every delivery of it that waits for its outcome."""

    deliveries: list[AbstractIncomingMessage]
    started: float = field(default_factory=time.monotonic)


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
        handle = self._follow_up if message.type == FOLLOW_UP_TYPE else self._handle
        task = asyncio.create_task(handle(key, run, message))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handle(self, key: str, run: _Run, message: AbstractIncomingMessage) -> None:
        metrics.IN_FLIGHT.inc()
        bind_command(correlation_id=message.correlation_id, message_id=message.message_id)  # this task's log lines
        try:
            try:
                command = parse_command(message.body)
            except ValidationError as error:
                await self._invalid(run, message, error)
                return
            bind_command(action=command.action, username=command.username, server_name=command.server_name)
            if isinstance(command, LaunchCommand) and _redelivered(message):
                # Its earlier run may have answered and died before the ack: answer the same.
                answer = await self.broker.recorded_answer(key)
                if answer is not None:
                    log.info("launch %s was answered before its replica stopped; same answer again", key)
                    await self._answer_again(run, message, key, answer)
                    return
            # A read changes nothing: it need not wait for (or hold up) a launch or remove.
            ordered = not isinstance(command, ReadCommand)
            async with self.locks.hold((command.username, command.server_name)) if ordered else contextlib.nullcontext():
                reply, dead_letter, follow_up = await self._execute(command, message, key)
            await self._finish(run, message, key, reply, dead_letter, follow_up)
        except asyncio.CancelledError:
            log.info("command %s interrupted by shutdown; requeued", key)
            await _settle(run, requeue=True)
            raise
        finally:
            self.runs.pop(key, None)
            metrics.IN_FLIGHT.dec()

    async def _follow_up(self, key: str, run: _Run, message: AbstractIncomingMessage) -> None:
        """Run a follow-up clean-up, in turn with the commands for its server; when the hub is still
        unavailable, queue it again (at the back: commands wait for it only one attempt at a time)."""
        try:
            try:
                job = CleanUp.model_validate_json(message.body)
            except (ValidationError, ValueError, RecursionError):
                log.warning("follow-up %s is not a clean-up; dead-lettered", message.message_id)
                await _settle(run, dead_letter=True)
                return
            try:
                async with self.locks.hold((job.username, job.server_name)):
                    done = await self.workflows.clean_up(job)
            except Exception:
                log.exception("clean-up of launch %s of %s/%s failed unexpectedly; dead-lettered", job.launch, job.username, job.server_name)
                await _settle(run, dead_letter=True)
                return
            age = (datetime.now(timezone.utc) - job.failed_at).total_seconds()
            if not done and age > FOLLOW_UP_LIFETIME:
                log.error("clean-up of launch %s of %s/%s given up after %.0f s", job.launch, job.username, job.server_name, age)
            elif not done:
                try:
                    await self.broker.publish_command(message.body, FOLLOW_UP_TYPE)
                except Exception as error:
                    log.warning("could not re-queue clean-up %s (%s); redelivered", job.launch, type(error).__name__)
                    await _settle(run, requeue=True)
                    return
            await _settle(run)
        except asyncio.CancelledError:
            await _settle(run, requeue=True)
            raise
        finally:
            self.runs.pop(key, None)

    async def _execute(
        self, command: LaunchCommand | RemoveCommand | ReadCommand, message: AbstractIncomingMessage, key: str
    ) -> tuple[Reply, bool, CleanUp | None]:
        target = {"action": command.action, "username": command.username, "server_name": command.server_name}
        log.info("%s %s/%s: started (command %s)", command.action, command.username, command.server_name, message.message_id)

        def emit(event_type: str, data: dict[str, Any]) -> None:
            self._emit(command, message.correlation_id, event_type, data)

        # A redelivered command may have been run before: its launch revokes that run's token.
        redelivered = _redelivered(message)
        try:
            result = await self.workflows.run(command, emit, key, redelivered)
            if isinstance(command, LaunchCommand) and command.ttl is not None and self.expiry is not None:
                result = await self.expiry.schedule(command, result, message.correlation_id)
        except CommandFailed as error:
            log.info("%s %s/%s: %s", command.action, command.username, command.server_name, error)
            info = ErrorInfo(code=error.code, message=error.message, details=error.details)  # type: ignore[arg-type]
            return Reply(ok=False, error=info, **target), False, error.follow_up
        except Exception:
            # A bug, not the caller's fault: answer, and keep the command for inspection.
            log.exception("%s %s/%s: internal error", command.action, command.username, command.server_name)
            info = ErrorInfo(code="internal_error", message="the launcher failed unexpectedly; see its log")
            return Reply(ok=False, error=info, **target), True, None
        log.info("%s %s/%s: done", command.action, command.username, command.server_name)
        return Reply(ok=True, result=result, **target), False, None

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
        await self._finish(run, message, _identity(message), reply, dead_letter=True)

    async def _finish(
        self,
        run: _Run,
        message: AbstractIncomingMessage,
        key: str,
        reply: Reply,
        dead_letter: bool,
        follow_up: CleanUp | None = None,
    ) -> None:
        """Answer, then settle: ack (or dead-letter) once the answer is confirmed, else requeue,
        so that the command runs again (at most ``delivery_limit`` times) rather than hang unacked.
        A follow-up is confirmed with the answer, before the ack: RabbitMQ keeps one or the other."""
        if await self._answer(message, key, reply.routing_key, reply.model_dump_json().encode(), follow_up):
            action = reply.action if reply.action in ACTIONS else "invalid"
            metrics.COMMANDS.labels(action, reply.error.code if reply.error else "ok").inc()
            metrics.COMMAND_DURATION.labels(action).observe(time.monotonic() - run.started)
            await _settle(run, dead_letter=dead_letter)
        else:
            await _settle(run, requeue=True)

    async def _answer_again(self, run: _Run, message: AbstractIncomingMessage, key: str, answer: Answer) -> None:
        if await self._answer(message, key, answer.routing_key, answer.body):
            await _settle(run)
        else:
            await _settle(run, requeue=True)

    async def _answer(
        self,
        message: AbstractIncomingMessage,
        key: str,
        routing_key: str,
        body: bytes,
        follow_up: CleanUp | None = None,
    ) -> bool:
        """Publish the reply and the result event (and a follow-up); False if the broker did not
        confirm them."""
        try:
            # Both confirmed before the ack, but waited for together: one broker round trip, not two.
            # The result goes first: the broker routes a channel's publishes in order, so a reply
            # that reached its caller has its result in the answer journal.
            publishes = [self.broker.publish_result(routing_key, message.correlation_id, body, key)]
            if message.reply_to:
                publishes.append(self.broker.reply(message.reply_to, message.correlation_id, body))
            if follow_up is not None:
                publishes.append(self.broker.publish_command(follow_up.model_dump_json().encode(), FOLLOW_UP_TYPE))
            await asyncio.gather(*publishes)
        except Exception as error:
            log.error("could not publish the reply to %s: %s", message.message_id, type(error).__name__)
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


def _redelivered(message: AbstractIncomingMessage) -> bool:
    """Whether the command may have been run before (quorum queues count deliveries in a header)."""
    return bool(message.redelivered or (message.headers or {}).get("x-delivery-count"))
