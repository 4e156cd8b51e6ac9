"""Hub side: spawners that apply the launcher's run-time options.

This module is loaded by JupyterHub, not by the consumer: it imports only JupyterHub and traitlets
(and kubespawner lazily), so it also works as one file mounted into a hub.

Every start begins from the configured defaults, so nothing from an earlier start leaks into the next.
"""

from __future__ import annotations

import re
from typing import Any

from jupyterhub.spawner import SimpleLocalProcessSpawner
from traitlets import Unicode
from traitlets.config import Configurable

# Same meaning as JupyterHub's ByteSpecification: K/M/G/T are powers of 1024; Ki/Mi/Gi/Ti too.
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_RESERVED_ENV = ("JUPYTERHUB_", "JPY_")


def memory_bytes(value: str | int | float) -> int:
    match = _QUANTITY.match(str(value).strip())
    if match is None:
        raise ValueError(f"{value!r} is not a memory quantity")
    return int(float(match[1]) * _UNITS[match[2] or ""])


class LauncherSpawnerMixin(Configurable):
    """Applies ``image``, ``cpu``, ``memory`` and ``env`` from ``user_options`` at every start."""

    launcher_image = Unicode("", help="The image the launcher asked for (local spawners: informative).")

    _launcher_traits = ("cpu_limit", "cpu_guarantee", "mem_limit", "mem_guarantee", "environment")

    def _launcher_reset(self) -> None:
        defaults = getattr(self, "_launcher_defaults", None)
        if defaults is None:
            defaults = {name: getattr(self, name) for name in self._launcher_traits}
            defaults["environment"] = dict(defaults["environment"])
            self._launcher_defaults = defaults
        for name, value in defaults.items():
            setattr(self, name, dict(value) if isinstance(value, dict) else value)

    def launcher_apply(self, options: dict[str, Any]) -> None:
        self._launcher_reset()
        self.launcher_image = options.get("image", "")
        cpu = options.get("cpu") or {}
        if cpu.get("limit") is not None:
            self.cpu_limit = float(cpu["limit"])
        if cpu.get("request") is not None:
            self.cpu_guarantee = float(cpu["request"])
        memory = options.get("memory") or {}
        if memory.get("limit") is not None:
            self.mem_limit = memory_bytes(memory["limit"])
        if memory.get("request") is not None:
            self.mem_guarantee = memory_bytes(memory["request"])
        env = dict(self.environment)
        for name, value in (options.get("env") or {}).items():
            if str(name).startswith(_RESERVED_ENV):
                raise ValueError(f"environment variable {name} is set by JupyterHub and cannot be overridden")
            env[str(name)] = str(value)
        if self.launcher_image:
            env["JUPYTER_IMAGE"] = self.launcher_image
        self.environment = env

    async def start(self) -> Any:
        self.launcher_apply(self.user_options or {})
        return await super().start()  # type: ignore[misc]


class LocalLauncherSpawner(LauncherSpawnerMixin, SimpleLocalProcessSpawner):
    """JupyterHub's local process spawner with the launcher's options (tests and demos)."""
