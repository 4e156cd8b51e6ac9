"""Commands a publisher sends to the launcher: launch, remove, read.

The field names and shapes follow the older Celery worker's task API
(``launch(image, username, server_name='', vols=None, cpu=None, memory=None, gpu=None, json=None)``)
so that callers can move over without rewriting their payloads.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from .quantities import parse_memory

# Lowercase only: authenticators lowercase login names, so "Bob" created here would never be the
# "bob" who logs in. Slashes would break the hub's URLs.
USERNAME_PATTERN = r"^[a-z0-9][a-z0-9._@+-]{0,254}$"
# JupyterHub 6 refuses other named-server names with 400 "Invalid server_name".
SERVER_NAME_PATTERN = r"^([a-z][a-z0-9-]{0,29})?$"
_PVC_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Variables the hub sets for the single-user server: a caller overriding them could point the
# server at another hub or impersonate its API token.
RESERVED_ENV_PREFIXES = ("JUPYTERHUB_", "JPY_")
# Sane maxima: more than any one server gets, so a bigger number is a mistake (or an attack), and
# never reaches the hub. The hub's own policy (launcher_max_cpu, ...) sets the real limits.
MAX_CPU = 1024  # cores
MAX_GPU = 64
MAX_TIMEOUT = 86_400.0  # seconds: a day
MAX_TTL = 366 * 86_400.0  # seconds: a year; the expiry ladder's queues hold any wait up to that
# A command is a few hundred bytes; bounding the body bounds the work and memory of reading one.
MAX_COMMAND_BYTES = 1024 * 1024
# The extra spawner options under "json": Kubernetes objects such as tolerations or affinity are a
# few levels deep and a few kilobytes.
MAX_JSON_DEPTH = 32
MAX_JSON_BYTES = 64 * 1024
# How much of the problems an error reply lists: an invalid body can have one per key.
MAX_PROBLEMS = 20
_MAX_PROBLEM_TEXT = 300


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CpuSpec(_Strict):
    """CPU cores, as a request (guarantee) and a limit."""

    request: Annotated[float, Field(gt=0, le=MAX_CPU, allow_inf_nan=False)] | None = None
    limit: Annotated[float, Field(gt=0, le=MAX_CPU, allow_inf_nan=False)] | None = None

    @model_validator(mode="after")
    def _request_within_limit(self) -> CpuSpec:
        _check_request_limit(self.request, self.limit)
        return self


class MemorySpec(_Strict):
    """Memory as quantities: bytes, or ``512M``/``1G`` (powers of 1024) or ``1.5Gi``."""

    request: str | int | None = None
    limit: str | int | None = None

    @field_validator("request", "limit", mode="before")
    @classmethod
    def _parseable(cls, value: Any) -> str | int | None:
        # Before the str | int union, so that the error names the field, not the union's branches.
        if value is None:
            return None
        if isinstance(value, float):
            parse_memory(value)  # refuses inf, nan and too much, in the caller's notation
            if value.is_integer():
                value = int(value)  # 1e9 in JSON is a float
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            # ValueError, not TypeError: pydantic turns only ValueError into a validation error.
            raise ValueError("must be a whole number of bytes or a string like '512M'")  # noqa: TRY004
        parse_memory(value)
        return value

    @model_validator(mode="after")
    def _request_within_limit(self) -> MemorySpec:
        _check_request_limit(
            None if self.request is None else parse_memory(self.request),
            None if self.limit is None else parse_memory(self.limit),
        )
        return self


class GpuSpec(_Strict):
    """Whole GPUs. Kubernetes needs request == limit for extended resources; the hub side enforces it."""

    request: Annotated[int, Field(gt=0, le=MAX_GPU)] | None = None
    limit: Annotated[int, Field(gt=0, le=MAX_GPU)] | None = None

    @model_validator(mode="after")
    def _request_within_limit(self) -> GpuSpec:
        _check_request_limit(self.request, self.limit)
        return self


def _check_request_limit(request: float | None, limit: float | None) -> None:
    if request is None and limit is None:
        raise ValueError("give a request, a limit or both")
    if request is not None and limit is not None and request > limit:
        raise ValueError(f"request ({request}) is more than limit ({limit})")


class Volume(_Strict):
    """A persistent volume claim mounted into the server."""

    pvc: str
    mount: str
    subpath: str = ""

    @field_validator("pvc")
    @classmethod
    def _pvc_name(cls, value: str) -> str:
        if not _PVC_NAME.match(value):
            raise ValueError(f"{value!r} is not a valid PVC name (lowercase DNS name)")
        return value

    @field_validator("mount")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or ".." in value.split("/"):
            raise ValueError(f"mount path {value!r} must be absolute and must not contain '..'")
        return posixpath.normpath(value)

    @field_validator("subpath")
    @classmethod
    def _relative(cls, value: str) -> str:
        if value.startswith("/") or ".." in value.split("/"):
            raise ValueError(f"subpath {value!r} must be relative and must not contain '..'")
        return value


Timeout = Annotated[float, Field(gt=0, le=MAX_TIMEOUT, allow_inf_nan=False)]


class _Target(_Strict):
    username: Annotated[str, Field(pattern=USERNAME_PATTERN)]
    server_name: Annotated[str, Field(pattern=SERVER_NAME_PATTERN)] = ""
    # The older worker's switch to skip its "already running?" check: accepted so that its callers'
    # payloads still validate, and ignored (a launch always checks, in the same request as the start).
    skip_check: Annotated[Any, Field(exclude=True, description="accepted for compatibility, ignored")] = None


class LaunchCommand(_Target):
    """Start (or return) a user's server with run-time options."""

    action: Literal["launch"] = "launch"
    image: Annotated[str, Field(min_length=1, max_length=512, pattern=r"^\S+$")]
    cpu: CpuSpec | None = None
    memory: MemorySpec | None = None
    gpu: GpuSpec | None = None
    vols: list[Volume] | None = None
    env: dict[str, str] | None = None
    json_: Annotated[dict[str, Any] | None, Field(alias="json")] = None
    timeout: Timeout | None = None
    # Seconds after ready when the launcher removes the server (the reply's result.expires_at).
    ttl: Annotated[float, Field(gt=0, le=MAX_TTL, allow_inf_nan=False)] | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for name in value or {}:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
            if name.startswith(RESERVED_ENV_PREFIXES):
                raise ValueError(f"{name!r} is set by JupyterHub and cannot be overridden")
        return value

    @field_validator("json_")
    @classmethod
    def _drop_transparent(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # The older API's "transparent" switch set arbitrary spawner attributes; it is accepted
        # for compatibility and ignored, since the hub applies only allow-listed keys.
        if value is not None:
            value = {k: v for k, v in value.items() if k != "transparent"}
        return value

    @field_validator("json_")
    @classmethod
    def _bounded(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        deepest, finite = _shape(value)
        if deepest > MAX_JSON_DEPTH:
            raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
        if not finite:
            raise ValueError("holds Infinity or NaN, which are not JSON numbers")
        size = len(json.dumps(value).encode())
        if size > MAX_JSON_BYTES:
            raise ValueError(f"{size} bytes as JSON, more than the {MAX_JSON_BYTES} allowed")
        return value

    @field_validator("vols")
    @classmethod
    def _distinct_mounts(cls, value: list[Volume] | None) -> list[Volume] | None:
        mounts = [v.mount for v in value or []]
        if len(mounts) != len(set(mounts)):
            raise ValueError("two volumes share a mount path")
        return value

    def user_options(self) -> dict[str, Any]:
        """The options sent to the hub as ``user_options``; the spawner mixin reads these keys."""
        options = self.model_dump(
            include={"image", "cpu", "memory", "gpu", "vols", "env", "json_"},
            exclude_none=True,
            by_alias=True,
        )
        for resource in ("cpu", "memory", "gpu"):
            if resource in options:
                options[resource] = {k: v for k, v in options[resource].items() if v is not None}
        return options


class RemoveCommand(_Target):
    """Stop a user's server."""

    action: Literal["remove"]
    timeout: Timeout | None = None  # seconds; default launch_timeout


class ReadCommand(_Target):
    """Read a user's server model."""

    action: Literal["read"]
    timeout: Timeout | None = None  # seconds; default read_timeout


def _shape(value: Any) -> tuple[int, bool]:
    """How deeply lists and objects nest in a JSON value (a scalar is 0), and whether all its
    numbers are finite; without recursion."""
    deepest, finite, stack = 0, True, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, float):
            finite = finite and math.isfinite(item)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest, finite


Command = Annotated[LaunchCommand | RemoveCommand | ReadCommand, Field(discriminator="action")]
ACTIONS = ("launch", "remove", "read")
command_adapter: TypeAdapter[LaunchCommand | RemoveCommand | ReadCommand] = TypeAdapter(Command)


def parse_command(body: bytes | str) -> LaunchCommand | RemoveCommand | ReadCommand:
    """Validate a JSON command; raises ``pydantic.ValidationError`` naming each bad field.

    JSON nested too deeply, lone surrogates (``"\\ud800"``) and bodies over ``MAX_COMMAND_BYTES``
    are invalid commands like any other.
    """
    if len(body) > MAX_COMMAND_BYTES:
        too_large = PydanticCustomError(
            "command_too_large",
            "{size} bytes, more than the {limit} a command may have",
            {"size": len(body), "limit": MAX_COMMAND_BYTES},
        )
        details: InitErrorDetails = {"type": too_large, "loc": (), "input": None}
        raise ValidationError.from_exception_data("command", [details])
    return command_adapter.validate_json(body)


def describe_errors(error: ValidationError) -> list[dict[str, str]]:
    """``[{"field": "memory.limit", "message": ...}]``: dotted field paths, without the union tag."""
    described = []
    problems = error.errors(include_url=False)
    for item in problems[:MAX_PROBLEMS]:
        loc = [str(part) for part in item["loc"]]
        if loc and loc[0] in ACTIONS:
            loc = loc[1:]  # the discriminated union puts the action first
        field = ".".join(loc) or "body"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "union_tag_not_found":
            field, message = "action", f"missing; one of {', '.join(ACTIONS)}"
        elif item["type"] == "union_tag_invalid":
            field, message = "action", f"{item['input'].get('action')!r} is not one of {', '.join(ACTIONS)}"
        elif item["type"] == "model_attributes_type":
            message = "the command must be a JSON object"
        elif item["type"] == "json_invalid":
            message = f"not valid JSON ({item['ctx']['error']})"
            if "hex escape" in message:  # the parser's words for a lone surrogate such as \ud800
                message += "; \\ud800-\\udfff escapes must come in pairs (a surrogate pair)"
        # The caller's own values and keys come back in these: keep them short.
        described.append({"field": _clip(field), "message": _clip(message)})
    if len(problems) > MAX_PROBLEMS:
        described.append({"field": "body", "message": f"and {len(problems) - MAX_PROBLEMS} more problems"})
    return described


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_PROBLEM_TEXT else text[: _MAX_PROBLEM_TEXT - 1] + "…"
