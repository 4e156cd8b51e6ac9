"""Logging: text or JSON lines, the command each line belongs to, and secrets redacted everywhere.

Redaction is a filter on the root handlers, so it sees every record, the AMQP and HTTP libraries'
included, whatever logger made it: ``scheme://user:password@`` loses its password, and the configured
secrets (the hub token, the AMQP password) are replaced wherever they appear, tracebacks included.

The command a line belongs to comes from a context variable that the worker sets in each command's
task (tasks copy the context they are created in, so it follows the command into the tasks it starts
and never leaks into another command's).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from contextvars import ContextVar
from datetime import datetime, UTC
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from .config import Settings

# Loggers that write whole AMQP frames, message bodies (user tokens) included, at DEBUG.
CHATTY_LOGGERS = ("aio_pika", "aiormq", "pamqp")
# What a JSON line may carry about the command it belongs to, in this order.
COMMAND_FIELDS = ("correlation_id", "message_id", "action", "username", "server_name")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MASK = "***"

_command: ContextVar[dict[str, str]] = ContextVar("launcher_command", default={})  # noqa: B039 (replaced, never mutated)
# What is hidden is the ``secret`` group of each: the password of any ``scheme://user:password@host``
# (AMQP, HTTP, Redis URLs), a token in a JSON body or in an Authorization header, whoever logs them.
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/@:]*:)(?P<secret>[^\s/@]+)(?P<tail>@)")
_SECRET_PATTERNS = (
    _URL_PASSWORD,
    re.compile(r"(?P<head>\"token\"\s*:\s*\")(?P<secret>[^\"]+)(?P<tail>\")"),
    re.compile(r"(?P<head>\b(?:token|bearer)\s+)(?P<secret>[A-Za-z0-9_\-.=]{16,})(?P<tail>)", re.IGNORECASE),
)
_REPLACEMENT = rf"\g<head>{MASK}\g<tail>"


def bind_command(**fields: Any) -> None:
    """Say which command the current task works for; later lines carry these fields in JSON.

    ``None`` is unknown and left out; ``""`` is kept (``server_name`` "" is the default server)."""
    known = {k: str(v) for k, v in fields.items() if k in COMMAND_FIELDS and v is not None}
    _command.set({**_command.get(), **known})


def command_fields() -> dict[str, str]:
    return dict(_command.get())


def mask_url(url: str) -> str:
    """The URL without its password, for messages: ``amqp://user:***@host/``."""
    return _URL_PASSWORD.sub(_REPLACEMENT, url)


def settings_secrets(settings: Settings) -> list[str]:
    """The configured secrets, as they may appear in a log line (raw and URL-decoded)."""
    found = [settings.jupyterhub_api_token.get_secret_value()]
    try:
        password = urlsplit(settings.amqp_url.get_secret_value()).password
    except ValueError:
        password = None
    if password:
        found += [password, unquote(password), quote(unquote(password), safe="")]
    return found


class Redactor(logging.Filter):
    """Rewrites each record, message, arguments, traceback and stack, without its secrets."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Longest first, so that a secret containing another is replaced whole. Very short values
        # (a password "x") would blank out ordinary words, and are not worth hiding that way.
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        for pattern in _SECRET_PATTERNS:
            text = pattern.sub(_REPLACEMENT, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 (a bad format string: the handler would report it, with the raw arguments)
            message = f"{record.msg!r} (unformattable arguments)"
        record.msg, record.args = self.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = _PLAIN.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the command's fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(command_fields())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        # ASCII: a lone surrogate in a caller's field is escaped, never an encoding error.
        return json.dumps(line, ensure_ascii=True, default=str)


_PLAIN = logging.Formatter()


def configure(settings: Settings | None = None) -> None:
    """Root logging for the service: one stderr handler, the configured format, secrets redacted."""
    level = settings.log_level if settings else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    if settings is not None and settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.addFilter(Redactor(settings_secrets(settings) if settings else ()))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.INFO))
