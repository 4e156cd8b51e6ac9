"""The launcher's message contract: importable by publishers without the consumer's dependencies."""

from .commands import (
    ACTIONS,
    MAX_COMMAND_BYTES,
    Command,
    CpuSpec,
    GpuSpec,
    LaunchCommand,
    MemorySpec,
    ReadCommand,
    RemoveCommand,
    Volume,
    describe_errors,
    parse_command,
)
from .events import CONTENT_TYPE as EVENT_CONTENT_TYPE
from .events import CloudEvent, EventType
from .quantities import parse_memory
from .replies import ErrorCode, ErrorInfo, LaunchResult, RemoveResult, Reply, ServerModel

__all__ = [
    "ACTIONS",
    "EVENT_CONTENT_TYPE",
    "MAX_COMMAND_BYTES",
    "CloudEvent",
    "Command",
    "CpuSpec",
    "ErrorCode",
    "ErrorInfo",
    "EventType",
    "GpuSpec",
    "LaunchCommand",
    "LaunchResult",
    "MemorySpec",
    "ReadCommand",
    "RemoveCommand",
    "RemoveResult",
    "Reply",
    "ServerModel",
    "Volume",
    "describe_errors",
    "parse_command",
    "parse_memory",
]
