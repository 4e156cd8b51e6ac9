"""The Celery bridge: the older Celery worker's tasks, answered by the launcher.

Clients of the older worker call ``app.send_task("launcher-worker.launch", args=[...])`` and ``.get()``
its result. This is a Celery app with tasks of the same names and signatures: each task turns its
arguments into a launcher command, sends it over RabbitMQ and waits for the reply. Celery and kombu
speak to the clients' broker and result backend (Redis, RabbitMQ, whatever they support); the launcher
does the work. ``jupyterhub-launcher celery-bridge --config FILE`` runs it.

A task only waits, so the worker runs Celery's ``threads`` pool: hundreds of tasks in flight in one
process. One asyncio loop in a background thread owns the connection to the launcher; each task
submits its call to that loop and blocks its own thread on the answer.

Nothing lost, nothing doubled: tasks are acknowledged late and requeued if the bridge dies
(``acks_late``, ``reject_on_worker_lost``), and a command's ``message_id`` is derived from the task
id, so a redelivered task joins the launch still running in the launcher, or repeats it (a launch of
a running server returns it, with a fresh token), instead of starting a second one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from celery import Celery, Task
from pydantic import ValidationError

from schemas import LaunchCommand, ReadCommand, RemoveCommand, describe_errors

from .client import REPLY_MARGIN, LauncherClient, LauncherError, ReplyTimeout
from .config import Settings

log = logging.getLogger(__name__)
_Fallback = TypeVar("_Fallback")  # what a failed task returns instead of a result


# A task whose launcher connection failed is tried again this often, this many seconds apart.
MAX_RETRIES = 60
RETRY_DELAY = 2
# How often a command is sent (same message id) when its reply does not come in time.
SEND_ATTEMPTS = 3


class LauncherTaskError(Exception):
    """A failed call, raised to Celery clients when ``celery_raise_errors`` is on.

    ``args`` is ``(code, message)``, so Celery's JSON result serialisation carries both and rebuilds
    the exception on the client (as this class where ``consumer.celery_bridge`` has been imported,
    else as a class of the same name that Celery makes); ``code`` is the launcher's error code
    (``invalid_command``, ``spawn_failed``, ``not_found``, ...).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class CallFailed(Exception):
    """The launcher answered with an error (or did not answer): what the task logs, returns or raises."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------------------------
# The older worker's arguments as launcher commands.


def launch_command(
    image: Any,
    username: Any,
    server_name: Any = "",
    vols: Any = None,
    cpu: Any = None,
    memory: Any = None,
    gpu: Any = None,
    json: Any = None,
    env: Any = None,
) -> LaunchCommand:
    """The command for the older worker's ``launch`` arguments; raises ``CallFailed("invalid_command")``.

    The shapes are the older API's (``{"request", "limit"}``, ``[{"pvc", "mount", "subpath"}]``), and
    two of its habits are kept: a ``None`` request or limit means "not set" (the older spawner read it
    so), and a volume's ``subpath`` may be ``None``. ``json`` becomes the command's extra spawner
    options; the hub applies only the keys in its ``launcher_allowed_options`` (``transparent`` is
    ignored).
    """
    body: dict[str, Any] = {"action": "launch", "image": image, "username": username}
    body["server_name"] = "" if server_name is None else server_name
    for name, spec in (("cpu", cpu), ("memory", memory), ("gpu", gpu)):
        if isinstance(spec, dict):
            spec = {key: value for key, value in spec.items() if value is not None}
            if not spec:
                continue  # {"request": None, "limit": None}: nothing asked for
        if spec is not None:
            body[name] = spec
    if vols is not None:
        body["vols"] = (
            [{**vol, "subpath": vol.get("subpath") or ""} if isinstance(vol, dict) else vol for vol in vols]
            if isinstance(vols, (list, tuple))
            else vols
        )
    if json is not None:
        body["json"] = json
    if env is not None:
        body["env"] = env
    try:
        return LaunchCommand.model_validate(body)
    except ValidationError as error:
        raise CallFailed("invalid_command", _describe(error)) from None


def target_command(action: str, username: Any, server_name: Any = "") -> ReadCommand | RemoveCommand:
    """A read or remove command; raises ``CallFailed("invalid_command")``."""
    model = ReadCommand if action == "read" else RemoveCommand
    body = {"action": action, "username": username, "server_name": "" if server_name is None else server_name}
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise CallFailed("invalid_command", _describe(error)) from None


def _describe(error: ValidationError) -> str:
    return "; ".join(f"{p['field']}: {p['message']}" for p in describe_errors(error))


def message_id(task_id: str) -> str:
    """The command's identity for a task: the same on every delivery of the task."""
    return f"celery-{task_id}"


# ---------------------------------------------------------------------------------------------
# The launcher's side: one LauncherClient, owned by an asyncio loop in a background thread.


