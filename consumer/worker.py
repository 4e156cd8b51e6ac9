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
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from datetime import datetime, UTC
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import DeliveryError, PublishError
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
# Pauses before an answer the broker refused (nacked) is published again; after the last, the
# command is requeued. About 8 s in all: a quorum queue elects a new leader within seconds.
ANSWER_RETRY_PAUSES = (0.25, 0.5, 1.0, 2.0, 4.0)
# A clean-up the hub never lets finish is given up after this long (tokens expire on their own).
FOLLOW_UP_LIFETIME = 24 * 3600.0


@dataclass
class _Run:
    """A command being handled, with every delivery of it that waits for its outcome."""

    deliveries: list[AbstractIncomingMessage]
    settled: int = 0  # deliveries[:settled] are acked, rejected or requeued
    # ("reply", reply_to, correlation_id) and ("result", correlation_id) already published: a
    # redelivered copy is answered once, a copy from another caller is answered too.
    answered: set[tuple[str | None, ...]] = field(default_factory=set)
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
                    await self._answer_again(run, key, answer)
                    return
            # A read changes nothing: it need not wait for (or hold up) a launch or remove.
            ordered = not isinstance(command, ReadCommand)
            async with (
                self.locks.hold((command.username, command.server_name)) if ordered else contextlib.nullcontext()
            ):
                reply, dead_letter, follow_up = await self._execute(command, message, key)
            await self._finish(run, key, reply, dead_letter, follow_up)
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
                log.exception(
                    "clean-up of launch %s of %s/%s failed unexpectedly; dead-lettered",
                    job.launch,
                    job.username,
                    job.server_name,
                )
                await _settle(run, dead_letter=True)
                return
            age = (datetime.now(UTC) - job.failed_at).total_seconds()
            if not done and age > FOLLOW_UP_LIFETIME:
                log.error(
                    "clean-up of launch %s of %s/%s given up after %.0f s",
                    job.launch,
                    job.username,
                    job.server_name,
                    age,
                )
            elif not done:
                try:
                    await self.broker.publish_command(message.body, FOLLOW_UP_TYPE)
                except Exception as error:  # noqa: BLE001
                    log.warning("could not re-queue clean-up %s (%s); redelivered", job.launch, type(error).__name__)
                    await _settle(run, requeue=True)
                    return
            await _settle(run)
        except asyncio.CancelledError:
            await _settle(run, requeue=True)
            raise
        finally:
            self.runs.pop(key, None)

    async def _last_resort(self, run: _Run, message: AbstractIncomingMessage) -> None:
        try:
            reply = Reply(
                ok=False,
                error=ErrorInfo(code="internal_error", message="the launcher failed on this command; see its log"),
                **_loose_target(message.body),
            )
            answered = await self._answer(
                run, _identity(message), run.deliveries[run.settled :], reply.routing_key, reply.body()
            )
        except Exception:
            log.exception("command %s: no error reply could be made", message.message_id)
            answered = False
        if not answered:
            log.error("command %s dead-lettered without a reply", message.message_id)
        await _settle(run, dead_letter=True)

    async def _execute(
        self, command: LaunchCommand | RemoveCommand | ReadCommand, message: AbstractIncomingMessage, key: str
    ) -> tuple[Reply, bool, CleanUp | None]:
        target = {"action": command.action, "username": command.username, "server_name": command.server_name}
        log.info(
            "%s %s/%s: started (command %s)", command.action, command.username, command.server_name, message.message_id
        )

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
            info = ErrorInfo(code=error.code, message=error.message, details=error.details)
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
        reply = Reply(
            ok=False,
            error=ErrorInfo(code="invalid_command", message=text, details=problems),
            **_loose_target(message.body),
        )
        await self._finish(run, _identity(message), reply, dead_letter=True)

    async def _finish(
        self, run: _Run, key: str, reply: Reply, dead_letter: bool, follow_up: CleanUp | None = None
    ) -> None:
        """Answer, then settle: ack (or dead-letter) once the answer is confirmed, else requeue,
        so that the command runs again (at most ``delivery_limit`` times) rather than hang unacked.
        Copies that join while the answer is on its way are answered in another round. A follow-up
        is confirmed with the answer, before the ack: RabbitMQ keeps one or the other."""
        body = reply.body()
        counted = False
        while run.settled < len(run.deliveries):
            batch = run.deliveries[run.settled :]
            if await self._answer(run, key, batch, reply.routing_key, body, follow_up):
                follow_up = None  # published once
                if not counted:
                    counted = True
                    action = reply.action if reply.action in ACTIONS else "invalid"
                    metrics.COMMANDS.labels(action, reply.error.code if reply.error else "ok").inc()
                    metrics.COMMAND_DURATION.labels(action).observe(time.monotonic() - run.started)
                await _settle(run, len(batch), dead_letter=dead_letter)
            else:
                await _settle(run, len(batch), requeue=True)

    async def _answer_again(self, run: _Run, key: str, answer: Answer) -> None:
        """Send a launch's recorded answer (from the answer journal) again, byte for byte."""
        while run.settled < len(run.deliveries):
            batch = run.deliveries[run.settled :]
            if await self._answer(run, key, batch, answer.routing_key, answer.body):
                await _settle(run, len(batch))
            else:
                await _settle(run, len(batch), requeue=True)

    async def _answer(
        self,
        run: _Run,
        key: str,
        deliveries: list[AbstractIncomingMessage],
        routing_key: str,
        body: bytes,
        follow_up: CleanUp | None = None,
    ) -> bool:
        """Publish the reply to each caller and the result event (and a follow-up); False if the
        broker did not confirm them. What the broker refused (nacked: a queue it routes to is
        electing a leader, say) is published again after a pause, a few times, before the command
        is requeued: running it again would not make the broker take its answer sooner."""

        def unanswered(mark: tuple[str | None, ...]) -> bool:
            # Checked and marked in one step, as each publish is made: a redelivered copy in the same
            # batch (same caller), or a copy joining meanwhile, is not answered twice.
            if mark in run.answered:
                return False
            run.answered.add(mark)
            return True

        for pause in (*ANSWER_RETRY_PAUSES, None):
            publishes: list[tuple[tuple[str | None, ...], Awaitable[Any]]] = []
            for delivery in deliveries:
                correlation_id = delivery.correlation_id
                result = ("result", correlation_id)
                if unanswered(result):
                    publishes.append((result, self.broker.publish_result(routing_key, correlation_id, body, key)))
                reply = ("reply", delivery.reply_to, correlation_id)
                if delivery.reply_to and unanswered(reply):
                    publishes.append((reply, self.broker.reply(delivery.reply_to, correlation_id, body)))
            # The results go first: the broker routes a channel's publishes in order, so a reply that
            # reached its caller has its result in the answer journal.
            if follow_up is not None and unanswered(("follow-up", key)):
                command = follow_up.model_dump_json().encode()
                publishes.append((("follow-up", key), self.broker.publish_command(command, FOLLOW_UP_TYPE)))
            # All confirmed before the ack, but waited for together: one broker round trip, not two.
            outcomes = await asyncio.gather(*(publish for _, publish in publishes), return_exceptions=True)
            failed = [
                (mark, outcome) for (mark, _), outcome in zip(publishes, outcomes) if isinstance(outcome, BaseException)
            ]
            if not failed:
                return True
            run.answered.difference_update(mark for mark, _ in failed)
            errors = [error for _, error in failed]
            for error in errors:
                if isinstance(error, asyncio.CancelledError):
                    raise error
            refused = all(isinstance(e, DeliveryError) and not isinstance(e, PublishError) for e in errors)
            if pause is None or not refused:
                log.error("could not publish the reply to %s: %s", deliveries[0].message_id, type(errors[0]).__name__)
                return False
            log.warning(
                "the broker refused the answer to %s; publishing it again in %.2f s", deliveries[0].message_id, pause
            )
            await asyncio.sleep(pause)
        return False  # not reached: the last pause is None

    def _emit(
        self,
        command: LaunchCommand | RemoveCommand | ReadCommand,
        correlation_id: str | None,
        event_type: str,
        data: dict[str, Any],
    ) -> None:
        subject = f"{command.username}/{command.server_name}"
        emit_event(self.broker, self.settings, subject, correlation_id, event_type, data)

    async def drain(self, grace: float) -> None:
        """Let running commands finish for ``grace`` seconds, then interrupt (and requeue) the rest."""
        if self.tasks:
            log.info("waiting up to %g s for %d running commands", grace, len(self.tasks))
            _, pending = await asyncio.wait(set(self.tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)


def emit_event(
    broker: Broker, settings: Settings, subject: str, correlation_id: str | None, event_type: str, data: dict[str, Any]
) -> None:
    """Queue a CloudEvents lifecycle event about ``subject`` (user/server), timed now, rendered when published."""
    happened = datetime.now(UTC)

    def render() -> bytes:
        event = CloudEvent(
            source=settings.event_source,
            type=event_type,
            subject=subject,
            time=happened,
            correlationid=correlation_id,
            data=data,
        )
        return event.model_dump_json().encode()

    broker.publish_event(event_type, correlation_id, render, EVENT_CONTENT_TYPE)


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
        except Exception as error:  # noqa: BLE001
            log.info(
                "delivery %s not settled (%s); the broker redelivers it", delivery.delivery_tag, type(error).__name__
            )


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


def _redelivered(message: AbstractIncomingMessage) -> bool:
    """Whether the command may have been run before (quorum queues count deliveries in a header)."""
    return bool(message.redelivered or (message.headers or {}).get("x-delivery-count"))
