"""The launcher's configuration: one Pydantic model, loaded from YAML and the environment.

Precedence, lowest first: defaults, the YAML file, ``JUPYTERHUB_API_TOKEN``/``JUPYTERHUB_API_URL``
(set by JupyterHub for services it manages), ``LAUNCHER_<KEY>`` variables.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

log = logging.getLogger(__name__)

# Keys of the older worker's config that mean nothing here; they load with a warning so that an
# existing config file keeps working.
LEGACY_KEYS = ("host", "port", "debug", "jupyterhub_service_prefix")
ENV_PREFIX = "LAUNCHER_"
KNOWN_SCHEMES = ("http", "https", "ws", "wss", "redis", "rediss", "tcp", "ssl", "tls", "file")


class ConfigError(Exception):
    """A configuration that cannot start the service; the message names the key."""


class Settings(BaseModel):
    # Inputs stay out of validation errors: the AMQP URL and the token are secrets.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    log_level: int = logging.INFO
    log_format: Literal["text", "json"] = "text"  # json: one object per line, for log search
    jupyterhub_url: AnyHttpUrl = AnyHttpUrl("http://127.0.0.1:8000")
    jupyterhub_api_prefix: str = "/hub/api"
    jupyterhub_api_token: SecretStr = SecretStr("")
    jupyterhub_public_url: AnyHttpUrl | None = None
    user_token_lifetime: int = Field(1800, gt=0)
    status_check_interval: float = Field(2.0, gt=0)
    status_check_count: int = Field(150, gt=0)
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    # Each attempt to reach the broker gives up after amqp_connect_timeout seconds; start-up stops
    # trying (and exits 1) once failures have gone on for amqp_startup_timeout seconds.
    amqp_connect_timeout: float = Field(10.0, gt=0)
    amqp_startup_timeout: float = Field(30.0, ge=0)
    # How often the hub's address and token are checked (first at start-up).
    hub_check_interval: float = Field(30.0, gt=0)
    command_queue: str = Field("launcher.commands", min_length=1)
    reply_exchange: str = Field("launcher.replies", min_length=1)
    events_exchange: str = Field("launcher.events", min_length=1)
    max_concurrency: int = Field(100, gt=0, le=2000)  # quorum queues cap prefetch at 2,000
    launch_timeout: float = Field(300.0, gt=0)
    # A read changes nothing: an unreachable hub should answer hub_unavailable soon, not at 300 s.
    read_timeout: float = Field(10.0, gt=0)
    shutdown_grace: float = Field(30.0, ge=0)
    # How often a poison command may be redelivered before the queue dead-letters it.
    delivery_limit: int = Field(5, gt=0)
    # Admission control (consumer/admission.py): hub requests in flight (progress streams not
    # counted) and our pending spawns at once; 0 or absent: adapt to the hub's answers.
    hub_max_requests: int | None = Field(None, ge=0)
    hub_max_pending_spawns: int | None = Field(None, ge=0)
    # Where lifecycle events say they come from (CloudEvents "source").
    event_source: str = "jupyterhub-launcher"
    # Shared with the hub's spawner (its launcher_signing_key): signs the options of each launch, so
    # that the spawner can refuse options that users post with their own tokens.
    spawner_signing_key: SecretStr = SecretStr("")
    # /healthz, /readyz and /metrics (health.py); port 0 turns the endpoint off.
    health_host: str = "0.0.0.0"
    health_port: int = Field(8090, ge=0, le=65535)
    # The Celery bridge (`jupyterhub-launcher celery-bridge`) that serves the older worker's clients.
    celery_broker_url: SecretStr | None = None  # None: amqp_url
    celery_result_backend: SecretStr = SecretStr("rpc://")
    celery_queue: str = Field("celery", min_length=1)
    celery_task_prefix: str = Field("launcher-worker", min_length=1)
    celery_raise_errors: bool = False
    # Tasks in flight at once in the bridge (threads that wait for replies; the launcher does the work).
    celery_concurrency: int = Field(200, gt=0)
    # kombu's transport options, e.g. Redis' visibility_timeout: how long before an unacknowledged
    # task (its bridge died) is delivered again. A mapping, or JSON in LAUNCHER_CELERY_BROKER_TRANSPORT_OPTIONS.
    celery_broker_transport_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: Any) -> int:
        if isinstance(value, str) and not value.strip().isdigit():
            level = logging.getLevelName(value.strip().upper())
            if not isinstance(level, int):
                raise ValueError(f"{value!r} is not a log level (DEBUG, INFO, WARNING, ERROR or a number)")
            return level
        return int(value)

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: SecretStr) -> SecretStr:
        # Messages here never quote the URL: it holds the password.
        url = value.get_secret_value()
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
        except ValueError:
            raise ValueError("is not a URL (amqp://user:password@host:port/vhost)") from None
        if parts.scheme not in ("amqp", "amqps"):
            # Named only when it is a well-known one: what precedes a colon may be a user or password.
            found = f" (found {parts.scheme}://)" if parts.scheme in KNOWN_SCHEMES else ""
            raise ValueError(f"must start with amqp:// or amqps://{found}")
        if not parts.hostname:
            raise ValueError("names no host (amqp://user:password@host:port/vhost)")
        return value

    @field_validator("celery_broker_transport_options", mode="before")
    @classmethod
    def _json_mapping(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    @field_validator("jupyterhub_api_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return "/" + value.strip("/")

    @model_validator(mode="after")
    def _public_url(self) -> Settings:
        if self.jupyterhub_public_url is None:
            object.__setattr__(self, "jupyterhub_public_url", self.jupyterhub_url)
        return self

    @property
    def hub_api_url(self) -> str:
        return str(self.jupyterhub_url).rstrip("/") + self.jupyterhub_api_prefix

    @property
    def public_url(self) -> str:
        return str(self.jupyterhub_public_url).rstrip("/")

    @property
    def celery_broker(self) -> str:
        return (self.celery_broker_url or self.amqp_url).get_secret_value()

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.command_queue}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.command_queue}.dead"

    @property
    def answers_queue(self) -> str:
        """The answer journal: a stream of launch results (see consumer/journal.py)."""
        return f"{self.command_queue}.answered"


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from a YAML file (``None``: ``./config.yaml`` if present) and the environment."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if path is not None or Path("config.yaml").exists():
        file = Path(path or "config.yaml")
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except OSError as error:
            raise ConfigError(f"cannot read config file {file}: {error.strerror}") from error
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {file} is not valid YAML: {error}") from error
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {file} must be a mapping of keys to values")
        values.update(loaded)

    for key in LEGACY_KEYS:
        if key in values:
            values.pop(key)
            log.warning("config key %r is from the older worker and is ignored", key)

    if "JUPYTERHUB_API_TOKEN" in environ:
        values["jupyterhub_api_token"] = environ["JUPYTERHUB_API_TOKEN"]
    if "JUPYTERHUB_API_URL" in environ:
        api = urlsplit(environ["JUPYTERHUB_API_URL"])
        values["jupyterhub_url"] = f"{api.scheme}://{api.netloc}"
        values["jupyterhub_api_prefix"] = api.path or "/hub/api"
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX):
            key = name[len(ENV_PREFIX) :].lower()
            if key not in Settings.model_fields:
                raise ConfigError(f"environment variable {name}: {key!r} is not a configuration key")
            values[key] = value

    try:
        return Settings.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in error.errors(include_url=False)
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
