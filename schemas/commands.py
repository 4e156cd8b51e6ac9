"""Commands a publisher sends to the launcher: launch, remove, read.

The field names and shapes follow the older Celery worker's task API
(``launch(image, username, server_name='', vols=None, cpu=None, memory=None, gpu=None, json=None)``)
so that callers can move over without rewriting their payloads.
"""

from __future__ import annotations

import posixpath
import re
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CpuSpec(_Strict):
    """CPU cores, as a request (guarantee) and a limit."""

    request: Annotated[float, Field(gt=0)] | None = None
    limit: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _request_within_limit(self) -> CpuSpec:
        _check_request_limit(self.request, self.limit)
        return self


class MemorySpec(_Strict):
    """Memory as quantities: bytes, or ``512M``/``1G`` (powers of 1024) or ``1.5Gi``."""

    request: str | int | None = None
    limit: str | int | None = None

    @field_validator("request", "limit")
    @classmethod
    def _parseable(cls, value: str | int | None) -> str | int | None:
        if value is not None:
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

    request: Annotated[int, Field(gt=0)] | None = None
    limit: Annotated[int, Field(gt=0)] | None = None

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


class _Target(_Strict):
    username: Annotated[str, Field(pattern=USERNAME_PATTERN)]
    server_name: Annotated[str, Field(pattern=SERVER_NAME_PATTERN)] = ""


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
    timeout: Annotated[float, Field(gt=0)] | None = None
    # Seconds after ready when the launcher removes the server (the reply's result.expires_at).
    ttl: Annotated[float, Field(gt=0)] | None = None

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


class ReadCommand(_Target):
    """Read a user's server model."""

    action: Literal["read"]


Command = Annotated[
    Union[LaunchCommand, RemoveCommand, ReadCommand], Field(discriminator="action")
]
ACTIONS = ("launch", "remove", "read")
command_adapter: TypeAdapter[LaunchCommand | RemoveCommand | ReadCommand] = TypeAdapter(Command)


def parse_command(body: bytes | str) -> LaunchCommand | RemoveCommand | ReadCommand:
    """Validate a JSON command; raises ``pydantic.ValidationError`` naming each bad field."""
    return command_adapter.validate_json(body)


def describe_errors(error: ValidationError) -> list[dict[str, str]]:
    """``[{"field": "memory.limit", "message": ...}]``: dotted field paths, without the union tag."""
    described = []
    for item in error.errors(include_url=False):
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
        described.append({"field": field, "message": message})
    return described