class Bridge:
    """The launcher client and its loop, shared by every task of the process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="launcher-client", daemon=True)
        self.client = LauncherClient.from_settings(settings, connection_name="jupyterhub-launcher celery-bridge")

    def start(self) -> None:
        self.thread.start()
        self._run(self.client.connect(), timeout=60)

    def stop(self) -> None:
        if self.thread.is_alive():
            try:
                self._run(self.client.close(), timeout=10)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join(10)

    def _run(self, coroutine: Coroutine[Any, Any, Any], timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call(self, command: LaunchCommand | ReadCommand | RemoveCommand, message_id: str) -> dict[str, Any]:
        """The command's result; raises ``CallFailed`` with the launcher's error code and message.

        A reply that does not come in time may have been lost (direct reply-to is at-most-once: a
        broker restart loses the replies on their way), so the command is sent again, with the same
        ``message_id``: the launcher answers it from the run still going, or runs it again, which
        launch, read and remove allow. Other errors (the launcher's broker unreachable) propagate.
        """
        # The client ends each wait itself (the command's timeout plus its margin); this bound only
        # keeps a thread from waiting forever should the loop itself be stuck.
        timeout = (getattr(command, "timeout", None) or self.settings.launch_timeout) + 2 * REPLY_MARGIN
        for attempt in range(1, SEND_ATTEMPTS + 1):
            call = self.client.call(
                command,
                message_id=message_id,
                # Its own correlation id: a redelivered copy of a running task waits beside the first.
                correlation_id=secrets.token_hex(16),
            )
            try:
                reply = self._run(call, timeout)
                break
            except ReplyTimeout as error:
                if attempt == SEND_ATTEMPTS:
                    raise CallFailed(error.code, error.message) from None
                log.warning(
                    "%s: %s; sending it again (%d of %d)", message_id, error.message, attempt + 1, SEND_ATTEMPTS
                )
            except LauncherError as error:  # no command queue
                raise CallFailed(error.code, error.message) from None
        if not reply.ok:
            assert reply.error is not None
            raise CallFailed(reply.error.code, reply.error.message)
        return reply.result or {}


# ---------------------------------------------------------------------------------------------
# The Celery app.


class _SecretResults(logging.Filter):
    """Celery logs a task's return value at INFO; a launch's is a user token, which stays out of logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, dict) and "return_value" in record.args:
            record.args = {**record.args, "return_value": "(result not logged)"}
        return True


def make_app(settings: Settings, bridge: Bridge) -> Celery:
    """A Celery app whose tasks forward to the launcher through ``bridge``."""
    app = Celery("jupyterhub-launcher-bridge", set_as_current=False)
    app.conf.update(
        broker_url=settings.celery_broker,
        result_backend=settings.celery_result_backend.get_secret_value(),
        broker_transport_options=settings.celery_broker_transport_options,
        task_default_queue=settings.celery_queue,
        # Acknowledged once answered; a task whose bridge died goes back to the queue.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Each thread takes one task at a time: no task waits behind a busy thread in this process
        # while another bridge could run it.
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        # Nothing to control remotely, no events to send: no pidbox or event exchanges on the broker.
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        accept_content=["json"],
        task_serializer="json",
        result_serializer="json",
    )
    prefix = settings.celery_task_prefix
    raising = settings.celery_raise_errors

    def forward(
        task: Task,
        what: str,
        command: Callable[[], LaunchCommand | ReadCommand | RemoveCommand],
        fallback: _Fallback,
    ) -> dict[str, Any] | _Fallback:
        """The launcher's result for ``command`` (a callable making it), or the failure's ``fallback``."""
        started = time.monotonic()
        try:
            result = bridge.call(command(), message_id(task.request.id))
            log.info("%s answered in %.0f ms (task %s)", what, (time.monotonic() - started) * 1000, task.request.id)
            return result
        except CallFailed as error:
            log.warning("%s failed (task %s): %s: %s", what, task.request.id, error.code, error.message)
            if raising:
                raise LauncherTaskError(error.code, error.message) from None
            return fallback
        except Exception as error:  # noqa: BLE001
            # The launcher's broker is out of reach: the same task again, shortly (same message id).
            log.warning("%s (task %s): %s; retrying", what, task.request.id, type(error).__name__)
            raise task.retry(exc=error, countdown=RETRY_DELAY, max_retries=MAX_RETRIES) from None

    @app.task(name=f"{prefix}.launch", bind=True, throws=(LauncherTaskError,))
    def launch(
        self: Task,
        image: Any,
        username: Any,
        server_name: Any = "",
        vols: Any = None,
        cpu: Any = None,
        memory: Any = None,
        gpu: Any = None,
        json: Any = None,
        skip_check: bool = True,
        env: Any = None,
    ) -> dict[str, Any] | None:
        def command() -> LaunchCommand:
            launch = launch_command(image, username, server_name, vols, cpu, memory, gpu, json, env)
            if not skip_check:
                # The older worker's check: no launch when the server exists, whatever its options.
                try:
                    bridge.call(target_command("read", username, server_name), f"{message_id(self.request.id)}-check")
                except CallFailed as error:
                    if error.code != "not_found":
                        raise
                else:
                    raise CallFailed("already_running", "the server exists and skip_check is False")
            return launch

        return forward(self, f"launch {username}/{server_name or ''}", command, None)

    @app.task(name=f"{prefix}.read", bind=True, throws=(LauncherTaskError,))
    def read(self: Task, username: Any, server_name: Any = "") -> dict[str, Any] | None:
        command = functools.partial(target_command, "read", username, server_name)
        return forward(self, f"read {username}/{server_name or ''}", command, None)

    @app.task(name=f"{prefix}.remove", bind=True, throws=(LauncherTaskError,))
    def remove(self: Task, username: Any, server_name: Any = "") -> bool:
        command = functools.partial(target_command, "remove", username, server_name)
        return forward(self, f"remove {username}/{server_name or ''}", command, False) is not False

    return app


def run(settings: Settings) -> int:
    """Run the bridge's Celery worker until it is stopped (SIGTERM: finish running tasks, then exit)."""
    bridge = Bridge(settings)
    bridge.start()
    app = make_app(settings, bridge)
    logging.getLogger("celery.app.trace").addFilter(_SecretResults())
    argv = [
        "worker",
        "--pool=threads",
        f"--concurrency={settings.celery_concurrency}",
        f"--queues={settings.celery_queue}",
        f"--loglevel={logging.getLevelName(settings.log_level)}",
        # Bridges need not know of one another.
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    try:
        app.worker_main(argv)
    finally:
        bridge.stop()
    return 0
