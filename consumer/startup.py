"""Start-up: reach the broker within a bounded time, or fail with one line that says why.

Once connected, aio-pika's robust connection reconnects by itself for as long as the service runs.
At start-up there is nothing yet to keep alive: a broker that cannot be reached after a few attempts,
or one that refuses the login, is a deployment mistake the operator must see, so the service exits
(non-zero) instead of retrying for ever; a supervisor (systemd, Kubernetes) restarts it with its own
backoff. Network failures are retried for ``amqp_startup_timeout`` seconds (a broker started at the
same moment, as in a compose file, or restarting, answers a few seconds later); a refused login or a
refused declaration is not, since trying again cannot change the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import aiormq.exceptions

from .broker import Broker, QueueMismatch
from .config import Settings
from .logs import mask_url

log = logging.getLogger(__name__)

STARTUP_PAUSE_FIRST, STARTUP_PAUSE_MAX = 1.0, 5.0  # seconds between attempts, doubling
CLOSE_TIMEOUT = 5.0  # for a half-made connection, when an attempt fails or is interrupted
# While connecting at start-up, these log each failed attempt (one of them at ERROR) and promise a
# reconnection that start-up will not make; the failure is reported once, by start-up itself.
CONNECT_LOGGERS = ("aio_pika.robust_connection", "aiormq.connection")


class StartupError(Exception):
    """The service cannot start; the message is the one line the operator sees (no secrets)."""


def broker_address(settings: Settings) -> str:
    return mask_url(settings.amqp_url.get_secret_value())


async def connect_broker(settings: Settings) -> Broker:
    """A connected Broker; StartupError at once for a permanent failure, or once network failures
    have gone on for ``amqp_startup_timeout`` seconds."""
    where = broker_address(settings)
    loop = asyncio.get_running_loop()
    began = loop.time()
    give_up, pause, attempt = began + settings.amqp_startup_timeout, STARTUP_PAUSE_FIRST, 0
    while True:
        attempt += 1
        broker = Broker(settings)
        try:
            with _quiet(settings):
                await broker.connect()
            return broker
        except asyncio.CancelledError:  # SIGTERM while connecting
            await _close(broker)
            raise
        except QueueMismatch:  # its own message says what differs and how to migrate
            await _close(broker)
            raise
        except Exception as error:  # noqa: BLE001
            await _close(broker)
            problem, permanent = describe(error, settings)
            if permanent:
                raise StartupError(f"cannot start: RabbitMQ at {where}: {problem}") from None
            if loop.time() + pause > give_up:
                tried = f"{attempt} attempt{'s' if attempt > 1 else ''} in {loop.time() - began:.0f} s"
                raise StartupError(f"cannot start: RabbitMQ at {where}: {problem} (gave up after {tried})") from None
            log.warning("RabbitMQ at %s: %s; trying again in %g s", where, problem, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, STARTUP_PAUSE_MAX)


def describe(error: BaseException, settings: Settings) -> tuple[str, bool]:
    """What went wrong, in words, and whether it is permanent (trying again would not help)."""
    if isinstance(error, aiormq.exceptions.ProbableAuthenticationError):
        return "the login was refused (check the user and password in amqp_url)", True
    if isinstance(error, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(error):
        # What aiormq makes of the broker closing the handshake at Connection.Open: the vhost.
        return "the broker closed the connection at login (does the vhost exist, may the user use it?)", True
    if isinstance(error, aiormq.exceptions.ChannelClosed):
        # A refused declaration (PRECONDITION_FAILED: a queue with other arguments, ACCESS_REFUSED
        # on the vhost): the broker's own words say which queue and what differs.
        return f"{type(error).__name__}: {_reason(error)}", True
    if isinstance(error, TimeoutError):
        return f"no answer within {settings.amqp_connect_timeout:g} s (amqp_connect_timeout)", False
    if isinstance(error, aiormq.exceptions.AMQPConnectionError) and error.args and isinstance(error.args[0], int):
        # aiormq wraps the socket error as (errno, text), e.g. (111, "Connect call failed (...)").
        return f"cannot connect ({error.args[1] if len(error.args) > 1 else error.args[0]})", False
    if isinstance(error, ConnectionError | OSError):
        return f"cannot connect ({type(error).__name__}: {error})", False
    return f"{type(error).__name__}: {_reason(error)}", True


def _reason(error: BaseException) -> str:
    return "; ".join(str(a) for a in error.args) or "no reason given"


async def _close(broker: Broker) -> None:
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(broker.close(), CLOSE_TIMEOUT)


class _DropBelowCritical(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.CRITICAL


@contextlib.contextmanager
def _quiet(settings: Settings) -> Iterator[None]:
    """Hold back the AMQP libraries' per-attempt lines (kept at DEBUG, for those who ask)."""
    if settings.log_level <= logging.DEBUG:
        yield
        return
    loggers, drop = [logging.getLogger(name) for name in CONNECT_LOGGERS], _DropBelowCritical()
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)
